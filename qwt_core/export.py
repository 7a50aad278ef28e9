"""Real INT8 inference: export a RepQ-ViT (+ QwT) fake-quant model to ONNX QDQ for onnxruntime.

The fake-quant model computes ``Q_a(x) · Q_w(W) + b`` in fp32. The exported graph says the same thing
in the QDQ form that onnxruntime's graph optimiser turns into integer kernels:

* every quantized Linear / Conv input: ``QuantizeLinear → [Clip] → DequantizeLinear`` (uint8, per
  tensor, integer zero point; below 8 bits the ``Clip`` runs on the uint8 values, so the grid is
  exactly the ``2^b`` levels of the fake quantizer and a ``Conv → Relu → Q`` chain still fuses);
* every quantized weight: an integer initializer ``→ DequantizeLinear`` (per output channel scale and
  integer zero point holding exactly the integers of the weight quantizer's grid);
* onnxruntime fuses ``DQ(x) → MatMul ← DQ(W)`` into ``MatMulIntegerToFloat`` (int32 accumulation,
  one float scale); the Linear bias stays the fp32 bias of the fake-quant model, added with a shape
  that onnxruntime's earlier MatMul+Add→Gemm fusion does not take (that fusion would leave an fp32
  Gemm). ``DQ(x) → Conv ← DQ(W) → [BatchNorm] → [Relu] → Q`` becomes ``QLinearConv``: a following
  inference BatchNorm (ResNet's published recipe keeps them) is folded into the per-channel weight
  scale and an int32 bias (scale ``s_x·s_w``). ``q·kᵀ`` of attention (uniform on both operands) runs
  as an integer matmul too.

What has no integer form stays float, with the arithmetic of the fake-quant model: the log-√2
quantizer of the attention probabilities (computed from ``log_softmax`` of the scores, with ``exp``
instead of ``log2``/``exp2``, which onnxruntime runs element by element ~100× slower) and the
``attn·v`` product, LayerNorm, GELU, residual adds, and a conv whose output is not requantized
(ResNet ``conv3`` / downsample / stem, a ViT patch embedding) or whose weights ``QLinearConv`` cannot
hold exactly (it needs one zero point for all filters; W8 asymmetric per-channel weights do not
fit). :func:`export_onnx` reports, layer by layer, what runs integer and why not;
:func:`integer_op_report` checks it on the graph onnxruntime actually runs.

Exactness on x86 without VNNI: onnxruntime's u8×s8 kernels add pairs of products in int16 and
saturate when ``|w_int| > 64``. ``weight_dtype="portable"`` therefore stores weights as int8 only
when every integer is within ±64 (W ≤ 6 bits, or a centred W7 channel) and as uint8 (u8×u8 kernels,
no saturation) otherwise, so the graph reproduces the fake-quant arithmetic on every x86 CPU.
``weight_dtype="int8"`` uses int8 throughout (exact on CPUs with AVX-512 VNNI, AVX-VNNI or AMX, and
faster there). ``weight_dtype="auto"`` (default) picks ``"int8"`` when the exporting CPU has one of
those instructions and ``"portable"`` otherwise; the report records the choice and the flags.

Public API: :func:`export_onnx`, :func:`export_fp_onnx`, :func:`quantize_compensations`; the checks
(:func:`integer_op_report`, :func:`compare_onnx`) live in :mod:`qwt_core.onnx_check`. Command line:
``python -m cls_repq_vit.export_onnx SAVED.pt OUT.onnx`` (a model saved by ``save_quantized``).
"""
from __future__ import annotations

import contextlib
import copy
import io
import itertools
import math
import os
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .attention import QuantViTAttention, QuantWindowAttention, mask_scores
from .compensation import CompensatedBlock
from .onnx_check import (FLOAT_OPS, INTEGER_OPS, VNNI_FLAGS, ExportError, _Graph,  # noqa: F401 (re-exported)
                         compare_onnx, cpu_flags, has_vnni, integer_op_report)
from .config import ExportConfig
from .modules import QuantConv2d, QuantLayerMixin, QuantLinear, QuantMatMul
from .quantizers import (LogSqrt2Quantizer, UniformQuantizer, _LazyQuantizer)

Compensation = Literal["fp32", "int8"]
WeightDtype = Literal["auto", "int8", "portable"]

#: largest |int8 weight| that u8×s8 kernels without VNNI add in int16 without saturating
#: (2·255·64 = 32640 < 32767).
SAFE_INT8 = 64
OPSET = 18




# ----------------------------------------------------------------------------- custom torch ops
# Two ops carry the quantization through torch.export; their ONNX translations emit the QDQ nodes.
# Their eager implementations compute exactly what the fake quantizers compute.

def _register_custom_ops() -> None:
    """Register ``qwt_export::act_qdq`` and ``qwt_export::dequant`` once per process (this module may
    be imported twice, e.g. as ``__main__`` by ``python -m qwt_core.export``)."""
    try:
        torch.ops.qwt_export.act_qdq.default  # noqa: B018 - raises if not registered yet
        return
    except (AttributeError, RuntimeError):
        pass

    @torch.library.custom_op("qwt_export::act_qdq", mutates_args=())
    def act_qdq(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
        """``(clamp(round(x/s) + zp, qmin, qmax) - zp)·s``: uint8 Q/DQ, grid clipped to [qmin, qmax]."""
        q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
        return (q - zero_point) * scale

    @act_qdq.register_fake
    def _(x, scale, zero_point, qmin, qmax):
        return torch.empty_like(x)

    @torch.library.custom_op("qwt_export::dequant", mutates_args=())
    def dequant(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
        """``(q - zp)·s`` per slice of ``axis`` (an integer initializer read through DequantizeLinear)."""
        shape = [1] * q.dim()
        shape[axis] = -1
        return (q.to(torch.float32) - zero_point.to(torch.float32).reshape(shape)) * scale.reshape(shape)

    @dequant.register_fake
    def _(q, scale, zero_point, axis):
        return torch.empty(q.shape, dtype=torch.float32, device=q.device)


_register_custom_ops()


def _translations() -> dict:
    """ONNX translations of the custom ops (onnxscript, imported only when exporting)."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    def act_qdq(x, scale: float, zero_point: int, qmin: int, qmax: int):
        s = op.Constant(value=ir.tensor(np.array(scale, dtype=np.float32)))
        z = op.Constant(value=ir.tensor(np.array(zero_point, dtype=np.uint8)))
        q = op.QuantizeLinear(x, s, z)
        if qmin > 0 or qmax < 255:
            q = op.Clip(q, op.Constant(value=ir.tensor(np.array(qmin, dtype=np.uint8))),
                        op.Constant(value=ir.tensor(np.array(qmax, dtype=np.uint8))))
        return op.DequantizeLinear(q, s, z)

    def dequant(q, scale, zero_point, axis: int):
        return op.DequantizeLinear(q, scale, zero_point, axis=axis)

    return {torch.ops.qwt_export.act_qdq.default: act_qdq,
            torch.ops.qwt_export.dequant.default: dequant}


# ----------------------------------------------------------------------------- quantizer specs
@dataclass(frozen=True)
class ActSpec:
    """A per-tensor uniform activation quantizer as uint8 Q/DQ.

    ``x̂ = (clamp(round(x/scale) + zero_point, qmin, qmax) - zero_point)·scale``; the fake quantizer's
    ``(Δ, z, b)`` map to ``scale = Δ``, ``qmin = zero_point - z``, ``qmax = qmin + 2^b - 1``.
    """

    scale: float
    zero_point: int
    qmin: int
    qmax: int
    n_bits: int
    z: float                      # the quantizer's zero point as calibrated
    rounded: bool = False         # z was fractional and has been rounded


def act_spec(name: str, quant: _LazyQuantizer, round_zero_points: bool) -> ActSpec:
    """The uint8 Q/DQ form of the calibrated per-tensor quantizer ``quant`` of layer ``name``.

    Raises :class:`ExportError` (uncalibrated, per channel, fractional zero point without
    ``round_zero_points``, grid that does not fit uint8).
    """
    if not isinstance(quant, UniformQuantizer):
        raise ExportError(f"{name}: activation quantizer {type(quant).__name__} has no uint8 form; "
                          "only uniform quantizers export as QuantizeLinear")
    if not quant.is_inited:
        raise ExportError(f"{name}: activation quantizer is not calibrated; run the RepQ-ViT "
                          "calibration (qwt_core.calibrate) before exporting")
    if quant.delta.numel() != 1:
        raise ExportError(f"{name}: activation quantizer is per channel ({quant.delta.numel()} scales); "
                          "finish the RepQ-ViT calibration (LayerNorm reparameterization) so it is "
                          "per tensor: onnxruntime's integer kernels need one activation scale")
    delta = float(quant.delta.reshape(()))
    z = float(quant.zero_point.reshape(()))
    if not (math.isfinite(delta) and delta > 0):
        raise ExportError(f"{name}: activation scale {delta} is not a positive number")
    rounded = False
    if z != round(z):
        if not round_zero_points:
            raise ExportError(
                f"{name}: activation zero point {z:.4f} is fractional (RepQ-ViT's reparameterized "
                "LayerNorm input); uint8 needs an integer one: recalibrate with --integer_zero_point "
                "(integer_zero_point=True), or export with --round_zero_points (round_zero_points=True, "
                "which shifts this grid by up to half a step; measure it with --eval_onnx)")
        rounded = True
    zi = int(round(z))
    levels = 2 ** quant.n_bits - 1
    # zero point zp must put the integers [-z, levels - z] inside [0, 255]
    lo, hi = max(0, zi), min(255, zi + 255 - levels)
    if lo > hi:
        raise ExportError(f"{name}: {quant.n_bits}-bit activation grid with zero point {zi} does not fit "
                          "uint8 (the calibrated range does not contain 0); recalibrate this layer")
    zp = min(max(zi, lo), hi)
    return ActSpec(scale=float(np.float32(delta)), zero_point=zp, qmin=zp - zi, qmax=zp - zi + levels,
                   n_bits=quant.n_bits, z=z, rounded=rounded)


def weight_ints(name: str, weight: torch.Tensor, quant: _LazyQuantizer
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ints, scale)``: the weight quantizer's integers ``clamp(round(W/Δ), -z, 2^b-1-z)`` (int64,
    shape of ``weight``) and the per-output-channel scale ``Δ`` (float32, ``(C_out,)``).

    ``ints · Δ`` is bit for bit the fake-quant weight.
    """
    if not isinstance(quant, UniformQuantizer):
        raise ExportError(f"{name}: weight quantizer {type(quant).__name__} is not uniform; "
                          "only uniform weight quantizers have an integer form")
    if not quant.is_inited:
        raise ExportError(f"{name}: weight quantizer is not calibrated; run the calibration "
                          "(qwt_core.calibrate) before exporting")
    c_out = weight.shape[0]
    delta, zero = quant.delta.detach().float(), quant.zero_point.detach().float()
    if delta.numel() not in (1, c_out) or (quant.channel_wise and quant.channel_dim not in (0, -weight.dim())):
        raise ExportError(f"{name}: weight quantizer must be per output channel (dim 0) or per tensor")
    if bool((zero != torch.round(zero)).any()):
        raise ExportError(f"{name}: weight zero point is fractional; recalibrate the weight quantizer")
    shape = [-1] + [1] * (weight.dim() - 1)
    d, z = delta.reshape(-1).expand(c_out).reshape(shape), zero.reshape(-1).expand(c_out).reshape(shape)
    levels = 2 ** quant.n_bits - 1
    w = weight.detach().float()
    ints = torch.round(torch.div(w, d)).clamp(-z, levels - z)
    if not bool(torch.equal(ints * d, quant(w))):
        raise ExportError(f"{name}: integer weights do not reproduce the fake-quant weights")
    return ints.to(torch.int64), d.reshape(-1).clone()


def _channel_ranges(ints: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = ints.reshape(ints.shape[0], -1)
    return flat.amin(1), flat.amax(1)


def linear_weight_storage(ints: torch.Tensor, weight_dtype: WeightDtype
                          ) -> Optional[tuple[torch.dtype, torch.Tensor]]:
    """``(dtype, zero point per output channel)`` holding the integers ``ints`` ``(C_out, ...)`` exactly.

    The stored value is ``ints + zp``. ``portable`` (and ``auto`` at this level): int8 if every channel
    fits ``[-64, 64]`` (no u8×s8 saturation without VNNI; zero point 0 when the channel allows), else
    uint8 (u8×u8). ``int8``: int8 ``[-128, 127]``. None when nothing fits.
    """
    lo, hi = _channel_ranges(ints)
    if weight_dtype in ("auto", "portable"):
        options = [(torch.int8, -SAFE_INT8, SAFE_INT8, -128, 127), (torch.uint8, 0, 255, 0, 255)]
    else:
        options = [(torch.int8, -128, 127, -128, 127)]
    for dtype, vlo, vhi, tlo, thi in options:
        zlo, zhi = (vlo - lo).clamp(min=tlo), (vhi - hi).clamp(max=thi)
        if bool((zlo <= zhi).all()):
            prefer = torch.zeros_like(lo) if dtype == torch.int8 else -lo
            return dtype, torch.minimum(torch.maximum(prefer, zlo), zhi)
    return None


def conv_weight_storage(ints: torch.Tensor, weight_dtype: WeightDtype) -> Optional[torch.dtype]:
    """int8 with zero point 0 if QLinearConv can hold ``ints`` exactly, else None.

    QLinearConv needs one zero point for all filters; the integers must fit ±64 (``auto``, no
    saturation without VNNI) or ±127 (``int8``; symmetric so a BatchNorm sign flip stays in range).
    """
    bound = SAFE_INT8 if weight_dtype in ("auto", "portable") else 127
    return torch.int8 if int(ints.abs().max()) <= bound else None


# ----------------------------------------------------------------------------- export modules
class _ActQDQ(nn.Module):
    def __init__(self, spec: ActSpec) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        return torch.ops.qwt_export.act_qdq(x, s.scale, s.zero_point, s.qmin, s.qmax)


class _LogSqrt2(nn.Module):
    """The log-√2 fake quantizer as float ops.

    Inside the ViT / Swin attention modules :meth:`from_logits` is used (fast in onnxruntime). A
    :class:`QuantMatMul` used elsewhere gets :meth:`forward`: ``k = clamp(round(-2·log2(x/Δ)), 0,
    2^b)``, ``x̂ = table[k]`` with ``table[k] = Δ·2^(-k/2)`` and ``table[2^b] = 0`` (the dropped
    values), bit for bit :func:`log_sqrt2_fake_quant`.
    """

    def __init__(self, quant: LogSqrt2Quantizer) -> None:
        super().__init__()
        self.n_bits = quant.n_bits
        delta = quant.delta.detach().float().clone()
        self.register_buffer("delta", delta)
        levels = torch.arange(2 ** self.n_bits, dtype=torch.float32)
        table = torch.cat([levels.mul(-0.5).exp2().mul(delta), torch.zeros(1)])
        self.register_buffer("table", table)

    def from_logits(self, scores: torch.Tensor) -> torch.Tensor:
        """``Q_log√2(softmax(scores))`` from the attention logits, with vectorised ops only:
        ``k = round(-2·log_softmax/ln 2 + 2·log2 Δ)``, ``x̂ = Δ·exp(-k·ln2/2)`` (``k`` clipped to
        ``[0, 2^b]``; ``k = 2^b``, the dropped values, gets ``exp(-1e4) = 0``; at 8 bits the dropped
        values are left at ``Δ·2^(-k/2) <= 2^-128·Δ``, a float denormal). Same levels as the
        fake quantizer up to float rounding (``log_softmax`` instead of ``log2(softmax)``, ``exp``
        instead of ``exp2``); onnxruntime runs Log / Pow / Where element by element, ~100× slower."""
        levels = 2 ** self.n_bits
        log2_delta = float(torch.log2(self.delta))
        q = torch.round(torch.log_softmax(scores, dim=-1) * (-2.0 / math.log(2.0)) + 2.0 * log2_delta)
        if self.n_bits == 8:
            # k >= 256 gives Δ·2^(-k/2) <= 2^-128·Δ, below the smallest normal float: no mask needed
            return torch.exp(torch.relu(q) * (-0.5 * math.log(2.0))) * self.delta
        q = q.clamp(0, levels)
        e = q * (-0.5 * math.log(2.0)) - 1e4 * torch.relu(q - (levels - 1))
        return torch.exp(e) * self.delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.div(x, self.delta).log2().mul(-2.0).round()
        idx = q.clamp(0, 2 ** self.n_bits).to(torch.int64)
        # index_select exports as one Gather (plain indexing would export as the slower GatherND)
        return torch.index_select(self.table, 0, idx.reshape(-1)).reshape(idx.shape)


class _IntWeights(nn.Module):
    """Integer weight / bias buffers read through the ``dequant`` op (DequantizeLinear in ONNX).

    Buffers: ``qwt_wint`` (int8/uint8, ONNX layout), ``qwt_wscale`` / ``qwt_wzp`` (per output
    channel), ``qwt_bint`` / ``qwt_bscale`` / ``qwt_bzp`` (int32 bias at scale ``s_x·s_w``).
    """

    has_bias: bool = False

    def _set_weight(self, stored: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor,
                    dtype: torch.dtype) -> None:
        self.register_buffer("qwt_wint", stored.to(dtype))
        self.register_buffer("qwt_wscale", scale.float().clone())
        self.register_buffer("qwt_wzp", zp.to(dtype))

    def _set_bias(self, ints: torch.Tensor, bias: Optional[torch.Tensor], act_scale: float) -> None:
        """int32 bias at scale ``s_x·s_w`` (``ints`` ``(C_out, ...)``). An all-zero weight channel
        takes a weight scale at which its bias is fine in int32 (its weights are 0 at any scale)."""
        self.has_bias = bias is not None
        if bias is None:
            return
        b = bias.detach().double()
        s_x = torch.tensor(act_scale, dtype=torch.float32)
        zero_rows = (ints.reshape(ints.shape[0], -1) == 0).all(1)
        fine = (b.abs() / 2.0 ** 24 / float(s_x)).float()
        self.qwt_wscale.copy_(torch.where(zero_rows & (self.qwt_wscale < fine), fine, self.qwt_wscale))
        b_scale = s_x * self.qwt_wscale
        b_int = torch.round(b / b_scale.double())
        bad = b_int.abs() > 2 ** 31 - 1
        if bool(bad.any()):
            c = int(bad.nonzero()[0])
            raise ExportError(f"bias of output channel {c} ({float(b[c]):.4g}) does not fit int32 at "
                              f"scale s_x·s_w = {float(b_scale[c]):.3g}")
        self.register_buffer("qwt_bint", b_int.to(torch.int32))
        self.register_buffer("qwt_bscale", b_scale.float())
        self.register_buffer("qwt_bzp", torch.zeros(b_int.shape, dtype=torch.int32))
        self.qwt_bias_fp32 = bias.detach().float().clone()  # plain attribute: for an fp32 fallback

    def int_weight(self, axis: int) -> torch.Tensor:
        return torch.ops.qwt_export.dequant(self.qwt_wint, self.qwt_wscale, self.qwt_wzp, axis)

    def int_bias(self) -> Optional[torch.Tensor]:
        if not self.has_bias:
            return None
        return torch.ops.qwt_export.dequant(self.qwt_bint, self.qwt_bscale, self.qwt_bzp, 0)


class _ExportLinear(_IntWeights):
    """``act(x) @ W + b`` with W either integer (DQ) or fp32; x ``(..., K)`` → ``(..., N)``.

    The integer form keeps the bias fp32 (exactly the fake-quant bias) and adds it with shape
    ``(1, ..., 1, N)`` of rank >= 3 (a 2-D input is unsqueezed first): onnxruntime's MatMul+Add→Gemm
    fusion, which runs before the QDQ fusion and would leave an fp32 Gemm, does not take that shape,
    so ``DQ → MatMul ← DQ`` becomes ``MatMulIntegerToFloat`` followed by the fp32 bias Add.
    """

    def __init__(self, layer: nn.Linear, act: Optional[ActSpec], w_ints: Optional[torch.Tensor],
                 w_scale: Optional[torch.Tensor], storage: Optional[tuple[torch.dtype, torch.Tensor]],
                 w_float: torch.Tensor) -> None:
        super().__init__()
        self.act = _ActQDQ(act) if act is not None else None
        self.integer = storage is not None
        self.qwt_bias = None if layer.bias is None else nn.Parameter(
            layer.bias.detach().float().clone(), requires_grad=False)
        if self.integer:
            dtype, zp = storage
            # ONNX MatMul weight is (K, N): one scale / zero point per column (axis 1)
            self._set_weight(w_ints.T + zp[None, :], w_scale, zp, dtype)
        else:
            self.qwt_weight = nn.Parameter(w_float.detach().T.contiguous().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.integer:
            if self.act is not None:
                x = self.act(x)
            y = torch.matmul(x, self.qwt_weight)
            return y if self.qwt_bias is None else y + self.qwt_bias
        flat = x.dim() == 2
        if flat:
            x = x.unsqueeze(0)
        if self.act is not None:
            x = self.act(x)
        y = torch.matmul(x, self.int_weight(1))
        if self.qwt_bias is not None:
            y = y + self.qwt_bias.reshape([1] * (y.dim() - 1) + [-1])
        return y.squeeze(0) if flat else y


class _ExportConv(_IntWeights):
    """``conv(act(x), W) + b`` with W integer (DQ, int8, zero point 0) or fp32; NCHW."""

    def __init__(self, layer: nn.Conv2d, act: Optional[ActSpec], w_ints: Optional[torch.Tensor],
                 w_scale: Optional[torch.Tensor], dtype: Optional[torch.dtype],
                 w_float: torch.Tensor) -> None:
        super().__init__()
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ExportError("conv padding must be numeric zeros padding")
        self.stride, self.padding = tuple(layer.stride), tuple(layer.padding)
        self.dilation, self.groups = tuple(layer.dilation), layer.groups
        self.act = _ActQDQ(act) if act is not None else None
        self.integer = dtype is not None
        if self.integer:
            self._set_weight(w_ints, w_scale, torch.zeros(w_ints.shape[0], dtype=torch.int64), dtype)
            self._set_bias(w_ints, layer.bias, act.scale)
        else:
            self.qwt_weight = nn.Parameter(w_float.detach().clone(), requires_grad=False)
            self.qwt_bias = None if layer.bias is None else nn.Parameter(
                layer.bias.detach().float().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        if self.integer:
            w, b = self.int_weight(0), self.int_bias()
        else:
            w, b = self.qwt_weight, self.qwt_bias
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)


class _ExportMatMul(nn.Module):
    """``Q_a(a) @ Q_b(b)`` of attention: uniform operands as uint8 Q/DQ, log-√2 as float ops."""

    def __init__(self, layer: QuantMatMul, qa: Optional[nn.Module], qb: Optional[nn.Module]) -> None:
        super().__init__()
        self.use_act_quant = layer.use_act_quant
        self.use_weight_quant = layer.use_weight_quant
        self.qa, self.qb = qa, qb

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.qa is not None:
            a = self.qa(a)
        if self.qb is not None:
            b = self.qb(b)
        return a @ b


def _log_sqrt2_attention(attn: nn.Module) -> Optional[_LogSqrt2]:
    """The log-√2 quantizer of ``attn.matmul2`` (an :class:`_ExportMatMul`) if the fast path applies."""
    mm2 = getattr(attn, "matmul2", None)
    if isinstance(mm2, _ExportMatMul) and isinstance(mm2.qa, _LogSqrt2) and mm2.use_act_quant:
        return mm2.qa
    return None


class _ExportViTAttention(QuantViTAttention):
    """:class:`QuantViTAttention` whose ``softmax → Q_log√2`` runs as :meth:`_LogSqrt2.from_logits`."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        lq = _log_sqrt2_attention(self)
        if lq is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        scores = mask_scores(self.matmul1(q * self.scale, k.transpose(-2, -1)), attn_mask, is_causal)
        attn = self.attn_drop(lq.from_logits(scores))
        qb = self.matmul2.qb
        out = attn @ (qb(v) if qb is not None else v)
        out = out.transpose(1, 2).reshape(b, n, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(out)))


class _ExportWindowAttention(QuantWindowAttention):
    """:class:`QuantWindowAttention` whose ``softmax → Q_log√2`` runs as :meth:`_LogSqrt2.from_logits`."""

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        lq = _log_sqrt2_attention(self)
        if lq is None:
            return super().forward(x, mask)
        b_, n, _ = x.shape
        qkv = self.qkv(x).reshape(b_, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        scores = self.matmul1(q * self.scale, k.transpose(-2, -1)) + self._rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            scores = scores.view(-1, num_win, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            scores = scores.view(-1, self.num_heads, n, n)
        attn = self.attn_drop(lq.from_logits(scores))
        qb = self.matmul2.qb
        out = attn @ (qb(v) if qb is not None else v)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b_, n, -1)))


_EXPORT_ATTENTION = {QuantViTAttention: _ExportViTAttention, QuantWindowAttention: _ExportWindowAttention}


# ----------------------------------------------------------------------------- the plan
@dataclass
class LayerPlan:
    """How one quantized layer is exported (and, after the check, what onnxruntime runs)."""

    name: str
    kind: str                    # linear | conv | matmul
    w_bits: Optional[int]
    a_bits: Optional[int]
    integer: bool                # integer weights + uint8 input in the graph
    weight_dtype: Optional[str]  # int8 | uint8 | None (fp32 weights)
    reason: str = ""             # why it is not integer
    zero_point_rounded: Optional[str] = None   # "z 123.4 -> 123" when rounded
    ort_op: Optional[str] = None  # op reading its integer weight in onnxruntime's graph (linear/conv)


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote; ``reference`` is the fake-quant module the graph reproduces."""

    path: str
    compensation: str
    weight_dtype: str
    #: the storage policy used: ``int8`` or ``portable`` (``auto`` resolved for this CPU)
    weight_dtype_effective: str = ""
    #: the exporting CPU's integer dot-product flags (what ``auto`` decided by)
    cpu_flags: list[str] = field(default_factory=list)
    layers: list[LayerPlan] = field(default_factory=list)
    seconds: float = 0.0
    onnx_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    ort: Optional[dict[str, Any]] = None
    reference: Optional[nn.Module] = field(default=None, repr=False)

    @property
    def integer_layers(self) -> list[str]:
        return [p.name for p in self.layers if p.integer]

    @property
    def float_layers(self) -> list[str]:
        return [p.name for p in self.layers if not p.integer]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly (without ``reference``)."""
        d = {k: getattr(self, k) for k in ("path", "compensation", "weight_dtype", "weight_dtype_effective",
                                            "cpu_flags", "seconds", "onnx_bytes", "notes", "ort")}
        d["layers"] = [asdict(p) for p in self.layers]
        d["integer_layers"] = len(self.integer_layers)
        d["float_layers"] = len(self.float_layers)
        return d

    def summary(self) -> str:
        """A few lines: counts of integer / float layers, why, and onnxruntime's op counts."""
        kinds = Counter((p.kind, p.integer) for p in self.layers)
        parts = [f"{n} {k} {'integer' if i else 'float'}" for (k, i), n in sorted(kinds.items())]
        lines = [f"ONNX QDQ export -> {self.path} ({self.onnx_bytes / 1e6:.1f} MB, {self.seconds:.1f} s, "
                 f"compensation {self.compensation}, weights {self.weight_dtype_effective or self.weight_dtype}): " + ", ".join(parts)]
        reasons = Counter(p.reason for p in self.layers if not p.integer and p.reason)
        for reason, n in reasons.most_common():
            lines.append(f"  float ({n}): {reason}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        if self.ort is not None:
            lines.append("  onnxruntime runs: integer " + _fmt_counts(self.ort["integer_ops"]) +
                         "; float " + _fmt_counts(self.ort["float_ops"]))
            if self.ort["quantized_in_float"]:
                lines.append("  WARNING quantized layers left in float by onnxruntime: "
                             + ", ".join(self.ort["quantized_in_float"][:5]))
        return "\n".join(lines)


def _fmt_counts(c: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none"


def _check_supported(model: nn.Module) -> None:
    """Every quantizer must sit in a layer the export knows (else one clear error)."""
    known: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, QuantLayerMixin):
            if type(m) not in (QuantLinear, QuantConv2d, QuantMatMul):
                raise ExportError(f"{name}: unsupported quantized layer {type(m).__name__}; the ONNX export "
                                  "handles QuantLinear, QuantConv2d and QuantMatMul")
            known.update(id(q) for q in m.modules() if isinstance(q, _LazyQuantizer))
    for name, m in model.named_modules():
        if isinstance(m, _LazyQuantizer) and id(m) not in known:
            raise ExportError(f"{name}: quantizer outside a QuantLinear / QuantConv2d / QuantMatMul; "
                              "the ONNX export cannot place it")
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not isinstance(m, (QuantLinear, QuantConv2d)):
            continue  # float layers export as float ops
        if isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
            raise ExportError(f"{name}: conv padding {m.padding!r}/{m.padding_mode} is not supported; "
                              "use numeric zero padding")


def _input_act(name: str, layer: nn.Module, round_zp: bool) -> Optional[ActSpec]:
    q = layer.input_quantizer
    if not layer.use_act_quant or not q.enabled:
        return None
    return act_spec(name, q, round_zp)


def _weight(name: str, layer: nn.Module) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
    """``(ints, scale, float weight)``; ints/scale None when the weight is not quantized."""
    q = layer.weight_quantizer
    if not layer.use_weight_quant or not q.enabled:
        return None, None, layer.weight.detach().float()
    ints, scale = weight_ints(name, layer.weight, q)
    return ints, scale, (ints.float() * scale.reshape([-1] + [1] * (ints.dim() - 1)))


def _plan_start(name: str, layer: nn.Module, kind: str, round_zp: bool):
    """What a Linear and a Conv plan share: input spec, weight integers, the plan with the reason
    when either side is not quantized, and the rounded zero point. Returns
    ``(act, ints, scale, w_float, plan)``; ``act``/``ints`` None when not quantized."""
    act = _input_act(name, layer, round_zp)
    ints, scale, w_float = _weight(name, layer)
    plan = LayerPlan(name, kind, layer.weight_quantizer.n_bits if ints is not None else None,
                     act.n_bits if act is not None else None, False, None)
    if act is None:
        plan.reason = "input not quantized"
    elif ints is None:
        plan.reason = "weight not quantized"
    if act is not None and act.rounded:
        plan.zero_point_rounded = f"{act.z:.4f} -> {round(act.z)}"
    return act, ints, scale, w_float, plan


def _build(name: str, make: Callable[[], nn.Module]) -> nn.Module:
    """``make()``, with the layer name put in front of an ``ExportError``."""
    try:
        return make()
    except ExportError as exc:
        raise ExportError(f"{name}: {exc}") from None


def _plan_linear(name, layer, round_zp, weight_dtype) -> tuple[nn.Module, LayerPlan]:
    act, ints, scale, w_float, plan = _plan_start(name, layer, "linear", round_zp)
    storage = None
    if act is not None and ints is not None:
        storage = linear_weight_storage(ints, weight_dtype)
        if storage is None:
            plan.reason = f"weight integers do not fit {weight_dtype} storage"
    if storage is not None:
        plan.integer, plan.weight_dtype = True, str(storage[0]).replace("torch.", "")
    return _build(name, lambda: _ExportLinear(layer, act, ints, scale, storage, w_float)), plan


def _plan_conv(name, layer, round_zp, weight_dtype) -> tuple[nn.Module, LayerPlan]:
    act, ints, scale, w_float, plan = _plan_start(name, layer, "conv", round_zp)
    dtype = None
    if act is not None and ints is not None:
        dtype = conv_weight_storage(ints, weight_dtype)
        if dtype is None:
            bound = SAFE_INT8 if weight_dtype in ("auto", "portable") else 127
            plan.reason = (f"QLinearConv needs one filter zero point; these W{plan.w_bits} per-channel "
                           f"asymmetric weights (|int| up to {int(ints.abs().max())} > {bound}) have no "
                           "exact int8 form")
    if dtype is not None:
        plan.integer, plan.weight_dtype = True, "int8"
    return _build(name, lambda: _ExportConv(layer, act, ints, scale, dtype, w_float)), plan


def _matmul_operand(name: str, layer: QuantMatMul, quant: _LazyQuantizer, round_zp: bool):
    if not layer.use_act_quant or not quant.enabled:
        return None, None
    if isinstance(quant, LogSqrt2Quantizer):
        if not quant.is_inited:
            raise ExportError(f"{name}: log-√2 quantizer is not calibrated; run the RepQ-ViT calibration "
                              "(qwt_core.calibrate) before exporting")
        return _LogSqrt2(quant), None
    spec = act_spec(name, quant, round_zp)
    return _ActQDQ(spec), spec


def _plan_matmul(name, layer: QuantMatMul, round_zp) -> tuple[nn.Module, LayerPlan]:
    qa, sa = _matmul_operand(name + ".quantizer_a", layer, layer.quantizer_a, round_zp)
    qb, sb = _matmul_operand(name + ".quantizer_b", layer, layer.quantizer_b, round_zp)
    integer = sa is not None and sb is not None
    reason = "" if integer else (
        "operands not quantized" if qa is None and qb is None else
        "log-√2 quantized operand has no integer matmul" if isinstance(qa, _LogSqrt2) else
        "an operand is not uniformly quantized")
    plan = LayerPlan(name, "matmul", None, (sa or sb).n_bits if (sa or sb) else None, integer,
                     "uint8" if integer else None, reason)
    rounded = [s for s in (sa, sb) if s is not None and s.rounded]
    if rounded:
        plan.zero_point_rounded = ", ".join(f"{s.z:.4f} -> {round(s.z)}" for s in rounded)
    return _ExportMatMul(layer, qa, qb), plan


def build_export_module(model: nn.Module, round_zero_points: bool = False,
                        weight_dtype: WeightDtype = "auto") -> tuple[nn.Module, list[LayerPlan]]:
    """A copy of ``model`` whose quant layers are replaced by their QDQ export form, and the plan.

    The copy computes the same function as ``model`` (in eager mode too) and is what
    ``torch.onnx.export`` traces. It is on the CPU, where the graph is traced (a model on a GPU is
    copied to the CPU first: the export layers build their tables and integer grids with CPU
    tensors). ``model`` is not modified.
    """
    if weight_dtype not in ("auto", "int8", "portable"):
        raise ExportError(f"weight_dtype={weight_dtype!r}: use 'auto', 'int8' or 'portable'")
    _check_supported(model)
    if any(t.device.type != "cpu" for t in itertools.chain(model.parameters(), model.buffers())):
        model = copy.deepcopy(model).cpu()
    plans: list[LayerPlan] = []
    swaps: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            mod, plan = _plan_linear(name, m, round_zero_points, weight_dtype)
        elif isinstance(m, QuantConv2d):
            mod, plan = _plan_conv(name, m, round_zero_points, weight_dtype)
        elif isinstance(m, QuantMatMul):
            mod, plan = _plan_matmul(name, m, round_zero_points)
        else:
            continue
        swaps.append((name, mod))
        plans.append(plan)
    if not plans:
        raise ExportError("the model has no quantized layers (QuantLinear / QuantConv2d / QuantMatMul); "
                          "quantize it with a qwt_core adapter first")
    export_model = copy.deepcopy(model)
    for name, mod in swaps:
        if name == "":
            raise ExportError("the model itself is a quant layer; wrap it in a module")
        export_model.set_submodule(name, mod)
    for m in export_model.modules():  # attention: softmax + log-√2 quantizer from the logits
        if type(m) in _EXPORT_ATTENTION:
            m.__class__ = _EXPORT_ATTENTION[type(m)]
    return export_model.eval(), plans


# ----------------------------------------------------------------------------- QwT compensation
@torch.no_grad()
def quantize_compensations(model: nn.Module, calib_images: torch.Tensor,
                           forward: Optional[Callable[[nn.Module, torch.Tensor], Any]] = None,
                           batch_size: int = 32) -> nn.Module:
    """A copy of ``model`` whose QwT compensation Linears are W8A8 QuantLinears, calibrated.

    Weights: per output channel, RepQ-ViT's uniform quantizer; input: per tensor, 8 bits, calibrated
    on ``calib_images`` ``(B, 3, H, W)`` (``forward(model, images)``, default ``model(images)``).
    The copy is the fake-quant reference of the ``compensation="int8"`` export.

    Raises :class:`ExportError` for conv (ResNet) compensations: their output feeds the residual sum,
    so onnxruntime could not run them as QLinearConv anyway (use ``compensation="fp32"``).
    """
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, CompensatedBlock)]
    if not blocks:
        raise ExportError("compensation='int8' but the model has no QwT compensation "
                          "(run qwt_core.compensate first, or export with compensation='fp32')")
    for name, blk in blocks:
        if not isinstance(blk.compensation, nn.Linear):
            raise ExportError(f"{name}.compensation is a {type(blk.compensation).__name__}: int8 export is "
                              "for Linear (token-form) compensations; a conv compensation's output feeds "
                              "the residual sum, which onnxruntime runs as float; use compensation='fp32'")
    out = copy.deepcopy(model).eval()
    for name, blk in out.named_modules():
        if isinstance(blk, CompensatedBlock) and type(blk.compensation) is nn.Linear:
            blk.compensation = QuantLinear.from_float(blk.compensation, 8, 8)
    run = forward or (lambda m, x: m(x))
    # one calibration pass: only the new quantizers are uninitialised (lazy init on the first batch)
    run(out, calib_images[:batch_size])
    missing = [n for n, q in out.named_modules() if isinstance(q, _LazyQuantizer) and q.enabled
               and not q.is_inited]
    if missing:
        raise ExportError(f"{missing[0]}: not reached by the calibration forward")
    return out


# ----------------------------------------------------------------------------- ONNX graph edits


def _requant_chain(g: _Graph, conv) -> tuple[Optional[Any], Optional[str]]:
    """``(BatchNormalization node or None, None)`` when onnxruntime can fuse ``conv`` into
    QLinearConv: its output runs through an optional BatchNorm and an optional Relu into one uint8
    QuantizeLinear (zero point 0 after a Relu). Otherwise ``(None, reason)``."""
    bn = None
    out = conv.output[0]
    nxt = g.single_consumer(out)
    if nxt is not None and nxt.op_type == "BatchNormalization" and all(
            g.const(i) is not None for i in nxt.input[1:5]):
        bn, out = nxt, nxt.output[0]
        nxt = g.single_consumer(out)
    if nxt is not None and nxt.op_type == "Relu":
        relu_q = g.single_consumer(nxt.output[0])
        if relu_q is not None and relu_q.op_type == "QuantizeLinear":
            zp = g.const(relu_q.input[2]) if len(relu_q.input) > 2 else np.uint8(0)
            if zp is not None and int(np.asarray(zp).reshape(-1)[0]) == 0:
                return bn, None
            return None, "output requantized after a Relu with a nonzero zero point"
    elif nxt is not None and nxt.op_type == "QuantizeLinear":
        return bn, None
    users = g.consumers.get(out, [])
    what = ", ".join(sorted({u.op_type for u in users})) or "graph output"
    return None, f"output is not requantized (it feeds {what}), so no QLinearConv"


def _fold_bn_into_int_conv(g: _Graph, conv, bn, w_dq, b_dq, x_scale: float) -> None:
    """Fold an inference BatchNorm into the integer conv: per-channel factor into the weight scale
    (sign into the int8 values), the shift into the int32 bias."""
    gamma, beta, mean, var = (g.const(i).astype(np.float64) for i in bn.input[1:5])
    eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
    f = gamma / np.sqrt(var + eps)
    ints = g.const(w_dq.input[0]).astype(np.int64)
    scale = g.const(w_dq.input[1]).astype(np.float64)
    sign = np.where(f < 0, -1, 1).reshape([-1] + [1] * (ints.ndim - 1))
    ints = ints * sign
    new_scale = scale * np.abs(f)
    dead = f == 0
    ints[dead] = 0
    new_scale = np.where(dead, scale, new_scale).astype(np.float32)
    bias = np.zeros(len(f)) if b_dq is None else (
        g.const(b_dq.input[0]).astype(np.float64) * g.const(b_dq.input[1]).astype(np.float64))
    bias = (bias - mean) * f + beta
    b_scale = (np.float32(x_scale) * new_scale).astype(np.float32)
    b_int = np.round(bias / b_scale.astype(np.float64))
    if np.abs(b_int).max(initial=0) > 2 ** 31 - 1:
        raise ExportError(f"{conv.name}: folded BatchNorm bias does not fit int32")
    g.set_init(w_dq.input[0], ints.astype(np.int8))
    g.set_init(w_dq.input[1], new_scale)
    base = w_dq.input[0] + "_bnfold"
    g.set_init(base + "_bint", b_int.astype(np.int32))
    g.set_init(base + "_bscale", b_scale)
    g.set_init(base + "_bzp", np.zeros(len(f), np.int32))
    h = g.onnx.helper
    node = h.make_node("DequantizeLinear", [base + "_bint", base + "_bscale", base + "_bzp"],
                       [base + "_bias"], axis=0, name=base + "_bias_dq")
    del conv.input[2:]
    conv.input.append(base + "_bias")
    # bypass the BatchNorm: the conv writes the BatchNorm's output (the BatchNorm becomes dead)
    old = conv.output[0]
    conv.output[0] = bn.output[0]
    bn.output[0] = old + "_unused_bn"
    bn.input[0] = old + "_unused_bn_in"
    # insert the bias DQ before the conv (topological order); extend() copies the node messages,
    # so every edit of ``conv`` / ``bn`` above must come first
    nodes = list(g.g.node)
    nodes.insert(nodes.index(conv), node)
    del g.g.node[:]
    g.g.node.extend(nodes)


def _to_float_conv(g: _Graph, conv, w_dq, b_dq, bias_fp32: Optional[np.ndarray]) -> None:
    """Replace the DQ weight / bias of ``conv`` by fp32 initializers (the same dequantized values)."""
    ints = g.const(w_dq.input[0]).astype(np.float32) - g.const(w_dq.input[2]).astype(np.float32).reshape(
        [-1] + [1] * (len(g.init[w_dq.input[0]].dims) - 1))
    w = ints * g.const(w_dq.input[1]).astype(np.float32).reshape([-1] + [1] * (ints.ndim - 1))
    name = w_dq.input[0] + "_fp32"
    g.set_init(name, w.astype(np.float32))
    conv.input[1] = name
    if b_dq is not None:
        bname = w_dq.input[0] + "_bias_fp32"
        g.set_init(bname, bias_fp32.astype(np.float32))
        conv.input[2] = bname


def _finish_convs(g: _Graph, plans: list[LayerPlan], export_model: nn.Module) -> None:
    """Decide each integer conv: fuse a following BatchNorm (exact), or go back to fp32 weights when
    onnxruntime could not fuse it (output not requantized)."""
    for plan in plans:
        if plan.kind != "conv" or not plan.integer:
            continue
        wname = plan.name + ".qwt_wint"
        w_dq = next((n for n in g.consumers.get(wname, []) if n.op_type == "DequantizeLinear"), None)
        conv = g.single_consumer(w_dq.output[0]) if w_dq is not None else None
        if conv is None or conv.op_type != "Conv":
            raise ExportError(f"{plan.name}: exported graph lost the DQ(weight) → Conv pattern "
                              "(an exporter change?); report this")
        b_dq = g.producer.get(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
        x_dq = g.producer.get(conv.input[0])
        x_scale = float(np.asarray(g.const(x_dq.input[1])).reshape(-1)[0])
        bn, reason = _requant_chain(g, conv)
        if reason is None:
            if bn is not None:
                _fold_bn_into_int_conv(g, conv, bn, w_dq, b_dq, x_scale)
                g.reindex()
            continue
        layer = export_model.get_submodule(plan.name)
        bias = layer.qwt_bias_fp32.numpy() if getattr(layer, "has_bias", False) else None
        _to_float_conv(g, conv, w_dq, b_dq, bias)
        g.reindex()
        plan.integer, plan.weight_dtype, plan.reason = False, None, reason
    g.remove_dead()


def _check_linears(g: _Graph, plans: list[LayerPlan]) -> None:
    for plan in plans:
        if plan.kind == "linear" and plan.integer:
            wname = plan.name + ".qwt_wint"
            users = g.consumers.get(wname, [])
            if not users or users[0].op_type != "DequantizeLinear":
                raise ExportError(f"{plan.name}: exported graph lost the DQ(weight) → MatMul pattern "
                                  "(an exporter change?); report this")


# ----------------------------------------------------------------------------- export
def _example_for_trace(example_input: torch.Tensor, dynamic_batch: bool) -> torch.Tensor:
    if dynamic_batch and example_input.shape[0] == 1:
        return example_input.repeat(2, *([1] * (example_input.dim() - 1)))  # batch 1 specialises
    return example_input


def _atomic_save(model_proto, path: str) -> int:
    import onnx
    data = model_proto.SerializeToString()
    if len(data) >= 2 ** 31:
        raise ExportError(f"the ONNX model is {len(data) / 1e9:.1f} GB; over protobuf's 2 GB limit")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".onnx", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        onnx.checker.check_model(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return len(data)


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str,
                config: Optional[ExportConfig] = None, *, calib_images: Optional[torch.Tensor] = None,
                **changes: Any) -> ExportReport:
    """Export a calibrated (and optionally QwT-compensated) fake-quant model to an ONNX QDQ file.

    Args:
        model: the fake-quant model (``QuantizedModel.model``), calibrated; not modified.
        example_input: images ``(B, 3, H, W)`` fixing the input shape (the batch dim stays dynamic).
        path: the ``.onnx`` file, written atomically (nothing is written on any error).
        config: an :class:`~qwt_core.ExportConfig` (default ``ExportConfig()``): ``compensation``
            (``"fp32"``: QwT compensation Linears stay fp32; ``"int8"``: W8A8 QDQ Linears calibrated
            on ``calib_images``, see :func:`quantize_compensations`), ``round_zero_points`` (round
            fractional activation zero points instead of refusing), ``weight_dtype`` (``"auto"``,
            exact on any x86 CPU, or ``"int8"``), ``dynamic_batch``, ``check`` (run
            :func:`integer_op_report` on the written file: ``report.ort``), ``threads``.
        calib_images: images ``(B, 3, H, W)`` for ``compensation="int8"``.
        changes: :class:`~qwt_core.ExportConfig` fields applied on top of ``config``.
    Returns:
        :class:`ExportReport` (per layer: integer or float and why; ``report.reference`` is the
        fake-quant module the graph reproduces, for :func:`compare_onnx`).
    Raises:
        ExportError: one line naming the layer and the fix (uncalibrated, fractional zero point,
            unrepresentable grid, unsupported layer) before anything is written.
    """
    t0 = time.perf_counter()
    config = config if config is not None else ExportConfig()
    try:
        config = config.replace(**changes) if changes else config
    except (TypeError, ValueError) as exc:
        raise ExportError(str(exc).splitlines()[0]) from None
    compensation, weight_dtype = config.compensation, config.weight_dtype
    round_zero_points, dynamic_batch = config.round_zero_points, config.dynamic_batch
    check, threads = config.check, config.threads
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        raise ExportError("example_input must be a batch tensor, e.g. images (B, 3, H, W)")
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ExportError(f"ONNX export needs the deploy extra: pip install onnx onnxruntime onnxscript "
                          f"({exc})") from None
    import inspect
    if "custom_translation_table" not in inspect.signature(torch.onnx.export).parameters:
        raise ExportError(f"torch {torch.__version__} has no dynamo ONNX exporter with custom "
                          "translations; the export needs torch >= 2.6")
    model = model.eval()
    reference = model
    if compensation == "int8":
        if calib_images is None:
            raise ExportError("compensation='int8' needs calib_images to calibrate the compensation's "
                              "input quantizers (e.g. the RepQ-ViT calibration batch)")
        device = next(model.parameters()).device
        reference = quantize_compensations(model, calib_images.to(device))
    flags = cpu_flags()
    effective = ("int8" if has_vnni(flags) else "portable") if weight_dtype == "auto" else weight_dtype
    export_model, plans = build_export_module(reference, round_zero_points, effective)
    export_model = export_model.cpu()
    example = _example_for_trace(example_input.detach().cpu().float(), dynamic_batch)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    log = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            program = torch.onnx.export(export_model, (example,), dynamo=True, opset_version=OPSET,
                                        custom_translation_table=_translations(),
                                        dynamic_shapes=dynamic, input_names=["images"],
                                        output_names=["logits"], verbose=False, report=False)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; report one line
        msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        hint = " (try dynamic_batch=False)" if dynamic_batch else ""
        raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {msg}{hint}") from None
    proto = program.model_proto
    g = _Graph(proto)
    _check_linears(g, plans)
    _finish_convs(g, plans, export_model)
    report = ExportReport(path=os.path.abspath(path), compensation=compensation, weight_dtype=weight_dtype,
                          weight_dtype_effective=effective, cpu_flags=sorted(flags & set(VNNI_FLAGS)),
                          layers=plans, reference=reference)
    rounded = [p for p in plans if p.zero_point_rounded]
    if rounded:
        report.notes.append(f"{len(rounded)} fractional activation zero points rounded "
                            f"(e.g. {rounded[0].name}: {rounded[0].zero_point_rounded}); "
                            "the graph differs from the fake-quant model there")
    clipped = [p for p in plans if p.a_bits is not None and p.a_bits < 8]
    if clipped:
        report.notes.append(f"{len(clipped)} inputs below 8 bits: uint8 values clipped to their 2^b levels")
    report.onnx_bytes = _atomic_save(proto, path)
    report.seconds = time.perf_counter() - t0
    if check:
        report.ort = integer_op_report(path, plans, threads=threads)
    return report


def export_fp_onnx(model: nn.Module, example_input: torch.Tensor, path: str,
                   dynamic_batch: bool = True) -> int:
    """Export an unquantized (FP) model to ONNX, the reference graph for latency ratios.

    Args:
        model: any FP ``nn.Module`` mapping images ``(B, 3, H, W)`` to logits ``(B, K)``.
        example_input: images ``(B, 3, H, W)`` fixing the input shape (batch dim dynamic).
        path: the ``.onnx`` file, written atomically.
    Returns:
        bytes written.
    Raises:
        ExportError: one line if the exporter fails (nothing is written).
    """
    example = _example_for_trace(example_input.detach().cpu().float(), dynamic_batch)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    log = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            program = torch.onnx.export(model.eval(), (example,), dynamo=True, opset_version=OPSET,
                                        dynamic_shapes=dynamic, input_names=["images"],
                                        output_names=["logits"], verbose=False, report=False)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; report one line
        msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"torch.onnx.export of the FP model failed: {type(exc).__name__}: {msg}") from None
    return _atomic_save(program.model_proto, path)


# ----------------------------------------------------------------------------- onnxruntime
