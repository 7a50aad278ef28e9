"""Fake-quant layers: Linear, Conv2d and the two-operand MatMul used inside attention.

Each layer quantizes its *input* activation (per tensor, or per channel for post-LayerNorm inputs
that are later reparameterized) and its weight (per output channel). ``set_quant_state`` switches
weight and activation quantization on or off for every quant layer below a module.
"""
from __future__ import annotations

from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import LogSqrt2Quantizer, UniformQuantizer, _LazyQuantizer


class QuantLayerMixin:
    """Weight/activation switches shared by the quant layers."""

    use_weight_quant: bool
    use_act_quant: bool

    def set_quant_state(self, weight: bool, act: bool) -> None:
        self.use_weight_quant = weight
        self.use_act_quant = act

    def quantized_weight(self) -> torch.Tensor:
        """``Q_w(weight)``, cached until the weight or the weight quantizer changes.

        Inside ``torch.compile`` the quantized weight is part of the graph (the cache key reads data
        pointers, which would split the graph at every layer)."""
        wq = self.weight_quantizer
        if not wq.is_inited or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return wq(self.weight)
        key = (self.weight.data_ptr(), self.weight._version, self.weight.dtype, wq.version)
        if getattr(self, "_wq_key", None) != key:
            self._wq_cache = wq(self.weight)
            self._wq_key = key
        return self._wq_cache


class QuantLinear(nn.Linear, QuantLayerMixin):
    """``y = Q_w(W) · Q_a(x) + b``; x: ``(..., in_features)`` → y: ``(..., out_features)``.

    ``weight_quantizer`` is per output channel; ``input_quantizer`` is per tensor, or per channel of
    the last dim when ``act_channel_wise`` (RepQ-ViT post-LayerNorm inputs, before reparameterization).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, w_bits: int = 8,
                 a_bits: int = 8, act_channel_wise: bool = False,
                 input_quantizer: nn.Module | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.w_bits, self.a_bits = w_bits, a_bits
        self.weight_quantizer = UniformQuantizer(w_bits, channel_wise=True, channel_dim=0)
        self.input_quantizer = input_quantizer if input_quantizer is not None else UniformQuantizer(
            a_bits, channel_wise=act_channel_wise, channel_dim=-1)
        self.use_weight_quant = True
        self.use_act_quant = True

    @classmethod
    def from_float(cls, linear: nn.Linear, w_bits: int, a_bits: int, act_channel_wise: bool = False,
                   input_quantizer: nn.Module | None = None) -> "QuantLinear":
        """Wrap an existing ``nn.Linear``; the parameters are shared, not copied."""
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, w_bits=w_bits,
                a_bits=a_bits, act_channel_wise=act_channel_wise, input_quantizer=input_quantizer)
        q.weight = linear.weight
        q.bias = linear.bias
        return q.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_act_quant:
            x = self.input_quantizer(x)
        w = self.quantized_weight() if self.use_weight_quant else self.weight
        return F.linear(x, w, self.bias)


class QuantConv2d(nn.Conv2d, QuantLayerMixin):
    """Conv2d with per-output-channel weight quantization and per-tensor input quantization.

    x: ``(B, C_in, H, W)`` → ``(B, C_out, H', W')``.
    """

    def __init__(self, *args, w_bits: int = 8, a_bits: int = 8,
                 input_quantizer: nn.Module | None = None,
                 weight_quantizer: nn.Module | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.w_bits, self.a_bits = w_bits, a_bits
        self.weight_quantizer = weight_quantizer if weight_quantizer is not None else UniformQuantizer(
            w_bits, channel_wise=True, channel_dim=0)
        self.input_quantizer = input_quantizer if input_quantizer is not None else UniformQuantizer(a_bits)
        self.use_weight_quant = True
        self.use_act_quant = True

    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_bits: int, a_bits: int,
                   input_quantizer: nn.Module | None = None,
                   weight_quantizer: nn.Module | None = None) -> "QuantConv2d":
        """Wrap an existing ``nn.Conv2d``; the parameters are shared, not copied."""
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                bias=conv.bias is not None, padding_mode=conv.padding_mode, w_bits=w_bits,
                a_bits=a_bits, input_quantizer=input_quantizer, weight_quantizer=weight_quantizer)
        q.weight = conv.weight
        q.bias = conv.bias
        return q.to(conv.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_act_quant:
            x = self.input_quantizer(x)
        w = self.quantized_weight() if self.use_weight_quant else self.weight
        return self._conv_forward(x, w, self.bias)


class QuantMatMul(nn.Module, QuantLayerMixin):
    """``Q_a(a) @ Q_b(b)`` for attention: ``q·kᵀ`` (uniform, uniform) or ``attn·v`` (log-√2, uniform).

    a: ``(..., M, K)``, b: ``(..., K, N)`` → ``(..., M, N)``. Both quantizers are per tensor.
    """

    def __init__(self, a_bits: int, kind_a: Literal["uniform", "log2"] = "uniform",
                 b_bits: int | None = None) -> None:
        super().__init__()
        self.a_bits = a_bits
        self.quantizer_a = LogSqrt2Quantizer(a_bits) if kind_a == "log2" else UniformQuantizer(a_bits)
        self.quantizer_b = UniformQuantizer(b_bits if b_bits is not None else a_bits)
        self.use_weight_quant = True
        self.use_act_quant = True

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.use_act_quant:
            a, b = self.quantizer_a(a), self.quantizer_b(b)
        return a @ b


QUANT_LAYER_TYPES = (QuantLinear, QuantConv2d, QuantMatMul)


def quant_layers(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """All quant layers below (and including) ``module``, as (name, layer)."""
    for name, m in module.named_modules():
        if isinstance(m, QuantLayerMixin):
            yield name, m


def quantizers(module: nn.Module) -> Iterator[tuple[str, _LazyQuantizer]]:
    """All quantizers below ``module``, as (name, quantizer)."""
    for name, m in module.named_modules():
        if isinstance(m, _LazyQuantizer):
            yield name, m


def set_quant_state(module: nn.Module, weight: bool = True, act: bool = True) -> None:
    """Switch weight / activation fake quantization for every quant layer below ``module``."""
    for _, layer in quant_layers(module):
        layer.set_quant_state(weight, act)


class quant_disabled:
    """Context manager: quantization off inside ``module`` (e.g. to get a block's FP output)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.saved: list[tuple[QuantLayerMixin, bool, bool]] = []

    def __enter__(self) -> nn.Module:
        self.saved = [(m, m.use_weight_quant, m.use_act_quant) for _, m in quant_layers(self.module)]
        set_quant_state(self.module, False, False)
        return self.module

    def __exit__(self, *exc) -> None:
        for m, w, a in self.saved:
            m.set_quant_state(w, a)
