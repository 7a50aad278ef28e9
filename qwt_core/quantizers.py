"""Fake quantizers (fp32 in, fp32 out) used by RepQ-ViT and QwT.

* :class:`UniformQuantizer` - asymmetric uniform, ``q = clamp(round(x/Δ) + z, 0, 2^b-1)``,
  ``x̂ = (q - z)·Δ`` (round half to even), per tensor or per channel.
* :class:`LogSqrt2Quantizer` - log-√2 quantizer for post-softmax attention probabilities.
* :class:`PercentileQuantizer` - the Percentile PTQ baseline (fixed clipping percentile).

All of them initialise lazily on the first tensor they see and are then frozen (RepQ-ViT's
calibration protocol). ``reset()`` forgets the initialisation. Their state is kept in buffers
(``delta``, ``zero_point``) so a calibrated model saves and reloads with ``state_dict``.

Speed (same numbers as the straightforward code, checked bit for bit in the tests):

* the clipping quantiles come from one ``topk`` per tail (:func:`exact_quantiles`), with a
  sampled-threshold prefilter for the single huge row of a per-tensor quantizer on CPU;
* a calibrated quantizer's forward reads no tensor on the host (``is_inited`` is a Python flag
  mirroring the ``inited`` buffer), so it never synchronises a GPU;
* :func:`set_fused_fake_quant` (off by default) runs the fake quantization through
  ``torch.compile``-fused kernels (one memory pass instead of 4-10).
"""
from __future__ import annotations

import math
import os
from typing import Callable, Literal, Optional, Sequence

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


#: ``exact_quantiles`` reads order statistics from one ``topk`` per tail when a tail needs at most
#: this fraction of the row (``torch.topk`` keeps a heap of that size); otherwise ``kthvalue``.
TOPK_MAX_FRACTION = 1 / 16
#: A single row of at least this many values is prefiltered before ``topk`` (see ``_tail_topk``).
PREFILTER_MIN_N = 1 << 18
#: Stride of the sample that sets the prefilter threshold (prime: cycles through channel layouts).
SAMPLE_STRIDE = 61
#: Pieces a prefiltered row is cut into (parallel ``topk`` over the pieces).
PREFILTER_ROWS = 256


def _tail_topk(x: torch.Tensor, k: int, dim: int, largest: bool) -> torch.Tensor:
    """``torch.topk(x, k, dim, largest, sorted=True).values``, faster for one huge row on CPU.

    On CPU ``topk`` works row by row on one thread and copies the whole row into (value, index)
    pairs, so a per-tensor quantizer (one row of millions of values) pays for the whole row. For
    such a row:

    1. a threshold ``t`` is read from a strided sample (every ``SAMPLE_STRIDE``-th value, a prime
       so that it cycles through channel layouts) so that about twice ``k`` values lie beyond it;
    2. the row is cut into ``PREFILTER_ROWS`` pieces and each piece gives its ``c`` most extreme
       values (one multi-threaded ``topk`` over short rows, ``c`` ≈ 3x its share of ``k``);
       a piece whose ``c``-th value is still beyond ``t`` is kept whole;
    3. so every value beyond ``t`` is a candidate; if at least ``k`` candidates lie beyond ``t``,
       the ``k`` extreme candidates are exactly the ``k`` extreme values of the row (same values,
       same order); otherwise the plain ``topk`` runs.

    NaNs count as largest, as in ``topk``/``kthvalue``.
    """
    n = x.shape[dim]
    if x.device.type != "cpu" or x.numel() != n or n < PREFILTER_MIN_N or k * 32 > n:
        return torch.topk(x, k, dim=dim, largest=largest, sorted=True).values
    flat = x.reshape(-1)
    sample = flat[SAMPLE_STRIDE // 2::SAMPLE_STRIDE]
    m = sample.numel()
    expected = k * m / n  # rank of the k-th extreme value inside the sample
    k_s = min(m, int(math.ceil(2.0 * expected + 4.0 * math.sqrt(expected) + 8)))
    t = torch.topk(sample, k_s, largest=largest, sorted=True).values[-1]

    def beyond(v: torch.Tensor) -> torch.Tensor:  # v >= t (NaN included) / v <= t
        return torch.lt(v, t).logical_not_() if largest else torch.le(v, t)

    length = n // PREFILTER_ROWS
    body = flat[:PREFILTER_ROWS * length].view(PREFILTER_ROWS, length)
    share = k / PREFILTER_ROWS
    c = min(length, int(math.ceil(3.0 * share + 6.0 * math.sqrt(share) + 16)))
    tops = torch.topk(body, c, dim=1, largest=largest, sorted=False).values  # (P, c)
    edge = tops.amin(dim=1) if largest else tops.amax(dim=1)  # each piece's c-th extreme value
    whole = beyond(edge)  # such a piece may hold more than c values beyond t: keep all of it
    rest = flat[PREFILTER_ROWS * length:]
    if int(whole.sum()) * 4 > PREFILTER_ROWS and not bool(torch.isnan(t)):
        # many pieces tie with t (e.g. the zeros after a ReLU): only values strictly beyond t
        # need sorting, the remaining places are copies of t itself
        values = _tail_with_ties(flat, body, tops, edge, rest, t, k, largest)
    else:
        candidates = torch.cat([tops[~whole].reshape(-1), body[whole].reshape(-1), rest])
        values = None
        if int(beyond(candidates).sum()) >= k:
            values = torch.topk(candidates, k, largest=largest, sorted=True).values
    if values is None:  # the sample was unlucky: no shortcut
        values = torch.topk(flat, k, largest=largest, sorted=True).values
    shape = list(x.shape)
    shape[dim] = k
    return values.reshape(shape)


def _tail_with_ties(flat: torch.Tensor, body: torch.Tensor, tops: torch.Tensor, edge: torch.Tensor,
                    rest: torch.Tensor, t: torch.Tensor, k: int, largest: bool) -> Optional[torch.Tensor]:
    """The ``k`` extreme values of ``flat`` when many values equal the threshold ``t``.

    ``body``: ``flat`` cut into pieces ``(P, L)``, ``tops`` their ``c`` extreme values ``(P, c)``,
    ``edge`` each piece's ``c``-th extreme value, ``rest`` the values after the pieces. A piece whose
    ``c``-th extreme value is not strictly beyond ``t`` holds all its strictly-beyond values in its
    ``tops``; so the strictly-beyond values of the row are all among the candidates. If fewer than
    ``k``, the sorted result is those values followed by copies of ``t`` (equal values: the same
    result as ``topk``), provided the row holds enough values equal to ``t``. Returns None when the
    shortcut does not apply (NaNs in the row, too few values at or beyond ``t``).
    """
    def strictly(v: torch.Tensor) -> torch.Tensor:
        return torch.gt(v, t) if largest else torch.lt(v, t)

    if bool(torch.isnan(flat).any()):  # NaNs sort as largest: leave them to topk
        return None
    whole = strictly(edge)
    candidates = torch.cat([tops[~whole].reshape(-1), body[whole].reshape(-1), rest])
    n_strict = int(strictly(candidates).sum())
    if n_strict >= k:
        return torch.topk(candidates, k, largest=largest, sorted=True).values
    if n_strict + int(torch.eq(flat, t).sum()) < k:
        return None
    head = torch.topk(candidates, n_strict, largest=largest, sorted=True).values
    return torch.cat([head, t.reshape(1).expand(k - n_strict)])


def _quantile_rank(q: float, n: int, dtype: torch.dtype) -> tuple[int, int, float]:
    """``(lo, hi, weight)`` of ``torch.quantile``'s linear interpolation for ``n`` values.

    Same arithmetic as ``torch.quantile``: q rounded to the input dtype, rank in double precision;
    the weight is converted back to the input dtype by the caller.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q={q} must be in [0, 1]")
    rank = float(torch.tensor(q, dtype=dtype)) * (n - 1)
    lo = math.floor(rank)
    return lo, math.ceil(rank), rank - lo


def exact_quantiles(x: torch.Tensor, qs: Sequence[float], dim: int = -1,
                    method: Literal["auto", "topk", "kthvalue"] = "auto") -> list[torch.Tensor]:
    """Linear-interpolated quantiles ``[quantile(x, q, dim) for q in qs]``, sharing the selection work.

    Each quantile is ``lerp(v_lo, v_hi, w)`` of two order statistics. With ``method="topk"`` the
    order statistics of all ``q >= 0.5`` come from ONE ``topk(largest=True)`` and those of all
    ``q < 0.5`` from ONE ``topk(largest=False)`` (RepQ-ViT's candidates 0.999/0.9999/0.99999 and
    their lower tails need only the extreme 0.1 % of each row). ``"kthvalue"`` uses two
    ``kthvalue`` calls per quantile. Both select the same elements, so the results are
    bit-identical; ``"auto"`` picks ``topk`` for a tail when it needs at most
    ``TOPK_MAX_FRACTION`` of the row.

    Args:
        x: floating tensor ``(..., N, ...)``.
        qs: quantiles, each in [0, 1].
        dim: the reduced dimension.
        method: ``"auto"``, ``"topk"`` or ``"kthvalue"``.
    Returns:
        One tensor per q, ``x``'s shape with ``dim`` removed.
    """
    if method not in ("auto", "topk", "kthvalue"):
        raise ValueError(f"method={method!r}: use 'auto', 'topk' or 'kthvalue'")
    n = x.shape[dim]
    if n == 0:
        raise ValueError("exact_quantiles got an empty dimension: there is no quantile of no values")
    ranks = [_quantile_rank(float(q), n, x.dtype) for q in qs]
    upper = {i for i, q in enumerate(qs) if q >= 0.5}
    lower = {i for i, q in enumerate(qs) if q < 0.5}
    # number of extreme values each tail needs: k-th smallest (1-based) = (n-k+1)-th largest
    k_upper = max((n - ranks[i][0] for i in upper), default=0)
    k_lower = max((ranks[i][1] + 1 for i in lower), default=0)

    def use_topk(k: int) -> bool:
        return method == "topk" or (method == "auto" and k <= max(1.0, n * TOPK_MAX_FRACTION))

    top = _tail_topk(x, k_upper, dim, largest=True) if upper and use_topk(k_upper) else None
    bottom = _tail_topk(x, k_lower, dim, largest=False) if lower and use_topk(k_lower) else None

    def order_stat(i: int, j: int) -> torch.Tensor:
        """The (j+1)-th smallest value along ``dim`` (0-based ``j``), for quantile ``i``."""
        if i in upper and top is not None:
            return top.select(dim, n - 1 - j)
        if i in lower and bottom is not None:
            return bottom.select(dim, j)
        return torch.kthvalue(x, j + 1, dim=dim).values

    out = []
    for i, (lo_idx, hi_idx, w) in enumerate(ranks):
        weight = torch.tensor(w, dtype=x.dtype, device=x.device)
        lo = order_stat(i, lo_idx)
        hi = lo if hi_idx == lo_idx else order_stat(i, hi_idx)
        out.append(torch.lerp(lo, hi, weight))
    return out


def exact_quantile(x: torch.Tensor, q: float, dim: int = -1,
                   method: Literal["auto", "topk", "kthvalue"] = "auto") -> torch.Tensor:
    """Linear-interpolated quantile of ``x`` along ``dim`` with no size limit.

    Matches ``torch.quantile(x, q, dim)`` (interpolation='linear') but also works for tensors with
    more than 2^24 elements, which ``torch.quantile`` refuses before torch 2.14. No full sort is
    kept in memory: extreme quantiles read one ``topk`` of the tail, others two ``kthvalue`` calls
    (see :func:`exact_quantiles`; both give bit-identical values).

    Args:
        x: any floating tensor, ``(..., N, ...)``.
        q: quantile in [0, 1].
        dim: the reduced dimension.
        method: ``"auto"``, ``"topk"`` or ``"kthvalue"`` (same values; speed only).
    Returns:
        ``x`` with ``dim`` removed.
    """
    return exact_quantiles(x, [q], dim=dim, method=method)[0]


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
                       n_bits: int, out: Optional[torch.Tensor] = None,
                       zero_point_number: Optional[float] = None) -> torch.Tensor:
    """``(clamp(round(x/Δ) + z, 0, 2^b-1) - z)·Δ``; ``delta``/``zero_point`` broadcast to ``x``.

    Evaluated as ``clamp(round(x/Δ), -z, 2^b-1-z)·Δ`` with in-place ops (same values, fewer passes).
    ``out``: optional preallocated result tensor of the broadcast shape (reused buffers).
    ``zero_point_number``: ``float(zero_point)`` of a one-element zero point, already on the host
    (the quantizer caches it): the clamp then takes Python-number bounds, whose vectorised CPU
    kernel is about 4x faster than broadcast tensor bounds. The bounds are the same values: the
    exact ``q_max - z`` rounded once to the tensor dtype, which is what the float subtraction gives.
    """
    q = torch.div(x, delta, out=out).round_() if out is not None else torch.div(x, delta).round_()
    q_max = 2 ** n_bits - 1
    if zero_point_number is not None:
        return q.clamp_(-zero_point_number, q_max - zero_point_number).mul_(delta)
    return q.clamp_(-zero_point, q_max - zero_point).mul_(delta)


def _cpu_number(t: torch.Tensor) -> Optional[float]:
    """``float(t)`` for a one-element CPU tensor (no device sync), else None: the
    ``zero_point_number`` of :func:`uniform_fake_quant`."""
    return float(t) if t.numel() == 1 and t.device.type == "cpu" else None


def _uniform_fake_quant_pure(x: torch.Tensor, delta: torch.Tensor, zero_point: torch.Tensor,
                             n_bits: int) -> torch.Tensor:
    """Out-of-place form of :func:`uniform_fake_quant` (same ops, same order) for ``torch.compile``."""
    return torch.clamp(torch.round(x / delta), -zero_point, (2 ** n_bits - 1) - zero_point) * delta


def _uniform_sq_err_pure(x: torch.Tensor, delta: torch.Tensor, zero_point: torch.Tensor,
                         n_bits: int) -> torch.Tensor:
    """``(fq(x) - x)²`` elementwise (same ops as the eager candidate error) for ``torch.compile``."""
    return (_uniform_fake_quant_pure(x, delta, zero_point, n_bits) - x).pow(2)


def _log_sqrt2_sq_err_pure(x: torch.Tensor, delta: torch.Tensor, n_bits: int) -> torch.Tensor:
    """``(fq_log√2(x) - x)²`` elementwise, for ``torch.compile``."""
    return (_log_sqrt2_fake_quant_pure(x, delta, n_bits) - x).pow(2)


class _FusedFakeQuant:
    """Switch for ``torch.compile``-fused fake quantization (one pass per tensor instead of 4-10).

    Off by default: compiling costs tens of seconds per process (less with inductor's on-disk
    cache), which dominates short runs. The uniform quantizer's fused kernel uses the same IEEE
    operations (division, round-half-even, clamp, multiplication) and is bit-identical to the eager
    path; the log-√2 kernel evaluates ``log2``/``exp2`` with the same vectorised routines as eager
    PyTorch (checked equal in ``tests/test_speed_equivalence.py``). During calibration the
    candidate errors use a fused ``(fq(x) - x)²`` kernel followed by the same eager ``mean``, so
    the chosen (Δ, z) are unchanged. Turn on with :func:`set_fused_fake_quant` or
    ``QWT_FUSED_FAKE_QUANT=1``.
    """

    enabled: bool = os.environ.get("QWT_FUSED_FAKE_QUANT", "0") == "1"
    _fns: dict[str, Callable] = {}
    #: graphs per fused kernel (input layouts); dynamo's default of 8 is too few for Swin-T
    RECOMPILE_LIMIT: int = 64

    @classmethod
    def get(cls, name: str) -> Callable:
        fn = cls._fns.get(name)
        if fn is None:
            base = {"uniform": _uniform_fake_quant_pure, "log2": _log_sqrt2_fake_quant_pure,
                    "uniform_sq_err": _uniform_sq_err_pure, "log2_sq_err": _log_sqrt2_sq_err_pure}[name]
            compiled = torch.compile(base, dynamic=True)

            def fn(*args, _compiled=compiled):
                # every (rank, stride, view-base) pattern is one graph: Swin-T needs more than
                # dynamo's default limit of 8, past which the calls would silently run uncompiled;
                # a model needing more than RECOMPILE_LIMIT raises instead of slowing down silently
                with torch._dynamo.config.patch(recompile_limit=cls.RECOMPILE_LIMIT,
                                                fail_on_recompile_limit_hit=True):
                    return _compiled(*args)

            cls._fns[name] = fn
        return fn


def _fused_layout(x: torch.Tensor, param: torch.Tensor) -> Optional[tuple[torch.Tensor, list[int]]]:
    """``x`` as the fused kernel takes it and the matching shape of its (Δ, z), or None (eager ops).

    Few layouts means few compiled kernels: a contiguous input is seen as ``(N,)`` with a scalar
    (per tensor), ``(N, C)`` with ``(1, C)`` (per channel of the last dim) or ``(C, N)`` with
    ``(C, 1)`` (per channel of dim 0). A non-contiguous input (e.g. ``kᵀ`` or ``v`` in attention,
    views into the qkv output) is passed as it is, per tensor only: inductor returns the strides
    eager PyTorch would (``keep_output_stride``), so the next matmul sees the same layout.
    Parameters go to the eager ops (weights are quantized once and cached).
    """
    if type(x) is not torch.Tensor or x.numel() == 0 or param.dim() > x.dim():
        return None
    if not x.is_contiguous():
        return (x, []) if param.numel() == 1 else None
    if param.numel() == 1:
        return x.view(-1), []
    channels = [i for i, size in enumerate(param.shape) if size != 1]
    if param.dim() != x.dim() or len(channels) != 1:
        return None
    c = param.shape[channels[0]]
    if channels[0] == x.dim() - 1:
        return x.view(-1, c), [1, c]
    if channels[0] == 0:
        return x.view(c, -1), [c, 1]
    return None


def set_fused_fake_quant(enabled: bool) -> None:
    """Use ``torch.compile``-fused fake-quant kernels in every quantizer's forward (process-wide).

    The first forward after switching on compiles (once per process and input rank). Needs a C++
    compiler for inductor on CPU; a compile failure raises, it does not fall back silently.
    """
    _FusedFakeQuant.enabled = bool(enabled)


def fused_fake_quant_enabled() -> bool:
    """Whether :func:`set_fused_fake_quant` (or ``QWT_FUSED_FAKE_QUANT=1``) is on."""
    return _FusedFakeQuant.enabled


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
    """Common state: ``enabled`` switch, ``inited`` flag and buffers that may change shape on load.

    The ``inited`` buffer (saved with the model) is mirrored by a Python flag that the forward
    reads, so a calibrated quantizer never reads a device tensor on the host (no GPU sync).
    Change the state only through ``initialize``/``set_params``/``reset``/``load_state_dict``.
    """

    def __init__(self, n_bits: int) -> None:
        super().__init__()
        self.n_bits = validate_bits(n_bits)
        self.enabled = True
        self.version = 0  # bumped whenever (Δ, z) may change; lets layers cache quantized weights
        self.register_buffer("inited", torch.tensor(False))
        self._inited = False  # host mirror of the ``inited`` buffer

    @property
    def is_inited(self) -> bool:
        flag = self.__dict__.get("_inited")
        if flag is None:  # unpickled from a version without the host flag: read the buffer once
            flag = self.__dict__["_inited"] = bool(self.inited)
        return flag

    def _mark_inited(self, value: bool) -> None:
        self.inited.fill_(value)
        self._inited = value
        self.version += 1

    def reset(self) -> None:
        """Forget the calibration: the next tensor seen re-initialises the quantizer."""
        self._mark_inited(False)

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
        self._inited = bool(self.inited)  # load time: the one host read of the buffer
        if getattr(self, "channel_wise", False) and self._buffers["delta"].numel() == 1:
            self.channel_wise = False  # saved after the LayerNorm reparameterization

    def initialize(self, x: torch.Tensor) -> None:
        """Calibrate (Δ, z) on ``x`` now and freeze them (what the first forward does lazily)."""
        with torch.no_grad():
            self.init_from(x.detach())
        self._mark_inited(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not self.is_inited:
            self.initialize(x)
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
        layout = _fused_layout(x, self.delta) if _FusedFakeQuant.enabled else None
        if layout is not None:
            flat, shape = layout
            return _FusedFakeQuant.get("uniform")(flat, self.delta.view(shape), self.zero_point.view(shape),
                                                  self.n_bits).view(x.shape)
        return uniform_fake_quant(x, self.delta, self.zero_point, self.n_bits,
                                  zero_point_number=self._zero_point_number())

    def _zero_point_number(self) -> Optional[float]:
        """The host copy of a one-element CPU zero point, cached by the tensor's identity and
        version (any in-place change or reassignment invalidates it); None otherwise. Filled at
        calibration / load time, so a calibrated forward reads nothing from a tensor."""
        zp = self.zero_point
        key = (zp.data_ptr(), zp._version, zp.dtype)
        cached = self.__dict__.get("_zp_host")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_zp_host"] = (key, _cpu_number(zp))
        return cached[1]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if self.is_inited:
            self._zero_point_number()  # load time: the one host read of a per-tensor z

    def candidate_ranges(self, rows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(lo, hi) per candidate, each ``(C,)``, for ``rows`` of shape ``(C, N)``."""
        qs = [1.0 - p for p in self.percentiles] + list(self.percentiles)
        values = exact_quantiles(rows, qs, dim=1)  # one topk per tail for all candidates
        k = len(self.percentiles)
        return list(zip(values[:k], values[k:]))

    def init_from(self, x: torch.Tensor) -> None:
        rows = _as_rows(x if x.is_floating_point() else x.float(), self.channel_wise, self.channel_dim)
        ranges = self.candidate_ranges(rows)
        shape = _broadcast_shape(x, self.channel_wise, self.channel_dim)
        if len(ranges) == 1:  # one candidate (Percentile baseline, min/max): no error to compare
            self.set_params(*uniform_params_from_range(*ranges[0], self.n_bits), shape)
            return
        best_err = best_delta = best_zero = None
        # one scratch buffer for all candidates (same ops as ``(fq(rows) - rows).pow(2)``)
        fused = _FusedFakeQuant.enabled and rows.is_contiguous()
        buf = torch.empty_like(rows) if rows.is_contiguous() and not fused else None
        for lo, hi in ranges:
            delta, zero = uniform_params_from_range(lo, hi, self.n_bits)
            if fused and rows.shape[0] == 1:  # per tensor: the 1-D kernel, same memory for the mean
                err = _FusedFakeQuant.get("uniform_sq_err")(rows.view(-1), delta.view(()), zero.view(()),
                                                            self.n_bits).view(rows.shape).mean(dim=1)
            elif fused:
                err = _FusedFakeQuant.get("uniform_sq_err")(rows, delta[:, None], zero[:, None],
                                                            self.n_bits).mean(dim=1)
            elif buf is not None:  # calibration: reading a per-tensor z on the host is fine here
                err = uniform_fake_quant(rows, delta[:, None], zero[:, None], self.n_bits, out=buf,
                                         zero_point_number=_cpu_number(zero)).sub_(rows).pow_(2).mean(dim=1)
            else:
                err = (uniform_fake_quant(rows, delta[:, None], zero[:, None], self.n_bits) - rows
                       ).pow(2).mean(dim=1)
            if best_err is None:
                best_err, best_delta, best_zero = err, delta, zero
            else:
                better = err < best_err  # strict: ties keep the earlier candidate
                best_err = torch.where(better, err, best_err)
                best_delta = torch.where(better, delta, best_delta)
                best_zero = torch.where(better, zero, best_zero)
        self.set_params(best_delta, best_zero, shape)

    def set_params(self, delta: torch.Tensor, zero_point: torch.Tensor,
                   shape: Optional[Sequence[int]] = None) -> None:
        """Set (Δ, z) explicitly (e.g. after reparameterization) and mark the quantizer as calibrated."""
        shape = list(shape) if shape is not None else list(delta.shape)
        self.delta = delta.detach().reshape(shape).clone()
        self.zero_point = zero_point.detach().reshape(shape).to(delta.dtype).clone()
        self._mark_inited(True)
        self._zero_point_number()  # calibration time: the one host read of a per-tensor z


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


def log_sqrt2_fake_quant(x: torch.Tensor, delta: torch.Tensor, n_bits: int,
                         out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``q = round(-2·log2(x/Δ))``; ``q ≥ 2^b`` → 0, else ``x̂ = Δ·2^(-clamp(q, 0, 2^b-1)/2)``.

    Zeros (and underflow) map to 0; values above Δ map to Δ. ``x`` must be non-negative.
    ``out``: optional preallocated result tensor (reused buffers).
    """
    q = torch.div(x, delta, out=out) if out is not None else torch.div(x, delta)
    q = q.log2_().mul_(-2.0).round_()
    dropped = q >= 2 ** n_bits  # includes +inf from x == 0
    return q.clamp_(min=0.0).mul_(-0.5).exp2_().mul_(delta).masked_fill_(dropped, 0.0)


def _log_sqrt2_fake_quant_pure(x: torch.Tensor, delta: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Out-of-place form of :func:`log_sqrt2_fake_quant` (same ops, same order) for ``torch.compile``."""
    q = torch.round(torch.log2(x / delta) * -2.0)
    value = torch.exp2(torch.clamp(q, min=0.0) * -0.5) * delta
    return torch.where(q >= 2 ** n_bits, torch.zeros_like(value), value)


class LogSqrt2Quantizer(_LazyQuantizer):
    """Log-√2 quantizer (RepQ-ViT) for post-softmax attention; Δ = quantile(x, p) chosen by MSE."""

    def __init__(self, n_bits: int, percentiles: Sequence[float] = CANDIDATE_PERCENTILES) -> None:
        super().__init__(n_bits)
        self.percentiles = tuple(percentiles)
        self.register_buffer("delta", torch.tensor(1.0))

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}"

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        layout = _fused_layout(x, self.delta) if _FusedFakeQuant.enabled else None
        if layout is not None:
            return _FusedFakeQuant.get("log2")(layout[0], self.delta.view(layout[1]),
                                               self.n_bits).view(x.shape)
        return log_sqrt2_fake_quant(x, self.delta, self.n_bits)

    def init_from(self, x: torch.Tensor) -> None:
        flat = (x if x.is_floating_point() else x.float()).reshape(-1)
        best_err, best_delta = None, None
        values = exact_quantiles(flat, self.percentiles, dim=0)  # one topk for all candidates
        if len(values) == 1:  # one candidate: no error to compare
            self.delta = torch.clamp(values[0], min=MIN_DELTA).detach().reshape(()).clone()
            return
        fused = _FusedFakeQuant.enabled and type(flat) is torch.Tensor
        buf = None if fused else torch.empty_like(flat)  # one scratch buffer for all candidates
        for value in values:
            delta = torch.clamp(value, min=MIN_DELTA)
            if fused:
                err = _FusedFakeQuant.get("log2_sq_err")(flat, delta, self.n_bits).mean()
            else:
                err = log_sqrt2_fake_quant(flat, delta, self.n_bits, out=buf).sub_(flat).pow_(2).mean()
            if best_err is None:
                best_err, best_delta = err, delta
            else:  # strict: ties keep the earlier candidate; no host read of the errors
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_delta = torch.where(better, delta, best_delta)
        self.delta = best_delta.detach().reshape(()).clone()
