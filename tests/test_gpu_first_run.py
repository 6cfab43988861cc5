"""bench/gpu_first_run.py: refuses clearly without a GPU, and its whole run works against the fake
TensorRT and cuda-python bindings (tests/fake_tensorrt), so the first real GPU run only meets real GPU issues."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fake_tensorrt import install, make_cuda_python, make_tensorrt, reset_memory
from precision_bundle import build_precision_bundle

from edge_agent.cli import build_engine

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def gpu_first_run(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.delitem(sys.modules, "gpu_first_run", raising=False)
    import gpu_first_run

    return gpu_first_run


def test_without_tensorrt_or_gpu_it_stops_with_the_reason(
    gpu_first_run, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    install(monkeypatch, None)
    with pytest.raises(SystemExit) as stopped:
        gpu_first_run.main([])
    assert stopped.value.code == build_engine.EXIT_UNAVAILABLE
    assert "TensorRT is not installed" in capsys.readouterr().err
    install(monkeypatch, make_tensorrt("10.3"), cuda_python=make_cuda_python(gpus=0))
    with pytest.raises(SystemExit) as stopped:
        gpu_first_run.main([])
    assert stopped.value.code == build_engine.EXIT_NO_GPU
    assert "no GPU reachable" in capsys.readouterr().err


def test_full_run_on_fake_bindings_prints_one_table(
    gpu_first_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    reset_memory()
    install(monkeypatch, make_tensorrt("10.x-latest"), cuda_python=make_cuda_python())
    root = build_precision_bundle(tmp_path / "bundle")
    assert gpu_first_run.main(["--bundle", str(root), "--frames", "20"]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| fp") or line.startswith("| int8")]
    assert [line.split("|")[1].strip() for line in table] == ["fp32", "fp16", "int8"]
    assert [line.split("|")[2].strip() for line in table] == ["fp32", "fp16-typed", "int8-qdq-typed"]
    for line in table:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert cells[5] == "0" and cells[6] == "1.000"  # no NaN/inf; the fake runs the same ONNX, masks equal
        assert float(cells[8]) > 0 and float(cells[9]) > 0  # engine and agent fps measured
    assert not (root / "model.int8.onnx").exists()  # variants were made in a scratch copy only
