"""Bundles on the box (issue 13): signatures re-checked at start and on reload, paths inside the bundle,
bounded input shapes. Real signed bundles, the real agent on mosquitto."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from agent_harness import AgentThread, Running, agent_config
from fleet_helpers import make_bundle
from mqtt_broker import MosquittoBroker, Subscriber

from edge_agent.bundle import MANIFEST_NAME, MAX_INPUT_SIDE, BundleError, load_bundle
from edge_agent.fleet.signing import generate_keypair


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("keys")
    return generate_keypair(root / "fleet"), generate_keypair(root / "other")


def _edit_manifest(bundle: Path, change: dict[str, object]) -> None:
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    manifest.update(change)
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"self_test": ["../../../etc/shadow"]}, "self_test path '../../../etc/shadow'"),
        ({"self_test": ["/etc/shadow"]}, "self_test path '/etc/shadow'"),
        ({"variants": [{"file": "../model.int8.onnx", "precision": "int8"}]}, "variant file path '../model.int8"),
        ({"input": {"height": MAX_INPUT_SIDE + 1, "width": 64}}, "input.height"),
    ],
)
def test_manifest_paths_stay_inside_and_shapes_are_bounded(tmp_path: Path, change: dict, message: str) -> None:
    bundle = make_bundle(tmp_path / "b", "1.0.0", None)
    _edit_manifest(bundle, change)
    with pytest.raises(BundleError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_bundle(bundle)


def test_signature_is_checked_at_start_and_on_reload(
    tmp_path: Path,
    keys,  # type: ignore[no-untyped-def]
    frames: Path,
    broker: MosquittoBroker,
) -> None:
    fleet, other = keys
    good = make_bundle(tmp_path / "good", "1.0.0", fleet.private_key)
    foreign = make_bundle(tmp_path / "foreign", "2.0.0", other.private_key)  # valid hashes, wrong key
    current = tmp_path / "current"
    current.symlink_to(foreign)
    values = agent_config(
        tmp_path / "state",
        current,
        str(frames),
        broker.port,
        None,
        source={"loop": True, "fps_limit": 20.0},
        update={"public_key": str(fleet.public_key)},
    )
    refused = AgentThread.from_values(values).start()
    refused.thread.join(120)
    assert refused.exit_code == 1  # the agent does not start on a bundle the fleet key did not sign

    current.unlink()
    current.symlink_to(good)
    subscriber = Subscriber(broker, "uflow/cam1/#")
    agent = AgentThread.from_values(values).start()
    run = Running(agent, subscriber, broker, 0)
    try:
        run.wait_inspections(2, timeout=90)
        current.unlink()
        current.symlink_to(foreign)
        reply = run.command("reload", {"request_id": "r"})
        assert reply["ok"] is False and "signature does not match" in reply["message"], reply
        assert "still running" in reply["message"]
    finally:
        assert agent.stop() == 0
        subscriber.close()


def test_the_shadow_bundle_is_signature_checked_like_the_live_one(
    tmp_path: Path,
    keys,  # type: ignore[no-untyped-def]
    frames: Path,
    broker: MosquittoBroker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 24 finding 13: with update.public_key set, a shadow bundle the fleet key did not sign is not run."""
    fleet, other = keys
    good = make_bundle(tmp_path / "good", "1.0.0", fleet.private_key)
    foreign = make_bundle(tmp_path / "foreign", "2.0.0", other.private_key)
    signed = make_bundle(tmp_path / "signed", "2.0.0", fleet.private_key)
    for shadow, runs in ((foreign, False), (signed, True)):
        values = agent_config(
            tmp_path / f"state-{runs}",
            good,
            str(frames),
            broker.port,
            None,
            source={"loop": True, "fps_limit": 20.0},
            update={"public_key": str(fleet.public_key)},
            model={"bundle": str(good), "backend": "onnxruntime", "threads": 1, "shadow": str(shadow)},
        )
        subscriber = Subscriber(broker, "uflow/cam1/#")
        agent = AgentThread.from_values(values).start()
        run = Running(agent, subscriber, broker, 0)
        try:
            run.wait_inspections(3, timeout=90)  # the live model runs either way
            assert subscriber.wait_for(lambda ms: any(m.topic.endswith("/stats") for m in ms), 30)
            stats = [m.json() for m in subscriber.on("/stats")]
            assert bool(stats[-1].get("shadow")) is runs, stats[-1].get("shadow")
        finally:
            assert agent.stop() == 0
            subscriber.close()
    failed = [r for r in caplog.records if getattr(r, "event", "") == "shadow_failed"]
    assert len(failed) == 1 and "signature" in failed[0].getMessage()
