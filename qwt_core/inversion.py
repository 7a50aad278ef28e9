"""Model inversion for data-free calibration: optimise synthetic images against a frozen teacher.

Task-agnostic engine (:func:`invert`) with a caller-supplied task loss and pluggable priors:

* :class:`PatchSimilarityPrior` - patch-similarity entropy (PSAQ-ViT; DFQ for Swin Mask R-CNN) over
  the ``attn @ v`` outputs of every attention block, read from the toolkit's ``QuantMatMul``
  (``matmul2``) with the quantizers off. The loss is ``Σ_blocks −mean_b H_b`` (minimising it
  maximises the diversity of patch similarities);
* :class:`BNStatsPrior` - BatchNorm statistics matching (DeepInversion / DFQ-ResNet):
  ``Σ_BN ‖σ²_batch − σ²_run‖₂ + ‖μ_batch − μ_run‖₂`` on the inputs of every ``BatchNorm2d``;
* :func:`total_variation` - ``‖D_h x‖_F + ‖D_w x‖_F + ‖D_diag x‖_F + ‖D_antidiag x‖_F`` over the whole
  batch (DFQ's definition; its weight is scaled by ``sqrt(reference_numel / x.numel())`` when a
  reference size is given, so a weight tuned at B = 12, 640² means the same at other sizes);
* optional clamping to the valid pixel range after every step (:func:`pixel_bounds`).

Images live in the model's *normalised* input space. Adam with a linear warm-up and cosine decay to 0
(:func:`lr_at`, DeepInversion's ``lr_cosine_policy``), seeded initial noise per image
(:func:`init_noise`: image ``i`` uses seed ``base + i``, so a batch does not depend on which process
makes it). :func:`synthesize_batches` runs a per-batch generator over this rank's batches and writes
shards + manifest through :mod:`qwt_core.synth_io` (resumable: finished batches are skipped).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .modules import QuantMatMul, quant_disabled
from .synth_io import SynthManifest, batch_indices, merge_parts, prepare_folder, rank_batches, write_shard

__all__ = ["InversionConfig", "InversionResult", "PatchSimilarityPrior", "BNStatsPrior", "total_variation",
           "tv_scale", "patch_similarity_entropy", "kde_entropy", "pixel_bounds", "lr_at", "init_noise",
           "explicit_attention", "frozen", "invert", "synthesize_batches", "batch_seed"]

TaskLoss = Callable[[torch.Tensor, int], Union[torch.Tensor, dict[str, torch.Tensor]]]


# ------------------------------------------------------------------------------------------ config
@dataclass
class InversionConfig:
    """Hyper-parameters of one inversion run (defaults: DFQ's Swin Mask R-CNN generator, §2.3-2.4).

    ``tv_reference_numel``: the ``B·3·H·W`` at which ``tv_weight`` was tuned; the effective weight is
    ``tv_weight · sqrt(tv_reference_numel / x.numel())`` (None: unscaled).
    """

    iterations: int = 2000
    lr: float = 0.2
    betas: tuple[float, float] = (0.5, 0.9)
    eps: float = 1e-8
    warmup: int = 100
    task_weight: float = 1.0
    pse_weight: float = 0.0
    bn_weight: float = 0.0
    tv_weight: float = 0.0
    tv_reference_numel: Optional[int] = None
    clamp: bool = True
    pse_drop_first_token: bool = True
    pse_grid: int = 10
    pse_bandwidth: float = 0.01

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if not 0 <= self.warmup <= self.iterations:
            raise ValueError(f"warmup must be in [0, iterations={self.iterations}], got {self.warmup}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("task_weight", "pse_weight", "bn_weight", "tv_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


@dataclass
class InversionResult:
    """``images``: the optimised ``(B, 3, H, W)`` tensor (detached, on the input device);
    ``history``: per-iteration loss terms (floats); ``seconds``: wall time."""

    images: torch.Tensor
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------- schedule
def lr_at(it: int, base_lr: float, warmup: int, iterations: int) -> float:
    """Linear warm-up over ``warmup`` iterations (``base·(it+1)/warmup``), then cosine to 0."""
    if it < warmup:
        return base_lr * (it + 1) / warmup
    span = max(1, iterations - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * (it - warmup) / span)) * base_lr


def batch_seed(seed: int, indices: Sequence[int]) -> int:
    """Seed of the global torch RNG for the batch holding ``indices`` (random RoI sampling etc.):
    a function of the batch's first global index only, so it does not depend on the process count."""
    return (int(seed) * 1_000_003 + int(indices[0]) * 7_919 + 12_345) % (2 ** 63 - 1)


def init_noise(indices: Sequence[int], shape: Sequence[int], seed: int, device: Union[str, torch.device] = "cpu",
               offset: int = 0) -> torch.Tensor:
    """``(len(indices), *shape)`` standard-normal images; image ``i`` is drawn from a generator seeded
    with ``seed + offset + i`` (``offset`` separates independent draws, e.g. label-stage noise)."""
    out = []
    for i in indices:
        g = torch.Generator().manual_seed(int(seed) + int(offset) + int(i))
        out.append(torch.randn(*shape, generator=g))
    return torch.stack(out).to(device)


def pixel_bounds(mean: Sequence[float], std: Sequence[float], max_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel valid range ``[(0 − m)/s, (max_value − m)/s]`` in the normalised space, as two
    ``(1, C, 1, 1)`` tensors (``max_value`` 1.0 for [0, 1] pipelines, 255.0 for mmdet)."""
    m = torch.tensor([float(v) for v in mean]).view(1, -1, 1, 1)
    s = torch.tensor([float(v) for v in std]).view(1, -1, 1, 1)
    return (0.0 - m) / s, (max_value - m) / s


# ------------------------------------------------------------------------------------------ priors
def total_variation(x: torch.Tensor) -> torch.Tensor:
    """``‖D_h x‖_F + ‖D_w x‖_F + ‖D_diag x‖_F + ‖D_antidiag x‖_F`` over the whole ``(B, C, H, W)`` tensor
    (not squared, not averaged: DFQ / DeepInversion ``loss_var_l2``)."""
    d_w = x[:, :, :, :-1] - x[:, :, :, 1:]
    d_h = x[:, :, :-1, :] - x[:, :, 1:, :]
    d_anti = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
    d_diag = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
    return d_w.norm() + d_h.norm() + d_anti.norm() + d_diag.norm()


def tv_scale(numel: int, reference_numel: Optional[int]) -> float:
    """Factor applied to the TV weight: ``sqrt(reference_numel / numel)`` (1 without a reference)."""
    return 1.0 if not reference_numel else math.sqrt(float(reference_numel) / float(numel))


def kde_entropy(values: torch.Tensor, grid_points: int = 10, bandwidth: float = 0.01,
                offset: float = 1e-4) -> torch.Tensor:
    """Differential entropy of a Gaussian-KDE density per row.

    values: ``(B, M)`` samples per row → ``(B,)``. The grid is ``grid_points`` evenly spaced points
    between the *global* min and max of ``values`` (no gradient through the grid);
    ``p̂_b(t) = mean_m φ_h(t − v_bm)``; ``H_b = ∫ −(p̂_b + offset) log(p̂_b + offset) dt`` (trapezoid).
    """
    lo, hi = float(values.detach().min()), float(values.detach().max())
    grid = torch.linspace(lo, hi, grid_points, device=values.device, dtype=values.dtype)
    coef = 1.0 / (bandwidth * math.sqrt(2.0 * math.pi))
    dens = []
    for t in grid:  # one grid point at a time: memory O(B·M), not O(B·M·grid)
        dens.append((coef * torch.exp(-((t - values) ** 2) / (2.0 * bandwidth ** 2))).mean(dim=1))
    p = torch.stack(dens, dim=1) + offset  # (B, G)
    return torch.trapezoid(-p * torch.log(p), grid.unsqueeze(0).expand_as(p), dim=1)


def patch_similarity_entropy(out: torch.Tensor, batch_size: int, drop_first_token: bool = True,
                             grid_points: int = 10, bandwidth: float = 0.01) -> torch.Tensor:
    """Per-image patch-similarity entropy of one attention block.

    out: ``attn @ v`` of shape ``(B·n_w, heads, N, d)`` (``n_w`` windows per image, 1 for ViT) →
    ``(B,)``. Heads are averaged, token 0 of every window is dropped when ``drop_first_token`` (the
    CLS token of a ViT; DFQ keeps this quirk for Swin windows), all pairwise cosine similarities of
    an image's windows form its sample.
    """
    if out.dim() != 4 or out.shape[0] % batch_size:
        raise ValueError(f"attention output {tuple(out.shape)} does not split into {batch_size} images")
    o = (out if out.dtype in (torch.float32, torch.float64) else out.float()).mean(dim=1)  # (B·n_w, N, d)
    o = o.reshape(batch_size, -1, o.shape[-2], o.shape[-1])
    if drop_first_token:
        o = o[:, :, 1:]
    o = F.normalize(o, dim=-1)
    sim = o @ o.transpose(-1, -2)                     # (B, n_w, N', N')
    return kde_entropy(sim.reshape(batch_size, -1), grid_points, bandwidth)


class _Prior:
    """A forward-hook prior: ``reset()`` before a forward, ``loss(x)`` after it, ``remove()`` at the end."""

    name = "prior"

    def __init__(self) -> None:
        self.handles: list[Any] = []

    def reset(self) -> None:
        raise NotImplementedError

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class PatchSimilarityPrior(_Prior):
    """PSE over every ``matmul2`` (``attn @ v``) :class:`~qwt_core.modules.QuantMatMul` of ``model``.

    Use inside :func:`explicit_attention` (which swaps plain timm / mmdet attention for the toolkit's
    modules and switches their quantizers off). ``loss(x)`` = ``Σ_blocks −mean_b H_b``.
    """

    name = "pse"

    def __init__(self, model: nn.Module, drop_first_token: bool = True, grid_points: int = 10,
                 bandwidth: float = 0.01) -> None:
        super().__init__()
        self.drop_first_token, self.grid_points, self.bandwidth = drop_first_token, grid_points, bandwidth
        self.outputs: list[torch.Tensor] = []
        mods = [m for n, m in model.named_modules() if isinstance(m, QuantMatMul) and n.endswith("matmul2")]
        if not mods:
            raise ValueError(f"{type(model).__name__} has no attention matmul to probe; use "
                             "explicit_attention(model) first (ViT/DeiT/Swin only)")
        for m in mods:
            self.handles.append(m.register_forward_hook(self._hook))

    def _hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self.outputs.append(output)

    @property
    def num_blocks(self) -> int:
        return len(self.handles)

    def reset(self) -> None:
        self.outputs = []

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        if not self.outputs:
            raise RuntimeError("PatchSimilarityPrior saw no attention output: the forward did not reach "
                               "the probed attention (are the matmul quantizers on the explicit path?)")
        b = x.shape[0]
        total = x.new_zeros(())
        for out in self.outputs:
            h = patch_similarity_entropy(out, b, self.drop_first_token, self.grid_points, self.bandwidth)
            total = total - h.mean()
        return total


class BNStatsPrior(_Prior):
    """BatchNorm statistics matching on the inputs of every ``BatchNorm2d`` of ``model``:
    ``Σ ‖var_batch − running_var‖₂ + ‖mean_batch − running_mean‖₂`` (biased batch variance over
    N, H, W; variances, L2 norms not squared, as DFQ-ResNet / DeepInversion)."""

    name = "bn"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.terms: list[torch.Tensor] = []
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.track_running_stats]
        if not bns:
            raise ValueError(f"{type(model).__name__} has no BatchNorm2d with running statistics "
                             "(BN statistics matching is for CNNs such as ResNet)")
        for m in bns:
            self.handles.append(m.register_forward_hook(self._hook))

    @staticmethod
    def stat_loss(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
        """x ``(N, C, H, W)`` → ``‖var − running_var‖₂ + ‖mean − running_mean‖₂`` (scalar)."""
        xf = x.float()
        mean = xf.mean(dim=(0, 2, 3))
        var = xf.var(dim=(0, 2, 3), unbiased=False)
        return torch.norm(running_var.float() - var, 2) + torch.norm(running_mean.float() - mean, 2)

    def _hook(self, module: nn.BatchNorm2d, inputs: Any, output: torch.Tensor) -> None:
        self.terms.append(self.stat_loss(inputs[0], module.running_mean, module.running_var))

    def reset(self) -> None:
        self.terms = []

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        if not self.terms:
            raise RuntimeError("BNStatsPrior saw no BatchNorm input during the forward")
        return torch.stack(self.terms).sum()


# ------------------------------------------------------------------------------ model preparation
def _attention_replacement(parent: nn.Module, child: nn.Module) -> Optional[nn.Module]:
    """The toolkit's explicit-matmul version of a timm / mmdet attention module, or None."""
    kind = type(child).__name__
    if kind == "Attention" and hasattr(child, "qkv") and hasattr(child, "head_dim"):
        from .attention import QuantViTAttention
        return QuantViTAttention(child, 8)
    if kind == "WindowAttention" and hasattr(child, "relative_position_bias_table"):
        from .attention import QuantWindowAttention
        return QuantWindowAttention(child, 8)
    if kind == "ShiftWindowMSA" and hasattr(parent, "norm1"):
        from .adapters.mmdet_swin import QuantShiftWindowMSA
        return QuantShiftWindowMSA(child, parent.norm1, 8)
    return None


@contextmanager
def explicit_attention(model: nn.Module) -> Iterator[int]:
    """Inside: the model computes its FP function with every attention block on the toolkit's
    explicit ``QuantMatMul`` path (so :class:`PatchSimilarityPrior` can read ``attn @ v``).

    Plain timm ViT/DeiT ``Attention``, timm Swin ``WindowAttention`` and mmdet ``ShiftWindowMSA``
    modules are swapped for the toolkit's modules (sharing the parameters) and swapped back on exit.
    Every fake-quant layer is off; the matmuls take the explicit path with their quantizers
    bypassed (``enabled = False``). Yields the number of attention matmuls found.
    """
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(model.modules()):
        child = getattr(parent, "attn", None)
        if isinstance(child, nn.Module):
            new = _attention_replacement(parent, child)
            if new is not None:
                new.to(next(child.parameters()).device)
                swaps.append((parent, "attn", child))
                setattr(parent, "attn", new)
    saved: list[tuple[QuantMatMul, bool, bool, bool]] = []
    try:
        with quant_disabled(model):
            for m in model.modules():
                if isinstance(m, QuantMatMul):
                    saved.append((m, m.use_act_quant, m.quantizer_a.enabled, m.quantizer_b.enabled))
                    m.use_act_quant = True
                    m.quantizer_a.enabled = m.quantizer_b.enabled = False
            yield len(saved)
    finally:
        for m, act, ea, eb in saved:
            m.use_act_quant = act
            m.quantizer_a.enabled, m.quantizer_b.enabled = ea, eb
        for parent, name, old in reversed(swaps):
            setattr(parent, name, old)


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and ``requires_grad=False`` on every parameter inside; both restored on exit."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, r in flags:
            p.requires_grad_(r)
        model.train(was_training)


# ---------------------------------------------------------------------------------------- engine
def invert(x0: torch.Tensor, task_loss: TaskLoss, config: InversionConfig, priors: Sequence[_Prior] = (),
           bounds: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
           callback: Optional[Callable[[int, torch.Tensor], None]] = None, progress: bool = True,
           desc: str = "inversion", log_every: int = 1) -> InversionResult:
    """Optimise images ``x0`` ``(B, 3, H, W)`` (normalised space) to minimise

    ``task_weight·task + pse_weight·PSE + bn_weight·BN + tv_weight·tv_scale·TV``.

    Args:
        x0: initial images (not modified).
        task_loss: ``task_loss(x, it)`` runs the model on ``x`` (so the priors' hooks record) and
            returns a scalar, or a dict of named scalar terms that are summed.
        config: hyper-parameters.
        priors: hook priors (:class:`PatchSimilarityPrior` uses ``pse_weight``,
            :class:`BNStatsPrior` uses ``bn_weight``).
        bounds: ``(lo, hi)`` ``(1, C, 1, 1)`` clamp range, applied after each step if ``config.clamp``.
        callback: ``callback(it, x)`` after each step (e.g. relabelling); runs under ``no_grad``.
    Returns:
        :class:`InversionResult` with the final images.
    """
    cfg = config
    weights = {"pse": cfg.pse_weight, "bn": cfg.bn_weight}
    x = x0.detach().clone()
    lo = hi = None
    if cfg.clamp and bounds is not None:
        lo, hi = (b.to(x.device, x.dtype) for b in bounds)
        x = torch.maximum(torch.minimum(x, hi), lo)
    x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    tv_w = cfg.tv_weight * tv_scale(x.numel(), cfg.tv_reference_numel)
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.iterations), desc=desc, disable=not progress, leave=False)
    for it in bar:
        lr = lr_at(it, cfg.lr, cfg.warmup, cfg.iterations)
        for group in opt.param_groups:
            group["lr"] = lr
        for p in priors:
            p.reset()
        out = task_loss(x, it)
        terms: dict[str, torch.Tensor] = dict(out) if isinstance(out, dict) else {"task": out}
        task = sum(terms.values()) if terms else x.new_zeros(())
        total = cfg.task_weight * task
        log = {"task": float(task.detach())}
        for p in priors:
            w = weights.get(p.name, 1.0)
            value = p.loss(x)
            total = total + w * value
            log[p.name] = float(value.detach())
        if cfg.tv_weight > 0:
            tv = total_variation(x)
            total = total + tv_w * tv
            log["tv"] = float(tv.detach())
        if not torch.isfinite(total):
            raise FloatingPointError(f"inversion loss is not finite at iteration {it} ({log}); lower --lr")
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        with torch.no_grad():
            if lo is not None:
                x.data = torch.maximum(torch.minimum(x.data, hi), lo)
            if callback is not None:
                callback(it, x.detach())
        log["total"] = float(total.detach())
        log["lr"] = lr
        history.append(log)
        if progress and (it % log_every == 0 or it == cfg.iterations - 1):
            bar.set_postfix({k: f"{v:.3g}" for k, v in log.items() if k != "lr"})
    for p in priors:
        p.reset()
    return InversionResult(images=x.detach(), history=history, seconds=time.perf_counter() - t0)


MakeBatch = Callable[[int, list[int]], tuple[torch.Tensor, list[Any], list[dict]]]


def synthesize_batches(out_dir: str, manifest: SynthManifest, make_batch: MakeBatch, rank: int = 0,
                       world_size: int = 1, progress: bool = True,
                       barrier: Optional[Callable[[], None]] = None) -> SynthManifest:
    """Make and store this rank's batches of a synthetic set; resumable.

    ``make_batch(batch, indices)`` returns ``(images (B, 3, H, W), targets, metainfo)`` for the global
    image ``indices`` of generation ``batch``. Batches already in the folder (sha256-checked) are
    skipped. After all ranks are done (``barrier``), rank 0 writes the final ``manifest.json``.
    Raises :class:`~qwt_core.synth_io.SynthSetError` before generating anything if ``out_dir`` holds
    a set with other settings.
    """
    done = prepare_folder(out_dir, manifest, rank)
    mine = rank_batches(manifest.num_images, manifest.batch_size, rank, world_size)
    todo = [k for k in mine if k not in done]
    bar = tqdm(todo, desc=f"synthesis (rank {rank})", disable=not progress)
    if done and progress:
        bar.write(f"resuming: {len(mine) - len(todo)} of {len(mine)} batches of this rank already done")
    for k in bar:
        idx = batch_indices(k, manifest.batch_size, manifest.num_images)
        images, targets, metainfo = make_batch(k, idx)
        write_shard(out_dir, manifest, rank, k, images, targets, metainfo, idx, world_size)
    if barrier is not None:
        barrier()
    if rank == 0:
        manifest = merge_parts(out_dir, manifest, final=True)
    return manifest
