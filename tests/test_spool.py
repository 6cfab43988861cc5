"""The SQLite spool on real files: order, restart replay, expiry, bound, damage, disk full, one owner."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mqtt_broker import Subscriber, free_port

from edge_agent.config import MqttConfig
from edge_agent.messages import InspectionMessage, ModelRef
from edge_agent.publish.mqtt import MqttPublisher
from edge_agent.publish.outbox import MemoryOutbox, OutgoingMessage
from edge_agent.publish.spool import Spool, SpoolError, mark_replayed

MODEL = ModelRef(name="m", version="1", sha256="0" * 64, backend="onnxruntime", precision="fp32")


def outgoing(index: int, ttl: float | None = None) -> OutgoingMessage:
    payload = json.dumps({"sequence": index, "replayed": False}).encode()
    expires = time.time() + ttl if ttl is not None else None
    return OutgoingMessage(key=f"id{index}", topic="p/cam1/inspection", payload=payload, expires_at=expires)


def sequences(messages: list[OutgoingMessage]) -> list[int]:
    return [json.loads(m.payload)["sequence"] for m in messages]


def rows_on_disk(path: Path) -> int:
    with sqlite3.connect(str(path)) as connection:
        return int(connection.execute("SELECT COUNT(*) FROM messages").fetchone()[0])


def test_messages_come_back_in_order_and_acks_remove_them(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.sqlite", commit_interval_s=0.01)
    seqs = [spool.add(outgoing(i)) for i in range(10)]
    assert seqs == sorted(seqs) and len(spool) == 10
    assert spool.flush()
    for seq in seqs[:4]:
        spool.ack(seq)
    assert sequences(spool.after(0, 100)) == list(range(4, 10))
    assert sequences(spool.after(seqs[6], 2)) == [7, 8]  # a window after a cursor
    assert spool.flush() and rows_on_disk(tmp_path / "spool.sqlite") == 6
    spool.close()


def test_unacknowledged_messages_survive_a_restart_marked_replayed(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite"
    spool = Spool(path, commit_interval_s=0.01)
    seqs = [spool.add(outgoing(i)) for i in range(5)]
    spool.ack(seqs[1])
    spool.close()

    again = Spool(path)
    assert again.recovery.replayed == 4 and again.recovery.expired == 0
    pending = again.after(0, 100)
    assert sequences(pending) == [0, 2, 3, 4]
    assert all(m.replayed and json.loads(m.payload)["replayed"] is True for m in pending)
    newer = again.add(outgoing(5))
    assert newer > max(m.seq for m in pending)  # new messages queue behind the replayed ones
    assert sequences(again.after(0, 100)) == [0, 2, 3, 4, 5]
    assert not again.after(0, 100)[-1].replayed
    again.close()


def test_expired_messages_are_dropped_and_counted_at_start_and_before_sending(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite"
    spool = Spool(path, commit_interval_s=0.01)
    spool.add(outgoing(0, ttl=0.3))
    spool.add(outgoing(1, ttl=60))
    spool.add(outgoing(2, ttl=None))
    spool.close()
    time.sleep(0.4)
    again = Spool(path)
    assert again.recovery.expired == 1 and again.recovery.replayed == 2
    assert sequences(again.after(0, 10)) == [1, 2]
    again.add(outgoing(3, ttl=0.2))
    time.sleep(0.3)
    assert sequences(again.after(0, 10)) == [1, 2]
    assert again.counters.expired == 2 and len(again) == 2
    again.close()


def test_full_spool_drops_the_oldest_and_counts_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "spool.sqlite"
    with caplog.at_level("ERROR", logger="edge_agent.publish.spool"):
        spool = Spool(path, max_messages=5, commit_interval_s=0.01)
        for index in range(8):
            spool.add(outgoing(index))
    assert len(spool) == 5 and spool.counters.dropped == 3
    assert sequences(spool.after(0, 100)) == [3, 4, 5, 6, 7]
    assert any(getattr(r, "event", "") == "spool_full" for r in caplog.records)
    assert spool.flush() and rows_on_disk(path) == 5
    spool.close()
    smaller = Spool(path, max_messages=2)  # a lower bound in the config applies at start too
    assert sequences(smaller.after(0, 100)) == [6, 7] and smaller.counters.dropped == 3
    smaller.close()


def test_messages_acknowledged_within_the_commit_interval_never_touch_the_disk(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.sqlite", commit_interval_s=0.5)
    for index in range(50):
        spool.ack(spool.add(outgoing(index)))
    assert spool.flush()
    assert spool.counters.rows_written == 0 and len(spool) == 0
    spool.close()


def test_a_damaged_spool_file_is_moved_aside_and_the_agent_starts_empty(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite"
    path.write_bytes(b"this is not a database, a power cut shredded it" * 100)
    spool = Spool(path)
    moved = spool.recovery.corrupt_moved_to
    assert moved is not None and moved.exists() and moved.read_bytes().startswith(b"this is not")
    spool.add(outgoing(0))
    assert spool.flush() and rows_on_disk(path) == 1
    spool.close()


def test_a_second_process_cannot_open_the_same_spool(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from edge_agent.publish.spool import Spool; s = Spool({str(path)!r}); print('open', flush=True);"
            " import time; time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        with pytest.raises(SpoolError, match=rf"in use by another edge-agent process \(pid {holder.pid}\)"):
            Spool(path)
    finally:
        holder.kill()
        holder.wait()
    Spool(path).close()  # the lock dies with its process


def test_disk_full_keeps_messages_in_memory_and_recovers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "spool.sqlite"
    spool = Spool(path, commit_interval_s=0.01)
    spool.add(outgoing(0))
    assert spool.flush()
    # SQLITE_FULL for real: the database may not grow by another page.
    pages = spool._writer.execute("PRAGMA page_count").fetchone()[0]
    spool._writer.execute(f"PRAGMA max_page_count={pages}")
    big = OutgoingMessage(key="big", topic="p/cam1/inspection", payload=b"x" * 200_000)
    with caplog.at_level("ERROR", logger="edge_agent.publish.spool"):
        spool.add(big)
        deadline = time.monotonic() + 5
        while spool.writing_ok and time.monotonic() < deadline:
            time.sleep(0.01)
    assert not spool.writing_ok and spool.counters.write_errors >= 1
    assert "full" in spool.counters.last_error
    assert any(getattr(r, "event", "") == "spool_write_failed" for r in caplog.records)
    assert [m.key for m in spool.after(0, 10)] == ["id0", "big"]  # still there, from memory
    spool._writer.execute("PRAGMA max_page_count=1073741823")
    assert spool.flush(10) and spool.writing_ok
    spool.close()
    again = Spool(path)
    assert [m.key for m in again.after(0, 10)] == ["id0", "big"]
    again.close()


def test_mark_replayed_only_touches_inspection_payloads() -> None:
    assert json.loads(mark_replayed(b'{"a":1,"replayed":false}')) == {"a": 1, "replayed": True}
    assert mark_replayed(b"online") == b"online"
    assert mark_replayed(b'{"a":1}') == b'{"a":1}'


def test_memory_outbox_has_the_same_window_and_bound() -> None:
    outbox = MemoryOutbox(max_messages=3)
    seqs = [outbox.add(outgoing(i)) for i in range(5)]
    assert sequences(outbox.after(0, 10)) == [2, 3, 4] and outbox.counters.dropped == 2
    outbox.ack(seqs[3])
    assert sequences(outbox.after(seqs[2], 10)) == [4]


def inspection(sequence: int) -> InspectionMessage:
    return InspectionMessage(
        device_id="cam1",
        sequence=sequence,
        capture_time=time.time(),
        model=MODEL,
        image_score=0.1,
        anomalous=False,
        log10_epsilon=0.0,
        frame_size=(64, 64),
    )


def test_publisher_with_spool_delivers_after_an_agent_restart_with_the_broker_down_meanwhile(
    tmp_path: Path,
    broker_factory,
) -> None:
    port = free_port()
    path = tmp_path / "spool.sqlite"
    config = MqttConfig(port=port, reconnect_initial_s=1, reconnect_max_s=1, drain_timeout_s=1, message_expiry_s=120)
    spool = Spool(path, commit_interval_s=0.01)
    first = MqttPublisher(config, "cam1", outbox=spool)
    first.start()
    messages = [inspection(i) for i in range(30)]
    for message in messages:
        first.publish_inspection(message)
    assert first.stop() is False  # no broker: nothing acknowledged, and it says so
    spool.close()

    broker = broker_factory(port=port)
    subscriber = Subscriber(broker, "uflow/cam1/inspection")
    spool = Spool(path)
    assert spool.recovery.replayed == 30
    second = MqttPublisher(config.model_copy(update={"drain_timeout_s": 10}), "cam1", outbox=spool)
    second.start()
    second.publish_inspection(inspection(0))  # the restarted agent's first frame
    assert second.stop() is True
    spool.close()
    assert subscriber.wait_for(lambda ms: len(ms) == 31, timeout=10)
    subscriber.close()
    received = [m.json() for m in subscriber.messages]
    assert [m["message_id"] for m in received[:30]] == [m.message_id for m in messages]
    assert all(m["replayed"] for m in received[:30]) and not received[30]["replayed"]
    assert all(0 < int(m.properties["MessageExpiryInterval"]) <= 120 for m in subscriber.messages)
    assert rows_on_disk(path) == 0
