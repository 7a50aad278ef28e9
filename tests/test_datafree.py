"""Data-free calibration: inversion engine, priors, shard storage, adaptive label sampling, the
synthesis commands and synthetic calibration feeding RepQ-ViT + QwT (cls CLI and det tools/test.py).
CPU, tiny random models of the real timm / mmdet architectures."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cls_helpers import N_CLASSES, TINY, make_image_folder
from helpers_models import block_errors_with_and_without_qwt, tiny_resnet, tiny_swin, tiny_vit
from qwt_core import compensate
from qwt_core.adapters import quantize_timm_vit
from qwt_core.attention import QuantViTAttention, QuantWindowAttention
from qwt_core.inversion import (BNStatsPrior, InversionConfig, PatchSimilarityPrior, explicit_attention,
                                init_noise, invert, kde_entropy, lr_at, patch_similarity_entropy,
                                pixel_bounds, synthesize_batches, total_variation, tv_scale)
from qwt_core.synth_io import (SynthManifest, SynthSetError, load_synthetic_set,
                               prepare_folder, rank_batches, write_shard)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models, many small ops: one thread (two oversubscribe a busy 2-core machine badly) and
    the same numerics as the one-thread worker processes of the torchrun test."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# ------------------------------------------------------------------------------------ loss terms
def test_total_variation_equals_finite_differences():
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    a = x.numpy()
    sums = [0.0, 0.0, 0.0, 0.0]
    for b in range(2):
        for c in range(3):
            for i in range(5):
                for j in range(7):
                    if j + 1 < 7:
                        sums[0] += (a[b, c, i, j] - a[b, c, i, j + 1]) ** 2
                    if i + 1 < 5:
                        sums[1] += (a[b, c, i, j] - a[b, c, i + 1, j]) ** 2
                    if i + 1 < 5 and j + 1 < 7:
                        sums[2] += (a[b, c, i, j] - a[b, c, i + 1, j + 1]) ** 2
                    if i + 1 < 5 and j >= 1:
                        sums[3] += (a[b, c, i, j] - a[b, c, i + 1, j - 1]) ** 2
    expected = sum(math.sqrt(s) for s in sums)
    assert float(total_variation(x)) == pytest.approx(expected, rel=1e-12)
    assert tv_scale(12 * 3 * 640 * 640, 12 * 3 * 640 * 640) == 1.0
    assert tv_scale(3 * 320 * 320 * 3, 12 * 3 * 640 * 640) == pytest.approx(4.0)
    assert tv_scale(123, None) == 1.0


def _kde_entropy_direct(values: np.ndarray, grid_points: int, h: float) -> np.ndarray:
    grid = np.linspace(values.min(), values.max(), grid_points)
    out = []
    for row in values:
        p = np.array([np.mean(np.exp(-(t - row) ** 2 / (2 * h * h)) / (h * math.sqrt(2 * math.pi)))
                      for t in grid]) + 1e-4
        f = -p * np.log(p)
        out.append(np.sum((f[1:] + f[:-1]) / 2 * np.diff(grid)))
    return np.array(out)


def test_kde_entropy_matches_direct_formula_with_batch_global_grid():
    g = torch.Generator().manual_seed(0)
    vals = torch.rand(3, 50, generator=g, dtype=torch.float64) * 0.4
    vals[2] = vals[2] * 0.1 + 0.5  # a narrow row: its grid still spans the whole batch's range
    got = kde_entropy(vals, grid_points=10, bandwidth=0.05).numpy()
    np.testing.assert_allclose(got, _kde_entropy_direct(vals.numpy(), 10, 0.05), rtol=1e-10)
    # the grid is batch-global: row 0 alone gives a different entropy than inside the batch
    alone = kde_entropy(vals[:1], grid_points=10, bandwidth=0.05)
    assert abs(float(alone[0]) - got[0]) > 1e-6


def test_patch_similarity_entropy_properties():
    g = torch.Generator().manual_seed(1)
    # (B·n_w, heads, N, d) with B = 2 images of 3 windows each
    spread = torch.randn(6, 2, 9, 8, generator=g, dtype=torch.float64)
    same = torch.ones(6, 2, 9, 8, dtype=torch.float64)  # every token identical: similarity constant 1
    h_spread = patch_similarity_entropy(spread, 2, bandwidth=0.05)
    h_same = patch_similarity_entropy(same, 2, bandwidth=0.05)
    assert h_spread.shape == (2,) and torch.all(h_same < h_spread)
    # dropping token 0 of every window: changing it does not change the value
    changed = spread.clone()
    changed[:, :, 0] = 100 * torch.randn(6, 2, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(patch_similarity_entropy(changed, 2), patch_similarity_entropy(spread, 2))
    assert not torch.allclose(patch_similarity_entropy(changed, 2, drop_first_token=False),
                              patch_similarity_entropy(spread, 2, drop_first_token=False))
    # image b only owns its own windows: per-window reshaping groups rows 0-2 / 3-5
    manual = spread.mean(1)[:, 1:]
    manual = F.normalize(manual, dim=-1)
    sims = (manual @ manual.transpose(-1, -2)).reshape(2, -1)
    torch.testing.assert_close(patch_similarity_entropy(spread, 2), kde_entropy(sims, 10, 0.01))
    x = spread.clone().requires_grad_(True)
    (-patch_similarity_entropy(x, 2).mean()).backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="does not split"):
        patch_similarity_entropy(spread, 4)


def test_bn_stats_prior_equals_direct_computation():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5)).eval()
    for bn in (net[1], net[4]):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 3, 9, 9)
    with BNStatsPrior(net) as prior:
        prior.reset()
        net(x)
        got = prior.loss(x)
    a1 = net[0](x)
    a2 = net[3](net[2](net[1](a1)))
    want = 0.0
    for a, bn in ((a1, net[1]), (a2, net[4])):
        flat = a.permute(1, 0, 2, 3).reshape(a.shape[1], -1)
        mean, var = flat.mean(1), ((flat - flat.mean(1, keepdim=True)) ** 2).mean(1)
        want = want + (bn.running_var - var).norm() + (bn.running_mean - mean).norm()
    torch.testing.assert_close(got, want)
    assert not prior.handles  # removed on exit
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        BNStatsPrior(tiny_vit())


def test_lr_schedule_warmup_then_cosine_to_zero():
    assert lr_at(0, 0.2, 10, 100) == pytest.approx(0.02)
    assert lr_at(9, 0.2, 10, 100) == pytest.approx(0.2)
    assert lr_at(10, 0.2, 10, 100) == pytest.approx(0.2)
    assert lr_at(55, 0.2, 10, 100) == pytest.approx(0.1)
    assert lr_at(100, 0.2, 10, 100) == pytest.approx(0.0, abs=1e-12)
    lo, hi = pixel_bounds((0.5, 0.5, 0.5), (0.25, 0.5, 1.0), 1.0)
    assert lo.flatten().tolist() == [-2.0, -1.0, -0.5] and hi.flatten().tolist() == [2.0, 1.0, 0.5]


@pytest.mark.parametrize("make,kind,n", [(tiny_vit, QuantViTAttention, 3), (tiny_swin, QuantWindowAttention, 4)])
def test_explicit_attention_keeps_the_fp_function_and_restores(make, kind, n):
    model = make()
    size = 32 if make is tiny_vit else 56
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = model(x)
    originals = [type(m) for m in model.modules()]
    with explicit_attention(model) as found:
        assert found == 2 * n and sum(isinstance(m, kind) for m in model.modules()) == n
        prior = PatchSimilarityPrior(model)
        assert prior.num_blocks == n
        xg = x.clone().requires_grad_(True)
        out = model(xg)
        assert len(prior.outputs) == n
        loss = prior.loss(xg)
        expected = -sum(patch_similarity_entropy(o, 2).mean() for o in prior.outputs)
        loss.backward()
        prior.remove()
    torch.testing.assert_close(out.detach(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss.detach(), expected.detach())
    assert torch.isfinite(loss) and float(xg.grad.abs().sum()) > 0  # PSE reaches the pixels
    assert [type(m) for m in model.modules()] == originals


def test_invert_lowers_the_task_loss_and_respects_bounds():
    model = tiny_vit()
    y = torch.tensor([1, 7])
    bounds = pixel_bounds((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1.0)
    x0 = init_noise([0, 1], (3, 32, 32), seed=3)
    cfg = InversionConfig(iterations=15, lr=0.1, warmup=2, pse_weight=1.0, tv_weight=1e-3)
    with explicit_attention(model):
        with PatchSimilarityPrior(model) as pse:
            res = invert(x0, lambda x, it: F.cross_entropy(model(x), y), cfg, [pse], bounds=bounds,
                         progress=False)
    hist = res.history
    assert len(hist) == 15 and all(math.isfinite(h["total"]) for h in hist)
    assert set(hist[0]) >= {"task", "pse", "tv", "total", "lr"}
    assert np.mean([h["task"] for h in hist[-3:]]) < np.mean([h["task"] for h in hist[:3]])
    lo, hi = bounds
    assert torch.all(res.images >= lo - 1e-6) and torch.all(res.images <= hi + 1e-6)
    assert not torch.equal(res.images, x0)
    # per-image seeding: the same index gives the same noise whatever batch it is in
    torch.testing.assert_close(init_noise([5, 1], (3, 4, 4), 3)[1], init_noise([1], (3, 4, 4), 3)[0])


def test_invert_with_bn_prior_lowers_bn_statistics_loss():
    model = tiny_resnet()
    x0 = init_noise([0, 1], (3, 16, 16), seed=0)
    cfg = InversionConfig(iterations=10, lr=0.25, warmup=1, task_weight=0.0, bn_weight=1.0, clamp=False)
    with BNStatsPrior(model) as bn:
        res = invert(x0, lambda x, it: model(x).sum() * 0, cfg, [bn], progress=False)
    bn_loss = [h["bn"] for h in res.history]
    assert np.mean(bn_loss[-3:]) < 0.95 * np.mean(bn_loss[:3]), bn_loss


# ---------------------------------------------------------------------------------- shard storage
def _manifest(n: int = 5, b: int = 2, **kw) -> SynthManifest:
    args = dict(task="classification", seed=0, hparams={"iterations": 3}, label_source="uniform_classes",
                teacher={"model": "m", "weights_sha256": "abc"}, mean=[0.5] * 3, std=[0.5] * 3,
                image_size=[4, 4], num_images=n, batch_size=b)
    args.update(kw)
    return SynthManifest(**args)


def _fake_batch(batch: int, idx: list[int]):
    imgs = torch.stack([torch.full((3, 4, 4), float(i)) for i in idx])
    return imgs, [i % 3 for i in idx], [{"index": i} for i in idx]


def test_shards_round_trip_and_resume(tmp_path):
    out = tmp_path / "set"
    m = synthesize_batches(str(out), _manifest(), _fake_batch, progress=False)
    assert m.complete and [s["file"] for s in m.shards] == [
        "synth_r00_b00000.pt", "synth_r00_b00001.pt", "synth_r00_b00002.pt"]
    s = load_synthetic_set(out, expected_teacher={"model": "m"})
    assert len(s) == 5 and s.task == "classification"
    for i in range(5):
        item = s[i]
        assert torch.equal(item["image"], torch.full((3, 4, 4), float(i)))
        assert item["target"] == i % 3 and item["metainfo"] == {"index": i}
    assert [b.shape[0] for b in s.batches(3)] == [3, 2]
    assert json.loads((out / "manifest.json").read_text())["format"] == "qwt-synth-v1"
    # resume: nothing is redone
    calls = []
    synthesize_batches(str(out), _manifest(), lambda k, idx: calls.append(k) or _fake_batch(k, idx),
                       progress=False)
    assert calls == []
    # a deleted shard is redone, the others are kept
    (out / "synth_r00_b00001.pt").unlink()
    synthesize_batches(str(out), _manifest(), lambda k, idx: calls.append(k) or _fake_batch(k, idx),
                       progress=False)
    assert calls == [1] and len(load_synthetic_set(out)) == 5


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg
    return msg


def test_bad_sets_are_rejected_with_one_line(tmp_path):
    with pytest.raises(SynthSetError) as e:
        load_synthetic_set(tmp_path / "missing")
    assert "not found" in _one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SynthSetError) as e:
        load_synthetic_set(tmp_path / "empty")
    assert "manifest.json not found" in _one_line(e)

    out = tmp_path / "set"
    synthesize_batches(str(out), _manifest(), _fake_batch, progress=False)
    with pytest.raises(SynthSetError) as e:
        load_synthetic_set(out, expected_teacher={"weights_sha256": "other"})
    assert "different model" in _one_line(e)
    with pytest.raises(SynthSetError) as e:
        load_synthetic_set(out, task="detection")
    assert "classification set" in _one_line(e)
    # corrupt shard: detected by sha256 on load
    shard = out / "synth_r00_b00001.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    s = load_synthetic_set(out)
    s[0]
    with pytest.raises(SynthSetError) as e:
        s[2]
    assert "corrupt" in _one_line(e)
    # a folder holding another run's set is refused before anything is written
    with pytest.raises(SynthSetError) as e:
        prepare_folder(out, _manifest(seed=1))
    assert "other settings" in _one_line(e) and "seed" in str(e.value)
    # a manifest of something else
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(SynthSetError) as e:
        load_synthetic_set(tmp_path / "foreign")
    assert "not 'qwt-synth-v1'" in _one_line(e)


def test_half_written_shards_are_never_read(tmp_path):
    out = tmp_path / "set"
    m = _manifest(n=4, b=2)
    prepare_folder(out, m)
    write_shard(out, m, 0, 0, *_fake_batch(0, [0, 1]), indices=[0, 1])
    # a crash while writing batch 1: only a temporary file exists; an unlisted stray shard too
    (out / ".synth_r00_b00001.pt.abc.tmp").write_bytes(b"partial")
    torch.save({"images": torch.zeros(1)}, out / "synth_r00_b00009.pt")
    unfinished = SynthManifest.read(out)
    assert not unfinished.complete and [s["batch"] for s in unfinished.shards] == [0]
    with pytest.raises(SynthSetError) as e:
        load_synthetic_set(out)
    assert "unfinished (2 of 4 images)" in _one_line(e)
    s = load_synthetic_set(out, require_complete=False)
    assert len(s) == 2
    # resuming skips batch 0 and makes batch 1
    calls = []
    synthesize_batches(str(out), m, lambda k, idx: calls.append(k) or _fake_batch(k, idx), progress=False)
    assert calls == [1] and len(load_synthetic_set(out)) == 4


def test_rank_slices_are_disjoint_and_world_size_independent(tmp_path):
    for n, b, w in ((10, 3, 2), (7, 2, 3), (5, 5, 4)):
        parts = [rank_batches(n, b, r, w) for r in range(w)]
        assert sorted(sum(parts, [])) == rank_batches(n, b, 0, 1)
    # two "ranks" writing into one folder give the same manifest as one process
    m2 = _manifest(n=5, b=2)
    synthesize_batches(str(tmp_path / "w2"), m2, _fake_batch, rank=1, world_size=2, progress=False)
    m2 = synthesize_batches(str(tmp_path / "w2"), _manifest(n=5, b=2), _fake_batch, rank=0, world_size=2,
                            progress=False)
    m1 = synthesize_batches(str(tmp_path / "w1"), _manifest(n=5, b=2), _fake_batch, progress=False)
    assert m2.complete and [s["sha256"] for s in m2.shards] == [s["sha256"] for s in m1.shards]
    assert [s["file"] for s in m2.shards] == ["synth_r00_b00000.pt", "synth_r01_b00001.pt",
                                              "synth_r00_b00002.pt"]


# ----------------------------------------------------------------------------- classification
@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("imagefolder")))


@pytest.fixture(scope="module")
def deit_ckpt(tmp_path_factory):
    """A tiny random DeiT (3 classes) saved as a checkpoint, and its --model_kwargs."""
    from cls_repq_vit.cli import _parse_kwargs
    from cls_repq_vit.models import get_spec

    torch.manual_seed(5)
    model = get_spec("deit_small").create(_parse_kwargs(TINY["deit_small"]))
    path = tmp_path_factory.mktemp("ckpt") / "deit.pth"
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def _cls_synth_argv(ckpt: str, out: str, n: int = 16, extra=()):
    return ["--model", "deit_small", "--checkpoint", ckpt, "--model_kwargs", *TINY["deit_small"],
            "--num-images", str(n), "--out", out, "--batch-size", "8", "--iterations", "6",
            "--device", "cpu", "--no_progress", "--seed", "4", *extra]


@pytest.fixture(scope="module")
def cls_synth(deit_ckpt, tmp_path_factory):
    from cls_repq_vit import synthesize

    out = str(tmp_path_factory.mktemp("synth") / "deit")
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = synthesize.main(_cls_synth_argv(deit_ckpt, out, n=24))
    finally:
        torch.set_num_threads(saved)
    assert summary["complete"] and summary["batches_made"] == 3
    return out


def test_cls_synthesis_manifest_and_targets(cls_synth):
    s = load_synthetic_set(cls_synth, task="classification")
    m = s.manifest
    assert len(s) == 24 and m.image_size == [32, 32] and m.teacher["model"] == "deit_small"
    assert m.hparams["pse_weight"] == 1.0 and m.hparams["clamp"] is True
    assert [s[i]["target"] for i in range(6)] == [(4 + i) % N_CLASSES for i in range(6)]
    lo, hi = pixel_bounds(m.mean, m.std, 1.0)
    imgs = s.images()
    assert torch.all(imgs >= lo - 1e-5) and torch.all(imgs <= hi + 1e-5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cls_synthesis_two_gloo_processes_equal_one(cls_synth, deit_ckpt, tmp_path):
    """torchrun with 2 CPU processes: disjoint batches, same images as one process (same seeds)."""
    out = str(tmp_path / "two")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
         "-m", "cls_repq_vit.synthesize", *_cls_synth_argv(deit_ckpt, out, n=24)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two, one = load_synthetic_set(out), load_synthetic_set(cls_synth)
    assert sorted(p.name[:9] for p in Path(out).glob("synth_r*.pt")) == ["synth_r00", "synth_r00", "synth_r01"]
    assert torch.equal(two.images(), one.images())  # bit-identical (same seeds, one thread each)
    assert [two[i]["target"] for i in range(24)] == [one[i]["target"] for i in range(24)]


def test_cls_cli_synthetic_calibration_end_to_end(cls_synth, cls_data, deit_ckpt, tmp_path):
    from cls_repq_vit import cli

    out = tmp_path / "res.json"
    argv = ["--model", "deit_small", "--data_dir", cls_data, "--checkpoint", deit_ckpt, "--calib_size", "16",
            "--repq_calib_size", "8", "--batch_size", "8", "--workers", "0", "--device", "cpu", "--no_progress",
            "--output", str(out), "--model_kwargs", *TINY["deit_small"]]
    res = cli.main(argv + ["--calib_source", "synthetic", "--synth_dir", cls_synth])
    assert res["calib_source"] == "synthetic"
    assert set(res["accuracy"]) >= {"baseline", "qwt"} and any(b["applied"] for b in res["qwt"]["blocks"])
    # the real source is still the default and gives a different calibration
    real = cli.main(argv)
    assert real["calib_source"] == "real"


def test_cls_cli_rejects_bad_synthetic_sets(cls_synth, cls_data, deit_ckpt, tmp_path, capsys):
    from cls_repq_vit import cli

    base = ["--model", "deit_small", "--data_dir", cls_data, "--calib_size", "16", "--repq_calib_size", "8",
            "--batch_size", "8", "--workers", "0", "--device", "cpu", "--no_progress",
            "--output", str(tmp_path / "r.json"), "--model_kwargs", *TINY["deit_small"]]

    def msg(argv):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        text = str(e.value.code)
        assert e.value.code not in (0, None) and "\n" not in text
        return text

    assert "needs --synth_dir" in msg(base + ["--checkpoint", deit_ckpt, "--calib_source", "synthetic"])
    other = tmp_path / "other.pth"
    torch.manual_seed(99)
    from cls_repq_vit.cli import _parse_kwargs
    from cls_repq_vit.models import get_spec
    torch.save(get_spec("deit_small").create(_parse_kwargs(TINY["deit_small"])).state_dict(), other)
    assert "different model" in msg(base + ["--checkpoint", str(other), "--calib_source", "synthetic",
                                            "--synth_dir", cls_synth])
    (tmp_path / "empty").mkdir()
    assert "manifest.json not found" in msg(base + ["--checkpoint", deit_ckpt, "--calib_source", "synthetic",
                                                    "--synth_dir", str(tmp_path / "empty")])
    assert "has 24" in msg(base[:-len(TINY["deit_small"]) - 1] + [
        "--calib_size", "64", "--checkpoint", deit_ckpt, "--calib_source", "synthetic", "--synth_dir", cls_synth,
        "--model_kwargs", *TINY["deit_small"]])


def test_qwt_lowers_block_error_on_synthetic_images(cls_synth, deit_ckpt):
    from cls_repq_vit.cli import _parse_kwargs
    from cls_repq_vit.models import get_spec
    from qwt_core import calibrate

    spec = get_spec("deit_small")
    model, _ = spec.build(deit_ckpt, pretrained=True, model_kwargs=_parse_kwargs(TINY["deit_small"]))
    s = load_synthetic_set(cls_synth)
    qm = quantize_timm_vit(model, 4, 4)
    calibrate(qm, s.images(range(8)))
    batches = list(s.batches(8))
    compensate(qm, batches, progress=False)
    err_q, err_c = block_errors_with_and_without_qwt(qm, qm.model, batches)
    assert err_c < 0.9 * err_q, (err_c, err_q)


# ----------------------------------------------------------------------------------- detection
def _labelset(boxes, labels, size=100):
    from det_repq_vit.synth import LabelSet, box_masks

    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return LabelSet(b, torch.tensor(labels, dtype=torch.long), box_masks(b, size))


def test_seed_labels_follow_the_rule():
    from det_repq_vit.synth import sample_seed_label

    sizes, classes = [], set()
    for s in range(300):
        lab = sample_seed_label(64, 5, torch.Generator().manual_seed(s))
        x0, y0, x1, y1 = lab.bboxes[0].tolist()
        assert len(lab) == 1 and 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        w, h = (x1 - x0) / 64, (y1 - y0) / 64
        assert 0.2 - 1e-5 <= w <= 0.8 + 1e-5 and 0.2 - 1e-5 <= h <= 0.8 + 1e-5
        sizes.append(w)
        classes.add(int(lab.labels[0]))
        # the seed mask is the filled box
        m = lab.masks[0]
        assert m.shape == (64, 64) and m.dtype == torch.uint8
        assert int(m.sum()) == pytest.approx((x1 - x0) * (y1 - y0), abs=x1 - x0 + y1 - y0 + 1)
    assert classes == set(range(5)) and min(sizes) < 0.25 and max(sizes) > 0.75


def test_als_update_rules_on_hand_built_cases():
    from det_repq_vit.synth import als_update

    canvas = (100, 100)
    t = _labelset([[0, 0, 20, 20], [50, 50, 90, 90]], [1, 2])
    preds = torch.tensor([[0, 0, 20, 22],      # overlaps target 0 (IoU 0.91): not added, keeps target 0
                          [60, 0, 90, 30],     # new, area 0.09: added
                          [0, 60, 5, 65],      # new but area 0.0025 < 0.01: rejected
                          [0, 0, 99, 99],      # area 0.98 > 0.85: rejected
                          [30, 30, 45, 45]],   # score 0.1 < conf: ignored
                         dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.9, 0.9, 0.1])
    labels = torch.tensor([1, 3, 4, 0, 2])
    pmasks = torch.zeros(5, 100, 100, dtype=torch.bool)
    pmasks[1, 5:25, 65:85] = True
    new, info = als_update(t, preds, scores, labels, pmasks, canvas)
    # target 1 has max IoU 0 with the kept predictions (< 0.35): removed; target 0 kept
    assert info == {"added": 1, "removed": 1}
    assert new.bboxes.tolist() == [[0, 0, 20, 20], [60, 0, 90, 30]]
    assert new.labels.tolist() == [1, 3]
    assert torch.equal(new.masks[0], t.masks[0]) and torch.equal(new.masks[1], pmasks[1].to(torch.uint8))

    # every target would be removed: the one with the largest max IoU stays
    t2 = _labelset([[0, 0, 10, 10], [40, 40, 60, 60]], [0, 1])
    p2 = torch.tensor([[45, 45, 70, 70]], dtype=torch.float32)  # IoU with target 1: 0.2 (< 0.35)
    new, info = als_update(t2, p2, torch.tensor([0.9]), torch.tensor([2]), None, canvas)
    assert info == {"added": 1, "removed": 1}
    assert new.labels.tolist() == [1, 2] and new.bboxes[1].tolist() == [45, 45, 70, 70]
    assert int(new.masks[1].sum()) == 25 * 25  # no teacher mask: the filled box

    # a single target is never removed; no confident prediction: nothing changes
    t3 = _labelset([[0, 0, 10, 10]], [0])
    new, info = als_update(t3, p2, torch.tensor([0.9]), torch.tensor([2]), None, canvas)
    assert info == {"added": 1, "removed": 0} and new.labels.tolist() == [0, 2]
    new, info = als_update(t3, p2, torch.tensor([0.2]), torch.tensor([2]), None, canvas)
    assert info == {"added": 0, "removed": 0} and new is t3


def _need_mmdet() -> None:
    try:  # the detector needs mmcv's compiled ops (RoIAlign, NMS)
        from mmcv.ops import nms  # noqa: F401
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"mmcv with ops is not importable ({err})")


@pytest.fixture(scope="module")
def det_setup(tmp_path_factory):
    """Tiny Swin Mask R-CNN config (tests/test_detection.py's) with COCO train labels, a random
    checkpoint, and the tiny COCO folder."""
    _need_mmdet()
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    from test_detection import _tiny_config_text, make_tiny_coco

    register_all_modules(init_default_scope=False)
    init_default_scope("mmdet")
    coco = make_tiny_coco(tmp_path_factory.mktemp("coco") / "coco")
    # fewer proposals / sampled RoIs in the training loss: the RoI heads dominate at these sizes
    text = _tiny_config_text(coco).replace("model = dict(\n", "model = dict(\n    train_cfg=dict("
                                           "rpn_proposal=dict(nms_pre=200, max_per_img=100), "
                                           "rcnn=dict(sampler=dict(num=64))),\n", 1) + f"""
train_dataloader = dict(dataset=dict(data_root={str(coco) + '/'!r},
    ann_file='annotations/instances_train2017.json', data_prefix=dict(img='train2017/'),
    metainfo=dict(classes=('square', 'triangle', 'bar'))))
"""
    cfg_path = tmp_path_factory.mktemp("cfg") / "tiny_synth.py"
    cfg_path.write_text(text)
    torch.manual_seed(1)
    model = MODELS.build(Config.fromfile(str(cfg_path)).model)
    model.init_weights()
    ckpt = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    return cfg_path, ckpt, coco


def _det_model(cfg_path, ckpt):
    from mmdet.registry import MODELS
    from mmengine.config import Config

    from det_repq_vit.checkpoint import load_detector_checkpoint

    model = MODELS.build(Config.fromfile(str(cfg_path)).model)
    load_detector_checkpoint(model, ckpt)
    return model.eval()


def test_detector_loss_drives_the_images(det_setup):
    """Only L_det (PSE and TV at 0): finite, gradient reaches x, L_det goes down over 10 steps."""
    from det_repq_vit.synth import DetSynthConfig, DetectionSynthesizer, detector_loss, make_data_samples, square_meta

    cfg_path, ckpt, _ = det_setup
    model = _det_model(cfg_path, ckpt)
    scfg = DetSynthConfig(image_size=128, batch_size=2, iterations=10, warmup=1, lr=0.1, pse_weight=0.0,
                          tv_weight=0.0, det_weight=1.0)
    synth = DetectionSynthesizer(model, scfg, seed=0, mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                                 progress=False)
    labels = [lab.resized(128) for lab in synth.seed_labels([0, 1], 64)]
    samples = make_data_samples(labels, [square_meta(128)] * 2, "cpu")
    x = init_noise([0, 1], (3, 128, 128), 0).requires_grad_(True)
    torch.manual_seed(0)
    detector_loss(model, samples)(x, 0).backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    torch.manual_seed(0)
    x0 = init_noise([0, 1], (3, 128, 128), 0)
    res = synth._invert(x0, samples, scfg.inversion(), None, "test")
    task = [h["task"] for h in res.history]
    assert all(math.isfinite(v) for v in task) and "pse" not in res.history[0]
    assert np.mean(task[-5:]) < np.mean(task[:5]), task
    assert not torch.equal(res.images, x0)


@pytest.fixture(scope="module")
def det_synth(det_setup, tmp_path_factory):
    """tools/synthesize.py with adaptive label sampling (tiny sizes and iteration counts)."""
    from det_repq_vit.tools import synthesize

    cfg_path, ckpt, _ = det_setup
    out = tmp_path_factory.mktemp("det_synth") / "set"
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = synthesize.main([str(cfg_path), str(ckpt), "--num-images", "8", "--out", str(out),
                                   "--image-size", "128", "--batch-size", "4", "--iterations", "2",
                                   "--label-size", "64", "--label-iterations", "4", "--relabel-every", "2",
                                   "--relabel-start", "2", "--relabel-end", "4", "--conf", "0.0",
                                   "--device", "cpu", "--no-progress"])
    finally:
        torch.set_num_threads(saved)
    return out, summary


def test_det_synthesis_writes_labelled_shards(det_synth, det_setup):
    out, summary = det_synth
    assert summary["images_in_manifest"] == 8 and summary["batches_made"] == 2
    s = load_synthetic_set(out, task="detection")
    m = s.manifest
    assert m.label_source == "sampled" and m.image_size == [128, 128] and m.hparams["det_weight"] == 10.0
    assert m.mean == [123.675, 116.28, 103.53]
    for i in range(8):
        item = s[i]
        t = item["target"]
        n = t["labels"].numel()
        assert n >= 1 and t["bboxes"].shape == (n, 4) and t["masks"].shape == (n, 128, 128)
        assert t["masks"].dtype == torch.uint8 and t["labels"].dtype == torch.long
        assert int(t["labels"].max()) < 3 and float(t["bboxes"].min()) >= 0 and float(t["bboxes"].max()) <= 128
        assert item["metainfo"]["img_shape"] == (128, 128) and item["metainfo"]["index"] == i
    # ALS with conf 0 on a random teacher relabels: some image got more than its one seed box
    assert max(s[i]["target"]["labels"].numel() for i in range(8)) > 1


def test_det_synthesis_is_batchwise_reproducible(det_synth, det_setup):
    """Batch 1 made alone (as rank 1 of 2 would) equals batch 1 of the one-process run."""
    from det_repq_vit.synth import DetSynthConfig, DetectionSynthesizer

    out, _ = det_synth
    cfg_path, ckpt, _ = det_setup
    hp = load_synthetic_set(out).manifest.hparams
    scfg = DetSynthConfig(**hp)
    synth = DetectionSynthesizer(_det_model(cfg_path, ckpt), scfg, 0, [123.675, 116.28, 103.53],
                                 [58.395, 57.12, 57.375], progress=False)
    images, targets, metas = synth.make_batch(1, [4, 5, 6, 7])
    s = load_synthetic_set(out)
    torch.testing.assert_close(images, s.images([4, 5, 6, 7]), rtol=0, atol=1e-5)
    for j, t in enumerate(targets):
        ref = s[4 + j]["target"]
        assert torch.equal(t["labels"], ref["labels"]) and torch.equal(t["masks"], ref["masks"])


def test_det_coco_labels_are_the_annotations(det_setup):
    from det_repq_vit.synth import CocoLabelSource
    from mmengine.config import Config

    cfg_path, _, coco = det_setup
    src = CocoLabelSource(Config.fromfile(str(cfg_path)).train_dataloader.dataset, 128, seed=0)
    assert len(src) == 8
    ann = json.loads((coco / "annotations" / "instances_train2017.json").read_text())
    lab, meta = src.get(0)
    img_id = meta["source_img_id"]
    rows = [a for a in ann["annotations"] if a["image_id"] == img_id]
    img = next(i for i in ann["images"] if i["id"] == img_id)
    assert meta["img_shape"] == (img["height"], img["width"]) and meta["pad_shape"] == (128, 128)
    want = sorted([a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                  for a in rows)
    assert sorted(lab.bboxes.tolist()) == want
    assert sorted(lab.labels.tolist()) == sorted(a["category_id"] - 1 for a in rows)
    assert lab.masks.shape == (len(rows), 128, 128) and int(lab.masks[:, img["height"]:, :].sum()) == 0


def test_det_test_py_with_synthetic_calibration(det_synth, det_setup, tmp_path):
    from det_repq_vit.tools import test as det_test

    out, _ = det_synth
    cfg_path, ckpt, _ = det_setup
    res_path = tmp_path / "res.json"
    res = det_test.main([str(cfg_path), str(ckpt), "--eval", "bbox", "--w_bits", "4", "--a_bits", "4",
                         "--calib_size", "8", "--calib_batch", "4", "--device", "cpu",
                         "--calib-source", "synthetic", "--synth-dir", str(out),
                         "--output", str(res_path), "--work-dir", str(tmp_path / "work")])
    assert res["calib_source"] == "synthetic" and set(res["results"]) == {"repq", "qwt"}
    assert 0.0 <= res["results"]["qwt"]["coco/bbox_mAP"] <= 1.0
    assert len(res["qwt_report"]["blocks"]) == 8 and all(b["rows"] > 0 for b in res["qwt_report"]["blocks"])


def test_det_qwt_lowers_block_error_on_synthetic_set(det_synth, det_setup):
    from det_repq_vit.data import SyntheticCalibrationImages
    from det_repq_vit.ptq import calibrate_detector_repq, compensate_backbone, quantize_detector

    out, _ = det_synth
    cfg_path, ckpt, _ = det_setup
    model = _det_model(cfg_path, ckpt)
    s = load_synthetic_set(out)
    qm = quantize_detector(model, 4, 4)
    calib = SyntheticCalibrationImages(s, range(8), 4, "cpu", size=112, pad_size_divisor=32)
    batch = next(iter(calib))
    # resized to 112 (the config's QwT size), padded to 128 like the data preprocessor pads real images
    assert batch["inputs"].shape == (4, 3, 128, 128) and len(batch["data_samples"]) == 4
    assert float(batch["inputs"][:, :, 112:].abs().max()) == 0.0
    # same structure as the real-image (folder) source of the same config
    from mmengine.config import Config

    from det_repq_vit.data import CalibrationImages, list_calibration_images
    qc = Config.fromfile(str(cfg_path)).qwt_calib
    real = next(iter(CalibrationImages(list_calibration_images(qc.img_dir, 4, 0), qc.pipeline, 4,
                                       model.data_preprocessor, progress=False)))
    assert set(real) == set(batch) and real["inputs"].shape == batch["inputs"].shape
    assert real["inputs"].dtype == batch["inputs"].dtype
    real_meta, syn_meta = real["data_samples"][0].metainfo, batch["data_samples"][0].metainfo
    assert {"ori_shape", "scale_factor"} <= set(real_meta) & set(syn_meta)  # values differ: file sizes
    for key in ("img_shape", "pad_shape", "batch_input_shape"):
        assert real_meta[key] == syn_meta[key], key
    calibrate_detector_repq(qm, batch)
    compensate_backbone(qm, calib, progress=False)
    err_q, err_c = block_errors_with_and_without_qwt(qm, model, calib)
    assert err_c < 0.9 * err_q, (err_c, err_q)


def test_det_bad_inputs_one_line(det_synth, det_setup, tmp_path):
    from det_repq_vit.tools import synthesize
    from det_repq_vit.tools import test as det_test

    out, _ = det_synth
    cfg_path, ckpt, _ = det_setup
    other = tmp_path / "other.pth"
    sd = torch.load(ckpt, weights_only=True)["state_dict"]
    sd = {k: (v + 0.01 if k.endswith("rpn_conv.weight") else v) for k, v in sd.items()}
    torch.save({"state_dict": sd}, other)

    def msg(fn, argv):
        with pytest.raises(SystemExit) as e:
            fn(argv)
        text = str(e.value.code)
        assert e.value.code not in (0, None) and "\n" not in text.strip()
        return text

    common = ["--calib_size", "8", "--calib_batch", "4", "--device", "cpu", "--calib-source", "synthetic",
              "--work-dir", str(tmp_path / "w")]
    assert "different model" in msg(det_test.main, [str(cfg_path), str(other), *common, "--synth-dir", str(out)])
    (tmp_path / "empty").mkdir()
    assert "manifest.json not found" in msg(det_test.main, [str(cfg_path), str(ckpt), *common,
                                                            "--synth-dir", str(tmp_path / "empty")])
    assert "needs --synth-dir" in msg(det_test.main, [str(cfg_path), str(ckpt), *common])
    # the synthesis command: a checkpoint that does not fit the config, a folder of another set
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {"backbone.nothing.weight": torch.zeros(3)}}, bad)
    small = ["--num-images", "2", "--image-size", "64", "--iterations", "1", "--label-iterations", "1",
             "--device", "cpu", "--no-progress"]
    assert "does not match the model" in msg(synthesize.main, [str(cfg_path), str(bad), "--out",
                                                               str(tmp_path / "s"), *small])
    assert "other settings" in msg(synthesize.main, [str(cfg_path), str(ckpt), "--out", str(out), *small])
    assert "multiple of 32" in msg(synthesize.main, [str(cfg_path), str(ckpt), "--out", str(tmp_path / "s2"),
                                                     *small[:2], "--image-size", "100", *small[4:]])
