"""yolo_qwt: placement, FP equality, QwT, Ultralytics validator, CLI errors (CPU, random-init models).

Models: ``yolo11n.yaml`` (Ultralytics) and ``yolov5n.yaml`` (the original anchor-based YOLOv5 code
when the ``yolov5`` package imports, otherwise that case is skipped). Random init gives activations
that shrink layer after layer; each test model therefore gets its BatchNorm statistics re-estimated
on the test images first ("warm" init), so quantization errors are of a realistic size.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("ultralytics")

from benchmarks.shapes import write_yolo_dataset  # noqa: E402
from qwt_core.modules import QuantConv2d, set_quant_state  # noqa: E402
from yolo_qwt import ptq  # noqa: E402
from yolo_qwt.evaluate import calibration_images, check_dataset, validate  # noqa: E402
from yolo_qwt.models import load_detector, yolov5_available  # noqa: E402
from yolo_qwt.quant import (YoloQuantConfig, calibrate_yolo, compensate_yolo, fold_batchnorms,  # noqa: E402
                            layer_outputs, quantize_yolo)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMGSZ = 64
MODELS = ["yolo11n.yaml",
          pytest.param("yolov5n.yaml", marks=pytest.mark.skipif(
              not yolov5_available(), reason="original YOLOv5 model code not installed (make yolo)"))]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    yaml_path = write_yolo_dataset(str(root), n_train=16, n_val=8, size=IMGSZ, seed=0)
    data = check_dataset(yaml_path)
    return yaml_path, data, calibration_images(data, 16, IMGSZ, seed=0)


def warm_detector(spec: str, data: dict, images: torch.Tensor):
    """Random-init detector with BatchNorm statistics estimated on ``images`` (then eval mode)."""
    torch.manual_seed(0)
    det = load_detector(spec, nc=int(data["nc"]), names=data["names"])
    for m in det.model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    det.model.train()
    with torch.no_grad():
        det.model(images)
    det.model.eval()
    return det


def convs_of_layers(model, first: int, last: int) -> set[str]:
    """Qualified names of the Conv2d in model.model[first:last], walking the layers themselves."""
    names = set()
    for i in range(first, last):
        for n, m in model.model[i].named_modules():
            if isinstance(m, torch.nn.Conv2d):
                names.add(f"model.{i}.{n}" if n else f"model.{i}")
    return names


@pytest.mark.parametrize("spec", MODELS)
def test_placement_is_the_papers(spec, dataset):
    _, data, images = dataset
    det = warm_detector(spec, data, images)
    n = len(det.model.model)
    body = convs_of_layers(det.model, 1, n - 1)
    qy = quantize_yolo(det, YoloQuantConfig(4, 8))
    quant = {name for name, m in det.model.named_modules() if isinstance(m, QuantConv2d)}
    assert set(qy.quantized) == quant == body
    assert not any(isinstance(m, QuantConv2d) for m in det.model.model[0].modules())      # stem FP
    assert not any(isinstance(m, QuantConv2d) for m in det.model.model[-1].modules())     # head FP
    if spec.startswith("yolo11"):
        assert len(quant) == 62
    for name in quant:
        q = det.model.get_submodule(name)
        assert (q.w_bits, q.a_bits) == (4, 8)
        assert q.weight_quantizer.channel_wise and not q.input_quantizer.channel_wise
    # quantize the head too: every head conv except DFL's
    det2 = warm_detector(spec, data, images)
    qy2 = quantize_yolo(det2, YoloQuantConfig(8, 8, quantize_head=True))
    head = {c for c in convs_of_layers(det2.model, n - 1, n) if ".dfl." not in c + "."}
    assert set(qy2.quantized) == body | head


@pytest.mark.parametrize("spec", MODELS)
@pytest.mark.parametrize("bn", ["folded", "unfolded"])
def test_fp_equality_with_quantization_disabled(spec, bn, dataset):
    _, data, images = dataset
    det = warm_detector(spec, data, images)
    ref = copy.deepcopy(det.model)
    if bn == "folded":
        assert fold_batchnorms(ref) > 0
    with torch.no_grad():
        y_ref = ref(images[:4])[0]
    qy = quantize_yolo(det, YoloQuantConfig(4, 4, bn=bn))
    calibrate_yolo(qy, images[:8])
    with torch.no_grad():
        y_q = det.model(images[:4])[0]
        set_quant_state(det.model, False, False)
        y_off = det.model(images[:4])[0]
    assert torch.equal(y_off, y_ref)
    assert not torch.allclose(y_q, y_ref, atol=1e-4)      # quantization on does change the output


@pytest.mark.parametrize("spec", MODELS)
def test_qwt_lowers_the_layer_error(spec, dataset):
    _, data, images = dataset
    det = warm_detector(spec, data, images)
    with torch.no_grad():
        fp = layer_outputs(det.model, images)
    qy = quantize_yolo(det, YoloQuantConfig(4, 4, bn="unfolded"))
    calibrate_yolo(qy, images[:8])
    q = layer_outputs(det.model, images)
    report = compensate_yolo(qy, list(images.split(8)), progress=False)
    c = layer_outputs(det.model, images)
    n = len(det.model.model)
    assert len(report.layers) == n
    applied = [d for d in report.layers if d.applied]
    assert applied, "QwT compensated no layer"
    for d in applied:
        assert d.mse_after < d.mse_before
        assert isinstance(det.model.model[d.index], torch.nn.Module)
        assert type(det.model.model[d.index]).__name__ == "CompensatedBlock"
        err_q = (fp[d.index] - q[d.index]).pow(2).mean()
        err_c = (fp[d.index] - c[d.index]).pow(2).mean()
        assert err_c < err_q, d.name
    reasons = {d.type: d.reason for d in report.layers if not d.applied and d.r2 is None}
    assert reasons["Concat"].startswith("multi-input")
    assert reasons["Detect"].startswith("Detect head: multi-input")
    assert "stem" in report.layers[0].reason
    # the inputs of the Detect head (P3, P4, P5) are closer to FP after QwT
    feats = det.model.model[-1].f
    before = sum((fp[j] - q[j]).pow(2).mean() for j in feats)
    after = sum((fp[j] - c[j]).pow(2).mean() for j in feats)
    assert after < before
    json.dumps(report.to_dict())


def _backend_model(model):
    """What Ultralytics' validator runs: AutoBackend (fuse=True by default) on its own deep copy."""
    from ultralytics.nn.autobackend import AutoBackend
    return AutoBackend(model=copy.deepcopy(model), device=torch.device("cpu"), verbose=False,
                       channels_last=False).model


def _bn_count(model) -> int:
    return sum(hasattr(m, "bn") for m in model.modules() if type(m).__name__ == "Conv")


def test_validator_runs_without_refolding(dataset):
    yaml_path, data, images = dataset
    # control: on an FP model the validator's backend does fold BatchNorm into the convs
    fp = warm_detector("yolo11n.yaml", data, images)
    assert _bn_count(fp.model) > 60 and _bn_count(_backend_model(fp.model)) == 0
    # quantized, BatchNorm unfolded: nothing may be folded into the calibrated convs
    det = warm_detector("yolo11n.yaml", data, images)
    qy = quantize_yolo(det, YoloQuantConfig(4, 8, bn="unfolded"))
    calibrate_yolo(qy, images[:8])
    compensate_yolo(qy, list(images.split(8)), progress=False)
    with torch.no_grad():
        y0 = det.model(images[:2])[0]
    run = _backend_model(det.model)
    assert _bn_count(run) == _bn_count(det.model) > 60
    assert sum(isinstance(m, QuantConv2d) for m in run.modules()) == 62
    with torch.no_grad():
        assert torch.equal(run(images[:2])[0], y0)
    state = {k: v.clone() for k, v in det.model.state_dict().items()}
    torch.set_num_threads(3)       # Ultralytics' device selection would reset this; validate restores it
    metrics = validate(det.for_validator(), yaml_path, imgsz=IMGSZ, batch=8)
    assert torch.get_num_threads() == 3
    torch.set_num_threads(1)
    assert set(metrics) >= {"map50_95", "map50"} and metrics["images"] == 8
    assert 0.0 <= metrics["map50_95"] <= metrics["map50"] <= 1.0
    after = det.model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)


@pytest.mark.skipif(not yolov5_available(), reason="original YOLOv5 model code not installed")
def test_yolov5_view_matches_yolov5_nms(dataset):
    """The Ultralytics-layout view of the original YOLOv5 gives the detections YOLOv5's own NMS gives."""
    from ultralytics.utils.nms import non_max_suppression as ul_nms
    from yolov5.utils.general import non_max_suppression as v5_nms
    yaml_path, data, images = dataset
    det = warm_detector("yolov5n.yaml", data, images)
    with torch.no_grad():   # objectness well above the random-init prior, so boxes pass the threshold
        for conv in det.model.model[-1].m:
            conv.bias.view(det.model.model[-1].na, -1)[:, 4] = 2.0
        raw = det.model(images[:2])[0]
        view = det.for_validator()(images[:2])
    assert view.shape == (2, 4 + len(data["names"]), raw.shape[1])
    a = v5_nms(raw, conf_thres=0.3, iou_thres=0.7, multi_label=True, max_det=1000)
    b = ul_nms(view, 0.3, 0.7, multi_label=True, max_det=1000)
    for x, y in zip(a, b):
        assert 0 < x.shape[0] < 1000
        key = lambda t: t[torch.argsort(t[:, 4] * 1e4 + t[:, 5], descending=True)][:, :6]  # noqa: E731
        torch.testing.assert_close(key(x), key(y), atol=1e-4, rtol=1e-4)
    metrics = validate(det.for_validator(), yaml_path, imgsz=IMGSZ, batch=8)
    assert metrics["images"] == 8


@pytest.mark.parametrize("argv,needle", [
    (["--model", "missing.pt"], "no such file"),
    (["--model", "{garbage}"], "not a readable PyTorch checkpoint"),
    (["--model", "{data}"], "not a YOLO model yaml"),
    (["--model", "yolo11n.yaml", "--data", "nowhere/data.yaml"], "no such file"),
    (["--model", "yolo11n.yaml", "--w-bits", "9"], "w_bits=9"),
    (["--model", "yolo11n.yaml", "--a-bits", "1"], "a_bits=1"),
])
def test_cli_bad_input_one_line_nothing_written(argv, needle, dataset, tmp_path, capsys):
    yaml_path, _, _ = dataset
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    argv = [a.replace("{garbage}", str(garbage)).replace("{data}", yaml_path) for a in argv]
    if "--data" not in argv:
        argv += ["--data", yaml_path]
    out = tmp_path / "out"
    rc = ptq.main(argv + ["--out", str(out), "--imgsz", str(IMGSZ)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
    assert not out.exists()


def test_cli_end_to_end_writes_one_json(dataset, tmp_path):
    yaml_path, _, _ = dataset
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "yolo_qwt.ptq", "--model", "yolo11n.yaml", "--data", yaml_path,
           "--w-bits", "4", "--a-bits", "8", "--qwt", "--imgsz", str(IMGSZ), "--calib-images", "8",
           "--qwt-images", "16", "--batch", "8", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    files = list(out.iterdir())
    assert [f.name for f in files] == ["yolo11n_W4A8_qwt.json"]
    r = json.loads(files[0].read_text())
    assert {"fp", "ptq", "qwt", "config", "qwt_report", "quantization"} <= set(r)
    assert r["config"]["label"] == "W4A8" and r["quantization"]["quantized_convs"] == 62
    assert len(r["qwt_report"]["layers"]) == 24


@pytest.mark.skipif(not yolov5_available(), reason="original YOLOv5 model code not installed")
def test_yolov5_checkpoint_in_the_original_repository_layout(dataset, tmp_path):
    """ultralytics/yolov5 checkpoints pickle ``models.yolo.DetectionModel`` (the repository layout,
    not the package's): such a file loads as the original YOLOv5."""
    import inspect
    import sys as _sys
    import yolov5.models.common as common
    import yolov5.models.experimental as experimental
    import yolov5.models.yolo as yolo
    _, data, images = dataset
    det = warm_detector("yolov5n.yaml", data, images)
    renamed = []
    mods = {"models": _sys.modules.get("models")}
    try:   # write the checkpoint as the original repository would
        _sys.modules["models"] = _sys.modules["yolov5.models"]
        for short, mod in (("yolo", yolo), ("common", common), ("experimental", experimental)):
            mods[f"models.{short}"] = _sys.modules.get(f"models.{short}")
            _sys.modules[f"models.{short}"] = mod
            for _, cls in inspect.getmembers(mod, inspect.isclass):
                if cls.__module__ == mod.__name__:
                    renamed.append((cls, cls.__module__))
                    cls.__module__ = f"models.{short}"
        torch.save({"model": det.model, "epoch": -1}, tmp_path / "yolov5n_repo.pt")
    finally:
        for cls, name in renamed:
            cls.__module__ = name
        for k, v in mods.items():
            if v is None:
                _sys.modules.pop(k, None)
            else:
                _sys.modules[k] = v
    assert "models" not in _sys.modules or _sys.modules["models"] is not _sys.modules["yolov5.models"]
    loaded = load_detector(str(tmp_path / "yolov5n_repo.pt"))
    assert loaded.family == "yolov5" and len(loaded.names) == 4
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(images[:2])[0], det.model(images[:2])[0])
