"""yolo_qwt.zsqat (stage II): head logits per level, KD terms, QAT steps, resume (CPU, yolo11n)."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("ultralytics")

from qwt_core.lsq import LSQQuantizer  # noqa: E402
from yolo_qwt.models import load_detector  # noqa: E402
from yolo_qwt.synth import init_images, seed_labels  # noqa: E402
from yolo_qwt.zsqat import (YoloDistiller, ZsqatConfig, head_levels, mse_layer_names, quantize_lsq,  # noqa: E402
                            train)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


def _data(n=8, size=64):
    return init_images(range(n), size, seed=0), seed_labels(range(n), 4, 0)


def test_head_levels_equal_the_head_run_by_hand():
    det = load_detector("yolo11n.yaml", nc=4)
    model = det.model.train()
    x = torch.rand(2, 3, 64, 64)
    feats = {}
    head = model.model[-1]
    h = head.register_forward_pre_hook(lambda m, a: feats.setdefault("x", [t.detach() for t in a[0]]))
    with torch.no_grad():
        levels = head_levels(model(x))
    h.remove()
    assert len(levels) == 3
    for i, f in enumerate(feats["x"]):
        with torch.no_grad():
            ref = torch.cat([head.cv2[i](f), head.cv3[i](f)], dim=1).reshape(2, -1)
        torch.testing.assert_close(levels[i], ref)


def test_kd_terms_zero_for_a_copy_and_positive_after_a_change():
    det = load_detector("yolo11n.yaml", nc=4)
    teacher = copy.deepcopy(det.model).eval()
    student = det.model.eval()
    names = mse_layer_names(teacher)
    assert names and not any("dfl" in n for n in names)
    assert len(names) == sum(isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d))
                             for m in teacher.modules()) - 1     # every Conv2d / BN but the DFL conv
    x, labels = _data(2)
    d = YoloDistiller(student, teacher, ZsqatConfig())
    with torch.no_grad():
        t = d(x, labels)
        assert float(t["kl"]) < 1e-6 and float(t["mse"]) == 0.0 and float(t["det"]) > 0
        student.model[4].cv1.conv.weight.add_(0.05)
        t2 = d(x, labels)
    d.close()
    assert float(t2["kl"]) > 1e-6 and float(t2["mse"]) > 0


def test_qat_steps_lower_the_kd_loss_and_leave_the_teacher(tmp_path):
    det = load_detector("yolo11n.yaml", nc=4)
    teacher = copy.deepcopy(det.model)
    t_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    x, labels = _data(8)
    cfg = ZsqatConfig(w_bits=4, a_bits=8, epochs=4, batch=4, lr=1e-3, warmup_iters=1, ema_tau=1)
    quantized = quantize_lsq(copy.deepcopy(det), cfg)
    assert len(quantized) == 62
    bn_before = det.model.model[2].cv1.bn.running_mean.clone()
    res = train(det, teacher, x, labels, cfg, str(tmp_path / "qat"), progress=False)
    h = res["history"]
    first = sum(r["kl"] + r["mse"] for r in h[:2])
    last = sum(r["kl"] + r["mse"] for r in h[-2:])
    assert last < first
    assert all(torch.equal(t_state[k], v) for k, v in teacher.state_dict().items())
    steps = [m for m in det.model.modules() if isinstance(m, LSQQuantizer)]
    assert len(steps) == 124 and all(bool(m.inited) and float(m.step) > 0 for m in steps)
    assert not torch.equal(det.model.model[2].cv1.bn.running_mean, bn_before)   # BN in train mode
    assert sum(isinstance(m, LSQQuantizer) for m in res["ema"].modules()) == 124


def test_resume_equals_uninterrupted(tmp_path):
    x, labels = _data(8)
    cfg = ZsqatConfig(w_bits=4, a_bits=4, epochs=2, batch=4, lr=1e-3, warmup_iters=1, ema_tau=1)
    torch.manual_seed(0)
    base = load_detector("yolo11n.yaml", nc=4)
    teacher = copy.deepcopy(base.model)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    ra = train(a, teacher, x, labels, cfg, str(tmp_path / "a"), progress=False)
    train(b, teacher, x, labels, cfg, str(tmp_path / "b"), progress=False, stop_after=1)
    b2 = copy.deepcopy(base)
    rb = train(b2, teacher, x, labels, cfg, str(tmp_path / "b"), progress=False, resume=True)
    sa, sb = a.model.state_dict(), b2.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ea, eb = ra["ema"].state_dict(), rb["ema"].state_dict()
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert [r["total"] for r in ra["history"]] == [r["total"] for r in rb["history"]]


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    from benchmarks.shapes import write_yolo_dataset
    from yolo_qwt import zsqat
    data = write_yolo_dataset(str(tmp_path / "shapes"), n_train=2, n_val=2, size=64)
    out = tmp_path / "out"
    for argv, needle in ((["--model", "yolo11n.yaml", "--data", data, "--synthetic", str(tmp_path / "none")],
                          "not found"),
                         (["--model", "yolo11n.yaml", "--data", data, "--synthetic", "x", "--w-bits", "9"],
                          "w_bits=9"),
                         (["--model", "missing.pt", "--data", data, "--synthetic", "x"], "no such file")):
        rc = zsqat.main(argv + ["--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error:"), err
        assert needle in err[0], err
        assert not out.exists()


def test_frozen_bn_keeps_the_running_statistics(tmp_path):
    det = load_detector("yolo11n.yaml", nc=4)
    teacher = copy.deepcopy(det.model)
    x, labels = _data(4)
    bn_before = det.model.model[2].cv1.bn.running_mean.clone()
    cfg = ZsqatConfig(w_bits=4, a_bits=8, epochs=1, batch=4, lr=1e-3, warmup_iters=1, bn="frozen")
    train(det, teacher, x, labels, cfg, str(tmp_path / "qat"), progress=False)
    assert torch.equal(det.model.model[2].cv1.bn.running_mean, bn_before)
    assert not torch.equal(det.model.model[2].cv1.bn.weight, teacher.model[2].cv1.bn.weight)  # affine trained
    with pytest.raises(ValueError):
        ZsqatConfig(bn="folded")


@pytest.mark.skipif(not __import__("yolo_qwt.models", fromlist=["x"]).yolov5_available(),
                    reason="original YOLOv5 model code not installed")
def test_yolov5_qat_steps_and_levels(tmp_path):
    from yolo_qwt.zsqat import V5_ZSQAT
    det = load_detector("yolov5n.yaml", nc=4)
    teacher = copy.deepcopy(det.model)
    t_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    x, labels = _data(8)
    with torch.no_grad():
        raw = det.model.train()(x[:2])
        levels = head_levels(raw)
        assert [lv.shape[1] for lv in levels] == [t[0].numel() for t in raw]
        assert [lv.shape for lv in head_levels(teacher.eval()(x[:2]))] == [lv.shape for lv in levels]
    det.model.eval()
    cfg = ZsqatConfig(**{**V5_ZSQAT.to_dict(), "w_bits": 4, "a_bits": 8, "epochs": 3, "batch": 4, "lr": 1e-3,
                         "warmup_iters": 1, "ema_tau": 1, "betas": (0.9, 0.999)})
    res = train(det, teacher, x, labels, cfg, str(tmp_path / "qat"), progress=False)
    h = res["history"]
    assert sum(r["kl"] + r["mse"] for r in h[-2:]) < sum(r["kl"] + r["mse"] for r in h[:2])
    assert all(torch.equal(t_state[k], v) for k, v in teacher.state_dict().items())
    assert sum(isinstance(m, LSQQuantizer) for m in det.model.modules()) == 2 * 56
