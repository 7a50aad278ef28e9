"""RepQ-ViT post-LayerNorm reparameterization keeps the function (FP exactly, quantized with integer z̃)."""
import pytest
import torch
from torch import nn

from helpers_models import images, tiny_vit
from qwt_core.adapters.timm_vit import quantize_timm_vit
from qwt_core.modules import QuantLinear, set_quant_state
from qwt_core.reparam import reparameterize_layernorm
from qwt_core.repq import repq_calibrate


def _ln_linear(channels: int = 16, out: int = 8, bias: bool = True):
    norm = nn.LayerNorm(channels).double()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(channels, dtype=torch.float64) * 4 + 0.1)
        norm.bias.copy_(torch.randn(channels, dtype=torch.float64))
    lin = QuantLinear.from_float(nn.Linear(channels, out, bias=bias).double(), 4, 4, act_channel_wise=True)
    return norm, lin


def _x(channels: int = 16):
    scales = torch.logspace(-1, 1, channels, dtype=torch.float64)
    return torch.randn(4, 10, channels, dtype=torch.float64) * scales


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("integer_zero_point", [False, True])
def test_fp_output_unchanged(bias, integer_zero_point):
    norm, lin = _ln_linear(bias=bias)
    x = _x()
    lin(norm(x))  # calibrates the channel-wise input quantizer
    set_quant_state(lin, False, False)
    before = lin(norm(x))
    reparameterize_layernorm(norm, lin, integer_zero_point=integer_zero_point)
    after = lin(norm(x))
    assert torch.allclose(before, after, rtol=0, atol=1e-10)
    assert not lin.input_quantizer.channel_wise and lin.input_quantizer.delta.dim() == 0
    assert not lin.weight_quantizer.is_inited


def test_quantized_output_unchanged_with_integer_zero_point():
    norm, lin = _ln_linear()
    x = _x()
    set_quant_state(lin, weight=False, act=True)
    before = lin(norm(x))
    reparameterize_layernorm(norm, lin, integer_zero_point=True)
    after = lin(norm(x))
    assert torch.allclose(before, after, rtol=0, atol=1e-9)


def test_fractional_zero_point_is_the_reference_default():
    norm, lin = _ln_linear()
    x = _x()
    set_quant_state(lin, weight=False, act=True)
    lin(norm(x))
    z = lin.input_quantizer.zero_point.clone()
    reparameterize_layernorm(norm, lin)
    assert lin.input_quantizer.zero_point.item() == pytest.approx(z.mean().item())


def test_needs_calibrated_channel_wise_quantizer():
    norm, lin = _ln_linear()
    with pytest.raises(ValueError, match="calibrated channel-wise"):
        reparameterize_layernorm(norm, lin)


def test_whole_vit_fp_function_preserved():
    model = tiny_vit().double()
    x = images(8, 32).double()
    with torch.no_grad():
        fp = model(x)
    qm = quantize_timm_vit(model, 4, 4)
    with torch.no_grad():
        repq_calibrate(lambda: model(x), model, qm.ln_pairs)
        set_quant_state(model, False, False)
        after = model(x)
    assert torch.allclose(fp, after, rtol=0, atol=1e-9)
