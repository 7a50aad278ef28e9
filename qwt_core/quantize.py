"""Swap ``nn.Linear`` / ``nn.Conv2d`` layers of a model for fake-quant layers according to a rule."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from .modules import QuantConv2d, QuantLinear
from .quantizers import validate_bits


@dataclass(frozen=True)
class LayerBits:
    """Bit widths of one layer: weight (per output channel) and input activation."""

    w_bits: int
    a_bits: int
    act_channel_wise: bool = False  # per-channel input (post-LayerNorm, reparameterized later)

    def __post_init__(self) -> None:
        validate_bits(self.w_bits, "w_bits")
        validate_bits(self.a_bits, "a_bits")


Rule = Callable[[str, nn.Module], Optional[LayerBits]]


def quantize_layers(model: nn.Module, rule: Rule) -> dict[str, nn.Module]:
    """Replace every ``nn.Linear``/``nn.Conv2d`` for which ``rule(name, module)`` returns bits.

    Parameters are shared with the original layers. Returns ``{qualified name: quant layer}``.
    Layers already quantized are left alone.
    """
    targets = [(name, m) for name, m in model.named_modules()
               if name and isinstance(m, (nn.Linear, nn.Conv2d))
               and not isinstance(m, (QuantLinear, QuantConv2d))]
    swapped: dict[str, nn.Module] = {}
    for name, module in targets:
        bits = rule(name, module)
        if bits is None:
            continue
        if isinstance(module, nn.Linear):
            q = QuantLinear.from_float(module, bits.w_bits, bits.a_bits, bits.act_channel_wise)
        else:
            if bits.act_channel_wise:
                raise ValueError(f"{name}: channel-wise input quantization is only for Linear layers")
            q = QuantConv2d.from_float(module, bits.w_bits, bits.a_bits)
        model.set_submodule(name, q)
        swapped[name] = q
    return swapped
