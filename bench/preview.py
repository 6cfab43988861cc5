"""Does the live preview slow inspection? Agent fps with the preview page open vs closed.

    nice -n 10 .venv/bin/python bench/preview.py [--bundle BUNDLE_DIR] [--frames 300] [--repeat 3] [--browser]

The real agent (``Agent.serve``, as in bench/pipeline.py) inspects the same folder of frames, every frame,
publishing to a real mosquitto, with ``[http] preview = true`` in every row. Rows, alternated within each
repeat so that a change of machine load hits all of them alike:

- ``closed``: nobody looks at the page.
- ``open``: a client process does what the page's script does: fetch /preview.json, wait the page's poll interval
  (1 / preview_max_fps), again. With ``--browser`` it is the real page in headless Chromium instead, on
  this same machine (on a plant the browser runs on the installer's laptop, not on the agent's box).
- ``open, 4 greedy clients``: four clients fetching /preview.json back to back (a misbehaving tab or
  script): the drawing cap must hold the agent's cost down.

fps is first to last published frame; the difference is against the ``closed`` row of the same repeat.
On a shared machine that difference is mostly load noise, so the table also gives what the page costs
directly: the CPU time the agent spent drawing, encoding and answering for it (thread CPU time measured
in the preview itself), per second and as a share of the whole process's CPU during the run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from pipeline import DEFAULT_BUNDLE, AgentRun, make_frames, prepared_bundle, run_agent_once  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None, help=f"model bundle (default {DEFAULT_BUNDLE})")
    parser.add_argument("--frames", type=int, default=300, help="frames per measurement")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = all cores)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-fps", type=float, default=1.0, help="http.preview_max_fps")
    parser.add_argument("--browser", action="store_true", help="the 'open' row uses headless Chromium")
    parser.add_argument("--train-epochs", type=int, default=30, help="epochs when a bundle has to be trained")
    return parser.parse_args()


# The client runs as its own process, as a browser would: in this process its JSON parsing would compete
# with the agent for the GIL, which no real viewer does.
CLIENT_SCRIPT = """
import json, sys, time, urllib.request
url, interval = sys.argv[1], float(sys.argv[2])
ids = set()
while True:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            inspection = json.loads(response.read())["inspection"]
        if inspection:
            ids.add(inspection["message_id"])
            print(inspection["message_id"], flush=True)
    except OSError:
        pass
    time.sleep(interval)
"""


class PageClient:
    """A separate process fetching /preview.json like the page does (or back to back) until stopped."""

    def __init__(self, port: int, interval_s: float) -> None:
        self.url = f"http://127.0.0.1:{port}/preview.json"
        self.interval_s = interval_s
        self.stop = threading.Event()
        self.ids: set[str] = set()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        process = subprocess.Popen(
            [sys.executable, "-c", CLIENT_SCRIPT, self.url, str(self.interval_s)],
            stdout=subprocess.PIPE,
            text=True,
        )
        reader = threading.Thread(target=self._read, args=(process,), daemon=True)
        reader.start()
        self.stop.wait()
        process.terminate()
        process.wait(10)
        reader.join(5)

    def _read(self, process: subprocess.Popen) -> None:  # type: ignore[type-arg]
        assert process.stdout is not None
        for line in process.stdout:
            self.ids.add(line.strip())


class BrowserClient:
    """The real page in headless Chromium (Playwright, Debian's chromium binary)."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/preview"
        self.stop = threading.Event()
        self.ids: set[str] = set()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from playwright.sync_api import sync_playwright

        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, headless=True)
            page = browser.new_page()
            while not self.stop.is_set():
                try:
                    page.goto(self.url)
                    break
                except Exception:  # the agent is still starting
                    time.sleep(0.2)
            while not self.stop.is_set():
                shown = page.get_attribute("#frame", "data-message-id")
                if shown:
                    self.ids.add(shown)
                self.stop.wait(0.2)
            browser.close()


@dataclass
class Measurement:
    run: AgentRun
    seen: int  # distinct frames the clients were shown
    preview_cpu_s: float  # CPU the agent spent on the page (drawing, encoding, answering)
    process_cpu_s: float  # CPU of the agent's process during the run (the clients are other processes)
    load: float

    @property
    def preview_share(self) -> float:
        """The page's CPU as a percentage of the process's CPU over the run."""
        return 100.0 * self.preview_cpu_s / self.process_cpu_s if self.process_cpu_s > 0 else 0.0


def measure(settings_for, port_for, mode: str, args: argparse.Namespace) -> Measurement:  # type: ignore[no-untyped-def]
    """One agent run over the folder with ``mode``'s clients."""
    port = port_for()
    settings = settings_for(mode, port)
    clients: list[PageClient | BrowserClient] = []
    if mode == "open":
        clients = [BrowserClient(port) if args.browser else PageClient(port, 1.0 / args.max_fps)]
    elif mode == "open, 4 greedy clients":
        clients = [PageClient(port, 0.0) for _ in range(4)]
    agents: list = []  # type: ignore[type-arg]
    for client in clients:
        client.thread.start()
    cpu_before = sum(os.times()[:2])
    try:
        run = run_agent_once(settings, None, on_agent=agents.append)
    finally:
        for client in clients:
            client.stop.set()
        for client in clients:
            client.thread.join(30)
    process_cpu = sum(os.times()[:2]) - cpu_before
    page = agents[0].preview
    seen = len(set().union(*(c.ids for c in clients))) if clients else 0
    return Measurement(run, seen, page.cpu_s if page else 0.0, process_cpu, os.getloadavg()[0])


def main() -> int:
    args = parse_args()
    bundle_dir, bundle = prepared_bundle(args.bundle, args.train_epochs)
    from edge_agent.config import load_settings
    from edge_agent.demo.local_broker import LocalMosquitto, free_port

    modes = ["closed", "open", "open, 4 greedy clients"]
    rows: list[tuple[int, str, Measurement]] = []
    with tempfile.TemporaryDirectory(prefix="bench-preview-") as tmp:
        frames_dir = Path(tmp) / "frames"
        frames_dir.mkdir()
        make_frames(frames_dir, args.frames, bundle.manifest.input.width)
        with LocalMosquitto(Path(tmp) / "broker") as broker:

            def settings_for(mode: str, port: int):  # type: ignore[no-untyped-def]
                return load_settings(
                    None,
                    device_id="bench",
                    state_dir=str(Path(tmp) / f"state-{port}"),
                    model={"bundle": str(bundle_dir), "backend": "onnxruntime", "threads": args.threads},
                    source={"uri": str(frames_dir)},
                    mqtt={"port": broker.port},
                    http={"enabled": True, "port": port, "preview": True, "preview_max_fps": args.max_fps},
                )

            run_agent_once(settings_for("warm-up", free_port()), None)  # ORT allocations, page cache, JIT
            for repeat in range(args.repeat):
                order = modes if repeat % 2 == 0 else modes[::-1]
                for mode in order:
                    result = measure(settings_for, free_port, mode, args)
                    rows.append((repeat, mode, result))
                    print(f"repeat {repeat + 1} {mode}: {result.run.fps:.2f} fps", file=sys.stderr, flush=True)
    _print(bundle_dir, args, rows, modes)
    return 0


def _print(bundle_dir: Path, args: argparse.Namespace, rows: list, modes: list[str]) -> None:  # type: ignore[type-arg]
    print(
        f"\nbundle {bundle_dir}; {args.frames} frames per row; {os.cpu_count()} CPUs; preview_max_fps "
        f"{args.max_fps:g}; 'open' client: {'headless Chromium' if args.browser else 'HTTP, page rate'}"
    )
    print(
        "| repeat | preview | fps | vs closed | process CPU ms/frame | preview CPU ms/s | preview share of CPU "
        "| frames shown | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    closed = {r: m.run.fps for r, mode, m in rows if mode == "closed"}
    for repeat, mode, m in sorted(rows, key=lambda row: (row[0], modes.index(row[1]))):
        diff = 100.0 * (m.run.fps - closed[repeat]) / closed[repeat]
        cpu_per_frame = 1000.0 * m.process_cpu_s / max(1, m.run.frames)
        preview_rate = 1000.0 * m.preview_cpu_s / m.run.seconds if m.run.seconds > 0 else 0.0
        print(
            f"| {repeat + 1} | {mode} | {m.run.fps:.2f} | {diff:+.1f} % | {cpu_per_frame:.1f} | "
            f"{preview_rate:.1f} | {m.preview_share:.2f} % | {m.seen if mode != 'closed' else '-'} | "
            f"{m.load:.1f} |"
        )
    for mode in modes[1:]:
        chosen = [(r, m) for r, name, m in rows if name == mode]
        diffs = [100.0 * (m.run.fps - closed[r]) / closed[r] for r, m in chosen]
        shares = [m.preview_share for _, m in chosen]
        print(
            f"{mode}: fps difference mean {sum(diffs) / len(diffs):+.1f} % (min {min(diffs):+.1f}, max "
            f"{max(diffs):+.1f}); the page's own CPU {sum(shares) / len(shares):.2f} % of the agent's"
        )


if __name__ == "__main__":
    sys.exit(main())
