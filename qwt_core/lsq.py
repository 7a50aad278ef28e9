"""Learned Step size Quantization (LSQ) and learnable-step forms of the RepQ-ViT uniform quantizer.

* :class:`LSQQuantizer` - per-tensor symmetric LSQ (Esser et al.): learnable step ``s``,
  ``x̂ = round(clamp(x/s, Q_N, Q_P))·s`` with straight-through rounding, gradient scale
  ``g = 1/√(n·Q_P)`` on ``s`` and init ``s = 2·mean|x|/√Q_P`` on the first tensor seen.
* :class:`AsymmetricLSQQuantizer` - the same with a learnable offset ``β`` that is actually used:
  ``x̂ = round(clamp((x-β)/s, 0, 2^b-1))·s + β``.
* :class:`LearnableUniformQuantizer` - a :class:`~qwt_core.quantizers.UniformQuantizer` whose Δ
  (and optionally z) is an ``nn.Parameter``; built from a calibrated quantizer it reproduces its
  output bit for bit, and trains with STE rounding and the LSQ gradient on Δ.
* :func:`make_steps_learnable` - swap every calibrated uniform quantizer of a model for a learnable
  one (log-√2 quantizers stay fixed).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import nn

from .distributed import all_reduce_max, all_reduce_sum
from .quantizers import LogSqrt2Quantizer, UniformQuantizer, log_sqrt2_fake_quant, validate_bits

__all__ = ["round_ste", "grad_scale", "LSQQuantizer", "AsymmetricLSQQuantizer",
           "LearnableUniformQuantizer", "SteLogSqrt2Quantizer", "make_steps_learnable", "learnable_step_parameters",
           "set_data_shards"]


class _RoundSTE(torch.autograd.Function):
    """``round`` (half to even) forward, identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


class _GradScale(torch.autograd.Function):
    """Identity forward (exact values), gradient multiplied by ``scale`` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.scale, None


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``torch.round(x)`` with a straight-through (identity) gradient; same shape as ``x``."""
    return _RoundSTE.apply(x)


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` unchanged in the forward pass; its gradient is multiplied by ``scale``."""
    return _GradScale.apply(x, float(scale))


class LSQQuantizer(nn.Module):
    """Per-tensor symmetric LSQ fake quantizer (fp32 in, fp32 out, any shape).

    Args:
        n_bits: bit width (2..8).
        signed: ``Q_N = -2^(b-1)``, ``Q_P = 2^(b-1)-1`` (weights, signed activations); else
            ``Q_N = 0``, ``Q_P = 2^b-1`` (non-negative activations).
    The step ``s`` (parameter ``step``) is initialised on the first tensor seen to
    ``2·mean|x|/√Q_P`` (or explicitly with :meth:`initialize`); its gradient is scaled by
    ``g = 1/√(n·Q_P)``, ``n = x.numel()``.

    Data-parallel training: set ``data_shards`` (attribute, not saved; see :func:`set_data_shards`)
    to the number of processes that each hold a slice of the batch this quantizer sees. Then ``n``
    counts the whole batch (``x.numel()·data_shards``) and the init statistic is all-reduced, so
    ``w`` processes on ``B`` images each compute what one process computes on ``w·B`` images.
    """

    data_shards: int = 1

    def __init__(self, n_bits: int, signed: bool = True) -> None:
        super().__init__()
        self.n_bits = validate_bits(n_bits)
        self.signed = signed
        self.q_n = -(2 ** (n_bits - 1)) if signed else 0
        self.q_p = 2 ** (n_bits - 1) - 1 if signed else 2 ** n_bits - 1
        self.step = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("inited", torch.tensor(False))

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}, signed={self.signed}"

    @property
    def is_inited(self) -> bool:
        """True once the step was initialised (lets the quant layers cache ``Q_w(W)`` under no_grad)."""
        return bool(self.inited)

    @property
    def version(self) -> tuple:
        """Changes whenever the step (or offset) is updated in place: keys the quantized-weight cache."""
        off = getattr(self, "offset", None)
        return (self.step.data_ptr(), self.step._version,
                None if off is None else (off.data_ptr(), off._version))

    def init_step(self, x: torch.Tensor) -> torch.Tensor:
        """LSQ's initial step ``2·mean|x|/√Q_P`` (scalar tensor; the mean over every shard's ``x``
        when ``data_shards > 1``)."""
        x = x.detach()
        if self.data_shards > 1:
            stats = torch.stack([x.abs().sum(dtype=torch.float64),
                                 torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)])
            all_reduce_sum(stats)
            mean = (stats[0] / stats[1]).to(x.dtype)
        else:
            mean = x.abs().mean()
        return 2.0 * mean / math.sqrt(self.q_p)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set ``s`` from ``x`` now (LSQ init) and mark the quantizer initialised."""
        self.step.copy_(self.init_step(x).clamp(min=1e-8))
        self.inited.fill_(True)

    def grad_scale_factor(self, x: torch.Tensor) -> float:
        """``g = 1/√(n·Q_P)`` for input ``x`` (``n`` = elements of the whole, possibly sharded, batch)."""
        return 1.0 / math.sqrt(x.numel() * self.data_shards * self.q_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.inited):
            self.initialize(x)
        s = grad_scale(self.step, self.grad_scale_factor(x))
        return round_ste(torch.clamp(x / s, self.q_n, self.q_p)) * s


class AsymmetricLSQQuantizer(LSQQuantizer):
    """LSQ with a learnable offset ``β`` (LSQ+ form): ``x̂ = round(clamp((x-β)/s, 0, 2^b-1))·s + β``.

    The unsigned grid ``[0, 2^b-1]`` is placed at ``β``, so a tensor living in ``[β, β + (2^b-1)s]``
    keeps its full resolution whatever its sign. Init on the first tensor: ``β = min(x)``,
    ``s = (max(x)-min(x))/(2^b-1)``. ``s`` and ``β`` both get the gradient scale ``g``.
    """

    def __init__(self, n_bits: int) -> None:
        super().__init__(n_bits, signed=False)
        self.offset = nn.Parameter(torch.tensor(0.0))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().min(), x.detach().max()
        if self.data_shards > 1:  # the range of every shard's x
            ext = torch.stack([-lo, hi])
            all_reduce_max(ext)
            lo, hi = -ext[0], ext[1]
        self.step.copy_(((hi - lo) / self.q_p).clamp(min=1e-8))
        self.offset.copy_(lo)
        self.inited.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.inited):
            self.initialize(x)
        g = self.grad_scale_factor(x)
        s, beta = grad_scale(self.step, g), grad_scale(self.offset, g)
        return round_ste(torch.clamp((x - beta) / s, self.q_n, self.q_p)) * s + beta


class LearnableUniformQuantizer(UniformQuantizer):
    """RepQ-ViT uniform quantizer with a trainable Δ (and optionally z).

    Forward: ``clamp(round(x/Δ), -z, 2^b-1-z)·Δ`` - the same operations as
    :func:`~qwt_core.quantizers.uniform_fake_quant`, so it reproduces the calibrated quantizer
    exactly; backward: straight-through rounding, LSQ gradient on Δ scaled by
    ``g = 1/√(n·(2^b-1))`` with ``n`` = elements per (Δ) channel (of the whole batch: times
    ``data_shards`` when the batch is split over processes, see :func:`set_data_shards`). ``delta`` (and ``zero_point``
    when ``learn_zero_point``) are ``nn.Parameter``; the shapes are those of the source quantizer.
    Build it with :meth:`from_quantizer`; it never re-initialises itself.
    """

    data_shards: int = 1

    def __init__(self, n_bits: int, delta: torch.Tensor, zero_point: torch.Tensor,
                 channel_wise: bool = False, channel_dim: int = 0,
                 learn_zero_point: bool = False) -> None:
        super().__init__(n_bits, channel_wise=channel_wise, channel_dim=channel_dim)
        del self._buffers["delta"]
        del self._buffers["zero_point"]
        self.delta = nn.Parameter(delta.detach().clone())
        zp = zero_point.detach().to(delta.dtype).clone()
        if learn_zero_point:
            self.zero_point = nn.Parameter(zp)
        else:
            self.register_buffer("zero_point", zp)
        self.learn_zero_point = learn_zero_point
        self._mark_inited(True)

    # ``version`` keys the quantized-weight cache of the quant layers: make it follow Δ and z.
    @property
    def version(self):  # type: ignore[override]
        return (self.__dict__.get("_base_version", 0), self.delta.data_ptr(), self.delta._version,
                self.zero_point.data_ptr(), self.zero_point._version)

    @version.setter
    def version(self, value) -> None:
        self.__dict__["_base_version"] = value if isinstance(value, int) else 0

    def _mark_inited(self, value: bool) -> None:
        self.inited.fill_(value)
        self._inited = value
        self.__dict__["_base_version"] = self.__dict__.get("_base_version", 0) + 1

    @classmethod
    def from_quantizer(cls, q: UniformQuantizer, learn_zero_point: bool = False
                       ) -> "LearnableUniformQuantizer":
        """A learnable copy of a calibrated ``q`` (same Δ, z, bits, device, enabled flag)."""
        if not q.is_inited:
            raise ValueError("LearnableUniformQuantizer.from_quantizer needs a calibrated quantizer: "
                             "calibrate the model (RepQ-ViT) before making its steps learnable")
        new = cls(q.n_bits, q.delta, q.zero_point, channel_wise=q.channel_wise,
                  channel_dim=q.channel_dim, learn_zero_point=learn_zero_point)
        new.enabled = q.enabled
        return new.to(q.delta.device)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", learnable, learn_zero_point={self.learn_zero_point}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return self.quantize(x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        q_max = 2 ** self.n_bits - 1
        n = max(1, x.numel() // max(1, self.delta.numel())) * self.data_shards
        g = 1.0 / math.sqrt(n * q_max)
        delta = grad_scale(self.delta, g)
        z = grad_scale(self.zero_point, g) if self.learn_zero_point else self.zero_point
        return torch.clamp(round_ste(x / delta), -z, q_max - z) * delta

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                                        missing_keys, unexpected_keys, error_msgs)
        self._mark_inited(bool(self.inited))

    def init_from(self, x: torch.Tensor) -> None:
        raise RuntimeError("LearnableUniformQuantizer is trained, not re-calibrated: "
                           "re-calibrate the source UniformQuantizer instead")

    def set_params(self, delta: torch.Tensor, zero_point: torch.Tensor,
                   shape: Optional[list[int]] = None) -> None:
        """Overwrite Δ, z in place (shapes must match the current ones)."""
        with torch.no_grad():
            self.delta.copy_(delta.reshape(self.delta.shape))
            self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))
        self._mark_inited(True)


class _LogSqrt2STE(torch.autograd.Function):
    """Log-√2 fake quantization forward (same kernel as the calibrated quantizer); backward passes
    the gradient straight through where ``x ≤ Δ`` and zeroes it where the value was clipped to Δ."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, delta: torch.Tensor, n_bits: int) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x <= delta)
        return log_sqrt2_fake_quant(x, delta, n_bits)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None


class SteLogSqrt2Quantizer(LogSqrt2Quantizer):
    """A calibrated :class:`LogSqrt2Quantizer` with its Δ FIXED (a buffer) that lets gradients
    reach its input (straight-through), so the layers before the attention softmax can train.

    The plain quantizer evaluates in place and cannot be back-propagated through; the forward
    values here are identical (same kernel). Build with :meth:`from_quantizer`.
    """

    @classmethod
    def from_quantizer(cls, q: LogSqrt2Quantizer) -> "SteLogSqrt2Quantizer":
        if not q.is_inited:
            raise ValueError("SteLogSqrt2Quantizer.from_quantizer needs a calibrated quantizer: "
                             "calibrate the model (RepQ-ViT) first")
        new = cls(q.n_bits, q.percentiles)
        new.delta = q.delta.detach().clone()
        new.enabled = q.enabled
        new._mark_inited(True)
        return new.to(q.delta.device)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad:
            return super().quantize(x)
        return _LogSqrt2STE.apply(x, self.delta, self.n_bits)


def make_steps_learnable(model: nn.Module, learn_zero_point: bool = False) -> list[str]:
    """Replace every calibrated :class:`UniformQuantizer` in ``model`` by a learnable copy, in place.

    Log-√2 quantizers (post-softmax) keep their fixed Δ but are replaced by
    :class:`SteLogSqrt2Quantizer` so gradients pass through them; already converted ones are left
    alone. Raises ``ValueError`` (before changing anything) if a quantizer is not calibrated.
    Returns the dotted names of the replaced uniform quantizers.
    """
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, UniformQuantizer) and not isinstance(m, LearnableUniformQuantizer)
               and not isinstance(m, LogSqrt2Quantizer)]
    logs = [(name, m) for name, m in model.named_modules()
            if isinstance(m, LogSqrt2Quantizer) and not isinstance(m, SteLogSqrt2Quantizer)]
    missing = [name for name, m in targets + logs if not m.is_inited]
    if missing:
        raise ValueError(f"{len(missing)} uniform quantizer(s) are not calibrated (first: {missing[0]}): "
                         "run RepQ-ViT calibration before make_steps_learnable")
    for name, q in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, LearnableUniformQuantizer.from_quantizer(q, learn_zero_point))
        for key in ("_wq_cache", "_wq_key"):  # drop quantized-weight caches of the old quantizer
            parent.__dict__.pop(key, None)
    for name, q in logs:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, SteLogSqrt2Quantizer.from_quantizer(q))
    return [name for name, _ in targets]


def learnable_step_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The step/offset parameters of all LSQ and learnable uniform quantizers in ``model``."""
    params: list[nn.Parameter] = []
    for m in model.modules():
        if isinstance(m, LearnableUniformQuantizer):
            params.append(m.delta)
            if m.learn_zero_point:
                params.append(m.zero_point)
        elif isinstance(m, LSQQuantizer):
            params.append(m.step)
            if isinstance(m, AsymmetricLSQQuantizer):
                params.append(m.offset)
    return params


def set_data_shards(model: nn.Module, shards: int) -> int:
    """Tell every learnable activation quantizer of ``model`` that its batch is split over
    ``shards`` processes (LSQ gradient scale and LSQ init then use the whole batch). Weight
    quantizers (modules named ``weight_quantizer``) see the same tensor on every process and keep
    ``data_shards = 1``. Returns the number of quantizers set."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    count = 0
    for name, m in model.named_modules():
        if isinstance(m, (LSQQuantizer, LearnableUniformQuantizer)) and not name.endswith("weight_quantizer"):
            m.data_shards = shards
            count += 1
    return count


@torch.no_grad()
def init_lsq_steps(model: nn.Module, forward: Callable[[], Any]) -> int:
    """Initialise every :class:`LSQQuantizer` of ``model`` by one eval-mode ``forward()`` (the
    model's train/eval mode is restored after). Returns the number of LSQ quantizers; raises
    ``RuntimeError`` if one saw no data."""
    was = model.training
    model.eval()
    forward()
    model.train(was)
    qs = [m for m in model.modules() if isinstance(m, LSQQuantizer)]
    missing = [m for m in qs if not m.is_inited]
    if missing:
        raise RuntimeError(f"{len(missing)} LSQ quantizers saw no data in the initialisation forward")
    return len(qs)
