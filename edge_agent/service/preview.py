"""Live preview for the person aiming the camera: what the model sees, in a browser.

Routes on the agent's HTTP server (``[http] preview = true``; off by default, bound to 127.0.0.1 unless
``http.host`` says otherwise):

- ``/preview``: a small page that polls ``/preview.json`` and shows the camera frame (region of interest
  outlined; in tracked mode the parts with their ids and the decision line) next to the overlay (anomaly
  map, NFA mask outline, region boxes), at a readable size (preview_view.py), with the caption and the
  legend as page text, fps, latency, the source state and, in triggered mode, the trigger state.
- in triggered mode, between triggers: the live camera (not inspected, said so), at most ``LIVE_FPS`` a
  second, so a camera can be aimed before the first trigger; an inspected frame stays ``HOLD_S`` first;
- ``/preview.json``: the last published inspection (id, sequence, verdict, regions, latency), the
  agent's fps and source state, and the overlay as a JPEG data URI. Image and message come from the same
  frame, so what the page shows is exactly what subscribers were told.
- ``/preview.jpg``: the same overlay alone (``X-Message-Id`` header), for ``curl`` or a plain <img>.

The inspection loop never waits for the page: the pipeline already keeps a reference to its last
published frame (``Pipeline.last_job``), and all drawing and JPEG encoding happens here, on the HTTP
request's thread, at most ``http.preview_max_fps`` times a second however many browsers are open, and
responses over all clients are spaced to four per drawing (a script polling back to back waits, asleep).
Frames published in between are simply never drawn.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

import cv2
import numpy as np

from edge_agent.inspection.drivers import Frame
from edge_agent.inspection.pipeline import FrameJob
from edge_agent.service.agent_snapshot import AgentSnapshot, part_lines
from edge_agent.service.http_server import HttpRequest, HttpResponse, HttpServer
from edge_agent.service.preview_view import live_picture, preview_picture
from edge_agent.service.snapshot import frame_caption

JPEG_QUALITY = 85
# Responses per second over all clients, as a multiple of preview_max_fps: enough for a few open tabs;
# a script fetching back to back waits in its own (sleeping) request thread instead of taking CPU.
RESPONSES_PER_RENDER = 4
# Triggered mode: an inspected frame stays on the page this long after it was taken (the decision can be
# read), then the live camera is shown again, at most LIVE_FPS times a second, until the next trigger.
HOLD_S = 3.0
LIVE_FPS = 2.0


@dataclass(frozen=True)
class PreviewFacts:
    """Agent-wide numbers shown next to the image."""

    fps: float
    latency_p50_ms: float
    latency_p99_ms: float
    source_state: str
    source_error: str
    mode: str = "off"  # [parts] mode
    parts_line: str = ""  # tracked: parts decided so far
    trigger_line: str = ""  # triggered: triggers received, waiting, missed, storm
    camera_fps: float = 0.0  # frames read from the source per second (inspected or not)

    @classmethod
    def of(cls, snapshot: AgentSnapshot) -> PreviewFacts:
        """The facts of one agent snapshot."""
        parts_line, trigger_line = part_lines(snapshot.parts)
        return cls(
            snapshot.fps,
            snapshot.latency_p50_ms,
            snapshot.latency_p99_ms,
            snapshot.source.state,
            snapshot.source.error,
            snapshot.parts.mode,
            parts_line,
            trigger_line,
            snapshot.camera_fps,
        )


@dataclass(frozen=True)
class RenderedFrame:
    """One published frame drawn for the page."""

    message_id: str
    jpeg: bytes
    data_uri: str  # the JPEG for the page's <img>, encoded once per drawing, not per request
    details: dict[str, object]
    rendered_at: float


class PreviewPage:
    """Serves the preview routes from the last published frame, drawing at a capped rate."""

    def __init__(
        self,
        last_job: Callable[[], FrameJob | None],
        facts: Callable[[], PreviewFacts],
        max_fps: float = 1.0,
        poll_ms: int | None = None,
        live_frame: Callable[[], Frame | None] | None = None,
    ) -> None:
        """``live_frame`` (triggered mode): the newest camera frame, shown between triggers (``LIVE_FPS``)."""
        self._last_job = last_job
        self._live_frame = live_frame
        self._facts = facts
        self._min_interval_s = 1.0 / max_fps if max_fps > 0 else 0.0
        self._poll_ms = poll_ms if poll_ms is not None else max(50, round(1000 * self._min_interval_s))
        self._lock = threading.Lock()  # one render at a time; other requests reuse its result
        self._rendered: RenderedFrame | None = None
        self.renders = 0
        self.cpu_s = 0.0  # CPU time spent drawing and answering (what the page costs the agent)
        self._response_gap_s = self._min_interval_s / RESPONSES_PER_RENDER
        self._throttle_lock = threading.Lock()
        self._next_response = 0.0

    def register(self, server: HttpServer) -> None:
        """Add /preview, /preview.json and /preview.jpg to the agent's HTTP server."""
        server.route("/preview", self._page_route)
        server.route("/preview.json", self._json_route)
        server.route("/preview.jpg", self._jpeg_route)

    def current(self) -> RenderedFrame | None:
        """The drawing of the newest published frame, redrawn at most max_fps times a second."""
        with self._lock:
            job = self._last_job()
            live = self._live_frame() if self._live_frame is not None else None
            if live is not None and _between_triggers(job, live):
                cached = self._rendered
                gap = max(self._min_interval_s, 1.0 / LIVE_FPS)
                if (
                    cached is not None
                    and cached.message_id.startswith("live-")
                    and (time.monotonic() - cached.rendered_at < gap)
                ):
                    return cached
                self._rendered = self._render_live(live)
                self.renders += 1
                return self._rendered
            if job is None:
                return self._rendered
            cached = self._rendered
            fresh_enough = cached is not None and time.monotonic() - cached.rendered_at < self._min_interval_s
            if cached is not None and (cached.message_id == job.message.message_id or fresh_enough):
                return cached
            self._rendered = self._render(job)
            self.renders += 1
            return self._rendered

    def _render(self, job: FrameJob) -> RenderedFrame:
        picture = preview_picture(job)
        ok, encoded = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise RuntimeError("JPEG encoding of the preview failed")
        message, view = job.message, job.parts_view
        details: dict[str, object] = {
            "message_id": message.message_id,
            "sequence": message.sequence,
            "capture_time": message.capture_time,
            "anomalous": message.anomalous,
            "image_score": message.image_score,
            "regions": [region.model_dump(mode="json") for region in message.regions],
            "latency_ms": message.latency_ms.model_dump(mode="json"),
            "model": f"{message.model.name} {message.model.version} ({message.model.backend})"
            + (f", recipe {message.model.recipe}" if message.model.recipe else ""),
            "log10_epsilon": message.log10_epsilon,
            "caption": f"{frame_caption(job)} · model {message.model.name} {message.model.version}{_recipe(job)}".replace(
                "  ", " · "
            ),
            "verdict": _verdict_word(job),
            "parts": [
                {
                    "part_id": part_id,
                    "x0": x0,
                    "x1": x1,
                    "decided": decided,
                    "verdict": view.verdict_of(part_id, decided),
                }
                for part_id, x0, x1, decided in view.parts
            ]
            if view is not None
            else [],
            "decision_line_x": view.decision_line_x if view is not None else None,
        }
        jpeg = np.asarray(encoded).tobytes()
        data_uri = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
        return RenderedFrame(message.message_id, jpeg, data_uri, details, time.monotonic())

    def _render_live(self, frame: Frame) -> RenderedFrame:
        """The camera between triggers: not inspected, said so on the page (no verdict, no overlay)."""
        ok, encoded = cv2.imencode(".jpg", live_picture(frame), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise RuntimeError("JPEG encoding of the preview failed")
        message_id = f"live-{frame.sequence}"
        details: dict[str, object] = {
            "message_id": message_id,
            "live": True,
            "sequence": frame.sequence,
            "capture_time": frame.capture_time,
            "anomalous": False,
            "image_score": None,
            "regions": [],
            "latency_ms": {},
            "model": "-",
            "log10_epsilon": None,
            "caption": f"live camera, frame {frame.sequence}: not inspected (triggered mode, waiting for a trigger)",
            "verdict": "waiting for a trigger",
            "parts": [],
            "decision_line_x": None,
        }
        jpeg = np.asarray(encoded).tobytes()
        data_uri = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
        return RenderedFrame(message_id, jpeg, data_uri, details, time.monotonic())

    def _wait_for_response_slot(self) -> None:
        """Space responses over all clients (sleeping in the request's own thread)."""
        with self._throttle_lock:
            now = time.monotonic()
            wait = self._next_response - now
            self._next_response = max(now, self._next_response) + self._response_gap_s
        if wait > 0:
            time.sleep(wait)

    # -- routes ---------------------------------------------------------------------------------------

    def _json_route(self, request: HttpRequest) -> HttpResponse:
        return self._measured(self._json_response)

    def _jpeg_route(self, request: HttpRequest) -> HttpResponse:
        return self._measured(self._jpeg_response)

    def _measured(self, respond: Callable[[], HttpResponse]) -> HttpResponse:
        """``respond()`` in its response slot, adding its CPU time (drawing included) to ``cpu_s``."""
        self._wait_for_response_slot()
        started = time.thread_time()
        try:
            return respond()
        finally:
            spent = time.thread_time() - started
            with self._throttle_lock:
                self.cpu_s += spent

    def _json_response(self) -> HttpResponse:
        rendered = self.current()
        facts = self._facts()
        body: dict[str, object] = {
            "fps": round(facts.fps, 2),
            "camera_fps": round(facts.camera_fps, 2),
            "latency_p50_ms": round(facts.latency_p50_ms, 1),
            "latency_p99_ms": round(facts.latency_p99_ms, 1),
            "source_state": facts.source_state,
            "source_error": facts.source_error,
            "mode": facts.mode,
            "parts_line": facts.parts_line,
            "trigger_line": facts.trigger_line,
            "renders": self.renders,
            "inspection": None,
            "image": None,
        }
        if rendered is not None:
            body["inspection"] = rendered.details
            body["image"] = rendered.data_uri
        return HttpResponse(body=json.dumps(body).encode(), content_type="application/json")

    def _jpeg_response(self) -> HttpResponse:
        rendered = self.current()
        if rendered is None:
            return HttpResponse(HTTPStatus.SERVICE_UNAVAILABLE, b"no frame inspected yet\n")
        return HttpResponse(
            body=rendered.jpeg,
            content_type="image/jpeg",
            headers={"X-Message-Id": rendered.message_id},
        )

    def _page_route(self, request: HttpRequest) -> HttpResponse:
        html = PAGE.replace("__POLL_MS__", str(self._poll_ms))
        return HttpResponse(body=html.encode(), content_type="text/html; charset=utf-8")


def _between_triggers(job: FrameJob | None, live: Frame) -> bool:
    """Show the live camera: nothing inspected yet, or the last inspection is ``HOLD_S`` old and newer frames came."""
    if job is None:
        return True
    return live.sequence > job.frame.sequence and time.monotonic() - job.frame.monotonic > HOLD_S


def _verdict_word(job: FrameJob) -> str:
    """The verdict row: the frame's verdict, or in tracked mode the verdict of the parts in view."""
    view = job.parts_view
    if view is None:
        return "ANOMALOUS" if job.message.anomalous else "good"
    verdicts = {view.verdict_of(p[0], p[3]) for p in view.parts}
    for word in ("REJECTED", "pending", "passed"):
        if word in verdicts:
            return word if word != "pending" else "parts pending"
    return "no part in view"


# The page keeps one request in flight at a time: a slow link shows fewer frames, it never queues them.
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>U-Flow live preview</title>
<style>
 body { font: 15px system-ui, sans-serif; margin: 12px; background: #111; color: #eee; }
 /* A table figure: the caption and legend wrap to the picture's width, never wider. */
 figure { display: table; margin: 0; }
 #frame { display: block; max-width: none; image-rendering: pixelated; border: 1px solid #444; }
 figcaption { display: table-caption; caption-side: bottom; padding: 6px 0; overflow-wrap: anywhere; }
 #caption { font-size: 17px; font-weight: 600; }
 #legend { font-size: 14px; color: #ccc; }
 #legend span { display: inline-block; margin: 2px 14px 2px 0; white-space: nowrap; }
 .bar { display: inline-block; width: 90px; height: 12px; vertical-align: middle;
        background: linear-gradient(90deg, #00007f, #0000ff, #00ffff, #ffff00, #ff0000, #7f0000); }
 .swatch { display: inline-block; width: 14px; height: 12px; vertical-align: middle; border: 2px solid; }
 table { border-collapse: collapse; margin-top: 8px; }
 td { padding: 2px 10px 2px 0; }
 .bad { color: #ff6b6b; font-weight: bold; } .good { color: #7bd88f; }
</style></head>
<body>
<h1>U-Flow live preview</h1>
<figure>
 <img id="frame" alt="camera frame" hidden>
 <figcaption><div id="caption">waiting for the first frame from the camera</div>
  <div id="legend">
   <span>left: camera, right: what the model sees</span>
   <span><i class="bar"></i> anomaly map 0 &rarr; 1</span>
   <span><i class="swatch" style="border-color:#fff"></i> outline: log10 NFA &lt; <b id="epsilon">?</b></span>
   <span><i class="swatch" style="border-color:#ff0"></i> region (its log10 NFA)</span>
   <span><i class="swatch" style="border-color:#50dc50"></i> region of interest</span>
   <span><i class="swatch" style="border-color:#00c8ff"></i> part (id)</span>
   <span><i class="swatch" style="border-color:#f0f"></i> decision line</span>
  </div></figcaption>
</figure>
<table>
 <tr><td>verdict</td><td id="verdict">-</td></tr>
 <tr><td>message id</td><td id="message-id">-</td></tr>
 <tr><td>frame</td><td id="sequence">-</td></tr>
 <tr><td>regions</td><td id="regions">-</td></tr>
 <tr><td>parts</td><td id="parts">-</td></tr>
 <tr><td>fps</td><td id="fps">-</td></tr>
 <tr><td>latency p50 / p99</td><td id="latency">-</td></tr>
 <tr><td>source</td><td id="source">-</td></tr>
 <tr><td>model</td><td id="model">-</td></tr>
</table>
<script>
const POLL_MS = __POLL_MS__;
const show = (id, text) => { document.getElementById(id).textContent = text; };
async function refresh() {
  try {
    const response = await fetch("/preview.json", {cache: "no-store"});
    const data = await response.json();
    show("fps", data.fps.toFixed(1) + " inspected, " + data.camera_fps.toFixed(1) + " from the camera");
    show("latency", data.latency_p50_ms + " / " + data.latency_p99_ms + " ms");
    show("source", data.source_state + (data.source_error ? " (" + data.source_error + ")" : ""));
    const modeLine = data.mode === "triggered" ? data.trigger_line : data.mode === "tracked" ? data.parts_line : "off";
    const inspection = data.inspection;
    if (inspection) {
      const img = document.getElementById("frame");
      img.src = data.image;
      img.hidden = false;
      img.dataset.live = inspection.live ? "1" : "";
      img.dataset.messageId = inspection.message_id;
      img.dataset.regions = JSON.stringify(inspection.regions);
      img.dataset.parts = JSON.stringify(inspection.parts);
      const verdict = document.getElementById("verdict");
      verdict.textContent = inspection.verdict;
      verdict.className = ["ANOMALOUS", "REJECTED"].includes(inspection.verdict) ? "bad" : "good";
      show("caption", inspection.caption);
      show("epsilon", inspection.log10_epsilon);
      show("message-id", inspection.message_id);
      show("sequence", inspection.sequence);
      show("regions", inspection.regions.map(r => "[" + r.bbox.join(", ") + "] log10 NFA " +
                                                    r.log_nfa.toFixed(1)).join("; ") || "none");
      const inView = inspection.parts.map(p => "#" + p.part_id.split("-").pop() + " " + p.verdict);
      show("parts", data.mode + ": " + modeLine + (inView.length ? "; in view " + inView.join(", ") : ""));
      show("model", inspection.model);
    }
  } catch (error) {
    show("source", "agent not reachable: " + error);
  }
  setTimeout(refresh, POLL_MS);
}
refresh();
</script>
</body></html>
"""


def _recipe(job: FrameJob) -> str:
    """`` · recipe <name>`` for a frame judged by a recipe ([[recipes]]), else nothing."""
    recipe = job.message.model.recipe if job.message is not None else None
    return f" · recipe {recipe}" if recipe else ""
