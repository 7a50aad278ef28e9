"""Detection (det_repq_vit): RepQ-ViT + QwT on a random-init, shrunken Swin Mask R-CNN built by stock
mmdet 3.3, on a tiny COCO-format dataset written here. CPU only, no network."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

try:  # the detector needs mmcv's compiled ops (RoIAlign, NMS)
    from mmcv.ops import nms  # noqa: F401
except Exception as err:  # noqa: BLE001
    pytest.skip(f"mmcv 2.1.0 with ops is not importable ({err}); build it with "
                "`bash scripts/build_mmcv.sh .venv`", allow_module_level=True)

from mmdet.registry import MODELS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

from det_repq_vit.checkpoint import (concat_to_unfold_order, convert_legacy_swin_keys,  # noqa: E402
                                     load_detector_checkpoint, to_legacy_swin_keys)
from det_repq_vit.data import CalibrationImages, list_calibration_images  # noqa: E402
from det_repq_vit.ptq import calibrate_detector_repq, compensate_backbone, quantize_detector  # noqa: E402
from det_repq_vit.tools import test as det_test  # noqa: E402
from det_repq_vit.tools import convert_checkpoint  # noqa: E402
from qwt_core.modules import set_quant_state  # noqa: E402
from helpers_models import block_errors_with_and_without_qwt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "det_repq_vit" / "configs" / "swin"
SWIN_T = CONFIGS / "mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_adamw_3x_coco.py"
CASCADE_SWIN_T = CONFIGS / "cascade_mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_giou_4conv1f_adamw_3x_coco.py"
CATEGORIES = [{"id": 1, "name": "square"}, {"id": 2, "name": "triangle"}, {"id": 3, "name": "bar"}]

register_all_modules(init_default_scope=False)
init_default_scope("mmdet")


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny detector runs many small ops; with 2 threads on a busy 2-core machine OpenMP
    oversubscription made RepQ-ViT calibration 20x slower, so these tests use one thread."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# ----------------------------------------------------------------------------------------- data
def _write_image(path: Path, h: int, w: int, rng: np.random.Generator, shapes: list[tuple]) -> None:
    import cv2

    img = (rng.random((h, w, 3)) * 60).astype(np.uint8)
    for cat, (x0, y0, x1, y1) in shapes:
        color = {1: (0, 0, 230), 2: (0, 220, 0), 3: (210, 0, 0)}[cat]
        if cat == 2:
            pts = np.array([[x0, y1], [(x0 + x1) // 2, y0], [x1, y1]], np.int32)
            cv2.fillPoly(img, [pts], color)
        else:
            img[y0:y1, x0:x1] = color
    cv2.imwrite(str(path), img)


def _polygon(cat: int, box: tuple) -> list[float]:
    x0, y0, x1, y1 = box
    if cat == 2:
        return [x0, y1, (x0 + x1) / 2, y0, x1, y1]
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def make_tiny_coco(root: Path, area_scale: Optional[dict[int, float]] = None) -> Path:
    """COCO-format folder at ``root``: 4 val and 8 train images with 2-3 objects (boxes + polygons)
    each, 3 categories. ``area_scale``: category → factor on the annotated ``area``."""
    rng = np.random.default_rng(0)
    (root / "annotations").mkdir(parents=True)
    for split, n in (("val2017", 4), ("train2017", 8)):
        (root / split).mkdir()
        images, anns = [], []
        for i in range(n):
            h, w = (96, 128) if i % 2 == 0 else (112, 80)
            shapes = []
            for k, cat in enumerate((1, 2, 3)[: 2 + i % 2]):
                x0, y0 = int(rng.integers(2, w // 2)), int(rng.integers(2, h // 2))
                x1, y1 = min(w - 2, x0 + 14 + 6 * k), min(h - 2, y0 + 16 + 5 * k)
                shapes.append((cat, (x0, y0, x1, y1)))
            name = f"{i:012d}.jpg"
            _write_image(root / split / name, h, w, rng, shapes)
            images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
            for cat, (x0, y0, x1, y1) in shapes:
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat,
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0,
                             "area": float((x1 - x0) * (y1 - y0)) * (area_scale or {}).get(cat, 1.0),
                             "segmentation": [_polygon(cat, (x0, y0, x1, y1))]})
        data = {"images": images, "annotations": anns, "categories": CATEGORIES}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory) -> Path:
    """tmp COCO: 4 val images (with boxes + polygons, 3 categories) and 8 train images."""
    return make_tiny_coco(tmp_path_factory.mktemp("coco"), area_scale={2: 0.5})


def _tiny_config_text(coco: Path, ann_file: str = "annotations/instances_val2017.json",
                      base: Path = SWIN_T) -> str:
    """Real Swin-T Mask R-CNN config, shrunk (dims 32, depth 2 per stage, 3 classes, small images)."""
    if base == CASCADE_SWIN_T:  # a list in a child config replaces the base list: spell it out
        heads = [dict(h, in_channels=32, conv_out_channels=32, fc_out_channels=64, num_classes=3)
                 for h in Config.fromfile(str(base)).model.roi_head.bbox_head]
        head = f"bbox_head={[Config(h).to_dict() for h in heads]!r},"
    else:
        head = "bbox_head=dict(in_channels=32, fc_out_channels=64, num_classes=3),"
    return f"""
_base_ = [{str(base)!r}]
data_root = {str(coco) + '/'!r}
model = dict(
    backbone=dict(embed_dims=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], drop_path_rate=0.0),
    neck=dict(in_channels=[32, 64, 128, 256], out_channels=32),
    rpn_head=dict(in_channels=32, feat_channels=32),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=32),
        {head}
        mask_roi_extractor=dict(out_channels=32),
        mask_head=dict(num_convs=2, in_channels=32, conv_out_channels=32, num_classes=3)),
    test_cfg=dict(rpn=dict(nms_pre=200, max_per_img=60), rcnn=dict(max_per_img=30)))
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(128, 96), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))]
test_dataloader = dict(
    num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, ann_file={ann_file!r},
                 metainfo=dict(classes=('square', 'triangle', 'bar')),
                 data_prefix=dict(img='val2017/'), pipeline=test_pipeline))
test_evaluator = dict(ann_file=data_root + {ann_file!r})
qwt_calib = dict(img_dir=data_root + 'train2017/', num_images=8, repq_batch=4, batch_size=4,
                 pipeline=[dict(type='LoadImageFromFile'),
                           dict(type='Resize', scale=(112, 112), keep_ratio=False),
                           dict(type='PackDetInputs', meta_keys=('img_path', 'ori_shape', 'img_shape',
                                                                 'scale_factor'))])
"""


@pytest.fixture(scope="module")
def tiny_config(coco_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny_mask_rcnn_swin.py"
    path.write_text(_tiny_config_text(coco_dir))
    return path


def _build(cfg_path: Path, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = MODELS.build(Config.fromfile(str(cfg_path)).model)
    model.init_weights()
    return model.eval()


@pytest.fixture(scope="module")
def legacy_checkpoint(tiny_config, tmp_path_factory) -> tuple[Path, dict]:
    """A random tiny detector saved in the original Swin detection (mmdet 2.x) key layout."""
    model = _build(tiny_config, seed=1)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("ckpt") / "legacy.pth"
    torch.save({"state_dict": to_legacy_swin_keys(sd),
                "meta": {"mmdet_version": "2.11.0", "CLASSES": ("square", "triangle", "bar")}}, path)
    return path, sd


# ----------------------------------------------------------------------------------- checkpoints
def test_legacy_layout_loads_into_mmdet3_model(tiny_config, legacy_checkpoint):
    path, reference = legacy_checkpoint
    raw = torch.load(path, weights_only=True)["state_dict"]
    assert any(k.startswith("backbone.layers.0.blocks.0.mlp.fc1") for k in raw)
    assert any(k.startswith("backbone.patch_embed.proj.") for k in raw)
    assert not any(".stages." in k or "w_msa" in k for k in raw)
    model = _build(tiny_config, seed=7)
    info = load_detector_checkpoint(model, path)
    assert info["legacy_layout"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_mmengine_style_checkpoint_with_numpy_meta_loads(tiny_config, tmp_path):
    """torch >= 2.6 refuses numpy objects with weights_only=True (mmengine saves some in meta): the
    loader falls back with a warning instead of failing."""
    model = _build(tiny_config, seed=3)
    path = tmp_path / "mmengine_style.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {"hist": np.array([1.0, 2.0])}}, path)
    other = _build(tiny_config, seed=4)
    with pytest.warns(UserWarning, match="weights_only=False"):
        info = load_detector_checkpoint(other, path)
    assert not info["legacy_layout"]
    for k, v in other.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def _original_patch_merging(x: torch.Tensor, norm_w, norm_b, red_w) -> torch.Tensor:
    """Original Swin merging on NHWC x: concat [x(0,0), x(1,0), x(0,1), x(1,1)], LayerNorm, Linear."""
    cat = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    cat = torch.nn.functional.layer_norm(cat, cat.shape[-1:], norm_w, norm_b)
    return cat @ red_w.t()


def test_converted_patch_merging_matches_original_semantics(tiny_config):
    model = _build(tiny_config)
    down = model.backbone.stages[0].downsample
    with torch.no_grad():
        down.norm.weight.normal_()
        down.norm.bias.normal_()
    legacy = to_legacy_swin_keys({f"backbone.stages.0.downsample.{k}": v
                                  for k, v in down.state_dict().items()})
    x = torch.randn(2, 8, 6, 32)
    ref = _original_patch_merging(x, legacy["backbone.layers.0.downsample.norm.weight"],
                                  legacy["backbone.layers.0.downsample.norm.bias"],
                                  legacy["backbone.layers.0.downsample.reduction.weight"])
    with torch.no_grad():
        out, hw = down(x.reshape(2, 48, 32), (8, 6))
    assert hw == (4, 3)
    torch.testing.assert_close(out.view(2, 4, 3, -1), ref, rtol=1e-5, atol=1e-5)
    # and the forward conversion is the inverse
    back = convert_legacy_swin_keys(legacy)
    for k, v in down.state_dict().items():
        assert torch.equal(back[f"backbone.stages.0.downsample.{k}"], v)
    w = torch.arange(8.0)
    assert concat_to_unfold_order(w).tolist() == [0, 4, 2, 6, 1, 5, 3, 7]


def test_relative_position_index_matches_original_formula(tiny_config):
    """The index buffer in old checkpoints (original formula) equals mmdet's, so it loads as is."""
    ws = 7
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    original = rel[:, :, 0] * (2 * ws - 1) + rel[:, :, 1]
    model = _build(tiny_config)
    assert torch.equal(model.backbone.stages[0].blocks[0].attn.w_msa.relative_position_index, original)


def test_convert_checkpoint_script_roundtrip(legacy_checkpoint, tmp_path):
    path, reference = legacy_checkpoint
    new = convert_checkpoint.main([str(path), str(tmp_path / "new.pth")])
    sd = torch.load(new, weights_only=True)["state_dict"]
    assert set(sd) == set(reference)
    old = convert_checkpoint.main([str(new), str(tmp_path / "old.pth"), "--reverse"])
    assert set(torch.load(old, weights_only=True)["state_dict"]) == set(
        torch.load(path, weights_only=True)["state_dict"])


# ------------------------------------------------------------------------------------ quantization
def _calibration(cfg_path: Path, model, n: int, batch: int) -> CalibrationImages:
    calib = Config.fromfile(str(cfg_path)).qwt_calib
    paths = list_calibration_images(calib.img_dir, n, seed=0)
    return CalibrationImages(paths, calib.pipeline, batch, model.data_preprocessor)


def test_reparameterization_keeps_fp_detector_with_window_padding(tiny_config, legacy_checkpoint):
    """After RepQ-ViT (LayerNorm folded into qkv/fc1/reduction) the detector with quantization off is
    the FP detector, also where windows are padded (80x112 input: 20x28 tokens, not multiples of 7)."""
    path, _ = legacy_checkpoint
    fp = _build(tiny_config)
    load_detector_checkpoint(fp, path)
    q = _build(tiny_config)
    load_detector_checkpoint(q, path)
    qm = quantize_detector(q, 4, 4)
    calibrate_detector_repq(qm, next(iter(_calibration(tiny_config, q, 4, 4))))
    # the LayerNorm was really rescaled (so the check below is not trivially true)
    assert float(qm.ln_pairs[0][0].weight.detach().sub(fp.backbone.stages[0].blocks[0].norm1.weight).abs().max()) > 0
    x = torch.randn(2, 3, 80, 112)
    set_quant_state(q, weight=False, act=False)
    with torch.no_grad():
        outs_q, outs_fp = q.backbone(x), fp.backbone(x)
    for a, b in zip(outs_q, outs_fp):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_qwt_reduces_backbone_block_error(tiny_config, legacy_checkpoint):
    path, _ = legacy_checkpoint
    model = _build(tiny_config)
    load_detector_checkpoint(model, path)
    qm = quantize_detector(model, 4, 4)
    calib = _calibration(tiny_config, model, 8, 4)
    calibrate_detector_repq(qm, next(iter(calib)))
    report = compensate_backbone(qm, calib, progress=False)
    assert len(report.blocks) == 8 and any(b.applied for b in report.blocks)

    err_q, err_c = block_errors_with_and_without_qwt(qm, model, calib)
    assert err_c < 0.9 * err_q, (err_c, err_q)


def test_end_to_end_fp_repq_qwt_json(tiny_config, legacy_checkpoint, tmp_path):
    path, _ = legacy_checkpoint
    out = tmp_path / "res.json"
    det_test.main([str(tiny_config), str(path), "--eval", "bbox", "segm", "--w_bit", "4", "--a_bit", "4",
                   "--fp", "--calib_size", "8", "--calib_batch", "4", "--seed", "0", "--device", "cpu",
                   "--output", str(out), "--work-dir", str(tmp_path / "work")])
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"fp", "repq", "qwt"}
    for stage in ("fp", "repq", "qwt"):
        for kind in ("bbox", "segm"):
            v = res["results"][stage][f"coco/{kind}_mAP"]
            assert 0.0 <= v <= 1.0
            assert res["ap"][stage][kind] == round(100 * v, 2)
    assert len(res["qwt_report"]["blocks"]) == 8
    assert res["w_bits"] == 4 and res["a_bits"] == 4 and res["calib_size"] == 8


def test_qwt_gate_insample_flag_reaches_apply_qwt(tiny_config, legacy_checkpoint, tmp_path):
    """--qwt_gate insample (the papers' rule): recorded in the JSON, and the gate's R² is the in-sample one."""
    path, _ = legacy_checkpoint
    out = tmp_path / "res.json"
    det_test.main([str(tiny_config), str(path), "--eval", "bbox", "--calib_size", "8", "--calib_batch", "4",
                   "--device", "cpu", "--qwt_gate", "insample", "--output", str(out),
                   "--work-dir", str(tmp_path / "work")])
    res = json.loads(out.read_text())
    assert (res["qwt_gate"], res["qwt_ridge"]) == ("insample", 0.0)
    assert res["qwt_report"]["gate"] == "insample"
    blocks = res["qwt_report"]["blocks"]
    assert len(blocks) == 8 and all(b["r2"] == b["r2_insample"] and b["ridge"] == 0.0 for b in blocks)


def test_fused_fake_quant_flag_gives_the_same_numbers(tiny_config, legacy_checkpoint, tmp_path):
    """--fused_fake_quant on the detection command line (torch.compile kernels) changes the speed,
    not the results."""
    from qwt_core import quantizers as qz

    path, _ = legacy_checkpoint
    runs = {}
    try:
        for name, extra in (("eager", []), ("fused", ["--fused_fake_quant"])):
            out = tmp_path / f"{name}.json"
            det_test.main([str(tiny_config), str(path), "--eval", "bbox", "--calib_size", "8", "--calib_batch", "4",
                           "--device", "cpu", "--output", str(out), "--work-dir", str(tmp_path / "work"), *extra])
            runs[name] = json.loads(out.read_text())
        assert qz.fused_fake_quant_enabled()
    finally:
        qz.set_fused_fake_quant(False)
    assert runs["eager"]["fused_fake_quant"] is False and runs["fused"]["fused_fake_quant"] is True
    assert runs["fused"]["results"] == runs["eager"]["results"]
    for a, b in zip(runs["fused"]["qwt_report"]["blocks"], runs["eager"]["qwt_report"]["blocks"]):
        assert a["applied"] == b["applied"] and a["r2"] == pytest.approx(b["r2"], rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("extra,needle", [(["--qwt_gate", "oracle"], "2"), (["--qwt_ridge", "-3"], "2"),
                                          (["--qwt_gate", "insample", "--qwt_ridge", "auto"], "holdout"),
                                          (["--qwt_solver", "qr"], "2")])
def test_bad_qwt_gate_or_ridge(tiny_config, legacy_checkpoint, extra, needle, capsys):
    msg = _exit_message([str(tiny_config), str(legacy_checkpoint[0]), "--device", "cpu", *extra])
    assert needle in msg
    if msg == "2":  # argparse: usage error naming the flag
        assert extra[0] in capsys.readouterr().err


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_dist_test_sh_two_processes(tiny_config, legacy_checkpoint, tmp_path):
    """tools/dist_test.sh with 2 CPU processes (gloo): sharded QwT moments all-reduced, COCO results
    gathered across ranks, one JSON written by rank 0."""
    import subprocess
    import sys

    out = tmp_path / "dist.json"
    env = dict(os.environ, PYTHON=sys.executable, PORT=str(_free_port()), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        ["bash", "tools/dist_test.sh", str(tiny_config), str(legacy_checkpoint[0]), "2",
         "--eval", "bbox", "segm", "--w_bits", "4", "--a_bits", "4", "--calib_size", "8",
         "--calib_batch", "4", "--output", str(out), "--work-dir", str(tmp_path / "work")],
        cwd=ROOT / "det_repq_vit", env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world_size"] == 2 and set(res["results"]) == {"repq", "qwt"}
    assert 0.0 <= res["results"]["qwt"]["coco/bbox_mAP"] <= 1.0
    assert all(b["rows"] > 0 for b in res["qwt_report"]["blocks"])


def test_cascade_giou_4conv1f_quantizes_and_evaluates(coco_dir, tmp_path):
    """Cascade Mask R-CNN (3 GIoU 4conv1f heads with SyncBN) through the whole tools/test.py path,
    from a checkpoint in the mmdet 3.x layout."""
    cfg = tmp_path / "cascade.py"
    cfg.write_text(_tiny_config_text(coco_dir, base=CASCADE_SWIN_T))
    model = _build(cfg, seed=2)
    assert len(model.roi_head.bbox_head) == 3
    ckpt = tmp_path / "cascade.pth"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    out = tmp_path / "res.json"
    det_test.main([str(cfg), str(ckpt), "--w_bits", "6", "--a_bits", "6", "--calib_size", "8",
                   "--calib_batch", "4", "--device", "cpu", "--output", str(out),
                   "--work-dir", str(tmp_path / "work")])
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"repq", "qwt"}
    assert all(0.0 <= res["results"][s]["coco/segm_mAP"] <= 1.0 for s in ("repq", "qwt"))

    # every Conv2d / Linear of the detector is quantized; the patch-embedding input at 8 bits
    qm = quantize_detector(model, 4, 4)
    plain = [n for n, m in model.named_modules()
             if type(m) in (torch.nn.Conv2d, torch.nn.Linear)]
    assert not plain, plain[:5]
    assert model.backbone.patch_embed.projection.input_quantizer.n_bits == 8
    assert model.roi_head.bbox_head[2].shared_convs[0].conv.input_quantizer.n_bits == 4
    assert len(qm.block_names) == 8 and len(qm.ln_pairs) == 2 * 8 + 3


# ------------------------------------------------------------------------------------ bad inputs
def _exit_message(argv) -> str:
    with pytest.raises(SystemExit) as exc:
        det_test.main(argv)
    return str(exc.value)


def test_bad_config_path(legacy_checkpoint, tmp_path):
    msg = _exit_message([str(tmp_path / "nope.py"), str(legacy_checkpoint[0])])
    assert "config not found" in msg


def test_missing_checkpoint(tiny_config, tmp_path):
    msg = _exit_message([str(tiny_config), str(tmp_path / "missing.pth"), "--device", "cpu"])
    assert "checkpoint not found" in msg


def test_checkpoint_with_wrong_keys(tiny_config, tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {"backbone.something.weight": torch.zeros(3)}}, bad)
    msg = _exit_message([str(tiny_config), str(bad), "--device", "cpu", "--calib_size", "8",
                         "--calib_batch", "4"])
    assert "does not match the model" in msg and "missing" in msg


def test_missing_annotation_file(coco_dir, legacy_checkpoint, tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text(_tiny_config_text(coco_dir, ann_file="annotations/instances_missing.json"))
    msg = _exit_message([str(cfg), str(legacy_checkpoint[0]), "--device", "cpu"])
    assert "annotation file not found" in msg and "instances_missing.json" in msg


def test_missing_data_dir(coco_dir, legacy_checkpoint, tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text(_tiny_config_text(coco_dir).replace(str(coco_dir) + "/", str(tmp_path / "no_coco") + "/"))
    msg = _exit_message([str(cfg), str(legacy_checkpoint[0]), "--device", "cpu"])
    assert "data_root not found" in msg


def test_bad_bits(tiny_config, legacy_checkpoint):
    msg = _exit_message([str(tiny_config), str(legacy_checkpoint[0]), "--w_bits", "1"])
    assert "w_bits" in msg


# ------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.py")))
def test_release_configs_build_with_stock_mmdet(name):
    cfg = Config.fromfile(str(CONFIGS / name))
    assert cfg.qwt_calib.num_images == 512 and cfg.qwt_calib.pipeline[1]["scale"] == (224, 224)
    assert cfg.test_evaluator.metric == ["bbox", "segm"]
    model = MODELS.build(cfg.model)
    assert type(model.backbone).__name__ == "SwinTransformer"
    if name.startswith("cascade"):
        assert len(model.roi_head.bbox_head) == 3
        assert type(model.roi_head.bbox_head[0].loss_bbox).__name__ == "GIoULoss"
        assert model.roi_head.bbox_head[0].num_shared_convs == 4
