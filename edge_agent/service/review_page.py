"""The review page on the agent's HTTP server (``[http] review = true``; off by default, 127.0.0.1 like the preview).

- ``/review``: the kept frames, newest first, a page at a time, filtered (rejected parts, flagged frames,
  good samples): each with the raw frame beside its overlay (a kept part: the part outlined and its
  verdict as the caption, the contact strip of its frames below), and "Mark as good", "Confirmed defect",
  "Edit mask" (a polygon editor over the frame that adds to or erases from the model's mask, or draws one
  from scratch) and "Undo" for the last decisions.
- ``/review.json?kind=part|flagged|good&offset=N&limit=N``: that list as JSON, with the counts per kind;
  ``/review/image?id=ID&file=overlay.png``: one of the frame's pictures (frame, overlay, mask, anomaly
  map, strip; nothing else is served from disk).
- ``POST /review/decide`` with ``{"id": ID, "decision": "good" | "defect", "mask_edit": {...}}``
  (edge_agent/service/review.py's ``MaskEdit``) and ``POST /review/undo`` with ``{"id": ID}``: review.py
  copies or takes back the files. The page sends the ``X-Edge-Agent`` header, required here: a page of another site
  cannot add it without a CORS preflight this server never grants, so it cannot press the buttons
  through the operator's browser.

Everything runs on the HTTP request's thread; inspection never waits for the page.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path

from edge_agent.messages import PayloadError, parse_json_object
from edge_agent.service.http_server import HttpRequest, HttpResponse, HttpServer
from edge_agent.service.review import MaskEdit, ReviewError, ReviewStore
from edge_agent.service.review_page_html import PAGE

DECISIONS = ("good", "defect")
KINDS = ("part", "flagged", "good")
MAX_PAGE = 100
# Sent by the page's script; a cross-site page cannot add it without a CORS preflight this server never grants.


class ReviewPage:
    """Routes over a ReviewStore; ``on_moved`` hears of every folder a decision removed (the keeper's quota)."""

    def __init__(self, store: ReviewStore, on_moved: Callable[[Path], None] | None = None) -> None:
        self.store = store
        self.on_moved = on_moved or (lambda folder: None)

    def register(self, server: HttpServer) -> None:
        """Add the review routes to the agent's HTTP server."""
        server.route("/review", self._page_route)
        server.route("/review.json", self._list_route)
        server.route("/review/image", self._image_route)
        server.route_post("/review/decide", self._decide_route)
        server.route_post("/review/undo", self._undo_route)

    def _page_route(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse(body=PAGE.encode(), content_type="text/html; charset=utf-8")

    def _list_route(self, request: HttpRequest) -> HttpResponse:
        kind = (request.query.get("kind") or [""])[0] or None
        try:
            offset = max(0, int((request.query.get("offset") or ["0"])[0]))
            limit = min(MAX_PAGE, max(1, int((request.query.get("limit") or ["200"])[0])))
        except ValueError:
            return _json(HTTPStatus.BAD_REQUEST, {"ok": False, "message": "offset and limit are whole numbers"})
        if kind is not None and kind not in KINDS:
            return _json(HTTPStatus.BAD_REQUEST, {"ok": False, "message": f"kind is one of {list(KINDS)}"})
        every = self.store.frames(limit=100_000)
        counts = {k: sum(f.kind == k for f in every) for k in KINDS}
        chosen = [f for f in every if kind is None or f.kind == kind]
        frames = [frame.to_json() for frame in chosen[offset : offset + limit]]
        document = {
            "frames": frames,
            "total": len(chosen),
            "offset": offset,
            "counts": counts,
            "training_dir": str(self.store.training_dir),
        }
        return _json(HTTPStatus.OK, document)

    def _image_route(self, request: HttpRequest) -> HttpResponse:
        frame_id = (request.query.get("id") or [""])[0]
        name = (request.query.get("file") or ["overlay.png"])[0]
        try:
            path = self.store.file(frame_id, name)
            return HttpResponse(body=path.read_bytes(), content_type="image/png")
        except (ReviewError, OSError) as exc:
            return HttpResponse(HTTPStatus.NOT_FOUND, f"{exc}\n".encode())

    def _decide_route(self, request: HttpRequest) -> HttpResponse:
        try:
            document = parse_json_object(request.body, 4096)
        except PayloadError as exc:
            return _json(HTTPStatus.BAD_REQUEST, {"ok": False, "message": f"malformed request: {exc}"})
        frame_id, decision = document.get("id"), document.get("decision")
        if not isinstance(frame_id, str) or decision not in DECISIONS:
            message = f"expected {{'id': <kept frame id>, 'decision': one of {list(DECISIONS)}}}"
            return _json(HTTPStatus.BAD_REQUEST, {"ok": False, "message": message})
        try:
            folder = self.store.folder(frame_id)
            edit = MaskEdit.parse(document["mask_edit"]) if document.get("mask_edit") is not None else None
            good = decision == "good"
            moved = self.store.mark_good(frame_id) if good else self.store.confirm_defect(frame_id, edit)
        except ReviewError as exc:
            return _json(HTTPStatus.NOT_FOUND, {"ok": False, "message": str(exc)})
        except OSError as exc:
            return _json(HTTPStatus.INTERNAL_SERVER_ERROR, {"ok": False, "message": f"cannot move the files: {exc}"})
        self.on_moved(folder)
        return _json(HTTPStatus.OK, {"ok": True, "message": f"{frame_id}: {decision}", "path": str(moved)})

    def _undo_route(self, request: HttpRequest) -> HttpResponse:
        try:
            document = parse_json_object(request.body, 4096)
        except PayloadError as exc:
            return _json(HTTPStatus.BAD_REQUEST, {"ok": False, "message": f"malformed request: {exc}"})
        frame_id = document.get("id")
        if not isinstance(frame_id, str):
            return _json(HTTPStatus.BAD_REQUEST, {"ok": False, "message": "expected {'id': <kept frame id>}"})
        try:
            self.store.undo(frame_id)
        except ReviewError as exc:
            return _json(HTTPStatus.NOT_FOUND, {"ok": False, "message": str(exc)})
        except OSError as exc:
            return _json(HTTPStatus.INTERNAL_SERVER_ERROR, {"ok": False, "message": f"cannot move the files: {exc}"})
        return _json(HTTPStatus.OK, {"ok": True, "message": f"{frame_id}: decision undone"})


def _json(status: int, document: dict[str, object]) -> HttpResponse:
    return HttpResponse(status, json.dumps(document).encode() + b"\n", "application/json")
