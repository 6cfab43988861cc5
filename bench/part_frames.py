"""What holding a tracked part's evidence costs the publish thread, per frame (issue 21).

In tracked mode with ``[keep] flagged = true`` every published frame goes through
edge_agent/service/part_frames.py (``PartFrameBook.observe``: the lowest log10 NFA over each part's
columns, the best frames kept by reference, one thumbnail crop per part), and during a good-only
recording through edge_agent/service/record_gate.py (``RecordGate.offer``: bookkeeping only). Both run on
the publish thread, so their cost is added to every frame's latency. This measures them on synthetic
frames of the usual sizes with two parts in view and a 64x64 log10 NFA map (a 256 px model at stride 4),
and prints a table (median and p99 microseconds per frame, over ``--frames`` frames).

    .venv/bin/python bench/part_frames.py
    .venv/bin/python bench/part_frames.py --frames 2000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_agent.inspection.drivers import Frame  # noqa: E402
from edge_agent.inspection.parts import PartsView  # noqa: E402
from edge_agent.inspection.pipeline import FrameJob  # noqa: E402
from edge_agent.inspection.scoring import Verdict  # noqa: E402
from edge_agent.service.part_frames import PartFrameBook  # noqa: E402
from edge_agent.service.record_gate import RecordGate  # noqa: E402

SIZES = ((256, 256), (640, 480), (1280, 720), (1920, 1080))


def _jobs(width: int, height: int, count: int) -> list[FrameJob]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    log_nfa = rng.normal(0.0, 1.0, (64, 64)).astype(np.float32)
    jobs = []
    for sequence in range(count):
        shift = (sequence * 8) % width
        parts = (
            (f"p{sequence // 40}", max(0, width // 2 - shift), width // 2 + 40),
            (f"p{sequence // 40 + 1}", width // 2 + 60, width),
        )
        view = PartsView(
            sequence,
            tuple((pid, x0, max(x0 + 1, x1), False) for pid, x0, x1 in parts),
            0.0,
            "right_to_left",
            undecided=frozenset(p[0] for p in parts),
        )
        frame = Frame(sequence, time.time(), image, "bench", (width, height))
        verdict = Verdict(0.1, False, (), 0.0, log_nfa, log_nfa)
        # The book and the gate read the frame, its verdict and its parts view only: no model, maps or message.
        unread: Any = None
        jobs.append(FrameJob(frame, unread, unread, verdict, unread, parts_view=view))
    return jobs


def _time(call, jobs: list[FrameJob]) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    spent = []
    for job in jobs:
        started = time.perf_counter()
        call(job)
        spent.append((time.perf_counter() - started) * 1e6)
    values = np.asarray(spent)
    return float(np.median(values)), float(np.percentile(values, 99))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=600, help="frames per size")
    args = parser.parse_args()
    print("| frame | PartFrameBook.observe p50 / p99 (us) | RecordGate.offer p50 / p99 (us) |")
    print("| --- | --- | --- |")
    for width, height in SIZES:
        jobs = _jobs(width, height, args.frames)
        book = PartFrameBook()
        gate = RecordGate(lambda held: None, lambda why: None)

        def offer(job: FrameJob, gate: RecordGate = gate) -> None:
            view = job.parts_view
            assert view is not None
            gate.offer(job.frame.image, job.frame.sequence, job.frame.capture_time, True,
                       [p[0] for p in view.parts], view.undecided)  # fmt: skip

        observe = _time(book.observe, jobs)
        gated = _time(offer, jobs)
        print(f"| {width}x{height} | {observe[0]:.0f} / {observe[1]:.0f} | {gated[0]:.0f} / {gated[1]:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
