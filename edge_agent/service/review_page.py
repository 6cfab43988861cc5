"""The review page on the agent's HTTP server (``[http] review = true``; off by default, 127.0.0.1 like the preview).

- ``/review``: the kept frames, newest first, each with its overlay (frame, anomaly map, NFA outline,
  boxes), score and verdict, and two buttons: "Mark as good" and "Confirmed defect".
- ``/review.json``: the same list as JSON; ``/review/image?id=ID&file=overlay.png``: one of the frame's
  pictures (frame, overlay, mask, anomaly map; nothing else is served from disk).
- ``POST /review/decide`` with ``{"id": ID, "decision": "good" | "defect"}``: edge_agent/service/review.py
  moves the files. The page sends the ``X-Edge-Agent`` header, required here: a page of another site
  cannot add it without a CORS preflight this server never grants, so it cannot press the buttons
  through the operator's browser.

Everything runs on the HTTP request's thread; inspection never waits for the page.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path

from edge_agent.publish.messages import PayloadError, parse_json_object
from edge_agent.service.http_server import HttpRequest, HttpResponse, HttpServer
from edge_agent.service.review import ReviewError, ReviewStore

DECISIONS = ("good", "defect")
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

    def _page_route(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse(body=PAGE.encode(), content_type="text/html; charset=utf-8")

    def _list_route(self, request: HttpRequest) -> HttpResponse:
        frames = [frame.to_json() for frame in self.store.frames()]
        return _json(HTTPStatus.OK, {"frames": frames, "training_dir": str(self.store.training_dir)})

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
            moved = self.store.mark_good(frame_id) if decision == "good" else self.store.confirm_defect(frame_id)
        except ReviewError as exc:
            return _json(HTTPStatus.NOT_FOUND, {"ok": False, "message": str(exc)})
        except OSError as exc:
            return _json(HTTPStatus.INTERNAL_SERVER_ERROR, {"ok": False, "message": f"cannot move the files: {exc}"})
        self.on_moved(folder)
        return _json(HTTPStatus.OK, {"ok": True, "message": f"{frame_id}: {decision}", "path": str(moved)})


def _json(status: int, document: dict[str, object]) -> HttpResponse:
    return HttpResponse(status, json.dumps(document).encode() + b"\n", "application/json")


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>U-Flow review</title>
<style>
 body { font: 14px system-ui, sans-serif; margin: 12px; background: #111; color: #eee; }
 .card { display: inline-block; vertical-align: top; margin: 6px; padding: 6px; border: 1px solid #444; }
 .card img { width: 320px; display: block; }
 .bad { color: #ff6b6b; font-weight: bold; } .good { color: #7bd88f; }
 button { margin: 4px 4px 0 0; }
</style></head>
<body>
<h1>U-Flow review</h1>
<p id="summary">loading...</p>
<div id="frames"></div>
<script>
async function decide(id, decision) {
  const response = await fetch("/review/decide", {method: "POST", headers: {"Content-Type": "application/json",
    "X-Edge-Agent": "review"}, body: JSON.stringify({id: id, decision: decision})});
  const result = await response.json();
  document.getElementById("summary").textContent = result.message;
  if (result.ok) document.getElementById("card-" + id).remove();
}
function card(frame) {
  const div = document.createElement("div");
  div.className = "card"; div.id = "card-" + frame.id;
  const img = document.createElement("img");
  img.src = "/review/image?id=" + encodeURIComponent(frame.id) + "&file=overlay.png";
  img.alt = frame.id;
  const text = document.createElement("div");
  const verdict = document.createElement("span");
  verdict.className = frame.anomalous ? "bad" : "good";
  verdict.textContent = frame.anomalous ? "ANOMALOUS" : "good";
  text.append(verdict, " frame " + frame.sequence + ", score " + frame.image_score.toFixed(3) +
              ", " + frame.regions + " region(s), " + frame.model);
  const good = document.createElement("button");
  good.textContent = "Mark as good"; good.className = "mark-good";
  good.onclick = () => decide(frame.id, "good");
  const defect = document.createElement("button");
  defect.textContent = "Confirmed defect"; defect.className = "confirm-defect";
  defect.onclick = () => decide(frame.id, "defect");
  div.append(img, text, good, defect);
  return div;
}
async function load() {
  const data = await (await fetch("/review.json", {cache: "no-store"})).json();
  document.getElementById("summary").textContent = data.frames.length + " kept frame(s); decisions go to " +
    data.training_dir;
  document.getElementById("frames").replaceChildren(...data.frames.map(card));
}
load();
</script>
</body></html>
"""
