"""The web UI (``kapellmeister ui``): an ASGI application over the public NATS API.

Pages are rendered on the server (Starlette and Jinja2, assets in the package): the list
of workflows with filters, one workflow (its graph coloured by task status, its timeline,
each task's input, output, attempts and errors, a link to its trace), the definitions and
their drawings. Live updates come as Server-Sent Events fed by NATS: a KV watch on the
workflow's key in the ``workflows`` bucket, and the ``workflow_index`` bucket's subjects
for the list. Every action is one request on ``conductor.*`` (`ConductorClient`), answered
with the API's reply or its error, so the UI cannot do what the API refuses.

Routes: ``GET /``, ``/workflows/<id>``, ``/definitions``, ``/definitions/<name>``,
``/schedules`` (`kapellmeister.ui.schedule_pages`, which also takes its POSTs),
``/live/workflows``, ``/live/workflows/<id>``, ``/healthz``; ``POST
/workflows/<id>/<action>`` (signal, retry, rerun, pause, resume, terminate) and
``/definitions/<name>/start``. A POST answers JSON when asked (``Accept:
application/json``, what the page's script sends), else redirects back (an error is shown
on the page, with the API's status code).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import re
from collections.abc import AsyncIterator, Mapping
from importlib import resources
from typing import Any

import jinja2
import msgspec
from markupsafe import Markup
from nats.aio.client import Client
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from kapellmeister.config import Settings
from kapellmeister.definitions import Definition, compile_definition, parse_definition
from kapellmeister.drawing import to_dot, to_mermaid
from kapellmeister.errors import InvalidDefinition
from kapellmeister.index import INDEX
from kapellmeister.messages import (
    TERMINAL,
    WORKFLOW_ID_PATTERN,
    Saga,
    StartReply,
    WorkflowSummaries,
    WorkflowSummary,
    utc_text,
)
from kapellmeister.registry import DefinitionSummaries
from kapellmeister.runtime import connect
from kapellmeister.ui.client import ApiError, ConductorClient
from kapellmeister.ui.live import Streams, sse
from kapellmeister.ui.schedule_pages import SchedulePages, tick_text
from kapellmeister.ui.svg import to_svg
from kapellmeister.ui.views import (
    SHOWN_TASKS,
    clock,
    input_example,
    pretty,
    timeline,
    waiting,
)
from kapellmeister.ui.web import CROSS_SITE, error_response, same_origin, wants_json

__all__ = ["LOOPBACK", "create_app"]

# The Host names of a browser on this machine (any port).
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")

ACTIONS = ("signal", "retry", "rerun", "pause", "resume", "terminate")
STATUSES = ("QUEUED", "RUNNING", "PAUSED", "COMPLETED", "FAILED", "TIMED_OUT", "TERMINATED")
# A token that goes into a subject: no dots, wildcards or spaces.
_TOKEN = re.compile(r"[A-Za-z0-9_=-]{1,128}")
# A W3C trace id: only such an id goes into a link.
_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_WORKFLOWS = "workflows"  # the saga bucket (DESIGN.md)

_decode_saga = msgspec.json.Decoder(Saga).decode
_decode_summaries = msgspec.json.Decoder(WorkflowSummaries).decode
_decode_definitions = msgspec.json.Decoder(DefinitionSummaries).decode
_decode_started = msgspec.json.Decoder(StartReply).decode
_encode = msgspec.json.Encoder().encode


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("kapellmeister.ui", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["pretty"] = pretty
    env.filters["clock"] = clock
    env.filters["tick"] = tick_text
    return env


class _Ui:
    """The application's state: one NATS connection, the templates, compiled definitions."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.templates = _templates()
        self._nc: Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._definitions: dict[tuple[str, int], Definition] = {}
        self.streams = Streams(lambda: self.nc, f"$KV.{INDEX}.>")

    def stop(self) -> None:
        """End the open streams; safe from a signal handler (uvicorn's, at shutdown)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.streams.stop)

    @property
    def nc(self) -> Client:
        assert self._nc is not None, "the UI is not connected"
        return self._nc

    @property
    def api(self) -> ConductorClient:
        return ConductorClient(self.nc)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self._loop = asyncio.get_running_loop()
        # Reconnects for ever, as the services do; what NATS refuses is logged.
        self._nc = await connect(self.settings, "kapellmeister-ui")
        try:
            yield
        finally:
            await self._nc.close()

    def render(self, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        page = self.templates.get_template(template).render(statuses=STATUSES, **context)
        return HTMLResponse(page, status_code=status_code)

    def fragment(self, template: str, **context: Any) -> Markup:
        """A part of a page: already escaped HTML, put in a page as it is."""
        return Markup(self.templates.get_template(template).render(statuses=STATUSES, **context))

    # --- reads ------------------------------------------------------------------------

    async def definition(self, name: str, version: int) -> Definition:
        """A registered definition, compiled once per version (a version never changes)."""
        key = (name, version)
        if key not in self._definitions:
            raw = await self.api.call(
                f"conductor.definitions.get.{name}", headers={"Workflow-Version": str(version)}
            )
            try:
                self._definitions[key] = compile_definition(parse_definition(raw))
            except InvalidDefinition as exc:
                raise ApiError(500, "invalid_definition", exc.message) from None
        return self._definitions[key]

    async def summaries(self, query: Mapping[str, Any]) -> list[WorkflowSummary]:
        return _decode_summaries(await self.api.call("conductor.list", _encode(query))).workflows

    async def definition_names(self) -> list[str]:
        try:
            found = _decode_definitions(await self.api.call("conductor.definitions.list"))
        except ApiError:
            return []
        return [d.name for d in found.definitions]

    async def parts(self, saga: Saga) -> dict[str, Markup]:
        """The workflow page's live parts, rendered from ``saga``."""
        graph, drawings = "", {}
        try:
            definition = await self.definition(saga.workflow, saga.version)
        except ApiError as exc:
            graph = f'<p class="muted">no drawing: {Markup.escape(exc.message)}</p>'
        else:
            statuses = {task.ref: task.status for task in saga.tasks}
            graph = to_svg(definition, statuses)
            drawings = {
                "Mermaid": to_mermaid(definition, statuses),
                "DOT": to_dot(definition, statuses),
            }
        trace = ""
        if self.settings.trace_url and _TRACE_ID.fullmatch(saga.trace_id):
            trace = self.settings.trace_url.replace("{trace_id}", saga.trace_id)
        context = {
            "saga": saga,
            "rows": timeline(saga, utc_text_now()),
            "waiting": waiting(saga),
            "terminal": saga.status in TERMINAL,
            "trace_url": trace,
            "shown_tasks": SHOWN_TASKS,
        }
        return {
            "summary": self.fragment("_summary.html", **context),
            "graph": self.fragment("_graph.html", graph=Markup(graph), drawings=drawings),
            "timeline": self.fragment("_timeline.html", **context),
            "tasks": self.fragment("_tasks.html", **context),
            "signals": self.fragment("_signals.html", **context),
        }

    async def update(self, saga: Saga) -> dict[str, Any]:
        """What the page's script applies: the parts, and the key of the signal forms
        (replaced only when the tasks waiting for a signal change)."""
        parts = {name: str(html) for name, html in (await self.parts(saga)).items()}
        return {"status": saga.status, "parts": parts, "keys": {"signals": _signals_key(saga)}}


def utc_text_now() -> str:
    return utc_text(datetime.datetime.now(datetime.UTC))


def _signals_key(saga: Saga) -> str:
    return ",".join(task.ref for task in waiting(saga)) + f"|{saga.status}"


# --- query strings ------------------------------------------------------------------------


def _list_query(params: Mapping[str, str]) -> dict[str, Any]:
    """``conductor.list``'s request from the list page's filters (empty ones left out)."""
    query: dict[str, Any] = {}
    for field in ("status", "workflow", "tenant"):
        if params.get(field):
            query[field] = params[field]
    for field in ("since", "until"):
        value = params.get(field, "")
        if value:
            # <input type="datetime-local"> gives minutes only; the API wants seconds.
            query[field] = value + ":00" if len(value) == 16 else value
    limit = params.get("limit", "")
    # Up to 1,000 here: each change of the index asks for the rows again.
    query["limit"] = min(int(limit), 1_000) if limit.isascii() and limit.isdecimal() else 50
    query["limit"] = max(query["limit"], 1)
    return query


# --- the application ----------------------------------------------------------------------


class _Pages:
    """The routes' handlers."""

    def __init__(self, ui: _Ui) -> None:
        self.ui = ui

    async def list_page(self, request: Request) -> Response:
        query = _list_query(request.query_params)
        error: ApiError | None = None
        found: list[WorkflowSummary] = []
        try:
            found = await self.ui.summaries(query)
        except ApiError as exc:
            error = exc
        return self.ui.render(
            "list.html",
            status_code=error.code if error else 200,
            workflows=found,
            error=error,
            filters=request.query_params,
            limit=query["limit"],
            names=await self.ui.definition_names(),
            live=f"/live/workflows?{request.url.query}",
        )

    async def live_list(self, request: Request) -> Response:
        query = _list_query(request.query_params)

        async def rows() -> str:
            try:
                found = await self.ui.summaries(query)
            except ApiError as exc:
                return sse("failure", exc.message)
            return sse("rows", str(self.ui.fragment("_rows.html", workflows=found)))

        events = self.ui.streams.rows(_encode(query).decode(), rows)
        return StreamingResponse(events, media_type="text/event-stream")

    async def workflow_page(self, request: Request) -> Response:
        workflow_id = request.path_params["workflow_id"]
        try:
            if not WORKFLOW_ID_PATTERN.fullmatch(workflow_id):
                raise ApiError(404, "not_found", f"no workflow with id {workflow_id!r}")
            saga = _decode_saga(await self.ui.api.call(f"conductor.get.{workflow_id}"))
        except ApiError as exc:
            return self.ui.render("error.html", status_code=exc.code, error=exc, back="/")
        return self.ui.render(
            "workflow.html",
            saga=saga,
            parts=await self.ui.parts(saga),
            signals_key=_signals_key(saga),
            live=f"/live/workflows/{workflow_id}",
        )

    async def live_workflow(self, request: Request) -> Response:
        workflow_id = request.path_params["workflow_id"]
        if not WORKFLOW_ID_PATTERN.fullmatch(workflow_id):
            return Response(status_code=404)

        async def render(value: bytes) -> str:
            return sse("saga", await self.ui.update(_decode_saga(value)))

        events = self.ui.streams.saga(workflow_id, _WORKFLOWS, render)
        return StreamingResponse(events, media_type="text/event-stream")

    async def act(self, request: Request) -> Response:
        workflow_id, action = request.path_params["workflow_id"], request.path_params["action"]
        back = f"/workflows/{workflow_id}"
        if not same_origin(request):
            return error_response(request, self.ui, CROSS_SITE, "/")
        try:
            subject, payload = await _action_request(request, workflow_id, action)
            saga = _decode_saga(await self.ui.api.call(subject, payload))
        except ApiError as exc:
            return error_response(request, self.ui, exc, back)
        if wants_json(request):
            return JSONResponse(await self.ui.update(saga))
        return RedirectResponse(back, status_code=303)

    async def definitions_page(self, request: Request) -> Response:
        try:
            found = _decode_definitions(await self.ui.api.call("conductor.definitions.list"))
        except ApiError as exc:
            return self.ui.render("error.html", status_code=exc.code, error=exc, back="/")
        return self.ui.render("definitions.html", definitions=found.definitions)

    async def definition_page(self, request: Request) -> Response:
        name = request.path_params["name"]
        version = request.query_params.get("version", "")
        headers = {"Workflow-Version": version} if version.isdigit() else None
        try:
            if not _TOKEN.fullmatch(name):
                raise ApiError(404, "not_found", f"no definition named {name!r}")
            raw = await self.ui.api.call(f"conductor.definitions.get.{name}", headers=headers)
            definition = compile_definition(parse_definition(raw))
        except ApiError as exc:
            return self.ui.render(
                "error.html", status_code=exc.code, error=exc, back="/definitions"
            )
        return self.ui.render(
            "definition.html",
            definition=definition,
            source=msgspec.json.format(raw, indent=2).decode(),
            graph=Markup(to_svg(definition)),
            example=input_example(definition.spec.input),
            drawings={"Mermaid": to_mermaid(definition), "DOT": to_dot(definition)},
        )

    async def start(self, request: Request) -> Response:
        name = request.path_params["name"]
        if not same_origin(request):
            return error_response(request, self.ui, CROSS_SITE, "/")
        form = await request.form()
        headers = {
            header: str(form.get(field, "")).strip()
            for field, header in (
                ("workflow_id", "Workflow-Id"),
                ("tenant", "Tenant"),
                ("version", "Workflow-Version"),
            )
            if str(form.get(field, "")).strip()
        }
        try:
            if not _TOKEN.fullmatch(name):
                raise ApiError(404, "not_found", f"no definition named {name!r}")
            payload = str(form.get("input", "")).encode() or b"{}"
            reply = _decode_started(
                await self.ui.api.call(f"conductor.start.{name}", payload, headers or None)
            )
        except ApiError as exc:
            return error_response(request, self.ui, exc, f"/definitions/{name}")
        location = f"/workflows/{reply.workflow_id}"
        if wants_json(request):
            started = {"workflow_id": reply.workflow_id, "status": reply.status}
            return JSONResponse({**started, "location": location})
        return RedirectResponse(location, status_code=303)

    async def health(self, request: Request) -> Response:
        connected = self.ui.nc.is_connected
        return JSONResponse({"nats": connected}, status_code=200 if connected else 503)


def create_app(settings: Settings, allowed_hosts: list[str] | None = None) -> Starlette:
    """The UI as an ASGI application; it connects to NATS when it starts.

    Args:
        allowed_hosts: names it is reached by besides loopback's (a proxy's): the ``Host``
            header must be one of them, so a page on another name that resolves to the
            UI's address (DNS rebinding) gets nothing.
    """
    ui = _Ui(settings)
    pages = _Pages(ui)
    schedules = SchedulePages(ui)
    static = resources.files("kapellmeister.ui") / "static"
    routes = [
        Route("/", pages.list_page),
        Route("/healthz", pages.health),
        Route("/live/workflows", pages.live_list),
        Route("/live/workflows/{workflow_id}", pages.live_workflow),
        Route("/workflows/{workflow_id}", pages.workflow_page),
        Route("/workflows/{workflow_id}/{action}", pages.act, methods=["POST"]),
        Route("/definitions", pages.definitions_page),
        Route("/definitions/{name}", pages.definition_page),
        Route("/definitions/{name}/start", pages.start, methods=["POST"]),
        Route("/schedules", schedules.page),
        Route("/schedules", schedules.create, methods=["POST"]),
        Route("/schedules/{name}/{action}", schedules.act, methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(static)), name="static"),
    ]
    app = Starlette(
        routes=routes,
        lifespan=ui.lifespan,
        middleware=[
            Middleware(TrustedHostMiddleware, allowed_hosts=[*LOOPBACK, *(allowed_hosts or [])])
        ],
    )
    app.state.stop = ui.stop
    return app


async def _action_request(request: Request, workflow_id: str, action: str) -> tuple[str, bytes]:
    """The subject and payload of the API request an action form asks for."""
    if action not in ACTIONS:
        raise ApiError(404, "not_found", f"no action {action!r}; one of {', '.join(ACTIONS)}")
    if not WORKFLOW_ID_PATTERN.fullmatch(workflow_id):
        raise ApiError(404, "not_found", f"no workflow with id {workflow_id!r}")
    form = await request.form()
    task = str(form.get("task", ""))
    if action in {"signal", "rerun"} and not _TOKEN.fullmatch(task):
        raise ApiError(400, "bad_request", f"name the task: {task!r} is not a task ref")
    match action:
        case "signal":
            # Sent as typed: the API says what is wrong with a body that is not JSON.
            body = str(form.get("output", "")).encode()
            return f"conductor.signal.{workflow_id}.{task}", body
        case "rerun":
            return f"conductor.rerun.{workflow_id}", _encode({"task": task})
        case "terminate":
            terminate = {
                "reason": str(form.get("reason", "")),
                "compensate": form.get("compensate") is not None,
            }
            return f"conductor.terminate.{workflow_id}", _encode(terminate)
    return f"conductor.{action}.{workflow_id}", b""
