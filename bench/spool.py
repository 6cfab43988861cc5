"""What the SQLite spool costs the pipeline: time per ``add`` in the calling (publish) thread, and disk throughput.

    nice -n 10 .venv/bin/python bench/spool.py [--messages 20000] [--dir /var/lib/edge-agent]

For ``synchronous`` = normal and full, two patterns with 700-byte inspection-like payloads:
- ``broker up``: each message is acknowledged ~1 ms after it is added (as a local broker does); almost
  nothing should reach the disk (acknowledged before the commit interval ends);
- ``broker down``: nothing is acknowledged; every message is committed, in batches.
Columns: add() time in the caller (p50, p99, max, microseconds), messages per second the caller could
push, rows written and commits, and the time to have everything on disk (``flush``). Run it on the
device's own storage (``--dir``): an SD card or eMMC is far slower to fsync than a desktop SSD.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge_agent.publish.outbox import OutgoingMessage  # noqa: E402
from edge_agent.publish.spool import Spool  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=0.0, help="messages per second to add (0 = as fast as possible)")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the spool file (default: a temp dir)")
    return parser.parse_args()


def message(index: int) -> OutgoingMessage:
    payload = (
        (b'{"message_id":"%032x","sequence":%d,' % (index, index)) + b'"x":"' + b"0" * 640 + b'","replayed":false}'
    )
    return OutgoingMessage(
        key=f"{index:032x}", topic="uflow/cam1/inspection", payload=payload, expires_at=time.time() + 3600
    )


def run(path: Path, synchronous: str, broker_up: bool, count: int, rate: float) -> dict[str, float]:
    spool = Spool(path, max_messages=count * 2, commit_interval_s=0.05, synchronous=synchronous)  # type: ignore[arg-type]
    pending: deque[tuple[float, int]] = deque()
    stop = threading.Event()

    def broker() -> None:  # acknowledges each message ~1 ms after it was added
        while not stop.is_set() or pending:
            if pending and time.perf_counter() - pending[0][0] >= 0.001:
                spool.ack(pending.popleft()[1])
            else:
                time.sleep(0.0002)

    acker = threading.Thread(target=broker, daemon=True)
    if broker_up:
        acker.start()
    times = np.empty(count)
    interval = 1.0 / rate if rate > 0 else 0.0
    started = time.perf_counter()
    for index in range(count):
        if interval:
            delay = started + index * interval - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        item = message(index)
        before = time.perf_counter()
        seq = spool.add(item)
        times[index] = time.perf_counter() - before
        if broker_up:
            pending.append((time.perf_counter(), seq))
    pushed = time.perf_counter() - started
    stop.set()
    if broker_up:
        acker.join()
    flush_started = time.perf_counter()
    spool.flush(120)
    flushed = time.perf_counter() - flush_started
    counters = spool.counters
    spool.close()
    for suffix in ("", "-wal", "-shm", ".lock"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    p50, p99 = np.percentile(times * 1e6, [50, 99])
    return {
        "p50": p50,
        "p99": p99,
        "max": times.max() * 1e6,
        "rate": count / pushed,
        "rows": counters.rows_written,
        "commits": counters.commits,
        "flush": flushed,
    }


def main() -> int:
    args = parse_args()
    directory = args.dir or Path(tempfile.mkdtemp(prefix="bench-spool-"))
    directory.mkdir(parents=True, exist_ok=True)
    print(f"spool in {directory}; {args.messages} messages of ~700 bytes; load average {os.getloadavg()[0]:.1f}")
    print(
        "| synchronous | broker | add p50 us | add p99 us | add max us | msgs/s pushed | rows written | commits | flush s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for synchronous in ("normal", "full"):
        for broker_up in (True, False):
            r = run(directory / "spool.sqlite", synchronous, broker_up, args.messages, args.rate)
            print(
                f"| {synchronous} | {'up' if broker_up else 'down'} | {r['p50']:.1f} | {r['p99']:.1f} | "
                f"{r['max']:.0f} | {r['rate']:.0f} | {r['rows']} | {r['commits']} | {r['flush']:.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
