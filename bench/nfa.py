"""Benchmark of the tree NFA (edge_agent.inspection.nfa): per-map times, upsampling, JIT compile time.

Prints a markdown table. One thread (NUMBA_NUM_THREADS=1, nothing parallel). Times are medians
over many calls after warm-up; "cpu" is the calling thread's CPU time (time.thread_time), which
other processes on a shared machine disturb less than wall time, "wall" is perf_counter.

    .venv/bin/python bench/nfa.py                 # everything
    .venv/bin/python bench/nfa.py --no-compile    # skip the cold/cached JIT measurements
"""

from __future__ import annotations

import os

os.environ.setdefault("NUMBA_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from edge_agent.inspection import nfa  # noqa: E402
from edge_agent.inspection.scoring import tightened_regions  # noqa: E402

SIZES = (14, 28, 64, 128, 256)
CHANNELS = 64
OUT_SHAPE = (256, 256)


def median_times_ms(fn: Callable[[], object], min_calls: int, min_seconds: float) -> tuple[float, float, int]:
    """(median cpu ms, median wall ms, calls) over at least ``min_calls`` calls and ``min_seconds``."""
    cpu, wall, _, n = timing_ms(fn, min_calls, min_seconds)
    return cpu, wall, n


def timing_ms(fn: Callable[[], object], min_calls: int, min_seconds: float) -> tuple[float, float, float, int]:
    """(median cpu ms, median wall ms, fastest cpu ms, calls); the fastest call is the one least
    disturbed by other processes on a shared machine."""
    cpu, wall = [], []
    start = time.perf_counter()
    while len(cpu) < min_calls or time.perf_counter() - start < min_seconds:
        c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
        fn()
        c1, w1 = time.thread_time_ns(), time.perf_counter_ns()
        cpu.append(c1 - c0)
        wall.append(w1 - w0)
    return float(np.median(cpu)) / 1e6, float(np.median(wall)) / 1e6, float(np.min(cpu)) / 1e6, len(cpu)


def chi2_map(rng: np.random.Generator, size: int) -> np.ndarray:
    """m_s of a good image: mean of C squared standard normals, float32 as the engine returns it."""
    return (rng.chisquare(CHANNELS, size=(size, size)) / CHANNELS).astype(np.float32)


def per_map_rows(seconds: float) -> list[str]:
    rng = np.random.default_rng(0)
    rows = [
        "| map | kernel cpu ms (median) | kernel cpu ms (fastest) | kernel wall ms | log_prob_map cpu ms | "
        "upsample to 256x256 cpu ms | kernel ns / (N log2 N) | calls |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size in SIZES:
        m = chi2_map(rng, size)
        flat = np.ascontiguousarray(m, dtype=np.float64).ravel()
        calls = 2000 if size <= 64 else 200
        k_cpu, k_wall, k_best, n = timing_ms(partial(nfa._log_prob_flat, flat, size, CHANNELS), calls, seconds)
        api_cpu, _, _ = median_times_ms(partial(nfa.log_prob_map, m, CHANNELS), calls, seconds)
        log_p = nfa.log_prob_map(m, CHANNELS)
        up_cpu, _, _ = median_times_ms(partial(nfa.combine_log_probs, [log_p], OUT_SHAPE, 0.0), 200, seconds)
        n_pix = size * size
        per_nlogn = k_cpu * 1e6 / (n_pix * math.log2(n_pix))
        rows.append(
            f"| {size}x{size} | {k_cpu:.4f} | {k_best:.4f} | {k_wall:.4f} | {api_cpu:.4f} | {up_cpu:.4f} | "
            f"{per_nlogn:.2f} | {n} |"
        )
    return rows


def pipeline_rows(seconds: float) -> list[str]:
    """A typical 256 px model with strides 4/8/16: three scales to one 256x256 log NFA map + regions."""
    rng = np.random.default_rng(1)
    maps = [chi2_map(rng, 64), chi2_map(rng, 32), chi2_map(rng, 16)]
    channels = [CHANNELS, CHANNELS, CHANNELS]
    log_nfa = nfa.log_nfa_map(maps, channels, OUT_SHAPE)
    score = rng.uniform(size=OUT_SHAPE).astype(np.float32)
    full_cpu, full_wall, full_best, n = timing_ms(lambda: nfa.log_nfa_map(maps, channels, OUT_SHAPE), 300, seconds)
    reg_cpu, reg_wall, _ = median_times_ms(lambda: nfa.regions_from_log_nfa(log_nfa, 0.0, 0, score), 300, seconds)
    planted = log_nfa.copy()
    planted[40:90, 100:180] = -5.0
    planted[200:210, 10:30] = -2.0
    reg2_cpu, _, _ = median_times_ms(lambda: nfa.regions_from_log_nfa(planted, 0.0, 0, score), 300, seconds)
    regions = nfa.regions_from_log_nfa(planted, 0.0, 0, score)
    tight_cpu, _, _ = median_times_ms(lambda: tightened_regions(planted, score, 0.0, 0.8, regions), 300, seconds)
    n_tests_cpu, _, _ = median_times_ms(lambda: nfa.log10_number_of_tests([(64, 64), (32, 32), (16, 16)]), 50, 0.2)
    return [
        "| step (scales 64x64, 32x32, 16x16 -> 256x256) | cpu ms | wall ms |",
        "|---|---|---|",
        f"| log_nfa_map (3 trees + selection + upsampling + min, log10 N included) | {full_cpu:.4f} "
        f"(fastest {full_best:.4f}) | {full_wall:.4f} |",
        f"| log10_number_of_tests (cached per list of shapes after the first call) | {n_tests_cpu:.4f} | |",
        f"| regions_from_log_nfa, noise map (no region) | {reg_cpu:.4f} | {reg_wall:.4f} |",
        f"| regions_from_log_nfa, two planted regions | {reg2_cpu:.4f} | |",
        f"| tightened_regions, the same two, fraction 0.8 (anomalous frames only) | {tight_cpu:.4f} | |",
        f"(median over >= {n} calls)",
    ]


def reference_rows(max_size: int) -> list[str]:
    import nfa_reference as ref

    rng = np.random.default_rng(0)
    rows = ["| map | plain reference s | Numba kernel ms | speed-up |", "|---|---|---|---|"]
    for size in (s for s in SIZES if s <= max_size):
        m = chi2_map(rng, size)
        flat = np.ascontiguousarray(m, dtype=np.float64).ravel()
        calls = 3 if size <= 28 else 1
        ref_cpu, _, _ = median_times_ms(partial(ref.log_prob_map, m, CHANNELS), calls, 0.0)
        k_cpu, _, _ = median_times_ms(partial(nfa._log_prob_flat, flat, size, CHANNELS), 500, 0.5)
        rows.append(f"| {size}x{size} | {ref_cpu / 1e3:.3f} | {k_cpu:.4f} | {ref_cpu / k_cpu:,.0f}x |")
    return rows


def compile_rows() -> list[str]:
    """Import + warm_up() in fresh processes: a cold Numba cache dir, then the same dir again."""
    code = (
        "import time; t0 = time.perf_counter(); from edge_agent.inspection import nfa; t1 = time.perf_counter(); "
        "nfa.warm_up(); t2 = time.perf_counter(); print(f'{t1 - t0:.3f} {t2 - t1:.3f}')"
    )
    rows = ["| Numba cache | import s | warm_up() s |", "|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="nfa-numba-cache-") as cache_dir:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir, PYTHONPATH=str(ROOT))
        for label in ("cold (empty NUMBA_CACHE_DIR)", "cached (second process)"):
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            import_s, warm_s = out.stdout.split()
            rows.append(f"| {label} | {import_s} | {warm_s} |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum timing time per row")
    parser.add_argument("--no-compile", action="store_true", help="skip the JIT compile-time rows")
    parser.add_argument("--reference-max", type=int, default=28, help="largest map for the plain reference")
    args = parser.parse_args()

    t = time.perf_counter()
    nfa.warm_up()
    print(f"warm_up() in this process: {time.perf_counter() - t:.2f} s; C = {CHANNELS}; float32 chi2(C)/C maps")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; cpus: {os.cpu_count()}\n")
    for block in (per_map_rows(args.seconds), pipeline_rows(args.seconds), reference_rows(args.reference_max)):
        print("\n".join(block) + "\n", flush=True)
    if not args.no_compile:
        print("\n".join(compile_rows()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
