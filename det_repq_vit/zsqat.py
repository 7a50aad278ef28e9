"""Zero-shot QAT of an mmdet Swin detector on a labelled synthetic set (DFQ Stage II), on top of
``qwt_core.lsq`` (quantizers) and ``qwt_core.distill`` (loss terms). Task glue only:

* students: :func:`quantize_backbone_lsq` (``dfq``: per-tensor symmetric LSQ on the backbone Linears
  and the patch-embedding conv, everything else FP) or the RepQ-ViT-calibrated whole detector with
  learnable steps (``repq``, built by ``det_repq_vit.ptq`` + :func:`qwt_core.lsq.make_steps_learnable`);
* data: :class:`SyntheticDetectionData` (images + stored labels of ``tools/synthesize.py`` shards);
* losses: :class:`DetectionDistiller`, ``w_det·L_det + w_kl·KL(RPN) + w_mse·MSE(backbone blocks)``
  with DFQ's KL (one softmax at τ=1 over the per-image concatenation of every RPN objectness and
  box-delta map);
* training: :func:`train_epoch` (AdamW, linear warm-up, optional AMP, gradients averaged over ranks
  by hand, so every rank holds the same parameters) and the checkpoint helpers.

Distributed runs compute what one process computes on the global batch: rank ``r`` of ``w`` takes
the ``r``-th slice of every global batch (:class:`SyntheticDetectionData`), the activation
quantizers know the batch is split (:func:`qwt_core.lsq.set_data_shards`: LSQ init statistics are
all-reduced, the gradient scale counts the whole batch), the distillation losses are per-image means
and gradients are averaged over ranks. Every parameter / buffer is also broadcast from rank 0 after
the student is built (:func:`broadcast_module`). The original initialises the steps separately on
each rank from its own images (a defect of the released code). Not equal across world sizes: mmdet's
detection loss (random proposal sampling, per-process normalisation), the same as for any mmdet run.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from qwt_core.distill import BlockOutputRecorder, block_mse, flatten_concat, kl_distill
from qwt_core.distributed import average_gradients, get_rank, get_world_size, is_dist
from qwt_core.lsq import LSQQuantizer, learnable_step_parameters, init_lsq_steps as lsq_init
from qwt_core.model_io import atomic_torch_save
from qwt_core.quantize import LayerBits, quantize_layers

CKPT_FORMAT = "qwt-zsqat-det-v1"
MODES = ("dfq", "repq")
#: parameters without weight decay (mmdet Swin config ``paramwise_cfg``)
NO_DECAY_KEYS = ("absolute_pos_embed", "relative_position_bias_table", "norm")


class ZsqatError(SystemExit):
    """Bad input for zero-shot QAT (labels, configs, resume file): one line naming it and the fix."""


@dataclass
class ZsqatConfig:
    """The training recipe (DFQ defaults: lr 1e-6, wd 0.05, 1000 warm-up iterations from 0.001·lr,
    1/1/1 loss weights, one image per process, 15 epochs)."""

    mode: str = "dfq"
    w_bits: int = 4
    a_bits: int = 8
    epochs: int = 15
    iters_per_epoch: Optional[int] = None  # None: every image of this rank's share once
    batch_size: int = 1
    lr: float = 1e-6
    weight_decay: float = 0.05
    step_decay: bool = True  # DFQ decays the LSQ steps too
    warmup_iters: int = 1000
    warmup_ratio: float = 0.001
    w_det: float = 1.0
    w_kl: float = 1.0
    w_mse: float = 1.0
    train_weights: bool = False  # repq: also train the weights (dfq always trains everything)
    amp: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.iters_per_epoch is not None and self.iters_per_epoch < 1:
            raise ValueError("iters_per_epoch must be >= 1")
        if self.lr <= 0 or self.warmup_iters < 0:
            raise ValueError("lr must be > 0 and warmup_iters >= 0")

    def identity(self) -> dict[str, Any]:
        """The settings a resumed run must share (``epochs`` may grow)."""
        d = asdict(self)
        d.pop("epochs")
        return d


# ------------------------------------------------------------------------------------ students
def backbone_lsq_rule(w_bits: int, a_bits: int, backbone: str = "backbone"):
    """DFQ's selection: every ``nn.Linear`` of the backbone and its patch-embedding conv."""
    patch = f"{backbone}.patch_embed.projection"

    def rule(name: str, module: nn.Module) -> Optional[LayerBits]:
        if name == patch or (isinstance(module, nn.Linear) and name.startswith(backbone + ".")):
            return LayerBits(w_bits, a_bits)
        return None

    return rule


def quantize_backbone_lsq(model: nn.Module, w_bits: int, a_bits: int) -> list[str]:
    """``dfq`` student, in place: backbone Linears + patch-embed conv become fake-quant layers whose
    weight and input quantizers are per-tensor symmetric :class:`~qwt_core.lsq.LSQQuantizer` (steps
    initialised by the first forward, see :func:`init_lsq_steps`). Attention matmuls, LayerNorms,
    neck and heads stay FP. Returns the quantized layer names."""
    layers = quantize_layers(model, backbone_lsq_rule(w_bits, a_bits))
    for layer in layers.values():
        device = layer.weight.device
        layer.weight_quantizer = LSQQuantizer(w_bits, signed=True).to(device)
        layer.input_quantizer = LSQQuantizer(a_bits, signed=True).to(device)
    return list(layers)


def init_lsq_steps(model: nn.Module, inputs: torch.Tensor) -> int:
    """Initialise every LSQ step of the backbone from one batch ``(B, 3, H, W)`` (eval-mode
    ``extract_feat``: no drop-path noise). Returns the number of quantizers initialised."""
    return lsq_init(model, lambda: model.extract_feat(inputs))


def step_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The learnable step sizes / offsets of ``model`` (LSQ and learnable RepQ-ViT quantizers)."""
    return learnable_step_parameters(model)


def broadcast_module(model: nn.Module, src: int = 0) -> None:
    """Copy every parameter and buffer of ``model`` from rank ``src`` to all ranks (no-op alone)."""
    if not is_dist():
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src)


def rank_spread(tensors: Sequence[torch.Tensor]) -> float:
    """``max |t_rank - t_rank'|`` over ranks and elements of the concatenated ``tensors`` (0 alone)."""
    if not tensors or not is_dist():
        return 0.0
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float((hi - lo).max())


def freeze_norm_statistics(model: nn.Module) -> None:
    """BatchNorm layers (Cascade's 4conv1f heads) keep their running statistics in training."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


# ---------------------------------------------------------------------------------------- data
def check_synthetic_labels(synth: Any, num_classes: int) -> None:
    """:class:`ZsqatError` unless every image of ``synth`` carries detection labels
    ``{"bboxes" (n, 4), "labels" (n,) < num_classes, "masks" (n, H, W)}`` (read shard by shard)."""
    folder = getattr(synth, "folder", "the synthetic set")
    i = 0
    for k in range(len(synth.manifest.shards)):
        for t in synth.load_shard(k)["targets"]:
            ok = isinstance(t, dict) and all(isinstance(t.get(key), torch.Tensor)
                                             for key in ("bboxes", "labels", "masks"))
            if ok:
                n = t["labels"].numel()
                ok = (tuple(t["bboxes"].shape) == (n, 4) and t["masks"].dim() == 3 and t["masks"].shape[0] == n
                      and (n == 0 or int(t["labels"].max()) < num_classes))
            if not ok:
                raise ZsqatError(f"error: {folder}: image {i} has no usable detection labels (target "
                                 f"{type(t).__name__}); zero-shot QAT needs the labelled shards of "
                                 "tools/synthesize.py (--labels sampled|coco) made for this detector")
            i += 1


class SyntheticDetectionData:
    """Training batches of a labelled synthetic detection set.

    Every epoch visits all ``N`` images in a new seeded order, cut into global batches of
    ``world_size · batch_size`` images (the last partial one dropped); rank ``r`` takes the ``r``-th
    slice of each, so ``w`` processes on ``B`` images see exactly the batches one process sees on
    ``w·B``. A batch is ``{"inputs": (B, 3, S, S) float (already normalised, as stored),
    "data_samples": [DetDataSample with gt_instances]}``. Items are cached in memory after their
    first read (the ones this rank used).
    """

    def __init__(self, synth: Any, rank: int = 0, world_size: int = 1) -> None:
        if len(synth) < world_size:
            raise ZsqatError(f"error: {synth.folder} has {len(synth)} images, fewer than the {world_size} processes")
        self.synth = synth
        self.rank, self.world_size = rank, world_size
        self._cache: dict[int, dict[str, Any]] = {}

    def epoch_batches(self, epoch: int, seed: int, batch_size: int,
                      max_iters: Optional[int] = None) -> list[list[int]]:
        """This rank's batches (image indices) of ``epoch`` (1-based): its slice of every global batch."""
        n, glob = len(self.synth), batch_size * self.world_size
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
        lo = self.rank * batch_size
        batches = [order[s + lo:s + lo + batch_size] for s in range(0, n - glob + 1, glob)]
        if not batches:
            raise ZsqatError(f"error: the global batch ({self.world_size} processes x {batch_size}) is larger "
                             f"than the {n} synthetic images: lower --batch-size")
        return batches[:max_iters] if max_iters else batches

    def _item(self, i: int) -> dict[str, Any]:
        if i not in self._cache:
            self._cache[i] = self.synth[i]
        return self._cache[i]

    def batch(self, indices: Sequence[int], device: Any) -> dict[str, Any]:
        from det_repq_vit.synth import LabelSet, make_data_samples

        items = [self._item(i) for i in indices]
        labels = [LabelSet(it["target"]["bboxes"], it["target"]["labels"], it["target"]["masks"]) for it in items]
        inputs = torch.stack([it["image"] for it in items]).to(device)
        return {"inputs": inputs, "data_samples": make_data_samples(labels, [it["metainfo"] for it in items], device)}


# -------------------------------------------------------------------------------------- losses
def block_names_of(model: nn.Module) -> list[str]:
    """``backbone.stages.{s}.blocks.{j}`` of an mmdet SwinTransformer backbone, in forward order."""
    return [f"backbone.stages.{s}.blocks.{j}" for s, stage in enumerate(model.backbone.stages)
            for j in range(len(stage.blocks))]


def rpn_logits(rpn_out: Any) -> torch.Tensor:
    """RPN head output ``(cls_scores[L], bbox_preds[L])`` → per-image logit vector ``(B, N)``."""
    cls_scores, bbox_preds = rpn_out[0], rpn_out[1]
    return flatten_concat(list(cls_scores) + list(bbox_preds))


class _OutputHook:
    def __init__(self, module: nn.Module) -> None:
        self.out: Any = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, out: Any) -> None:
        self.out = out

    def remove(self) -> None:
        self.handle.remove()


class DetectionDistiller:
    """``L = w_det·L_det(student) + w_kl·KL(RPN) + w_mse·MSE(blocks)`` on one batch.

    ``L_det`` is the student's mmdet training loss on the stored labels; KL is
    ``KL(softmax(z_T) ‖ softmax(z_S))`` with ``z`` = :func:`rpn_logits` (τ=1, batch mean); MSE is the
    mean over backbone blocks of the block-output MSE. The teacher runs in eval mode under no_grad
    (``extract_feat`` + ``rpn_head``) and is never modified. Use as a context manager (hooks).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, w_det: float = 1.0, w_kl: float = 1.0,
                 w_mse: float = 1.0) -> None:
        names = block_names_of(student)
        if names != block_names_of(teacher):
            raise ZsqatError("error: teacher and student backbones have different blocks")
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.student, self.teacher = student, teacher
        self.w_det, self.w_kl, self.w_mse = w_det, w_kl, w_mse
        self.s_blocks = BlockOutputRecorder(student, names)
        self.t_blocks = BlockOutputRecorder(teacher, names)
        self.s_rpn = _OutputHook(student.rpn_head)

    def __call__(self, batch: dict[str, Any], amp: bool = False) -> dict[str, torch.Tensor]:
        """Losses ``{"det", "kl", "mse", "total"}`` (scalars; ``total`` carries the graph) plus the
        det terms of mmdet (``"det/loss_rpn_cls"``, ...)."""
        x, samples = batch["inputs"], batch["data_samples"]
        self.s_blocks.clear()
        self.t_blocks.clear()
        self.s_rpn.out = None
        with torch.no_grad():
            t_z = rpn_logits(self.teacher.rpn_head(self.teacher.extract_feat(x)))
        use_amp = amp and x.device.type == "cuda"
        with torch.autocast(x.device.type, dtype=torch.float16, enabled=use_amp):
            losses = self.student.loss(x, samples)
        det, log_vars = self.student.parse_losses(losses)
        if self.s_rpn.out is None:
            raise RuntimeError("the student's rpn_head did not run in its training loss")
        kl = kl_distill(rpn_logits(self.s_rpn.out), t_z, tau=1.0, kind="softmax")
        mse = block_mse(self.s_blocks.outputs, self.t_blocks.outputs)
        det = det.float()
        total = self.w_det * det + self.w_kl * kl + self.w_mse * mse
        out = {"det": det, "kl": kl, "mse": mse, "total": total}
        out.update({f"det/{k}": torch.as_tensor(float(v.detach()) if torch.is_tensor(v) else float(v))
                    for k, v in log_vars.items() if k != "loss"})
        return out

    def close(self) -> None:
        self.s_blocks.remove()
        self.t_blocks.remove()
        self.s_rpn.remove()

    def __enter__(self) -> "DetectionDistiller":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------ training
def trainable_parameters(model: nn.Module, cfg: ZsqatConfig) -> list[tuple[str, nn.Parameter]]:
    """``dfq``: every parameter (DFQ trains the whole student); ``repq``: the step sizes, plus the
    weights with ``train_weights``. Sets ``requires_grad`` accordingly; returns ``(name, param)``."""
    steps = {id(p) for p in step_parameters(model)}
    everything = cfg.mode == "dfq" or cfg.train_weights
    out = []
    for name, p in model.named_parameters():
        p.requires_grad_(everything or id(p) in steps)
        if p.requires_grad:
            out.append((name, p))
    if not any(id(p) in steps for _, p in out):
        raise RuntimeError("the student has no learnable step sizes: quantize it first")
    return out


def build_optimizer(model: nn.Module, params: Sequence[tuple[str, nn.Parameter]],
                    cfg: ZsqatConfig) -> torch.optim.AdamW:
    """AdamW (0.9, 0.999): decay ``weight_decay`` except position tables and norms (and the steps
    when ``step_decay`` is False)."""
    steps = {id(p) for p in step_parameters(model)}
    decay, no_decay = [], []
    for name, p in params:
        skip = any(k in name for k in NO_DECAY_KEYS) or (id(p) in steps and not cfg.step_decay)
        (no_decay if skip else decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))


def warmup_factor(it: int, warmup_iters: int, ratio: float) -> float:
    """mmdet's linear warm-up: ``ratio`` at iteration 0, 1 from ``warmup_iters`` on (then constant)."""
    if warmup_iters <= 0 or it >= warmup_iters:
        return 1.0
    return 1.0 - (1.0 - it / warmup_iters) * (1.0 - ratio)


def build_scheduler(opt: torch.optim.Optimizer, cfg: ZsqatConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda it: warmup_factor(it, cfg.warmup_iters, cfg.warmup_ratio))


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Reseed torch / numpy / random at the start of ``epoch`` on ``rank`` (RoI sampling, drop path),
    so an epoch does the same whether or not the run was resumed before it."""
    s = (seed * 1_000_003 + epoch * 10_007 + rank) % (2 ** 31)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def _reduce_mean(values: list[float], device: Any) -> list[float]:
    if not is_dist():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / get_world_size()).tolist()


def _global_batch(indices: Sequence[int]) -> list[int]:
    """The synthetic images of this iteration on every rank, in rank order (the global batch)."""
    if not is_dist():
        return [int(i) for i in indices]
    parts: list[Any] = [None] * get_world_size()
    dist.all_gather_object(parts, [int(i) for i in indices])
    return [i for part in parts for i in part]


def lsq_init_steps(model: nn.Module) -> dict[str, float]:
    """``{quantizer name: step}`` of every LSQ quantizer (right after :func:`init_lsq_steps`: the
    all-reduced initial statistics)."""
    return {n: float(m.step.detach()) for n, m in model.named_modules() if isinstance(m, LSQQuantizer)}


def train_epoch(student: nn.Module, distiller: DetectionDistiller, data: SyntheticDetectionData,
                params: Sequence[torch.Tensor], opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LambdaLR, scaler: Any, cfg: ZsqatConfig, epoch: int,
                start_iter: int, device: Any, progress: bool = True) -> list[dict[str, Any]]:
    """One epoch; returns one history row per iteration ``{"iter", "epoch", "lr", "images", "total",
    "det", "kl", "mse", "det/..."}`` (losses averaged over ranks; ``images``: the global batch)."""
    rank = get_rank()
    seed_epoch(cfg.seed, epoch, rank)
    student.train()
    freeze_norm_statistics(student)
    batches = data.epoch_batches(epoch, cfg.seed, cfg.batch_size, cfg.iters_per_epoch)
    rows: list[dict[str, Any]] = []
    bar = tqdm(batches, desc=f"zsqat epoch {epoch}/{cfg.epochs}", disable=not (progress and rank == 0))
    for k, idx in enumerate(bar):
        lr = opt.param_groups[0]["lr"]
        losses = distiller(data.batch(idx, device), amp=cfg.amp)
        opt.zero_grad(set_to_none=True)
        scaler.scale(losses["total"]).backward()
        average_gradients(params)
        scaler.step(opt)
        scaler.update()
        sched.step()
        keys = sorted(losses)
        vals = _reduce_mean([float(losses[key].detach()) for key in keys], device)
        row = {"iter": start_iter + k + 1, "epoch": epoch, "lr": lr, "images": _global_batch(idx),
               **dict(zip(keys, vals))}
        if not all(math.isfinite(row[key]) for key in ("total", "det", "kl", "mse")):
            raise FloatingPointError(f"non-finite loss at iteration {row['iter']}: "
                                     f"{ {key: row[key] for key in ('det', 'kl', 'mse')} }")
        rows.append(row)
        bar.set_postfix(total=f"{row['total']:.4g}", kl=f"{row['kl']:.3g}", mse=f"{row['mse']:.3g}")
    return rows


# --------------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "random": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["random"])
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy(), *np_state[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(work_dir: str | Path, epoch: int) -> Path:
    return Path(work_dir) / f"epoch_{epoch}.pth"


def save_checkpoint(path: str | Path, student: nn.Module, opt: torch.optim.Optimizer, sched: Any,
                    scaler: Any, epoch: int, identity: dict[str, Any], history: list[dict[str, Any]],
                    extra: Optional[dict[str, Any]] = None) -> None:
    """Atomic ``torch.save`` of everything a resume needs (model, optimizer, scheduler, scaler,
    epoch, RNG state, loss history, run identity)."""
    atomic_torch_save({"format": CKPT_FORMAT, "identity": identity, "epoch": epoch,
                       "model": student.state_dict(), "optimizer": opt.state_dict(),
                       "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                       "rng": _rng_state(), "history": history, "extra": extra or {}}, str(path))


def latest_checkpoint(work_dir: str | Path) -> Optional[Path]:
    """The ``epoch_K.pth`` with the largest K in ``work_dir`` (None when there is none)."""
    found = []
    for p in Path(work_dir).glob("epoch_*.pth"):
        try:
            found.append((int(p.stem.split("_", 1)[1]), p))
        except ValueError:
            continue
    return max(found)[1] if found else None


def read_checkpoint(path: str | Path, identity: dict[str, Any]) -> dict[str, Any]:
    """Load and validate a resume file; :class:`ZsqatError` (one line) when it is missing, corrupt,
    of another format or written by a run with other settings (see :func:`check_checkpoint_model`)."""
    path = Path(path)
    if not path.is_file():
        raise ZsqatError(f"error: resume file not found: {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any read failure means a corrupt / foreign file
        raise ZsqatError(f"error: cannot read resume file {path} ({type(exc).__name__}); it is corrupt "
                         "or not a zero-shot QAT checkpoint: pass another --resume file") from None
    need = ("identity", "epoch", "model", "optimizer", "scheduler", "scaler", "rng", "history")
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT or any(k not in ck for k in need):
        raise ZsqatError(f"error: {path} is not a zero-shot QAT checkpoint of this tool ({CKPT_FORMAT})")
    diff = sorted(k for k in set(identity) | set(ck["identity"]) if identity.get(k) != ck["identity"].get(k))
    if diff:
        k = diff[0]
        raise ZsqatError(f"error: {path} was written by a run with other settings ({k}: "
                         f"{ck['identity'].get(k)!r} there, {identity.get(k)!r} now); use the same options or "
                         "another --work-dir")
    return ck


def check_checkpoint_model(ck: dict[str, Any], path: str | Path, model_keys: Iterable[str]) -> None:
    """:class:`ZsqatError` unless the checkpoint's model has exactly the student's state-dict keys."""
    if set(ck["model"]) != set(model_keys):
        raise ZsqatError(f"error: {path} holds a model with other parameters than this student; "
                         "use the checkpoint of this run")


def restore_checkpoint(ck: dict[str, Any], student: nn.Module, opt: torch.optim.Optimizer, sched: Any,
                       scaler: Any) -> tuple[int, list[dict[str, Any]]]:
    """Load a validated checkpoint into the training objects; returns ``(epoch, history)``."""
    student.load_state_dict(ck["model"], strict=True)
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    if ck["scaler"]:
        scaler.load_state_dict(ck["scaler"])
    _set_rng_state(ck["rng"])
    return int(ck["epoch"]), list(ck["history"])


def prune_checkpoints(work_dir: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest ``epoch_K.pth`` (keep <= 0: keep all)."""
    if keep <= 0:
        return
    found = sorted((int(p.stem.split("_", 1)[1]), p) for p in Path(work_dir).glob("epoch_*.pth")
                   if p.stem.split("_", 1)[1].isdigit())
    for _, p in found[:-keep]:
        p.unlink(missing_ok=True)


def epoch_summary(history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean of each loss term per epoch: ``[{"epoch", "iters", "total", "det", "kl", "mse"}]``."""
    out: dict[int, dict[str, Any]] = {}
    for r in history:
        e = out.setdefault(r["epoch"], {"epoch": r["epoch"], "iters": 0, "total": 0.0, "det": 0.0,
                                        "kl": 0.0, "mse": 0.0})
        e["iters"] += 1
        for k in ("total", "det", "kl", "mse"):
            e[k] += r[k]
    for e in out.values():
        for k in ("total", "det", "kl", "mse"):
            e[k] /= e["iters"]
    return [out[k] for k in sorted(out)]


def step_statistics(model: nn.Module) -> dict[str, Any]:
    """Count, mean and min/max of the learnable step sizes (for the JSON report)."""
    steps = [p.detach().float().reshape(-1) for p in step_parameters(model)]
    flat = torch.cat(steps) if steps else torch.zeros(0)
    return {"count": len(steps), "elements": int(flat.numel()),
            "mean": float(flat.mean()) if flat.numel() else None,
            "min": float(flat.min()) if flat.numel() else None,
            "max": float(flat.max()) if flat.numel() else None}

