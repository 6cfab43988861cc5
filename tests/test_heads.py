"""The evidence heads (training/heads.py): their maps, the fast coreset, the cross-fit, and a hybrid
bundle end to end (graph, TensorRT graph check, manifest, the agent's decision, the paper's NFA on the
flow maps only, old bundles unchanged)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from edge_agent.bundle import BundleError, load_bundle  # noqa: E402
from edge_agent.config import NfaConfig  # noqa: E402
from edge_agent.engines.onnxruntime import OnnxRuntimeEngine  # noqa: E402
from edge_agent.engines.tensorrt.graph_check import check_graph, head_nodes  # noqa: E402
from edge_agent.inspection import nfa  # noqa: E402
from edge_agent.inspection.image_test import ImageTest  # noqa: E402
from edge_agent.inspection.scoring import FrameScorer  # noqa: E402
from training.heads import (  # noqa: E402
    GaussianHead,
    MemoryHead,
    fit_heads,
    gaussian_parameters,
    greedy_coreset,
    out_of_sample_maps,
    positional_parameters,
    shrunk_covariance,
)

HYBRID_SIZE = 128
# The hybrid run's heads: the maps the NFA tests and the image test's score (the detail head has its own tests).
REGION_AND_IMAGE_HEADS = ("flow", "gaussian", "memory", "texture")
REPO = Path(__file__).resolve().parent.parent


def _bench(name: str) -> Any:
    """bench/<name>.py as a module (the bench folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_under_test", REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _upsampled_ratios(maps: list[np.ndarray], means: list[float], size: tuple[int, int]) -> list[np.ndarray]:
    """Each map over its mean, upsampled bilinearly to ``size``: the fusion's terms, computed by hand."""
    return [
        torch.nn.functional.interpolate(
            torch.from_numpy(np.asarray(m, dtype=np.float32) / mean)[None, None], size=size, mode="bilinear"
        )[0, 0].numpy()
        for m, mean in zip(maps, means, strict=True)
    ]


def _table_rows(text: str) -> dict[str, list[str]]:
    """A printed markdown table's body rows by their first cell (header and rule left out)."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return {cells[0]: cells[1:] for line in lines[1:] for cells in [[c.strip() for c in line.strip("|").split("|")]]}


def test_gaussian_head_is_the_whitened_square_mean() -> None:
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(6, 6))
    x = torch.from_numpy(rng.normal(size=(4000, 6)) @ mixing + 3.0).float()
    mean, inverse = gaussian_parameters(x)
    head = GaussianHead(6)
    head.set(mean, inverse)
    features = x[:20].T.reshape(1, 6, 4, 5)
    got = head(features)[0].numpy().ravel()
    _, covariance, shrink = shrunk_covariance(x)
    centred = (x[:20] - x.mean(0)).double().numpy()
    want = np.einsum("pc,cd,pd->p", centred, np.linalg.inv(covariance.numpy()), centred) / 6
    assert 1e-3 <= shrink < 0.05  # many samples: little shrinkage, but the ridge floor holds
    np.testing.assert_allclose(got, want, rtol=1e-3)
    # On the good data the map is chi^2(C)/C-like: mean about 1.
    assert head(x.T.reshape(1, 6, 40, 100)).mean().item() == pytest.approx(1.0, abs=0.02)


def test_a_positional_gaussian_knows_what_is_normal_where() -> None:
    """An object's rim and centre differ: one mean per scale flags the rim on every good part, a mean per
    position does not, and still flags a part whose centre looks like a rim."""
    rng = np.random.default_rng(4)
    layout = torch.zeros(1, 5, 6, 6)
    layout[:, :, :, :2] = 4.0  # the left columns are always bright (the rim)
    good = layout + torch.from_numpy(rng.normal(size=(300, 5, 6, 6))).float()
    mean, inverse = positional_parameters(good)
    assert mean.shape == (5, 6, 6) and inverse.shape == (5, 5)
    positional = GaussianHead(5, (6, 6))
    positional.set(mean, inverse)
    plain = GaussianHead(5)
    plain.set(*gaussian_parameters(good.permute(0, 2, 3, 1).reshape(-1, 5)))
    part = layout + torch.from_numpy(rng.normal(size=(1, 5, 6, 6))).float()
    # On a good part the positional map is chi^2(5)/5-like everywhere; the plain one is lopsided.
    assert positional(part).mean().item() == pytest.approx(1.0, abs=0.5)
    assert positional(good).mean().item() == pytest.approx(1.0, abs=0.05)
    defect = part.clone()
    defect[:, :, 3, 4] += 4.0  # a rim-like spot in the centre
    assert positional(defect)[0, 3, 4].item() > 5 * positional(part)[0, 3, 4].item()
    # The formula: mean over channels of (L^-1 (x - mu_hw))^2.
    want = torch.einsum("dc,nchw->ndhw", inverse, part - mean).pow(2).mean(1)
    torch.testing.assert_close(positional(part), want, rtol=1e-4, atol=1e-5)
    # Cross-fitted like the plain head: out of sample its maps are larger than in sample.
    heads = torch.nn.ModuleDict({"gaussian_0": GaussianHead(5, (6, 6))})
    cross = fit_heads(heads, [good[:40]], folds=5)
    out = out_of_sample_maps(heads, cross, [good[:40]], np.arange(40))
    assert out["gaussian_0"].shape == (40, 6, 6)
    assert out["gaussian_0"].mean() > heads["gaussian_0"](good[:40]).mean().item()


def test_a_positional_gaussian_exports_as_sub_then_the_whitening_conv(tmp_path: Path) -> None:
    head = GaussianHead(4, (3, 5))
    head.set(torch.randn(4, 3, 5), torch.eye(4))
    path = tmp_path / "positional.onnx"
    torch.onnx.export(head, (torch.randn(1, 4, 3, 5),), str(path), output_names=["g_0"], opset_version=17, dynamo=False)
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.index("Sub") < ops.index("Conv") < ops.index("ReduceMean")
    # The graph check finds the whitening Conv as the head's start (it must stay FP32).
    assert "Conv" in {n.op_type for n in head_nodes(graph, ["g_0"])}


def test_memory_head_is_the_nearest_bank_row_distance() -> None:
    rng = np.random.default_rng(1)
    bank = torch.from_numpy(rng.normal(size=(50, 8))).float()
    head = MemoryHead(8, 50, pool=1)
    head.set(bank)
    features = torch.from_numpy(rng.normal(size=(2, 8, 3, 4))).float()
    got = head(features).numpy()
    queries = features.permute(0, 2, 3, 1).reshape(-1, 8).numpy()
    want = ((queries[:, None, :] - bank.numpy()[None]) ** 2).sum(-1).min(1) / 8
    np.testing.assert_allclose(got.ravel(), want, rtol=1e-4, atol=1e-5)
    head.set(bank)
    assert head(bank[:4].T.reshape(1, 8, 2, 2)).abs().max().item() < 1e-4  # a bank row is at distance 0


def test_greedy_coreset_covers_the_data_better_than_a_random_subset() -> None:
    rng = np.random.default_rng(2)
    # Two dense clusters and a few far outliers: k-center must pick the outliers, random rarely does.
    x = np.concatenate([rng.normal(0, 0.1, (3000, 200)), rng.normal(5, 0.1, (3000, 200)), rng.normal(20, 1, (5, 200))])
    x_t = torch.from_numpy(x).float()
    chosen = greedy_coreset(x_t, 32, seed=0)
    assert len(set(chosen.tolist())) == 32
    assert {6000, 6001, 6002, 6003, 6004} <= set(chosen.tolist())

    def radius(index: np.ndarray) -> float:
        d = ((x[:, None, :] - x[index][None]) ** 2).sum(-1).min(1)
        return float(d.max())

    random_index = rng.choice(len(x), 32, replace=False)
    assert radius(chosen.numpy()) < radius(random_index)
    assert len(greedy_coreset(x_t[:10], 32)) == 10  # fewer rows than asked: all of them


def test_cross_fit_gives_each_image_maps_from_heads_that_did_not_see_it() -> None:
    rng = np.random.default_rng(3)
    features = torch.from_numpy(rng.normal(size=(10, 4, 3, 3))).float()
    heads = torch.nn.ModuleDict({"gaussian_0": GaussianHead(4), "memory_0": MemoryHead(4, 90, pool=1)})
    cross = fit_heads(heads, [features], folds=5)
    # The bank holds every patch: in sample each image's map is 0, out of sample it is not.
    assert heads["memory_0"](features).abs().max().item() < 1e-4
    out = out_of_sample_maps(heads, cross, [features], np.arange(10))
    assert out["memory_0"].shape == (10, 3, 3) and (out["memory_0"] > 1e-3).all()
    # Out of sample, the Gaussian's map is larger than in sample (it did not fit these images).
    inside = heads["gaussian_0"](features).numpy()
    assert out["gaussian_0"].mean() > inside.mean()
    assert sorted(np.bincount(cross.folds).tolist()) == [2, 2, 2, 2, 2]


def test_memory_head_exports_as_conv_and_reduce_min_that_tensorrt_takes(tmp_path: Path) -> None:
    head = MemoryHead(8, 16, pool=3)
    head.set(torch.randn(16, 8))
    path = tmp_path / "memory.onnx"
    torch.onnx.export(head, (torch.randn(1, 8, 4, 4),), str(path), output_names=["k_0"], opset_version=17, dynamo=False)
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert "ReduceMin" in ops and "Conv" in ops and "ArgMin" not in ops
    assert check_graph(path, "fp32") == []
    kept = {n.op_type for n in head_nodes(graph, ["k_0"])}
    # The bank distance stays FP32 in an FP16 model: the bank Conv, the min, and ||x||² added after the min.
    assert {"Conv", "ReduceMin", "ReduceSum", "Pow", "Add"} <= kept


class _LegacyMemoryHead(MemoryHead):
    """The memory head as bundles before the fused distance exported it: ||x||² - 2 x.b + ||b||², then the min."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.pooled(features)
        dot = torch.nn.functional.conv2d(x, self.bank)
        squared = x.pow(2).sum(dim=1, keepdim=True) - 2.0 * dot + self.bank_sq.view(1, -1, 1, 1)
        return squared.amin(dim=1).clamp_min(0.0) / float(self.channels)


def test_the_fused_bank_distance_equals_the_legacy_graph_which_still_passes_the_check(tmp_path: Path) -> None:
    torch.manual_seed(0)
    bank, x = torch.randn(32, 8), torch.randn(2, 8, 6, 6)
    fused, legacy = MemoryHead(8, 32, pool=3), _LegacyMemoryHead(8, 32, pool=3)
    fused.set(bank)
    legacy.set(bank)
    assert torch.allclose(fused(x), legacy(x), atol=1e-5)
    path = tmp_path / "legacy.onnx"
    torch.onnx.export(legacy, (x[:1],), str(path), output_names=["k_0"], opset_version=17, dynamo=False)
    assert check_graph(path, "fp32") == []
    kept = {n.op_type for n in head_nodes(onnx.load(str(path)).graph, ["k_0"])}
    assert {"Conv", "ReduceMin", "ReduceSum", "Pow"} <= kept


@pytest.fixture(scope="module")
def hybrid_run(tmp_path_factory: pytest.TempPathFactory, synthetic_data_dir: Path) -> Path:
    """A run with all three heads and the texture head, and enough validation images (20) for the fitted null."""
    from training.model import UFlowConfig
    from training.train import TrainConfig, train

    run = tmp_path_factory.mktemp("hybrid_run")
    config = UFlowConfig(
        image_height=HYBRID_SIZE,
        image_width=HYBRID_SIZE,
        strides=(8, 16),
        bank_size=64,
        fine_bank_size=32,
        heads=REGION_AND_IMAGE_HEADS,
        detail_share=None,
    )
    train(synthetic_data_dir, run, config, TrainConfig(epochs=2, batch_size=8, val_fraction=0.5), progress=False)
    return run


@pytest.fixture(scope="module")
def regions_run(hybrid_run: Path, synthetic_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hybrid run's flow with the region heads only (no texture head, so no image test): what the benches
    that weigh the region maps reproduce training's calibration on (bench/refit_heads.py)."""
    out = tmp_path_factory.mktemp("regions") / "run"
    _bench("refit_heads").refit(hybrid_run, out, str(synthetic_data_dir), {"heads": ("flow", "gaussian", "memory")})
    return out


@pytest.fixture(scope="module")
def hybrid_bundle(hybrid_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.export import export_bundle

    return export_bundle(hybrid_run, tmp_path_factory.mktemp("hybrid") / "bundle", name="hybrid", version="1")


def test_hybrid_bundle_ships_every_map_with_its_own_null(hybrid_bundle: Path, hybrid_run: Path) -> None:
    manifest = load_bundle(hybrid_bundle).manifest
    assert [(s.name, s.head) for s in manifest.scales] == [
        ("m_0", "flow"),
        ("m_1", "flow"),
        ("g_0", "gaussian"),
        ("g_1", "gaussian"),
        ("k_0", "memory"),
        ("k_1", "memory"),
        ("t_0", "texture"),
    ]
    # One null per region map; the texture map's is the image test's: the out-of-fold score of every good image.
    assert manifest.nfa.null_model == "fitted" and len(manifest.nfa.scale_nulls) == 6
    shapes = [(s.height, s.width) for s in manifest.scales if s.head != "texture"]
    assert manifest.nfa.log10_number_of_tests == pytest.approx(nfa.log10_tree_tests(shapes))
    image_test = manifest.nfa.image_test
    assert image_test is not None and image_test.share == pytest.approx(0.1)
    good = json.loads((hybrid_run / "config.json").read_text())["data"]
    assert len(image_test.scores) == good["train"] + good["val"]
    calibration = manifest.nfa.calibration
    assert calibration is not None and calibration.log10_epsilon == pytest.approx(-2.0 + math.log10(0.9))
    graph = onnx.load(str(hybrid_bundle / "model.onnx")).graph
    assert [o.name for o in graph.output] == ["anomaly_map", *(s.name for s in manifest.scales)]
    assert check_graph(hybrid_bundle / "model.onnx", "fp32") == []
    # The heads' nulls were fitted on out-of-sample maps: their means are those of the run's fusion.
    from training.rundir import load_model

    model, _ = load_model(hybrid_run)
    # The finest scale's bank has its own rows (fine_bank_size), the next the bank_size.
    assert [model.heads[f"memory_{s}"].bank.shape[0] for s in (0, 1)] == [32, 64]
    np.testing.assert_allclose(model.map_means.numpy()[:-1], [n.mean for n in manifest.nfa.scale_nulls], rtol=1e-5)


def test_the_agent_decides_on_all_maps_and_the_papers_nfa_on_the_flow_maps(hybrid_bundle: Path) -> None:
    from training.synthetic import defect_image

    bundle = load_bundle(hybrid_bundle)
    engine = OnnxRuntimeEngine(bundle)
    try:
        sample = defect_image(seed=5, height=HYBRID_SIZE, width=HYBRID_SIZE, kind="dark_blob")
        output = engine.infer(sample.image)
    finally:
        engine.close()
    manifest = bundle.manifest
    assert [m.shape for m in output.scale_maps] == [(s.height, s.width) for s in manifest.scales]
    size = (HYBRID_SIZE, HYBRID_SIZE)
    fitted = FrameScorer(manifest).score(output, size)
    nulls = [nfa.ScaleNull(n.mean, n.dof, n.area) for n in manifest.nfa.scale_nulls]
    regions = list(output.scale_maps[:-1])  # the last map is the texture head's: the image test reads it
    want = nfa.log_nfa_map(regions, [s.channels for s in manifest.scales[:-1]], size, nulls)
    spec = manifest.nfa.image_test
    assert spec is not None
    image = ImageTest(spec.scores, spec.share, spec.tail)
    whole = image.log10_nfa(float(output.scale_maps[-1][0, 0]))
    regions_only = want + image.region_shift
    # A decision: where a region is detected the regions say where; the whole frame only when none is.
    joined = regions_only if regions_only.min() < fitted.log10_epsilon else np.minimum(regions_only, whole)
    np.testing.assert_allclose(fitted.log_nfa, joined, rtol=1e-6)
    paper = FrameScorer(manifest, NfaConfig(null_model="polyomino")).score(output, size)
    flow = [i for i, s in enumerate(manifest.scales) if s.head == "flow"]
    want_paper = nfa.log_nfa_map(
        [output.scale_maps[i] for i in flow], [manifest.scales[i].channels for i in flow], size
    )
    np.testing.assert_array_equal(paper.log_nfa, want_paper)
    # The fused anomaly map is about 1 on good parts, higher on the blob.
    assert float(output.anomaly_map[sample.mask].mean()) > float(output.anomaly_map[~sample.mask].mean())
    # It is the geometric mean of the upsampled m / mean (the default fusion of new runs), computed here by
    # hand from the graph's own map outputs, and it is not their arithmetic mean.
    ratios = _upsampled_ratios(regions, [n.mean for n in manifest.nfa.scale_nulls], size)
    geometric = np.exp(np.mean([np.log(np.maximum(r, 0.05)) for r in ratios], axis=0))
    np.testing.assert_allclose(output.anomaly_map, geometric, rtol=1e-4, atol=1e-5)
    assert np.abs(output.anomaly_map - np.mean(ratios, axis=0)).max() > 1e-2


def test_the_agents_boxes_and_evaluates_masks_are_the_same_tightened_regions(hybrid_bundle: Path) -> None:
    """New bundles tighten each detected region to where the anomaly map nears its peak: the agent's region
    boxes are the boxes of evaluate's decision masks inside each NFA region, and the images flagged stay the
    NFA's."""
    from training.evaluate import Predictions, decision_masks
    from training.mask_choice import FRACTIONS
    from training.synthetic import defect_image

    bundle = load_bundle(hybrid_bundle)
    assert bundle.manifest.nfa.mask_fraction in FRACTIONS  # the run's own choice (training/mask_choice.py)
    engine = OnnxRuntimeEngine(bundle)
    try:
        outputs = [
            engine.infer(defect_image(seed=seed, height=HYBRID_SIZE, width=HYBRID_SIZE, kind=kind).image)
            for seed, kind in ((5, "dark_blob"), (6, "scratch"), (7, "bright_blob"))
        ]
    finally:
        engine.close()
    size = (HYBRID_SIZE, HYBRID_SIZE)
    scorer = FrameScorer(bundle.manifest)
    verdicts = [scorer.score(o, size) for o in outputs]
    assert any(v.anomalous for v in verdicts)
    predictions = Predictions(
        "onnxruntime",
        np.stack([o.anomaly_map for o in outputs]),
        [],
        (),
        0.0,
        log10_epsilon=scorer.rule.log10_epsilon,
        mask_fraction=scorer.rule.mask_fraction,
    )
    log_nfa = np.stack([v.log_nfa for v in verdicts])
    masks = decision_masks(predictions, log_nfa)
    for verdict, mask, lognfa in zip(verdicts, masks, log_nfa, strict=True):
        detected = lognfa < verdict.log10_epsilon
        assert (mask <= detected).all() and mask.any() == detected.any() == verdict.anomalous
        assert mask.sum() <= detected.sum()
        for region in verdict.regions:
            x, y, w, h = region.bbox
            inside = mask[y : y + h, x : x + w]
            # The box is tight around the decision mask's pixels of that region: every edge touches one.
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            assert region.area <= inside.sum()


def test_hybrid_bundle_passes_the_agents_self_test(hybrid_bundle: Path) -> None:
    from edge_agent.inspection.selftest import run_self_test

    bundle = load_bundle(hybrid_bundle)
    engine = OnnxRuntimeEngine(bundle)
    try:
        results = run_self_test(bundle, engine)
    finally:
        engine.close()
    assert len(results) == 3 and not any(r.anomalous for r in results)


def test_a_manifest_whose_maps_are_not_led_by_the_flow_is_refused(hybrid_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "b"
    shutil.copytree(hybrid_bundle, copy)
    raw = json.loads((copy / "model.json").read_text())
    raw["scales"] = raw["scales"][2:] + raw["scales"][:2]
    (copy / "model.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="first scale must be a flow map"):
        load_bundle(copy)
    raw = json.loads((hybrid_bundle / "model.json").read_text())
    raw["nfa"] = {"log10_number_of_tests": 100.0}
    (copy / "model.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="need the fitted NFA"):
        load_bundle(copy)
    # The texture map is read by the image test only: neither comes without the other, and it is one pixel.
    for change, refusal in (
        (lambda r: r["nfa"].pop("image_test"), "come together"),
        (lambda r: r["scales"][-1].update(height=2), "one texture map, of 1 x 1"),
        (lambda r: r["nfa"]["image_test"].update(scores=r["nfa"]["image_test"]["scores"][:5]), "image_test"),
        (lambda r: r["nfa"]["image_test"].update(share=1.5), "share"),
    ):
        raw = json.loads((hybrid_bundle / "model.json").read_text())
        change(raw)
        (copy / "model.json").write_text(json.dumps(raw))
        with pytest.raises(BundleError, match=refusal):
            load_bundle(copy)


def test_an_old_bundle_without_head_fields_loads_and_decides_as_before(tiny_bundle: Path, tmp_path: Path) -> None:
    """Bundles exported before the heads have no ``head`` in their scales: flow maps, decided as before."""
    from training.data import load_image

    copy = tmp_path / "old"
    shutil.copytree(tiny_bundle, copy)
    raw = json.loads((copy / "model.json").read_text())
    for scale in raw["scales"]:
        scale.pop("head", None)
    (copy / "model.json").write_text(json.dumps(raw))
    manifest = load_bundle(copy).manifest
    assert all(s.head == "flow" for s in manifest.scales)
    engine = OnnxRuntimeEngine(load_bundle(copy))
    try:
        output = engine.infer(load_image(copy / manifest.self_test[0], 128, 128))
    finally:
        engine.close()
    verdict = FrameScorer(manifest).score(output, (128, 128))
    want = nfa.log_nfa_map(list(output.scale_maps), [s.channels for s in manifest.scales], (128, 128))
    np.testing.assert_array_equal(verdict.log_nfa, want)


def test_an_old_run_config_is_a_flow_only_model() -> None:
    from training.model import UFlowConfig

    old = UFlowConfig.from_dict({"strides": [8, 16], "image_height": 128, "image_width": 128})
    assert old.heads == ("flow",) and old.head_strides("memory") == ()
    # A config from before fine_bank_size: every bank had bank_size rows, whatever today's default is.
    assert old.fine_bank_size == 0 and old.bank_rows(0) == old.bank_size
    # ... and its anomaly map was the arithmetic mean; new runs fuse by the geometric mean.
    assert old.map_fusion == "mean" and UFlowConfig().map_fusion == "geometric"
    with pytest.raises(ValueError, match="map fusion"):
        UFlowConfig(map_fusion="median")
    assert UFlowConfig(bank_size=64, fine_bank_size=16).bank_rows(0) == 16
    assert UFlowConfig(bank_size=64, fine_bank_size=16).bank_rows(1) == 64
    new = UFlowConfig(strides=(8, 16, 32))
    assert new.head_strides("memory") == (16, 32) and new.head_strides("gaussian") == (16, 32)
    assert new.bank_rows(0) == 512 and new.bank_rows(1) == new.bank_size == 2048
    assert UFlowConfig(strides=(8, 16, 32), memory_scales=0).head_strides("memory") == (8, 16, 32)
    assert UFlowConfig(strides=(8, 16, 32), gaussian_scales=0).head_strides("gaussian") == (8, 16, 32)
    # ... and its Gaussians had one mean per scale, whatever today's default is.
    assert old.gaussian_positional is False
    with pytest.raises(ValueError, match="flow head is required"):
        UFlowConfig(heads=("gaussian",))


def test_fp16_and_int8_variants_keep_the_heads_in_fp32(
    hybrid_bundle: Path, synthetic_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heads' whitening and bank distances stay FP32 (never quantized, never FP16) and agree with FP32;
    the TensorRT backend (tests/fake_tensorrt: graph rules, builder, I/O binding) builds and runs every map."""
    from calibration.fp16 import Fp16Settings
    from calibration.fp16 import calibrate_bundle as calibrate_fp16
    from calibration.int8 import Int8Settings, conv_groups
    from calibration.int8 import calibrate_bundle as calibrate_int8
    from training.data import load_image

    root = tmp_path / "bundle"
    shutil.copytree(hybrid_bundle, root)
    good = synthetic_data_dir / "train" / "good"
    calibrate_int8(root, good, Int8Settings(images=8, method="minmax"))
    calibrate_fp16(root, good, Fp16Settings(images=4))  # runs the TensorRT graph check (head-fp32) on the result
    bundle = load_bundle(root)
    int8 = onnx.load(str(root / "model.int8.onnx"))
    heads = conv_groups(onnx.load(str(root / "model.onnx"))).groups["heads"]
    assert len(heads) == 5  # two whitening convs, two banks, the texture head's whitening Gemm
    producer = {out: node for node in int8.graph.node for out in node.output}
    for node in int8.graph.node:
        if node.name in heads:
            source = producer.get(node.input[1])
            assert source is None or source.op_type != "DequantizeLinear", f"{node.name} was quantized"
    fp16 = bundle.manifest.variant("fp16")
    assert fp16 is not None and any(n in fp16.settings["fp32_nodes"] for n in heads)
    image = load_image(root / bundle.manifest.self_test[0], HYBRID_SIZE, HYBRID_SIZE)
    outputs = {}
    for precision in ("fp32", "fp16", "int8"):
        engine = OnnxRuntimeEngine(bundle, precision=precision)
        try:
            outputs[precision] = engine.infer(image)
        finally:
            engine.close()
    for precision in ("fp16", "int8"):
        for name, got, want in zip(
            [s.name for s in bundle.manifest.scales],
            outputs[precision].scale_maps,
            outputs["fp32"].scale_maps,
            strict=True,
        ):
            assert np.isfinite(got).all(), name
            assert np.abs(got - want).mean() < 0.2 * max(1.0, float(np.abs(want).mean())), (precision, name)

    from fake_tensorrt import install, make_cuda_python, make_pycuda, make_tensorrt, reset_memory

    from edge_agent.config import ModelConfig
    from edge_agent.engines.tensorrt.runtime import TensorRTEngine

    reset_memory()
    install(monkeypatch, make_tensorrt("10.3"), cuda_python=make_cuda_python(), pycuda=make_pycuda())
    for precision in ("fp32", "fp16", "int8"):
        config = ModelConfig(backend="tensorrt", precision=precision, engine_cache_dir=tmp_path / "engines")
        engine = TensorRTEngine(bundle, config)
        try:
            got = engine.infer(image)
        finally:
            engine.close()
        assert len(got.scale_maps) == len(bundle.manifest.scales) == 7
        for g, w in zip(got.scale_maps, outputs[precision].scale_maps, strict=True):
            np.testing.assert_array_equal(g, w)


def test_a_hybrid_candidate_runs_in_shadow_beside_a_flow_only_live_model(contract_model, hybrid_bundle: Path) -> None:
    """The shadow (and the agent's model loader, warm-up included) takes a bundle with head outputs."""
    from line_helpers import inspected_job

    from edge_agent.config import ModelConfig
    from edge_agent.inspection.loaded_model import load_model
    from edge_agent.inspection.shadow import ShadowRunner

    candidate = load_model(hybrid_bundle, ModelConfig(backend="onnxruntime", threads=1))
    runner = ShadowRunner(candidate, share=1.0, device_id="cam1")
    runner.start()
    try:
        for seq in range(4):
            runner.offer(inspected_job(contract_model, seq, defect=seq == 2))
            assert runner.wait_idle()
        report = runner.snapshot()
    finally:
        runner.stop()
        candidate.close()
    assert report.compared == 4 and report.candidate == "hybrid 1"


def test_refit_heads_reproduces_finish_and_swaps_the_heads_beside_the_same_flow(
    hybrid_run: Path, synthetic_data_dir: Path, tmp_path: Path
) -> None:
    """bench/refit_heads.py: unchanged heads give back training's finish exactly; changed heads keep the flow."""
    from training.rundir import load_model

    refit_heads = _bench("refit_heads")
    same, fewer = tmp_path / "same", tmp_path / "fewer"
    refit_heads.refit(hybrid_run, same, str(synthetic_data_dir), {})
    before = json.loads((hybrid_run / "val_scores.json").read_text())
    after = json.loads((same / "val_scores.json").read_text())
    for key in ("scores", "nfa_null", "nfa_evidence_scale", "min_log_nfa", "planted"):
        assert after[key] == before[key], key
    refit_heads.refit(hybrid_run, fewer, str(synthetic_data_dir), {"memory_scales": 1, "fine_bank_size": 16})
    model, _ = load_model(fewer)
    original, _ = load_model(hybrid_run)
    assert sorted(model.heads) == ["gaussian_0", "gaussian_1", "memory_1", "texture_0"]
    flow = {k: v for k, v in original.trainable_state_dict().items() if not k.startswith(("heads.", "map_means"))}
    for key, value in flow.items():
        assert torch.equal(model.trainable_state_dict()[key], value), key
    with pytest.raises(SystemExit, match="exists"):
        refit_heads.refit(hybrid_run, fewer, str(synthetic_data_dir), {})


def test_the_fusion_bench_scores_the_bundles_own_anomaly_map(
    hybrid_run: Path, hybrid_bundle: Path, synthetic_data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """bench/fusion.py: its row for the run's own fusion (geometric, every map) is what the exported bundle's
    anomaly map scores on the test split through ONNX Runtime, computed here independently."""
    from training import metrics
    from training.data import load_image, load_mask, open_dataset

    fusion = _bench("fusion")
    assert fusion.main(["--run", str(hybrid_run), "--data", str(synthetic_data_dir), "--threads", "1"]) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert {"mean, every map (today)", "geometric mean, every map", "F8 alone", "M16 alone"} <= set(rows)
    test = open_dataset(synthetic_data_dir).test
    engine = OnnxRuntimeEngine(load_bundle(hybrid_bundle))
    try:
        amaps = np.stack([engine.infer(load_image(r.image, HYBRID_SIZE, HYBRID_SIZE)).anomaly_map for r in test])
    finally:
        engine.close()
    masks = np.stack([load_mask(r.mask, HYBRID_SIZE, HYBRID_SIZE) for r in test]).astype(bool)
    labels = np.array([r.label for r in test], dtype=bool)
    want = (
        metrics.pixel_auroc(amaps, masks),
        metrics.aupro(amaps, masks),
        metrics.image_auroc(amaps.reshape(len(amaps), -1).max(axis=1), labels),
    )
    got = [float(v) for v in rows["geometric mean, every map"][1].split(" / ")]
    np.testing.assert_allclose(got, want, atol=2e-3)


def test_the_fused_nfa_bench_reproduces_trainings_calibration_in_its_today_row(
    regions_run: Path, synthetic_data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """bench/fused_nfa.py: its "today" row is training's own calibration (factor, planted share) of the run."""
    fused_nfa = _bench("fused_nfa")
    assert fused_nfa.main(["--run", str(regions_run), "--data", str(synthetic_data_dir), "--threads", "1"]) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert set(rows) == {"today", "today + fused", "fused alone"}
    scores = json.loads((regions_run / "val_scores.json").read_text())
    assert float(rows["today"][0]) == pytest.approx(scores["nfa_evidence_scale"])
    assert float(rows["today"][1].rstrip("%")) == pytest.approx(100 * scores["planted"]["detection_rate"], abs=0.05)


def test_the_correlation_lag_bench_reproduces_trainings_null_at_todays_reach(
    regions_run: Path, synthetic_data_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """bench/correlation_lag.py: its "today" row's areas, factor and planted share are training's own;
    every reach gets its row in both tables, and its panel in the picture."""
    from training.data import open_dataset

    bench = _bench("correlation_lag")
    argv = ["--run", str(regions_run), "--data", str(synthetic_data_dir), "--threads", "1"]
    name = open_dataset(str(synthetic_data_dir)).test[-1].image.name
    picture = tmp_path / "reach.png"
    assert bench.main([*argv, "--lags", "2", "6", "--picture", name, str(picture)]) == 0
    image = cv2.imread(str(picture), cv2.IMREAD_COLOR)
    assert image is not None and image.shape == (HYBRID_SIZE, HYBRID_SIZE * 5, 3)  # image, map, 3 reaches
    main_table, kinds_table = capsys.readouterr().out.split("\n| reach |")
    rows = _table_rows(main_table)
    assert set(rows) == {"today", "2", "6"}
    # The planted share per kind and size: one row per reach, a share (or "-") per column.
    kind_rows = _table_rows("| reach |" + kinds_table)
    assert set(kind_rows) == {"today", "2", "6"}
    assert all(cell == "-" or 0.0 <= float(cell.rstrip("%")) <= 100.0 for cell in kind_rows["6"])
    scores = json.loads((regions_run / "val_scores.json").read_text())
    today = rows["today"]
    want_areas = [round(n["area"], 1) for n in scores["nfa_null"]]
    areas = [float(cell.split(":")[1]) for cell in today[0].split()]
    np.testing.assert_allclose(areas, want_areas, atol=0.051)
    assert float(today[1]) == pytest.approx(scores["nfa_evidence_scale"])
    assert float(today[2].rstrip("%")) == pytest.approx(100 * scores["planted"]["detection_rate"], abs=0.05)
    with pytest.raises(SystemExit, match="no test image's file name contains 'no-such-part'"):
        bench.main([*argv, "--lags", "2", "--picture", "no-such-part", str(tmp_path / "none.png")])
    assert not (tmp_path / "none.png").exists()


def test_the_global_head_bench_scores_planted_defects_and_every_test_type(
    regions_run: Path, synthetic_data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """bench/global_head.py: one row per defect type plus all, AUROCs and shares in range, and the label-free
    line (validation images against planted defects) first; its Mahalanobis distance is the textbook one."""
    from training.data import open_dataset

    bench = _bench("global_head")
    argv = ["--run", str(regions_run), "--data", str(synthetic_data_dir), "--threads", "1", "--planted-seeds", "0"]
    assert bench.main([*argv, "--with-nfa"]) == 0
    out, nfa_table = capsys.readouterr().out.split("\nin the NFA")
    assert out.index("label-free:") < out.index("test (reporting only)")
    # In the NFA: today's row is training's own calibration; the score adds one 1x1 map beside it.
    decision = _table_rows(nfa_table)
    assert set(decision) == {"today", "today + global"}
    scores = json.loads((regions_run / "val_scores.json").read_text())
    assert float(decision["today"][0]) == pytest.approx(scores["nfa_evidence_scale"])
    assert float(decision["today"][1].rstrip("%")) == pytest.approx(100 * scores["planted"]["detection_rate"], abs=0.05)
    rows = _table_rows(out)
    types = {r.defect_type for r in open_dataset(str(synthetic_data_dir)).test if r.label}
    assert set(rows) == {"all defective", *types}
    for cells in rows.values():
        assert 0.0 <= float(cells[1]) <= 1.0
    rng = np.random.default_rng(0)
    mixing = np.array([[1.0, 0.3, 0.0], [0.0, 1.0, 0.2], [0.1, 0.0, 1.0]])
    good, query = rng.normal(size=(4000, 3)) @ mixing + 2.0, 3.0 * rng.normal(size=(5, 3))
    centred = query - good.mean(axis=0)
    covariance = np.cov(good.T, bias=True)
    want = np.einsum("nc,cd,nd->n", centred, np.linalg.inv(covariance), centred)
    np.testing.assert_allclose(bench.mahalanobis(good, query), want, rtol=0.02)  # many samples: little shrinkage


def test_doctor_tells_the_regions_share_and_what_the_image_test_rests_on(hybrid_bundle: Path) -> None:
    from edge_agent.cli.doctor import check_false_alarm_promise

    manifest = load_bundle(hybrid_bundle).manifest
    assert manifest.nfa.image_test is not None
    images = len(manifest.nfa.image_test.scores)
    detail = check_false_alarm_promise(manifest).detail
    assert "the regions' share of the promise: promise at most 9 per 1,000 parts" in detail
    # A tenth of 1 per 100 parts is 1 per 1,000: the rank of n good images reaches it from 999 of them.
    assert f"takes 10% of the promise, 1 per 1,000 parts, on the out-of-fold scores of {images} good images" in detail
    assert f"{999 - images} more good images would rank it" in detail
    from edge_agent.cli.doctor import check_detection_power

    # ... and where a region is reported: the decision's mask fraction.
    percent = round(100 * manifest.nfa.mask_fraction)  # the run's own choice
    assert f"reported where the anomaly map reaches {percent}% of its peak" in check_detection_power(manifest).detail


def test_the_image_family_bench_reproduces_trainings_planted_share_before_the_image_test(
    regions_run: Path, synthetic_data_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """bench/image_family.py: its "none (today)" row finds training's planted share (no image test), every
    reading gets its promise row and its share rows, and the cached scores print the same tables."""
    bench = _bench("image_family")
    cache = tmp_path / "scores.npz"
    argv = ["--run", str(regions_run), "--data", str(synthetic_data_dir), "--threads", "1", "--planted-seeds", "0"]
    assert bench.main([*argv, "--folds", "5", "--cache", str(cache)]) == 0
    first = capsys.readouterr().out
    assert cache.exists()
    assert bench.main([*argv, "--folds", "5", "--cache", str(cache)]) == 0
    assert capsys.readouterr().out == first
    promise_table, decision_table = first.split("\n| image test |")
    promise = _table_rows(promise_table[promise_table.index("| reading |") :])
    assert set(promise) == {"conformal", "lognormal", "pareto"}
    rows = _table_rows("| image test |" + decision_table)
    assert set(rows) == {"none (today)", "conformal", "lognormal", "pareto"}  # first cell: the reading
    scores = json.loads((regions_run / "val_scores.json").read_text())
    today = rows["none (today)"]
    assert float(today[1].rstrip("%")) == pytest.approx(100 * scores["planted"]["detection_rate"], abs=0.05)
    assert float(today[2].rstrip("%")) == 0.0  # no image test: nothing found by it alone
    # --regions-from: the same region scores, the image scores computed anew (here per cell of a 2 x 2 grid).
    assert bench.main([*argv, "--folds", "5", "--regions-from", str(cache), "--grid", "2"]) == 0
    grid = _table_rows("| image test |" + capsys.readouterr().out.split("\n| image test |")[1])
    assert grid["none (today)"] == today  # the regions alone: the very row of the full run


def test_the_false_alarm_check_counts_the_image_test_and_reports_its_evidence(
    hybrid_bundle: Path, synthetic_data_dir: Path
) -> None:
    """`uflow calibrate nfa` on a bundle with an image test: every map gets its row, the texture map its
    image test's log10 NFA (the region null's comparison does not apply to it)."""
    from calibration.data import select_images
    from calibration.nfa_check import check_bundle, format_report

    report = check_bundle(hybrid_bundle, select_images(synthetic_data_dir / "train" / "good", 6))
    texture = next(s for s in report.scales if s["name"] == "t_0")
    assert (
        "best_log_p_real" not in texture
        and texture["image_test_log_nfa"]["min"] <= texture["image_test_log_nfa"]["max"]
    )
    # Good training images: the texture head saw them, so the image test finds nothing on them.
    assert texture["image_test_log_nfa"]["min"] > -2.0
    table = format_report(report)
    assert "| t_0 (image test, log10 NFA) |" in table and "| k_1 |" in table


def test_the_run_and_its_bundle_carry_the_same_image_test(hybrid_run: Path, hybrid_bundle: Path) -> None:
    """Training writes the image test once (val_scores.json); evaluating the run and the agent's scorer on
    the exported bundle read the same test from it."""
    from edge_agent.inspection.scoring import image_test_of
    from training.evaluate import _decision

    _, _, from_run = _decision(hybrid_run, None, "bundle")
    from_bundle = image_test_of(load_bundle(hybrid_bundle).manifest)
    assert from_run is not None and from_bundle is not None
    assert (from_run.scores, from_run.share, from_run.tail) == (from_bundle.scores, from_bundle.share, from_bundle.tail)
    assert _decision(hybrid_run, None, "polyomino")[2] is None


def test_without_enough_good_scores_there_is_no_image_test_and_export_drops_the_texture_map(
    hybrid_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Too few good images for the image test's null: training says so and records none; a run without one
    exports without the texture map (no map in a bundle without its test), and says so."""
    import logging

    from training.export import export_bundle
    from training.finish import fit_image_test
    from training.rundir import load_model

    model, _ = load_model(hybrid_run)
    heads = model.scales[len(model.flow_scales) :]
    head_maps = [np.ones((19, 1, 1)) if s.head == "texture" else np.ones((19, 2, 2)) for s in heads]
    with caplog.at_level(logging.WARNING, logger="training.finish"):
        assert fit_image_test(model, head_maps) is None
    assert any(getattr(r, "event", None) == "train_image_test_skipped" and r.images == 19 for r in caplog.records)
    run = tmp_path / "run"
    shutil.copytree(hybrid_run, run)
    scores = json.loads((run / "val_scores.json").read_text())
    scores["image_test"] = None
    (run / "val_scores.json").write_text(json.dumps(scores))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="training.export"):
        manifest = load_bundle(export_bundle(run, tmp_path / "bundle", name="no-test", version="1")).manifest
    assert "texture" not in {s.head for s in manifest.scales} and manifest.nfa.image_test is None
    assert len(manifest.nfa.scale_nulls) == len(manifest.scales) == 6
    assert any(getattr(r, "event", None) == "export_texture_dropped" for r in caplog.records)


def test_the_mask_fraction_bench_reproduces_evaluates_miou_at_the_runs_fraction(
    regions_run: Path, synthetic_data_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """bench/mask_fraction.py computes the decision masks as the agent and ``uflow evaluate`` do: its row at
    the run's own fraction is evaluate's mIoU (NFA), and every fraction gets a row with IoUs in [0, 1]."""
    from training.evaluate import evaluate

    scores = json.loads((regions_run / "val_scores.json").read_text())
    fraction = scores["mask_fraction"]
    assert fraction == scores["mask_fraction_choice"]["chosen"]  # training's finish chose it on its planted defects
    bench = _bench("mask_fraction")
    argv = ["--run", str(regions_run), "--data", str(synthetic_data_dir), "--threads", "1", "--seeds", "1"]
    assert bench.main(argv) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert set(rows) == {f"{f:g}" for f in bench.FRACTIONS}
    assert all(0.0 <= float(cell) <= 1.0 for row in rows.values() for cell in row)
    assert rows["0"] != rows["0.8"]  # tightening moves the masks on these defects
    result = evaluate(synthetic_data_dir, tmp_path / "report", run_dir=regions_run, threads=1)
    assert float(rows[f"{fraction:g}"][1]) == pytest.approx(result["overall"]["miou_nfa"], abs=5e-4)


@pytest.fixture(scope="module")
def detail_pair(
    hybrid_run: Path, synthetic_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, Path]:
    """The hybrid run's flow without and with the detail head (bench/refit_heads.py), and the latter's bundle."""
    from training.export import export_bundle

    root = tmp_path_factory.mktemp("detail")
    refit = _bench("refit_heads").refit
    refit(hybrid_run, root / "without", str(synthetic_data_dir), {"heads": REGION_AND_IMAGE_HEADS})
    with_detail = {"heads": (*REGION_AND_IMAGE_HEADS, "detail"), "detail_share": 0.5}
    refit(hybrid_run, root / "with", str(synthetic_data_dir), with_detail)
    bundle = export_bundle(root / "with", root / "bundle", name="detail", version="1")
    return root / "without", root / "with", bundle


def test_the_detail_map_feeds_the_anomaly_map_and_no_test(
    detail_pair: tuple[Path, Path, Path], synthetic_data_dir: Path
) -> None:
    """The detail head (a positional Gaussian at the finest stride) is an output of the graph that the anomaly
    map fuses and no NFA test reads: training's decision, the manifest's NFA and the agent's log NFA are those
    of the same flow without it, and the anomaly map is the geometric mean with it, at its share of the weight."""
    from calibration.data import select_images
    from calibration.int8 import conv_groups
    from calibration.nfa_check import check_bundle, format_report
    from training.export import export_bundle
    from training.rundir import load_model
    from training.synthetic import defect_image

    without_run, with_run, bundle_dir = detail_pair
    before = json.loads((without_run / "val_scores.json").read_text())
    after = json.loads((with_run / "val_scores.json").read_text())
    for key in ("nfa_null", "nfa_evidence_scale", "nfa_calibration", "image_test", "min_log_nfa", "planted"):
        assert after[key] == before[key], key
    assert after["scores"] != before["scores"]  # the anomaly map reads it
    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    model, _ = load_model(with_run)
    detail = [(s.name, s.head, s.stride, s.channels) for s in manifest.scales if s.head == "detail"]
    assert detail == [("p_0", "detail", 8, model.feature_shapes[0][0])]  # the finest backbone features
    plain = load_bundle(export_bundle(without_run, bundle_dir.parent / "plain", name="plain", version="1")).manifest
    # No null, no test, the same number of tests; only where a region is drawn follows each run's own map.
    same = {"mask_fraction": 0.0}
    assert manifest.nfa.model_copy(update=same) == plain.nfa.model_copy(update=same)
    raw = json.loads((bundle_dir / "model.json").read_text())
    raw["scales"].insert(-1, {**raw["scales"][-2], "name": "p_1"})  # a second detail map
    copy = bundle_dir.parent / "two_details"
    shutil.copytree(bundle_dir, copy)
    (copy / "model.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="at most one detail map"):
        load_bundle(copy)
    assert check_graph(bundle_dir / "model.onnx", "fp32") == []
    # Its whitening (a covariance per position, the default) is one batched MatMul, a head layer: INT8 and FP16
    # keep it in FP32 (five head layers without it).
    heads = conv_groups(onnx.load(str(bundle_dir / "model.onnx"))).groups["heads"]
    assert len(heads) == 6 and "/detail_0/MatMul" in heads

    sample = defect_image(seed=5, height=HYBRID_SIZE, width=HYBRID_SIZE, kind="dark_blob")
    outputs = {}
    for name, path in (("with", bundle_dir), ("without", bundle_dir.parent / "plain")):
        engine = OnnxRuntimeEngine(load_bundle(path))
        try:
            outputs[name] = engine.infer(sample.image)
        finally:
            engine.close()
    size = (HYBRID_SIZE, HYBRID_SIZE)
    names = [s.name for s in manifest.scales]
    kept = [names.index(s.name) for s in plain.scales]
    for k, want in zip(kept, outputs["without"].scale_maps, strict=True):
        np.testing.assert_allclose(outputs["with"].scale_maps[k], want, rtol=1e-5, atol=1e-6)
    verdicts = [FrameScorer(m).score(outputs[n], size) for n, m in (("with", manifest), ("without", plain))]
    np.testing.assert_allclose(verdicts[0].log_nfa, verdicts[1].log_nfa, rtol=1e-5, atol=1e-5)
    assert verdicts[0].anomalous == verdicts[1].anomalous
    # The anomaly map: the geometric mean of every map but the texture score over the run's own means, in
    # which the detail map weighs half and the six others (two flow maps, two Gaussians, two banks) a twelfth each.
    fused = model.fusion_indices
    ratios = _upsampled_ratios(
        [outputs["with"].scale_maps[i] for i in fused], [float(model.map_means[i]) for i in fused], size
    )
    assert names[model.fusion_indices[-1]] == "p_0" and len(ratios) == 7
    weights = np.array([0.5 / 6] * 6 + [0.5])
    logs = np.stack([np.log(np.maximum(r, 0.05)) for r in ratios])
    geometric = np.exp(np.tensordot(weights, logs, axes=1))
    np.testing.assert_allclose(outputs["with"].anomaly_map, geometric, rtol=1e-4, atol=1e-5)
    assert np.abs(outputs["with"].anomaly_map - outputs["without"].anomaly_map).max() > 1e-3
    assert float(outputs["with"].anomaly_map[sample.mask].mean()) > float(
        outputs["with"].anomaly_map[~sample.mask].mean()
    )
    # `uflow calibrate nfa`: the detail map gets its statistics row and no test's.
    report = check_bundle(bundle_dir, select_images(synthetic_data_dir / "train" / "good", 4))
    row = next(s for s in report.scales if s["name"] == "p_0")
    assert (
        "best_log_p_real" not in row
        and "image_test_log_nfa" not in row
        and report.images_triggered_by_scale["p_0"] == 0
    )
    assert "| p_0 |" in format_report(report)


def test_a_covariance_per_position_is_padim_fit_exported_as_one_batched_matmul(tmp_path: Path) -> None:
    """The detail head with a covariance per position gives, per position, the mean over channels of the square
    of L_p^-1 (x - mu_p) with L_p the Cholesky factor of that position's covariance plus 0.01 I; the exported
    graph computes the same through ONNX Runtime and passes the TensorRT check, its MatMul inside the head."""
    import onnxruntime as ort

    from training.heads import POSITION_RIDGE, per_position_parameters, whitened_square_mean
    from training.model import UFlowConfig

    torch.manual_seed(3)
    good = torch.randn(40, 5, 3, 4) * torch.linspace(0.2, 3.0, 5).view(1, 5, 1, 1) + 4.0 * torch.randn(1, 5, 3, 4)
    mean, inverse = per_position_parameters(good)
    head = GaussianHead(5, (3, 4), per_position=True)
    head.set(mean, inverse)
    x = torch.randn(2, 5, 3, 4)
    got = head(x)
    for y in range(3):
        for col in range(4):
            rows = good[:, :, y, col].double()
            covariance = torch.cov(rows.T) + POSITION_RIDGE * torch.eye(5, dtype=torch.float64)
            z = torch.linalg.solve_triangular(
                torch.linalg.cholesky(covariance), (x[:, :, y, col].double() - rows.mean(0)).T, upper=False
            )
            torch.testing.assert_close(got[:, y, col].double(), z.pow(2).mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(whitened_square_mean(x, mean, inverse), got, rtol=1e-5, atol=1e-6)
    path = tmp_path / "detail.onnx"
    torch.onnx.export(head, (x[:1],), str(path), output_names=["p_0"], opset_version=17, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_map,) = session.run(None, {session.get_inputs()[0].name: x[:1].numpy()})
    np.testing.assert_allclose(onnx_map, got[:1].numpy(), rtol=1e-5, atol=1e-6)
    assert check_graph(path, "fp32") == []
    assert {"MatMul", "Pow", "ReduceMean"} <= {n.op_type for n in head_nodes(onnx.load(str(path)).graph, ["p_0"])}
    with pytest.raises(ValueError, match="shape"):
        GaussianHead(5, None, per_position=True)
    # New runs fit one covariance per position; a run config from before the key shared one.
    assert UFlowConfig().detail_covariance == "position"
    old = {k: v for k, v in UFlowConfig().to_dict().items() if k != "detail_covariance"}
    assert UFlowConfig.from_dict(old).detail_covariance == "shared"
    with pytest.raises(ValueError, match="detail covariance"):
        UFlowConfig(detail_covariance="diagonal")


def test_a_detail_share_is_a_weight_in_the_fusion_and_nothing_else() -> None:
    """``detail_share`` weighs the detail map in the fused map (the rest shared equally); it is refused outside
    (0, 1) and without the detail head; as None every map weighs the same; old run configs read as None."""
    from training.model import UFlow, UFlowConfig

    heads = (*REGION_AND_IMAGE_HEADS, "detail")
    small = {"image_height": 64, "image_width": 64, "strides": (8, 16), "bank_size": 8, "fine_bank_size": 4}
    model = UFlow(UFlowConfig(**small, heads=heads, detail_share=0.4), weights=None, random_weights=True)
    weights = model.fusion_weights()
    assert weights is not None and len(weights) == len(model.fusion_indices) == 7
    assert float(weights[-1]) == pytest.approx(0.4) and float(weights.sum()) == pytest.approx(1.0)
    assert UFlow(UFlowConfig(**small, heads=heads), weights=None, random_weights=True).fusion_weights() is None
    with pytest.raises(ValueError, match="add the detail head"):
        UFlowConfig(**small, heads=REGION_AND_IMAGE_HEADS, detail_share=0.4)  # a weight for a map it does not have
    for bad in (0.0, 1.0, -0.2):
        with pytest.raises(ValueError, match="detail_share"):
            UFlowConfig(**small, heads=heads, detail_share=bad)
    old = {k: v for k, v in UFlowConfig().to_dict().items() if k != "detail_share"}
    assert UFlowConfig.from_dict(old).detail_share is None
    # "auto" is the one word it takes: chosen at training's finish, equal weights until then.
    auto = UFlow(UFlowConfig(**small, heads=heads, detail_share="auto"), weights=None, random_weights=True)
    assert auto.fusion_weights() is None
    assert UFlowConfig(**small, detail_share="auto").detail_share == "auto"  # nothing to choose: harmless
    with pytest.raises(ValueError, match="detail_share"):
        UFlowConfig(**small, heads=heads, detail_share="heavy")


def _planted_study(model: Any, detail_map: str, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray]]:
    """Maps of 12 planted and 12 clean images for ``model``'s scales: every map noise around 1, the planted
    defect (a square) raised a little in the region maps; the detail map is the defect itself ("sharp") or
    heavy-tailed noise ("noise")."""
    rng = np.random.default_rng(seed)
    height, width = model.config.image_height, model.config.image_width
    masks = np.zeros((12, height, width), bool)
    for i in range(12):
        y, x = rng.integers(4, height - 20, 2)
        masks[i, y : y + 14, x : x + 14] = True

    def maps_of(count: int, planted: bool) -> list[np.ndarray]:
        out = []
        for scale in model.scales:
            h, w = scale.height, scale.width
            m = 1.0 + 0.3 * rng.random((count, h, w))
            if scale.head == "detail" and detail_map == "noise":
                m = np.exp(rng.normal(0.0, 1.0, (count, h, w)))  # heavy-tailed: spikes on clean images too
            if planted:
                small = np.stack(
                    [cv2.resize(k.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA) for k in masks]
                )
                sharp = scale.head == "detail" and detail_map == "sharp"
                m = m + (8.0 if sharp else 0.4) * small
            out.append(m.astype(np.float32))
        return out

    return maps_of(12, True), masks, maps_of(12, False)


def test_the_detail_share_is_chosen_on_planted_defects_by_the_mean_of_three_columns() -> None:
    """``choose_detail_share`` scores each candidate weight by the graph's own fusion on planted defects against
    clean images: a detail map that is the defect wins a heavy weight, a detail map of noise is left out."""
    from training.detail_choice import CANDIDATES, choose_detail_share, parse_detail_share
    from training.model import UFlow, UFlowConfig

    heads = (*REGION_AND_IMAGE_HEADS, "detail")
    config = UFlowConfig(
        image_height=64,
        image_width=64,
        strides=(8, 16),
        bank_size=8,
        fine_bank_size=4,
        heads=heads,
        detail_share="auto",
    )
    model = UFlow(config, weights=None, random_weights=True)
    sharp = choose_detail_share(model, *_planted_study(model, "sharp"))
    noise = choose_detail_share(model, *_planted_study(model, "noise"))
    assert sharp.label == "0.75" and sharp.share == 0.75 and not sharp.drops_the_head
    assert noise.label == "without" and noise.drops_the_head
    for choice in (sharp, noise):
        assert list(choice.scores) == [label for label, _ in CANDIDATES]
        means = [values[3] for values in choice.scores.values()]
        assert choice.scores[choice.label][3] == max(means)
        assert means.index(max(means)) == list(choice.scores).index(choice.label)  # the first best on a tie
        assert all(0.0 <= v <= 1.0 for values in choice.scores.values() for v in values)
        assert choice.planted == choice.clean == 12
    assert sharp.scores["0.75"][1] > sharp.scores["without"][1]  # AUPRO: the sharp map localises
    assert model.config.detail_share == "auto"  # scoring changed nothing in the model
    assert (parse_detail_share("auto"), parse_detail_share("equal"), parse_detail_share("0.3")) == ("auto", None, 0.3)
    with pytest.raises(ValueError, match="--detail-share takes"):
        parse_detail_share("heavy")
    flow_only = UFlow(
        UFlowConfig(image_height=64, image_width=64, strides=(8, 16), heads=("flow",), detail_share=None),
        weights=None,
        random_weights=True,
    )
    with pytest.raises(ValueError, match="no detail head"):
        choose_detail_share(flow_only, [], np.zeros((0, 64, 64), bool), [])


@pytest.mark.parametrize("forced", ["without", "0.5"])
def test_training_finish_writes_the_chosen_detail_share_into_the_run(
    forced: str,
    hybrid_run: Path,
    detail_pair: tuple[Path, Path, Path],
    synthetic_data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With ``detail_share="auto"`` training's finish writes its choice into the run: config.json and the
    checkpoint agree on it, val_scores.json records every candidate's columns, the decision is the one the same
    flow makes without the detail head, and "without" leaves a run (and a bundle) that has no detail map."""
    from training import detail_choice
    from training.export import export_bundle
    from training.rundir import load_model

    # Only the forced candidate: both of finish's branches run whatever the synthetic data would choose.
    monkeypatch.setattr(detail_choice, "CANDIDATES", tuple(c for c in detail_choice.CANDIDATES if c[0] == forced))
    run = tmp_path / "auto"
    with_auto = {"heads": (*REGION_AND_IMAGE_HEADS, "detail"), "detail_share": "auto"}
    _bench("refit_heads").refit(hybrid_run, run, str(synthetic_data_dir), with_auto)
    scores = json.loads((run / "val_scores.json").read_text())
    assert scores["detail_share"]["chosen"] == forced and list(scores["detail_share"]["scores"]) == [forced]
    model, info = load_model(run)  # refuses a checkpoint whose config differs from config.json's
    without = json.loads((detail_pair[0] / "val_scores.json").read_text())
    for key in ("nfa_null", "nfa_evidence_scale", "nfa_calibration", "image_test", "min_log_nfa", "planted"):
        assert scores[key] == without[key], key
    manifest = load_bundle(export_bundle(run, tmp_path / "bundle", name="auto", version="1")).manifest
    from edge_agent.cli.doctor import check_detection_power

    power = check_detection_power(manifest).detail
    if forced == "without":
        assert "detail" not in info.model_config.heads and model.config.detail_share is None
        assert [s.head for s in manifest.scales] == [s.head for s in load_model(detail_pair[0])[0].scales]
        assert scores["scores"] == without["scores"]  # the same anomaly map as the run without it
        assert "anomaly_map_detail_weight" not in manifest.validation_metrics and "detail map" not in power
    else:
        assert "detail" in info.model_config.heads and model.config.detail_share == 0.5
        assert "p_0" in [s.name for s in manifest.scales]
        assert scores["scores"] != without["scores"]
        assert manifest.validation_metrics["anomaly_map_detail_weight"] == 0.5
        assert "weighs the stride-8 detail map at 50%" in power
    # The mask fraction chosen on the planted defects, and its planted mIoU, travel with the bundle.
    chosen = scores["mask_fraction_choice"]
    assert manifest.nfa.mask_fraction == chosen["chosen"] == scores["mask_fraction"]
    miou = chosen["planted_miou"][f"{chosen['chosen']:g}"]
    assert manifest.validation_metrics["planted_mask_miou"] == pytest.approx(miou)


def test_the_mask_fraction_is_the_one_whose_masks_fit_the_planted_defects_best() -> None:
    """``choose_mask_fraction`` tightens the decision's regions as the agent does and keeps the fraction with the
    best planted mean IoU: a region four times the defect, around a map that peaks on the defect, wants a high
    fraction; when every fraction fits the same, the default wins."""
    from training.mask_choice import FRACTIONS, choose_mask_fraction

    size, count = 48, 6
    truth = np.zeros((count, size, size), bool)
    detected = np.zeros_like(truth)
    yy, xx = np.mgrid[:size, :size]
    amaps = np.zeros((count, size, size), np.float32)
    for i in range(count):
        y, x = 10 + 3 * i, 12 + 2 * i
        truth[i, y : y + 8, x : x + 8] = True
        detected[i, y - 4 : y + 12, x - 4 : x + 12] = True  # the NFA's region: the defect and a wide margin
        amaps[i] = 1.0 + np.exp(-(((yy - y - 3.5) ** 2 + (xx - x - 3.5) ** 2) / 40.0)) * 4.0  # peaks on it
    choice = choose_mask_fraction(list(detected), amaps, truth, default=0.8)
    assert set(choice.miou) == set(FRACTIONS) and choice.planted == count
    assert choice.fraction > 0.0 and choice.miou[choice.fraction] == max(choice.miou.values())
    assert choice.miou[choice.fraction] > choice.miou[0.0] + 0.2  # the untightened region is 4x the defect
    exact = choose_mask_fraction(list(truth), np.ones_like(amaps), truth, default=0.6)  # a flat map: no change
    assert exact.fraction == 0.6 and all(v == 1.0 for v in exact.miou.values())
    assert exact.to_dict()["chosen"] == 0.6
    with pytest.raises(ValueError, match="as many masks"):
        choose_mask_fraction(list(detected[:2]), amaps, truth, default=0.8)


def test_a_variant_whose_maps_drift_is_told_by_the_bundles_own_decision(
    hybrid_bundle: Path, synthetic_data_dir: Path, tmp_path: Path
) -> None:
    """The precision check decides each good image with the bundle's own NFA on both models' outputs: the same
    model agrees with itself; a model whose finest flow map is 5x larger (what INT8 rounding in the flow did to
    the bottle's m_0, docs/precision.md) flags good images FP32 does not, and the check says so."""
    from onnx import helper

    from calibration.agreement import bundle_scorer, compare_models
    from calibration.data import model_batches, select_images

    bundle = load_bundle(hybrid_bundle)
    model = onnx.load(str(bundle.onnx_path))
    producer = next(node for node in model.graph.node if "m_0" in node.output)
    producer.output[list(producer.output).index("m_0")] = "m_0_fp32"
    factor = helper.make_tensor("drift_factor", onnx.TensorProto.FLOAT, [], [5.0])
    model.graph.initializer.append(factor)
    model.graph.node.append(helper.make_node("Mul", ["m_0_fp32", "drift_factor"], ["m_0"], name="drift"))
    drifted = tmp_path / "drifted.onnx"
    onnx.save(model, str(drifted))

    spec = bundle.manifest.input
    images = select_images(synthetic_data_dir / "train" / "good", 6)
    batches = list(model_batches(images, spec.height, spec.width))
    scorer = bundle_scorer(bundle)
    same = compare_models(bundle.onnx_path, bundle.onnx_path, batches, spec.name, scorer)
    assert same.decision_problem() is None
    assert same.evidence_shift_max == 0.0 and same.good_flagged_candidate == same.good_flagged_reference
    drift = compare_models(bundle.onnx_path, drifted, batches, spec.name, scorer)
    assert drift.good_flagged_candidate is not None and drift.good_flagged_reference is not None
    assert drift.good_flagged_candidate > drift.good_flagged_reference
    problem = drift.decision_problem()
    assert problem is not None and f"flags {drift.good_flagged_candidate} of 6 good images" in problem
    assert {"good_flagged_fp32", "good_flagged", "log10_nfa_max_drop"} <= set(drift.as_metrics())


def test_calibrate_int8_refuses_a_model_that_flags_good_images_fp32_does_not(
    hybrid_bundle: Path, synthetic_data_dir: Path, tmp_path: Path
) -> None:
    """INT8 with nothing kept in FP32 (the backbone quantized too) moves every map the NFA tests: the bundle's
    own decision flags good images FP32 does not, so `uflow calibrate int8` refuses it and records nothing."""
    from calibration.int8 import Int8Settings, QuantizationError
    from calibration.int8 import calibrate_bundle as calibrate_int8

    root = tmp_path / "bundle"
    shutil.copytree(hybrid_bundle, root)
    good = synthetic_data_dir / "train" / "good"
    with pytest.raises(QuantizationError, match="does not decide as FP32 on 8 held-out good images") as refused:
        calibrate_int8(root, good, Int8Settings(images=8, method="minmax", keep_fp32=()))
    assert "good images where FP32 flags" in str(refused.value)  # the reason: its decisions, not its pixels
    assert load_bundle(root).manifest.variant("int8") is None and not (root / "model.int8.onnx").exists()
