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


# ------------------------------------------------------------------ topk quantiles == kthvalue
from helpers_models import kthvalue_quantile  # noqa: E402
from qwt_core.quantizers import exact_quantiles  # noqa: E402


def _heavy_tailed_data(seed: int) -> dict[str, torch.Tensor]:
    """Normal, Student-t (3 dof), Cauchy, and data with many ties, as ``(C, N)`` rows."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(6, 4099, generator=g)
    chi2 = torch.randn(6, 4099, 3, generator=g).pow(2).sum(-1)
    student_t = torch.randn(6, 4099, generator=g) / (chi2 / 3).sqrt()
    cauchy = torch.tan(math.pi * (torch.rand(6, 4099, generator=g) - 0.5))
    ties = torch.randint(-3, 4, (6, 4099), generator=g).float()  # 7 distinct values
    return {"normal": normal, "student_t": student_t, "cauchy": cauchy, "ties": ties}


QS = [1.0 - p for p in (0.999, 0.9999, 0.99999)] + [0.999, 0.9999, 0.99999, 0.0, 1.0, 0.25, 0.5]


@pytest.mark.parametrize("dist", ["normal", "student_t", "cauchy", "ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_quantiles_bit_identical_to_kthvalue(dist, dtype):
    x = _heavy_tailed_data(0)[dist].to(dtype)
    for method in ("topk", "auto"):
        # per channel (rows) and per tensor (one flattened row)
        for data, dim in ((x, 1), (x.reshape(-1), 0), (x.T.contiguous(), 0)):
            ours = exact_quantiles(data, QS, dim=dim, method=method)
            for q, value in zip(QS, ours):
                ref = kthvalue_quantile(data, q, dim)
                assert torch.equal(value, ref), (dist, method, q, dim)
                assert torch.equal(exact_quantile(data, q, dim=dim, method="kthvalue"), ref)
                assert torch.equal(exact_quantile(data, q, dim=dim, method=method), ref)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 1000, 1001])
def test_topk_quantiles_tiny_and_odd_sizes(n):
    g = torch.Generator().manual_seed(n)
    x = torch.cat([torch.randn(3, n, generator=g), torch.zeros(1, n),  # a constant row
                   torch.randint(0, 2, (1, n), generator=g).float()])  # only two values
    for q in QS:
        ref = kthvalue_quantile(x, q, 1)
        assert torch.equal(exact_quantile(x, q, dim=1, method="topk"), ref), (n, q)
        assert torch.equal(exact_quantile(x, q, dim=1), ref), (n, q)
        assert torch.allclose(ref, torch.quantile(x, q, dim=1), rtol=0, atol=5e-5)


def test_quantizer_init_unchanged_by_topk(monkeypatch):
    """Quantizer calibration with topk quantiles equals the kthvalue reference exactly."""
    import qwt_core.quantizers as qz
    g = torch.Generator().manual_seed(1)
    act = torch.randn(4, 50, 96, generator=g) * torch.linspace(0.1, 20, 96)
    act[0, 0] = 300.0  # an outlier channel value
    attn = torch.randn(4, 3, 50, 50, generator=g).mul(3).softmax(-1)
    weight = torch.tan(math.pi * (torch.rand(64, 96, generator=g) - 0.5))  # Cauchy weights

    def calibrate() -> list[torch.Tensor]:
        out = []
        for make, x in ((lambda: UniformQuantizer(4, channel_wise=True, channel_dim=-1), act),
                        (lambda: UniformQuantizer(4), act),
                        (lambda: UniformQuantizer(3, channel_wise=True, channel_dim=0), weight),
                        (lambda: PercentileQuantizer(4, percentile=0.999), act),
                        (lambda: LogSqrt2Quantizer(4), attn)):
            q = make()
            out += [q(x), q.delta.clone()] + ([q.zero_point.clone()] if hasattr(q, "zero_point") else [])
        return out

    fast = calibrate()
    monkeypatch.setattr(qz, "exact_quantiles",  # the previous per-quantile kthvalue code
                        lambda x, qs, dim=-1, method="auto": [kthvalue_quantile(x, q, dim) for q in qs])
    slow = calibrate()
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


def test_exact_quantile_bad_arguments():
    with pytest.raises(ValueError, match="quantile q"):
        exact_quantiles(torch.randn(10), [0.5, 1.5], dim=0)
    with pytest.raises(ValueError, match="method"):
        exact_quantile(torch.randn(10), 0.5, dim=0, method="sort")
    with pytest.raises(ValueError, match="empty"):
        exact_quantile(torch.randn(3, 0), 0.5, dim=1)


# ------------------------------------------------------------------ host flag mirrors the buffer
def test_inited_flag_follows_buffer_through_reset_and_load():
    q = UniformQuantizer(4)
    assert not q.is_inited and not bool(q.inited)
    q(torch.randn(100))
    assert q.is_inited and bool(q.inited)
    state = {k: v.clone() for k, v in q.state_dict().items()}
    q.reset()
    assert not q.is_inited and not bool(q.inited)
    fresh = UniformQuantizer(4)
    fresh.load_state_dict(state)
    assert fresh.is_inited and torch.equal(fresh.delta, state["delta"])
    q.load_state_dict(fresh.state_dict())
    assert q.is_inited
    q.load_state_dict(UniformQuantizer(4).state_dict())  # an uncalibrated state turns it off
    assert not q.is_inited
    q.set_params(torch.tensor(0.5), torch.tensor(1.0))
    assert q.is_inited and bool(q.inited)


def test_prefiltered_topk_of_one_huge_row_is_exact():
    """Per-tensor rows above ``PREFILTER_MIN_N`` take the sampled-threshold shortcut: same values."""
    from qwt_core.quantizers import PREFILTER_MIN_N, _tail_topk
    g = torch.Generator().manual_seed(2)
    n = PREFILTER_MIN_N + 4099
    normal = torch.randn(n, generator=g)
    cauchy = torch.tan(math.pi * (torch.rand(n, generator=g) - 0.5))
    ties = torch.randint(-2, 3, (n,), generator=g).float()
    clustered = normal.clone()
    clustered[1000:3000] += 50.0  # all extreme values in one piece of the row (a "massive token")
    with_nan = normal.clone()
    with_nan[[7, 70000, n - 1]] = float("nan")
    relu = torch.relu(normal)  # half the row is 0: the lower tail is all ties (tie shortcut)
    relu_neg0 = relu.clone()
    relu_neg0[::3] = torch.where(relu_neg0[::3] == 0, torch.tensor(-0.0), relu_neg0[::3])
    few_zeros = normal.clone()
    few_zeros[normal.abs() < 1.0] = -4.0  # 68 % tie at the lower tail's edge, some values below
    few_zeros[:5] = -9.0
    relu_nan = relu.clone()
    relu_nan[123] = float("nan")
    for name, x in (("normal", normal), ("cauchy", cauchy), ("ties", ties),
                    ("clustered", clustered), ("nan", with_nan), ("relu", relu), ("relu_neg0", relu_neg0),
                    ("few_below_ties", few_zeros), ("relu_nan", relu_nan), ("relu_top", -relu)):
        for k in (n // 1000 + 2, 3, 263):
            for largest in (True, False):
                ours = _tail_topk(x[None], k, 1, largest)
                ref = torch.topk(x[None], k, 1, largest=largest).values
                assert torch.equal(ours.nan_to_num(123.0), ref.nan_to_num(123.0)), (name, k, largest)
        if "nan" not in name:
            for q in QS:
                assert torch.equal(exact_quantile(x, q, dim=0), kthvalue_quantile(x, q, 0)), (name, q)
