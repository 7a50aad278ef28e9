"""Stage II: zero-shot QAT of a YOLO (YOLO11 / Ultralytics, original YOLOv5) on a synthetic set (DFQ-YOLO §3).

* **Student**: the paper's placement (every Conv2d of ``model.model[1:-1]``, stem and Detect FP),
  each quantized conv with per-tensor symmetric signed LSQ steps for its weight and its input
  (``qwt_core.lsq.LSQQuantizer``, init ``2·mean|x|/√Q_P`` from one eval-mode forward of the first
  synthetic batch); BatchNorm **unfolded** and in train mode (batch statistics, running stats
  updated on the synthetic data, as the paper does; ``bn="frozen"`` keeps the FP running
  statistics instead, which a small or short synthetic set needs: see docs/yolo.md).
* **Loss**: ``0.01·L_det + 0.1·L_KL + 1.0·L_MSE`` (kd.json): ``L_det`` Ultralytics' v8 loss on the
  synthetic labels (× batch); ``L_KL`` per pyramid level, ``τ²·KL(softmax(t/τ) ‖ softmax(s/τ))`` over
  the flattened (64 box-bin + nc class) logits of all positions of the level, ``τ = 4``, summed over
  levels (``qwt_core.distill``); ``L_MSE`` the mean over every Conv2d and BatchNorm2d output except
  DFL's of ``mean((s − t)²)``.
* **Optimiser**: Adam, lr 1e-5, betas (0.937, 0.999); weight decay 5e-4 on conv weights only —
  **not** on LSQ step sizes (the published code decays them: a pitfall not copied), none on BN and
  biases; gradient clipping at 10; linear warm-up then linear decay to 0.01·lr. The published bias
  warm-up from lr 0.1 is not copied.
* **EMA** (Ultralytics ``ModelEMA``, decay 0.9999, τ 2000) created *after* the LSQ steps are
  initialised, so it never re-initialises them from validation images. No model selection on a
  validation set: the final EMA is the result.
* Checkpoint every epoch (atomic), ``resume=True`` continues from the latest one bit for bit
  (model, EMA, optimiser, RNG).
"""
from __future__ import annotations

import copy
import glob
import math
import os
import time
import types
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional, Sequence

import torch
from torch import nn

from qwt_core.distill import Distiller
from qwt_core.lsq import LSQQuantizer, learnable_step_parameters, init_lsq_steps as lsq_init
from qwt_core.model_io import atomic_torch_save
from qwt_core.quantize import quantize_layers

from .models import Detector
from .quant import _no_fuse, placement_rule
from .synth import Labels, detection_loss


@dataclass(frozen=True)
class ZsqatConfig:
    """Stage II settings (published values by default; ``epochs`` / ``batch`` to fit the budget)."""

    w_bits: int = 8
    a_bits: int = 8
    epochs: int = 100
    batch: int = 16
    lr: float = 1e-5
    betas: tuple[float, float] = (0.937, 0.999)
    weight_decay: float = 5e-4
    warmup_iters: int = 100
    lr_final: float = 0.01
    clip: float = 10.0
    det_weight: float = 0.01
    kl_weight: float = 0.1
    mse_weight: float = 1.0
    tau: float = 4.0
    ema_decay: float = 0.9999
    ema_tau: int = 2000
    quantize_head: bool = False
    #: "train" (the paper: batch statistics, running statistics updated on the synthetic images) or
    #: "frozen" (BatchNorm in eval mode: the FP running statistics are kept; affine still trained)
    bn: str = "train"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.bn not in ("train", "frozen"):
            raise ValueError(f"bn={self.bn!r}: use 'train' (the paper) or 'frozen'")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: the original YOLOv5's published stage II (datafree_qat_ckpt.py): 0.04·L_det + 0.1·KL + 1.0·MSE,
#: Adam lr 1e-4 with beta1 0.9
V5_ZSQAT = ZsqatConfig(lr=1e-4, betas=(0.9, 0.999), det_weight=0.04)


def quantize_lsq(det: Detector, cfg: ZsqatConfig) -> list[str]:
    """The student, in place: LSQ fake-quant convs at the paper's placement, BatchNorm unfolded."""
    model = det.model
    layers = quantize_layers(model, placement_rule(len(model.model), cfg.w_bits, cfg.a_bits, cfg.quantize_head))
    for layer in layers.values():
        dev = layer.weight.device
        layer.weight_quantizer = LSQQuantizer(cfg.w_bits, signed=True).to(dev)
        layer.input_quantizer = LSQQuantizer(cfg.a_bits, signed=True).to(dev)
    model.fuse = types.MethodType(_no_fuse, model)
    return list(layers)


def init_lsq_steps(model: nn.Module, images: torch.Tensor) -> int:
    """Initialise every LSQ step from one eval-mode forward of ``images`` ``(B, 3, H, W)``."""
    return lsq_init(model, lambda: model(images))


def mse_layer_names(model: nn.Module) -> list[str]:
    """Every Conv2d and BatchNorm2d except DFL's, in module order (the paper's ``cnnbn`` MSE set)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) and "dfl" not in n.split(".")]


def head_levels(out: Any) -> list[torch.Tensor]:
    """Per pyramid level, the head's raw logits flattened per image: ``(B, (4·reg_max + nc)·H_i·W_i)``
    (Ultralytics), ``(B, anchors·H_i·W_i·(5 + nc))`` (original YOLOv5: box, objectness and class
    logits of every anchor in one vector, as its published KD does).

    ``out``: the Detect output: Ultralytics' training dict ``{boxes (B, 4·reg_max, A), scores
    (B, nc, A), feats}`` or eval tuple ``(decoded, that dict)``; YOLOv5's training list of
    ``(B, anchors, H_i, W_i, 5 + nc)`` maps or eval tuple ``(decoded, that list)``."""
    if isinstance(out, tuple) and len(out) == 2 and not isinstance(out[0], list):
        out = out[1]
    if isinstance(out, (list, tuple)):          # YOLOv5 raw maps
        return [t.reshape(t.shape[0], -1) for t in out]
    d = out
    raw = torch.cat([d["boxes"], d["scores"]], dim=1)
    levels, a0 = [], 0
    for f in d["feats"]:
        n = f.shape[-2] * f.shape[-1]
        levels.append(raw[:, :, a0:a0 + n].reshape(raw.shape[0], -1))
        a0 += n
    return levels


class YoloDistiller:
    """``L = w_det·L_det + w_kl·Σ_levels KL + w_mse·MSE`` between the student (train mode) and the
    frozen FP teacher (eval mode). ``__call__(images, labels)`` → dict of scalars (``total`` has the
    graph)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: ZsqatConfig) -> None:
        self.cfg = cfg
        self._out: dict[str, Any] = {}

        def forward(model: nn.Module, x: torch.Tensor) -> Any:
            out = model(x)
            if model is student:
                self._out["student"] = out
            return out

        self.n_levels = len(student.model[-1].stride)
        # qwt_core.distill.kl_distill averages over the list: × levels gives the published sum
        self.kd = Distiller(student, teacher, mse_layer_names(teacher), logits_fn=head_levels,
                            tau=cfg.tau, w_kl=1.0, w_mse=1.0, forward=forward)
        self.student = student
        self.det: Optional[Any] = None

    def __call__(self, images: torch.Tensor, labels: Sequence[Labels]) -> dict[str, torch.Tensor]:
        if self.det is None:           # YOLOv5's objectness gain depends on the image size
            self.det = detection_loss(self.student, int(images.shape[-1]))
        terms = self.kd(images)
        kl = terms["kl"] * self.n_levels
        det = self.det(self._out.pop("student"), labels)
        total = self.cfg.det_weight * det + self.cfg.kl_weight * kl + self.cfg.mse_weight * terms["mse"]
        return {"det": det, "kl": kl, "mse": terms["mse"], "total": total}

    def close(self) -> None:
        self.kd.close()


def param_groups(model: nn.Module, cfg: ZsqatConfig) -> list[dict[str, Any]]:
    """Conv weights with weight decay; LSQ steps, BatchNorm and biases without."""
    steps = {id(p) for p in learnable_step_parameters(model)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) not in steps and p.ndim == 4:
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(it: int, total: int, cfg: ZsqatConfig) -> float:
    """Linear warm-up over ``warmup_iters`` then linear decay from 1 to ``lr_final`` at ``total``."""
    warm = min(cfg.warmup_iters, max(1, total // 10))
    decay = 1.0 - (1.0 - cfg.lr_final) * min(1.0, it / max(1, total))
    return decay * min(1.0, (it + 1) / warm)


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def checkpoint_path(work_dir: str, epoch: int) -> str:
    return os.path.join(work_dir, f"epoch_{epoch:04d}.pt")


def latest_checkpoint(work_dir: str) -> Optional[str]:
    found = sorted(glob.glob(os.path.join(work_dir, "epoch_*.pt")))
    return found[-1] if found else None


def train(det: Detector, teacher: nn.Module, images: torch.Tensor, labels: Sequence[Labels], cfg: ZsqatConfig,
          work_dir: str, resume: bool = False, progress: bool = True,
          stop_after: Optional[int] = None) -> dict[str, Any]:
    """Zero-shot QAT of ``det`` (quantized in place by this call) on synthetic ``images`` ``(N, 3, S, S)``
    with their ``labels``; returns ``{"history", "ema", "seconds", "config"}`` (``ema``: the EMA
    model, the result). Checkpoints go to ``work_dir/epoch_XXXX.pt`` every epoch; ``stop_after``
    ends this call after that many epochs in all (an interruption, for resuming later)."""
    from tqdm.auto import tqdm
    from ultralytics.utils.torch_utils import ModelEMA

    torch.manual_seed(cfg.seed)
    student = det.model
    quantize_lsq(det, cfg)
    for p in student.parameters():
        p.requires_grad_(True)
    for m in student.modules():       # DFL is a fixed integral, not trained
        if type(m).__name__ == "DFL":
            for p in m.parameters():
                p.requires_grad_(False)
    device = next(student.parameters()).device
    init_lsq_steps(student, images[:cfg.batch].to(device))
    ema = ModelEMA(student, decay=cfg.ema_decay, tau=cfg.ema_tau)
    opt = torch.optim.Adam(param_groups(student, cfg), lr=cfg.lr, betas=cfg.betas)
    n = images.shape[0]
    per_epoch = math.ceil(n / cfg.batch)
    total = per_epoch * cfg.epochs
    start, history = 0, []
    os.makedirs(work_dir, exist_ok=True)
    if resume and latest_checkpoint(work_dir):
        ck = torch.load(latest_checkpoint(work_dir), map_location=device, weights_only=False)
        if ck["config"] != cfg.to_dict():
            raise ValueError(f"{work_dir}: the checkpoints were written with another configuration")
        student.load_state_dict(ck["student"])
        ema.ema.load_state_dict(ck["ema"])
        ema.updates = ck["ema_updates"]
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"])
        start, history = ck["epoch"] + 1, ck["history"]
    distiller = YoloDistiller(student, teacher, cfg)
    t0 = time.perf_counter()
    try:
        for epoch in range(start, cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)):
            student.train()
            if cfg.bn == "frozen":
                for m in student.modules():
                    if isinstance(m, nn.BatchNorm2d):
                        m.eval()
            order = _epoch_order(n, cfg.seed, epoch)
            bar = tqdm(range(per_epoch), desc=f"QAT epoch {epoch + 1}/{cfg.epochs}", disable=not progress)
            for k in bar:
                it = epoch * per_epoch + k
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * lr_factor(it, total, cfg)
                idx = order[k * cfg.batch:(k + 1) * cfg.batch]
                terms = distiller(images[idx].to(device), [labels[i] for i in idx])
                opt.zero_grad(set_to_none=True)
                terms["total"].backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip)
                opt.step()
                with torch.no_grad():
                    for p in learnable_step_parameters(student):
                        p.abs_()               # steps stay positive (as the published forward does)
                ema.update(student)
                rec = {k2: float(v.detach()) for k2, v in terms.items()}
                rec.update(epoch=epoch, iteration=it, lr=opt.param_groups[0]["lr"])
                history.append(rec)
                bar.set_postfix(total=f"{rec['total']:.4g}")
            atomic_torch_save({"epoch": epoch, "config": cfg.to_dict(), "student": student.state_dict(),
                               "ema": ema.ema.state_dict(), "ema_updates": ema.updates,
                               "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
                               "history": history}, checkpoint_path(work_dir, epoch))
    finally:
        distiller.close()
    ema.ema.eval()
    return {"history": history, "ema": ema.ema, "seconds": time.perf_counter() - t0, "config": cfg.to_dict(),
            "iterations": total}


def synthetic_training_set(folder: str, det: Detector) -> tuple[torch.Tensor, list[Labels]]:
    """Images ``(N, 3, S, S)`` and labels (class, cx, cy, w, h normalised) of a synthetic set."""
    from qwt_core.synth_io import load_synthetic_set
    from .synth import _labels_of, teacher_sha256
    sset = load_synthetic_set(folder, expected_teacher={"checkpoint_sha256": teacher_sha256(det.model)},
                              task="detection")
    items = list(sset)
    side = int(sset.manifest.image_size[-1])
    return torch.stack([it["image"] for it in items]), [_labels_of(it["target"], side) for it in items]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m yolo_qwt.zsqat --model yolo11s.pt --data coco.yaml --synthetic DIR --w-bits 4 --a-bits 8``."""
    import argparse
    import json
    import sys

    from .evaluate import DatasetError, check_dataset, validate
    from .models import ModelSpecError, load_detector
    from .synth import SynthSetError

    class Parser(argparse.ArgumentParser):
        def error(self, message: str):  # one line, exit 2
            self.exit(2, f"error: {message}\n")

    p = Parser(prog="python -m yolo_qwt.zsqat", description="Stage II: zero-shot QAT on a synthetic set")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="dataset yaml, for the final evaluation only")
    p.add_argument("--synthetic", required=True, help="a set from python -m yolo_qwt.synth (its images/ folder)")
    p.add_argument("--w-bits", type=int, default=8)
    p.add_argument("--a-bits", type=int, default=8)
    p.add_argument("--epochs", type=int, default=ZsqatConfig.epochs)
    p.add_argument("--batch", type=int, default=ZsqatConfig.batch)
    p.add_argument("--lr", type=float, default=None, help="default 1e-5 (YOLO11), 1e-4 (YOLOv5)")
    p.add_argument("--bn", choices=("train", "frozen"), default="train",
                   help="BatchNorm in train mode (the paper) or frozen at the FP running statistics")
    p.add_argument("--imgsz", type=int, default=640, help="evaluation size")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("runs", "yolo_zsqat"))
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    args = p.parse_args(argv)
    try:
        from qwt_core.quantizers import validate_bits
        validate_bits(args.w_bits, "w_bits")
        validate_bits(args.a_bits, "a_bits")
        data = check_dataset(args.data)
        det = load_detector(args.model, nc=int(data["nc"]), names=data["names"])
        images, labels = synthetic_training_set(args.synthetic, det)
    except (ValueError, ModelSpecError, DatasetError, SynthSetError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    base = V5_ZSQAT if det.family == "yolov5" else ZsqatConfig()
    cfg = replace(base, w_bits=args.w_bits, a_bits=args.a_bits, epochs=args.epochs, batch=args.batch,
                  lr=args.lr if args.lr is not None else base.lr, bn=args.bn, seed=args.seed)
    device = torch.device(args.device)
    det.model.to(device)
    teacher = copy.deepcopy(det.model).eval()
    res = train(det, teacher, images, labels, cfg, os.path.join(args.out, "checkpoints"), resume=args.resume)
    ul_device = "cpu" if device.type == "cpu" else str(device.index or 0)
    metrics = validate(res["ema"], args.data, imgsz=args.imgsz, device=ul_device, progress=True)
    out = {"model": det.describe(), "config": cfg.to_dict(), "synthetic": args.synthetic, "qat": metrics,
           "seconds": res["seconds"], "iterations": res["iterations"],
           "seconds_per_iteration": res["seconds"] / max(1, len(res["history"])), "history": res["history"]}
    path = os.path.join(args.out, f"zsqat_W{args.w_bits}A{args.a_bits}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"zero-shot QAT W{args.w_bits}A{args.a_bits}: mAP50-95 {metrics['map50_95']:.4f} "
          f"mAP50 {metrics['map50']:.4f}; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
