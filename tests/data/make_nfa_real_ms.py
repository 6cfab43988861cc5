"""Save a few real m_s maps (float32) of the magnetic tile data as a tiny fixture for tests/test_nfa.py.

    .venv/bin/python tests/data/make_nfa_real_ms.py BUNDLE_DIR tests/data/nfa_real_ms

writes ``nfa_real_ms.npz`` (``image{k}_scale{s}`` arrays) and ``nfa_real_ms.json`` (which bundle,
which images, the scales' channels). Two good images and two defects; keep the total under 200 KB.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from calibration.data import read_model_input
from edge_agent.bundle import load_bundle
from edge_agent.engines.onnxruntime import OnnxRuntimeEngine

DATA = Path("/work/shared/data/magnetic_tile")


def main(argv: list[str]) -> int:
    bundle = load_bundle(argv[0])
    out = Path(argv[1])
    root = DATA
    split = json.loads((root / "split.json").read_text())
    picks = [
        ("good", split["val"][10]),
        ("good", split["test_good"][5]),
        ("MT_Blowhole", split["test_defect"]["MT_Blowhole"][3]),
        ("MT_Crack", split["test_defect"]["MT_Crack"][2]),
    ]
    engine = OnnxRuntimeEngine(bundle, threads=1)
    h, w = bundle.manifest.input.height, bundle.manifest.input.width
    arrays = {}
    meta = {
        "bundle": f"{bundle.manifest.name} {bundle.manifest.version}",
        "validation_metrics": bundle.manifest.validation_metrics,
        "scales": [s.model_dump() for s in bundle.manifest.scales],
        "images": [],
    }
    for k, (kind, stem) in enumerate(picks):
        o = engine.infer(read_model_input(root / (stem + ".jpg"), h, w))
        for s, m in enumerate(o.scale_maps):
            arrays[f"image{k}_scale{s}"] = np.asarray(m, dtype=np.float32)
        meta["images"].append(
            {
                "index": k,
                "kind": kind,
                "stem": stem,
                "m_mean": [float(m.mean()) for m in o.scale_maps],
                "m_max": [float(m.max()) for m in o.scale_maps],
            }
        )
    np.savez(out.with_suffix(".npz"), **arrays)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out.with_suffix('.npz')}: {meta['images']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
