"""The speed paths give the same numbers as the reference paths, and the forward never syncs.

* topk quantile initialisation (incl. the prefiltered single-row topk) == the previous kthvalue
  code, on whole calibrated models (every quantizer buffer, every output bit);
* the calibrated (and QwT-compensated) forward reads no tensor on the host
  (no ``.item()``/``bool(tensor)``/``torch.equal``), and hits the quantized-weight cache;
* ``torch.compile``-fused fake quantization == eager fake quantization, bit for bit.
"""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import qwt_core
import qwt_core.quantizers as qz
from qwt_core.modules import QuantConv2d, QuantLinear, quantizers
from tests.helpers_models import images, kthvalue_quantile, tiny_resnet, tiny_swin, tiny_vit

ADAPTERS = {"vit": (tiny_vit, qwt_core.quantize_timm_vit, 32),
            "swin": (tiny_swin, qwt_core.quantize_timm_swin, 56),
            "resnet": (tiny_resnet, qwt_core.quantize_resnet, 32)}


def _kthvalue_quantiles(x, qs, dim=-1, method="auto"):
    """The previous implementation: two kthvalue calls per quantile."""
    return [kthvalue_quantile(x, q, dim) for q in qs]


def _calibrated(kind: str, n_images: int = 4, bits: int = 4):
    make, adapter, size = ADAPTERS[kind]
    torch.manual_seed(0)
    qm = adapter(make(), bits, bits)
    x = images(n_images, size, seed=3)
    qwt_core.calibrate_repq(qm, x)
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
    """Records aten ops that copy a tensor value to the host (a GPU sync on CUDA)."""

    SYNC_OPS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal", "aten::item"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in self.SYNC_OPS:
            self.seen.append(name)
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
