"""Stage II: zero-shot QAT of a torchvision Mask R-CNN on a synthetic set (DFQ-SPEC §4.2, ResNet path).

    python -m det_torchvision.zsqat --checkpoint maskrcnn_resnet50_fpn.pth --coco-root data/coco \\
        --synth-dir work_dirs/synth_r50 --work-dir work_dirs/zsqat_w8a8 --w_bits 8 --a_bits 8
    torchrun --nproc_per_node=4 -m det_torchvision.zsqat --launcher pytorch ...   # same global batch

Student: the FP detector with per-tensor symmetric LSQ quantizers (``qwt_core.lsq.LSQQuantizer``,
``s = 2·mean|x|/√Q_P`` from the first synthetic batch) on the weights and inputs of the paper's
layer set (residual-block convs of layer1-4 except the last block of layer4, FPN C3-C5). Teacher:
a frozen FP copy. Loss: ``w_det·L_det + w_kd·KL_τ + w_mse·MSE``:

* ``L_det``: the student's Mask R-CNN training loss on the stored synthetic labels;
* ``KL_τ`` (τ = 4, DFQ's ``kdt4``): :func:`qwt_core.distill.kl_distill` on the RPN objectness logits
  of every level (Bernoulli per anchor). DFQ pairs post-NMS score vectors of unrelated detections
  (DFQ-SPEC §7.3, 24); the same anchors of the same image are paired here instead;
* ``MSE``: :func:`qwt_core.distill.block_mse` over the outputs of every Conv2d and BatchNorm of the
  backbone (trunk + FPN; DFQ's ``--module cnnbn``; RoI-level features of differently sampled
  proposals are not paired).

Optimiser as DFQ's ``feature_qat_multi.py``: SGD (momentum 0.9, weight decay 1e-4), lr 1e-4 (the
paper's value for CNN Mask R-CNN per the secondary notes; the script's default is 0.005), linear
warm-up from 0.001× over ``min(1000, iterations − 1)`` iterations, ×0.1 at epochs 16 and 22, 26
epochs; stem and layer1 weights frozen (torchvision's three trainable stages), every LSQ step
trained. Not DFQ (§7.3): BatchNorm stays in eval mode in both networks, no early stopping or
selection on the validation set (the last epoch is evaluated), batches reshuffled every epoch.
Checkpoint every epoch (``--resume`` continues from the newest); under torchrun every rank
initialises the LSQ steps on the whole first global batch, then takes a slice of every global batch;
gradients are averaged and the LSQ gradient scale counts the global batch, so N processes follow one
process's run (up to float rounding).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from qwt_core.distill import BlockOutputRecorder, block_mse, kl_distill  # noqa: E402
from qwt_core.distributed import average_gradients, get_rank, get_world_size, is_dist  # noqa: E402
from qwt_core.lsq import LSQQuantizer, learnable_step_parameters, set_data_shards  # noqa: E402
from qwt_core.lsq import init_lsq_steps as lsq_init  # noqa: E402
from qwt_core.modules import QuantConv2d  # noqa: E402

CKPT_FORMAT = "det_torchvision-zsqat-v1"
FROZEN_PREFIXES = ("backbone.body.conv1", "backbone.body.bn1", "backbone.body.layer1.")


@dataclass
class ZsqatConfig:
    """Stage II settings (defaults: DFQ's ResNet Mask R-CNN QAT, see the module docstring)."""

    w_bits: int = 8
    a_bits: int = 8
    layer_set: str = "paper"
    epochs: int = 26
    batch_size: int = 4
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: tuple[int, ...] = (16, 22)
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_ratio: float = 0.001
    w_det: float = 1.0
    w_kd: float = 1.0
    w_mse: float = 1.0
    tau: float = 4.0
    seed: int = 0

    def identity(self) -> dict[str, Any]:
        """Everything that must match for a resume (all fields except ``epochs``)."""
        d = asdict(self)
        d.pop("epochs")
        d["milestones"] = list(self.milestones)
        return d


# ------------------------------------------------------------------------------------- student
def quantize_lsq(model: nn.Module, w_bits: int, a_bits: int, layer_set: str = "paper") -> list[str]:
    """Swap the convs of ``layer_set`` for fake-quant convs with per-tensor symmetric LSQ weight and
    input quantizers (steps initialised by the first forward). Returns the quantized names."""
    from qwt_core.adapters.torchvision_rcnn import detector_layer_names

    names = detector_layer_names(model, layer_set)
    for name in names:
        conv = model.get_submodule(name)
        model.set_submodule(name, QuantConv2d.from_float(
            conv, w_bits, a_bits, input_quantizer=LSQQuantizer(a_bits, signed=True),
            weight_quantizer=LSQQuantizer(w_bits, signed=True)))
    return names


def init_lsq_steps(model: nn.Module, x: torch.Tensor) -> int:
    """Initialise every LSQ step from one normalised batch ``(B, 3, H, W)`` (eval-mode backbone
    forward; with ``set_data_shards`` the statistic covers every rank's slice)."""
    return lsq_init(model, lambda: model.backbone(x))


def mse_module_names(model: nn.Module) -> list[str]:
    """Every Conv2d and BatchNorm (also FrozenBatchNorm2d) of the backbone, in module order."""
    return [n for n, m in model.named_modules() if n.startswith("backbone.") and
            (isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm)) or
             type(m).__name__ == "FrozenBatchNorm2d")]


def set_train_mode(model: nn.Module) -> None:
    """Training mode for the losses, BatchNorm layers in eval mode (statistics never move)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class _Hook:
    def __init__(self, module: nn.Module) -> None:
        self.out: Any = None
        self.handle = module.register_forward_hook(lambda _m, _a, out: setattr(self, "out", out))


class DetectionKD:
    """``{"det", "kd", "mse", "total"}`` of one batch; the teacher runs frozen under no_grad.

    Use as a context manager (forward hooks on both networks)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: ZsqatConfig) -> None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        names = mse_module_names(student)
        self.student, self.teacher, self.cfg = student, teacher, cfg
        self.s_rec, self.t_rec = BlockOutputRecorder(student, names), BlockOutputRecorder(teacher, names)
        self.s_rpn, self.t_rpn = _Hook(student.rpn.head), _Hook(teacher.rpn.head)

    def __call__(self, x: torch.Tensor, targets: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        from det_torchvision.synth import detection_loss

        self.s_rec.clear()
        self.t_rec.clear()
        with torch.no_grad():
            self.teacher.rpn.head(list(self.teacher.backbone(x).values()))
        losses = detection_loss(self.student, x, targets)
        det = sum(losses.values())
        kd = kl_distill(self.s_rpn.out[0], self.t_rpn.out[0], tau=self.cfg.tau, kind="sigmoid")
        mse = block_mse(self.s_rec.outputs, self.t_rec.outputs)
        total = self.cfg.w_det * det + self.cfg.w_kd * kd + self.cfg.w_mse * mse
        return {"det": det, "kd": kd, "mse": mse, "total": total}

    def close(self) -> None:
        for r in (self.s_rec, self.t_rec):
            r.remove()
        for h in (self.s_rpn, self.t_rpn):
            h.handle.remove()

    def __enter__(self) -> "DetectionKD":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def trainable_parameters(student: nn.Module) -> list[nn.Parameter]:
    """Every LSQ step, and every weight outside the stem and layer1 (``requires_grad`` set)."""
    steps = {id(p) for p in learnable_step_parameters(student)}
    out = []
    for name, p in student.named_parameters():
        train = id(p) in steps or not name.startswith(FROZEN_PREFIXES)
        p.requires_grad_(train)
        if train:
            out.append(p)
    return out


def lr_factor(it: int, epoch: int, iters_per_epoch: int, cfg: ZsqatConfig) -> float:
    """Warm-up (epoch 0, ``min(warmup_iters, iters_per_epoch − 1)`` iterations from ``warmup_ratio``)
    times ``gamma^(milestones passed)``."""
    factor = cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    warm = min(cfg.warmup_iters, iters_per_epoch - 1)
    if epoch == 0 and warm > 0 and it < warm:
        alpha = it / warm
        factor *= cfg.warmup_ratio * (1 - alpha) + alpha
    return factor


def epoch_batches(n: int, batch: int, epoch: int, seed: int) -> list[list[int]]:
    """Global batches of an epoch: a permutation of ``range(n)`` seeded by (seed, epoch), cut into
    ``⌊n / batch⌋`` batches (the last partial batch dropped)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    return [perm[i:i + batch] for i in range(0, n - batch + 1, batch)]


class SyntheticBatches:
    """Images and labels of a synthetic set (``qwt_core.synth_io``) as detector batches."""

    def __init__(self, sset) -> None:
        self.sset = sset

    def __len__(self) -> int:
        return len(self.sset)

    def get(self, indices: Sequence[int], device: Any) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        items = self.sset.items(list(indices))
        x = torch.stack([it["image"] for it in items]).to(device)
        tg = [{"boxes": it["target"]["bboxes"].float().to(device), "labels": it["target"]["labels"].long().to(device),
               "masks": it["target"]["masks"].to(device)} for it in items]
        return x, tg


def _rank_slice(batch: list[int]) -> list[int]:
    w, r = get_world_size(), get_rank()
    per = len(batch) // w
    return batch[r * per:(r + 1) * per]


def _mean_over_ranks(values: list[float], device: Any) -> list[float]:
    if not is_dist():
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / get_world_size()).tolist()


def train(student: nn.Module, teacher: nn.Module, data: SyntheticBatches, cfg: ZsqatConfig, work_dir: str,
          device: Any = "cpu", resume: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Zero-shot QAT of ``student`` (LSQ-quantized by :func:`quantize_lsq`, steps not yet initialised)
    against ``teacher``; writes ``work_dir/epoch_{k}.pth`` after every epoch and returns the loss
    history (one row per iteration, averaged over ranks). With ``resume`` the newest checkpoint of
    ``work_dir`` is loaded first (its settings must equal ``cfg``'s)."""
    world = get_world_size()
    if cfg.batch_size % world:
        raise ValueError(f"batch {cfg.batch_size} is not a multiple of the {world} processes")
    n_iter = len(data) // cfg.batch_size
    if n_iter < 1:
        raise ValueError(f"{len(data)} synthetic images are fewer than one batch of {cfg.batch_size}")
    # LSQ init on the whole first global batch, on every rank: N processes start where one starts
    set_data_shards(student, 1)
    x0, _ = data.get(epoch_batches(len(data), cfg.batch_size, 0, cfg.seed)[0], device)
    init_lsq_steps(student, x0)
    set_data_shards(student, world)  # LSQ gradient scale counts the whole global batch
    params = trainable_parameters(student)
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    history: list[dict[str, Any]] = []
    start = 0
    work = Path(work_dir)
    if resume:
        ck = latest_checkpoint(work)
        if ck is not None:
            state = torch.load(ck, map_location="cpu", weights_only=False)
            if state.get("format") != CKPT_FORMAT or state.get("identity") != cfg.identity():
                raise ValueError(f"{ck} was written by a run with other settings; use another --work-dir")
            student.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start, history = int(state["epoch"]) + 1, list(state["history"])
    with DetectionKD(student, teacher, cfg) as kd:
        for epoch in range(start, cfg.epochs):
            torch.manual_seed(cfg.seed * 7_919 + epoch * 104_729 + get_rank())  # RoI sampling
            set_train_mode(student)
            bar = tqdm(epoch_batches(len(data), cfg.batch_size, epoch, cfg.seed),
                       desc=f"zsqat epoch {epoch + 1}/{cfg.epochs}", disable=not (progress and get_rank() == 0))
            for it, batch in enumerate(bar):
                lr = cfg.lr * lr_factor(it, epoch, n_iter, cfg)
                for group in opt.param_groups:
                    group["lr"] = lr
                x, tg = data.get(_rank_slice(batch), device)
                losses = kd(x, tg)
                opt.zero_grad(set_to_none=True)
                losses["total"].backward()
                average_gradients(params)
                opt.step()
                keys = ("total", "det", "kd", "mse")
                vals = _mean_over_ranks([float(losses[k].detach()) for k in keys], device)
                if not all(math.isfinite(v) for v in vals):
                    raise FloatingPointError(f"non-finite zero-shot QAT loss at epoch {epoch}, iteration {it}")
                history.append({"epoch": epoch, "iter": it, "lr": lr, **dict(zip(keys, vals))})
                bar.set_postfix(total=f"{vals[0]:.4g}")
            student.eval()
            if get_rank() == 0:
                work.mkdir(parents=True, exist_ok=True)
                tmp = work / f".epoch_{epoch}.pth.tmp"
                torch.save({"format": CKPT_FORMAT, "identity": cfg.identity(), "epoch": epoch,
                            "model": student.state_dict(), "optimizer": opt.state_dict(), "history": history}, tmp)
                os.replace(tmp, work / f"epoch_{epoch}.pth")
            if is_dist():
                import torch.distributed as dist

                dist.barrier()
    student.eval()
    return history


def latest_checkpoint(work_dir: str | Path) -> Optional[Path]:
    """``epoch_K.pth`` with the largest K (None when there is none)."""
    found = [(int(p.stem.split("_")[1]), p) for p in Path(work_dir).glob("epoch_*.pth")
             if p.stem.split("_")[1].isdigit()]
    return max(found)[1] if found else None


# ------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from det_torchvision.cli import add_common_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p)
    d = ZsqatConfig()
    p.add_argument("--synth-dir", "--synth_dir", dest="synth_dir", required=True,
                   help="synthetic set made by det_torchvision.synthesize from this checkpoint")
    p.add_argument("--work-dir", "--work_dir", dest="work_dir", required=True, help="checkpoints and results")
    p.add_argument("--w_bits", "--w-bits", dest="w_bits", type=int, default=d.w_bits)
    p.add_argument("--a_bits", "--a-bits", dest="a_bits", type=int, default=d.a_bits)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch", type=int, default=d.batch_size, help="global batch (split over processes)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--w-det", dest="w_det", type=float, default=d.w_det)
    p.add_argument("--w-kd", dest="w_kd", type=float, default=d.w_kd)
    p.add_argument("--w-mse", dest="w_mse", type=float, default=d.w_mse)
    p.add_argument("--resume", action="store_true", help="continue from the newest epoch_K.pth of --work-dir")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    from det_torchvision.cli import fail, load_model_and_data, setup, write_json
    from det_torchvision.evaluate import ap_percent, evaluate_coco
    from qwt_core.quantizers import validate_bits
    from qwt_core.synth_io import SynthSetError, file_sha256, load_synthetic_set

    args = parse_args(argv)
    try:
        validate_bits(args.w_bits, "--w_bits")
        validate_bits(args.a_bits, "--a_bits")
    except ValueError as err:
        fail(str(err))
    device, rank, world = setup(args)
    teacher, info, dataset = load_model_and_data(args, device)
    try:
        sset = load_synthetic_set(args.synth_dir, {"checkpoint_sha256": file_sha256(args.checkpoint)}, "detection")
    except SynthSetError as err:
        fail(str(err))
    cfg = ZsqatConfig(w_bits=args.w_bits, a_bits=args.a_bits, epochs=args.epochs, batch_size=args.batch,
                      lr=args.lr, w_det=args.w_det, w_kd=args.w_kd, w_mse=args.w_mse, seed=args.seed)
    student = copy.deepcopy(teacher)
    quantize_lsq(student, cfg.w_bits, cfg.a_bits, cfg.layer_set)
    try:
        history = train(student, teacher, SyntheticBatches(sset), cfg, args.work_dir, device, resume=args.resume)
    except ValueError as err:
        fail(str(err))
    metrics = evaluate_coco(student, dataset, device, args.eval, desc="zsqat")
    summary = {"checkpoint": args.checkpoint, "arch": info["arch"], "synth_dir": args.synth_dir,
               "synthetic_images": len(sset), "config": asdict(cfg), "world_size": world,
               "results": {"zsqat": metrics}, "ap": {"zsqat": ap_percent(metrics)},
               "history_last": history[-5:], "evaluated": "last epoch (no selection on the validation set)"}
    if rank == 0:
        print(json.dumps(summary["ap"]))
        write_json(summary, args.output or str(Path(args.work_dir) / "results.json"))
    return summary


if __name__ == "__main__":
    main()
