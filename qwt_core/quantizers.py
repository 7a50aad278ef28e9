"""Fake quantizers (fp32 in, fp32 out) used by RepQ-ViT and QwT.

* :class:`UniformQuantizer` - asymmetric uniform, ``q = clamp(round(x/Δ) + z, 0, 2^b-1)``,
  ``x̂ = (q - z)·Δ`` (round half to even), per tensor or per channel.
* :class:`LogSqrt2Quantizer` - log-√2 quantizer for post-softmax attention probabilities.
* :class:`PercentileQuantizer` - the Percentile PTQ baseline (fixed clipping percentile).

All of them initialise lazily on the first tensor they see and are then frozen (RepQ-ViT's
calibration protocol). ``reset()`` forgets the initialisation. Their state is kept in buffers
(``delta``, ``zero_point``) so a calibrated model saves and reloads with ``state_dict``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

#: The clipping percentiles RepQ-ViT tries; the one with the smallest MSE wins.
CANDIDATE_PERCENTILES: tuple[float, ...] = (0.999, 0.9999, 0.99999)
#: Smallest step size; a constant channel gets a step that reproduces its value exactly.
MIN_DELTA = 1e-8


def validate_bits(n_bits: int, name: str = "n_bits") -> int:
    """Return ``n_bits`` if it is an int in 2..8, else raise ``ValueError`` naming the problem."""
    if not isinstance(n_bits, int) or isinstance(n_bits, bool) or not 2 <= n_bits <= 8:
        raise ValueError(f"{name}={n_bits!r} is not supported: use an integer bit width from 2 to 8")
    return n_bits


def exact_quantile(x: torch.Tensor, q: float, dim: int = -1) -> torch.Tensor:
    """Linear-interpolated quantile of ``x`` along ``dim`` with no size limit.

    Matches ``torch.quantile(x, q, dim)`` (interpolation='linear') but also works for tensors with
    more than 2^24 elements, which ``torch.quantile`` refuses before torch 2.14. Uses two ``kthvalue`` calls, so no full
    sort of the tensor is kept in memory.

    Args:
        x: any floating tensor, ``(..., N, ...)``.
        q: quantile in [0, 1].
        dim: the reduced dimension.
    Returns:
        ``x`` with ``dim`` removed.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q={q} must be in [0, 1]")
    n = x.shape[dim]
    # Same arithmetic as torch.quantile: q rounded to the input dtype, rank in double precision,
    # interpolation weight back in the input dtype.
    rank = float(torch.tensor(q, dtype=x.dtype)) * (n - 1)
    lo_idx, hi_idx = math.floor(rank), math.ceil(rank)
    weight = torch.tensor(rank - lo_idx, dtype=x.dtype, device=x.device)
    lo = torch.kthvalue(x, lo_idx + 1, dim=dim).values
    hi = lo if hi_idx == lo_idx else torch.kthvalue(x, hi_idx + 1, dim=dim).values
    return torch.lerp(lo, hi, weight)


def _as_rows(x: torch.Tensor, channel_wise: bool, channel_dim: int) -> torch.Tensor:
    """``(C, N)`` view of ``x``: one row per channel (``C = 1`` when not channel-wise)."""
    if not channel_wise:
        return x.reshape(1, -1)
    return x.movedim(channel_dim, 0).reshape(x.shape[channel_dim], -1)


def _broadcast_shape(x: torch.Tensor, channel_wise: bool, channel_dim: int) -> list[int]:
    shape = [1] * x.dim()
    if channel_wise:
        shape[channel_dim] = x.shape[channel_dim]
    return shape


def uniform_fake_quant(x: torch.Tensor, delta: torch.Tensor, zero_point: torch.Tensor,
                       n_bits: int) -> torch.Tensor:
    """``(clamp(round(x/Δ) + z, 0, 2^b-1) - z)·Δ``; ``delta``/``zero_point`` broadcast to ``x``.

    Evaluated as ``clamp(round(x/Δ), -z, 2^b-1-z)·Δ`` with in-place ops (same values, fewer passes).
    """
    q = torch.div(x, delta).round_()
    return q.clamp_(-zero_point, (2 ** n_bits - 1) - zero_point).mul_(delta)


def uniform_params_from_range(lo: torch.Tensor, hi: torch.Tensor, n_bits: int
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric (Δ, z) covering ``[lo, hi]``: ``Δ = (hi-lo)/(2^b-1)``, ``z = round(-lo/Δ)``.

    A constant channel (``hi == lo``) gets ``Δ = max(|lo|, MIN_DELTA)`` so its value is reproduced.
    """
    delta = (hi - lo) / (2 ** n_bits - 1)
    safe = torch.clamp(torch.maximum(lo.abs(), hi.abs()), min=MIN_DELTA)
    delta = torch.where(delta > MIN_DELTA, delta, safe)
    zero_point = torch.round(-lo / delta)
    return delta, zero_point


class _LazyQuantizer(nn.Module):
    """Common state: ``enabled`` switch, ``inited`` flag and buffers that may change shape on load."""

    def __init__(self, n_bits: int) -> None:
        super().__init__()
        self.n_bits = validate_bits(n_bits)
        self.enabled = True
        self.version = 0  # bumped whenever (Δ, z) may change; lets layers cache quantized weights
        self.register_buffer("inited", torch.tensor(False))

    @property
    def is_inited(self) -> bool:
        return bool(self.inited)

    def reset(self) -> None:
        """Forget the calibration: the next tensor seen re-initialises the quantizer."""
        self.inited.fill_(False)
        self.version += 1

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Calibrated buffers can be per tensor or per channel: adopt the saved shapes.
        for name, buf in list(self._buffers.items()):
            key = prefix + name
            if key in state_dict and buf is not None and state_dict[key].shape != buf.shape:
                self._buffers[name] = torch.empty_like(state_dict[key], device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self.version += 1
        if getattr(self, "channel_wise", False) and self._buffers["delta"].numel() == 1:
            self.channel_wise = False  # saved after the LayerNorm reparameterization

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not self.is_inited:
            with torch.no_grad():
                self.init_from(x.detach())
            self.inited.fill_(True)
            self.version += 1
        return self.quantize(x)

    def init_from(self, x: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def quantize(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class UniformQuantizer(_LazyQuantizer):
    """RepQ-ViT uniform asymmetric quantizer with percentile-candidate MSE initialisation.

    Args:
        n_bits: bit width (2..8).
        channel_wise: one (Δ, z) per channel of ``channel_dim`` instead of one per tensor.
        channel_dim: 0 for weights (output channels), -1 for token activations (last dim).
        percentiles: the clipping candidates; the one with the smallest MSE is kept per channel
            (ties keep the earlier candidate).
    Buffers ``delta``/``zero_point`` have the broadcast shape of the calibration tensor
    (e.g. ``(C_out, 1)`` for a Linear weight, ``(1, 1, C)`` for channel-wise tokens, ``()`` per tensor).
    """

    def __init__(self, n_bits: int, channel_wise: bool = False, channel_dim: int = 0,
                 percentiles: Sequence[float] = CANDIDATE_PERCENTILES) -> None:
        super().__init__(n_bits)
        self.channel_wise = channel_wise
        self.channel_dim = channel_dim
        self.percentiles = tuple(percentiles)
        self.register_buffer("delta", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0.0))

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}, channel_wise={self.channel_wise}, channel_dim={self.channel_dim}"

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return uniform_fake_quant(x, self.delta, self.zero_point, self.n_bits)

    def candidate_ranges(self, rows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(lo, hi) per candidate, each ``(C,)``, for ``rows`` of shape ``(C, N)``."""
        return [(exact_quantile(rows, 1.0 - p, dim=1), exact_quantile(rows, p, dim=1))
                for p in self.percentiles]

    def init_from(self, x: torch.Tensor) -> None:
        rows = _as_rows(x if x.is_floating_point() else x.float(), self.channel_wise, self.channel_dim)
        best_err = best_delta = best_zero = None
        for lo, hi in self.candidate_ranges(rows):
            delta, zero = uniform_params_from_range(lo, hi, self.n_bits)
            err = (uniform_fake_quant(rows, delta[:, None], zero[:, None], self.n_bits) - rows
                   ).pow(2).mean(dim=1)
            if best_err is None:
                best_err, best_delta, best_zero = err, delta, zero
            else:
                better = err < best_err  # strict: ties keep the earlier candidate
                best_err = torch.where(better, err, best_err)
                best_delta = torch.where(better, delta, best_delta)
                best_zero = torch.where(better, zero, best_zero)
        self.set_params(best_delta, best_zero, _broadcast_shape(x, self.channel_wise, self.channel_dim))

    def set_params(self, delta: torch.Tensor, zero_point: torch.Tensor,
                   shape: Optional[Sequence[int]] = None) -> None:
        """Set (Δ, z) explicitly (e.g. after reparameterization) and mark the quantizer as calibrated."""
        shape = list(shape) if shape is not None else list(delta.shape)
        self.delta = delta.detach().reshape(shape).clone()
        self.zero_point = zero_point.detach().reshape(shape).to(delta.dtype).clone()
        self.inited.fill_(True)
        self.version += 1


class PercentileQuantizer(UniformQuantizer):
    """Percentile baseline: clip to ``[quantile(1-p), quantile(p)]`` for one fixed ``p``.

    ``percentile=1.0`` is plain min/max. Used as the ResNet PTQ baseline.
    """

    def __init__(self, n_bits: int, percentile: float = 0.9999, channel_wise: bool = False,
                 channel_dim: int = 0) -> None:
        super().__init__(n_bits, channel_wise, channel_dim, percentiles=(percentile,))

    def candidate_ranges(self, rows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        p = self.percentiles[0]
        if p >= 1.0:
            return [(rows.amin(dim=1), rows.amax(dim=1))]
        return super().candidate_ranges(rows)


def log_sqrt2_fake_quant(x: torch.Tensor, delta: torch.Tensor, n_bits: int) -> torch.Tensor:
    """``q = round(-2·log2(x/Δ))``; ``q ≥ 2^b`` → 0, else ``x̂ = Δ·2^(-clamp(q, 0, 2^b-1)/2)``.

    Zeros (and underflow) map to 0; values above Δ map to Δ. ``x`` must be non-negative.
    """
    q = torch.div(x, delta).log2_().mul_(-2.0).round_()
    dropped = q >= 2 ** n_bits  # includes +inf from x == 0
    return q.clamp_(min=0.0).mul_(-0.5).exp2_().mul_(delta).masked_fill_(dropped, 0.0)


class LogSqrt2Quantizer(_LazyQuantizer):
    """Log-√2 quantizer (RepQ-ViT) for post-softmax attention; Δ = quantile(x, p) chosen by MSE."""

    def __init__(self, n_bits: int, percentiles: Sequence[float] = CANDIDATE_PERCENTILES) -> None:
        super().__init__(n_bits)
        self.percentiles = tuple(percentiles)
        self.register_buffer("delta", torch.tensor(1.0))

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}"

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return log_sqrt2_fake_quant(x, self.delta, self.n_bits)

    def init_from(self, x: torch.Tensor) -> None:
        flat = (x if x.is_floating_point() else x.float()).reshape(-1)
        best_err, best_delta = None, None
        for p in self.percentiles:
            delta = torch.clamp(exact_quantile(flat, p, dim=0), min=MIN_DELTA)
            err = (log_sqrt2_fake_quant(flat, delta, self.n_bits) - flat).pow(2).mean()
            if best_err is None or err < best_err:
                best_err, best_delta = err, delta
        self.delta = best_delta.detach().reshape(()).clone()
