"""``edge-agent update``: install the fleet's model for this device without ever leaving it without a working one.

Steps (each one logged and published as an UpdateEvent on ``<prefix>/<device_id>/update``):

1. ``start``: take the lock, remove leftovers of interrupted runs, undo an unconfirmed switch.
2. ``fetch_index``: read latest.json, check its signature, expiry and serial (index.py), and pick the
   release for this device's rollout group; an older version than the current one is refused unless
   ``--allow-downgrade`` was given on the box; when latest.json sets a ``shadow_gate`` for the group, the
   version must first have run as this box's shadow model long enough, with enough agreement
   (edge_agent/inspection/shadow.py; skipped until then, ``--force`` overrides).
3. ``download``: stream the bundle tar into a staging directory (size-capped, timeout) and check its sha256.
4. ``unpack``: extract it safely (regular files only, nothing outside the staging directory, size caps).
5. ``verify``: the ed25519 signature of model.json under the fleet key, every file's sha256, the
   manifest schema, the version latest.json announced, and no file the manifest does not list.
6. ``load_engine``: build/load the engine for this device (TensorRT when configured, else ONNX Runtime).
7. ``self_test``: the bundle's good images through that engine and the NFA decision must be judged good.
8. ``install``: rename the staging directory to ``models/<version>`` (atomic).
9. ``switch``: point ``models/current`` at it (atomic symlink replace), remembering the previous version.
10. ``reload``/``health``: ask the running agent to reload and wait for healthy inspections with the new
    version; otherwise switch back, reload the old model and remember the version as failed.
11. ``prune``: keep the newest ``update.keep_versions`` versions (current and previous always kept).

A failure in steps 2-8 leaves ``current`` untouched. ``apply_update`` is the function the agent calls
(in a worker thread) for a ``cmd/update`` push; the command line wraps it.

A box with ``[[recipes]]`` (docs/recipes.md) updates its recipes one by one (``apply_recipe_updates``):
recipe ``r`` has its own models directory ``<state_dir>/recipes/r`` (its ``bundle`` must be that
directory's ``current``), takes the version latest.json's ``recipes`` table names for it, and goes through
the same steps; the agent reloads that recipe only (``cmd/reload`` with ``recipe``), and a recipe that is
not the active one is healthy once loaded and warmed up (no frame is judged by it until it is selected).
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from edge_agent.config import AgentSettings, ConfigError
from edge_agent.fleet.models_dir import ModelsDir, ModelsDirError, PendingSwitch, UpdateLocked
from edge_agent.fleet.update_mqtt import AgentControl, EventSink, MqttLink
from edge_agent.messages import UpdateEvent
from edge_agent.redact import redact_uri

if TYPE_CHECKING:  # the fleet index and signing load when an update runs
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from edge_agent.fleet.index import Release, ShadowGate

log = logging.getLogger(__name__)

# Called with each step's name as the updater reaches it (and "download:partial", "rollback"); None in
# production. The crash tests set it from a wrapper entry point (tests/paused_updater.py) to stop there.
on_checkpoint: Callable[[str], None] | None = None
TAR_NAME = "bundle.tar"
UNPACK_NAME = "bundle"

Status = Literal["updated", "current", "no_release", "skipped", "locked", "failed", "rolled_back"]
# Failures that depend on the bundle's content: the version is remembered and not retried without --force.
_CONTENT_STEPS = {"unpack", "verify", "load_engine", "self_test", "health"}


@dataclass(frozen=True)
class UpdateResult:
    """How an update run ended."""

    status: Status
    version: str | None = None
    previous: str | None = None
    step: str = ""
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("updated", "current", "no_release", "skipped")


class UpdateFailed(RuntimeError):
    """One step failed; ``step`` names it and the message says why."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(redact_uri(message))  # it ends up in the result, the log and on the broker
        self.step = step


class _Reporter:
    """Each step to the log and, when connected, to the ``update`` topic."""

    def __init__(self, device_id: str, sink: EventSink | None) -> None:
        self.device_id = device_id
        self.sink = sink
        self.version: str | None = None

    def __call__(self, step: str, ok: bool, message: str = "") -> None:
        # A fleet URL may carry credentials (https://user:token@host/): never in the log or on the broker.
        message = redact_uri(message)
        level = logging.INFO if ok else logging.ERROR
        log.log(
            level,
            "update %s: %s",
            step,
            message or ("ok" if ok else "failed"),
            extra={"event": "update_step", "step": step, "ok": ok, "version": self.version},
        )
        if self.sink is not None:
            event = UpdateEvent(
                device_id=self.device_id, time=time.time(), step=step, ok=ok, version=self.version, message=message
            )
            try:
                self.sink(event)
            except Exception as exc:  # reporting must never break an update
                log.warning("cannot publish update event: %s", exc, extra={"event": "update_event_failed"})


def _checkpoint(step: str) -> None:
    if on_checkpoint is not None:
        on_checkpoint(step)


@contextlib.contextmanager
def _step(name: str) -> Iterator[None]:
    """Run one step; any expected error becomes UpdateFailed naming the step."""
    from edge_agent.bundle import BundleError
    from edge_agent.engines import EngineUnavailable
    from edge_agent.fleet.index import FleetError
    from edge_agent.fleet.signing import SigningError
    from edge_agent.inspection.selftest import SelfTestError

    _checkpoint(name)
    try:
        yield
    except UpdateFailed:
        raise
    except (FleetError, SigningError, BundleError, SelfTestError, EngineUnavailable, ModelsDirError) as exc:
        raise UpdateFailed(name, str(exc)) from exc
    except OSError as exc:
        raise UpdateFailed(name, f"{exc.strerror or exc} ({exc.filename or 'no file'})") from exc


def models_dir_for(settings: AgentSettings, recipe: str | None = None) -> ModelsDir:
    """The models directory the agent runs from (``recipe``: that recipe's); refuses a config whose bundle
    bypasses it."""
    if recipe is not None:
        config = next((r for r in settings.recipes if r.name == recipe), None)
        if config is None:
            raise ConfigError(f"no recipe named {recipe!r} in [[recipes]]")
        models = ModelsDir(settings.state_dir / "recipes" / recipe)
        if Path(config.bundle) != models.current_link:
            raise ConfigError(
                f"recipe {recipe!r} has bundle = {config.bundle}, so the agent would not run updated models; fleet "
                f"updates switch {models.current_link} (set bundle to that path)"
            )
        return models
    models = ModelsDir(settings.state_dir / "models")
    if settings.model.bundle is not None and Path(settings.model.bundle) != models.current_link:
        raise ConfigError(
            f"model.bundle is {settings.model.bundle}, so the agent would not run updated models; fleet updates "
            f"switch {models.current_link} (remove model.bundle from the config)"
        )
    return models


def apply_update(
    settings: AgentSettings,
    *,
    source: str | None = None,
    group: str | None = None,
    force: bool = False,
    reload: bool = True,
    control: AgentControl | None = None,
    events: EventSink | None = None,
    allow_downgrade: bool = False,
    recipe: str | None = None,
) -> UpdateResult:
    """Run one fleet update for this device and say how it ended (never raises for update failures).

    ``recipe``: update that recipe of ``[[recipes]]`` (its models directory, its release in latest.json).

    ``control`` reaches the running agent (default: MQTT, cmd/reload); ``events`` receives every step
    (default: the ``update`` topic over the same MQTT connection). ``reload=False`` switches without
    asking the agent (first install, agent stopped). ``allow_downgrade`` (only from ``edge-agent update
    --allow-downgrade`` on the box, never from a broker command) permits a release older than the current
    model. Raises ConfigError for an unusable configuration.
    """
    models = models_dir_for(settings, recipe)
    link: MqttLink | None = None
    if control is None or events is None:
        link = MqttLink(settings.mqtt, settings.device_id, recipe)
        link.connect(timeout_s=min(10.0, settings.update.timeout_s))
        control = control or link
        events = events or link.publish_event
    report = _Reporter(settings.device_id, events)
    try:
        with models.lock():
            return _run_locked(settings, models, report, control, source, group, force, reload, allow_downgrade, recipe)
    except UpdateLocked as exc:
        report("start", False, str(exc))
        return UpdateResult("locked", step="start", message=str(exc))
    finally:
        if link is not None:
            link.close()


def _run_locked(
    settings: AgentSettings,
    models: ModelsDir,
    report: _Reporter,
    control: AgentControl,
    source: str | None,
    group: str | None,
    force: bool,
    reload: bool,
    allow_downgrade: bool = False,
    recipe: str | None = None,
) -> UpdateResult:
    from edge_agent.fleet.index import is_url, read_signed_index, tls_context
    from edge_agent.fleet.signing import load_public_key

    config = settings.update
    group = group or config.group
    source = source or config.source
    try:
        with _step("start"):
            models.clean_leftovers()
            _undo_unconfirmed_switch(models, report, control, settings, reload)
            if not source:
                raise UpdateFailed("start", "no fleet source: set update.source in the config or pass --source")
            if config.public_key is None:
                raise UpdateFailed(
                    "start", "update.public_key is not set; bundles cannot be verified without the fleet key"
                )
            public_key = load_public_key(config.public_key)
        report("start", True, f"checking {source} for group {group!r}" + (f", recipe {recipe!r}" if recipe else ""))
        context = tls_context(config.ca_file) if is_url(source) else None
        with _step("fetch_index"):
            index, location = read_signed_index(source, config.timeout_s, public_key, models.index_serial(), context)
            models.record_index_serial(index.serial)
            release = index.release_for_recipe(group, recipe) if recipe else index.release_for_group(group)
        if release is None:
            what = f"group {group!r}" + (f", recipe {recipe!r}" if recipe else "")
            report("fetch_index", True, f"latest.json rolls out nothing to {what}")
            return UpdateResult("no_release", message=f"no release for {what}")
        report.version = release.version
        current = models.current_version()
        if release.version == current:
            report("fetch_index", True, f"{current} is already the current model")
            _prune(models, config.keep_versions, (), report)
            return UpdateResult("current", version=current)
        if current is not None and not allow_downgrade and version_key(release.version) < version_key(current):
            message = (
                f"latest.json offers {release.version}, older than the current {current}; refusing the downgrade "
                "(an operator on the box can run `edge-agent update --allow-downgrade`)"
            )
            report("fetch_index", False, message)
            log.warning(message, extra={"event": "update_downgrade_refused", "version": release.version})
            return UpdateResult("skipped", version=release.version, previous=current, message=message)
        failed_before = models.failed_versions().get(release.version)
        if failed_before and not force:
            message = (
                f"{release.version} failed here before at {failed_before.get('step')}: {failed_before.get('reason')} "
                "(not retried; publish a new version or run `edge-agent update --force`)"
            )
            report("fetch_index", True, message)
            log.warning(message, extra={"event": "update_skipped", "version": release.version})
            return UpdateResult("skipped", version=release.version, previous=current, message=message)
        gate = None if recipe else index.shadow_gate_for(group)  # the shadow model is the groups' bundle's
        waiting = _shadow_gate_problem(gate, release.version, settings)
        if waiting is not None and not force:
            report("fetch_index", True, waiting)
            log.info(waiting, extra={"event": "update_waiting_for_shadow", "version": release.version})
            return UpdateResult("skipped", version=release.version, previous=current, message=waiting)
        report("fetch_index", True, f"group {group!r} -> {release.version} (current {current or 'none'})")
        root = _obtain_bundle(models, release, location, public_key, settings, context, report)
        if waiting is None and not force:
            # The version matched; now the exact model the signed bundle holds must be the one shadowed.
            waiting = _shadow_gate_problem(gate, release.version, settings, root)
            if waiting is not None:
                report("verify", True, waiting)
                log.warning(waiting, extra={"event": "update_waiting_for_shadow", "version": release.version})
                return UpdateResult("skipped", version=release.version, previous=current, message=waiting)
        _prove_on_this_device(root, settings, report)
        if root.parent != models.root:
            with _step("install"):
                root = _install(models, root, release.version)
            report("install", True, f"installed as {root}")
        return _switch_and_confirm(models, release.version, current, settings, report, control, reload)
    except UpdateFailed as exc:
        if exc.step in _CONTENT_STEPS and report.version:
            models.record_failure(report.version, exc.step, str(exc))
        report(exc.step, False, str(exc))
        return UpdateResult(
            "failed", version=report.version, previous=models.current_version(), step=exc.step, message=str(exc)
        )
    finally:
        models.clean_leftovers()


def _shadow_gate_problem(
    gate: ShadowGate | None, version: str, settings: AgentSettings, bundle_root: Path | None = None
) -> str | None:
    """Why the group's shadow requirement holds ``version`` back on this box (None: no requirement, or met).

    Before the download only the version can be compared (a cheap "not yet" that saves the download);
    with ``bundle_root`` (downloaded and signature-checked) the shadowed model's sha256 must be its."""
    if gate is None:
        return None
    from edge_agent.bundle import load_bundle
    from edge_agent.inspection.shadow import STATE_NAME, gate_problem

    sha256 = None
    if bundle_root is not None:
        try:
            sha256 = load_bundle(bundle_root).model_sha256(settings.model.precision)
        except (KeyError, ValueError, OSError) as exc:
            return f"waiting for shadow agreement: cannot tell the release's model ({exc})"
    problem = gate_problem(
        settings.state_dir / STATE_NAME, version, gate.hours, gate.min_agreement, gate.min_compared, sha256
    )
    return None if problem is None else f"waiting for shadow agreement: {problem}"


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key of a model version: dotted numbers compare as numbers ("1.10.0" > "1.9.2").

    Each run of digits is a number, each run of other characters (except the separators . _ + -) is text;
    a number sorts before text at the same place, so "2.0.0" > "2.0.0rc1" is not promised: publish
    plain dotted numbers when versions must order (docs/deploy.md).
    """
    parts: list[tuple[int, int | str]] = []
    for token in re.findall(r"\d+|[^\d._+-]+", version):
        parts.append((0, int(token)) if token.isdigit() else (1, token))
    return tuple(parts)


def _obtain_bundle(
    models: ModelsDir,
    release: Release,
    location: str,
    public_key: Ed25519PublicKey,
    settings: AgentSettings,
    context: ssl.SSLContext | None,
    report: _Reporter,
) -> Path:
    """A verified bundle directory for the release: an installed copy, or a fresh download in staging."""
    from edge_agent.fleet.index import download, progress_logger, resolve, safe_extract

    config = settings.update
    installed = models.version_dir(release.version)
    if installed.is_dir():
        try:
            with _step("verify"):
                _verify(installed, release.version, public_key)
            report("verify", True, f"{release.version} is already installed and verified; not downloading it again")
            return installed
        except UpdateFailed as exc:
            log.warning("installed copy is unusable, downloading again: %s", exc, extra={"event": "update_redownload"})
            models.discard(release.version)
    staging = models.new_staging_dir(release.version)
    url = resolve(location, release.url)
    max_bytes = config.max_bundle_mb * 1024 * 1024
    with _step("download"):
        report_progress = progress_logger(release.url)

        def progress(done: int, total: int) -> None:
            report_progress(done, total)
            _checkpoint("download:partial")

        download(url, staging / TAR_NAME, release.size, release.sha256, config.timeout_s, max_bytes, progress, context)
    report("download", True, f"{release.size} bytes, sha256 {release.sha256[:12]}… matches")
    with _step("unpack"):
        safe_extract(staging / TAR_NAME, staging / UNPACK_NAME, max_bytes)
        (staging / TAR_NAME).unlink()
    report("unpack", True)
    with _step("verify"):
        fingerprint = _verify(staging / UNPACK_NAME, release.version, public_key)
    report("verify", True, f"signed by fleet key {fingerprint}; all file hashes match")
    return staging / UNPACK_NAME


def _verify(root: Path, version: str, public_key: Ed25519PublicKey) -> str:
    from edge_agent.bundle import load_bundle
    from edge_agent.fleet.index import FleetError, check_only_listed_files
    from edge_agent.fleet.signing import verify_bundle_signature

    fingerprint = verify_bundle_signature(root, public_key)
    bundle = load_bundle(root)
    if bundle.manifest.version != version:
        raise FleetError(
            f"latest.json announces version {version} but the signed model.json says {bundle.manifest.version}; refusing it"
        )
    check_only_listed_files(root, bundle.manifest.files)
    return fingerprint


def _prove_on_this_device(root: Path, settings: AgentSettings, report: _Reporter) -> None:
    """Load the engine this device will run and pass the bundle's self-test on it."""
    from edge_agent.bundle import load_bundle
    from edge_agent.engines import create_engine
    from edge_agent.engines.tensorrt.prebuild import prebuild_plan
    from edge_agent.inspection.selftest import run_self_test

    bundle = load_bundle(root)
    with _step("load_engine"):
        prebuild_plan(bundle, settings.model)  # GPU boxes: build the new model's plan before the switch
        engine = create_engine(bundle, settings.model)
    report("load_engine", True, f"{engine.backend} {settings.model.precision} engine loaded")
    try:
        with _step("self_test"):
            results = run_self_test(bundle, engine, settings.nfa, require_images=settings.update.require_self_test)
    finally:
        engine.close()
    worst = max((r.image_score for r in results), default=0.0)
    report("self_test", True, f"{len(results)} good image(s) judged good (highest image score {worst:.3f})")


def _install(models: ModelsDir, root: Path, version: str) -> Path:
    staging = root.parent
    final = models.install(root, version)
    shutil.rmtree(staging, ignore_errors=True)
    return final


def _switch_and_confirm(
    models: ModelsDir,
    version: str,
    current: str | None,
    settings: AgentSettings,
    report: _Reporter,
    control: AgentControl,
    reload: bool,
) -> UpdateResult:
    config = settings.update
    with _step("switch"):
        models.write_pending(PendingSwitch(version=version, previous=current, started=time.time()))
        previous = models.switch_current(version)
    report("switch", True, f"models/current -> {version} (was {previous or 'none'})")
    with _step("reload"):
        running = reload and control.agent_running()
    if not running:
        why = "--no-reload" if not reload else "the agent is not running"
        report("reload", True, f"{why}: the agent loads {version} at its next start")
    else:
        report("reload", True, "asking the agent to reload")
        health = control.reload(version, config.health_timeout_s, config.health_inspections)
        if not health.ok:
            _roll_back(models, version, previous, health.message, report, control, config.health_timeout_s)
            return UpdateResult(
                "rolled_back", version=version, previous=previous, step="health", message=health.message
            )
        report("health", True, health.message)
    models.clear_pending()
    models.forget_failure(version)
    _prune(models, config.keep_versions, (previous,), report)
    report("done", True, f"{version} is the current model")
    return UpdateResult("updated", version=version, previous=previous, step="done")


def _roll_back(
    models: ModelsDir,
    version: str,
    previous: str | None,
    reason: str,
    report: _Reporter,
    control: AgentControl,
    timeout_s: float,
) -> None:
    report("health", False, reason)
    _checkpoint("rollback")
    if previous is not None:
        models.switch_current(previous)
        back = control.reload(previous, timeout_s, 1)
        note = "the agent runs it again" if back.ok else f"the agent did not confirm it: {back.message}"
        report("rollback", back.ok, f"models/current -> {previous}; {note}")
    else:
        models.current_link.unlink(missing_ok=True)
        report("rollback", True, "there was no previous model; models/current removed")
    models.record_failure(version, "health", reason)
    models.clear_pending()


def _undo_unconfirmed_switch(
    models: ModelsDir, report: _Reporter, control: AgentControl, settings: AgentSettings, reload: bool
) -> None:
    """An earlier run switched ``current`` and died before the agent confirmed it: switch back."""
    pending = models.read_pending()
    if pending is None:
        return
    current = models.current_version()
    if current == pending.version and pending.previous and models.version_dir(pending.previous).is_dir():
        models.switch_current(pending.previous)
        message = f"an interrupted update left {pending.version} unconfirmed; switched back to {pending.previous}"
        if reload and control.agent_running():
            control.reload(pending.previous, settings.update.health_timeout_s, 1)
        report("start", True, message)
    models.clear_pending()


def _prune(models: ModelsDir, keep: int, protect: tuple[str | None, ...], report: _Reporter) -> None:
    with _step("prune"):
        removed = models.prune(keep, protect)
    if removed:
        report("prune", True, f"removed {', '.join(removed)}; keeping {keep} version(s)")


def apply_recipe_updates(
    settings: AgentSettings,
    *,
    source: str | None = None,
    group: str | None = None,
    force: bool = False,
    reload: bool = True,
    allow_downgrade: bool = False,
) -> list[tuple[str, UpdateResult]]:
    """Update every recipe of ``[[recipes]]`` one by one, in the config's order (options as apply_update's);
    (recipe, result) each. One recipe's failure (rolled back, or refused) does not stop the next."""
    results: list[tuple[str, UpdateResult]] = []
    for config in settings.recipes:
        result = apply_update(
            settings,
            source=source,
            group=group,
            force=force,
            reload=reload,
            allow_downgrade=allow_downgrade,
            recipe=config.name,
        )
        log.info(
            "recipe update finished: %s %s",
            config.name,
            result.status,
            extra={"event": "recipe_update_finished", "recipe": config.name, "status": result.status,
                   "version": result.version, "detail": result.message},
        )  # fmt: skip
        results.append((config.name, result))
    return results
