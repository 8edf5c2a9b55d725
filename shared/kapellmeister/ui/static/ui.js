// kapellmeister UI: forms post through the UI to the NATS API; live parts come as
// Server-Sent Events. No framework, no build step.
"use strict";
(() => {
  const flash = document.getElementById("flash");

  function show(kind, text) {
    flash.className = `flash ${kind}`;
    flash.textContent = text;
    flash.hidden = false;
  }

  // Replace the page's live parts; the signal forms only when the set of waiting tasks
  // changed, so a signal being typed is not wiped by an unrelated update.
  function apply(update) {
    for (const [id, html] of Object.entries(update.parts || {})) {
      const part = document.getElementById(id);
      if (!part) continue;
      const key = (update.keys || {})[id];
      if (key !== undefined) {
        if (part.dataset.key === key) continue;
        part.dataset.key = key;
      }
      part.innerHTML = html;
    }
  }

  document.addEventListener("submit", async (event) => {
    const form = event.target;
    if (!(form instanceof HTMLFormElement) || !form.hasAttribute("data-action")) return;
    event.preventDefault();
    const buttons = form.querySelectorAll("button");
    buttons.forEach((b) => { b.disabled = true; });
    try {
      const response = await fetch(form.action, {
        method: "POST",
        body: new FormData(form),
        headers: { Accept: "application/json" },
      });
      const text = await response.text();
      let data = {};
      try { data = JSON.parse(text); } catch (_) { data = {}; }
      if (!response.ok) {
        // The API's error as it says it; else what answered (a plain-text refusal).
        const error = data.error || {};
        const code = error.code || response.status;
        const kind = error.type ? ` ${error.type}` : "";
        show("error", `${code}${kind}: ${error.message || text || response.statusText}`);
        return;
      }
      if (data.location) {
        window.location.assign(data.location);
        return;
      }
      const name = (event.submitter && event.submitter.textContent.trim()) || "done";
      show("ok", `${name}: workflow is ${data.status}`);
      // A live page gets every change in order from the stream, this one included; the
      // reply may arrive after a later change, so only a page without the stream uses it.
      if (!source || source.readyState !== EventSource.OPEN) apply(data);
    } catch (failure) {
      show("error", `the UI did not answer: ${failure}`);
    } finally {
      buttons.forEach((b) => { b.disabled = false; });
    }
  });

  const live = document.body.dataset.live;
  let source = null;
  if (live && window.EventSource) {
    const indicator = document.getElementById("live");
    source = new EventSource(live);
    source.onopen = () => { indicator.hidden = false; };
    source.onerror = () => { indicator.hidden = true; };
    // Each page listens for its own kind of event only; every event's data is JSON.
    if (document.getElementById("rows")) {
      source.addEventListener("rows", (event) => {
        document.getElementById("rows").innerHTML = JSON.parse(event.data);
      });
    } else {
      source.addEventListener("saga", (event) => apply(JSON.parse(event.data)));
    }
    source.addEventListener("failure", (event) => show("error", JSON.parse(event.data)));
  }
})();
