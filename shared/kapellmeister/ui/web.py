"""What every page handler of the web UI shares: how a POST is trusted and answered.

A POST is taken only from the UI's own pages (`same_origin`); it answers JSON to the
page's script (`wants_json`) and a page otherwise; an error is the API's own body.
"""

from __future__ import annotations

from typing import Any, Protocol
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from kapellmeister.ui.client import ApiError, ConductorClient

__all__ = ["CROSS_SITE", "Renders", "error_response", "same_origin", "wants_json"]

CROSS_SITE = ApiError(403, "forbidden", "a page of another site may not act through this UI")


class Renders(Protocol):
    """The UI as page handlers use it: the API, and the templates."""

    @property
    def api(self) -> ConductorClient: ...

    def render(self, template: str, status_code: int = 200, **context: Any) -> HTMLResponse: ...


def wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


def same_origin(request: Request) -> bool:
    """A POST from this UI's own pages only: a page of another site must not act through
    a browser on the operator's machine (cross-site request forgery)."""
    origin = request.headers.get("origin")
    if origin is None:
        return request.headers.get("sec-fetch-site", "same-origin") in {"same-origin", "none"}
    return urlsplit(origin).netloc == request.headers.get("host")


def error_response(request: Request, ui: Renders, error: ApiError, back: str) -> Response:
    """The API's error: its JSON body for the page's script, else a page saying it."""
    if wants_json(request):
        return Response(error.body, status_code=error.code, media_type="application/json")
    return ui.render("error.html", status_code=error.code, error=error, back=back)
