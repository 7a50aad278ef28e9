"""The speed paths give the same numbers as the reference paths, and the forward never syncs.

* topk quantile initialisation (incl. the prefiltered single-row topk) == the previous kthvalue
  code, on whole calibrated models (every quantizer buffer, every output bit);
* the calibrated (and QwT-compensated) forward reads no tensor on the host
  (no ``.item()``/``bool(tensor)``/``torch.equal``), and hits the quantized-weight cache;
* ``torch.compile``-fused fake quantization == eager fake quantization, bit for bit;
* ``torch.compile`` of a whole calibrated (and compensated) model traces in one graph whose ops
  give the eager outputs bit for bit;
* the CPU paths (piecewise fake quantization and candidate errors, the log-√2 floor, both quantile
  tails in one pass) == the whole-tensor formulas, bit for bit.
"""
import copy
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import qwt_core
import qwt_core.quantizers as qz
from qwt_core.modules import QuantConv2d, QuantLinear, quantizers
from tests.helpers_models import (images, kthvalue_quantile, least_squares_fitter, log_edge_values, tiny_resnet,
                                  tiny_swin, tiny_vit)

ADAPTERS = {"vit": (tiny_vit, qwt_core.adapters.quantize_timm_vit, 32),
            "swin": (tiny_swin, qwt_core.adapters.quantize_timm_swin, 56),
            "resnet": (tiny_resnet, qwt_core.adapters.quantize_resnet, 32)}


def _kthvalue_quantiles(x, qs, dim=-1, method="auto"):
    """The previous implementation: two kthvalue calls per quantile."""
    return [kthvalue_quantile(x, q, dim) for q in qs]


def _calibrated(kind: str, n_images: int = 4, bits: int = 4):
    make, adapter, size = ADAPTERS[kind]
    torch.manual_seed(0)
    qm = adapter(make(), bits, bits)
    x = images(n_images, size, seed=3)
    qwt_core.calibrate(qm, x)
    return qm, x


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("kind", ["vit", "swin", "resnet"])  # ResNet: post-ReLU ties at 0
def test_topk_calibration_equals_kthvalue_reference(kind, monkeypatch):
    # a low prefilter threshold so that the small models also take the single-row shortcut
    monkeypatch.setattr(qz, "PREFILTER_MIN_N", 2048)
    fast, x = _calibrated(kind)
    with monkeypatch.context() as m:
        m.setattr(qz, "exact_quantiles", _kthvalue_quantiles)
        ref, _ = _calibrated(kind)
    _assert_same_state(fast.model, ref.model)
    with torch.no_grad():
        assert torch.equal(fast.model(x), ref.model(x))


class _HostReads(TorchDispatchMode):
    """Records aten ops that copy a tensor value to the host (a GPU sync on CUDA): scalar reads, and
    ops whose output shape depends on the values (boolean-mask indexing, ``nonzero``, ``unique``)."""

    SYNC_OPS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal", "aten::item",
                "aten::nonzero", "aten::masked_select", "aten::_unique2", "aten::unique_dim",
                "aten::unique_consecutive", "aten::repeat_interleave"}
    INDEX_OPS = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in self.SYNC_OPS:
            self.seen.append(name)
        elif name in self.INDEX_OPS and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                             for i in (args[1] if len(args) > 1 else ()) or ()):
            self.seen.append(f"{name} with a boolean mask")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["vit", "swin", "resnet"])
def test_calibrated_forward_reads_nothing_on_host(kind):
    qm, x = _calibrated(kind)
    with torch.no_grad():
        qm.model(x)  # fills the quantized-weight caches
        with _HostReads() as mode:
            qm.model(x)
        assert mode.seen == [], f"host reads in the calibrated forward: {sorted(set(mode.seen))}"
        qwt_core.compensate(qm, [x[:2], x[2:]], progress=False)
        qm.model(x)
        with _HostReads() as mode:
            qm.model(x)
        assert mode.seen == [], f"host reads after QwT: {sorted(set(mode.seen))}"


def test_quantized_weight_cache_is_hit_during_eval(monkeypatch):
    qm, x = _calibrated("vit")
    layers = [m for m in qm.model.modules() if isinstance(m, (QuantLinear, QuantConv2d))]
    calls = []
    original = qz.UniformQuantizer.quantize

    def counting(self, t):
        calls.append(self)
        return original(self, t)

    with torch.no_grad():
        qm.model(x)
        monkeypatch.setattr(qz.UniformQuantizer, "quantize", counting)
        qm.model(x)
    weight_quantizers = {id(layer.weight_quantizer) for layer in layers}
    assert layers and not any(id(q) in weight_quantizers for q in calls)
    assert len(calls) > 0  # activations are still quantized


def test_inited_flag_survives_save_and_load():
    qm, x = _calibrated("vit")
    state = copy.deepcopy(qm.model.state_dict())
    make, adapter, _ = ADAPTERS["vit"]
    fresh = adapter(make(), 4, 4)
    assert not any(q.is_inited for _, q in quantizers(fresh.model))
    fresh.model.load_state_dict(state)
    assert all(q.is_inited == bool(q.inited) for _, q in quantizers(fresh.model))
    assert all(q.is_inited for _, q in quantizers(fresh.model))
    with torch.no_grad():
        assert torch.equal(fresh.model(x), qm.model(x))


def test_fused_fake_quant_is_bit_identical(monkeypatch):
    """torch.compile-fused quantizers (calibration and forward) give exactly the eager numbers."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 40, 24, generator=g) * 3
    attn = torch.randn(5, 2, 40, 40, generator=g).mul(3).softmax(-1)
    attn[0, 0, 0, :5] = 0.0  # exact zeros are dropped
    cases = [(qz.UniformQuantizer(4), x), (qz.UniformQuantizer(3, channel_wise=True, channel_dim=-1), x),
             (qz.UniformQuantizer(8, channel_wise=True, channel_dim=0), x.reshape(200, 24)),
             (qz.LogSqrt2Quantizer(4), attn), (qz.LogSqrt2Quantizer(8), attn)]
    eager = []
    for q, t in cases:
        calibrated = copy.deepcopy(q)
        eager.append((q, calibrated, calibrated(t), t))
    monkeypatch.setattr(qz._FusedFakeQuant, "enabled", True)
    for q, calibrated, ref, t in eager:
        assert torch.equal(calibrated(t), ref)  # fused forward, eager calibration
        assert torch.equal(q(t), ref)  # fused calibration (fused squared errors) and forward
        _assert_same_state(q, calibrated)
    # non-contiguous views (kᵀ and v of a qkv output): same values and the same strides as eager
    qkv = torch.randn(3, 9, 3, 2, 8, generator=g).permute(2, 0, 3, 1, 4)
    for view in (qkv[1].transpose(-2, -1), qkv[2]):
        q = qz.UniformQuantizer(4)
        q.set_params(torch.tensor(0.21), torch.tensor(7.0))
        fused_out = q(view)
        monkeypatch.setattr(qz._FusedFakeQuant, "enabled", False)
        eager_out = q(view)
        monkeypatch.setattr(qz._FusedFakeQuant, "enabled", True)
        assert torch.equal(fused_out, eager_out) and fused_out.stride() == eager_out.stride()
    # fractional zero point (after the LayerNorm reparameterization) and Δ above the data range
    q = qz.UniformQuantizer(4)
    q.set_params(torch.tensor(0.3), torch.tensor(6.37))
    big = torch.randn(3, 7, 11, generator=g) * 4
    fused_out = q(big)
    monkeypatch.setattr(qz._FusedFakeQuant, "enabled", False)
    assert torch.equal(fused_out, q(big))


def test_fused_model_equals_eager_model(monkeypatch):
    """A whole model calibrated and run with fused quantizers: same buffers, same outputs."""
    eager, x = _calibrated("vit")
    monkeypatch.setattr(qz._FusedFakeQuant, "enabled", True)
    fused, _ = _calibrated("vit")
    _assert_same_state(fused.model, eager.model)
    with torch.no_grad():
        assert torch.equal(fused.model(x), eager.model(x))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("kind", ["vit", "swin", "resnet"])
def test_whole_model_compiles_in_one_graph_with_the_same_outputs(kind, fused, monkeypatch):
    """``torch.compile(qm.model)`` of a calibrated, QwT-compensated model traces in one graph (the
    weight cache, the host zero point, the CPU pieces and the fused kernels step aside while
    compiling), and the traced graph computes the eager outputs bit for bit (``aot_eager`` runs the
    traced ops; inductor's own fusions of the FP ops round differently, see README "Speed")."""
    monkeypatch.setattr(qz._FusedFakeQuant, "enabled", fused)
    qm, x = _calibrated(kind)
    qwt_core.compensate(qm, [x[:2], x[2:]], progress=False)
    with torch.no_grad():
        ref = qm.model(x)
        torch._dynamo.reset()
        try:
            out = torch.compile(qm.model, backend="aot_eager", fullgraph=True)(x)
        finally:
            torch._dynamo.reset()
        assert torch.equal(out, ref)
        assert torch.equal(qm.model(x), ref)  # the eager model (and its caches) unchanged


def test_fused_kernels_fail_loudly_past_their_graph_limit(monkeypatch):
    """More input layouts than the fused kernel's graph limit raise instead of silently running
    uncompiled (dynamo's default of 8 was silently exceeded by Swin-T); the default limit is above
    what Swin-T needs (12 graphs)."""
    assert qz._FusedFakeQuant.RECOMPILE_LIMIT >= 16
    monkeypatch.setattr(qz._FusedFakeQuant, "RECOMPILE_LIMIT", 1)
    monkeypatch.setattr(qz._FusedFakeQuant, "_fns", {})
    torch._dynamo.reset()
    fn = qz._FusedFakeQuant.get("uniform")
    d, z = torch.tensor(0.2), torch.tensor(3.0)
    fn(torch.randn(40), d, z, 4)  # graph 1
    with pytest.raises(Exception, match="(?i)recompil"):
        fn(torch.randn(5, 8), d.view(1, 1), z.view(1, 1), 4)  # another rank: a second graph
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("z", [0.0, -0.0, 7.0, 3.3, -2.71828, 1e-3])
def test_number_bounds_clamp_equals_tensor_bounds(dtype, z):
    """The CPU fast path (Python-number clamp bounds) gives the tensor-bounds values bit for bit,
    also for the non-integer zero points of the LayerNorm reparameterization, NaN and ±inf."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4096, generator=g, dtype=torch.float64) * 3).to(dtype)
    x[::97] = float("nan")
    x[1::101], x[2::103] = float("inf"), -float("inf")
    delta = torch.tensor(0.37, dtype=dtype)
    zp = torch.tensor(z, dtype=dtype)
    for bits in (4, 8):
        ref = qz.uniform_fake_quant(x, delta, zp, bits)
        fast = qz.uniform_fake_quant(x, delta, zp, bits, zero_point_number=float(zp))
        torch.testing.assert_close(fast, ref, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(torch.signbit(fast[~fast.isnan()]), torch.signbit(ref[~ref.isnan()]))


def test_host_zero_point_follows_in_place_changes():
    """The quantizer's cached host z is keyed by tensor identity and version: an in-place change or a
    load_state_dict is seen by the next forward."""
    q = qz.UniformQuantizer(4)
    x = images(2, 8, seed=1)
    q.initialize(x)
    assert q.zero_point.numel() == 1 and q._zero_point_number() == float(q.zero_point)
    with torch.no_grad():
        q.zero_point.add_(3.0)
    assert torch.equal(q(x), qz.uniform_fake_quant(x, q.delta, q.zero_point, 4))
    other = qz.UniformQuantizer(4)
    other.initialize(x * 5)
    q.load_state_dict(other.state_dict())
    assert q._zero_point_number() == float(other.zero_point)
    assert torch.equal(q(x), other(x))


def _log_sqrt2_reference(x, delta, n_bits):
    """The log-√2 fake quantization as first written: no floor, whole tensor."""
    q = torch.div(x, delta).log2_().mul_(-2.0).round_()
    dropped = q >= 2 ** n_bits
    return q.clamp_(min=0.0).mul_(-0.5).exp2_().mul_(delta).masked_fill_(dropped, 0.0)


def _uniform_reference(x, delta, zero_point, n_bits):
    return (torch.clamp(torch.round(x / delta) + zero_point, 0, 2 ** n_bits - 1) - zero_point) * delta


def _bitwise_equal(a, b):
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.view(torch.int32 if a.dtype == torch.float32 else torch.int64),
                            b.view(torch.int32 if b.dtype == torch.float32 else torch.int64)))


def test_log_floor_changes_no_value():
    """The CPU floor under x/Δ (avoids log2's slow path on 0 / denormals) drops exactly what the
    unfloored quantizer drops: every bit width, values at and next to every power of √2, zeros,
    denormals, -0.0, NaN, inf; signs of zero included."""
    x = log_edge_values()
    for n_bits in range(2, 9):
        for d in (1.0, 0.37, 1e-3, 3.0):
            delta = torch.tensor(d)
            ours = qz.log_sqrt2_fake_quant(x, delta, n_bits)
            assert _bitwise_equal(ours, _log_sqrt2_reference(x, delta, n_bits)), (n_bits, d)


def test_fused_log_kernel_floor_changes_no_value():
    """The fused log-√2 kernel raises x to LOG_FLOOR·Δ on CPU (slow paths on 0 / denormals): it
    still gives the unfloored reference bit for bit, at and next to every power of √2, on zeros,
    denormals, -0.0, NaN and inf, for bit widths with (2, 4, 7) and without (8) the floor (NaN
    where the reference has NaN, whatever its sign bit: the compiled kernel's NaN bits differ with
    or without the floor)."""
    x = log_edge_values()
    kernel = qz._FusedFakeQuant.get("log2")
    for n_bits in (2, 4, 7, 8):
        for d in (1.0, 0.37, 1e-3, 3.0):
            delta = torch.tensor(d)
            ours, ref = kernel(x, delta, n_bits), _log_sqrt2_reference(x, delta, n_bits)
            nan = ref.isnan()
            assert torch.equal(ours.isnan(), nan), (n_bits, d)
            assert _bitwise_equal(ours[~nan], ref[~nan]), (n_bits, d)


@pytest.mark.parametrize("case", ["per_tensor", "channel_last", "channel_first", "float64"])
def test_piecewise_fake_quant_is_bit_identical(case, monkeypatch):
    """Large CPU tensors are fake-quantized piece by piece (``CPU_PIECE_NUMEL``): same bits as the
    whole-tensor ops (and the same values as the textbook formula), for x̂, for the candidate
    error (x̂ - x)² and with a preallocated out."""
    g = torch.Generator().manual_seed(6)
    dtype = torch.float64 if case == "float64" else torch.float32
    x = (torch.randn(6, 70, 24, generator=g) * 3).to(dtype)
    if case in ("per_tensor", "float64"):
        delta, zero = torch.tensor(0.21, dtype=dtype), torch.tensor(7.0, dtype=dtype)
    elif case == "channel_last":
        delta = (torch.rand(1, 1, 24, generator=g) + 0.05).to(dtype)
        zero = torch.randint(0, 15, (1, 1, 24), generator=g).to(dtype)
    else:
        delta = (torch.rand(6, 1, 1, generator=g) + 0.05).to(dtype)
        zero = torch.randint(0, 15, (6, 1, 1), generator=g).to(dtype)
    p = torch.softmax(x.float(), -1)
    p[:, :, :5] = 0.0  # masked attention entries
    d = torch.tensor(0.4)

    def run() -> list[torch.Tensor]:
        out = torch.empty_like(x)
        results = [qz.uniform_fake_quant(x, delta, zero, 4),
                   qz.uniform_fake_quant(x, delta, zero, 4, out=out),
                   qz.uniform_fake_quant(x, delta, zero, 4, sq_err=True)]
        assert results[1] is out
        if delta.numel() == 1:
            results += [qz.uniform_fake_quant(x, delta, zero, 4, zero_point_number=7.0),
                        qz.log_sqrt2_fake_quant(p, d, 4), qz.log_sqrt2_fake_quant(p, d, 4, sq_err=True)]
        return results

    monkeypatch.setattr(qz, "CPU_PIECE_NUMEL", 1 << 40)
    whole = run()
    assert torch.equal(whole[0], _uniform_reference(x, delta, zero, 4))
    monkeypatch.setattr(qz, "CPU_PIECE_NUMEL", 1000)
    assert qz._in_pieces(lambda *a, out: out, x, (delta, zero)) is not None  # the piece path runs
    for k, (ours, ref) in enumerate(zip(run(), whole)):
        assert _bitwise_equal(ours, ref), k


def test_piecewise_path_declines_what_it_cannot_cut(monkeypatch):
    """Autograd, mixed dtypes, non-contiguous input and small tensors take the whole-tensor ops."""
    monkeypatch.setattr(qz, "CPU_PIECE_NUMEL", 100)
    x = torch.randn(8, 300)
    d = torch.tensor(0.1)
    noop = lambda *a, out: out  # noqa: E731
    assert qz._in_pieces(noop, x, (d,)) is not None
    assert qz._in_pieces(noop, x[:, :150], (d,)) is None  # not contiguous
    assert qz._in_pieces(noop, x[:1, :150].contiguous(), (d,)) is None  # small
    assert qz._in_pieces(noop, x, (d.double(),)) is None  # dtype promotion would differ
    assert qz._in_pieces(noop, x.requires_grad_(), (d,)) is None  # autograd
    with torch.no_grad():
        assert qz._in_pieces(noop, x, (d,)) is not None
    assert qz._in_pieces(noop, torch.randn(8, 300), (torch.rand(8, 2)[:, :1].T,)) is None


@pytest.mark.parametrize("kind", ["vit", "swin", "resnet"])
def test_piecewise_calibration_and_forward_equal_whole_tensor(kind, monkeypatch):
    """Whole models: calibration state and fake-quant outputs with tiny pieces == whole tensors."""
    monkeypatch.setattr(qz, "PREFILTER_MIN_N", 2048)
    monkeypatch.setattr(qz, "CPU_PIECE_NUMEL", 1 << 40)
    ref, x = _calibrated(kind)
    monkeypatch.setattr(qz, "CPU_PIECE_NUMEL", 777)
    ours, _ = _calibrated(kind)
    _assert_same_state(ours.model, ref.model)
    with torch.no_grad():
        assert torch.equal(ours.model(x), ref.model(x))


@pytest.mark.parametrize("piece", [1 << 40, 5000])
def test_both_tails_at_once_equal_topk(piece, monkeypatch):
    """One pass for both tails (thresholds from a sample, candidates gathered piece by piece):
    the same values as two ``topk`` calls, with heavy tails, ties, NaNs, a cluster of outliers
    and tails of different lengths (or one tail only)."""
    monkeypatch.setattr(qz, "CPU_PIECE_NUMEL", piece)
    g = torch.Generator().manual_seed(8)
    n = qz.PREFILTER_MIN_N + 12345
    normal = torch.randn(n, generator=g)
    clustered = normal.clone()
    clustered[5000:9000] -= 80.0
    nan = normal.clone()
    nan[[3, 99_999]] = float("nan")
    cases = {"normal": normal, "cauchy": torch.tan(math.pi * (torch.rand(n, generator=g) - 0.5)),
             "ties": torch.randint(-2, 3, (n,), generator=g).float(), "relu": torch.relu(normal),
             "clustered": clustered, "nan": nan, "constant": torch.full((n,), 0.5)}
    for name, x in cases.items():
        for k_up, k_lo in ((n // 1000 + 2, n // 1000 + 2), (263, 3), (0, 400), (51, 0)):
            top, bottom = qz._tails_topk(x, k_up, k_lo, 0)
            for got, k, largest in ((top, k_up, True), (bottom, k_lo, False)):
                if k == 0:
                    assert got is None
                    continue
                ref = torch.topk(x, k, largest=largest).values
                assert torch.equal(got.nan_to_num(123.0), ref.nan_to_num(123.0)), (name, k, largest)


@pytest.mark.parametrize("groups,rank_deficient", [(1, False), (1, True), (3, False)])
def test_heldout_grid_in_eigenbasis_equals_per_lambda_residuals(groups, rank_deficient):
    """The ridge grid's held-out residuals, evaluated in the eigenbasis of the fit rows, equal the
    direct quadratic form ``Stats.ss_res(theta(λ))`` for every λ (incl. 0, with a null space, per
    group), and the selected λ and fit are those of the per-λ loop."""
    from qwt_core.compensation import RIDGE_GRID, GroupedConvLeastSquares, TokenLeastSquares, _CentredSystem

    g = torch.Generator().manual_seed(7)
    if groups == 1:
        x = torch.randn(40, 9, 24, generator=g) * torch.logspace(-2, 1, 24) + 3.0
        if rank_deficient:
            x[..., 5] = 2 * x[..., 3] - x[..., 7]  # an exact linear dependence: a null direction
        y = x @ torch.randn(24, 16, generator=g) * 0.1 + torch.randn(40, 9, 16, generator=g)
        fitter = TokenLeastSquares(24, 16)
    else:
        x = torch.randn(40, 6, 5, 5, generator=g) + 1.0
        y = 0.3 * x.repeat(1, 2, 1, 1) + torch.randn(40, 12, 5, 5, generator=g)
        fitter = GroupedConvLeastSquares(6, 12, 1, kernel_size=3, group_channels=2)
    fitter.update(x, y, heldout=torch.arange(40) % 4 == 1)
    fit_s, val = fitter.stats("fit"), fitter.stats("heldout")
    system = _CentredSystem(fit_s.ata, fit_s.aty, 1e-10)
    assert (system.rank_deficiency > 0) == rank_deficient
    lams = [c * system.scale for c in RIDGE_GRID]
    fast = system.heldout_ss_res(val, lams)
    direct = [val.ss_res(system.theta(lam)) for lam in lams]
    assert fast == pytest.approx(direct, rel=1e-9)
    assert min(range(len(fast)), key=fast.__getitem__) == min(range(len(direct)), key=direct.__getitem__)


@pytest.mark.parametrize("gate,ridge", [("holdout", "auto"), ("holdout", 0.5), ("insample", None)])
@pytest.mark.parametrize("groups,case", [(1, "full"), (1, "null"), (1, "ill"), (4, "full"), (4, "null"),
                                         (4, "dead"), (4, "dead+null")])
def test_cholesky_solver_gives_the_eigh_fit(groups, case, gate, ridge):
    """``solver="cholesky"`` (batched Cholesky per λ, no eigen-decomposition: the CUDA default) gives
    the eigh solver's fit where the covariances are certified full rank once dead features (always 0)
    are set aside, and falls back to eigh - the very same fit - where a direction is numerically null
    or too close to it to prove otherwise - with groups, in those groups only ("mixed": the held-out
    gate solves them by eigh, the in-sample gate's rank count takes their eigenvalues)."""
    fitter = least_squares_fitter(groups, case)
    ref = fitter.fit(gate=gate, ridge=ridge, solver="eigh")
    got = fitter.fit(gate=gate, ridge=ridge, solver="cholesky")
    assert ref.solver == "eigh"
    mixed = groups > 1 and case in ("null", "dead+null")
    assert got.solver == ("cholesky" if case in ("full", "dead") else "mixed" if mixed else "eigh")
    assert (got.applied, got.ridge_rel, got.rank_deficiency, got.rows) == \
        (ref.applied, ref.ridge_rel, ref.rank_deficiency, ref.rows)
    assert ref.rank_deficiency == {"null": 1, "dead": 2, "dead+null": 3}.get(case, 0)
    if got.solver == "eigh" or (mixed and gate == "insample"):  # the in-sample solve is the reference Cholesky one
        assert torch.equal(got.theta, ref.theta) and got.r2 == ref.r2
    else:
        scale = float(ref.theta.abs().max())
        assert float((got.theta - ref.theta).abs().max()) < 1e-9 * scale
        assert got.r2 == pytest.approx(ref.r2, rel=1e-9, abs=1e-12)
        assert got.r2_insample == pytest.approx(ref.r2_insample, rel=1e-9, abs=1e-12)
        assert got.ridge == pytest.approx(ref.ridge, rel=1e-9)
    if gate == "holdout":
        assert fitter.fit(gate=gate, ridge=ridge).solver == "eigh"  # auto on the CPU


def test_full_rank_certificate_never_certifies_a_direction_eigh_drops():
    """The certificate behind the Cholesky path (``Cxx - τI`` factorises, ``τ ≈ 10·null_rtol·trace``):
    over covariances whose smallest eigenvalue sweeps from 1e-2 to 1e-16 of the largest (and exact
    zeros), it is never true where eigh counts a null direction, and true down to 1e-8 (1e-10 is
    eigh's threshold; the trace here is 7× the largest eigenvalue)."""
    from qwt_core.compensation import NULL_RTOL, _certified_full_rank, rank_deficiency

    g = torch.Generator().manual_seed(3)
    d = 48
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    seen = {True: 0, False: 0}
    for exp in range(2, 17):
        for n_small in (1, 5):
            e = torch.logspace(0, 3, d, dtype=torch.float64)
            e[:n_small] = e[-1] * 10.0 ** -exp
            cxx = (q * e) @ q.T
            cxx = 0.5 * (cxx + cxx.T)
            ata = torch.zeros(d + 1, d + 1, dtype=torch.float64)
            ata[:d, :d], ata[d, d] = cxx, 1.0  # zero mean, so the centred covariance is cxx
            certified = _certified_full_rank(cxx[None], NULL_RTOL)
            seen[certified] += 1
            if certified:
                assert rank_deficiency(ata) == 0, (exp, n_small)
            if exp <= 8:
                assert certified, (exp, n_small)
    singular = torch.zeros(1, d, d, dtype=torch.float64)
    assert not _certified_full_rank(singular, NULL_RTOL)
    assert seen[True] and seen[False]


def test_apply_qwt_solver_option_reaches_every_block_and_gives_the_eigh_model():
    """``compensate(..., solver="cholesky")`` on a calibrated ViT: every block reports the Cholesky
    solve and the compensated model equals the eigh one to float rounding; "auto" is eigh on the
    CPU; an unknown solver fails before any work."""
    qm, x = _calibrated("vit", n_images=8)
    batches = [x[:4], x[4:]]
    models, reports = {}, {}
    for solver in ("eigh", "cholesky", "auto"):
        m = copy.deepcopy(qm)
        reports[solver] = qwt_core.compensate(m, batches, progress=False, solver=solver)
        with torch.no_grad():
            models[solver] = m.model(x)
    assert {b.solver for b in reports["cholesky"].blocks if b.r2 is not None} == {"cholesky"}
    assert {b.solver for b in reports["auto"].blocks if b.r2 is not None} == {"eigh"}
    assert reports["cholesky"].to_dict()["solver"] == "cholesky"
    assert [b.applied for b in reports["cholesky"].blocks] == [b.applied for b in reports["eigh"].blocks]
    assert torch.equal(models["auto"], models["eigh"])
    ref = models["eigh"]
    assert float((models["cholesky"] - ref).abs().max()) < 1e-4 * float(ref.abs().max())
    with pytest.raises(ValueError, match="solver='qr'"):
        qwt_core.compensate(copy.deepcopy(qm), batches, progress=False, solver="qr")


@pytest.mark.parametrize("k,stride", [(1, 1), (1, 2), (3, 1), (3, 2)])
def test_conv_moments_equal_row_major_reference(k, stride):
    """The conv fitter's moments (design matrix built transposed, products along contiguous rows)
    equal the row-major unfold reference per group and part, to float64 rounding: AᵀA, AᵀY, Σy²
    and the per-(channel, position) sums over samples that the published R² uses."""
    import torch.nn.functional as F
    from qwt_core.compensation import GroupedConvLeastSquares

    g = torch.Generator().manual_seed(11)
    b, c_in, c_out, hw, groups = 8, 6, 9, 7, 3
    x = torch.randn(b, c_in, hw, hw, generator=g)
    out = (hw + 2 * (k // 2) - k) // stride + 1
    y = torch.randn(b, c_out, out, out, generator=g) + torch.arange(c_out * out * out).reshape(
        1, c_out, out, out) * 0.01  # a different mean per (channel, position)
    held = torch.arange(b) % 4 == 1
    fitter = GroupedConvLeastSquares(c_in, c_out, stride, kernel_size=k, group_channels=2)
    assert fitter.groups == groups
    fitter.update(x, y, heldout=held)
    for part, sel in ((0, ~held), (1, held)):
        xs, ys = x[sel].double(), y[sel].double()
        cols = F.unfold(xs, k, padding=k // 2, stride=stride)  # (n, C_in·k², L)
        n, _, length = cols.shape
        per, m = c_in // groups * k * k, c_out // groups
        for gi in range(groups):
            a = cols[:, gi * per:(gi + 1) * per].permute(0, 2, 1).reshape(-1, per)
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
            t = ys[:, gi * m:(gi + 1) * m].reshape(n, m, -1).permute(0, 2, 1).reshape(-1, m)
            for got, want in ((fitter.ata[part][gi], a.T @ a), (fitter.aty[part][gi], a.T @ t)):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-12 * float(want.abs().max()))
        assert float(fitter.yy[part]) == pytest.approx(float(ys.pow(2).sum()), rel=1e-13)
        torch.testing.assert_close(fitter.y_pos_sum[part], ys.sum(0), rtol=1e-13, atol=1e-12)
        assert float(fitter.n_samples[part]) == n
