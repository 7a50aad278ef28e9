"""Zero-shot QAT for detection (det_repq_vit/zsqat.py, tools/zsqat.py) on the tiny random Swin Mask
R-CNN of tests/test_detection.py and the labelled synthetic set of tests/test_datafree.py (8 images,
128², CPU). Every training run is a few iterations; the properties checked can fail."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_datafree import _det_model, _free_port, _need_mmdet, det_setup, det_synth  # noqa: F401 (fixtures)

_need_mmdet()

from det_repq_vit import zsqat as Z  # noqa: E402
from qwt_core.lsq import LSQQuantizer  # noqa: E402
from qwt_core.plotting import LOSS_SIZE_PX, read_plot_data  # noqa: E402
from qwt_core.synth_io import load_synthetic_set  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _batch(det_synth, indices=(0, 1)):
    out, _ = det_synth
    return Z.SyntheticDetectionData(load_synthetic_set(out)).batch(list(indices), "cpu")


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------- loss pieces
def test_kl_mse_zero_when_student_is_teacher(det_setup, det_synth):
    cfg_path, ckpt, _ = det_setup
    teacher, student = _det_model(cfg_path, ckpt), _det_model(cfg_path, ckpt)
    batch = _batch(det_synth)
    with Z.DetectionDistiller(student, teacher) as d:
        student.train()
        same = d(batch)
        with torch.no_grad():
            student.backbone.stages[1].blocks[0].ffn.layers[0][0].weight.mul_(1.5)
            student.rpn_head.rpn_conv.weight.add_(0.05)
        diff = d(batch)
    assert same["kl"].item() == pytest.approx(0.0, abs=1e-7) and same["mse"].item() == 0.0
    assert torch.isfinite(same["det"]) and same["det"].item() > 0
    assert diff["kl"].item() > 1e-7 and diff["mse"].item() > 1e-6
    assert any(k.startswith("det/loss_rpn") for k in same)


def test_rpn_logits_concatenate_levels_per_image():
    cls = [torch.arange(2 * 3 * 4 * 4.0).view(2, 3, 4, 4), torch.ones(2, 3, 2, 2)]
    box = [torch.zeros(2, 12, 4, 4), torch.full((2, 12, 2, 2), 2.0)]
    z = Z.rpn_logits((cls, box))
    assert z.shape == (2, 48 + 12 + 192 + 48)
    assert torch.equal(z[1, :48], cls[0][1].reshape(-1)) and torch.equal(z[0, -48:], box[1][0].reshape(-1))


def test_dfq_steps_lower_distillation_loss_and_teacher_unchanged(det_setup, det_synth):
    cfg_path, ckpt, _ = det_setup
    teacher, student = _det_model(cfg_path, ckpt), _det_model(cfg_path, ckpt)
    names = Z.quantize_backbone_lsq(student, 4, 4)
    # DFQ's selection: every backbone Linear + the patch-embed conv, nothing outside the backbone
    assert "backbone.patch_embed.projection" in names and all(n.startswith("backbone.") for n in names)
    assert any(n.endswith("attn.w_msa.qkv") for n in names) and any(n.endswith("downsample.reduction") for n in names)
    batch = _batch(det_synth)
    assert Z.init_lsq_steps(student, batch["inputs"]) == 2 * len(names)
    q = student.backbone.patch_embed.projection.weight_quantizer
    assert isinstance(q, LSQQuantizer)
    w = student.backbone.patch_embed.projection.weight.detach()
    assert q.step.item() == pytest.approx(2 * w.abs().mean().item() / (2 ** 3 - 1) ** 0.5, rel=1e-5)
    t_before = _state(teacher)
    cfg = Z.ZsqatConfig(mode="dfq", w_bits=4, a_bits=4, lr=2e-4, warmup_iters=0, w_det=0.0)
    named = Z.trainable_parameters(student, cfg)
    opt = Z.build_optimizer(student, named, cfg)
    steps0 = [p.detach().clone() for p in Z.step_parameters(student)]
    w0 = student.neck.fpn_convs[0].conv.weight.detach().clone()
    losses = []
    with Z.DetectionDistiller(student, teacher, w_det=0.0) as d:
        student.train()
        for _ in range(3):
            out = d(batch)
            losses.append(out["kl"].item() + out["mse"].item())
            opt.zero_grad()
            out["total"].backward()
            Z.average_gradients([p for _, p in named])
            opt.step()
        out = d(batch)
        losses.append(out["kl"].item() + out["mse"].item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses
    assert any(not torch.equal(a, b) for a, b in zip(steps0, Z.step_parameters(student)))
    assert not torch.equal(w0, student.neck.fpn_convs[0].conv.weight)
    t_after = teacher.state_dict()
    assert all(torch.equal(t_before[k], t_after[k]) for k in t_before)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_warmup_is_linear_then_constant():
    assert Z.warmup_factor(0, 1000, 0.001) == pytest.approx(0.001)
    assert Z.warmup_factor(500, 1000, 0.001) == pytest.approx(0.5005)
    assert Z.warmup_factor(1000, 1000, 0.001) == 1.0 == Z.warmup_factor(5000, 1000, 0.001)


# --------------------------------------------------------------------------------------- CLI
def _argv(det_setup, det_synth, work: Path, *extra: str) -> list[str]:
    cfg_path, ckpt, _ = det_setup
    out, _ = det_synth
    return [str(cfg_path), str(ckpt), "--synth-dir", str(out), "--work-dir", str(work), "--device", "cpu",
            "--no-progress", "--w_bits", "4", "--a_bits", "4", "--lr", "1e-4", "--warmup-iters", "2",
            "--batch-size", "2", "--iters", "2", *extra]


@pytest.fixture(scope="module")
def dfq_run(det_setup, det_synth, tmp_path_factory):
    """tools/zsqat.py --mode dfq: 2 epochs of 2 iterations (batch 2), no COCO evaluation."""
    from det_repq_vit.tools import zsqat as cli

    work = tmp_path_factory.mktemp("dfq")
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = cli.main(_argv(det_setup, det_synth, work, "--mode", "dfq", "--epochs", "2", "--skip-eval",
                             "--keep-checkpoints", "0"))
    finally:
        torch.set_num_threads(saved)
    return work, res


def test_dfq_cli_writes_checkpoints_json_and_png(dfq_run):
    work, res = dfq_run
    assert sorted(p.name for p in work.glob("epoch_*.pth")) == ["epoch_1.pth", "epoch_2.pth"]
    assert not list(work.glob("*.tmp*"))
    saved = json.loads((work / "zsqat_results.json").read_text())
    assert saved["mode"] == "dfq" and saved["reported"] == "last epoch" and saved["world_size"] == 1
    h = saved["history"]
    assert [r["iter"] for r in h] == [1, 2, 3, 4] and [r["epoch"] for r in h] == [1, 1, 2, 2]
    for r in h:
        assert all(k in r for k in ("total", "det", "kl", "mse", "lr")) and r["total"] > 0
        assert r["total"] == pytest.approx(r["det"] + r["kl"] + r["mse"], rel=1e-5)
    assert h[0]["lr"] < h[-1]["lr"] == pytest.approx(1e-4)  # warm-up, then constant
    assert [e["epoch"] for e in saved["epochs"]] == [1, 2]
    assert saved["steps"]["count"] > 0 and saved["quantized_layers"] > 0
    png = Path(saved["plot"])
    assert png.stat().st_size > 5000
    data = read_plot_data(str(png))
    assert data["kind"] == "loss_curves" and data["iters"] == [1, 2, 3, 4]
    assert data["curves"]["kl"] == pytest.approx([r["kl"] for r in h])
    from PIL import Image
    with Image.open(png) as im:
        assert im.size == LOSS_SIZE_PX


def test_resume_from_epoch_1_equals_uninterrupted(dfq_run, det_setup, det_synth, tmp_path):
    from det_repq_vit.tools import zsqat as cli

    work, res = dfq_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(work / "epoch_1.pth", resumed / "epoch_1.pth")
    res2 = cli.main(_argv(det_setup, det_synth, resumed, "--mode", "dfq", "--epochs", "2", "--skip-eval",
                          "--keep-checkpoints", "0", "--resume", "auto"))
    assert res2["start_epoch"] == 1 and res2["resumed_from"].endswith("epoch_1.pth")
    a = torch.load(work / "epoch_2.pth", weights_only=True)
    b = torch.load(resumed / "epoch_2.pth", weights_only=True)
    assert set(a["model"]) == set(b["model"])
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=1e-6, msg=k)
    assert [r["total"] for r in res2["history"]] == pytest.approx([r["total"] for r in res["history"]], abs=1e-6)
    # training really moved the student between the epochs
    e1 = torch.load(work / "epoch_1.pth", weights_only=True)["model"]
    assert any(not torch.equal(e1[k], a["model"][k]) for k in a["model"] if k.endswith(".step"))


def _updates(after: dict, before: dict, keys: list[str]) -> torch.Tensor:
    """What training changed in ``keys``, flattened into one vector."""
    return torch.cat([(after[k].double() - before[k].double()).flatten() for k in keys])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def _weight_grid(state: dict, prefix: str) -> torch.Tensor:
    """Integer grid indices of a layer's LSQ-quantized weight: ``clamp(round(w / s), -Q_N, Q_P)``."""
    w, s = state[prefix + ".weight"], state[prefix + ".weight_quantizer.step"]
    return torch.round(w / s).clamp(-(2 ** 3), 2 ** 3 - 1)  # W4 (signed LSQ): Q_N = 8, Q_P = 7


def test_two_gloo_processes_equal_one(det_setup, det_synth, tmp_path):
    """dist_zsqat.sh with 2 CPU processes x 1 image against one process x 2 images (the detection loss
    is off: mmdet samples proposals at random and normalises per process).

    Exact, on every CPU: the global batch of every iteration, the rank spreads of the LSQ
    initialisation, steps and weights (the ranks agree bit for bit), and the initial steps that do
    not depend on batch-size-dependent kernels (every weight quantizer, and the input quantizer of
    the layer that reads the images). The rest differs by float rounding: conv / matmul kernels that
    depend on the batch size (1 image per process against 2) move a few activations across a
    rounding boundary, i.e. by exactly one quantization step, and that step propagates. So trained
    values are compared within one quantization step: every weight's grid index within one step of
    the other run's and at least 99 % identical; the losses, a mean over the quantized activations,
    within 1 % (KL, a difference of nearly equal distributions, 5 %); and what training changed
    points the same way (cosine >= 0.99; a run on other data gives about 0.5: the negative control)."""
    from det_repq_vit.tools import zsqat as cli

    out = tmp_path / "dist.json"
    env = dict(os.environ, PYTHON=sys.executable, PORT=str(_free_port()), OMP_NUM_THREADS="1")
    common = ("--mode", "dfq", "--epochs", "1", "--skip-eval", "--w-det", "0")
    argv = _argv(det_setup, det_synth, tmp_path / "work2", *common, "--output", str(out))
    argv[argv.index("--batch-size") + 1] = "1"
    proc = subprocess.run(["bash", "tools/dist_zsqat.sh", argv[0], argv[1], "2", *argv[2:]],
                          cwd=ROOT / "det_repq_vit", env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two["world_size"] == 2 and two["global_batch"] == 2 and len(two["history"]) == 2
    assert two["lsq_init_rank_spread"] == 0.0  # all-reduced init statistics, not rank 0's images
    assert two["step_rank_spread"] == 0.0 and two["param_rank_spread"] == 0.0
    one = cli.main(_argv(det_setup, det_synth, tmp_path / "work1", *common))
    assert one["world_size"] == 1 and one["global_batch"] == 2
    # exact: the data of every iteration, and the initial steps computed from identical tensors
    assert [r["images"] for r in one["history"]] == [r["images"] for r in two["history"]]
    init1, init2 = one["lsq_init_steps"], two["lsq_init_steps"]
    assert set(init1) == set(init2) and init1
    exact = [k for k in init1 if k.endswith("weight_quantizer") or k.startswith("backbone.patch_embed.")]
    assert any(k.endswith("input_quantizer") for k in exact)
    assert {k: init2[k] for k in exact} == {k: init1[k] for k in exact}
    for k in init1:
        assert init2[k] == pytest.approx(init1[k], rel=1e-2), k
    for a, b in zip(one["history"], two["history"]):
        assert b["mse"] == pytest.approx(a["mse"], rel=1e-2) and b["kl"] == pytest.approx(a["kl"], rel=5e-2)
    sa = torch.load(tmp_path / "work1" / "epoch_1.pth", weights_only=True)["model"]
    sb = torch.load(tmp_path / "work2" / "epoch_1.pth", weights_only=True)["model"]
    assert set(sa) == set(sb)
    fp = torch.load(det_setup[1], weights_only=True)["state_dict"]
    weights = [k for k in fp if k.startswith("backbone.") and k.endswith("weight") and k in sa]
    moved = [float((sa[k] - fp[k]).abs().max()) for k in weights]  # training moved the weights
    assert max(moved) > 1e-5, max(moved)
    layers = sorted(k[:-len(".weight_quantizer.step")] for k in sa if k.endswith(".weight_quantizer.step"))
    assert layers
    for layer in layers:
        qa, qb = _weight_grid(sa, layer), _weight_grid(sb, layer)
        assert int((qa - qb).abs().max()) <= 1, layer
        assert float((qa != qb).double().mean()) <= 0.01, layer
    steps = [k for k in sa if k.endswith(".step")]
    upd_a, upd_b = _updates(sa, fp, weights), _updates(sb, fp, weights)
    assert _cosine(upd_a, upd_b) >= 0.99
    init_steps = {k + ".step": v for k, v in init1.items()}
    step_a = torch.tensor([float(sa[k]) - init_steps[k] for k in steps], dtype=torch.float64)
    step_b = torch.tensor([float(sb[k]) - init_steps[k] for k in steps], dtype=torch.float64)
    assert _cosine(step_a, step_b) >= 0.99
    # negative control: one process on one image per iteration (other data) trains differently,
    # and these comparisons see it
    argv3 = _argv(det_setup, det_synth, tmp_path / "work3", *common)
    argv3[argv3.index("--batch-size") + 1] = "1"
    cli.main(argv3)
    sc = torch.load(tmp_path / "work3" / "epoch_1.pth", weights_only=True)["model"]
    assert _cosine(upd_a, _updates(sc, fp, weights)) < 0.99
def test_repq_mode_calibrate_qat_qwt_evaluate(det_setup, det_synth, tmp_path):
    from det_repq_vit.tools import zsqat as cli

    res = cli.main(_argv(det_setup, det_synth, tmp_path, "--mode", "repq", "--epochs", "2", "--iters", "1",
                         "--calib_batch", "4", "--calib_size", "8", "--eval", "bbox", "--eval-every-epoch"))
    assert res["mode"] == "repq" and len(res["history"]) == 2
    assert res["steps"]["count"] > 100  # every uniform quantizer of the whole detector
    assert len(res["qwt_report"]["blocks"]) == 8 and all(b["rows"] > 0 for b in res["qwt_report"]["blocks"])
    assert 0.0 <= res["results"]["last"]["coco/bbox_mAP"] <= 1.0
    # per-epoch AP: the last epoch is the reported one; the best is labelled as chosen on val
    assert set(res["results"]) == {"epoch_1", "last"} and res["reported"] == "last epoch"
    best = res["ap"]["best_epoch_selected_on_val"]
    assert best["epoch"] in (1, 2) and "model selection" in best["note"]
    assert best["bbox"] == max(res["ap"]["epoch_1"]["bbox"], res["ap"]["last"]["bbox"])
    ck = torch.load(tmp_path / "epoch_2.pth", weights_only=True)
    assert any(k.endswith("weight_quantizer.delta") for k in ck["model"])


# --------------------------------------------------------------------------------- bad input
def _exit(argv) -> str:
    from det_repq_vit.tools import zsqat as cli

    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    text = str(e.value.code)
    assert e.value.code not in (0, None) and "\n" not in text.strip()
    return text


def _strip_labels(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    entry = manifest["shards"][-1]
    shard = torch.load(dst / entry["file"], weights_only=True)
    shard["targets"] = [None] * len(shard["targets"])
    torch.save(shard, dst / entry["file"])
    entry["sha256"] = hashlib.sha256((dst / entry["file"]).read_bytes()).hexdigest()
    (dst / "manifest.json").write_text(json.dumps(manifest))


def test_bad_inputs_stop_with_one_line_before_writing(det_setup, det_synth, dfq_run, tmp_path):
    cfg_path, ckpt, _ = det_setup
    out, _ = det_synth
    # 1. shards without labels
    nolab = tmp_path / "nolabels"
    _strip_labels(out, nolab)
    argv = _argv(det_setup, det_synth, tmp_path / "w1", "--skip-eval")
    argv[argv.index("--synth-dir") + 1] = str(nolab)
    assert "no usable detection labels" in _exit(argv)
    # 2. a teacher config that builds another detector (4 classes)
    t_cfg = tmp_path / "teacher.py"
    t_cfg.write_text(f"_base_ = [{str(cfg_path)!r}]\nmodel = dict(roi_head=dict(bbox_head=dict(num_classes=4)))\n")
    msg = _exit(_argv(det_setup, det_synth, tmp_path / "w2", "--skip-eval", "--teacher-config", str(t_cfg)))
    assert "does not build the same detector" in msg
    # 3. a corrupt resume file: stop, nothing overwritten or written
    work = tmp_path / "w3"
    work.mkdir()
    bad = work / "epoch_1.pth"
    bad.write_bytes(b"\x80\x02 not a checkpoint")
    before = bad.read_bytes()
    assert "cannot read resume file" in _exit(_argv(det_setup, det_synth, work, "--skip-eval", "--resume", str(bad)))
    assert bad.read_bytes() == before and sorted(p.name for p in work.iterdir()) == ["epoch_1.pth"]
    # 4. a resume file of another run (other bits)
    dfq_work, _ = dfq_run
    msg = _exit(_argv(det_setup, det_synth, tmp_path / "w4", "--skip-eval", "--resume",
                      str(dfq_work / "epoch_1.pth"), "--a_bits", "8"))
    assert "other settings" in msg and "a_bits" in msg
    assert not (tmp_path / "w1").exists() and not (tmp_path / "w2").exists() and not (tmp_path / "w4").exists()
