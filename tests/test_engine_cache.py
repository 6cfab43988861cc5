"""The TensorRT plan cache: keys, sidecars, and refusing plans that do not belong to this device."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from edge_agent.engines.tensorrt.cache import (
    DeviceIdentity,
    EngineCache,
    EngineKey,
    new_metadata,
)
from edge_agent.fileio import atomic_write, sha256_bytes, sha256_file

ORIN = DeviceIdentity("Orin", "8.7", "10.3.0")
RTX = DeviceIdentity("NVIDIA GeForce RTX 4090", "8.9", "10.3.0")
SHA = "ab" * 32
PLAN = b"\x00plan bytes\xff" * 100


def _store(cache: EngineCache, device: DeviceIdentity = ORIN, precision: str = "fp16", plan: bytes = PLAN) -> EngineKey:
    key = EngineKey.for_device(device, SHA, precision, recipe=f"{precision}-flag")
    cache.store(key, plan, new_metadata(key, plan, 12.5, "model.onnx", "tile", "1.0", {"workspace_mb": 1024}))
    return key


def test_key_digest_is_stable_and_covers_every_field() -> None:
    key = EngineKey.for_device(ORIN, SHA, "int8", "int8-qdq")
    assert key.digest() == EngineKey.for_device(ORIN, SHA, "int8", "int8-qdq").digest()
    variants = [
        replace(key, onnx_sha256="cd" * 32),
        replace(key, gpu_name="Orin Nano"),
        replace(key, compute_capability="8.6"),
        replace(key, tensorrt_version="10.3.1"),
        replace(key, precision="fp16"),
        replace(key, recipe="int8-calibrator"),
    ]
    stems = {key.file_stem()} | {v.file_stem() for v in variants}
    assert len(stems) == 1 + len(variants)
    assert key.file_stem().startswith(SHA[:12] + "-int8-orin-sm87-trt10.3.0-")


def test_store_then_load_round_trip(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "engines")
    key = _store(cache)
    found = cache.load(key)
    assert found.plan == PLAN
    assert found.metadata is not None and found.metadata.bundle_name == "tile"
    assert found.metadata.builder == {"workspace_mb": 1024}
    sidecar = json.loads(cache.metadata_path(key).read_text())
    assert sidecar["key"]["gpu_name"] == "Orin" and sidecar["plan_bytes"] == len(PLAN)
    assert [p.name for p in (tmp_path / "engines").iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_plan_for_another_gpu_is_not_loaded_and_the_reason_names_it(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    _store(cache, device=RTX)
    found = cache.load(EngineKey.for_device(ORIN, SHA, "fp16", "fp16-flag"))
    assert found.plan is None
    assert "no plan built for fp16 on Orin" in found.reason
    assert "RTX 4090" in found.reason  # the plan that exists is for another device


def test_plan_for_another_tensorrt_version_is_not_loaded(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    _store(cache)
    upgraded = replace(ORIN, tensorrt_version="10.4.0")
    assert cache.load(EngineKey.for_device(upgraded, SHA, "fp16", "fp16-flag")).plan is None


def test_plan_copied_under_this_devices_name_is_refused(tmp_path: Path) -> None:
    """A plan dir copied from another machine and renamed still carries its sidecar's key."""
    cache = EngineCache(tmp_path)
    foreign = _store(cache, device=RTX)
    mine = EngineKey.for_device(ORIN, SHA, "fp16", "fp16-flag")
    cache.plan_path(foreign).rename(cache.plan_path(mine))
    cache.metadata_path(foreign).rename(cache.metadata_path(mine))
    found = cache.load(mine)
    assert found.plan is None
    assert "built for another device" in found.reason and "RTX 4090" in found.reason


def test_corrupt_plan_is_refused(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    key = _store(cache)
    cache.plan_path(key).write_bytes(PLAN[:-10])
    found = cache.load(key)
    assert found.plan is None and "corrupt" in found.reason


@pytest.mark.parametrize("sidecar", [None, b"{not json", b'{"schema_version": 1}'])
def test_missing_or_broken_sidecar_is_refused(tmp_path: Path, sidecar: bytes | None) -> None:
    cache = EngineCache(tmp_path)
    key = _store(cache)
    if sidecar is None:
        cache.metadata_path(key).unlink()
    else:
        cache.metadata_path(key).write_bytes(sidecar)
    found = cache.load(key)
    assert found.plan is None and "sidecar" in found.reason


def test_store_rejects_metadata_of_another_plan(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    key = EngineKey.for_device(ORIN, SHA, "fp16", "fp16-flag")
    with pytest.raises(ValueError, match="plan_sha256"):
        cache.store(key, PLAN, new_metadata(key, b"other", 1.0, "model.onnx"))
    other = replace(key, precision="int8")
    with pytest.raises(ValueError, match="precision"):
        cache.store(key, PLAN, new_metadata(other, PLAN, 1.0, "model.onnx"))
    assert not cache.plan_path(key).exists()


def test_rebuild_replaces_plan_and_remove_deletes_both(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    key = _store(cache)
    _store(cache, plan=b"rebuilt")
    assert cache.load(key).plan == b"rebuilt"
    assert len(cache.plans_for_model(SHA)) == 1
    cache.remove(key)
    assert not cache.plan_path(key).exists() and not cache.metadata_path(key).exists()


def test_timing_cache_is_per_gpu_and_tensorrt_version(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    paths = {cache.timing_cache_path(d) for d in (ORIN, RTX, replace(ORIN, tensorrt_version="11.0.0"))}
    assert len(paths) == 3
    assert all(p.parent == tmp_path for p in paths)


def test_atomic_write_replaces_content(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.bin"
    atomic_write(target, b"one")
    atomic_write(target, "two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]
    assert sha256_file(target) == sha256_bytes(b"two")


def test_atomic_write_keeps_the_old_content_when_writing_fails(tmp_path: Path) -> None:
    from edge_agent.fileio import atomic_writer

    target = tmp_path / "file.bin"
    atomic_write(target, b"old")
    with pytest.raises(RuntimeError), atomic_writer(target) as handle:
        handle.write(b"half")
        raise RuntimeError("disk gone")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]  # no temporary file left behind


def test_atomic_write_creates_with_the_given_mode(tmp_path: Path) -> None:
    import stat

    atomic_write(tmp_path / "secret", b"k", mode=0o600)
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600
