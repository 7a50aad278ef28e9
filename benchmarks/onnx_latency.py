"""Latency of real INT8 inference through ONNX QDQ + onnxruntime (CPU), measured in one run.

For each model (random init: latency does not depend on the weights) and each batch size, with the
same number of threads everywhere:

* ``pytorch_fp``   - the FP timm model in PyTorch;
* ``ort_fp``       - the FP model exported to ONNX, run by onnxruntime (the unit of the ratios);
* ``ort_int8``     - RepQ-ViT (Percentile for ResNet) exported by :func:`qwt_core.export.export_onnx`;
* ``ort_int8_qwt_fp32`` / ``ort_int8_qwt_int8`` - the same + QwT, compensation kept fp32 / as a W8A8
  QDQ Linear (ViT/Swin only: a ResNet conv compensation feeds the residual sum, see the export docs);
* ``ort_static_quant`` (``--ort_reference``) - onnxruntime's own ``quantize_static`` of the FP graph:
  what onnxruntime reaches by itself on this CPU (a latency reference, not the RepQ-ViT model).

The quantized models are calibrated on random images (RepQ-ViT with ``integer_zero_point=True``;
QwT with ``gate="insample"`` so that every block gets its compensation: the worst case for latency).
Timings interleave the variants round by round (the machine may be shared) and report medians; the
ratios are ratios of medians taken in the same run. The JSON also records the integer / float op
counts of the graph onnxruntime runs, the CPU flags (VNNI or not) and the versions.

Usage: ``python -m benchmarks.onnx_latency [--models deit_small swin_tiny resnet50] [--batches 1 32]
[--threads 2] [--rounds 5] [--out results/onnx_latency.json]``.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import tempfile
import time
from typing import Any, Callable

import numpy as np
import torch

from benchmarks.common import ROOT, machine_info, results_path  # noqa: F401
from qwt_core.onnx_check import ort_session

import qwt_core  # noqa: E402
from qwt_core import export as qx  # noqa: E402
from qwt_core.model_io import atomic_write_json  # noqa: E402
from cls_repq_vit.models import get_spec  # noqa: E402

TARGET_QWT_VS_FP = 0.45      # DeiT-S W8A8 + QwT vs ORT FP at batch 32
TARGET_QWT_OVERHEAD = 0.10   # QwT over W8A8 alone


def cpu_flags() -> dict[str, Any]:
    """Model name and the SIMD flags that matter for int8 GEMM (from /proc/cpuinfo)."""
    info: dict[str, Any] = {"cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
        flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
        info["model"] = model
        for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"):
            info[f] = f in flags
    except OSError:
        pass
    return info


def _quantize(name: str, model: torch.nn.Module, w_bits: int, a_bits: int):
    spec = get_spec(name)
    if spec.family == "vit":
        return qwt_core.adapters.quantize_timm_vit(model, w_bits, a_bits)
    if spec.family == "swin":
        return qwt_core.adapters.quantize_timm_swin(model, w_bits, a_bits)
    return qwt_core.adapters.quantize_resnet(model, w_bits, a_bits, act_mode="reference8")


def _ort_static_quant(fp_path: str, out_path: str, images: torch.Tensor) -> dict[str, Any]:
    """onnxruntime's own static quantizer on the FP graph (QDQ, per-channel int8 weights, uint8
    activations, MinMax on ``images``): what onnxruntime reaches by itself on this CPU, as a reference
    for the latency of our export (not the same quantizer, not exact on non-VNNI CPUs)."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"images": images[i:i + 1].numpy()} for i in range(len(images))])

        def get_next(self):
            return next(self.items, None)

    t = time.perf_counter()
    pre = out_path.replace(".onnx", "_pre.onnx")
    quant_pre_process(fp_path, pre)
    quantize_static(pre, out_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    os.remove(pre)
    return {"tool": "onnxruntime.quantization.quantize_static (QDQ, per-channel QInt8 W, QUInt8 A, MinMax)",
            "seconds": time.perf_counter() - t}


def prepare(name: str, w_bits: int, a_bits: int, img: int, calib: int, workdir: str, log: Callable,
            ort_reference: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Build, quantize, compensate and export one model; returns (runners, info)."""
    spec = get_spec(name)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(calib, 3, img, img, generator=g)
    fp = spec.create({}).eval()
    info: dict[str, Any] = {"timm_model": spec.timm_name, "w_bits": w_bits, "a_bits": a_bits,
                            "act_mode": "reference8" if spec.family == "resnet" else None}
    files: dict[str, str] = {}
    t = time.perf_counter()
    files["ort_fp"] = os.path.join(workdir, f"{name}_fp.onnx")
    qx.export_fp_onnx(fp, images[:2], files["ort_fp"])
    info["export_fp_s"] = time.perf_counter() - t
    if ort_reference:
        files["ort_static_quant"] = os.path.join(workdir, f"{name}_ort_static.onnx")
        info["ort_static_quant"] = _ort_static_quant(files["ort_fp"], files["ort_static_quant"], images)

    qm = _quantize(name, copy.deepcopy(fp), w_bits, a_bits)
    t = time.perf_counter()
    qwt_core.calibrate(qm, images, integer_zero_point=True)
    info["calibrate_s"] = time.perf_counter() - t
    tag = f"w{w_bits}a{a_bits}"
    files["ort_int8"] = os.path.join(workdir, f"{name}_{tag}.onnx")
    rep = qx.export_onnx(qm.model, images[:2], files["ort_int8"])
    log(rep.summary())
    info["ort_int8"] = _export_info(rep)

    t = time.perf_counter()
    batches = [images[i:i + 8] for i in range(0, calib, 8)]
    report = qwt_core.compensate(qm, batches, progress=False, gate="insample")
    info["qwt_s"] = time.perf_counter() - t
    info["qwt_blocks_compensated"] = sum(1 for b in report.blocks if b.applied)
    info["qwt_blocks"] = len(report.blocks)
    files["ort_int8_qwt_fp32"] = os.path.join(workdir, f"{name}_{tag}_qwt_fp32.onnx")
    rep = qx.export_onnx(qm.model, images[:2], files["ort_int8_qwt_fp32"], compensation="fp32")
    log(rep.summary())
    info["ort_int8_qwt_fp32"] = _export_info(rep)
    if spec.family != "resnet":
        files["ort_int8_qwt_int8"] = os.path.join(workdir, f"{name}_{tag}_qwt_int8.onnx")
        rep = qx.export_onnx(qm.model, images[:2], files["ort_int8_qwt_int8"], compensation="int8",
                             calib_images=images)
        log(rep.summary())
        info["ort_int8_qwt_int8"] = _export_info(rep)
    return {"pytorch_fp": fp, **files}, info


def _export_info(rep: qx.ExportReport) -> dict[str, Any]:
    return {"integer_layers": len(rep.integer_layers), "float_layers": len(rep.float_layers),
            "float_reasons": sorted({p.reason for p in rep.layers if not p.integer}),
            "ort_integer_ops": rep.ort["integer_ops"], "ort_float_ops": rep.ort["float_ops"],
            "quantized_in_float": rep.ort["quantized_in_float"], "export_s": rep.seconds,
            "onnx_mb": rep.onnx_bytes / 1e6}


def measure(runners: dict[str, Any], batch: int, img: int, threads: int, rounds: int, warmup: int
            ) -> dict[str, Any]:
    """Interleaved timing: every round runs each variant once (after warm-up); medians per variant."""
    x = torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(1))
    torch.set_num_threads(threads)
    calls: dict[str, Callable[[], Any]] = {}
    for key, r in runners.items():
        if isinstance(r, torch.nn.Module):
            def call(m=r):
                with torch.no_grad():
                    m(x)
            calls[key] = call
        else:
            sess = ort_session(r, threads)
            feed = {sess.get_inputs()[0].name: x.numpy()}
            calls[key] = lambda s=sess, f=feed: s.run(None, f)
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for key, fn in calls.items():
            t = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    out: dict[str, Any] = {"median_ms": {k: 1e3 * v for k, v in med.items()},
                           "min_ms": {k: 1e3 * float(np.min(v)) for k, v in times.items()},
                           "ratio_vs_ort_fp": {k: v / med["ort_fp"] for k, v in med.items()}}
    if "ort_int8_qwt_fp32" in med:
        out["qwt_overhead_fp32"] = med["ort_int8_qwt_fp32"] / med["ort_int8"] - 1
    if "ort_int8_qwt_int8" in med:
        out["qwt_overhead_int8"] = med["ort_int8_qwt_int8"] / med["ort_int8"] - 1
    return out


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["deit_small", "swin_tiny", "resnet50"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per batch size")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--w_bits", type=int, default=8)
    p.add_argument("--a_bits", type=int, default=8)
    p.add_argument("--resnet_w_bits", type=int, nargs="+", default=[8, 4],
                   help="ResNet weight bits to run (inputs at 8 bits, the reference's mode); W8 "
                        "asymmetric conv weights have no exact QLinearConv form, W4 do")
    p.add_argument("--calib", type=int, default=16, help="random calibration images")
    p.add_argument("--ort_reference", action="store_true",
                   help="also time onnxruntime's own quantize_static of the FP graph (token models)")
    p.add_argument("--img_size", type=int, default=224)
    p.add_argument("--out", default=results_path("onnx_latency.json"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    import onnxruntime as ort
    results: dict[str, Any] = {
        "threads": args.threads, "batches": args.batches, "rounds": args.rounds, "img_size": args.img_size,
        "cpu": cpu_flags(), "onnxruntime": ort.__version__, "torch": torch.__version__,
        "python": platform.python_version(), "providers": ort.get_available_providers(),
        "note": "shared machine: timings are noisy; variants are interleaved round by round",
        "models": {}}
    if not results["cpu"].get("avx512_vnni") and not results["cpu"].get("avx_vnni"):
        results["cpu_note"] = ("no VNNI on this CPU: onnxruntime's u8s8 kernels use int16 pair sums; "
                               "the export keeps every int8 weight within ±64 (or uses uint8) so results "
                               "stay exact")
    print(f"CPU: {results['cpu']}; onnxruntime {ort.__version__}; providers {results['providers']}",
          flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            family = get_spec(name).family
            settings = [(w, 8) for w in args.resnet_w_bits] if family == "resnet" else [(args.w_bits, args.a_bits)]
            for w_bits, a_bits in settings:
                key = f"{name}_w{w_bits}a{a_bits}"
                print(f"== {key}: build, calibrate, export", flush=True)
                t = time.perf_counter()
                runners, info = prepare(name, w_bits, a_bits, args.img_size, args.calib, workdir, print,
                                        ort_reference=args.ort_reference and family != "resnet")
                info["prepare_s"] = time.perf_counter() - t
                info["latency"] = {}
                for batch in args.batches:
                    res = measure(runners, batch, args.img_size, args.threads, args.rounds, args.warmup)
                    info["latency"][str(batch)] = res
                    print(f"   batch {batch}: " + ", ".join(
                        f"{k} {v:.1f} ms ({res['ratio_vs_ort_fp'][k]:.2f}x)" for k, v in res["median_ms"].items()),
                        flush=True)
                results["models"][key] = info
                atomic_write_json(args.out, results)  # partial results survive an interrupted run
                for f in runners.values():
                    if isinstance(f, str) and os.path.exists(f):
                        os.remove(f)
    deit = results["models"].get(f"deit_small_w{args.w_bits}a{args.a_bits}", {}).get("latency", {}).get("32")
    if deit:
        results["targets"] = {
            "deit_small_qwt_vs_ort_fp_b32": {"measured": deit["ratio_vs_ort_fp"].get("ort_int8_qwt_fp32"),
                                             "measured_int8_comp": deit["ratio_vs_ort_fp"].get("ort_int8_qwt_int8"),
                                             "target": TARGET_QWT_VS_FP},
            "deit_small_qwt_overhead_b32": {"fp32_comp": deit.get("qwt_overhead_fp32"),
                                            "int8_comp": deit.get("qwt_overhead_int8"),
                                            "target": TARGET_QWT_OVERHEAD}}
    results["machine"] = machine_info(args.threads)
    atomic_write_json(args.out, results)
    print(f"results written to {args.out}", flush=True)
    return results


if __name__ == "__main__":
    main()
