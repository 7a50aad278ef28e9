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

    Quantizing is done once per layer: if ``rule`` selects a layer that is already a
    ``QuantLinear``/``QuantConv2d`` (e.g. ``quantize_layers`` called twice with the same rule), a
    ``ValueError`` names it and nothing is changed; build the model anew to quantize it differently,
    or give a rule that returns None for the layers quantized before (quantizing *other* layers in
    a second call is fine). A rule that selects no layer at all is also an error.
    """
    targets = [(name, m) for name, m in model.named_modules()
               if name and isinstance(m, (nn.Linear, nn.Conv2d))]
    plan: list[tuple[str, nn.Module, LayerBits]] = []
    again: list[str] = []
    for name, module in targets:
        bits = rule(name, module)
        if bits is None:
            continue
        if isinstance(module, (QuantLinear, QuantConv2d)):
            again.append(name)
            continue
        if bits.act_channel_wise and not isinstance(module, nn.Linear):
            raise ValueError(f"{name}: channel-wise input quantization is only for Linear layers")
        plan.append((name, module, bits))
    if again:
        raise ValueError(f"quantize_layers: {len(again)} selected layers are already quantized "
                         f"(e.g. {again[0]!r}): this model was quantized before; build it anew, or "
                         "use a rule that returns None for quantized layers")
    if not plan:
        raise ValueError(f"quantize_layers: the rule selected none of the {len(targets)} "
                         "nn.Linear/nn.Conv2d layers of this model; check the rule's layer names")
    swapped: dict[str, nn.Module] = {}
    for name, module, bits in plan:
        if isinstance(module, nn.Linear):
            q = QuantLinear.from_float(module, bits.w_bits, bits.a_bits, bits.act_channel_wise)
        else:
            q = QuantConv2d.from_float(module, bits.w_bits, bits.a_bits)
        model.set_submodule(name, q)
        swapped[name] = q
    return swapped
