"""QwT engine: held-out gate and automatic ridge, rank-deficient features, the ResNet R² definitions,
row masks and block kwargs, early errors, and the adapter-level recipe defaults."""
import warnings

import pytest
import torch
from torch import nn

from helpers_models import images, tiny_vit
from qwt_core import BlockInput, LayerBits, calibrate, compensate, quantize_layers
from qwt_core.compensation import CompensatedBlock
from qwt_core.qwt import apply_qwt
from qwt_core.adapters import quantize_timm_vit
from qwt_core.modules import set_quant_state
from qwt_core.compensation import GroupedConvLeastSquares, TokenLeastSquares, solve_normal_equations
from qwt_core.qwt import _sample_flags


# ---------------------------------------------------------------------------------------------
# helpers
class MLPBlock(nn.Module):
    """Token-wise residual MLP block; optional ``scale`` keyword (to test block kwargs)."""

    def __init__(self, d=16, h=32):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x, scale=None):
        y = x + self.fc2(torch.relu(self.fc1(x)))
        return y if scale is None else y * scale


def quantized_mlp_stack(n_blocks=3, bits=3, d=16, seed=0):
    """``Sequential(Linear(8, d), MLPBlock × n)`` with every block Linear at W/A ``bits`` (calibrated)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, d), *[MLPBlock(d) for _ in range(n_blocks)]).eval()
    quantize_layers(model, lambda name, m: None if name == "0" else LayerBits(bits, bits))
    with torch.no_grad():
        model(torch.randn(256, 8, generator=torch.Generator().manual_seed(99)))
    set_quant_state(model, True, True)
    return model


def stacked_rows(xs, ys):
    a = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double()
    a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
    return a, torch.cat([y.reshape(-1, y.shape[-1]) for y in ys]).double()


def r2_of(a, y, theta):
    ss_res = (y - a @ theta).pow(2).sum()
    ss_tot = (y - y.mean(0)).pow(2).sum()
    return float(1 - ss_res / ss_tot)


# ---------------------------------------------------------------------------------------------
# held-out gate and ridge
def test_holdout_rejects_overfit_that_insample_accepts():
    """Pure-noise targets with nearly as many features as rows: in-sample R² is large, held-out < 0."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 4, 30, generator=g), torch.randn(40, 4, 5, generator=g)  # 160 rows, 31 cols
    fitter = TokenLeastSquares(30, 5)
    for xb, yb, hv in zip(x.split(8), y.split(8), _sample_flags([8] * 5, 4)):
        fitter.update(xb, yb, heldout=hv)
    ins = fitter.fit(gate="insample", ridge=0.0)
    hold = fitter.fit(gate="holdout", ridge="auto")
    assert ins.applied and ins.r2 > 0.1
    assert ins.r2_heldout is not None and ins.r2_heldout < 0
    assert not hold.applied and hold.r2 == hold.r2_heldout and hold.r2 <= 0
    assert hold.mse_after == hold.mse_before
    assert hold.rows == 160 and hold.rows_heldout == 40


def test_heldout_r2_and_refit_match_explicit_stacked_computation():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 3, generator=g)
    xs = [torch.randn(8, 5, 6, generator=g) for _ in range(4)]
    ys = [x @ w + 0.5 * torch.randn(8, 5, 3, generator=g) for x in xs]
    flags = _sample_flags([8] * 4, 4)
    fitter = TokenLeastSquares(6, 3)
    for x, y, hv in zip(xs, ys, flags):
        fitter.update(x, y, heldout=hv)
    fit = fitter.fit(gate="holdout", ridge=0.0)
    a_fit, y_fit = stacked_rows([x[~h] for x, h in zip(xs, flags)], [y[~h] for y, h in zip(ys, flags)])
    a_val, y_val = stacked_rows([x[h] for x, h in zip(xs, flags)], [y[h] for y, h in zip(ys, flags)])
    theta_fit = torch.linalg.lstsq(a_fit, y_fit).solution
    assert fit.r2_heldout == pytest.approx(r2_of(a_val, y_val, theta_fit), abs=1e-9)
    a_all, y_all = stacked_rows(xs, ys)
    theta_all = torch.linalg.lstsq(a_all, y_all).solution
    assert torch.allclose(fit.theta[0], theta_all, atol=1e-9)
    assert fit.r2_insample == pytest.approx(r2_of(a_all, y_all, theta_all), abs=1e-9)
    assert fit.applied and fit.rows_heldout == 8 * 5
    assert fit.mse_before == pytest.approx(float(y_all.pow(2).mean()), rel=1e-9)
    assert fit.mse_after == pytest.approx(float((y_all - a_all @ theta_all).pow(2).mean()), rel=1e-7)


def test_auto_ridge_is_chosen_on_heldout_rows_and_refit_with_it():
    """Few rows per feature + noise: a ridge beats λ=0 on the held-out rows; the refit uses that λ."""
    g = torch.Generator().manual_seed(2)
    d = 40
    w = torch.randn(d, 4, generator=g) * 0.2
    xs = [torch.randn(8, 3, d, generator=g) for _ in range(5)]  # 120 rows for 41 columns
    ys = [x @ w + 1.0 * torch.randn(8, 3, 4, generator=g) for x in xs]
    flags = _sample_flags([8] * 5, 4)
    fitter = TokenLeastSquares(d, 4)
    for x, y, hv in zip(xs, ys, flags):
        fitter.update(x, y, heldout=hv)
    auto = fitter.fit(gate="holdout", ridge="auto")
    zero = fitter.fit(gate="holdout", ridge=0.0)
    assert auto.ridge_rel is not None and auto.ridge_rel > 0
    assert auto.r2_heldout > zero.r2_heldout
    # the refit is ridge on centred features with the chosen λ (intercept not shrunk), on all rows
    a, y = stacked_rows(xs, ys)
    xc = a[:, :-1] - a[:, :-1].mean(0)
    yc = y - y.mean(0)
    w_ref = torch.linalg.solve(xc.T @ xc + auto.ridge * torch.eye(d, dtype=xc.dtype), xc.T @ yc)
    assert torch.allclose(auto.theta[0, :-1], w_ref, atol=1e-9)
    b_ref = y.mean(0) - a[:, :-1].mean(0) @ w_ref
    assert torch.allclose(auto.theta[0, -1], b_ref, atol=1e-9)


def test_insample_gate_reproduces_reference_solver():
    """gate='insample' + λ=0 (token) is the papers' solve on all rows: (AᵀA)⁻¹AᵀY, in-sample R²."""
    model = quantized_mlp_stack()
    data = [torch.randn(64, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with torch.no_grad():
        y_q = [model[1](x) for x in data]
        set_quant_state(model[1], False, False)
        y_fp = [model[1](x) for x in data]
        set_quant_state(model[1], True, True)
    a, y = stacked_rows(data, [f - q for f, q in zip(y_fp, y_q)])
    theta = solve_normal_equations(a.T @ a, a.T @ y, 0.0)
    report = apply_qwt(model, ["1", "2", "3"], data, lambda b: b, gate="insample", ridge=0.0,
                       progress=False)
    b0 = report.blocks[0]
    assert b0.applied and b0.r2 == b0.r2_insample == pytest.approx(r2_of(a, y, theta), abs=1e-9)
    assert b0.rank_deficiency == 0 and b0.r2_heldout is not None
    assert torch.allclose(model[1].compensation.weight.double(), theta[:-1].T, atol=1e-5)
    assert torch.allclose(model[1].compensation.bias.double(), theta[-1], atol=1e-5)
    assert report.to_dict()["gate"] == "insample" and b0.ridge == 0.0


def test_insample_conv_reference_ridge_on_every_column():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 64, 6, 6, generator=g), torch.randn(4, 64, 6, 6, generator=g)
    fitter = GroupedConvLeastSquares(64, 64, 1, ridge=1e-3)
    fitter.update(x, y, heldout=_sample_flags([4], 4)[0])
    fit = fitter.fit(gate="insample")
    a = torch.cat([x.double().permute(0, 2, 3, 1).reshape(-1, 64), torch.ones(144, 1, dtype=torch.float64)], 1)
    t = y.double().permute(0, 2, 3, 1).reshape(-1, 64)
    theta = torch.linalg.solve(a.T @ a + 1e-3 * torch.eye(65, dtype=a.dtype), a.T @ t)
    assert torch.allclose(fit.theta[0], theta, atol=1e-10)
    assert fit.ridge == 1e-3


# ---------------------------------------------------------------------------------------------
# rank-deficient features (issue 14)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exact_linear_relation_gives_bounded_min_norm_fit(dtype):
    """LayerNorm output (channels satisfy Σ (x_c - β_c)/γ_c = 0, like open_clip's ln_pre): the default
    solver finds the null direction, reports it and returns the minimum-norm least squares."""
    g = torch.Generator().manual_seed(4)
    d, m = 24, 8
    ln = nn.LayerNorm(d).to(dtype)
    with torch.no_grad():
        ln.weight.copy_(0.5 + torch.rand(d, generator=g))
        ln.bias.copy_(torch.randn(d, generator=g))
        ln.weight[3] = 20.0  # an outlier channel
    raw = [torch.randn(8, 10, d, generator=g, dtype=dtype) * 3 for _ in range(6)]
    with torch.no_grad():
        xs = [ln(r) for r in raw]
    w = torch.randn(d, m, generator=g, dtype=dtype)
    ys = [torch.tanh(x @ w * 0.3) + 0.05 * torch.randn(8, 10, m, generator=g, dtype=dtype) for x in xs]
    flags = _sample_flags([8] * 6, 4)
    fitter = TokenLeastSquares(d, m)
    for x, y, hv in zip(xs, ys, flags):
        fitter.update(x, y, heldout=hv)
    fit = fitter.fit(gate="holdout", ridge=0.0)
    assert fit.rank_deficiency == 1
    a, y = stacked_rows(xs, ys)
    rtol = 1e-6 if dtype == torch.float32 else 1e-10  # singular values (sqrt of the eigenvalue rtol)
    theta_pinv = torch.linalg.pinv(a, rtol=rtol) @ y
    assert fit.r2_insample == pytest.approx(r2_of(a, y, theta_pinv), abs=1e-6)
    w_fit = fit.theta[0, :-1]
    # bounded: no component along the null direction of the centred features
    xc = a[:, :-1] - a[:, :-1].mean(0)
    null = torch.linalg.eigh(xc.T @ xc).eigenvectors[:, :1]
    assert float((null.T @ w_fit).abs().max()) < 1e-6 * float(w_fit.abs().max())
    assert float(w_fit.norm()) <= 1.01 * float(theta_pinv[:-1].norm()) + 1e-6
    auto = fitter.fit(gate="holdout", ridge="auto")
    assert auto.rank_deficiency == 1 and float(auto.theta[0, :-1].norm()) <= float(w_fit.norm()) + 1e-9


# ---------------------------------------------------------------------------------------------
# ResNet R² definitions (issue 8), by hand
def _intercept_only_fit(r2_mean):
    """x ≡ 0 (1 channel), y (2, 1, 1, 2) = [[1, 3]], [[3, 5]]: the fit is the channel mean 3."""
    y = torch.tensor([[[[1.0, 3.0]]], [[[3.0, 5.0]]]])
    fitter = GroupedConvLeastSquares(1, 1, 1, r2_mean=r2_mean)
    fitter.update(torch.zeros(2, 1, 1, 2), y)
    return fitter


def test_conv_r2_channel_mean_by_hand():
    fit = _intercept_only_fit("channel").fit(gate="insample", ridge=0.0)
    # prediction 3 everywhere; SS_res = 4+0+0+4 = 8; SS_tot around the channel mean 3 = 8 → R² = 0
    assert float(fit.theta[0, -1, 0]) == pytest.approx(3.0, abs=1e-9)
    assert fit.r2 == pytest.approx(0.0, abs=1e-9)


def test_conv_r2_channel_position_mean_by_hand():
    fit = _intercept_only_fit("channel_position").fit(gate="insample", ridge=0.0)
    # position means 2 and 4: SS_tot = 1+1+1+1 = 4; SS_res = 8 → R² = 1 - 8/4 = -1
    assert fit.r2 == pytest.approx(-1.0, abs=1e-9) and not fit.applied


def test_conv_r2_definitions_on_a_real_fit():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 2, 2, generator=g)
    y = x[:, :1] * 2 + torch.randn(3, 1, 2, 2, generator=g) + torch.arange(4.0).reshape(1, 1, 2, 2)
    for mean in ("channel", "channel_position"):
        fitter = GroupedConvLeastSquares(2, 1, 1, r2_mean=mean)
        fitter.update(x, y)
        fit = fitter.fit(gate="insample", ridge=0.0)
        pred = fit.module(x).double()
        ss_res = (y.double() - pred).pow(2).sum()
        centre = y.mean((0, 2, 3), keepdim=True) if mean == "channel" else y.mean(0, keepdim=True)
        ss_tot = (y - centre).double().pow(2).sum()
        assert fit.r2 == pytest.approx(float(1 - ss_res / ss_tot), abs=1e-6), mean


class ConvBlock(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


def test_conv_form_default_is_channel_position_r2():
    """apply_qwt's conv default is the per-(channel, position) R²; on the same block-0 fit it is lower."""
    import inspect
    assert inspect.signature(apply_qwt).parameters["conv_r2_mean"].default == "channel_position"
    g = torch.Generator().manual_seed(7)
    x = torch.randn(8, 3, 8, 8, generator=g) + torch.linspace(-2, 2, 8).reshape(1, 1, 1, 8)
    r2 = {}
    for mean in (None, "channel"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 1), ConvBlock(), ConvBlock()).eval()
        quantize_layers(model, lambda name, m: None if name == "0" else LayerBits(3, 3))
        with torch.no_grad():
            model(x)
        extra = {} if mean is None else {"conv_r2_mean": mean}
        rep = apply_qwt(model, ["1", "2"], [x], lambda b: model[0](b), form="conv", gate="insample",
                        progress=False, **extra)
        r2[mean] = rep.blocks[0].r2
    assert r2[None] < r2["channel"] - 1e-6


# ---------------------------------------------------------------------------------------------
# masks and block kwargs
def test_masked_rows_change_nothing_in_the_fit():
    g = torch.Generator().manual_seed(6)
    xs = [torch.randn(8, 7, 12, generator=g) for _ in range(3)]
    ys = [torch.randn(8, 7, 5, generator=g) + x[..., :5] for x in xs]
    flags = _sample_flags([8] * 3, 4)
    plain, padded = TokenLeastSquares(12, 5), TokenLeastSquares(12, 5)
    for x, y, hv in zip(xs, ys, flags):
        plain.update(x, y, heldout=hv)
        pad_x = torch.cat([x, 1e3 * torch.randn(8, 4, 12, generator=g)], 1)  # 4 garbage rows/sample
        pad_y = torch.cat([y, float("nan") * torch.ones(8, 4, 5)], 1)
        mask = torch.cat([torch.ones(8, 7), torch.zeros(8, 4)], 1)
        padded.update(pad_x, pad_y, mask=mask, heldout=hv)
    for gate, ridge in (("holdout", "auto"), ("insample", 0.0)):
        a, b = plain.fit(gate=gate, ridge=ridge), padded.fit(gate=gate, ridge=ridge)
        assert torch.allclose(a.theta, b.theta, atol=1e-10, rtol=0), gate
        assert a.rows == b.rows == 8 * 7 * 3 and a.r2 == pytest.approx(b.r2, abs=1e-10)


def test_block_input_masks_and_kwargs_through_apply_qwt():
    """Padded batches (mask 0 on padding, kwargs reaching every block) give the unpadded compensation."""
    def run(padded):
        model = quantized_mlp_stack(seed=1)
        seen = []

        def first(batch):
            x = model[0](batch)                                     # (B, T, 16)
            if not padded:
                return BlockInput(x, block_kwargs={"scale": 0.5})
            pad = torch.cat([x, torch.full((x.shape[0], 3, 16), 50.0)], 1)
            mask = torch.cat([torch.ones(x.shape[:2], dtype=torch.bool),
                              torch.zeros(x.shape[0], 3, dtype=torch.bool)], 1)
            return BlockInput(pad, row_mask=mask, block_kwargs={"scale": 0.5})

        def run_block(i, block, x, scale=None):
            seen.append(scale)
            return block(x, scale=scale)

        data = [torch.randn(8, 5, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
        report = apply_qwt(model, ["1", "2", "3"], data, first, run_block=run_block, progress=False)
        assert set(seen) == {0.5}
        return model, report

    m_plain, r_plain = run(False)
    m_pad, r_pad = run(True)
    for i in (1, 2, 3):
        assert isinstance(m_plain[i], CompensatedBlock) == isinstance(m_pad[i], CompensatedBlock)
        if isinstance(m_plain[i], CompensatedBlock):
            for p, q in zip(m_plain[i].compensation.parameters(), m_pad[i].compensation.parameters()):
                assert torch.allclose(p, q, atol=1e-10, rtol=0)
    assert [b.rows for b in r_plain.blocks] == [b.rows for b in r_pad.blocks] == [160] * 3
    assert any(b.applied for b in r_plain.blocks)


def test_default_run_block_passes_kwargs_and_old_three_arg_run_block_still_works():
    model = quantized_mlp_stack(seed=2)
    data = [torch.randn(32, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    rep = apply_qwt(model, ["1"], data, lambda b: BlockInput(model[0](b), block_kwargs={"scale": 2.0}),
                    progress=False)
    assert rep.blocks[0].rows == 64
    model2 = quantized_mlp_stack(seed=2)
    calls = []
    rep2 = apply_qwt(model2, ["1"], data, lambda b: model2[0](b),
                     run_block=lambda i, block, x: calls.append(i) or block(x), progress=False)
    assert calls and rep2.blocks[0].rows == 64


# ---------------------------------------------------------------------------------------------
# split
def test_split_is_the_same_for_a_sharded_run():
    single = torch.cat(_sample_flags([16] * 4, 4))
    shards = [_sample_flags([16, 16], 4) for _ in range(2)]  # rank r gets batches r, r+2
    sharded = torch.cat([shards[0][0], shards[1][0], shards[0][1], shards[1][1]])
    assert torch.equal(single, sharded)
    assert int(single.sum()) == 16
    assert torch.equal(torch.cat(_sample_flags([1, 1, 1], 4)), torch.tensor([False, True, False]))


# ---------------------------------------------------------------------------------------------
# early errors: nothing is modified
def _unchanged(model):
    return not any(isinstance(m, CompensatedBlock) for m in model.modules())


@pytest.mark.parametrize("names,match", [
    (["1", "4"], r"'4' is not a submodule"),
    (["1", "1"], "listed 2 times"),
    (["1", "1.fc1"], "nested"),
    (["2", "1"], "registration order"),
    ([], "empty"),
])
def test_bad_block_lists_fail_before_any_work(names, match):
    model = quantized_mlp_stack()
    calls = []
    with pytest.raises(ValueError, match=match):
        apply_qwt(model, names, [torch.randn(4, 8)], lambda b: calls.append(1) or model[0](b), progress=False)
    assert not calls and _unchanged(model)


def test_typo_gets_close_name_suggestions():
    model = tiny_vit()
    with pytest.raises(ValueError, match=r"did you mean 'blocks\.0'"):
        apply_qwt(model, ["block.0"], [images(2, 32)], lambda b: b, progress=False)


def test_empty_calibration_and_single_tensor():
    model = quantized_mlp_stack()
    with pytest.raises(ValueError, match="no calibration batches"):
        apply_qwt(model, ["1"], [], lambda b: model[0](b), progress=False)
    with pytest.raises(TypeError, match="single tensor"):
        apply_qwt(model, ["1"], torch.randn(4, 8), lambda b: model[0](b), progress=False)


def test_nan_input_and_output_name_the_block_and_leave_model_unchanged():
    model = quantized_mlp_stack()
    data = [torch.randn(16, 8) for _ in range(2)]
    bad = [d.clone() for d in data]
    bad[1][3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/Inf in the input .* block 0 \('1'\)"):
        apply_qwt(model, ["1", "2"], bad, lambda b: model[0](b), progress=False)
    assert _unchanged(model)

    def run_block(i, block, x):  # block 2's FP pass (quantization off) overflows
        y = block(x)
        return y * float("inf") if i == 2 and not block.fc1.use_act_quant else y

    with pytest.raises(ValueError, match=r"full-precision output .* of QwT block 2 \('3'\)"):
        apply_qwt(model, ["1", "2", "3"], data, lambda b: model[0](b), run_block=run_block, progress=False)
    assert _unchanged(model)  # blocks 0 and 1 were fitted, but nothing was installed


def test_already_compensated_block_is_rejected():
    model = quantized_mlp_stack()
    data = [torch.randn(64, 8)]
    apply_qwt(model, ["1"], data, lambda b: model[0](b), gate="insample", progress=False)
    assert isinstance(model[1], CompensatedBlock)
    with pytest.raises(ValueError, match="already compensated"):
        apply_qwt(model, ["1"], data, lambda b: model[0](b), progress=False)


def test_bad_options_fail_early():
    model = quantized_mlp_stack()
    data = [torch.randn(16, 8)]
    for kwargs, match in (({"gate": "sometimes"}, "gate="), ({"ridge": -1.0}, "ridge="),
                          ({"gate": "insample", "ridge": "auto"}, "ridge='auto'"),
                          ({"conv_r2_mean": "pixel"}, "conv_r2_mean"), ({"start_block": 5}, "start_block")):
        with pytest.raises(ValueError, match=match):
            apply_qwt(model, ["1"], data, lambda b: model[0](b), progress=False, **kwargs)
    with pytest.raises(ValueError, match="held-out rows"):  # one sample: nothing to hold out
        apply_qwt(model, ["1"], [torch.randn(1, 8)], lambda b: model[0](b), progress=False)
    assert _unchanged(model)


def test_few_rows_warn_once():
    model = quantized_mlp_stack()
    data = [torch.randn(12, 8)]  # 9 fit rows for 17 columns
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_qwt(model, ["1", "2"], data, lambda b: model[0](b), progress=False)
    msgs = [str(w.message) for w in caught if "fit rows" in str(w.message)]
    assert len(msgs) == 1 and "block 0 ('1'): 9 fit rows for 17 features" in msgs[0]


# ---------------------------------------------------------------------------------------------
# compensate(): recipe defaults, batch types, report
def test_compensate_honours_qwt_kwargs_and_explicit_overrides():
    model = tiny_vit()
    x = images(16, 32, seed=2)
    qm = quantize_timm_vit(model, 4, 4)
    calibrate(qm, [x[:8], x[8:]])  # a list of tensors is one RepQ batch
    qm.qwt_config = qm.qwt_config.replace(gate="insample", start_block=1)
    rep = compensate(qm, x, progress=False)  # a single tensor is one batch
    assert rep.gate == "insample" and rep.blocks[0].r2 is None and rep.blocks[1].r2 is not None
    with pytest.raises(TypeError, match="unknown QwT option"):
        compensate(qm, x, progress=False, bogus=1)


def test_compensate_select_and_report_contract():
    model = tiny_vit()
    x = images(32, 32, seed=3)
    qm = quantize_timm_vit(model, 4, 4)
    calibrate(qm, x)
    loader = [(x[:16], torch.zeros(16)), (x[16:], torch.zeros(16))]
    rep = compensate(qm, loader, select=lambda b: b[0], progress=False)
    d = rep.to_dict()
    assert d["gate"] == "holdout" and set(d) >= {"seconds", "gate", "blocks"}
    keys = {"index", "name", "applied", "rows", "r2", "r2_insample", "r2_heldout", "ridge", "mse_before",
            "mse_after", "rank_deficiency", "seconds"}
    for b in d["blocks"]:
        assert keys <= set(b)
        assert b["r2"] == b["r2_heldout"] and b["applied"] == (b["r2"] > 0)
        assert b["mse_after"] <= b["mse_before"]
    table = rep.format_table()
    assert "R2 held" in table and "MSE before" in table and "blocks.0" in table
