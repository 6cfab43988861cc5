"""How fast does the drift check see a change? Sampled frames until detection, and false alarms before it.

    .venv/bin/python bench/drift.py [--windows 50 100 200] [--size 256] [--reference 64] [--repeat 5]

The reference is built exactly as training builds it (``build_reference``) from ``--reference`` synthetic
good surfaces (edge_agent/demo/synthetic.py: brushed metal, grain and uneven light, each one different). The
"line" then shows ``window`` further good surfaces (the window fills with normal frames), followed by the
same kind of surfaces changed by

- ``brightness +15 %``: every pixel times 1.15 (an ageing lamp replaced, an exposure change);
- ``brightness -15 %``;
- ``defocus blur``: Gaussian blur with sigma 1.5 px at the model size (the camera was bumped);
- ``contrast -30 %``: pixels pulled 30 % towards their mean (haze, a dirty lens).

Every frame is one sample (``sample_every_s`` 0: on a line, frames are sampled at most once a second, so
multiply by that interval for the time to detection). "frames to detect" is the number of changed frames
until the expected reason is reported (median and max over ``--repeat`` runs with different surfaces);
"other reasons" lists what else fired by then; "false alarms" counts reports of any reason on the
unchanged frames before the step (over all repeats).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge_agent.config import DriftConfig  # noqa: E402
from edge_agent.demo.synthetic import good_image  # noqa: E402
from edge_agent.inspection.drift import DriftMonitor, build_reference  # noqa: E402

Change = Callable[[np.ndarray], np.ndarray]


def _gain(gain: float) -> Change:
    return lambda im: np.clip(np.rint(im.astype(np.float32) * gain), 0, 255).astype(np.uint8)


def _contrast(factor: float) -> Change:
    def change(im: np.ndarray) -> np.ndarray:
        mean = im.mean(axis=(0, 1), keepdims=True)
        return np.clip(np.rint(mean + (im - mean) * factor), 0, 255).astype(np.uint8)

    return change


def _blur(sigma: float) -> Change:
    return lambda im: cv2.GaussianBlur(im, (0, 0), sigma)


CHANGES: dict[str, tuple[str, Change]] = {
    "brightness +15 %": ("brightness", _gain(1.15)),
    "brightness -15 %": ("brightness", _gain(0.85)),
    "defocus blur (sigma 1.5 px)": ("blur", _blur(1.5)),
    "contrast -30 %": ("contrast", _contrast(0.7)),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, nargs="+", default=[50, 100, 200], help="drift.window values")
    parser.add_argument("--size", type=int, default=256, help="model input side (pixels)")
    parser.add_argument("--reference", type=int, default=64, help="training images in the reference")
    parser.add_argument("--repeat", type=int, default=5, help="runs with different surfaces")
    parser.add_argument("--max-distance", type=float, default=DriftConfig.model_fields["max_distance"].default)
    parser.add_argument("--min-shift", type=float, default=DriftConfig.model_fields["min_relative_shift"].default)
    return parser.parse_args()


def one_run(
    window: int,
    change: Change,
    reason: str,
    size: int,
    reference_images: np.ndarray,
    seed: int,
    args: argparse.Namespace,
) -> tuple[int | None, set[str], int]:
    """(changed frames until ``reason``, other reasons seen by then, false alarms before the step)."""
    settings = DriftConfig(window=window, min_frames=min(30, window), max_distance=args.max_distance,
                             min_relative_shift=args.min_shift, sample_every_s=0.0)  # fmt: skip
    monitor = DriftMonitor(build_reference(reference_images), settings)
    base = 10_000 * (seed + 1)
    false_alarms = 0
    for i in range(window):
        monitor.add(good_image(base + i, size, size), passed=True)
        false_alarms += bool(monitor.report().reasons)
    others: set[str] = set()
    for i in range(3 * window):
        monitor.add(change(good_image(base + window + i, size, size)), passed=True)
        reasons = monitor.report().reasons
        if reason in reasons:
            return i + 1, others | (set(reasons) - {reason}), false_alarms
        others |= set(reasons)
    return None, others, false_alarms


def main() -> None:
    args = parse_args()
    reference = np.stack([good_image(seed, args.size, args.size) for seed in range(args.reference)])
    print(f"drift check: KS distance >= {args.max_distance:g} and median shift >= {args.min_shift:.0%}; "
          f"reference {args.reference} images at {args.size}x{args.size}; {args.repeat} runs per row\n")  # fmt: skip
    print("| change | window | frames to detect (median / max) | other reasons by then | false alarms |")
    print("|---|---:|---:|---|---:|")
    for name, (reason, change) in CHANGES.items():
        for window in args.windows:
            found, others, false = [], set(), 0
            for seed in range(args.repeat):
                frames, other, alarms = one_run(window, change, reason, args.size, reference, seed, args)
                found.append(frames)
                others |= other
                false += alarms
            missed = sum(f is None for f in found)
            values = [f for f in found if f is not None]
            detect = f"{int(np.median(values))} / {max(values)}" if values else "never"
            if missed and values:
                detect += f" ({missed} missed)"
            print(f"| {name} | {window} | {detect} | {', '.join(sorted(others)) or '-'} | {false} |")


if __name__ == "__main__":
    main()
