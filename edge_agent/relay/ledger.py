"""The relay's ledger: what it decided, counted per ``Decision``, shared by the inspection and the part path.

One object, one lock: the per-camera tallies (received, anomalous, clock estimate, decisions), the
relay-wide decision counts, the good ids already seen (good messages are not journaled) and the
recent firing lateness. The intake gate (gate.py), the inspection decisions (relay.py), the part
decisions (parts.py) and the outcomes of firing all write here; ``stats`` is rendered from ``snapshot()``.

Counts are kept by ``Decision``, never by field name; ``Decision.counter`` names the stats field a
decision is rendered into (several may share one: ``failed`` and ``interrupted`` are both
``actuator_failures``), so a log line and a counter cannot disagree.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Collection
from dataclasses import dataclass, field

from edge_agent.messages import ModelRef, RelayDeviceStats, RelayStats
from edge_agent.relay.intake import MalformedMessage
from edge_agent.relay.report import Decision, quantile

GOOD_IDS_REMEMBERED = 4096  # good messages are not journaled; this catches their redeliveries for the counts
LATENESS_SAMPLES = 1000

# Counted per camera too (the decisions whose stats field RelayDeviceStats has); the rest only relay-wide.
PER_CAMERA = frozenset(d for d in Decision if d.counter in RelayDeviceStats.model_fields)
# May be counted without a camera: refused before the camera is known, or a belt topic over its budget.
WITHOUT_CAMERA = frozenset({Decision.MALFORMED, Decision.UNKNOWN_DEVICE, Decision.RATE_LIMITED, Decision.UNCONFIGURED})


@dataclass
class CameraTally:
    """One camera's figures since the relay started."""

    received: int = 0
    anomalous: int = 0
    clock_offset_s: float | None = None
    clock_source: str = ""
    clock_samples_refused: int = 0
    recipe: str | None = None  # of the camera's latest live message
    model_version: str | None = None
    decisions: Counter[Decision] = field(default_factory=Counter)

    def stats(self) -> RelayDeviceStats:
        """The camera's entry of the stats message."""
        return RelayDeviceStats.model_validate(
            {
                "received": self.received,
                "anomalous": self.anomalous,
                "clock_offset_s": self.clock_offset_s,
                "clock_source": self.clock_source,
                "clock_samples_refused": self.clock_samples_refused,
                "recipe": self.recipe,
                "model_version": self.model_version,
                **rendered(self.decisions, PER_CAMERA),
            }
        )


def rendered(counts: Counter[Decision], decisions: Collection[Decision]) -> dict[str, int]:
    """Decision counts as stats fields (every field of ``decisions`` present, 0 when none)."""
    fields = {d.counter: 0 for d in decisions if d.counter is not None}
    for decision, n in counts.items():
        if decision.counter in fields:
            fields[decision.counter] += n
    return fields


@dataclass(frozen=True)
class LedgerSnapshot:
    """A copy of the ledger, read outside its lock."""

    devices: dict[str, RelayDeviceStats]
    totals: dict[str, int]  # the relay-wide counts of the stats message
    lateness_ms: list[float]  # recent firing lateness, sorted

    def stats(self, relay_id: str, uptime_s: float, connected: bool, pending: int, journal_ok: bool) -> RelayStats:
        """The relay's ``stats`` message."""
        lateness_ms = self.lateness_ms
        return RelayStats(
            relay_id=relay_id,
            time=time.time(),
            uptime_s=round(uptime_s, 1),
            connected=connected,
            pending=pending,
            lateness_ms_p50=round(quantile(lateness_ms, 0.5), 3),
            lateness_ms_p99=round(quantile(lateness_ms, 0.99), 3),
            lateness_ms_max=round(lateness_ms[-1], 3) if lateness_ms else 0.0,
            devices=self.devices,
            journal_ok=journal_ok,
            **self.totals,
        )


class Ledger:
    """Counts, good ids and lateness of one relay; thread-safe (paho's thread, the actuator pool)."""

    def __init__(self, max_devices: int, listed: Collection[str] = ()) -> None:
        """``listed``: cameras configured under ``[devices]``, admitted beyond ``max_devices``."""
        self.max_devices = max_devices
        self.listed = frozenset(listed)
        self._lock = threading.Lock()
        self._cameras: dict[str, CameraTally] = {}
        self._counts: Counter[Decision] = Counter()  # relay-wide, every counted decision
        self._errors = 0  # messages the relay failed to handle (also counted malformed)
        self._good_ids: OrderedDict[str, None] = OrderedDict()
        self._lateness_ms: deque[float] = deque(maxlen=LATENESS_SAMPLES)
        self._part_cameras: set[str] = set()

    def admit(self, device: str) -> None:
        """Refuse a camera beyond ``max_devices`` (per-camera tallies and clock state stay bounded).

        Raises MalformedMessage (the message is then refused as malformed).
        """
        with self._lock:
            if device in self._cameras or device in self.listed:
                return
            if len(self._cameras) >= self.max_devices:
                raise MalformedMessage(
                    f"already {len(self._cameras)} cameras (max_devices); list {device!r} under [devices] "
                    "or raise max_devices"
                )
            self._cameras[device] = CameraTally()

    def received(
        self,
        device: str,
        offset_s: float,
        clock_source: str,
        refused: int | None = None,
        model: ModelRef | None = None,
    ) -> None:
        """One more message from a camera, with its clock estimate (and refused clock samples, when known) and,
        for a live message, the model that judged it (the stats show the camera's active recipe)."""
        with self._lock:
            tally = self._camera(device)
            tally.received += 1
            if model is not None:
                tally.recipe, tally.model_version = model.recipe, model.version
            tally.clock_offset_s, tally.clock_source = round(offset_s, 6), clock_source
            if refused is not None:
                tally.clock_samples_refused = refused

    def anomalous(self, device: str) -> None:
        """One more anomalous message (or part) from a camera, whatever is decided for it."""
        with self._lock:
            self._camera(device).anomalous += 1

    def count(self, decision: Decision, device: str | None = None) -> int:
        """One more ``decision`` (for ``device``, per camera where the stats have the field); returns the
        relay-wide count of that decision."""
        if decision.counter is None:
            raise ValueError(f"{decision} is not counted")
        if device is None and decision not in WITHOUT_CAMERA:
            raise ValueError(f"{decision} is counted per camera: name the device")
        with self._lock:
            self._counts[decision] += 1
            if device is not None and decision in PER_CAMERA:
                self._camera(device).decisions[decision] += 1
            return self._counts[decision]

    def fired(self, device: str, lateness_ms: float) -> None:
        """One more reject fired, ``lateness_ms`` after its planned time."""
        with self._lock:
            self._counts[Decision.FIRED] += 1
            self._camera(device).decisions[Decision.FIRED] += 1
            self._lateness_ms.append(lateness_ms)

    def internal_error(self) -> None:
        """A message the relay failed to handle: counted as an error and as malformed (it is acknowledged)."""
        with self._lock:
            self._errors += 1
            self._counts[Decision.MALFORMED] += 1

    def first_good(self, key: str) -> bool:
        """True the first time a good message id (or part key) is seen: good ones are not journaled, this
        catches their redeliveries for the counts."""
        with self._lock:
            if key in self._good_ids:
                return False
            self._good_ids[key] = None
            if len(self._good_ids) > GOOD_IDS_REMEMBERED:
                self._good_ids.popitem(last=False)
            return True

    def note_part_camera(self, device: str) -> None:
        """``device`` sends part messages: from now on they decide its rejects, not its inspections."""
        with self._lock:
            self._part_cameras.add(device)

    def sends_parts(self, device: str) -> bool:
        """True once ``device`` sent a part message (since the relay started)."""
        with self._lock:
            return device in self._part_cameras

    def totals(self, journal_errors: int) -> dict[str, int]:
        """The relay-wide counts of the stats message (and of the ``relay_stopped`` line)."""
        with self._lock:
            return self._totals(journal_errors)

    def snapshot(self, journal_errors: int) -> LedgerSnapshot:
        """Everything ``stats`` needs, copied under the lock."""
        with self._lock:
            devices = {name: tally.stats() for name, tally in self._cameras.items()}
            return LedgerSnapshot(devices, self._totals(journal_errors), sorted(self._lateness_ms))

    def _totals(self, journal_errors: int) -> dict[str, int]:
        totals = {
            "received": sum(t.received for t in self._cameras.values()),
            "anomalous": sum(t.anomalous for t in self._cameras.values()),
            **rendered(self._counts, list(Decision)),
            "errors": self._errors,
            "journal_errors": journal_errors,
        }
        return totals

    def _camera(self, device: str) -> CameraTally:
        """Called with the lock held."""
        return self._cameras.setdefault(device, CameraTally())
