"""``edge-agent record``: collect good images for training from the configured camera.

Frames come from ``[source]`` exactly as the agent sees them (rotation and ROI applied); near-duplicates
are skipped; with ``--only-good`` only frames the configured model passes are written (in tracked mode:
only frames whose parts were all decided good, edge_agent/service/record_gate.py). ``--every`` spaces
frames by their own clock: the time in a video file, so a file read faster than real time is spaced as
it was filmed. The output folder
is one ``uflow train DIR`` takes as is (edge_agent/service/recorder.py). A progress line shows written /
wanted and why frames were skipped.

This command opens the camera itself: while the agent runs, send ``cmd/record`` instead (the agent
records from its own frames and never fights itself for the camera).

Exit status: 0 when ``--count`` frames are written, the source ended or a stop was asked; 1 when the
source or model cannot be used; 2 for a configuration or argument error.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

from edge_agent.cli.common import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    add_config_arguments,
    install_signal_handlers,
    parse_overrides,
    train_hint,
)
from edge_agent.config import AgentSettings, ConfigError, load_settings
from edge_agent.inspection.drivers import Frame
from edge_agent.inspection.parts import TrackedParts
from edge_agent.logs import setup_logging
from edge_agent.service.disk_budget import training_budget
from edge_agent.service.record_gate import HeldFrame, RecordGate, frame_clock
from edge_agent.service.recorder import FrameRecorder, RecordError, RecordSettings

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``edge-agent record``."""
    add_config_arguments(parser, "agent", "EDGE_AGENT_", "source.uri=rtsp://cam/stream")
    parser.add_argument("--out", type=Path, required=True, help="folder for the images (created)")
    parser.add_argument("--count", type=int, default=None, help="stop after this many images (default: until stopped)")
    parser.add_argument("--every", type=float, default=0.0, metavar="S", help="at least S seconds between images")
    parser.add_argument("--only-good", action="store_true", help="only frames the configured model passes")
    parser.add_argument(
        "--min-difference",
        type=float,
        default=RecordSettings.min_difference,
        help="skip frames whose thumbnail differs from the last image by less than this mean grey level (0-255)",
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``edge-agent record``."""
    setup_logging("WARNING", "text")
    try:
        settings = load_settings(args.config, **parse_overrides(args.overrides))
        record = RecordSettings(args.count, args.every, args.only_good, args.min_difference)
    except (ConfigError, ValueError) as exc:
        print(f"edge-agent record: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    stop = threading.Event()
    restore = install_signal_handlers(stop)
    try:
        return record_frames(settings, args.out, record, stop, sys.stderr)
    finally:
        restore()


def record_frames(
    settings: AgentSettings, out: Path, record: RecordSettings, stop: threading.Event, progress: TextIO
) -> int:
    """Record from the configured source into ``out`` until done, the source ends or ``stop`` is set."""
    from edge_agent.inspection.drivers import SourceError
    from edge_agent.inspection.frame_source import FrameSource

    try:
        # The keep's free-space floor always; the training quota over training_dir when recording into it, else
        # over the output folder.
        training = settings.keep.training_dir
        inside = training is not None and Path(out).resolve().is_relative_to(training.resolve())
        recorder = FrameRecorder(out, record, budget=training_budget(settings.keep, None if inside else Path(out)))
    except RecordError as exc:
        print(f"edge-agent record: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    model = None
    if record.only_good:
        from edge_agent.inspection import nfa
        from edge_agent.inspection.loaded_model import ModelLoadError, load_model

        try:
            nfa.warm_up()
            model = load_model(settings.bundle_dir, settings.model, settings.nfa)
        except ModelLoadError as exc:
            print(f"edge-agent record: --only-good needs the model: {exc}", file=sys.stderr)
            return EXIT_FAILURE
    source = FrameSource(settings.source)
    try:
        source.open()
    except SourceError as exc:
        if not source.live:
            print(f"edge-agent record: cannot open the source: {exc}", file=sys.stderr)
            if model is not None:
                model.close()
            return EXIT_FAILURE
        # A camera or stream that is not up yet: read() reconnects with backoff, as the agent does.
        print(f"edge-agent record: the source is not available yet ({exc}); retrying", file=sys.stderr)
    next_line = 0.0
    written: list[HeldFrame] = []
    gate = RecordGate(written.append, recorder.note, record.every_s)
    parts = _tracked_parts(settings) if model is not None else None
    last: Frame | None = None
    ended = False
    try:
        while not stop.is_set() and not recorder.done:
            frame = source.read()
            if frame is None:
                ended = True
                break
            last = frame
            passed, in_view, alive, decided = True, [], None, []
            if model is not None:
                from edge_agent.inspection.single import inspect_frame

                job = inspect_frame(model, frame, settings.device_id)
                passed = not job.message.anomalous
                if parts is not None:
                    decided = parts.observe(frame, job.verdict, model.ref)
                    view = parts.view
                    in_view = [p[0] for p in view.parts] if view is not None else []
                    alive = view.undecided if view is not None else frozenset()
            gate.offer(frame.image, frame.sequence, frame_clock(frame), passed, in_view, alive)
            if parts is not None:
                for message in decided:
                    gate.part_decided(message.part_id, message.anomalous)
            _write(recorder, written)
            if time.monotonic() >= next_line:
                next_line = time.monotonic() + PROGRESS_INTERVAL_S
                _progress(recorder, progress)
        if parts is not None and ended and model is not None:
            # The file ended: the parts still in view are decided now, as the agent does.
            for message in parts.finish(last, model.ref):
                gate.part_decided(message.part_id, message.anomalous)
            _write(recorder, written)
        gate.abandon()
    except (SourceError, RecordError) as exc:
        print(f"\nedge-agent record: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        source.close()
        if model is not None:
            model.close()
        _progress(recorder, progress)
        progress.write("\n")
    recorder.write_summary()
    counts = recorder.counts
    print(
        f"{counts.written} images in {recorder.out} ({counts.duplicates} near-duplicates, {counts.flagged} flagged, "
        f"{counts.too_soon} within --every skipped); train with: {train_hint(recorder.out)}",
        file=progress,
    )
    return EXIT_OK


def _tracked_parts(settings: AgentSettings) -> TrackedParts | None:
    """Tracked mode: the parts are followed as the agent does, so a frame waits for its parts' verdicts."""
    if settings.parts.mode != "tracked":
        return None
    return TrackedParts(settings.parts, settings.device_id)


def _write(recorder: FrameRecorder, released: list[HeldFrame]) -> None:
    """Write the frames the gate released (in capture order), spaced by their own clock."""
    for held in released:
        if not recorder.done:
            recorder.offer(held.image, held.sequence, True, now=held.clock)
    released.clear()


def _progress(recorder: FrameRecorder, stream: TextIO) -> None:
    counts, wanted = recorder.counts, recorder.settings.count
    share = f"{counts.written}/{wanted}" if wanted else f"{counts.written}"
    bar = ""
    if wanted:
        filled = int(30 * min(1.0, counts.written / wanted))
        bar = "[" + "#" * filled + "." * (30 - filled) + "] "
    stream.write(
        f"\r{bar}{share} images, {counts.seen} frames seen: {counts.duplicates} near-duplicates, "
        f"{counts.flagged} flagged, {counts.too_soon} too soon"
    )
    stream.flush()
