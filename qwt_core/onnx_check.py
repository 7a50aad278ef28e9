"""Checks of a written ONNX QDQ graph in onnxruntime: which layers run integer kernels
(:func:`integer_op_report`) and how closely it agrees with the fake-quant model (:func:`compare_onnx`).

:func:`qwt_core.export.export_onnx` builds the graph and calls :func:`integer_op_report` on it.
"""
from __future__ import annotations

import os
import tempfile
from collections import Counter
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

#: onnxruntime op types that run a matmul / conv on integer inputs.
INTEGER_OPS = ("QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
               "QGemm", "QLinearConv", "ConvInteger", "QAttention")
#: onnxruntime op types that compute a matmul / conv with float activations (MatMulNBits: weight-only).
FLOAT_OPS = ("MatMul", "Gemm", "Conv", "FusedConv", "FusedGemm", "FusedMatMul", "ConvTranspose",
             "MatMulNBits")

class ExportError(ValueError):
    """A model that cannot be exported as it is; the message names the layer and the fix."""


class _Graph:
    """Small index over an onnx GraphProto: producers, consumers, constants."""

    def __init__(self, model) -> None:
        import onnx
        from onnx import numpy_helper
        self.onnx, self.nh = onnx, numpy_helper
        self.model = model
        self.g = model.graph
        self.reindex()

    def reindex(self) -> None:
        self.init = {t.name: t for t in self.g.initializer}
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in self.g.output}

    def const(self, name: str) -> Optional[np.ndarray]:
        if name in self.init:
            return self.nh.to_array(self.init[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return self.nh.to_array(a.t)
        return None

    def set_init(self, name: str, array: np.ndarray) -> None:
        t = self.nh.from_array(array, name)
        if name in self.init:
            self.init[name].CopyFrom(t)
        else:
            self.g.initializer.append(t)
            self.init[name] = self.g.initializer[-1]

    def single_consumer(self, name: str):
        cons = self.consumers.get(name, [])
        return cons[0] if len(cons) == 1 and name not in self.outputs else None

    def remove_dead(self) -> None:
        """Drop nodes and initializers nothing reads (repeat until stable)."""
        while True:
            self.reindex()
            needed = set(self.outputs)
            for n in self.g.node:
                needed.update(n.input)
            keep = [n for n in self.g.node if any(o in needed for o in n.output)]
            if len(keep) == len(self.g.node):
                break
            del self.g.node[:]
            self.g.node.extend(keep)
        dead = [t for t in self.g.initializer if t.name not in needed]
        for t in dead:
            self.g.initializer.remove(t)
        self.reindex()


#: CPU flags with which onnxruntime's u8×s8 integer kernels accumulate without int16 saturation.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags() -> set[str]:
    """The flags of this CPU (``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_vnni(flags: Optional[set[str]] = None) -> bool:
    """True if this CPU (or ``flags``) has an integer dot-product instruction onnxruntime uses
    (AVX-512 VNNI, AVX-VNNI or AMX-INT8): int8 weights over the full range are exact there."""
    return bool((cpu_flags() if flags is None else flags) & set(VNNI_FLAGS))


def ort_session(path: str, threads: int = 2, optimized_path: Optional[str] = None) -> Any:
    """An onnxruntime CPU session with every graph optimisation on, ``threads`` intra-op threads."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ExportError(f"onnxruntime is not installed: pip install onnxruntime ({exc})") from None
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def integer_op_report(path: str, plans: Optional[Sequence[Any]] = None, threads: int = 2,
                      optimized_path: Optional[str] = None) -> dict[str, Any]:
    """Load ``path`` in onnxruntime (all graph optimisations on), save the optimised graph and count
    the matmul / conv ops it runs as integer and as float.

    ``quantized_in_float`` lists float matmul / conv nodes that still read a dequantized integer
    initializer: quantized layers onnxruntime did NOT turn into integer kernels (should be empty).
    With ``plans`` each plan's ``ort_op`` is filled (the op that reads its integer weight).
    """
    import onnx
    with tempfile.TemporaryDirectory() as tmp:
        opt = optimized_path or os.path.join(tmp, "optimized.onnx")
        ort_session(path, threads, opt)
        g = _Graph(onnx.load(opt))
    counts = Counter(n.op_type for n in g.g.node)
    integer = {k: v for k, v in counts.items() if k in INTEGER_OPS}
    floats = {k: v for k, v in counts.items() if k in FLOAT_OPS}
    left = []
    for n in g.g.node:
        if n.op_type not in FLOAT_OPS:
            continue
        for i in n.input:
            p = g.producer.get(i)
            if p is not None and p.op_type == "DequantizeLinear" and p.input[0] in g.init:
                left.append(f"{n.op_type}:{p.input[0]}")
            elif n.op_type == "MatMulNBits" and i in g.init and i.endswith(".qwt_wint"):
                left.append(f"{n.op_type}:{i}")
    by_weight: dict[str, str] = {}
    for n in g.g.node:
        for i in n.input:
            if i.endswith(".qwt_wint") or ".qwt_wint" in i:
                by_weight.setdefault(i.split(".qwt_wint")[0], n.op_type)
    if plans is not None:
        for p in plans:
            p.ort_op = by_weight.get(p.name)
    return {"integer_ops": dict(integer), "float_ops": dict(floats), "quantized_in_float": left,
            "all_ops": dict(counts)}


def ort_run(sess: Any, x: torch.Tensor) -> np.ndarray:
    """The session's first output for the images ``x`` ``(B, 3, H, W)``."""
    name = sess.get_inputs()[0].name
    return sess.run(None, {name: x.detach().cpu().float().numpy()})[0]


def iter_batches(data: Any) -> Iterable[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """``(images, labels or None)`` from a tensor or an iterable of images / ``(images, labels)``."""
    if isinstance(data, torch.Tensor):
        yield data, None
        return
    for item in data:
        if isinstance(item, (tuple, list)):
            yield item[0], item[1] if len(item) > 1 else None
        else:
            yield item, None


def _logits(out) -> torch.Tensor:
    """Logits of a classifier output (a tuple of heads is averaged, like timm's distilled DeiT)."""
    if isinstance(out, (tuple, list)):
        return sum(out) / len(out)
    return out


@torch.no_grad()
def compare_onnx(path: str, reference: nn.Module, data, threads: int = 2, progress: bool = False,
                 desc: str = "ORT vs fake-quant") -> dict[str, Any]:
    """Run the ONNX model and its fake-quant ``reference`` on the same images and compare.

    ``data``: an image tensor ``(B, 3, H, W)`` or an iterable of ``images`` / ``(images, labels)``.
    Returns ``count``, ``identical`` (fraction of equal argmax predictions), ``max_rel_logit_diff``
    (max over images of ``max|l_ort - l_ref| / max|l_ref|``), ``mean_rel_logit_diff`` and, when
    labels are given, ``top1_onnx`` / ``top5_onnx`` / ``top1_reference`` / ``top5_reference`` (%).
    """
    from tqdm.auto import tqdm
    sess = ort_session(path, threads)
    reference = reference.eval()
    device = next(reference.parameters()).device
    n = same = labelled = 0
    hits = {"top1_onnx": 0, "top5_onnx": 0, "top1_reference": 0, "top5_reference": 0}
    rel_max = rel_sum = 0.0
    for images, labels in tqdm(iter_batches(data), desc=desc, disable=not progress, leave=False):
        lo = torch.from_numpy(ort_run(sess, images)).double()
        lr = _logits(reference(images.to(device))).detach().cpu().double()
        rel = (lo - lr).abs().amax(1) / lr.abs().amax(1).clamp_min(1e-12)
        rel_max = max(rel_max, float(rel.max()))
        rel_sum += float(rel.sum())
        same += int((lo.argmax(1) == lr.argmax(1)).sum())
        n += len(lo)
        if labels is not None:
            labels = labels.cpu()
            k = min(5, lo.shape[1])
            for tag, logits in (("onnx", lo), ("reference", lr)):
                top = logits.topk(k, dim=1).indices == labels[:, None]
                hits[f"top1_{tag}"] += int(top[:, 0].sum())
                hits[f"top5_{tag}"] += int(top.any(1).sum())
            labelled += len(labels)
    out: dict[str, Any] = {"count": n, "identical": same / max(n, 1), "max_rel_logit_diff": rel_max,
                           "mean_rel_logit_diff": rel_sum / max(n, 1)}
    if labelled:
        out.update({k: 100.0 * v / labelled for k, v in hits.items()})
    return out
