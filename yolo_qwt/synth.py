"""Stage I: synthetic calibration images from the FP detector alone (YOLO11 / Ultralytics, YOLOv5).

The zero-shot QAT paper's YOLO11 generator (DFQ-YOLO §2.1), on ``qwt_core.inversion`` (Adam on
the pixels, BatchNorm-statistics prior, total variation) and ``qwt_core.synth_io`` (resumable
shards, sha256 manifest, teacher hash):

* the variable is the image in YOLO input space ([0, 1], RGB), initialised to ``randint(0, 254)/255``
  (seeded per image), never clipped; Adam(0.9, 0.999), lr 0.2, cosine to 0 over the iterations;
* ``L = a_det·L_det + a_bn·Σ_BN (‖σ²_run − σ²_batch‖₂ + ‖μ_run − μ_batch‖₂) + a_first·(the same
  term of the first BN, model.0.bn) + a_tv·TV₂``; ``L_det`` is Ultralytics' v8 detection loss (box
  7.5, cls 0.5, dfl 1.5, × batch size) of the teacher on the current labels;
* **adaptive label sampling** (stage B, 160 px): one-box seed labels (sides ~ U(0.2, 0.8), centre
  uniform inside the image, class uniform); every ``relabel_every`` iterations within
  ``[relabel_start, relabel_stop]`` the teacher's confident detections (NMS conf 0.001, IoU 0.6,
  300 boxes, class-aware; kept when conf > 0.2) edit the labels: a detection whose max IoU with the
  labels is < 0.35 and whose normalised area lies in (0.01, 0.85) is added; when an image has more
  than one label, labels whose max IoU with the detections is < 0.35 are removed (all but the best
  matched one if all would go); images without confident detections keep theirs;
* final synthesis (stage C, 640 px) from fresh noise with those labels fixed; in both stages the
  image kept is the one with the lowest teacher detection loss among the checks every
  ``save_every`` iterations (iterations ``save_every``, ``2·save_every``, ..., before that
  iteration's update).

Published weights: :data:`LABEL_STAGE` (``genlabel.json``), :data:`IMAGE_STAGE`
(``relabel-syn.json``), :data:`REAL_LABEL_STAGE` (``true_label.json``). :meth:`SynthStage.scaled`
shortens a stage keeping its relabel schedule in proportion (CPU benchmark and tests).

The original YOLOv5 uses its own generator's settings (:data:`V5_LABEL_STAGE`,
:data:`V5_IMAGE_STAGE`: YOLOv5 ``ComputeLoss``, pixels clipped to [0, 1], checks every 50
iterations); its optional augmentations (random erasing, jitter, flips) are not implemented.
"""
from __future__ import annotations

import math
import os
import types
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional, Sequence

import torch
from torch import nn

from qwt_core.inversion import BNStatsPrior, InversionConfig, invert, synthesize_batches
from qwt_core.synth_io import SynthManifest, SynthSetError, load_synthetic_set

from .models import Detector, ModelSpecError, load_detector

__all__ = ["SynthStage", "SamplerRules", "LABEL_STAGE", "IMAGE_STAGE", "REAL_LABEL_STAGE", "V5_LABEL_STAGE",
           "V5_IMAGE_STAGE", "V5_HYP", "V5DetectionLoss", "detection_loss", "is_yolov5", "seed_labels",
           "relabel", "box_iou", "DetectionLoss", "teacher_detections", "init_images", "synthesize_batch",
           "synthesize", "load_images", "SynthSetError", "main"]

Labels = torch.Tensor   # (n, 5): class, cx, cy, w, h (normalised to the image side)


@dataclass(frozen=True)
class SynthStage:
    """One synthesis stage (weights, size, schedule)."""

    det_weight: float
    bn_weight: float
    first_bn_weight: float
    tv_weight: float
    imgsz: int
    batch: int
    iterations: int = 3000
    lr: float = 0.2
    sample_labels: bool = False
    save_every: int = 100
    relabel_every: int = 100
    relabel_start: int = 800
    relabel_stop: int = 2800
    clip: bool = False                 # clamp pixels to [0, 1] after every step (the YOLOv5 generator)

    def scaled(self, iterations: int, imgsz: Optional[int] = None, batch: Optional[int] = None) -> "SynthStage":
        """The same stage with ``iterations`` steps, relabel / best-image checks in proportion."""
        f = iterations / self.iterations
        every = max(1, round(self.save_every * f))
        return replace(self, iterations=iterations, imgsz=imgsz or self.imgsz, batch=batch or self.batch,
                       save_every=every, relabel_every=max(1, round(self.relabel_every * f)),
                       relabel_start=round(self.relabel_start * f), relabel_stop=round(self.relabel_stop * f))

    def relabel_at(self, it: int) -> bool:
        return (self.sample_labels and it % self.relabel_every == 0
                and self.relabel_start <= it <= self.relabel_stop)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: genlabel.json (adaptive label sampling, 160 px, batch 512)
LABEL_STAGE = SynthStage(0.5, 0.05, 5.0, 0.002, imgsz=160, batch=512, sample_labels=True)
#: relabel-syn.json (final images with the sampled labels fixed, 640 px, batch 32)
IMAGE_STAGE = SynthStage(0.5, 0.05, 5.0, 0.002, imgsz=640, batch=32)
#: true_label.json (real COCO labels)
REAL_LABEL_STAGE = SynthStage(0.001, 0.001, 1.0, 5e-5, imgsz=640, batch=32)
#: the original YOLOv5's generator (distill_image.py, README values): main 0.5, r_feature 0.01,
#: first_bn_coef 2.0, tv_l2 5e-4, 2500 iterations, pixels clipped, verifier / sampler period 50;
#: label stage at 160 px, batch 64, box sampler from iteration 800 to the end
V5_LABEL_STAGE = SynthStage(0.5, 0.01, 2.0, 5e-4, imgsz=160, batch=64, iterations=2500, sample_labels=True,
                            save_every=50, relabel_every=50, relabel_start=800, relabel_stop=2800, clip=True)
V5_IMAGE_STAGE = SynthStage(0.5, 0.01, 2.0, 5e-4, imgsz=640, batch=32, iterations=2500, save_every=50,
                            relabel_every=50, clip=True)
#: YOLOv5 ComputeLoss gains (hyp.distill.yaml); ``obj`` is scaled by (imgsz / 640)² once
V5_HYP: dict[str, float] = {"box": 0.05, "obj": 1.0, "cls": 0.5, "cls_pw": 1.0, "obj_pw": 1.0, "fl_gamma": 0.0,
                            "anchor_t": 4.0, "label_smoothing": 0.0}


@dataclass(frozen=True)
class SamplerRules:
    """Thresholds of the adaptive label sampler (published values)."""

    conf: float = 0.2
    iou: float = 0.35
    area_min: float = 0.01
    area_max: float = 0.85
    nms_conf: float = 0.001
    nms_iou: float = 0.6
    max_det: int = 300


# ---- labels -------------------------------------------------------------------------------------------

def seed_labels(indices: Sequence[int], nc: int, seed: int) -> list[Labels]:
    """One box per image: ``w, h ~ U(0.2, 0.8)``, centre uniform with the box inside [0, 1], class
    uniform in ``range(nc)``; image ``i`` drawn from seed ``seed + i``. Returns ``(1, 5)`` tensors."""
    out = []
    for i in indices:
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(i))
        w, h = (0.2 + 0.6 * torch.rand(2, generator=g)).tolist()
        u, v = torch.rand(2, generator=g).tolist()
        c = int(torch.randint(nc, (1,), generator=g))
        out.append(torch.tensor([[c, w / 2 + u * (1 - w), h / 2 + v * (1 - h), w, h]]))
    return out


def xywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    """``(n, 4)`` centre/size → corners."""
    return torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], dim=1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of ``(n, 4)`` and ``(m, 4)`` xyxy boxes → ``(n, m)``."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-12)


def relabel(detections: Sequence[torch.Tensor], targets: Sequence[Labels],
            rules: SamplerRules = SamplerRules()) -> list[Labels]:
    """The sampler's add / remove rules, per image.

    Args:
        detections: per image ``(k, 6)``: x1, y1, x2, y2 (normalised), confidence, class.
        targets: per image ``(m, 5)`` current labels (class, cx, cy, w, h normalised).
    Returns:
        The new labels per image (kept targets first, then additions, in detection order).
    """
    out = []
    for det, tgt in zip(detections, targets):
        det = det[det[:, 4] > rules.conf]
        if det.shape[0] == 0:
            out.append(tgt.clone())
            continue
        t_xyxy = xywh_to_xyxy(tgt[:, 1:5])
        iou = box_iou(det[:, :4], t_xyxy) if tgt.shape[0] else det.new_zeros(det.shape[0], 0)
        best_t = iou.max(dim=1).values if tgt.shape[0] else det.new_zeros(det.shape[0])
        wh = det[:, 2:4] - det[:, :2]
        area = wh[:, 0] * wh[:, 1]
        add = (best_t < rules.iou) & (area > rules.area_min) & (area < rules.area_max)
        keep = torch.ones(tgt.shape[0], dtype=torch.bool)
        if tgt.shape[0] > 1:
            best_p = iou.max(dim=0).values
            keep = best_p >= rules.iou
            if not keep.any():
                keep[int(best_p.argmax())] = True
        d = det[add]
        new = torch.cat([d[:, 5:6], (d[:, :2] + d[:, 2:4]) / 2, d[:, 2:4] - d[:, :2]], dim=1)
        out.append(torch.cat([tgt[keep], new.to(tgt.dtype)], dim=0))
    return out


# ---- teacher --------------------------------------------------------------------------------------------

class DetectionLoss:
    """Ultralytics' v8 detection loss of ``model`` (box 7.5, cls 0.5, dfl 1.5 unless the model's
    ``args`` says otherwise), summed over its three terms, × batch size (DFQ's L_det)."""

    def __init__(self, model: nn.Module) -> None:
        from ultralytics.cfg import get_cfg
        from ultralytics.utils.loss import v8DetectionLoss
        args = getattr(model, "args", None)
        hyp = get_cfg(overrides=args if isinstance(args, dict) else None) if not hasattr(args, "box") else args
        view = types.SimpleNamespace(args=hyp, model=model.model, parameters=model.parameters)
        self.criterion = v8DetectionLoss(view)

    def __call__(self, preds: Any, labels: Sequence[Labels]) -> torch.Tensor:
        """``preds``: the model's output (eval tuple or training dict); ``labels``: per image ``(n, 5)``."""
        dev = self.criterion.device
        idx = torch.cat([torch.full((len(t),), i, dtype=torch.float32) for i, t in enumerate(labels)])
        lab = torch.cat(list(labels)) if labels else torch.zeros(0, 5)
        batch = {"batch_idx": idx.to(dev), "cls": lab[:, :1].to(dev), "bboxes": lab[:, 1:5].to(dev)}
        loss, _ = self.criterion(preds, batch)
        return loss.sum()


def is_yolov5(model: nn.Module) -> bool:
    """True for the original YOLOv5 ``DetectionModel`` (the ``yolov5`` package)."""
    return type(model).__module__.split(".")[0] in ("yolov5", "models")


class V5DetectionLoss:
    """The original YOLOv5's ``ComputeLoss`` (gains :data:`V5_HYP`, ``obj`` × (imgsz/640)² once; the
    published generator scales it twice at 160 px, a pitfall not copied), × batch size."""

    def __init__(self, model: nn.Module, imgsz: int) -> None:
        from yolov5.utils.loss import ComputeLoss
        hyp = dict(V5_HYP)
        hyp["obj"] *= (imgsz / 640) ** 2
        view = types.SimpleNamespace(hyp=hyp, model=model.model, parameters=model.parameters)
        self.criterion = ComputeLoss(view)

    def __call__(self, preds: Any, labels: Sequence[Labels]) -> torch.Tensor:
        raw = preds[1] if isinstance(preds, tuple) else preds
        dev = raw[0].device
        targets = torch.cat([torch.cat([torch.full((len(t), 1), float(i)), t], dim=1) for i, t in enumerate(labels)])
        loss, _ = self.criterion(list(raw), targets.to(dev))
        return loss.sum()


def detection_loss(model: nn.Module, imgsz: int):
    """The family's detection loss: :class:`DetectionLoss` (Ultralytics) or :class:`V5DetectionLoss`."""
    return V5DetectionLoss(model, imgsz) if is_yolov5(model) else DetectionLoss(model)


@torch.no_grad()
def teacher_detections(model: nn.Module, x: torch.Tensor, rules: SamplerRules = SamplerRules()) -> list[torch.Tensor]:
    """The teacher's detections on ``x`` ``(B, 3, S, S)``: per image ``(k, 6)`` normalised xyxy
    (clamped at 0), confidence, class (class-aware NMS, one label per box)."""
    from ultralytics.utils.nms import non_max_suppression
    out = model(x)
    pred = out[0] if isinstance(out, (tuple, list)) else out
    if is_yolov5(model):       # (B, A, 5 + nc) → Ultralytics' (B, 4 + nc, A), scores obj·p(class)
        pred = torch.cat([pred[..., :4], pred[..., 5:] * pred[..., 4:5]], dim=-1).transpose(1, 2)
    dets = non_max_suppression(pred, rules.nms_conf, rules.nms_iou, multi_label=False, max_det=rules.max_det)
    side = float(x.shape[-1])
    res = []
    for d in dets:
        d = d[:, :6].clone()
        d[:, :4] = d[:, :4].clamp(min=0) / side
        res.append(d.cpu())
    return res


def init_images(indices: Sequence[int], imgsz: int, seed: int, offset: int = 0) -> torch.Tensor:
    """``(len(indices), 3, imgsz, imgsz)``: ``randint(0, 254)/255``, image ``i`` from seed
    ``seed·1_000_003 + offset + i``."""
    out = []
    for i in indices:
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(offset) + int(i))
        out.append(torch.randint(0, 255, (3, imgsz, imgsz), generator=g).float() / 255.0)
    return torch.stack(out)


@dataclass
class BatchResult:
    images: torch.Tensor                 # (B, 3, S, S), the kept (best) images
    labels: list[Labels]                 # final labels
    best_iteration: int
    best_det_loss: float
    history: list[dict[str, float]]
    seconds: float


def synthesize_batch(model: nn.Module, labels: Sequence[Labels], stage: SynthStage, x0: torch.Tensor,
                     rules: SamplerRules = SamplerRules(), progress: bool = False) -> BatchResult:
    """Optimise ``x0`` ``(B, 3, S, S)`` against the frozen FP ``model`` (eval mode) for ``labels``."""
    model.eval()
    x0 = x0.to(next(model.parameters()).device)
    loss_fn = detection_loss(model, int(x0.shape[-1]))
    prior = BNStatsPrior(model)
    state: dict[str, Any] = {"labels": [t.clone() for t in labels], "best": None, "best_loss": math.inf,
                             "best_it": -1}

    def task_loss(x: torch.Tensor, it: int) -> dict[str, torch.Tensor]:
        if stage.relabel_at(it):
            state["labels"] = relabel(teacher_detections(model, x.detach(), rules), state["labels"], rules)
            prior.reset()
        preds = model(x)
        det = loss_fn(preds, state["labels"])
        if stage.save_every and it >= stage.save_every and it % stage.save_every == 0:
            if float(det) < state["best_loss"]:
                state.update(best=x.detach().clone(), best_loss=float(det), best_it=it)
        return {"det": stage.det_weight * det, "first_bn": stage.first_bn_weight * prior.terms[0]}

    cfg = InversionConfig(iterations=stage.iterations, lr=stage.lr, betas=(0.9, 0.999), eps=1e-8, warmup=0,
                          task_weight=1.0, bn_weight=stage.bn_weight, tv_weight=stage.tv_weight,
                          clamp=stage.clip)
    bounds = (torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)) if stage.clip else None
    try:
        res = invert(x0, task_loss, cfg, priors=[prior], bounds=bounds, progress=progress, desc="synthesis")
    finally:
        prior.remove()
    images = state["best"] if state["best"] is not None else res.images
    return BatchResult(images, state["labels"], state["best_it"], state["best_loss"], res.history, res.seconds)


# ---- a whole set, resumable -------------------------------------------------------------------------------

def teacher_sha256(model: nn.Module) -> str:
    """Hex sha256 over the state dict (names, dtypes, shapes, values). Written here rather than
    calling ``qwt_core.synth_io.state_dict_sha256``, which cannot view the 0-dim
    ``num_batches_tracked`` buffers of BatchNorm as bytes."""
    import hashlib
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _teacher_id(det: Detector) -> dict[str, Any]:
    return {"model": os.path.basename(det.source), "checkpoint": det.source if det.source.endswith(".pt") else None,
            "checkpoint_sha256": teacher_sha256(det.model)}


def _targets(labels: Sequence[Labels], side: int) -> list[dict[str, torch.Tensor]]:
    return [{"bboxes": xywh_to_xyxy(t[:, 1:5]) * side, "labels": t[:, 0].long()} for t in labels]


def _labels_of(target: dict[str, torch.Tensor], side: int) -> Labels:
    b = target["bboxes"].float() / side
    return torch.cat([target["labels"].float()[:, None], (b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], dim=1)


def synthesize(det: Detector, out_dir: str, num_images: int, label_stage: SynthStage = LABEL_STAGE,
               image_stage: SynthStage = IMAGE_STAGE, seed: int = 0, rules: SamplerRules = SamplerRules(),
               rank: int = 0, world_size: int = 1, progress: bool = True,
               barrier: Optional[Any] = None) -> str:
    """Stage B (labels, ``out_dir/labels``) then stage C (images, ``out_dir/images``), each a
    resumable ``qwt_core.synth_io`` set; returns the image set's folder (load it with
    :func:`load_images`). Several processes (``rank`` / ``world_size``, ``barrier`` = the process
    group's barrier) each make their share of whole batches; every image comes from its own seed,
    so the set equals a one-process run."""
    model = det.model
    nc = int(model.model[-1].nc)
    teacher = _teacher_id(det)
    common = dict(task="detection", seed=seed, teacher=teacher, mean=[0.0] * 3, std=[1.0] * 3,
                  num_images=num_images, input_space="normalized")
    label_dir, image_dir = os.path.join(out_dir, "labels"), os.path.join(out_dir, "images")

    def label_batch(k: int, idx: list[int]):
        x0 = init_images(idx, label_stage.imgsz, seed, offset=0)
        r = synthesize_batch(model, seed_labels(idx, nc, seed), label_stage, x0, rules, progress=False)
        return r.images, _targets(r.labels, label_stage.imgsz), [
            {"best_iteration": r.best_iteration, "best_det_loss": r.best_det_loss, "seconds": r.seconds}] * len(idx)

    m1 = SynthManifest(hparams={"stage": label_stage.to_dict(), "rules": asdict(rules)},
                       label_source="adaptive-sampling", image_size=[label_stage.imgsz] * 2,
                       batch_size=label_stage.batch, **common)
    synthesize_batches(label_dir, m1, label_batch, rank=rank, world_size=world_size, progress=progress,
                       barrier=barrier)
    if barrier is not None:
        barrier()                      # rank 0 has merged the label set's manifest
    labels_set = load_synthetic_set(label_dir, expected_teacher={"checkpoint_sha256": teacher["checkpoint_sha256"]},
                                    task="detection", require_complete=False)

    def image_batch(k: int, idx: list[int]):
        items = labels_set.items(idx)
        labels = [_labels_of(it["target"], label_stage.imgsz) for it in items]
        x0 = init_images(idx, image_stage.imgsz, seed, offset=7_777_777)
        r = synthesize_batch(model, labels, image_stage, x0, rules, progress=False)
        return r.images, _targets(r.labels, image_stage.imgsz), [
            {"best_iteration": r.best_iteration, "best_det_loss": r.best_det_loss, "seconds": r.seconds}] * len(idx)

    m2 = SynthManifest(hparams={"stage": image_stage.to_dict(), "labels_from": "labels/"},
                       label_source="adaptive-sampling", image_size=[image_stage.imgsz] * 2,
                       batch_size=image_stage.batch, **common)
    synthesize_batches(image_dir, m2, image_batch, rank=rank, world_size=world_size, progress=progress,
                       barrier=barrier)
    if barrier is not None:
        barrier()
    return image_dir


def load_images(folder: str, det: Optional[Detector] = None) -> torch.Tensor:
    """The images ``(N, 3, S, S)`` of a complete synthetic set (teacher checked against ``det``)."""
    expected = {"checkpoint_sha256": teacher_sha256(det.model)} if det is not None else None
    return load_synthetic_set(folder, expected_teacher=expected, task="detection").images()


# ---- command line ----------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m yolo_qwt.synth --model yolo11s.pt --out synth/yolo11s --num-images 2048``."""
    import argparse
    import sys

    class Parser(argparse.ArgumentParser):
        def error(self, message: str):  # one line, exit 2
            self.exit(2, f"error: {message}\n")

    p = Parser(prog="python -m yolo_qwt.synth", description="Stage I: synthetic calibration images "
               "from the FP detector (adaptive label sampling, then the final images)")
    p.add_argument("--model", required=True, help="local .pt checkpoint (Ultralytics family) or a model .yaml")
    p.add_argument("--nc", type=int, default=80, help="class count of a .yaml model")
    p.add_argument("--out", required=True, help="output folder (labels/ and images/ sets; resumable)")
    p.add_argument("--num-images", type=int, default=2048)
    p.add_argument("--imgsz", type=int, default=IMAGE_STAGE.imgsz)
    p.add_argument("--batch", type=int, default=IMAGE_STAGE.batch)
    p.add_argument("--iterations", type=int, default=None, help="image stage (published: 3000, YOLOv5 2500)")
    p.add_argument("--label-imgsz", type=int, default=LABEL_STAGE.imgsz)
    p.add_argument("--label-batch", type=int, default=None, help="label stage (published: 512, YOLOv5 64)")
    p.add_argument("--label-iterations", type=int, default=None, help="label stage (published: 3000, YOLOv5 2500)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("num_images", "imgsz", "batch", "iterations", "label_imgsz", "label_batch", "label_iterations"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    from qwt_core.distributed import destroy_distributed, init_distributed_from_env
    rank, world, local = init_distributed_from_env(args.device)
    torch.manual_seed(args.seed)       # a .yaml model gets the same random init on every rank
    try:
        det = load_detector(args.model, nc=args.nc)
    except ModelSpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device(f"cuda:{local}" if args.device.startswith("cuda") and world > 1 else args.device)
    det.model.to(device)
    barrier = None
    if world > 1:
        import torch.distributed as dist
        barrier = dist.barrier
    lab, img = (V5_LABEL_STAGE, V5_IMAGE_STAGE) if det.family == "yolov5" else (LABEL_STAGE, IMAGE_STAGE)
    try:
        folder = synthesize(det, args.out, args.num_images,
                            lab.scaled(args.label_iterations or lab.iterations, args.label_imgsz, args.label_batch),
                            img.scaled(args.iterations or img.iterations, args.imgsz, args.batch), seed=args.seed,
                            rank=rank, world_size=world, progress=rank == 0, barrier=barrier)
    finally:
        destroy_distributed()
    if rank == 0:
        print(f"synthetic set: {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
