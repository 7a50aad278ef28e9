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
  sampled-threshold prefilter (both tails in one pass) for the single huge row of a per-tensor
  quantizer on CPU;
* on CPU, fake quantization and the candidate errors of large tensors run piece by piece in cache
  (``CPU_PIECE_NUMEL``), and the log-√2 quantizer lifts the x/Δ it drops anyway above the
  denormal range, where ``log2`` is slow;
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
#: A single row of at least this many values is prefiltered before ``topk`` (see ``_tails_topk``).
PREFILTER_MIN_N = 1 << 18
#: Strides of the sample that sets the prefilter thresholds (primes, so that a stride cycles through
#: channel layouts): the smallest one giving at most ``SAMPLE_MAX`` sampled values is used.
SAMPLE_STRIDES: tuple[int, ...] = (61, 127, 251, 509, 1021, 2039, 4093)
SAMPLE_MAX = 1 << 18


#: Elementwise chains (fake quantization, candidate errors) on a contiguous CPU tensor of at least
#: twice this many elements run piece by piece, each piece small enough to stay in cache: 4-10
#: memory passes become one read and one write (same values: the ops are elementwise; reductions
#: such as the candidate error's mean run afterwards over the whole result, as before).
CPU_PIECE_NUMEL = 1 << 20


def _tails_topk(x: torch.Tensor, k_upper: int, k_lower: int,
                dim: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(topk(x, k_upper, dim, largest=True), topk(x, k_lower, dim, largest=False))`` values,
    sorted, faster for one huge row on CPU; a tail with ``k == 0`` is not computed (None).

    On CPU ``topk`` works row by row on one thread and copies the whole row into (value, index)
    pairs, so a per-tensor quantizer (one row of millions of values) pays for the whole row, once
    per tail. For such a row:

    1. a threshold per tail is read from a strided sample (every ``s``-th value, ``s`` a prime from
       ``SAMPLE_STRIDES`` so that it cycles through channel layouts) so that about 1.25 ``k`` values
       of the row (plus four standard deviations of the sample) lie beyond it;
    2. the values strictly beyond either threshold are gathered by one comparison and one boolean
       index (multi-threaded, about three memory passes for both tails; NaNs count as beyond the
       upper threshold);
    3. for each tail, if at least ``k`` candidates lie strictly beyond its threshold, the ``k``
       extreme candidates are exactly the ``k`` extreme values of the row (same values, same
       order). If fewer, but the row holds enough copies of the threshold ``t`` to fill the rest
       (ties, e.g. the zeros after a ReLU), the result is those values followed by copies of ``t``
       (equal values: what ``topk`` returns). Otherwise the sample was unlucky and the plain
       ``topk`` runs for that tail.

    NaNs count as largest, as in ``topk``/``kthvalue``.

    Args:
        x: floating tensor ``(..., N, ...)``.
        k_upper / k_lower: number of largest / smallest values along ``dim`` (0: skip the tail).
        dim: the reduced dimension.
    Returns:
        ``(top, bottom)``: ``x``'s shape with ``dim`` of size ``k_upper`` / ``k_lower`` (or None).
    """
    n = x.shape[dim]

    def plain(k: int, largest: bool) -> Optional[torch.Tensor]:
        return torch.topk(x, k, dim=dim, largest=largest, sorted=True).values if k else None

    if (x.device.type != "cpu" or x.numel() != n or n < PREFILTER_MIN_N
            or max(k_upper, k_lower) * 32 > n or not (k_upper or k_lower)):
        return plain(k_upper, True), plain(k_lower, False)
    flat = x.reshape(-1)
    stride = next((s for s in SAMPLE_STRIDES if n // s <= SAMPLE_MAX), SAMPLE_STRIDES[-1])
    sample = flat[stride // 2::stride].contiguous()
    m = sample.numel()

    def threshold(k: int, largest: bool) -> Optional[torch.Tensor]:
        if not k:
            return None
        expected = k * m / n  # rank of the k-th extreme value inside the sample
        k_s = min(m, int(math.ceil(1.25 * expected + 4.0 * math.sqrt(expected) + 8)))
        return torch.topk(sample, k_s, largest=largest, sorted=True).values[-1]

    t_hi, t_lo = threshold(k_upper, True), threshold(k_lower, False)
    if any(t is not None and bool(torch.isnan(t)) for t in (t_hi, t_lo)):
        return plain(k_upper, True), plain(k_lower, False)  # a NaN threshold selects nothing useful

    def beyond(piece: torch.Tensor) -> torch.Tensor:
        """Values of ``piece`` strictly beyond a threshold (NaN is never inside: it counts as largest)."""
        inside = torch.le(piece, t_hi) if t_hi is not None else None
        if t_lo is not None:
            inside = torch.ge(piece, t_lo) if inside is None else inside.logical_and_(torch.ge(piece, t_lo))
        return piece[inside.logical_not_()]

    # piece by piece (cache-resident masks), in row order
    candidates = torch.cat([beyond(flat[i:i + CPU_PIECE_NUMEL]) for i in range(0, n, CPU_PIECE_NUMEL)])

    def tail(t: Optional[torch.Tensor], k: int, largest: bool) -> Optional[torch.Tensor]:
        if t is None:
            return None
        n_strict = int((torch.le(candidates, t).logical_not_() if largest else torch.lt(candidates, t)).sum())
        if n_strict >= k:
            return torch.topk(candidates, k, largest=largest, sorted=True).values
        if n_strict + int(torch.eq(flat, t).sum()) >= k:  # the k-th extreme value is t itself
            head = torch.topk(candidates, n_strict, largest=largest, sorted=True).values
            return torch.cat([head, t.reshape(1).expand(k - n_strict)])
        return torch.topk(flat, k, largest=largest, sorted=True).values  # unlucky sample

    shape = list(x.shape)
    out = []
    for t, k, largest in ((t_hi, k_upper, True), (t_lo, k_lower, False)):
        values = tail(t, k, largest)
        shape[dim] = k
        out.append(None if values is None else values.reshape(shape))
    return out[0], out[1]


def _tail_topk(x: torch.Tensor, k: int, dim: int, largest: bool) -> torch.Tensor:
    """``torch.topk(x, k, dim, largest, sorted=True).values`` of one tail (see :func:`_tails_topk`)."""
    top, bottom = _tails_topk(x, k if largest else 0, 0 if largest else k, dim)
    return top if largest else bottom


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

    top, bottom = _tails_topk(x, k_upper if upper and use_topk(k_upper) else 0,
                              k_lower if lower and use_topk(k_lower) else 0, dim)

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


def _in_pieces(fn: Callable[..., torch.Tensor], x: torch.Tensor, params: Sequence[torch.Tensor],
               out: Optional[torch.Tensor] = None, sq_err: bool = False) -> Optional[torch.Tensor]:
    """``fn(x_piece, *param_pieces, out=out_piece)`` over cache-sized pieces of ``x``, then
    ``(out - x)²`` in place per piece when ``sq_err``; returns ``out`` (allocated like ``x`` if None).

    ``fn`` must be elementwise with ``params`` broadcast to ``x``. Returns None (the caller runs the
    whole-tensor ops) unless ``x`` is a plain contiguous CPU tensor of at least
    ``2 * CPU_PIECE_NUMEL`` elements, outside autograd, with ``params`` (and ``out``) of its dtype
    and each param either one element or sliceable along ``x``'s first dimension, and not inside
    ``torch.compile`` (which fuses the ops into one pass itself).
    """
    if (torch.compiler.is_compiling() or type(x) is not torch.Tensor or x.device.type != "cpu"
            or x.dim() == 0 or x.numel() < 2 * CPU_PIECE_NUMEL or not x.is_contiguous()
            or (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)))
            or any(type(p) is not torch.Tensor or p.dtype != x.dtype or p.device != x.device
                   or p.dim() > x.dim() for p in params)
            or (out is not None and (out.shape != x.shape or out.dtype != x.dtype
                                     or not out.is_contiguous()))):
        return None
    if all(p.numel() == 1 for p in params):  # per tensor: any cut of the flat tensor
        xs, ps = x.view(-1), [p.reshape(()) for p in params]
        step, sliced = CPU_PIECE_NUMEL, [False] * len(ps)
    else:  # cut along the first dimension; a param spanning it is cut alike
        ps = [p.reshape([1] * (x.dim() - p.dim()) + list(p.shape)) for p in params]
        if x.shape[0] < 2 or any(s not in (1, n) for p in ps for s, n in zip(p.shape, x.shape)):
            return None
        xs, step = x, max(1, CPU_PIECE_NUMEL // (x.numel() // x.shape[0]))
        sliced = [p.shape[0] == x.shape[0] != 1 for p in ps]
    out = torch.empty_like(x) if out is None else out
    os_ = out.view(xs.shape)
    for i in range(0, xs.shape[0], step):
        xp, op = xs[i:i + step], os_[i:i + step]
        fn(xp, *[p[i:i + step] if s else p for p, s in zip(ps, sliced)], out=op)
        if sq_err:
            op.sub_(xp).pow_(2)
    return out


def _elementwise(fn: Callable[..., torch.Tensor], x: torch.Tensor, params: Sequence[torch.Tensor],
                 out: Optional[torch.Tensor] = None, sq_err: bool = False) -> torch.Tensor:
    """``fn(x, *params, out=out)`` (or ``(that - x)²`` when ``sq_err``): piece by piece where
    :func:`_in_pieces` takes ``x``, else on the whole tensor. Same values either way."""
    done = _in_pieces(fn, x, params, out, sq_err)
    if done is not None:
        return done
    q = fn(x, *params, out=out)
    return q.sub_(x).pow_(2) if sq_err else q


def _uniform_fq(x: torch.Tensor, delta: torch.Tensor, zero_point: torch.Tensor, n_bits: int,
                out: Optional[torch.Tensor], zero_point_number: Optional[float]) -> torch.Tensor:
    """The whole-tensor ops of :func:`uniform_fake_quant`."""
    q = torch.div(x, delta, out=out).round_() if out is not None else torch.div(x, delta).round_()
    q_max = 2 ** n_bits - 1
    if zero_point_number is not None:
        return q.clamp_(-zero_point_number, q_max - zero_point_number).mul_(delta)
    return q.clamp_(-zero_point, q_max - zero_point).mul_(delta)


def uniform_fake_quant(x: torch.Tensor, delta: torch.Tensor, zero_point: torch.Tensor,
                       n_bits: int, out: Optional[torch.Tensor] = None,
                       zero_point_number: Optional[float] = None, sq_err: bool = False) -> torch.Tensor:
    """``(clamp(round(x/Δ) + z, 0, 2^b-1) - z)·Δ``; ``delta``/``zero_point`` broadcast to ``x``.

    Evaluated as ``clamp(round(x/Δ), -z, 2^b-1-z)·Δ`` with in-place ops (same values, fewer passes),
    piece by piece on large CPU tensors (``CPU_PIECE_NUMEL``; same values).
    ``out``: optional preallocated result tensor of the broadcast shape (reused buffers).
    ``zero_point_number``: ``float(zero_point)`` of a one-element zero point, already on the host
    (the quantizer caches it): the clamp then takes Python-number bounds, whose vectorised CPU
    kernel is about 4x faster than broadcast tensor bounds. The bounds are the same values: the
    exact ``q_max - z`` rounded once to the tensor dtype, which is what the float subtraction gives.
    ``sq_err``: return the elementwise squared error ``(x̂ - x)²`` instead of ``x̂`` (same ops as
    ``(x̂ - x).pow(2)``; the calibration's candidate errors).
    """
    def fn(xp: torch.Tensor, d: torch.Tensor, z: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
        return _uniform_fq(xp, d, z, n_bits, out, zero_point_number)

    return _elementwise(fn, x, (delta, zero_point), out, sq_err)


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
    def _limited(cls, compiled: Callable) -> Callable:
        def fn(*args):
            # every (rank, stride, view-base) pattern is one graph: Swin-T needs more than
            # dynamo's default limit of 8, past which the calls would silently run uncompiled;
            # a model needing more than RECOMPILE_LIMIT raises instead of slowing down silently
            with torch._dynamo.config.patch(recompile_limit=cls.RECOMPILE_LIMIT,
                                            fail_on_recompile_limit_hit=True):
                return compiled(*args)
        return fn

    @classmethod
    def get(cls, name: str) -> Callable:
        """The fused kernel ``name`` (``uniform``, ``log2`` and their ``_sq_err`` forms)."""
        fn = cls._fns.get(name)
        if fn is None:
            base = {"uniform": _uniform_fake_quant_pure, "log2": _log_sqrt2_fake_quant_pure,
                    "uniform_sq_err": _uniform_sq_err_pure, "log2_sq_err": _log_sqrt2_sq_err_pure}[name]
            fn = cls._limited(torch.compile(base, dynamic=True))
            cls._fns[name] = fn
        return fn


def _fused_layout(x: torch.Tensor, param: torch.Tensor) -> Optional[tuple[torch.Tensor, list[int]]]:
    """``x`` as the fused kernel takes it and the matching shape of its (Δ, z), or None (eager ops).

    Few layouts means few compiled kernels: a contiguous input is seen as ``(N,)`` with a scalar
    (per tensor), ``(N, C)`` with ``(1, C)`` (per channel of the last dim) or ``(C, N)`` with
    ``(C, 1)`` (per channel of dim 0). A non-contiguous input (e.g. ``kᵀ`` or ``v`` in attention,
    views into the qkv output) is passed as it is, per tensor only: inductor returns the strides
    eager PyTorch would (``keep_output_stride``), so the next matmul sees the same layout.
    Parameters go to the eager ops (weights are quantized once and cached). None inside a
    ``torch.compile`` of the model, which fuses the eager ops itself.
    """
    if (torch.compiler.is_compiling() or type(x) is not torch.Tensor or x.numel() == 0
            or param.dim() > x.dim()):
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
        calibration / load time, so a calibrated forward reads nothing from a tensor. None inside
        ``torch.compile`` (the fused kernel takes tensor bounds: the same values)."""
        if torch.compiler.is_compiling():
            return None
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
                                         zero_point_number=_cpu_number(zero), sq_err=True).mean(dim=1)
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


#: Per bit width b ≤ 7: 2^-(2^(b-1)+1), an x/Δ the log-√2 quantizer drops (q = 2^b + 2); see
#: :func:`log_sqrt2_fake_quant` (for b = 8 it would be a denormal, so no floor is used).
_LOG_FLOOR: dict[int, float] = {b: 2.0 ** -(2 ** (b - 1) + 1) for b in range(2, 8)}


def _log_sqrt2_fq(x: torch.Tensor, delta: torch.Tensor, n_bits: int,
                  out: Optional[torch.Tensor]) -> torch.Tensor:
    """The whole-tensor ops of :func:`log_sqrt2_fake_quant`."""
    q = torch.div(x, delta, out=out) if out is not None else torch.div(x, delta)
    if q.device.type == "cpu" and n_bits <= 7:
        # CPU log2 takes a slow path ~10x slower per element on 0 and denormals (the masked entries of
        # shifted-window attention). Every x/Δ below LOG_FLOOR[b] = 2^-(2^(b-1)+1) is dropped anyway
        # (q ≥ 2^b + 2), so raising it to that floor, a normal number whose log2 is exact, changes no
        # result (NaN stays NaN; x must be non-negative).
        q = q.clamp_(min=_LOG_FLOOR[n_bits])
    q = q.log2_().mul_(-2.0).round_()
    # keep = clamp(2^b - q, 0, 1): 1 where kept, 0 where dropped (q ≥ 2^b, incl. +inf from x == 0),
    # exact for the integer-valued q; NaN stays NaN. ×keep instead of a boolean mask and
    # masked_fill_(dropped, 0): float ops only, several times faster on CPU, and the same bits for
    # Δ > 0 (a dropped value is Δ·2^(-q/2), finite and ≥ 0, times 0 = +0.0; kept ones times 1)
    keep = torch.rsub(q, 2 ** n_bits).clamp_(0.0, 1.0)
    return q.clamp_(min=0.0).mul_(-0.5).exp2_().mul_(delta).mul_(keep)


def log_sqrt2_fake_quant(x: torch.Tensor, delta: torch.Tensor, n_bits: int,
                         out: Optional[torch.Tensor] = None, sq_err: bool = False) -> torch.Tensor:
    """``q = round(-2·log2(x/Δ))``; ``q ≥ 2^b`` → 0, else ``x̂ = Δ·2^(-clamp(q, 0, 2^b-1)/2)``.

    Zeros (and underflow) map to 0; values above Δ map to Δ. ``x`` must be non-negative.
    ``out``: optional preallocated result tensor (reused buffers). ``sq_err``: return ``(x̂ - x)²``
    instead (the calibration's candidate errors). Large CPU tensors run piece by piece
    (``CPU_PIECE_NUMEL``; same values).
    """
    def fn(xp: torch.Tensor, d: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
        return _log_sqrt2_fq(xp, d, n_bits, out)

    return _elementwise(fn, x, (delta,), out, sq_err)


def _log_sqrt2_fake_quant_pure(x: torch.Tensor, delta: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Out-of-place form of :func:`log_sqrt2_fake_quant` for ``torch.compile`` (the same values, tested bit
    for bit; a ``where`` for the dropped values).

    On CPU (b ≤ 7) ``x`` is first raised to ``LOG_FLOOR[b]·Δ``: the compiled division and ``log2``
    take slow paths on zeros and denormals (Swin's masked attention), and every ``x`` below that
    is dropped either way (``x/Δ`` lands within an ulp of the floor, ``q`` rounds to ``2^b + 2``).
    A masked Swin-T map of 14.7 M values: 52 → 27 ms on the 2-core host (dense maps unchanged).
    """
    if x.device.type == "cpu" and n_bits <= 7:
        x = torch.clamp(x, min=_LOG_FLOOR[n_bits] * delta)
    q = torch.round(torch.log2(x / delta) * -2.0)
    value = torch.exp2(torch.clamp(q, min=0.0) * -0.5) * delta
    return torch.where(q >= 2 ** n_bits, torch.zeros_like(value), value)


def _log_sqrt2_sq_err_pure(x: torch.Tensor, delta: torch.Tensor, n_bits: int) -> torch.Tensor:
    """``(fq_log√2(x) - x)²`` elementwise, for ``torch.compile``."""
    return (_log_sqrt2_fake_quant_pure(x, delta, n_bits) - x).pow(2)


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
                err = log_sqrt2_fake_quant(flat, delta, self.n_bits, out=buf, sq_err=True).mean()
            if best_err is None:
                best_err, best_delta = err, delta
            else:  # strict: ties keep the earlier candidate; no host read of the errors
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_delta = torch.where(better, delta, best_delta)
        self.delta = best_delta.detach().reshape(()).clone()
