"""Recording a precision variant (model.int8.onnx, model.fp16.onnx) in a bundle's model.json.

The variant file is written beside model.onnx first; then model.json gains its sha256 in ``files``
and a ``variants`` entry (file, precision, settings, metrics), replacing an older variant of the same
precision. A signature over the old model.json no longer matches, so it is reported loudly: the
bundle must be signed again before the fleet updater accepts it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edge_agent.bundle import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    Bundle,
    Manifest,
    QuantizedModel,
    read_manifest,
    sha256_of,
    verify_files,
)
from edge_agent.fileio import atomic_write

log = logging.getLogger(__name__)


def variant_path(bundle: Bundle, precision: str) -> Path:
    """Where a variant of this precision is written: model.<precision>.onnx."""
    return bundle.root / f"model.{precision}.onnx"


def load_for_variant(root: Path | str, precision: str) -> Bundle:
    """The bundle with every file verified except the ``precision`` variant about to be replaced.

    A calibration interrupted between writing the file and recording it leaves that variant's hash
    stale; that must not stop the calibration that fixes it.
    """
    root = Path(root)
    manifest = read_manifest(root)
    replaced = {v.file for v in manifest.variants if v.precision == precision} | {f"model.{precision}.onnx"}
    others = manifest.model_copy(update={"files": {k: v for k, v in manifest.files.items() if k not in replaced}})
    verify_files(root, others)
    return Bundle(root=root, manifest=manifest)


def record_variant(root: Path | str, variant: QuantizedModel) -> Manifest:
    """Add (or replace) ``variant`` in model.json, with the variant file's sha256; returns the new manifest."""
    bundle = load_for_variant(root, variant.precision)
    manifest = bundle.manifest
    path = bundle.root / variant.file
    if not path.is_file():
        raise FileNotFoundError(f"bundle {bundle.root}: variant file {variant.file} does not exist")
    files = dict(manifest.files)
    for old in manifest.variants:
        if old.precision == variant.precision and old.file != variant.file:
            files.pop(old.file, None)
    files[variant.file] = sha256_of(path)
    variants = (*(v for v in manifest.variants if v.precision != variant.precision), variant)
    updated = Manifest.model_validate(manifest.model_dump() | {"files": files, "variants": variants})
    atomic_write(bundle.root / MANIFEST_NAME, updated.model_dump_json(indent=2) + "\n")
    if (bundle.root / SIGNATURE_NAME).exists():
        log.warning(
            f"{MANIFEST_NAME} changed, so {bundle.root / SIGNATURE_NAME} no longer matches it: sign the bundle "
            "again before shipping it (the updater refuses a bad signature)",
            extra={"event": "signature_stale", "bundle": str(bundle.root)},
        )
    log.info(
        f"recorded {variant.precision} variant {variant.file} in {MANIFEST_NAME}",
        extra={
            "event": "variant_recorded",
            "bundle": str(bundle.root),
            "file": variant.file,
            "sha256": files[variant.file][:12],
        },
    )
    return updated
