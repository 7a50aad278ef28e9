"""torchvision ResNet-50 FPN Mask R-CNN: the paper's quantized-layer set, FP equality with quantization
off, QwT on the trunk, pycocotools evaluation, one-line input errors, torchrun (gloo) sharded evaluation.

Real torchvision models (random init, 5 classes, BatchNorm statistics estimated on a few images so the
activations are in a realistic range) and a tiny COCO set written by ``benchmarks/shapes.py``.
"""
import copy
import math
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from shapes import make_shapes, write_coco_dataset  # noqa: E402

from det_torchvision import ptq  # noqa: E402
from det_torchvision.data import CocoImages, calibration_batches, list_calibration_images  # noqa: E402
from det_torchvision.evaluate import coco_metrics, detections_to_coco, evaluate_coco  # noqa: E402
from det_torchvision.model import CheckpointError, build_maskrcnn, load_maskrcnn, save_maskrcnn  # noqa: E402
from qwt_core.modules import set_quant_state  # noqa: E402
from qwt_core.adapters.timm_resnet import fold_all_batchnorms  # noqa: E402
from qwt_core.adapters.torchvision_rcnn import detector_layer_names  # noqa: E402
from qwt_core.modules import QuantConv2d  # noqa: E402

SIZE = 64
KW = dict(min_size=SIZE, max_size=SIZE, rpn_post_nms_top_n_test=100, box_detections_per_img=20)
R50 = {"layer1": 3, "layer2": 4, "layer3": 6, "layer4": 3}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("coco"))
    write_coco_dataset(root, "val2017", n=4, size=SIZE, seed=1)
    write_coco_dataset(root, "train2017", n=16, size=SIZE, seed=0)
    return root


@pytest.fixture(scope="module")
def checkpoint(coco, tmp_path_factory):
    """A v1 checkpoint: random weights, BatchNorm statistics of 16 images (cumulative average)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build_maskrcnn(num_classes=5, frozen_bn=False, **KW)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    imgs = next(calibration_batches(list_calibration_images(coco, "train2017", 16), 16, SIZE))
    model.backbone.body.train()
    with torch.no_grad():
        model.backbone(model.transform(list(imgs))[0].tensors)
    path = str(tmp_path_factory.mktemp("ckpt") / "maskrcnn_tiny.pth")
    save_maskrcnn(model.eval(), path, model_kwargs=KW)
    return path


def _calib(coco, n=16):
    return next(calibration_batches(list_calibration_images(coco, "train2017", n), n, SIZE))


def _paper_list():
    names = []
    for stage, n in R50.items():
        for j in range(n if stage != "layer4" else n - 1):
            convs = ["conv1", "conv2", "conv3"] + (["downsample.0"] if j == 0 else [])
            names += [f"backbone.body.{stage}.{j}.{c}" for c in convs]
    for kind in ("inner_blocks", "layer_blocks"):
        names += [f"backbone.fpn.{kind}.{i}.0" for i in (1, 2, 3)]
    return names


def test_quantized_layer_set_is_the_papers(checkpoint):
    model, _ = load_maskrcnn(checkpoint)
    assert detector_layer_names(model, "paper") == sorted(
        _paper_list(), key=[n for n, _ in model.named_modules()].index)
    qm = ptq.quantize_detector(model, 4, 4)
    quantized = sorted(n for n, m in model.named_modules() if isinstance(m, QuantConv2d))
    assert quantized == sorted(_paper_list()) and len(quantized) == 49 + 6
    for n, m in model.named_modules():
        if isinstance(m, QuantConv2d):
            assert (m.w_bits, m.a_bits) == (4, 4), n
    fp_convs = [n for n, m in model.named_modules() if type(m) is nn.Conv2d]
    for expected_fp in ("backbone.body.conv1", "backbone.body.layer4.2.conv1", "backbone.fpn.inner_blocks.0.0",
                        "backbone.fpn.layer_blocks.0.0", "rpn.head.conv.0.0", "roi_heads.mask_head.0.0"):
        assert expected_fp in fp_convs
    assert qm.block_names == [f"backbone.body.{s}.{j}" for s, n in R50.items() for j in range(n)][:-1]
    assert qm.meta["recipe"]["quantized_layers"] == detector_layer_names(model, "paper")

    model_all, _ = load_maskrcnn(checkpoint)
    qa = ptq.quantize_detector(model_all, 4, 4, layer_set="all")
    q_all = {n: m for n, m in model_all.named_modules() if isinstance(m, QuantConv2d)}
    assert len(q_all) == 1 + 48 + 4 + 8  # stem, 16 blocks x 3 convs, 4 downsample, FPN 4 + 4
    assert (q_all["backbone.body.conv1"].w_bits, q_all["backbone.body.conv1"].a_bits) == (8, 8)
    assert len(qa.block_names) == 16


def test_quant_off_is_the_fp_detector_and_quant_on_is_not(checkpoint, coco):
    fp, _ = load_maskrcnn(checkpoint)
    model = copy.deepcopy(fp)
    qm = ptq.quantize_detector(model, 4, 4)
    ptq.calibrate_detector(qm, _calib(coco, 8))
    x = _calib(coco, 2)
    with torch.no_grad():
        ref = fp.backbone(fp.transform(list(x))[0].tensors)
        set_quant_state(model, False, False)
        off = model.backbone(model.transform(list(x))[0].tensors)
        out_fp, out_off = fp(list(x)), model(list(x))
        set_quant_state(model, True, True)
        on = model.backbone(model.transform(list(x))[0].tensors)
    for k in ref:
        assert torch.equal(ref[k], off[k]), k
        assert not torch.allclose(ref[k], on[k]), k
    for a, b in zip(out_fp, out_off):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["masks"], b["masks"])


def test_folded_recipe_folds_frozen_batchnorm(checkpoint, coco):
    fp, _ = load_maskrcnn(checkpoint)
    model = copy.deepcopy(fp)
    assert fold_all_batchnorms(model) == 53  # stem + 16 blocks x 3 + 4 downsample, FrozenBatchNorm2d
    x = fp.transform(list(_calib(coco, 2)))[0].tensors
    with torch.no_grad():
        a, b = fp.backbone(x), model.backbone(x)
    for k in a:
        assert ((a[k] - b[k]).norm() / a[k].norm()).item() < 1e-4, k  # float rounding over 50 layers


def test_qwt_lowers_trunk_block_error(checkpoint, coco):
    fp, _ = load_maskrcnn(checkpoint)
    model = copy.deepcopy(fp)
    qm = ptq.quantize_detector(model, 4, 4)
    calib = _calib(coco, 16)
    ptq.calibrate_detector(qm, calib[:8])
    batches = list(calib.split(8))

    def c4_error():
        with torch.no_grad():
            x = fp.transform(list(calib))[0].tensors
            return (fp.backbone.body(x)["2"] - model.backbone.body(x)["2"]).pow(2).mean().item()

    before = c4_error()
    rep = ptq.compensate_detector(qm, batches, fpn=True, progress=False)
    after = c4_error()
    blocks = rep["backbone"]["blocks"]
    assert [b["name"] for b in blocks] == qm.block_names
    applied = [b for b in blocks if b["applied"]]
    assert len(applied) >= len(blocks) // 2
    assert all(b["mse_after"] < b["mse_before"] for b in applied)
    assert after < 0.9 * before
    assert [r["blocks"][0]["name"] for r in rep["fpn"]] == [f"backbone.fpn.layer_blocks.{i}" for i in (1, 2, 3)]
    assert type(model.get_submodule("backbone.body.layer1.0")).__name__ == "CompensatedBlock"


def test_coco_eval_of_the_ground_truth_is_perfect(coco):
    ds = CocoImages(coco, "val2017")
    shapes = make_shapes(4, SIZE, 1)
    results = []
    for img_id, im in zip(ds.ids, shapes):
        out = {"boxes": torch.from_numpy(im.boxes), "scores": torch.ones(len(im.labels)),
               "labels": torch.from_numpy(im.labels) + 1,
               "masks": torch.from_numpy(im.masks).float()[:, None]}
        results += detections_to_coco(img_id, out)
    m = coco_metrics(ds.coco, results)
    assert m["coco/bbox_mAP"] == pytest.approx(1.0) and m["coco/segm_mAP"] == pytest.approx(1.0)
    wrong = [dict(r, category_id=r["category_id"] % 4 + 1) for r in results]
    assert coco_metrics(ds.coco, wrong)["coco/bbox_mAP"] == 0.0


def test_coco_eval_runs_and_returns_ap_keys(checkpoint, coco):
    model, _ = load_maskrcnn(checkpoint)
    m = evaluate_coco(model, CocoImages(coco, "val2017"), "cpu")
    keys = {f"coco/{k}_{s}" for k in ("bbox", "segm") for s in ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")}
    assert set(m) == keys and all(0.0 <= v <= 1.0 for v in m.values())


def _run_ptq(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        ptq.main(argv)
    err = capsys.readouterr().err.strip()
    return exc.value.code, err


def test_bad_input_is_one_line_and_writes_nothing(checkpoint, coco, tmp_path, capsys):
    out = tmp_path / "out" / "r.json"
    base = ["--checkpoint", checkpoint, "--coco-root", coco, "--output", str(out), "--calib_size", "4"]
    torch.save(build_maskrcnn(num_classes=5, **KW).backbone.state_dict(), tmp_path / "backbone.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    os.makedirs(tmp_path / "noann" / "val2017")
    os.makedirs(tmp_path / "noann" / "train2017")
    cases = {
        "bits": (base + ["--w_bits", "9"], "--w_bits=9"),
        "abits": (base + ["--a_bits", "1"], "--a_bits=1"),
        "missing ckpt": (["--checkpoint", str(tmp_path / "none.pth")] + base[2:], "checkpoint not found"),
        "junk ckpt": (["--checkpoint", str(tmp_path / "junk.pth")] + base[2:], "cannot read checkpoint"),
        "not a maskrcnn": (["--checkpoint", str(tmp_path / "backbone.pth")] + base[2:], "not a torchvision Mask R-CNN"),
        "wrong arch": (base + ["--arch", "maskrcnn_resnet50_fpn_v2"], "does not match maskrcnn_resnet50_fpn_v2"),
        "no annotations": (["--checkpoint", checkpoint, "--coco-root", str(tmp_path / "noann"), "--output",
                            str(out)], "annotation file not found"),
    }
    for name, (argv, needle) in cases.items():
        code, err = _run_ptq(argv, capsys)
        assert code == 2, name
        assert len(err.splitlines()) == 1 and needle in err, (name, err)
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError):
        load_maskrcnn(str(tmp_path / "backbone.pth"))


def test_ptq_cli_writes_one_json(checkpoint, coco, tmp_path):
    out = tmp_path / "r.json"
    s = ptq.main(["--checkpoint", checkpoint, "--coco-root", coco, "--w_bits", "8", "--a_bits", "8", "--qwt",
                  "--calib_size", "8", "--calib_batch", "4", "--qwt-batch", "8", "--output", str(out),
                  "--plot", str(tmp_path / "r.png"), "--threads", "1"])
    saved = json.loads(out.read_text())
    assert set(saved["ap"]) == {"fp", "ptq", "qwt"} and saved == json.loads(json.dumps(s))
    assert len(saved["qwt_report"]["blocks"]) == 15 and saved["recipe"]["name"] == "published"
    assert os.path.getsize(tmp_path / "r.png") > 0


def test_two_gloo_processes_merge_to_the_single_process_result(checkpoint, coco, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    common = ["-m", "det_torchvision.evaluate", "--checkpoint", checkpoint, "--coco-root", coco,
              "--device", "cpu", "--threads", "1"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, *common, "--output", str(one)], check=True, cwd=ROOT, env=env,
                   capture_output=True, timeout=300)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "29517", *common, "--launcher", "pytorch", "--output", str(two)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["world_size"] == 2 and a["world_size"] == 1
    assert a["results"] == b["results"]


# ------------------------------------------------------------------------------- stage I (data-free)
from det_torchvision import synth  # noqa: E402
from qwt_core.inversion import BNStatsPrior, total_variation  # noqa: E402
from qwt_core.synth_io import SynthSetError  # noqa: E402


def _targets(labels):
    return [{"boxes": t["boxes"], "labels": t["labels"], "masks": t["masks"]} for t in labels]


def test_synthesis_terms_match_direct_computations(checkpoint, coco):
    model, _ = load_maskrcnn(checkpoint)
    teacher = synth.with_batchnorm2d(model)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in teacher.modules()) == 53
    x01 = _calib(coco, 2)
    x = torch.stack([model.transform.normalize(im) for im in x01])
    # BN term: the prior on the BatchNorm2d copy = the statistics of the FrozenBatchNorm2d inputs
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp: seen.append((inp[0], mod)))
             for m in model.modules() if type(m).__name__ == "FrozenBatchNorm2d"]
    with torch.no_grad():
        ref_feats = model.backbone(x)
    for h in hooks:
        h.remove()
    direct = sum(torch.norm(mod.running_var - t.var(dim=(0, 2, 3), unbiased=False)) +
                 torch.norm(mod.running_mean - t.mean(dim=(0, 2, 3))) for t, mod in seen)
    with BNStatsPrior(teacher) as bn, torch.no_grad():
        feats = teacher.backbone(x)
        prior = bn.loss(x)
    assert len(seen) == 53
    torch.testing.assert_close(prior, direct, rtol=1e-4, atol=1e-4)
    for k in ref_feats:
        assert ((feats[k] - ref_feats[k]).norm() / ref_feats[k].norm()) < 1e-4
    # TV: four first-difference Frobenius norms
    d = [x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :],
         x[..., 1:, 1:] - x[..., :-1, :-1], x[..., 1:, :-1] - x[..., :-1, 1:]]
    torch.testing.assert_close(total_variation(x), sum(t.pow(2).sum().sqrt() for t in d))
    # L_det: the detector's own training losses (same RoI sampling seed), no transform in between
    labels = synth.coco_labels(coco, "train2017", SIZE, flip=False, max_images=2)
    tg = _targets(labels)
    torch.manual_seed(3)
    with synth.loss_mode(teacher), torch.no_grad():
        ours = synth.detection_loss(teacher, x, tg)
    model.train()
    torch.manual_seed(3)
    with torch.no_grad():
        theirs = model(list(x01), tg)
    model.eval()
    assert set(ours) == set(theirs) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier",
                                        "loss_box_reg", "loss_mask"}
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-3, atol=1e-4)
    assert not teacher.training and not teacher.rpn.training and not teacher.roi_heads.training


def test_coco_labels_flip_and_rescale(coco):
    plain = synth.coco_labels(coco, "train2017", 2 * SIZE, flip=False)
    flipped = synth.coco_labels(coco, "train2017", 2 * SIZE, seed=0, flip=True)
    shapes = make_shapes(16, SIZE, 0)
    assert len(plain) == sum(len(s.labels) > 0 for s in shapes)
    torch.testing.assert_close(plain[0]["boxes"], torch.from_numpy(shapes[0].boxes) * 2)
    assert plain[0]["masks"].shape[-2:] == (2 * SIZE, 2 * SIZE)
    n_flip = 0
    for a, b in zip(plain, flipped):
        if b["flip"]:
            n_flip += 1
            torch.testing.assert_close(b["boxes"][:, [2, 0]], 2 * SIZE - a["boxes"][:, [0, 2]])
            assert torch.equal(b["masks"], a["masks"].flip(-1))
        else:
            assert torch.equal(b["boxes"], a["boxes"])
    assert 0 < n_flip < len(plain)


def test_synthesis_lowers_the_loss_and_round_trips(checkpoint, coco, tmp_path):
    model, _ = load_maskrcnn(checkpoint)
    before = copy.deepcopy(model.state_dict())
    labels = synth.coco_labels(coco, "train2017", SIZE, max_images=2)
    teacher = synth.with_batchnorm2d(model)
    x0 = torch.randn(2, 3, SIZE, SIZE)
    from qwt_core.inversion import invert

    torch.manual_seed(0)
    with synth.loss_mode(teacher), BNStatsPrior(teacher) as bn:
        res = invert(x0, lambda x, it: synth.detection_loss(teacher, x, _targets(labels)),
                     synth.dfq_resnet_config(iterations=8), priors=[bn], progress=False)
    first, last = res.history[0], res.history[-1]
    assert last["total"] < first["total"] and last["bn"] < first["bn"]
    out = str(tmp_path / "synth")
    man = synth.synthesize(model, labels, out, SIZE, synth.dfq_resnet_config(iterations=2), batch_size=2,
                           checkpoint=checkpoint, progress=False)
    assert man.complete and man.num_images == 2 and man.hparams["bn_weight"] == 0.05
    imgs = synth.synthetic_images(out, checkpoint=checkpoint)
    assert imgs.shape == (2, 3, SIZE, SIZE) and 0 <= imgs.min() and imgs.max() <= 1
    shard = torch.load(os.path.join(out, man.shards[0]["file"]), weights_only=False)
    assert torch.equal(shard["targets"][0]["bboxes"], labels[0]["boxes"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    other = tmp_path / "other.pth"
    save_maskrcnn(build_maskrcnn(num_classes=5, **KW), str(other), model_kwargs=KW)
    with pytest.raises(SynthSetError):
        synth.synthetic_images(out, checkpoint=str(other))
    s = ptq.main(["--checkpoint", checkpoint, "--coco-root", coco, "--calib-source", "synthetic", "--synth-dir", out,
                  "--calib_size", "2", "--calib_batch", "2", "--qwt", "--skip-fp", "--threads", "1"])
    assert s["calib_source"] == "synthetic" and set(s["ap"]) == {"ptq", "qwt"}


# ------------------------------------------------------------------------- stage II (zero-shot QAT)
from det_torchvision import zsqat  # noqa: E402
from qwt_core.lsq import LSQQuantizer  # noqa: E402
from qwt_core.synth_io import load_synthetic_set  # noqa: E402


@pytest.fixture(scope="module")
def synth_set(checkpoint, coco, tmp_path_factory):
    model, _ = load_maskrcnn(checkpoint)
    labels = synth.coco_labels(coco, "train2017", SIZE, max_images=4)
    out = str(tmp_path_factory.mktemp("synth4"))
    synth.synthesize(model, labels, out, SIZE, synth.dfq_resnet_config(iterations=2), batch_size=4,
                     checkpoint=checkpoint, progress=False)
    return out


def _student(checkpoint, cfg):
    teacher, _ = load_maskrcnn(checkpoint)
    student = copy.deepcopy(teacher)
    names = zsqat.quantize_lsq(student, cfg.w_bits, cfg.a_bits)
    return teacher, student, names


def test_zsqat_lowers_the_distillation_loss_and_leaves_the_teacher(checkpoint, synth_set, tmp_path):
    # the random detector's L_det (~100) would dominate: the distillation terms alone here
    cfg = zsqat.ZsqatConfig(w_bits=4, a_bits=4, epochs=3, batch_size=2, lr=1e-4, warmup_iters=0, seed=0, w_det=0.0)
    teacher, student, names = _student(checkpoint, cfg)
    assert names == detector_layer_names(teacher, "paper")
    assert all(isinstance(student.get_submodule(n).weight_quantizer, LSQQuantizer) for n in names)
    t_before = copy.deepcopy(teacher.state_dict())
    data = zsqat.SyntheticBatches(load_synthetic_set(synth_set))
    x, tg = data.get([0, 1, 2, 3], "cpu")
    zsqat.init_lsq_steps(student, x)
    q = student.get_submodule(names[0]).input_quantizer
    x_in = []
    h = student.get_submodule(names[0]).register_forward_pre_hook(lambda m, i: x_in.append(i[0]))
    with torch.no_grad():
        student.backbone(x)
    h.remove()
    torch.testing.assert_close(q.step.detach(), 2 * x_in[0].abs().mean() / (2 ** 3 - 1) ** 0.5)

    def distill_loss():
        with zsqat.DetectionKD(student, teacher, cfg) as kd, torch.no_grad():
            student.eval()
            torch.manual_seed(1)
            zsqat.set_train_mode(student)
            out = kd(x, tg)
            student.eval()
        return float(out["kd"] + out["mse"])

    before = distill_loss()
    steps_before = [p.detach().clone() for p in zsqat.learnable_step_parameters(student)]
    w_before = student.get_submodule("backbone.body.layer2.0.conv1").weight.detach().clone()
    frozen_w = student.get_submodule("backbone.body.layer1.0.conv1").weight.detach().clone()
    hist = zsqat.train(student, teacher, data, cfg, str(tmp_path / "run"), progress=False)
    assert len(hist) == 3 * 2 and all(math.isfinite(r["total"]) for r in hist)
    after = distill_loss()
    assert after < before
    assert any(not torch.equal(a, b) for a, b in zip(steps_before, zsqat.learnable_step_parameters(student)))
    assert not torch.equal(w_before, student.get_submodule("backbone.body.layer2.0.conv1").weight)
    assert torch.equal(frozen_w, student.get_submodule("backbone.body.layer1.0.conv1").weight)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, t_before[k]), k
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["epoch_0.pth", "epoch_1.pth", "epoch_2.pth"]


def test_zsqat_resume_equals_an_uninterrupted_run(checkpoint, synth_set, tmp_path):
    data = zsqat.SyntheticBatches(load_synthetic_set(synth_set))
    cfg2 = zsqat.ZsqatConfig(w_bits=8, a_bits=8, epochs=2, batch_size=2, warmup_iters=1, seed=3)
    teacher, straight, _ = _student(checkpoint, cfg2)
    zsqat.train(straight, teacher, data, cfg2, str(tmp_path / "a"), progress=False)
    cfg1 = zsqat.ZsqatConfig(**{**cfg2.__dict__, "epochs": 1})
    teacher, part, _ = _student(checkpoint, cfg1)
    zsqat.train(part, teacher, data, cfg1, str(tmp_path / "b"), progress=False)
    teacher, resumed, _ = _student(checkpoint, cfg2)
    hist = zsqat.train(resumed, teacher, data, cfg2, str(tmp_path / "b"), resume=True, progress=False)
    assert [r["epoch"] for r in hist] == [0, 0, 1, 1]
    sd_a, sd_b = straight.state_dict(), resumed.state_dict()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    other = zsqat.ZsqatConfig(**{**cfg2.__dict__, "lr": 0.1})
    teacher, s3, _ = _student(checkpoint, other)
    with pytest.raises(ValueError, match="other settings"):
        zsqat.train(s3, teacher, data, other, str(tmp_path / "b"), resume=True, progress=False)


def test_v2_checkpoint_round_trip_and_layer_set(tmp_path, coco):
    kw = dict(min_size=SIZE, max_size=SIZE, rpn_post_nms_top_n_test=50, box_detections_per_img=10)
    path = str(tmp_path / "v2.pth")
    save_maskrcnn(build_maskrcnn("maskrcnn_resnet50_fpn_v2", num_classes=5, **kw), path,
                  arch="maskrcnn_resnet50_fpn_v2", model_kwargs=kw)
    model, info = load_maskrcnn(path)
    assert info["arch"] == "maskrcnn_resnet50_fpn_v2"
    with pytest.raises(CheckpointError, match="does not match maskrcnn_resnet50_fpn:"):
        load_maskrcnn(path, "maskrcnn_resnet50_fpn")
    names = detector_layer_names(model, "paper")
    assert names == sorted(_paper_list(), key=[n for n, _ in model.named_modules()].index)
    fp = copy.deepcopy(model)
    qm = ptq.quantize_detector(model, 8, 8)
    ptq.calibrate_detector(qm, _calib(coco, 2))
    set_quant_state(model, False, False)
    x = _calib(coco, 1)
    with torch.no_grad():
        a, b = fp.backbone(fp.transform(list(x))[0].tensors), model.backbone(model.transform(list(x))[0].tensors)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_zsqat_two_gloo_processes_follow_one(checkpoint, coco, synth_set, tmp_path):
    """Same global batch: each rank takes half of it, gradients and LSQ statistics are averaged; with
    the (batch-size-free) distillation terms only, the weight updates agree (up to float rounding,
    which rounding flips of the quantizers amplify: not bit for bit)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    common = ["-m", "det_torchvision.zsqat", "--checkpoint", checkpoint, "--coco-root", coco, "--synth-dir",
              synth_set, "--epochs", "1", "--batch", "2", "--w-det", "0", "--device", "cpu", "--threads", "1",
              "--max-images", "1", "--w_bits", "8", "--a_bits", "8", "--lr", "1e-6"]
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = subprocess.run([sys.executable, *common, "--work-dir", str(one)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                         "--master_port", "29519", *common, "--launcher", "pytorch", "--work-dir", str(two)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr[-2000:]
    a = torch.load(one / "epoch_0.pth", weights_only=False)
    b = torch.load(two / "epoch_0.pth", weights_only=False)
    # a small lr keeps the quantizers from flipping roundings between the runs (which the error
    # terms amplify); the updates then agree, as they would not without averaged gradients
    assert [h["kd"] for h in a["history"]] == pytest.approx([h["kd"] for h in b["history"]], rel=1e-3)
    assert [h["mse"] for h in a["history"]] == pytest.approx([h["mse"] for h in b["history"]], rel=1e-3)
    start = load_maskrcnn(checkpoint)[0].state_dict()
    da = torch.cat([(a["model"][k] - start[k]).flatten() for k in start if start[k].is_floating_point()])
    db = torch.cat([(b["model"][k] - start[k]).flatten() for k in start if start[k].is_floating_point()])
    assert da.norm() > 0 and ((da - db).norm() / da.norm()) < 0.05
    steps_a = torch.stack([v for k, v in a["model"].items() if k.endswith("input_quantizer.step")])
    steps_b = torch.stack([v for k, v in b["model"].items() if k.endswith("input_quantizer.step")])
    torch.testing.assert_close(steps_b, steps_a, rtol=1e-4, atol=0)
    assert json.loads((two / "results.json").read_text())["world_size"] == 2


def test_ptq_qwt_two_gloo_processes_match_one(checkpoint, coco, tmp_path):
    """torchrun: the QwT moments of the two calibration shards are all-reduced and the evaluation is
    sharded and merged; the per-block fits and the AP follow the single-process run."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    common = ["-m", "det_torchvision.ptq", "--checkpoint", checkpoint, "--coco-root", coco, "--w_bits", "4",
              "--a_bits", "4", "--qwt", "--skip-fp", "--calib_size", "8", "--calib_batch", "4", "--qwt-batch", "4",
              "--device", "cpu", "--threads", "1"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    r1 = subprocess.run([sys.executable, *common, "--output", str(one)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                         "--master_port", "29523", *common, "--launcher", "pytorch", "--output", str(two)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr[-2000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["world_size"] == 2
    ba, bb = a["qwt_report"]["blocks"], b["qwt_report"]["blocks"]
    assert [x["applied"] for x in ba] == [x["applied"] for x in bb]
    assert [x["rows"] for x in ba] == [x["rows"] for x in bb]
    assert [x["r2"] for x in ba] == pytest.approx([x["r2"] for x in bb], rel=1e-3, abs=1e-4)
    assert a["results"]["ptq"] == b["results"]["ptq"]
    for k, v in a["results"]["qwt"].items():
        assert b["results"]["qwt"][k] == pytest.approx(v, abs=2e-3), k


def test_synthesize_cli_two_gloo_processes_equal_one(checkpoint, coco, tmp_path):
    """Batches split over two ranks (rank 0 waits for rank 1 before the final manifest): the same
    complete set, image for image, as one process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    common = ["-m", "det_torchvision.synthesize", "--checkpoint", checkpoint, "--coco-root", coco,
              "--num-images", "4", "--batch", "2", "--iterations", "1", "--device", "cpu", "--threads", "1"]
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = subprocess.run([sys.executable, *common, "--synth-dir", str(one)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                         "--master_port", "29527", *common, "--launcher", "pytorch", "--synth-dir", str(two)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr[-2000:]
    a, b = load_synthetic_set(one), load_synthetic_set(two)
    assert a.manifest.complete and b.manifest.complete and len(a) == len(b) == 4
    assert {s["file"][:9] for s in b.manifest.shards} == {"synth_r00", "synth_r01"}
    torch.testing.assert_close(b.images(), a.images(), rtol=1e-4, atol=1e-5)
    for x, y in zip(a, b):
        assert torch.equal(x["target"]["bboxes"], y["target"]["bboxes"])
