"""The web UI in a real browser (Debian's headless chromium, driven by Playwright) against
a real stack: nats-server, the services and ``kapellmeister ui`` as processes.

Every assertion on the page is backed by one on the saga the conductor keeps, so a page
that merely looks right cannot pass. With ``UI_SCREENSHOTS=<dir>`` the tests also save
the screenshots the README shows (``make screenshots``).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal as signal_module
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from kapellmeister.processes import wait_for_services
from tests.support import (
    Stack,
    assert_error,
    body,
    call,
    event_stream,
    free_port,
    http_request,
    saga,
    wait_finished,
)

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Read before the tests clean the environment.
IN_CI = bool(os.environ.get("CI"))
SHOTS = os.environ.get("UI_SCREENSHOTS")
# Flags for a machine with no network beyond loopback: no background connections.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ENV = {"KAPELLMEISTER_ACK_WAIT_S": "3", "KAPELLMEISTER_SWEEP_INTERVAL_S": "1"}
TRACE_URL = "http://127.0.0.1:16686/trace/{trace_id}"
FREE_SATURDAY = {"user": "ann", "datetime": "2026-11-21T12:00:00"}
LIVE_S = 15_000  # how long the page may take to show a change (ms)
# The name of a proxy in front of the UI (--allow-host); it is never resolved here.
PROXY = "ui.example"
# What the page shows may wait on the conductor, the agents and the stream: a loaded
# machine needs more than Playwright's default 5 s.
expect.set_options(timeout=LIVE_S)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if CHROMIUM is None:
        if IN_CI:
            pytest.fail("CI runs the browser tests: `make test` installs Debian's chromium")
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


class Ui:
    """The stack and the UI process, with the page's address."""

    def __init__(self, stack: Stack, port: int) -> None:
        self.stack = stack
        self.port = port
        self.url = f"http://127.0.0.1:{port}"


async def _ui(nats_url, tmp_path, nc, agents: tuple[str, ...]) -> AsyncIterator[Ui]:
    stack = Stack(nats_url, tmp_path / "logs", ENV)
    port = free_port()
    try:
        for name in ("conductor", *agents):
            stack.start(name)
        stack.start(
            "ui",
            env={"KAPELLMEISTER_TRACE_URL": TRACE_URL},
            argv=[
                *[sys.executable, "-m", "kapellmeister.cli", "ui", "--port", str(port)],
                *["--allow-host", PROXY],
            ],
        )
        await wait_for_services(nc, ["conductor", *agents], processes=stack.processes)
        await _until_serving(stack, port)
        yield Ui(stack, port)
    finally:
        stack.stop()


async def _until_serving(stack: Stack, port: int, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    ui = stack.processes[-1]
    while True:
        try:
            if (await http_request(port, "GET", "/healthz"))[0] == 200:
                return
        except OSError:
            pass
        assert ui.alive() and loop.time() < deadline, f"the UI did not start\n{ui.log_tail()}"
        await asyncio.sleep(0.1)


@pytest.fixture
async def ui(nats_url, tmp_path, nc) -> AsyncIterator[Ui]:
    async for running in _ui(nats_url, tmp_path, nc, ("weather", "agenda")):
        yield running


@pytest.fixture
async def ui_without_weather(nats_url, tmp_path, nc) -> AsyncIterator[Ui]:
    async for running in _ui(nats_url, tmp_path, nc, ("agenda",)):
        yield running


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    opened = await context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield opened
    finally:
        await context.close()
    assert errors == [], f"the page's script failed: {errors}"


async def shot(page: Page, name: str, full_page: bool = True) -> None:
    if SHOTS:  # Playwright makes the directory
        await page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=full_page)


def node(page: Page, ref: str):
    return page.locator(f'#graph g.node[data-ref="{ref}"]')


def task_row(page: Page, ref: str):
    return page.locator(f'#tasks tr.task[data-ref="{ref}"]')


async def signal(page: Page, ref: str, output: dict[str, Any]) -> None:
    panel = page.locator(f'#signals section[data-ref="{ref}"]')
    await panel.locator("textarea[name=output]").fill(_json(output))
    await panel.get_by_role("button", name=f"Signal {ref}").click()


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


async def test_start_and_approve_an_approval_from_the_page(ui, page, nc, js):
    await page.goto(f"{ui.url}/definitions/approval")
    await expect(page.locator("svg.graph g.node[data-ref=approval_1]")).to_be_visible()
    await page.locator("textarea[name=input]").fill('{"money": 100}')
    await page.locator("input[name=workflow_id]").fill("pay-ui")
    await page.locator("input[name=tenant]").fill("acme")
    await page.get_by_role("button", name="Start approval").click()
    await expect(page).to_have_url(f"{ui.url}/workflows/pay-ui")
    await expect(page.locator("#status")).to_have_text("RUNNING")
    await expect(node(page, "approval_1")).to_have_attribute("data-status", "IN_PROGRESS")
    await shot(page, "workflow-waiting")

    await signal(page, "approval_1", {"status": "ok", "approver": "kim"})
    await expect(node(page, "approval_1")).to_have_attribute("data-status", "COMPLETED")
    await expect(page.locator('#signals section[data-ref="approval_2"]')).to_be_visible()
    await signal(page, "approval_2", {"status": "ok", "approver": "lee"})
    await expect(page.locator("#status")).to_have_text("COMPLETED", timeout=LIVE_S)
    await expect(page.locator("#output")).to_contain_text('"your_got_the_money": 100')
    await expect(page.locator("#signals section")).to_have_count(0)
    await expect(node(page, "granted")).to_have_attribute("data-status", "COMPLETED")

    state = await saga(js, "pay-ui")
    assert state["status"] == "COMPLETED"
    assert state["tenant"] == "acme"
    assert state["output"] == {"your_got_the_money": 100}
    outputs = {t["ref"]: t["output"] for t in state["tasks"] if t["type"] == "WAIT"}
    assert outputs == {
        "approval_1": {"status": "ok", "approver": "kim"},
        "approval_2": {"status": "ok", "approver": "lee"},
    }
    # The trace link goes to the configured tracing UI with this workflow's trace id.
    link = page.locator("#summary a.trace")
    await expect(link).to_have_attribute("href", TRACE_URL.format(trace_id=state["trace_id"]))


async def test_a_plan_day_completes_live_on_its_page(ui_without_weather, page, nc, js):
    ui = ui_without_weather
    started = body(await call(nc, "conductor.start.plan_day", FREE_SATURDAY))
    workflow_id = started["workflow_id"]
    await page.goto(f"{ui.url}/workflows/{workflow_id}")
    await expect(page.locator("#live")).to_be_visible()
    await expect(node(page, "agenda")).to_have_attribute("data-status", "COMPLETED", timeout=LIVE_S)
    # No weather agent yet: its task waits in the queue, and the workflow runs.
    await expect(node(page, "weather")).to_have_attribute("data-status", "SCHEDULED")
    await expect(page.locator("#status")).to_have_text("RUNNING")
    await page.evaluate("window.sameDocument = true")

    ui.stack.start("weather")
    await expect(page.locator("#status")).to_have_text("COMPLETED", timeout=LIVE_S)
    assert await page.evaluate("window.sameDocument") is True  # updated, not reloaded
    state = await saga(js, workflow_id)
    assert state["status"] == "COMPLETED"
    chosen = state["output"]["activity"]
    ref = "run" if chosen == "run" else "code_for_fun"
    await expect(node(page, ref)).to_have_attribute("data-status", "COMPLETED")
    await expect(node(page, "weather")).to_have_attribute("data-status", "COMPLETED")
    weather = next(t for t in state["tasks"] if t["ref"] == "weather")
    await expect(
        page.locator('#tasks tr.task-detail[data-ref="weather"] .task-output')
    ).to_contain_text(f'"temperature": {weather["output"]["temperature"]}')
    # One timeline lane per task, each with its attempt's bar.
    lanes = page.locator("#timeline .lane")
    await expect(lanes).to_have_count(len(state["tasks"]))
    await shot(page, "workflow-completed")


async def test_the_list_filters_and_shows_new_workflows_live(ui, page, nc, js):
    first = body(await call(nc, "conductor.start.approval", {"money": 1}, {"Tenant": "acme"}))
    await page.goto(f"{ui.url}/?tenant=acme")
    rows = page.locator("#rows tr[data-workflow-id]")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_have_attribute("data-workflow-id", first["workflow_id"])

    second = body(await call(nc, "conductor.start.approval", {"money": 2}, {"Tenant": "acme"}))
    await call(nc, "conductor.start.approval", {"money": 3}, {"Tenant": "globex"})
    # A drinks order waits for the brewery, which is not running: RUNNING, another name.
    drinks = body(await call(nc, "conductor.start.drinks", {"drink": "beer", "style": "IPA"}))
    await expect(rows).to_have_count(2, timeout=LIVE_S)  # no reload: the index changed
    await expect(rows.first).to_have_attribute("data-workflow-id", second["workflow_id"])

    await page.goto(ui.url)
    await page.select_option("select[name=status]", "RUNNING")
    await page.select_option("select[name=workflow]", "approval")
    await page.get_by_role("button", name="Filter").click()
    await expect(page).to_have_url(re.compile(r"status=RUNNING"))
    await expect(rows).to_have_count(3)
    running = body(await call(nc, "conductor.list", {"status": "RUNNING"}))["workflows"]
    assert drinks["workflow_id"] in {w["workflow_id"] for w in running}
    await shot(page, "workflows")
    await page.locator("select[name=status]").select_option("COMPLETED")
    await page.get_by_role("button", name="Filter").click()
    await expect(page.locator("#rows tr.empty")).to_have_text("no workflows match")


async def test_rerun_from_a_task_runs_it_and_what_follows_again(ui, page, nc, js):
    started = body(await call(nc, "conductor.start.plan_day", FREE_SATURDAY))
    workflow_id = started["workflow_id"]
    await wait_finished(js, [workflow_id])
    await page.goto(f"{ui.url}/workflows/{workflow_id}")
    await expect(page.locator("#status")).to_have_text("COMPLETED")

    await task_row(page, "weather").get_by_role("button", name="Rerun from here").click()
    await expect(page.locator("#flash")).to_contain_text("Rerun from here")
    await expect(task_row(page, "weather").locator("td").nth(4)).to_have_text("2", timeout=LIVE_S)
    await expect(page.locator("#status")).to_have_text("COMPLETED", timeout=LIVE_S)
    await expect(
        page.locator('#tasks tr.task-detail[data-ref="weather"] table.attempts tr')
    ).to_have_count(2)

    state = await saga(js, workflow_id)
    assert state["status"] == "COMPLETED"
    tasks = {t["ref"]: t for t in state["tasks"]}
    assert tasks["weather"]["attempt"] == 2
    assert [a["attempt"] for a in tasks["weather"]["history"]] == [1]
    assert tasks["agenda"]["attempt"] == 1  # before the rerun point: not run again


async def test_a_refused_action_shows_the_apis_error_and_changes_nothing(ui, page, nc, js):
    started = body(await call(nc, "conductor.start.plan_day", FREE_SATURDAY))
    workflow_id = started["workflow_id"]
    await wait_finished(js, [workflow_id])
    before = await saga(js, workflow_id)
    refused = assert_error(await call(nc, f"conductor.pause.{workflow_id}", b""), 409)

    await page.goto(f"{ui.url}/workflows/{workflow_id}")
    await page.get_by_role("button", name="Pause").click()
    flash = page.locator("#flash")
    await expect(flash).to_have_class(re.compile(r"\berror\b"))
    await expect(flash).to_have_text(f"409 {refused['type']}: {refused['message']}")
    await shot(page, "refused", full_page=False)
    assert await saga(js, workflow_id) == before

    # A signal that is not JSON: the API's 400, shown as it says it.
    approval = body(await call(nc, "conductor.start.approval", {"money": 5}))
    await page.goto(f"{ui.url}/workflows/{approval['workflow_id']}")
    panel = page.locator('#signals section[data-ref="approval_1"]')
    await panel.locator("textarea[name=output]").fill("{not json")
    await panel.get_by_role("button", name="Signal approval_1").click()
    await expect(flash).to_contain_text("400")
    assert (await saga(js, approval["workflow_id"]))["status"] == "RUNNING"


async def test_a_page_of_another_site_cannot_act(ui, nc, js):
    workflow = body(await call(nc, "conductor.start.approval", {"money": 7}))
    path = f"/workflows/{workflow['workflow_id']}/pause"
    for headers in (
        {"Origin": "http://evil.example"},
        {"Origin": "null"},  # a sandboxed frame, a file: page
        {"Sec-Fetch-Site": "cross-site"},  # a browser that sends no Origin
        # A page on another name that resolves to the UI (DNS rebinding), through the
        # proxy's name or its own.
        {"Host": PROXY, "Origin": "http://evil.example"},
    ):
        status, reply = await http_request(ui.port, "POST", path, headers)
        assert status == 403, (headers, reply)
    status, reply = await http_request(ui.port, "POST", path, {"Host": "evil.example"})
    assert status == 400, reply
    assert (await saga(js, workflow["workflow_id"]))["status"] == "RUNNING"
    # A name that is neither loopback's nor the proxy's gets no page at all.
    assert (await http_request(ui.port, "GET", "/", {"Host": "evil.example"}))[0] == 400
    # Through the proxy's name, its own pages act.
    status, reply = await http_request(
        ui.port, "POST", path, {"Host": PROXY, "Origin": f"http://{PROXY}"}
    )
    assert status == 303, reply
    assert (await saga(js, workflow["workflow_id"]))["status"] == "PAUSED"


async def test_nothing_a_workflow_carries_runs_as_markup_in_the_page(ui, page, nc, js):
    markup = '<img src=x onerror="window.pwned=1">'
    definition = {
        "name": "xss",
        "version": 1,
        "description": markup,
        "input": {"say": "str"},
        "tasks": [{"ref": "wait_here", "type": "WAIT", "input": {"note": markup}}],
    }
    assert body(await call(nc, "conductor.definitions.register", definition))["name"] == "xss"
    started = body(await call(nc, "conductor.start.xss", {"say": markup}))
    workflow_id = started["workflow_id"]
    await page.goto(f"{ui.url}/workflows/{workflow_id}")
    await signal(page, "wait_here", {"said": markup})
    await expect(page.locator("#status")).to_have_text("COMPLETED")
    await expect(page.locator("#tasks .task-output")).to_contain_text("onerror")  # as text
    for path in (f"/workflows/{workflow_id}", "/definitions/xss", "/definitions"):
        await page.goto(f"{ui.url}{path}")
        await expect(page.locator("main")).to_contain_text("<img src=x onerror=")  # as text
        assert await page.locator("img[src=x]").count() == 0, path
        assert await page.evaluate("window.pwned") is None, path
    assert (await saga(js, workflow_id))["tasks"][0]["output"] == {"said": markup}


async def test_definitions_are_listed_and_drawn(ui, page, nc):
    registered = body(await call(nc, "conductor.definitions.list"))["definitions"]
    await page.goto(f"{ui.url}/definitions")
    rows = page.locator("table.definitions tr[data-name]")
    await expect(rows).to_have_count(len(registered))
    for index, definition in enumerate(registered):
        await expect(rows.nth(index)).to_have_attribute("data-name", definition["name"])
    await page.get_by_role("link", name="plan_day").first.click()
    await expect(page).to_have_url(f"{ui.url}/definitions/plan_day")
    for ref in ("agenda", "is_free", "weather", "run", "code_for_fun", "notify"):
        await expect(page.locator(f'svg.graph g.node[data-ref="{ref}"]')).to_have_count(1)
    await expect(page.locator("pre.source")).to_contain_text('"name": "plan_day"')
    await shot(page, "definition")
    missing = await page.goto(f"{ui.url}/definitions/no_such")
    assert missing is not None and missing.status == 404
    await expect(page.locator(".error-message")).to_contain_text("no_such")


async def test_the_demo_stays_up_with_the_ui_for_an_approval(tmp_path, page):
    port = free_port()
    env = {k: os.environ[k] for k in ("PATH", "HOME", "VIRTUAL_ENV") if k in os.environ}
    env["KAPELLMEISTER_DATA_DIR"] = str(tmp_path / "data")
    demo = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "kapellmeister.cli", "demo", "--ui", "--ui-port", str(port)],
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert demo.stdout is not None
    printed: list[str] = []
    try:
        waiting = None
        async with asyncio.timeout(90):
            while waiting is None:
                line = (await demo.stdout.readline()).decode()
                assert line, "".join(printed)
                printed.append(line)
                waiting = re.search(r"waits for you: (http://127\.0\.0\.1:\d+/workflows/\S+)", line)
        await page.goto(waiting.group(1))
        await signal(page, "approval_1", {"status": "ok", "approver": "you"})
        await signal(page, "approval_2", {"status": "ok", "approver": "you"})
        await expect(page.locator("#status")).to_have_text("COMPLETED", timeout=LIVE_S)
        await expect(page.locator("#output")).to_contain_text('"your_got_the_money": 250')
        demo.send_signal(signal_module.SIGINT)
        rest, _ = await asyncio.wait_for(demo.communicate(), 60)
        printed.append(rest.decode())
        assert demo.returncode == 0, "".join(printed)
        assert "stopped ui        exit 0" in printed[-1]
    finally:
        if demo.returncode is None:
            # SIGINT first: the demo stops the server and services it started (a SIGKILL
            # would leave them running), then SIGKILL if it does not end.
            demo.send_signal(signal_module.SIGINT)
            try:
                await asyncio.wait_for(demo.communicate(), 60)
            except TimeoutError:
                demo.kill()
                await demo.wait()


async def test_pause_resume_and_terminate_with_compensation_from_the_page(ui, page, nc, js):
    approval = body(await call(nc, "conductor.start.approval", {"money": 9}))
    workflow_id = approval["workflow_id"]
    await page.goto(f"{ui.url}/workflows/{workflow_id}")
    status = page.locator("#status")

    await page.get_by_role("button", name="Pause").click()
    await expect(status).to_have_text("PAUSED", timeout=LIVE_S)
    assert (await saga(js, workflow_id))["status"] == "PAUSED"
    await page.get_by_role("button", name="Resume").click()
    await expect(status).to_have_text("RUNNING", timeout=LIVE_S)
    assert (await saga(js, workflow_id))["status"] == "RUNNING"

    await page.locator("input[name=reason]").fill("budget cut")
    await page.locator("input[name=compensate]").check()
    await page.get_by_role("button", name="Terminate").click()
    await expect(status).to_have_text("TERMINATED", timeout=LIVE_S)
    await expect(page.locator("#signals section")).to_have_count(0)
    state = await saga(js, workflow_id)
    assert state["status"] == "TERMINATED"
    assert "budget cut" in state["error"]["message"]
    await expect(page.locator("#summary pre.error")).to_contain_text("budget cut")


async def test_the_ui_stops_at_once_with_pages_open(ui, nc):
    approval = body(await call(nc, "conductor.start.approval", {"money": 1}))
    process = ui.stack.processes[-1]
    async with (
        event_stream(ui.port, f"/live/workflows/{approval['workflow_id']}") as live,
        event_stream(ui.port, "/live/workflows") as listed,
    ):
        await live.next("saga")  # the saga as it is now
        code = await asyncio.to_thread(process.stop)
        assert code == 0, process.log_tail()  # not killed after the stop's wait
        for stream in (live, listed):
            with pytest.raises(AssertionError, match="the stream ended"):
                await stream.next("saga", timeout=5)
    log = process.log_tail(100_000)
    assert "Traceback" not in log and "ERROR" not in log, log


async def test_schedules_are_created_paused_and_deleted_from_the_page(ui, page, nc, js):
    await page.goto(f"{ui.url}/schedules")
    await expect(page.locator("table.schedules tr.empty")).to_have_text("no schedules")
    form = page.locator("form[action='/schedules']")
    await form.locator("input[name=name]").fill("tick")
    await form.locator("select[name=workflow]").select_option("approval")
    await form.locator("textarea[name=input]").fill('{"money": 3}')
    await form.locator("input[name=cron]").fill("61 * * * *")  # no such minute
    await form.get_by_role("button", name="Create schedule").click()
    await expect(page.locator("#flash")).to_contain_text("400 bad_request: cron '61 * * * *'")

    await form.locator("input[value=every]").check()
    await form.locator("input[name=every_s]").fill("1")
    await form.locator("select[name=catch_up]").select_option("all")
    await form.get_by_role("button", name="Create schedule").click()
    row = page.locator("table.schedules tr[data-name=tick]")
    await expect(row).to_contain_text("every 1 s")
    stored = body(await call(nc, "conductor.schedules.get.tick", b""))
    assert (stored["every_s"], stored["catch_up"], stored["input"]) == (1, "all", {"money": 3})
    for _ in range(30):  # the page is not live: look again until a tick has started
        if await row.locator("a.last-started").count():
            break
        await asyncio.sleep(0.5)
        await page.reload()
    started = await row.locator("a.last-started").text_content()
    assert started is not None and started.startswith("tick-")
    assert (await saga(js, started))["input"] == {"money": 3}
    await shot(page, "schedules", full_page=False)

    await row.get_by_role("button", name="Pause").click()
    await expect(row).to_have_attribute("data-paused", "yes")
    assert body(await call(nc, "conductor.schedules.get.tick", b""))["paused"] is True
    await row.get_by_role("button", name="Delete").click()
    await expect(page.locator("table.schedules tr[data-name]")).to_have_count(0)
    assert_error(await call(nc, "conductor.schedules.get.tick", b""), 404)
