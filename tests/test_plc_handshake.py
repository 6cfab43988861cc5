"""The smart-camera handshake on its own (edge_agent/plc/handshake.py): busy, ack order, the bounded queue."""

from __future__ import annotations

import pytest

from edge_agent.inspection.triggers import Trigger, TriggerBook, missed_message
from edge_agent.messages import PartFrames, PartMessage
from edge_agent.plc.handshake import PlcHandshake, PlcRefused, PlcState, RefusalCode, ResultStatus


def part(part_id: str, anomalous: bool = False) -> PartMessage:
    return PartMessage(
        device_id="cam1",
        part_id=part_id,
        mode="triggered",
        anomalous=anomalous,
        log_nfa=-7.5 if anomalous else 0.5,
        log10_epsilon=0.0,
        first_capture_time=1.0,
        decision_time=1.0,
        frames=PartFrames(count=1, first_sequence=1, last_sequence=1),
        latency_ms=12.5,
    )


def plc_trigger(index: int) -> Trigger:
    """A trigger the PLC sent (as the book hands it to the frame that serves it)."""
    return Trigger(1.0 + index, "opcua", str(index))


def online(bound: int = 3) -> tuple[PlcHandshake, TriggerBook, list[PlcState]]:
    book = TriggerBook(0.0, 1.0)
    handshake = PlcHandshake(book, bound)
    seen: list[PlcState] = []
    handshake.listen(seen.append)
    handshake.set_online(True)
    return handshake, book, seen


def test_a_trigger_while_busy_is_refused_counted_and_the_first_one_still_served() -> None:
    handshake, book, _ = online()
    first = handshake.trigger(7, "opcua")
    assert book.waiting == 1 and handshake.state().busy and not handshake.state().trigger_ready
    with pytest.raises(PlcRefused) as refused:
        handshake.trigger(8, "opcua")
    assert refused.value.code == RefusalCode.BUSY
    state = handshake.state()
    assert state.counters.trigger_errors == 1 and state.counters.triggers == 1
    assert state.last_error_code == RefusalCode.BUSY and "7" in state.last_error
    assert book.waiting == 1  # the refused trigger never reached the book
    handshake.part_decided(first, part("p7", anomalous=True))
    state = handshake.state()
    assert not state.busy and state.trigger_ready and state.results_valid
    assert state.result is not None and state.result.trigger_id == 7 and not state.result.passed
    assert state.counters.ng == 1 and state.result.regions == 0 and state.result.processing_ms == 12.5


def test_offline_and_out_of_range_ids_are_refused() -> None:
    handshake = PlcHandshake(TriggerBook(0.0, 1.0), 2)
    with pytest.raises(PlcRefused) as offline:
        handshake.trigger(1, "modbus")
    assert offline.value.code == RefusalCode.OFFLINE
    handshake.set_online(True)
    with pytest.raises(PlcRefused) as bad:
        handshake.trigger(2**32, "modbus")
    assert bad.value.code == RefusalCode.BAD_TRIGGER_ID
    assert handshake.state().counters.trigger_errors == 2


def test_results_wait_for_the_ack_handshake_in_order_and_valid_falls_before_the_next() -> None:
    handshake, _, seen = online(bound=5)
    for index in range(3):
        handshake.part_decided(plc_trigger(index), part(f"p{index}"))
    assert handshake.state().result.part_id == "p0" and handshake.state().queued == 2  # type: ignore[union-attr]
    presented = []
    for _ in range(3):
        state = handshake.state()
        assert state.results_valid
        presented.append(state.result.part_id)  # type: ignore[union-attr]
        handshake.ack(True)
        assert not handshake.state().results_valid  # the PLC sees it fall before it clears the ack
        if len(presented) == 1:  # a part decided while the ack is high waits its turn
            handshake.part_decided(plc_trigger(99), part("late1"))
        handshake.ack(False)
    assert presented == ["p0", "p1", "p2"]
    assert handshake.state().result.part_id == "late1"  # type: ignore[union-attr]
    # Every listener state where ResultsValid is true holds a result whose sequence only grows.
    sequences = [s.result.sequence for s in seen if s.results_valid and s.result is not None]
    assert sequences == sorted(sequences)


def test_a_plc_that_never_acks_loses_the_oldest_waiting_results_counted_never_blocks() -> None:
    handshake, _, _ = online(bound=3)
    for index in range(10):
        handshake.part_decided(plc_trigger(index), part(f"p{index}"))
    state = handshake.state()
    assert state.result.part_id == "p0" and state.queued == 3 and state.counters.overflow == 6  # type: ignore[union-attr]
    assert state.counters.ok == 10  # every part was counted, none waited
    handshake.ack(True)
    handshake.ack(False)
    assert handshake.state().result.part_id == "p7"  # type: ignore[union-attr]


def test_parts_of_other_trigger_sources_are_not_the_plcs() -> None:
    handshake, _, _ = online()
    handshake.part_decided(Trigger(1.0, "mqtt", "m1"), part("m1"))
    handshake.part_decided(None, part("tracked"))
    state = handshake.state()
    assert not state.results_valid and state.result is None and state.counters.ok == 0


def test_a_missed_plc_trigger_frees_busy_and_is_reported_as_no_frame() -> None:
    handshake, book, _ = online()
    trigger = handshake.trigger(41, "modbus")
    (late,) = book.expired(now=trigger.time + 5)
    handshake.trigger_missed(late, missed_message("cam1", late))
    state = handshake.state()
    assert not state.busy and state.counters.missed == 1
    assert state.result is not None and state.result.status == ResultStatus.NO_FRAME
    assert state.result.trigger_id == 41 and not state.result.passed
    other = Trigger(trigger.time, "mqtt", "x")
    handshake.trigger_missed(other, missed_message("cam1", other))  # not the PLC's: not its business
    assert handshake.state().counters.missed == 1


def test_only_recipe_zero_exists_until_recipes_are_built() -> None:
    handshake, _, _ = online()
    handshake.select_recipe(0)
    with pytest.raises(PlcRefused) as refused:
        handshake.select_recipe(3)
    assert refused.value.code == RefusalCode.BAD_RECIPE and handshake.state().recipe_active == 0
