"""The running agent: pipeline, MQTT publisher with its spool, commands, HTTP endpoints, supervision.

``run.py`` loads the model and opens the source; ``Agent.serve()`` then runs until the source ends or a
stop is asked, and owns everything that lives that long:

- the four-stage pipeline (pipeline.py) and the source's reconnects (frame_source.py);
- the publisher (mqtt.py) with the SQLite spool (spool.py) as its outbox;
- commands on ``cmd/<name>`` (commands.py): reload, snapshot, threshold, update;
- ``/metrics`` and ``/healthz`` (http_server.py, metrics.py, health.py) on ``http.host:http.port``;
- the line-to-model loop (service/loop.py): kept frames, drift, the shadow model, cmd/record, /review;
- the PLC's OPC UA and Modbus servers when ``[plc]`` enables them (edge_agent/plc/, docs/plc.md);
- the supervisor loop: systemd watchdog pings while every stage shows progress, the status line, and
  the ``stats`` topic every ``mqtt.stats_interval_s`` and at once when the source changes state.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from edge_agent.config import AgentSettings, ConfigError
from edge_agent.exit_codes import EXIT_FAILURE, EXIT_OK
from edge_agent.inspection.frame_source import FrameSource
from edge_agent.inspection.loaded_model import LoadedModel, ModelLoadError, load_model
from edge_agent.inspection.pipeline import FrameJob, Hooks, Pipeline
from edge_agent.inspection.scoring import DecisionRule, default_log10_epsilon
from edge_agent.messages import ReloadCommand, SnapshotCommand, StatsMessage, ThresholdCommand, UpdateCommand
from edge_agent.plc.bridge import PlcBridge
from edge_agent.publish.commands import CommandFailed, CommandProcessor, Done
from edge_agent.publish.mqtt import MqttPublisher
from edge_agent.publish.outbox import Outbox
from edge_agent.publish.spool import Spool
from edge_agent.service.agent_snapshot import SnapshotSources, snapshot_taker, stats_message, status_line
from edge_agent.service.health import HealthReport, assess
from edge_agent.service.http_server import HttpRequest, HttpResponse, HttpServer
from edge_agent.service.loop import LineLoop
from edge_agent.service.metrics import AgentMetrics
from edge_agent.service.part_inputs import PartInputs
from edge_agent.service.preview import PreviewFacts, PreviewPage
from edge_agent.systemd import SystemdNotifier

if TYPE_CHECKING:
    from edge_agent.fleet.update import UpdateResult
    from edge_agent.service.snapshot import SnapshotBudget

log = logging.getLogger(__name__)

STATUS_INTERVAL_S = 5.0
SUPERVISE_TICK_S = 0.5
JOIN_TIMEOUT_S = 30.0


class Agent:
    """One camera's inspection service (see the module docstring)."""

    def __init__(
        self,
        settings: AgentSettings,
        model: LoadedModel,
        source: FrameSource,
        notifier: SystemdNotifier | None = None,
        on_result: Callable[[FrameJob], None] | None = None,
        outbox: Outbox | None = None,
    ) -> None:
        """Raises SpoolError when the spool is held by another agent."""
        self.settings = settings
        self.notifier = notifier or SystemdNotifier()
        self.started = time.time()
        self._started_monotonic = time.monotonic()
        self.nfa_overrides = settings.nfa.model_copy()
        self.outbox: Outbox = outbox if outbox is not None else self._open_spool()
        self.publisher = MqttPublisher(settings.mqtt, settings.device_id, outbox=self.outbox)
        self.part_inputs = PartInputs(settings, self.publisher)
        self.pipeline = Pipeline(
            source,
            model,
            self.publisher,
            settings.device_id,
            parts=self.part_inputs.parts,
            triggers=self.part_inputs.triggers,
        )
        # Components first, then the views that read them (the snapshot, /metrics, /healthz, the preview).
        self.metrics = AgentMetrics()
        self.pipeline.add_observer(Hooks("metrics", frame=self.metrics.observe_frame))
        self.plc = PlcBridge.create(settings, self.part_inputs.triggers)  # None unless [plc] enables a server
        if self.plc is not None:
            self.pipeline.add_observer(Hooks("plc", part=self.plc.part_decided))
            self.part_inputs.missed_observers.append(self.plc.trigger_missed)
        self.commands = CommandProcessor(self.publisher.publish_result, on_handled=self.metrics.count_command)
        self.commands.register("reload", self.reload)
        self.commands.register("snapshot", self.snapshot)
        self.commands.register("threshold", self.set_threshold)
        self.commands.register("update", self.start_update)
        self.publisher.subscribe("cmd/+", self.commands.submit)
        self.loop = LineLoop(settings, self.pipeline)
        self.take_snapshot = snapshot_taker(
            SnapshotSources(
                device_id=settings.device_id,
                started=self._started_monotonic,
                stall_timeout_s=settings.source.stall_timeout_s,
                spool_max=settings.spool.max_messages,
                pipeline=self.pipeline,
                publisher=self.publisher,
                outbox=self.outbox,
                commands=self.commands,
                parts=self.part_inputs,
                loop=self.loop,
            )
        )
        self.metrics.watch(self.take_snapshot)
        self.preview: PreviewPage | None = None
        self.http = self._http_views() if settings.http.enabled else None
        self.loop.attach(self.http, self.metrics.registry.register, self.commands.register)
        # Source states in the order they happened (appended by the capture thread, published by the supervisor).
        self._source_states: deque[str] = deque(maxlen=64)
        source.on_state = lambda old, new, reason: self._source_states.append(new)
        self._update_thread: threading.Thread | None = None
        self._update_result: UpdateResult | None = None
        self._snapshots: SnapshotBudget | None = None
        if on_result is not None:  # the caller's observer runs last, after the agent's own
            self.pipeline.add_observer(Hooks("on_result", frame=on_result))

    def _http_views(self) -> HttpServer:
        """The HTTP server with /metrics, /healthz, the preview and POST /trigger (not started yet)."""
        config = self.settings.http
        http = HttpServer(
            config.host,
            config.port,
            idle_timeout_s=config.request_timeout_s,
            max_per_address=config.max_connections_per_address,
            allowed_hosts=config.allowed_hosts,
        )
        http.route("/metrics", self._metrics_route)
        http.route("/healthz", self._health_route)
        self.part_inputs.attach_http(http)
        if config.preview:
            live = (lambda: self.pipeline.last_frame) if self.settings.parts.mode == "triggered" else None
            self.preview = PreviewPage(
                lambda: self.pipeline.last_job,
                lambda: PreviewFacts.of(self.take_snapshot()),
                config.preview_max_fps,
                live_frame=live,
            )
            self.preview.register(http)
        return http

    @property
    def snapshots(self) -> SnapshotBudget:
        """The snapshot limits (made on first use: snapshot.py imports the drawing code)."""
        from edge_agent.service.snapshot import SnapshotBudget

        if self._snapshots is None:
            self._snapshots = SnapshotBudget(self.settings.snapshot)
        return self._snapshots

    def _open_spool(self) -> Spool:
        config = self.settings.spool
        assert config.path is not None
        return Spool(config.path, config.max_messages, config.commit_interval_s, config.synchronous)

    # -- running ------------------------------------------------------------------------------------

    def serve(self, stop: threading.Event) -> int:
        """Run until the source ends, ``stop`` is set or a stage fails; returns the exit status.

        Closes everything it was given (model, source) and everything it made on the way out.
        """
        try:
            self.publisher.start()
        except ConfigError:
            self.outbox.close()
            raise
        self.commands.start()
        self._start_http()
        self.part_inputs.start()
        try:
            if self.plc is not None:
                self.plc.start()  # before the frames: a trigger accepted now is served by the first ones
            self.loop.start()
            self.pipeline.start()
            self.notifier.ready(self.status_line())
            log.info(
                "agent ready",
                extra={
                    "event": "agent_ready",
                    "backend": self.model.ref.backend,
                    "model": self.model.ref.name,
                    "http_port": self.http.port if self.http else None,
                },
            )
            self._supervise(stop)
            self.pipeline.request_stop()
            if self.pipeline.error is not None:
                self.notifier.stopping(f"failed: {self.pipeline.error}")
            else:
                self.notifier.stopping("stopping: draining in-flight frames")
            if not self.pipeline.join(JOIN_TIMEOUT_S):
                log.error(
                    "pipeline did not stop in time", extra={"event": "pipeline_stuck", "timeout_s": JOIN_TIMEOUT_S}
                )
        finally:
            if self.plc is not None:
                self.plc.stop()
            self.part_inputs.stop()
            self.commands.stop()
            self.loop.stop()
            failed = self.pipeline.error is not None
            self.publisher.stop("offline" if failed else "stopped")
            if self.http is not None:
                self.http.stop()
            self.outbox.close()
            self.pipeline.model.close()
            self.pipeline.source.close()
        last = self.take_snapshot()
        summary = {
            "frames": last.frames_inspected,
            "anomalous": last.anomalous_frames,
            "dropped": last.frames_dropped,
            "ended": last.pipeline_ended,
            "published": last.inspections_published,
            "parts": last.parts.decided,
            "parts_anomalous": last.parts.anomalous,
            "acked": last.mqtt_acked,
            "left_in_spool": last.spool_depth,
        }
        log.info("edge agent stopped", extra={"event": "agent_stopped", "failed": failed, **summary})
        return EXIT_FAILURE if failed else EXIT_OK

    def _start_http(self) -> None:
        if self.http is None:
            return
        try:
            self.http.start()
        except OSError as exc:
            # Inspection matters more than its dashboard: run on, say why loudly.
            log.error(
                "cannot serve /metrics and /healthz: %s",
                exc,
                extra={"event": "http_failed", "host": self.settings.http.host, "port": self.settings.http.port},
            )
            self.http = None

    def _supervise(self, stop: threading.Event) -> None:
        """Until the pipeline ends or a stop is asked: watchdog pings, status lines, stats messages."""
        next_status = time.monotonic() + STATUS_INTERVAL_S
        next_stats = time.monotonic() + self.settings.mqtt.stats_interval_s
        stall_s = self.settings.source.stall_timeout_s
        while self.pipeline.running and not stop.is_set():
            self.commands.ensure_running()  # a worker that died is replaced (and counted in /healthz)
            self.part_inputs.tick()
            self.loop.tick()
            if self.pipeline.responsive(stall_s):
                self.notifier.watchdog()
            now = time.monotonic()
            states: list[str | None] = [self._source_states.popleft() for _ in range(len(self._source_states))]
            due_status, due_stats = now >= next_status, bool(states) or now >= next_stats
            if due_status or due_stats:
                snapshot = self.take_snapshot()  # one per round: the status line and the stats agree
                if due_status:
                    next_status = now + STATUS_INTERVAL_S
                    self.notifier.status(status_line(snapshot))
                if due_stats:
                    next_stats = now + self.settings.mqtt.stats_interval_s
                    health = assess(snapshot)
                    # One stats message per state change, so a dashboard sees reconnecting -> opening -> open.
                    for state in states or [None]:
                        self.publisher.publish_stats(stats_message(snapshot, health, state))
            stop.wait(SUPERVISE_TICK_S)
        if stop.is_set():
            log.info("stop requested", extra={"event": "stop_requested"})

    # -- views --------------------------------------------------------------------------------------

    @property
    def model(self) -> LoadedModel:
        return self.pipeline.model

    def health(self) -> HealthReport:
        """/healthz's verdict now."""
        return assess(self.take_snapshot())

    def stats_message(self, source_state: str | None = None) -> StatsMessage:
        """The ``stats`` payload now (``source_state`` overrides the current one: a change being reported)."""
        snapshot = self.take_snapshot()
        return stats_message(snapshot, assess(snapshot), source_state)

    def status_line(self) -> str:
        """One line for `systemctl status`: fps, model, source and broker state."""
        return status_line(self.take_snapshot())

    def _metrics_route(self, request: HttpRequest) -> HttpResponse:
        body, content_type = self.metrics.exposition()
        return HttpResponse(200, body, content_type)

    def _health_route(self, request: HttpRequest) -> HttpResponse:
        report = self.health()
        body = json.dumps(report.model_dump(mode="json"), indent=1).encode() + b"\n"
        return HttpResponse(200 if report.status == "ok" else 503, body, "application/json")

    # -- commands -----------------------------------------------------------------------------------

    def reload(self, command: ReloadCommand) -> Done:
        """Load model.bundle again fully, then swap; on any failure the old model keeps running."""
        from edge_agent.fleet.signing import SigningError, verify_installed_bundle

        path = self.settings.model.bundle
        assert path is not None
        try:
            verify_installed_bundle(path, self.settings.update.public_key)
            new = load_model(path, self.settings.model, self.nfa_overrides, live=self.pipeline.source.live)
        except (ModelLoadError, SigningError) as exc:
            raise CommandFailed(f"{exc}; still running {self.model.ref.name} {self.model.ref.version}") from exc
        if command.version is not None and new.ref.version != command.version:
            new.close()
            raise CommandFailed(
                f"{path} holds version {new.ref.version}, not the requested {command.version}; "
                f"still running {self.model.ref.version}"
            )
        self.notifier.reloading(f"reloading: {new.ref.name} {new.ref.version}")
        old = self.pipeline.swap_model(new)
        old.close()
        self.notifier.ready(self.status_line())
        log.info(
            "model reloaded",
            extra={
                "event": "model_reloaded",
                "old_version": old.ref.version,
                "version": new.ref.version,
                "seconds": new.load_s,
            },
        )
        return Done(
            f"now running {new.ref.name} {new.ref.version} (was {old.ref.version}); loaded in {new.load_s:.2f} s",
            {"model": new.ref.model_dump(), "previous": old.ref.model_dump(), "load_s": new.load_s},
        )

    def snapshot(self, command: SnapshotCommand) -> Done:
        """Save the last inspected frame with its maps under snapshot_dir."""
        from edge_agent.service.snapshot import SnapshotRefused, save_snapshot

        job = self.pipeline.last_job
        if job is None:
            raise CommandFailed("no frame has been inspected yet")
        assert self.settings.snapshot_dir is not None
        try:
            self.snapshots.claim(self.settings.snapshot_dir)
        except (SnapshotRefused, OSError) as exc:
            raise CommandFailed(str(exc)) from exc
        try:
            paths = save_snapshot(job, self.settings.snapshot_dir, command.label)
        except OSError as exc:
            raise CommandFailed(f"cannot write the snapshot under {self.settings.snapshot_dir}: {exc}") from exc
        return Done(
            f"frame {job.frame.sequence} saved in {paths['frame'].rsplit('/', 1)[0]}",
            {"sequence": job.frame.sequence, "files": paths},
        )

    def set_threshold(self, command: ThresholdCommand) -> Done:
        """Change the decision from the next frame on (kept across reloads, not across restarts)."""
        changes = command.model_dump(include={"log10_epsilon", "min_region_area"}, exclude_none=True)
        self._check_threshold_band(command)
        self.nfa_overrides = self.nfa_overrides.model_copy(update=changes)
        model = self.model
        rule = DecisionRule.from_bundle(model.bundle.manifest, self.nfa_overrides)
        model.scorer.rule = rule
        log.info("decision threshold changed", extra={"event": "threshold_changed", **changes})
        return Done(
            f"from the next frame: anomalous when a region has log10 NFA < {rule.log10_epsilon:g}"
            + (f" and at least {rule.min_area_source_px} source pixels" if rule.min_area_source_px else "")
            + " (not saved: set nfa.* in the config to keep it after a restart)",
            {"log10_epsilon": rule.log10_epsilon, "min_region_area": rule.min_area_source_px},
        )

    def _check_threshold_band(self, command: ThresholdCommand) -> None:
        """Refuse a change outside the configured band (nfa.command_band, nfa.command_max_region_area)."""
        nfa = self.settings.nfa
        if command.log10_epsilon is not None:
            centre = default_log10_epsilon(self.model.bundle.manifest, nfa.null_model)
            low, high = centre - nfa.command_band, centre + nfa.command_band
            if not low <= command.log10_epsilon <= high:
                raise CommandFailed(
                    f"log10_epsilon must lie in [{low:g}, {high:g}] (the bundle's {centre:g} +- nfa.command_band "
                    f"{nfa.command_band:g}); change nfa.log10_epsilon in the config on the box for more"
                )
        if command.min_region_area is not None and command.min_region_area > nfa.command_max_region_area:
            raise CommandFailed(
                f"min_region_area must be at most {nfa.command_max_region_area} source pixels "
                "(nfa.command_max_region_area); change nfa.min_region_area in the config on the box for more"
            )

    def start_update(self, command: UpdateCommand) -> Done:
        """Start a fleet update in a worker thread; progress goes to the ``update`` topic."""
        from edge_agent.fleet.update import apply_update, models_dir_for

        if self._update_thread is not None and self._update_thread.is_alive():
            raise CommandFailed("an update is already running")
        try:
            models_dir_for(self.settings)
        except ConfigError as exc:
            raise CommandFailed(str(exc)) from exc

        def work() -> None:
            try:
                # Source, group, --force and --allow-downgrade only from the box's config and command line.
                self._update_result = apply_update(self.settings)
            except Exception as exc:  # the update thread must report, never take the agent down
                log.exception("update failed", extra={"event": "update_crashed", "error": str(exc)})
                return
            result = self._update_result
            log.info(
                "update finished: %s",
                result.status,
                extra={
                    "event": "update_finished",
                    "status": result.status,
                    "version": result.version,
                    "detail": result.message,
                },
            )

        self._update_thread = threading.Thread(target=work, name="update", daemon=True)
        self._update_thread.start()
        return Done(f"update started; progress on {self.publisher.topic('update')}", {})
