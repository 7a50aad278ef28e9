"""RepQ-ViT post-LayerNorm scale reparameterization.

A LayerNorm output feeding a Linear has very different ranges per channel, so RepQ-ViT first
calibrates the Linear's input quantizer per channel, ``(s_c, z_c)``, then folds the channel
variation into the LayerNorm affine and the Linear weight so that one per-tensor ``(s̃, z̃)``
quantizes it:

    s̃ = mean(s_c), z̃ = mean(z_c), r_c = s_c / s̃, β_c = -z_c·s_c / r_c + z̃·s̃
    LayerNorm:  γ ← γ / r,  b ← b / r - β
    Linear:     W[:, c] ← W[:, c]·r_c,  bias ← bias + W'β   (W' the rescaled weight)

The floating-point function is unchanged. With an integer z̃ (``integer_zero_point=True``) the
quantized activations are unchanged too; the reference keeps z̃ fractional.
"""
from __future__ import annotations

import torch
from torch import nn

from .modules import QuantLinear
from .quantizers import UniformQuantizer


@torch.no_grad()
def reparameterize_layernorm(norm: nn.Module, linear: QuantLinear,
                             integer_zero_point: bool = False) -> None:
    """Fold the per-channel input quantizer of ``linear`` into ``norm`` and ``linear``.

    Args:
        norm: LayerNorm-like module with ``weight`` (γ, ``(C,)``) and ``bias`` (``(C,)``).
        linear: QuantLinear whose ``input_quantizer`` is a calibrated channel-wise UniformQuantizer
            over the last dim (``delta``/``zero_point`` of ``C`` elements).
        integer_zero_point: round z̃ to an integer (exact quantized equivalence).
    After the call the input quantizer is per tensor ``(s̃, z̃)`` and the weight quantizer is reset
    (it must be re-calibrated on the rescaled weight).
    """
    quant = linear.input_quantizer
    if not isinstance(quant, UniformQuantizer) or not quant.channel_wise or not quant.is_inited:
        raise ValueError("reparameterize_layernorm needs a calibrated channel-wise input quantizer "
                         "(run a calibration forward first)")
    if norm.weight is None or norm.bias is None:
        raise ValueError("reparameterize_layernorm needs a LayerNorm with elementwise affine")
    s = quant.delta.reshape(-1).to(torch.float64)
    z = quant.zero_point.reshape(-1).to(torch.float64)
    if s.numel() != linear.in_features or norm.weight.numel() != s.numel():
        raise ValueError(f"channel mismatch: quantizer {s.numel()}, LayerNorm {norm.weight.numel()}, "
                         f"Linear in_features {linear.in_features}")
    stored = quant.delta.dtype  # use s̃, z̃ exactly as the quantizer will hold them
    s_t = s.mean().to(stored).double()
    z_t = z.mean().to(stored).double()
    if integer_zero_point:
        z_t = torch.round(z_t)
    r = s / s_t
    beta = -z * s / r + z_t * s_t

    dtype = norm.weight.dtype
    norm.weight.copy_((norm.weight.double() / r).to(dtype))
    norm.bias.copy_((norm.bias.double() / r - beta).to(dtype))

    w_new = linear.weight.double() * r[None, :]
    shift = w_new @ beta
    linear.weight.copy_(w_new.to(linear.weight.dtype))
    if linear.bias is None:
        linear.bias = nn.Parameter(shift.to(linear.weight.dtype))
    else:
        linear.bias.copy_((linear.bias.double() + shift).to(linear.bias.dtype))

    quant.channel_wise = False
    quant.set_params(s_t.to(stored), z_t.to(stored), shape=[])
    linear.weight_quantizer.reset()
