"""The relay's SQLite journal: a message id is claimed once, across reopening the file; bounded retention."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edge_agent.relay.dedupe import FINAL_STATES, DecisionJournal, JournalError
from edge_agent.relay.report import Decision


def test_an_id_is_claimed_once_even_after_reopening(tmp_path: Path) -> None:
    path = tmp_path / "state" / "relay.sqlite"
    journal = DecisionJournal(path, retention_s=3600)
    assert journal.claim("a", "cam1", 1, "scheduled", 10.0, 10.05, '{"x": 1}', {"planned_time": 10.0})
    assert not journal.claim("a", "cam1", 1, "missed")
    journal.close()
    reopened = DecisionJournal(path, retention_s=3600)
    assert not reopened.claim("a", "cam2", 7, "scheduled")
    assert reopened.state_of("a") == "scheduled" and reopened.state_of("b") is None
    [entry] = reopened.entries("scheduled")
    assert (entry.device_id, entry.sequence, entry.planned, entry.deadline) == ("cam1", 1, 10.0, 10.05)
    assert entry.message == '{"x": 1}' and entry.plan == {"planned_time": 10.0}


def test_firing_is_a_one_way_step(tmp_path: Path) -> None:
    journal = DecisionJournal(tmp_path / "j.sqlite", retention_s=3600)
    journal.claim("a", "cam1", 1, "scheduled", 1.0, 2.0, "{}")
    assert journal.begin_firing("a")
    assert not journal.begin_firing("a")  # a second worker (or a resumed run) cannot fire it again
    assert [e.message_id for e in journal.entries("firing")] == ["a"]
    journal.finish("a", "fired", fired=1.001)
    assert journal.state_of("a") == "fired"
    [entry] = journal.entries("fired")
    assert entry.message is None  # the message body is not kept once decided
    with pytest.raises(ValueError, match="not a final journal state"):
        journal.finish("a", "scheduled")
    with pytest.raises(ValueError, match="unknown journal state"):
        journal.claim("b", "cam1", 2, "maybe")


def test_prune_forgets_old_decisions_but_never_scheduled_ones(tmp_path: Path) -> None:
    journal = DecisionJournal(tmp_path / "j.sqlite", retention_s=100)
    journal.claim("old-fired", "cam1", 1, "scheduled", 1.0, 2.0, "{}")
    journal.finish("old-fired", "fired", 1.0)
    journal.claim("old-scheduled", "cam1", 2, "scheduled", 1.0, 2.0, "{}")
    journal.claim("new", "cam1", 3, "missed")
    assert len(journal) == 3
    assert journal.prune(now=time.time() + 50) == 0
    assert journal.prune(now=time.time() + 150) == 2
    assert journal.state_of("old-scheduled") == "scheduled" and len(journal) == 1


def test_meta_values_round_trip(tmp_path: Path) -> None:
    journal = DecisionJournal(tmp_path / "j.sqlite", retention_s=100)
    assert journal.get_meta("topics") is None
    journal.set_meta("topics", ["a/+/inspection"])
    journal.set_meta("topics", ["b/+/inspection"])
    assert journal.get_meta("topics") == ["b/+/inspection"]


def test_unusable_location_is_a_clear_error(tmp_path: Path) -> None:
    # The state directory's parent is a file (a typo in state_dir): even root cannot create it.
    (tmp_path / "not-a-dir").write_text("x")
    with pytest.raises(JournalError, match=r"cannot open the relay journal .*not-a-dir/state/relay\.sqlite"):
        DecisionJournal(tmp_path / "not-a-dir" / "state" / "relay.sqlite", retention_s=100)


def test_every_final_journal_state_is_a_decision_the_log_and_counters_spell_the_same() -> None:
    # The journal keeps its states as text (its file format); each final one is a relay Decision, so a
    # journaled outcome, its log line's ``decision`` and its stats counter share one spelling.
    assert [Decision(state).value for state in FINAL_STATES] == list(FINAL_STATES)
    assert all(Decision(state).counter is not None for state in FINAL_STATES)
