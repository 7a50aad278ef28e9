"""yolo_qwt.synth (stage I): label rules on hand-built cases, loss terms, a short synthesis, the set."""
from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("ultralytics")

from benchmarks.shapes import write_yolo_dataset  # noqa: E402
from qwt_core.inversion import BNStatsPrior  # noqa: E402
from yolo_qwt import ptq  # noqa: E402
from yolo_qwt.models import load_detector  # noqa: E402
from yolo_qwt.synth import (IMAGE_STAGE, LABEL_STAGE, DetectionLoss, SamplerRules, SynthSetError,  # noqa: E402
                            init_images, load_images, relabel, seed_labels, synthesize, synthesize_batch)

R = SamplerRules()


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


def det_row(x1, y1, x2, y2, conf=0.9, cls=1.0):
    return torch.tensor([[x1, y1, x2, y2, conf, cls]])


def label(cls, x1, y1, x2, y2):
    return torch.tensor([[cls, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]])


def test_seed_labels_one_box_inside_the_image():
    labs = seed_labels(range(200), nc=80, seed=0)
    t = torch.cat(labs)
    assert all(lab.shape == (1, 5) for lab in labs)
    assert ((t[:, 3] >= 0.2) & (t[:, 3] <= 0.8) & (t[:, 4] >= 0.2) & (t[:, 4] <= 0.8)).all()
    assert (t[:, 1] - t[:, 3] / 2 >= 0).all() and (t[:, 1] + t[:, 3] / 2 <= 1).all()
    assert (t[:, 2] - t[:, 4] / 2 >= 0).all() and (t[:, 2] + t[:, 4] / 2 <= 1).all()
    assert t[:, 0].min() >= 0 and t[:, 0].max() <= 79 and len(set(t[:, 0].tolist())) > 40
    assert torch.equal(seed_labels([7], 80, 0)[0], labs[7])           # per-image seeds


def test_relabel_rules_on_hand_built_cases():
    t1 = label(0, 0.1, 0.1, 0.4, 0.4)
    # not confident (conf <= 0.2): unchanged
    assert torch.equal(relabel([det_row(0.6, 0.6, 0.9, 0.9, conf=0.2)], [t1])[0], t1)
    # confident, IoU < 0.35 with every label, area in (0.01, 0.85): added; a single label is never removed
    out = relabel([det_row(0.6, 0.6, 0.9, 0.9, cls=3.0)], [t1])[0]
    torch.testing.assert_close(out, torch.cat([t1, label(3, 0.6, 0.6, 0.9, 0.9)]))
    # overlapping a label (IoU >= 0.35): not added
    assert torch.equal(relabel([det_row(0.12, 0.12, 0.42, 0.42)], [t1])[0], t1)
    # the area window (0.01, 0.85)
    for side, added in ((0.09, False), (0.11, True), (0.9, True), (0.93, False)):
        d = det_row(1 - side, 1 - side, 1.0, 1.0)
        t_far = label(0, 0.0, 0.0, 0.02, 0.02)
        assert relabel([d], [t_far])[0].shape[0] == (2 if added else 1), side
    # two labels: the one no confident detection matches (IoU < 0.35) is removed
    t2 = torch.cat([t1, label(2, 0.6, 0.6, 0.9, 0.9)])
    out = relabel([det_row(0.1, 0.1, 0.4, 0.4, cls=0.0)], [t2])[0]
    torch.testing.assert_close(out, t1)
    # two labels, neither matched: the best matched one stays, plus the (unmatched) detection
    d = det_row(0.45, 0.45, 0.7, 0.7)
    out = relabel([d], [t2])[0]
    assert out.shape[0] == 2 and torch.equal(out[0], t2[1])
    # IoUs are against the labels before removal; an image without confident detections is untouched
    empty = torch.zeros(0, 6)
    assert torch.equal(relabel([empty], [t2])[0], t2)


def test_schedule_published_and_scaled():
    events = [it for it in range(LABEL_STAGE.iterations) if LABEL_STAGE.relabel_at(it)]
    assert events == list(range(800, 2801, 100)) and len(events) == 21
    s = LABEL_STAGE.scaled(300, imgsz=64, batch=2)
    assert [it for it in range(300) if s.relabel_at(it)] == list(range(80, 281, 10))
    assert s.save_every == 10 and not any(IMAGE_STAGE.relabel_at(it) for it in range(3000))
    assert (LABEL_STAGE.det_weight, LABEL_STAGE.bn_weight, LABEL_STAGE.first_bn_weight,
            LABEL_STAGE.tv_weight) == (0.5, 0.05, 5.0, 0.002)


def test_loss_terms_against_direct_computation():
    from ultralytics.cfg import get_cfg
    det = load_detector("yolo11n.yaml", nc=4)
    model = det.model
    x = init_images([0, 1], 64, seed=0).requires_grad_(True)
    labels = seed_labels([0, 1], 4, 0)
    # detection loss = Ultralytics' own training criterion on the same batch (summed), with a gradient to x
    ours = DetectionLoss(model)(model(x), labels)
    model.args = get_cfg()
    batch = {"img": x, "batch_idx": torch.tensor([0.0, 1.0]), "cls": torch.cat(labels)[:, :1],
             "bboxes": torch.cat(labels)[:, 1:]}
    ref, _ = model.loss(batch, model(x))
    torch.testing.assert_close(ours, ref.sum())
    (g,) = torch.autograd.grad(ours, x)
    assert torch.isfinite(ours) and g.abs().sum() > 0
    # BN term of model.0.bn (the first-BN term) = mean / biased variance of its input, L2 norms
    seen = {}
    h = model.model[0].bn.register_forward_hook(lambda m, i, o: seen.setdefault("x", i[0].detach()))
    prior = BNStatsPrior(model)
    with torch.no_grad():
        model(x)
    h.remove()
    prior.remove()
    z, bn = seen["x"], model.model[0].bn
    mean, var = z.mean((0, 2, 3)), z.var((0, 2, 3), unbiased=False)
    direct = (bn.running_var - var).norm() + (bn.running_mean - mean).norm()
    torch.testing.assert_close(prior.terms[0], direct)


def test_short_synthesis_lowers_the_objective_and_keeps_the_best_image():
    det = load_detector("yolo11n.yaml", nc=4)
    before = {k: v.clone() for k, v in det.model.state_dict().items()}
    stage = IMAGE_STAGE.scaled(12, imgsz=64, batch=2)
    assert stage.save_every == 1 or stage.save_every >= 1
    labels = seed_labels([0, 1], 4, 0)
    x0 = init_images([0, 1], 64, seed=0)
    r = synthesize_batch(det.model, labels, stage, x0)
    assert r.history[-1]["total"] < r.history[0]["total"]
    assert r.images.shape == x0.shape and not torch.equal(r.images, x0)
    # the kept image is the checked one with the lowest detection loss (labels fixed here)
    with torch.no_grad():
        again = DetectionLoss(det.model)(det.model(r.images), r.labels)
    assert abs(float(again) - r.best_det_loss) < 1e-3 * max(1.0, r.best_det_loss)
    assert 1 <= r.best_iteration < stage.iterations
    after = det.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)      # the teacher is untouched


def test_synthetic_set_resumes_and_calibrates(tmp_path, capsys):
    torch.manual_seed(0)
    det = load_detector("yolo11n.yaml", nc=4)
    lab = LABEL_STAGE.scaled(4, imgsz=32, batch=2)
    img = IMAGE_STAGE.scaled(4, imgsz=64, batch=2)
    folder = synthesize(det, str(tmp_path / "syn"), 4, lab, img, seed=0, progress=False)
    images = load_images(folder, det)
    assert images.shape == (4, 3, 64, 64)
    manifest = json.loads((tmp_path / "syn" / "images" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["teacher"]["checkpoint_sha256"]
    stamps = {p: os.path.getmtime(os.path.join(folder, p)) for p in os.listdir(folder) if p.endswith(".pt")}
    synthesize(det, str(tmp_path / "syn"), 4, lab, img, seed=0, progress=False)        # resume: no work
    assert stamps == {p: os.path.getmtime(os.path.join(folder, p)) for p in stamps}
    other = load_detector("yolo11n.yaml", nc=4)
    with pytest.raises(SynthSetError):
        load_images(folder, other)
    # PTQ + QwT calibrated on the synthetic set through the CLI
    data = write_yolo_dataset(str(tmp_path / "shapes"), n_train=4, n_val=4, size=64)
    torch.save({"model": det.model}, tmp_path / "teacher.pt")
    out = tmp_path / "out"
    rc = ptq.main(["--model", str(tmp_path / "teacher.pt"), "--data", data, "--synthetic", folder,
                   "--imgsz", "64", "--calib-images", "4", "--qwt-images", "4", "--qwt", "--no-fp",
                   "--qwt-gate", "insample", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    (res,) = list(out.iterdir())
    r = json.loads(res.read_text())
    assert r["calibration"]["source"].startswith("synthetic") and "qwt" in r


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_synthesis_two_gloo_processes_equal_one(tmp_path):
    """torchrun with 2 CPU processes makes the same set as one process (whole batches per rank)."""
    import subprocess
    import sys
    from qwt_core.synth_io import load_synthetic_set
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root)
    args = ["--model", "yolo11n.yaml", "--nc", "4", "--num-images", "4", "--batch", "2", "--iterations", "3",
            "--imgsz", "64", "--label-batch", "2", "--label-iterations", "3", "--label-imgsz", "32"]
    one = subprocess.run([sys.executable, "-m", "yolo_qwt.synth", *args, "--out", str(tmp_path / "one")],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={_free_port()}", "-m", "yolo_qwt.synth", *args,
                          "--out", str(tmp_path / "two")],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a = load_synthetic_set(tmp_path / "one" / "images")
    b = load_synthetic_set(tmp_path / "two" / "images")
    shards = sorted(p[:9] for p in os.listdir(tmp_path / "two" / "images") if p.endswith(".pt"))
    assert shards == ["synth_r00", "synth_r01"]
    assert torch.equal(a.images(), b.images())
    for i in range(4):
        assert torch.equal(a[i]["target"]["bboxes"], b[i]["target"]["bboxes"])


@pytest.mark.skipif(not __import__("yolo_qwt.models", fromlist=["x"]).yolov5_available(),
                    reason="original YOLOv5 model code not installed")
def test_yolov5_loss_and_a_short_clipped_synthesis():
    from yolov5.utils.loss import ComputeLoss
    from yolo_qwt.synth import V5_HYP, V5_IMAGE_STAGE, V5DetectionLoss, teacher_detections
    det = load_detector("yolov5n.yaml", nc=4)
    model = det.model
    x = init_images([0, 1], 64, seed=0).requires_grad_(True)
    labels = seed_labels([0, 1], 4, 0)
    ours = V5DetectionLoss(model, 64)(model(x), labels)
    model.hyp = {**V5_HYP, "obj": V5_HYP["obj"] * (64 / 640) ** 2}
    targets = torch.cat([torch.tensor([[0.0]]), labels[0]], 1), torch.cat([torch.tensor([[1.0]]), labels[1]], 1)
    ref, _ = ComputeLoss(model)(model(x)[1], torch.cat(targets))
    torch.testing.assert_close(ours, ref.sum())
    (g,) = torch.autograd.grad(ours, x)
    assert g.abs().sum() > 0
    dets = teacher_detections(model, x.detach())
    assert len(dets) == 2 and all(d.shape[1] == 6 for d in dets)
    stage = V5_IMAGE_STAGE.scaled(10, imgsz=64, batch=2)
    r = synthesize_batch(model, labels, stage, init_images([0, 1], 64, seed=0))
    assert r.history[-1]["total"] < r.history[0]["total"]
    assert r.images.min() >= 0 and r.images.max() <= 1             # clipped, as YOLOv5's generator
