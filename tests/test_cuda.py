"""GPU checks: skipped where no CUDA device is visible (CI), run by ``benchmarks/gpu_checks.sh`` on a
GPU machine.

* a calibrated (and QwT-compensated) model's forward never synchronises the GPU
  (``torch.cuda.set_sync_debug_mode("error")``), eager and fused;
* the fused (``torch.compile``) fake-quant kernels give the eager CUDA values bit for bit;
* a model quantized on the CPU runs on CUDA with the same outputs up to float rounding;
  calibration on CUDA is as good as on the CPU, and QwT on CUDA lowers the block errors;
* the QwT moments are accumulated on the device, in float64, and solved there by the Cholesky
  path (no eigen-decomposition) with the CPU eigh fit's result;
* a quantized model on the GPU exports the same ONNX graph as its CPU copy;
* ``torch.compile`` of the whole quantized model on the GPU: one graph, the eager values through
  ``aot_eager``, and inductor's (Triton) build runs.
"""
import copy

import numpy as np
import pytest
import torch

import qwt_core
import qwt_core.compensation as comp
import qwt_core.quantizers as qz
from tests.helpers_models import (block_errors_with_and_without_qwt, images, least_squares_fitter,
                                  log_edge_values, tiny_resnet, tiny_swin, tiny_vit)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ADAPTERS = {"vit": (tiny_vit, qwt_core.adapters.quantize_timm_vit, 32),
            "swin": (tiny_swin, qwt_core.adapters.quantize_timm_swin, 56),
            "resnet": (tiny_resnet, qwt_core.adapters.quantize_resnet, 32)}
CUDA = torch.device("cuda")


def _calibrated_pair_inputs(kind: str, n_images: int = 8, bits: int = 4):
    """``(fp, qm, x, qwt_batches)``: a random-init model, an uncalibrated quantized copy (CPU),
    calibration images and QwT batches."""
    make, adapter, size = ADAPTERS[kind]
    torch.manual_seed(0)
    fp = make()
    qm = adapter(copy.deepcopy(fp), bits, bits)
    return fp, qm, images(n_images, size, seed=3), [images(4, size, seed=10 + i) for i in range(4)]


def _compensated_on_cuda(kind: str):
    """``(qm, x)``: a tiny random-init model quantized W4A4, calibrated and compensated on CUDA."""
    make, adapter, size = ADAPTERS[kind]
    torch.manual_seed(0)
    qm = adapter(make().to(CUDA), 4, 4)
    x = images(4, size, seed=3).to(CUDA)
    qwt_core.calibrate(qm, x)
    qwt_core.compensate(qm, [x[:2], x[2:]], progress=False)
    return qm, x


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("kind", ["vit", "swin", "resnet"])
def test_cuda_forward_never_synchronises(kind, fused, monkeypatch):
    monkeypatch.setattr(qz._FusedFakeQuant, "enabled", fused)
    qm, x = _compensated_on_cuda(kind)
    with torch.no_grad():
        qm.model(x)  # fills the quantized-weight caches (and compiles the fused kernels)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            qm.model(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_cuda_fused_kernels_equal_eager(bits):
    """Signed values with zeros, denormals and a huge one (uniform); the log-√2 edge values of the
    CPU tests (zeros, denormals, every power of √2 ± 1 ulp, -0.0, inf; NaN at the same places)."""
    g = torch.Generator().manual_seed(7)
    x = torch.cat([torch.randn(300_000, generator=g) * 3,
                   torch.tensor([0.0, -0.0, 1e-40, -1e-40, 1e30])]).to(CUDA)
    attn = log_edge_values().to(CUDA)
    delta, zp = torch.tensor(0.173, device=CUDA), torch.tensor(float(2 ** (bits - 1)), device=CUDA)
    eager_u = qz.uniform_fake_quant(x, delta, zp, bits)
    fused_u = qz._FusedFakeQuant.get("uniform")(x, delta, zp, bits)
    assert torch.equal(fused_u, eager_u)
    for d in (1.0, 0.37, 2.0 ** -0.5):
        dt = torch.tensor(d, device=CUDA)
        eager_l = qz.log_sqrt2_fake_quant(attn, dt, bits)
        fused_l = qz._FusedFakeQuant.get("log2")(attn, dt, bits)
        assert torch.equal(fused_l.isnan(), eager_l.isnan())
        fused_l, eager_l = fused_l.nan_to_num(nan=-1.0), eager_l.nan_to_num(nan=-1.0)
        assert torch.equal(fused_l, eager_l), (d, int((fused_l != eager_l).sum()))


@pytest.fixture
def no_tf32():
    """Full float32 GEMMs and convolutions on CUDA (cuDNN defaults to TF32 for convolutions)."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32 = saved[1]


@pytest.mark.parametrize("kind", ["vit", "swin", "resnet"])
def test_cpu_quantized_model_runs_the_same_on_cuda(kind, no_tf32):
    """A model calibrated and compensated on the CPU, moved to CUDA (what ``--load_quantized`` on a
    GPU does): the same outputs up to float rounding, which moves at most a few values across a
    rounding boundary (far less than the quantization error)."""
    fp, qm, x, batches = _calibrated_pair_inputs(kind)
    qwt_core.calibrate(qm, x)
    qwt_core.compensate(qm, batches, progress=False)
    on_cuda = copy.deepcopy(qm.model).to(CUDA)
    with torch.no_grad():
        y_fp, y_cpu = fp(x), qm.model(x)
        y_cuda = on_cuda(x.to(CUDA)).cpu()
    quant_err, device_err = float((y_cpu - y_fp).norm()), float((y_cuda - y_cpu).norm())
    assert quant_err > 0 and device_err < 0.2 * quant_err, (device_err, quant_err)


@pytest.mark.parametrize("kind", ["vit", "swin", "resnet"])
def test_cuda_calibration_and_qwt_match_cpu_quality(kind, no_tf32):
    """Calibration on CUDA: a model as close to FP as the CPU-calibrated one. (Not the same
    quantizers: the MSE choice between clipping candidates is sensitive to float rounding, on one
    device too: perturbing the weights by 1e-6 changed a quarter of the Δ by more than 1e-3 on
    these models.) QwT on CUDA lowers the block errors."""
    fp, qm_cpu, x, batches = _calibrated_pair_inputs(kind)
    qm_cuda = ADAPTERS[kind][1](copy.deepcopy(fp).to(CUDA), 4, 4)
    qwt_core.calibrate(qm_cpu, x)
    qwt_core.calibrate(qm_cuda, x.to(CUDA))
    with torch.no_grad():
        y_fp = fp(x)
        err_cpu = float((qm_cpu.model(x) - y_fp).norm())
        err_cuda = float((qm_cuda.model(x.to(CUDA)).cpu() - y_fp).norm())
    assert 0.7 * err_cpu < err_cuda < 1.4 * err_cpu, (err_cuda, err_cpu)
    cuda_batches = [b.to(CUDA) for b in batches]
    report = qwt_core.compensate(qm_cuda, cuda_batches, progress=False)
    assert any(b.applied for b in report.blocks)
    err_q, err_c = block_errors_with_and_without_qwt(qm_cuda, qm_cuda.model, cuda_batches)
    assert err_c < err_q, (err_c, err_q)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_cuda_qwt_moments_stay_on_device_in_float64(kind, monkeypatch):
    seen = []
    for cls in (comp.TokenLeastSquares, comp.GroupedConvLeastSquares):
        original = cls.update

        def recording(self, *args, _original=original, **kwargs):
            out = _original(self, *args, **kwargs)
            seen.append({(t.device.type, t.dtype) for t in self._x_moments() + self._y_moments()})
            return out

        monkeypatch.setattr(cls, "update", recording)
    qm, x = _compensated_on_cuda(kind)
    assert seen and all(s == {("cuda", torch.float64)} for s in seen), seen


@pytest.mark.parametrize("gate", ["holdout", "insample"])
@pytest.mark.parametrize("groups", [1, 4])
def test_cuda_qwt_solve_is_cholesky_with_the_cpu_eigh_fit(groups, gate):
    """On CUDA the Cholesky path (batched factorisations and GEMMs, no ``eigh``) gives the CPU eigh
    fit; a covariance with a null direction falls back to eigh."""
    ref = least_squares_fitter(groups, "full").fit(gate=gate, solver="eigh")
    got = least_squares_fitter(groups, "full", device="cuda").fit(gate=gate, solver="cholesky")
    assert got.solver == "cholesky" and got.theta.device.type == "cuda"
    assert (got.applied, got.ridge_rel, got.rank_deficiency) == (ref.applied, ref.ridge_rel, 0)
    assert float((got.theta.cpu() - ref.theta).abs().max()) < 1e-9 * float(ref.theta.abs().max())
    assert got.r2 == pytest.approx(ref.r2, rel=1e-9, abs=1e-12)
    null = least_squares_fitter(groups, "null", device="cuda").fit(gate=gate, solver="cholesky")
    null_ref = least_squares_fitter(groups, "null").fit(gate=gate, solver="eigh")
    # with groups: eigenvalues (eigh solve / rank count) of the uncertified group only
    assert null.solver == ("mixed" if groups > 1 else "eigh")
    assert (null.applied, null.ridge_rel, null.rank_deficiency) == \
        (null_ref.applied, null_ref.ridge_rel, null_ref.rank_deficiency) and null.rank_deficiency > 0
    assert float((null.theta.cpu() - null_ref.theta).abs().max()) < 1e-9 * float(null_ref.theta.abs().max())


def test_cuda_qwt_of_a_vit_runs_no_eigendecomposition(monkeypatch):
    """``compensate`` on CUDA with ``solver="cholesky"``: every block of a calibrated ViT is solved by the
    Cholesky path, and ``torch.linalg.eigh``/``eigvalsh`` are never called."""
    calls = []
    for name in ("eigh", "eigvalsh"):
        original = getattr(torch.linalg, name)

        def counting(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, counting)
    torch.manual_seed(0)
    qm = qwt_core.adapters.quantize_timm_vit(tiny_vit().to(CUDA), 4, 4)
    x = images(8, 32, seed=3).to(CUDA)
    qwt_core.calibrate(qm, x)
    report = qwt_core.compensate(qm, [x[:4], x[4:]], progress=False, solver="cholesky")
    assert {b.solver for b in report.blocks} == {"cholesky"} and not calls, calls


def test_cuda_model_exports_the_cpu_onnx(tmp_path):
    """ONNX export of a quantized model that lives on the GPU (the command lines export after
    calibrating on ``--device cuda``): the same graph weights as the export of its CPU copy, the
    same predictions as the fake-quant model on the GPU; an int8 compensation calibrated on the GPU."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from onnx import numpy_helper

    from qwt_core import export as qx

    torch.manual_seed(0)
    qm = qwt_core.adapters.quantize_timm_vit(tiny_vit(), 8, 8)
    x = images(16, 32)
    qwt_core.calibrate(qm, x, integer_zero_point=True)
    qwt_core.compensate(qm, [images(16, 32, seed=s) for s in (1, 2)], progress=False, gate="insample")
    on_cuda = copy.deepcopy(qm.model).to(CUDA)
    paths = {k: str(tmp_path / f"{k}.onnx") for k in ("cpu", "cuda", "int8")}
    qx.export_onnx(qm.model, x[:2], paths["cpu"])
    qx.export_onnx(on_cuda, x[:2].to(CUDA), paths["cuda"])
    assert all(t.device.type == "cuda" for t in on_cuda.parameters())  # the model stays where it was
    inits = [{t.name: numpy_helper.to_array(t) for t in onnx.load(paths[k]).graph.initializer}
             for k in ("cpu", "cuda")]
    assert inits[0].keys() == inits[1].keys()
    for name, value in inits[0].items():
        assert np.array_equal(value, inits[1][name]), name
    res = qx.compare_onnx(paths["cuda"], on_cuda, images(32, 32, seed=3))
    assert res["identical"] >= 0.97, res
    report = qx.export_onnx(on_cuda, x[:2].to(CUDA), paths["int8"], compensation="int8",
                            calib_images=x.to(CUDA))
    assert any(".compensation" in p.name and p.integer for p in report.layers), report.summary()


@pytest.mark.parametrize("kind", ["vit", "swin", "resnet"])
def test_cuda_whole_model_compiles_in_one_graph(kind):
    qm, x = _compensated_on_cuda(kind)
    with torch.no_grad():
        ref = qm.model(x)
        torch._dynamo.reset()
        try:
            assert torch.equal(torch.compile(qm.model, backend="aot_eager", fullgraph=True)(x), ref)
            torch._dynamo.reset()
            out = torch.compile(qm.model, fullgraph=True)(x)
        finally:
            torch._dynamo.reset()
    assert out.shape == ref.shape and bool(torch.isfinite(out).all())
