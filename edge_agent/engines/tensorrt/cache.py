"""Where TensorRT plans live on the device, and whether one may be loaded. Pure Python, no TensorRT.

A TensorRT plan only runs on the GPU model and TensorRT version it was built with, so a plan is keyed
by (ONNX sha256, GPU name, compute capability, SM count, memory, TensorRT version, precision, build
recipe). The SM count and memory tell apart modules that share a name and compute capability (Jetson
Orin Nano 4/8 GB, Orin NX 8/16 GB, AGX Orin 32/64 GB all report "Orin", sm 8.7), whose tactic timings
and workspace limits differ. The file
name carries a digest of the whole key, and a JSON sidecar beside each plan records the key and the
plan's own sha256. A plan whose sidecar is missing, names another device or does not match the plan
bytes is never loaded: the caller rebuilds it. The sidecar is written after the plan, so a build
interrupted half-way leaves nothing loadable behind.

The builder's timing cache (per GPU model and TensorRT version) lives in the same directory.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_agent.fileio import atomic_write, sha256_bytes

METADATA_SCHEMA = 1
PLAN_SUFFIX = ".plan"
METADATA_SUFFIX = ".json"


@dataclass(frozen=True)
class DeviceIdentity:
    """What a plan is tied to besides the model: the GPU and the TensorRT version."""

    gpu_name: str
    compute_capability: str  # "8.7"
    tensorrt_version: str
    sm_count: int = 0  # streaming multiprocessors; 0 = unknown
    memory_gib: int = 0  # total device memory, rounded to GiB; 0 = unknown

    def describe(self) -> str:
        size = f", {self.sm_count} SMs, {self.memory_gib} GiB" if self.sm_count or self.memory_gib else ""
        return f"{self.gpu_name} (sm {self.compute_capability}{size}), TensorRT {self.tensorrt_version}"


@dataclass(frozen=True)
class EngineKey:
    """Everything that makes two plans interchangeable."""

    onnx_sha256: str
    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    precision: str
    recipe: str  # how the precision was obtained, e.g. "fp16-typed", "int8-qdq-typed"
    sm_count: str = ""  # strings like every key field (the sidecar stores the key as str -> str)
    memory_gib: str = ""

    @classmethod
    def for_device(cls, device: DeviceIdentity, onnx_sha256: str, precision: str, recipe: str) -> EngineKey:
        return cls(
            onnx_sha256=onnx_sha256,
            gpu_name=device.gpu_name,
            compute_capability=device.compute_capability,
            tensorrt_version=device.tensorrt_version,
            precision=precision,
            recipe=recipe,
            sm_count=str(device.sm_count) if device.sm_count else "",
            memory_gib=str(device.memory_gib) if device.memory_gib else "",
        )

    def digest(self) -> str:
        """A short stable hash of the whole key."""
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return sha256_bytes(canonical.encode())[:16]

    def file_stem(self) -> str:
        """A readable, unique file name stem: model, precision, GPU, TensorRT, digest."""
        sm = self.compute_capability.replace(".", "")
        return f"{self.onnx_sha256[:12]}-{self.precision}-{_slug(self.gpu_name)}-sm{sm}-trt{self.tensorrt_version}-{self.digest()}"

    def differences(self, other: EngineKey) -> list[str]:
        """``field: mine != theirs`` for every field that differs."""
        return [
            f"{f.name}: {getattr(other, f.name)!r} != {getattr(self, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


class EngineMetadata(BaseModel):
    """The JSON sidecar of one plan."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = METADATA_SCHEMA
    key: dict[str, str]
    plan_sha256: str
    plan_bytes: int = Field(ge=0)
    created: datetime
    build_seconds: float = Field(ge=0)
    onnx_file: str
    bundle_name: str = ""
    bundle_version: str = ""
    builder: dict[str, object] = Field(default_factory=dict, description="flags, workspace, typing, TensorRT API used")

    def engine_key(self) -> EngineKey:
        return EngineKey(**self.key)


@dataclass(frozen=True)
class CachedPlan:
    """The outcome of a cache look-up: the verified plan bytes, or why there are none."""

    plan: bytes | None
    reason: str
    path: Path
    metadata: EngineMetadata | None = None


class EngineCache:
    """A directory of plans with sidecars, plus the timing caches."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def plan_path(self, key: EngineKey) -> Path:
        return self.root / f"{key.file_stem()}{PLAN_SUFFIX}"

    def metadata_path(self, key: EngineKey) -> Path:
        return self.root / f"{key.file_stem()}{METADATA_SUFFIX}"

    def timing_cache_path(self, device: DeviceIdentity) -> Path:
        """Timing measurements are only valid on the same GPU model (SM count included) and TensorRT version."""
        sm = device.compute_capability.replace(".", "")
        size = f"-{device.sm_count}sm-{device.memory_gib}g" if device.sm_count or device.memory_gib else ""
        return self.root / f"timing-{_slug(device.gpu_name)}-sm{sm}{size}-trt{device.tensorrt_version}.cache"

    def load(self, key: EngineKey) -> CachedPlan:
        """The plan for exactly this key, verified against its sidecar; else None and the reason."""
        plan_path = self.plan_path(key)
        if not plan_path.is_file():
            size = f" ({key.sm_count} SMs, {key.memory_gib} GiB)" if key.sm_count or key.memory_gib else ""
            reason = f"no plan built for {key.precision} on {key.gpu_name}{size} with TensorRT {key.tensorrt_version}"
            others = self.plans_for_model(key.onnx_sha256)
            if others:
                built = "; ".join(_describe_key(m.engine_key()) for m in others)
                reason += f" (plans exist for other devices or settings: {built})"
            return CachedPlan(None, reason, plan_path)
        metadata = self.read_metadata(self.metadata_path(key))
        if metadata is None:
            return CachedPlan(
                None, f"{plan_path.name} has no readable metadata sidecar (interrupted build?)", plan_path
            )
        recorded = metadata.engine_key()
        if recorded != key:
            diff = "; ".join(key.differences(recorded))
            return CachedPlan(None, f"{plan_path.name} was built for another device or model ({diff})", plan_path)
        plan = plan_path.read_bytes()
        actual = sha256_bytes(plan)
        if actual != metadata.plan_sha256:
            return CachedPlan(
                None,
                f"{plan_path.name} is corrupt (sha256 {actual[:12]}…, sidecar says {metadata.plan_sha256[:12]}…)",
                plan_path,
            )
        return CachedPlan(plan, "cached plan matches this device", plan_path, metadata)

    def store(self, key: EngineKey, plan: bytes, metadata: EngineMetadata) -> Path:
        """Write the plan, then its sidecar (the sidecar's presence marks the plan complete)."""
        if metadata.engine_key() != key:
            raise ValueError(f"metadata key does not match: {'; '.join(key.differences(metadata.engine_key()))}")
        if metadata.plan_sha256 != sha256_bytes(plan):
            raise ValueError("metadata plan_sha256 does not match the plan bytes")
        self.metadata_path(key).unlink(missing_ok=True)
        atomic_write(self.plan_path(key), plan)
        atomic_write(self.metadata_path(key), metadata.model_dump_json(indent=2) + "\n")
        return self.plan_path(key)

    def read_metadata(self, path: Path) -> EngineMetadata | None:
        """A sidecar, or None when missing or unreadable."""
        try:
            return EngineMetadata.model_validate_json(path.read_bytes())
        except (OSError, ValidationError, ValueError):
            return None

    def plans_for_model(self, onnx_sha256: str) -> list[EngineMetadata]:
        """Sidecars of every plan built from this ONNX file, on any device."""
        if not self.root.is_dir():
            return []
        found = []
        for path in sorted(self.root.glob(f"{onnx_sha256[:12]}-*{METADATA_SUFFIX}")):
            metadata = self.read_metadata(path)
            if metadata is not None and metadata.key.get("onnx_sha256") == onnx_sha256:
                found.append(metadata)
        return found

    def remove(self, key: EngineKey) -> None:
        """Delete a plan and its sidecar (sidecar first, so a half-deleted plan is never loadable)."""
        self.metadata_path(key).unlink(missing_ok=True)
        self.plan_path(key).unlink(missing_ok=True)


def new_metadata(
    key: EngineKey,
    plan: bytes,
    build_seconds: float,
    onnx_file: str,
    bundle_name: str = "",
    bundle_version: str = "",
    builder: dict[str, object] | None = None,
) -> EngineMetadata:
    """The sidecar for a freshly built plan."""
    return EngineMetadata(
        key={f.name: getattr(key, f.name) for f in fields(key)},
        plan_sha256=sha256_bytes(plan),
        plan_bytes=len(plan),
        created=datetime.now(timezone.utc),
        build_seconds=round(build_seconds, 3),
        onnx_file=onnx_file,
        bundle_name=bundle_name,
        bundle_version=bundle_version,
        builder=builder or {},
    )


def _describe_key(key: EngineKey) -> str:
    size = f" ({key.sm_count} SMs, {key.memory_gib} GiB)" if key.sm_count or key.memory_gib else ""
    return (
        f"{key.precision}/{key.recipe} on {key.gpu_name} sm {key.compute_capability}{size} "
        f"TensorRT {key.tensorrt_version}"
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "gpu"
