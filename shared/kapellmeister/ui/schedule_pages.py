"""The web UI's schedules: ``/schedules`` lists them with their next and last ticks, and
creates, pauses, resumes and deletes them, each by one ``conductor.schedules.*`` request
(the API's errors shown as it gives them)."""

from __future__ import annotations

import datetime
from typing import Any

import msgspec
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from kapellmeister.schedules import SCHEDULE_NAME, Schedules
from kapellmeister.ui.client import ApiError
from kapellmeister.ui.web import CROSS_SITE, Renders, error_response, same_origin, wants_json

__all__ = ["ACTIONS", "SchedulePages", "tick_text"]

ACTIONS = ("pause", "resume", "delete")
_decode_schedules = msgspec.json.Decoder(Schedules).decode
_encode = msgspec.json.Encoder().encode


def tick_text(tick: int | None) -> str:
    """A tick (Unix seconds) as UTC text; a dash for none."""
    if not tick:
        return "-"
    return datetime.datetime.fromtimestamp(tick, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def spec_of(form: FormData) -> dict[str, Any]:
    """``conductor.schedules.create``'s request from the form (what is left empty is
    left out; the API says what is wrong with the rest)."""
    text = {key: str(value).strip() for key, value in form.items()}
    spec: dict[str, Any] = {"name": text.get("name", ""), "workflow": text.get("workflow", "")}
    if text.get("timing") == "every":
        every = text.get("every_s", "")
        spec["every_s"] = int(every) if every.isascii() and every.isdecimal() else every
    else:
        spec["cron"] = text.get("cron", "")
        spec["timezone"] = text.get("timezone") or "UTC"
    try:
        spec["input"] = msgspec.json.decode(text.get("input") or "{}")
    except msgspec.DecodeError as exc:
        raise ApiError(400, "bad_request", f"the input is not JSON: {exc}") from None
    spec["catch_up"] = text.get("catch_up") or "skip"
    if text.get("tenant"):
        spec["tenant"] = text["tenant"]
    return spec


class SchedulePages:
    """The handlers of ``/schedules``."""

    def __init__(self, ui: Renders) -> None:
        self.ui = ui

    async def page(self, request: Request) -> Response:
        try:
            found = _decode_schedules(await self.ui.api.call("conductor.schedules.list"))
            listed = msgspec.json.decode(await self.ui.api.call("conductor.definitions.list"))
        except ApiError as exc:
            return self.ui.render("error.html", status_code=exc.code, error=exc, back="/")
        names = [definition["name"] for definition in listed["definitions"]]
        return self.ui.render("schedules.html", schedules=found.schedules, names=names)

    async def create(self, request: Request) -> Response:
        if not same_origin(request):
            return error_response(request, self.ui, CROSS_SITE, "/schedules")
        try:
            spec = spec_of(await request.form())
            await self.ui.api.call("conductor.schedules.create", _encode(spec))
        except ApiError as exc:
            return error_response(request, self.ui, exc, "/schedules")
        return self._done(request, "created")

    async def act(self, request: Request) -> Response:
        name, action = request.path_params["name"], request.path_params["action"]
        if not same_origin(request):
            return error_response(request, self.ui, CROSS_SITE, "/schedules")
        try:
            if action not in ACTIONS:
                raise ApiError(404, "not_found", f"no action {action!r}")
            if not SCHEDULE_NAME.fullmatch(name):
                raise ApiError(404, "schedule_not_found", f"no schedule named {name!r}")
            await self.ui.api.call(f"conductor.schedules.{action}.{name}")
        except ApiError as exc:
            return error_response(request, self.ui, exc, "/schedules")
        return self._done(request, action)

    def _done(self, request: Request, status: str) -> Response:
        if wants_json(request):
            return JSONResponse({"status": status, "location": "/schedules"})
        return RedirectResponse("/schedules", status_code=303)
