"""The streaming float64 least squares equals a direct solve on the stacked data."""
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import r2_score

from qwt_core.compensation import (GroupedConvLeastSquares, TokenLeastSquares, r2_from_moments,
                                   solve_normal_equations)


def _token_data(batches=4, tokens=50, d_in=12, d_out=9, noise=0.3):
    w = torch.randn(d_in, d_out)
    b = torch.randn(d_out)
    xs = [torch.randn(3, tokens, d_in) * 2 + 0.5 for _ in range(batches)]
    ys = [x @ w + b + noise * torch.randn(3, tokens, d_out) for x in xs]
    return xs, ys


def test_streaming_solution_equals_lstsq_on_stacked_data():
    xs, ys = _token_data()
    fitter = TokenLeastSquares(12, 9)
    for x, y in zip(xs, ys):
        fitter.update(x, y)
    fit = fitter.solve()
    a = torch.cat([torch.cat(xs).reshape(-1, 12), torch.ones(len(xs) * 150, 1)], 1).double()
    y = torch.cat(ys).reshape(-1, 9).double()
    theta = torch.linalg.lstsq(a, y).solution
    assert torch.allclose(fit.module.weight.double(), theta[:-1].T, atol=1e-5)
    assert torch.allclose(fit.module.bias.double(), theta[-1], atol=1e-5)
    pred = (a @ theta).numpy()
    assert fit.r2 == pytest.approx(r2_score(y.numpy(), pred, multioutput="variance_weighted"), abs=1e-9)
    assert fit.rows == 600


def test_compensation_layer_applies_the_fit():
    xs, ys = _token_data(noise=0.0)
    fitter = TokenLeastSquares(12, 9)
    for x, y in zip(xs, ys):
        fitter.update(x, y)
    fit = fitter.solve()
    assert fit.r2 == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(fit.module(xs[0]), ys[0], atol=1e-4)


def test_rank_deficient_features_fall_back_to_ridge():
    x = torch.randn(200, 4)
    x = torch.cat([x, x[:, :1]], 1)  # duplicated column: AᵀA is singular
    y = x[:, :2] * 3
    fitter = TokenLeastSquares(5, 2)
    fitter.update(x, y)
    fit = fitter.solve()
    assert torch.isfinite(fit.module.weight).all()
    assert fit.r2 > 0.999


def test_noise_target_gives_small_r2():
    fitter = TokenLeastSquares(3, 2)
    fitter.update(torch.randn(5000, 3), torch.randn(5000, 2))
    assert fitter.solve().r2 < 0.01


def test_solve_normal_equations_batched():
    a = torch.randn(3, 40, 6, dtype=torch.float64)
    y = torch.randn(3, 40, 2, dtype=torch.float64)
    theta = solve_normal_equations(a.transpose(1, 2) @ a, a.transpose(1, 2) @ y)
    assert torch.allclose(theta, torch.linalg.lstsq(a, y).solution, atol=1e-10)


@pytest.mark.parametrize("c_in,c_out,stride,k", [(64, 64, 1, 1), (128, 256, 2, 1), (128, 128, 1, 3),
                                                   (32, 64, 2, 3)])
def test_grouped_conv_fit_matches_per_group_ridge(c_in, c_out, stride, k):
    x = torch.randn(2, c_in, 8, 8)
    h = 8 // stride
    y = torch.randn(2, c_out, h, h)
    fitter = GroupedConvLeastSquares(c_in, c_out, stride, kernel_size=k, ridge=1e-3)
    fitter.update(x[:1], y[:1])
    fitter.update(x[1:], y[1:])
    fit = fitter.solve()
    conv = fit.module
    assert conv.groups == max(1, c_in // 64) and conv.stride == (stride, stride)
    # reference: explicit unfold per group, (AᵀA + λI)⁻¹AᵀY in float64
    cols = F.unfold(x.double(), k, padding=k // 2, stride=stride)  # (B, C_in·k², L)
    g = conv.groups
    pred = torch.zeros_like(y, dtype=torch.float64)
    for gi in range(g):
        per = c_in // g * k * k
        a = cols[:, gi * per:(gi + 1) * per].permute(0, 2, 1).reshape(-1, per)
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
        oc = slice(gi * c_out // g, (gi + 1) * c_out // g)
        t = y[:, oc].double().reshape(2, c_out // g, -1).permute(0, 2, 1).reshape(-1, c_out // g)
        theta = torch.linalg.solve(a.T @ a + 1e-3 * torch.eye(a.shape[1], dtype=a.dtype), a.T @ t)
        pred[:, oc] = (a @ theta).reshape(2, h * h, -1).permute(0, 2, 1).reshape(2, -1, h, h)
    # the conv layer reproduces the per-group regression (checks the weight layout)
    assert torch.allclose(conv(x).double(), pred, atol=1e-4)


def test_r2_from_moments_matches_sklearn_grouped():
    a = torch.cat([torch.randn(2, 100, 3), torch.ones(2, 100, 1)], 2).double()
    y = (a[..., :2] * 2 + 0.5 * torch.randn(2, 100, 2)).double()
    ata, aty = a.transpose(1, 2) @ a, a.transpose(1, 2) @ y
    theta = solve_normal_equations(ata, aty)
    r2 = r2_from_moments(ata, aty, y.pow(2).sum(), theta)
    # SS over both groups: group-wise means, summed residuals
    ss_res = (y - a @ theta).pow(2).sum()
    ss_tot = (y - y.mean(1, keepdim=True)).pow(2).sum()
    assert r2 == pytest.approx(float(1 - ss_res / ss_tot), abs=1e-10)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_fitter_1x1_patches_equal_unfold(stride):
    """The 1x1 fast path (strided pixels copied into place) gives the unfold + permute + cat patches
    bit for bit, and the same moments up to the float64 summation order of the GEMM."""
    from qwt_core.compensation import GroupedConvLeastSquares

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 128, 9, 9, generator=g)
    fitter = GroupedConvLeastSquares(128, 256, stride=stride, kernel_size=1, group_channels=64)
    cols = torch.nn.functional.unfold(x.double(), 1, padding=0, stride=stride)
    b, _, length = cols.shape
    cols = cols.reshape(b, 2, -1, length).permute(1, 0, 3, 2).reshape(2, b * length, -1)
    ref = torch.cat([cols, cols.new_ones(2, b * length, 1)], dim=2)
    assert torch.equal(fitter._patches(x), ref)
    h = len(range(0, 9, stride))
    y = torch.randn(3, 256, h, h, generator=g)
    fitter.update(x, y)
    t = y.double().reshape(3, 2, -1, h * h).permute(1, 0, 3, 2).reshape(2, 3 * h * h, -1)
    for got, want in ((fitter.aty[0], ref.transpose(1, 2) @ t), (fitter.ata[0], ref.transpose(1, 2) @ ref)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13 * float(want.abs().max()))
