"""Quantizer math against hand-computed values."""
import math

import numpy as np
import pytest
import torch

from qwt_core.quantizers import (LogSqrt2Quantizer, PercentileQuantizer, UniformQuantizer,
                                 exact_quantile, log_sqrt2_fake_quant, validate_bits)


def test_uniform_fake_quant_hand_values():
    q = UniformQuantizer(3)
    q.set_params(torch.tensor(0.5), torch.tensor(2.0))
    x = torch.tensor([-1.3, -0.2, 0.24, 0.26, 3.0, 0.25, 0.75])
    # x/Δ = -2.6 -0.4 0.48 0.52 6 0.5 1.5 -> round (half to even) -3 0 0 1 6 0 2
    # +z -> -1 2 2 3 8 2 4 -> clamp[0,7] -> 0 2 2 3 7 2 4 -> -z, ×Δ
    expected = torch.tensor([-1.0, 0.0, 0.0, 0.5, 2.5, 0.0, 1.0])
    assert torch.equal(q(x), expected)


def test_uniform_init_picks_best_percentile_by_hand():
    # 2 bits on [0, 1, 2, 3, 100]: the candidates clip at quantiles p and 1-p of these 5 values.
    # p = 0.99999: hi = 3 + 0.99996·97 = 99.99612, lo = 0.00004 -> smallest error on the outlier.
    x = torch.tensor([0.0, 1.0, 2.0, 3.0, 100.0])
    q = UniformQuantizer(2)
    q(x)
    hi = 3 + (0.99999 * 4 - 3) * 97
    lo = 0.00001 * 4 * 1
    assert q.delta.item() == pytest.approx((hi - lo) / 3, rel=1e-5)
    assert q.zero_point.item() == 0.0
    assert q.is_inited


def test_uniform_init_is_frozen_after_first_tensor():
    q = UniformQuantizer(4)
    q(torch.linspace(-1, 1, 100))
    delta = q.delta.clone()
    q(torch.linspace(-10, 10, 100))
    assert torch.equal(q.delta, delta)
    q.reset()
    q(torch.linspace(-10, 10, 100))
    assert q.delta.item() > delta.item() * 5


def test_channel_wise_weights_and_constant_channels():
    w = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0], [0.0, 0.0, 0.0], [0.0, 1.0, 2.0]])
    q = UniformQuantizer(4, channel_wise=True, channel_dim=0)
    out = q(w)
    assert q.delta.shape == (4, 1)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[:3], w[:3])  # constant channels are reproduced exactly
    assert torch.allclose(out[3], w[3], atol=2 / 15)


def test_channel_wise_last_dim_activations():
    x = torch.randn(2, 5, 4) * torch.tensor([1.0, 10.0, 100.0, 0.1])
    q = UniformQuantizer(8, channel_wise=True, channel_dim=-1)
    out = q(x)
    assert q.delta.shape == (1, 1, 4)
    rel = ((out - x).abs().amax(dim=(0, 1)) / x.abs().amax(dim=(0, 1)))
    assert (rel < 0.02).all()


@pytest.mark.parametrize("q", [0.0, 0.001, 0.3, 0.5, 0.999, 0.9999, 0.99999, 1.0])
def test_exact_quantile_matches_torch_quantile(q):
    # torch versions differ in the float precision of the rank (bit-equal on torch 2.14)
    x = torch.randn(7, 1003)
    assert torch.allclose(exact_quantile(x, q, dim=1), torch.quantile(x, q, dim=1), rtol=0, atol=5e-5)
    flat = x.reshape(-1)
    assert torch.allclose(exact_quantile(flat, q, dim=0), torch.quantile(flat, q), rtol=0, atol=5e-5)
    x64 = x.double()
    assert torch.allclose(exact_quantile(x64, q, dim=1), torch.quantile(x64, q, dim=1), rtol=0, atol=1e-12)


def test_exact_quantile_beyond_torch_limit():
    n = 2 ** 24 + 17
    x = torch.randn(n)
    # torch < 2.14 refuses torch.quantile on this size; the float64 numpy quantile is the reference
    ours = exact_quantile(x, 0.9999, dim=0).item()
    ref = np.quantile(x.double().numpy(), 0.9999)
    assert ours == pytest.approx(ref, rel=1e-5)


def test_log_sqrt2_edge_cases_by_hand():
    delta = torch.tensor(1.0)
    x = torch.tensor([0.0, 2.0, 0.5, 0.7, 2 ** -4, 2 ** -3.5, 1.0])
    out = log_sqrt2_fake_quant(x, delta, 3)
    # 0 -> dropped; 2 > Δ -> q=-2 clamped to 0 -> Δ; 0.5 -> q=2 -> 2^-1;
    # 0.7 -> q=round(1.029)=1 -> 2^-0.5; 2^-4 -> q=8 >= 2^3 -> 0 (underflow); 2^-3.5 -> q=7.
    expected = torch.tensor([0.0, 1.0, 0.5, 2 ** -0.5, 0.0, 2 ** -3.5, 1.0])
    assert torch.allclose(out, expected, atol=1e-7)


def test_log_sqrt2_init_on_softmax():
    attn = torch.randn(2, 3, 16, 16).softmax(-1)
    q = LogSqrt2Quantizer(4)
    out = q(attn)
    assert q.delta.item() <= attn.max().item() + 1e-6
    assert torch.isfinite(out).all() and (out >= 0).all()
    assert (out - attn).pow(2).mean() < attn.pow(2).mean()


def test_percentile_quantizer_min_max():
    x = torch.tensor([[0.0, 1.0, 3.0], [-1.0, 0.0, 1.0]])
    q = PercentileQuantizer(2, percentile=1.0, channel_wise=True, channel_dim=0)
    q(x)
    assert torch.allclose(q.delta.reshape(-1), torch.tensor([1.0, 2 / 3]))


@pytest.mark.parametrize("bad", [1, 9, 0, 3.5, "4", True])
def test_bad_bit_width(bad):
    with pytest.raises(ValueError, match="bit width"):
        validate_bits(bad)
    with pytest.raises(ValueError):
        UniformQuantizer(bad)
