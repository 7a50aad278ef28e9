"""YOLO adapter: quantization placement, RepQ-ViT-style calibration, and QwT layer by layer.

**Placement** (the zero-shot QAT paper's YOLO code, DFQ-YOLO §1): every ``nn.Conv2d`` of
``model.model[1:-1]`` is a :class:`qwt_core.modules.QuantConv2d` (weights per output channel, conv input
per tensor, both RepQ-ViT percentile-MSE uniform quantizers); the stem ``model.model[0]`` (the image
is never quantized) and the whole ``Detect`` head stay full precision. ``quantize_head=True`` also
quantizes the head's convs, except YOLO11's DFL conv (a fixed integral over the box bins, not a
learned layer). SiLU, BatchNorm (unfolded form), residual adds, concatenations, max-pools,
upsampling and the C2PSA attention matmuls stay fp32.

**BatchNorm** (``bn=``): ``"folded"`` (default; the deploy form, measured better in
``benchmarks/yolo_shapes.py``) folds every BatchNorm into its conv before quantization, exactly as
Ultralytics' ``fuse()`` does, so the quantized weight is the folded one; ``"unfolded"`` keeps BN as
an fp32 module after the quantized conv (what the paper's QAT does).

**Ultralytics' fuse()** (its validator and predictor call it by default) would fold BatchNorm into
an already quantized conv in place, behind the calibrated weight quantizer. :func:`quantize_yolo`
replaces the model's ``fuse`` with a no-op that leaves the model as calibrated (recorded in
``QuantizedYolo.meta``), so validation measures exactly the fake-quant model.

**QwT** (:func:`compensate_yolo`): the layers are walked in forward order honouring each layer's
``f`` (its inputs) and ``model.save`` (outputs read later). A layer whose input is one tensor and
that contains quantized convs (Conv, C3k2, C2f, C3, SPPF, C2PSA, ...) is one QwT block in the conv
form (a grouped 1×1 conv on the layer input, ``C_in // 64`` groups, stride from the output size),
fitted on the inputs the already compensated quantized model produces, with the held-out gate by
default. Multi-input layers (``Concat``, ``Detect``) and layers without quantized convs (stem,
``Upsample``) are skipped with the reason in the report.
"""
from __future__ import annotations

import math
import time
import types
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

# qwt_core is imported by module path (independent of its top-level re-exports); the two
# calls into it are calibrate_yolo (calibration) and _qwt_block (QwT).
from qwt_core.calibrate import calibrate as repq_calibrate_model
from qwt_core.modules import QuantConv2d
from qwt_core.quantize import LayerBits, quantize_layers
from qwt_core.quantizers import validate_bits
from qwt_core.qwt import apply_qwt

from .models import Detector

BnMode = Literal["folded", "unfolded"]
BN_MODES: tuple[str, ...] = ("folded", "unfolded")
#: QwT defaults of this adapter (``qwt_core.apply_qwt`` options): the ResNet conv form, held-out gate.
QWT_DEFAULTS: dict[str, Any] = {"conv_kernel": 1, "conv_group_channels": 64, "gate": "holdout",
                                "ridge": None, "conv_r2_mean": "channel"}


@dataclass(frozen=True)
class YoloQuantConfig:
    """What is quantized and how (serialised into every result JSON).

    Attributes:
        w_bits, a_bits: 2..8 (W8A8, W6A6, W4A8, W4A4 in the benchmark).
        quantize_head: also quantize the Detect head's convs (DFL excluded); default False (the paper).
        bn: ``"folded"`` (deploy form, default) or ``"unfolded"`` (BatchNorm kept as an fp32 module).
    """

    w_bits: int = 8
    a_bits: int = 8
    quantize_head: bool = False
    bn: BnMode = "folded"

    def __post_init__(self) -> None:
        validate_bits(self.w_bits, "w_bits")
        validate_bits(self.a_bits, "a_bits")
        if self.bn not in BN_MODES:
            raise ValueError(f"bn={self.bn!r}: use 'folded' or 'unfolded'")

    @property
    def label(self) -> str:
        return f"W{self.w_bits}A{self.a_bits}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "label": self.label,
                "weights": "uniform, per output channel, MSE over clipping percentiles",
                "activations": "uniform, per tensor (conv input), MSE over clipping percentiles"}


@dataclass
class LayerDecision:
    """QwT's decision for one layer ``model.model[index]``."""

    index: int
    name: str
    type: str
    inputs: Union[int, list[int]]
    applied: bool
    reason: str
    r2: Optional[float] = None
    mse_before: Optional[float] = None
    mse_after: Optional[float] = None
    ridge: Optional[float] = None
    rows: int = 0


@dataclass
class YoloQwTReport:
    """Per-layer decisions of :func:`compensate_yolo` plus the engine's per-block reports."""

    layers: list[LayerDecision] = field(default_factory=list)
    blocks: list[dict[str, Any]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def applied(self) -> list[str]:
        return [d.name for d in self.layers if d.applied]

    def to_dict(self) -> dict[str, Any]:
        def clean(d: dict[str, Any]) -> dict[str, Any]:
            return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}
        return {"seconds": self.seconds, "options": self.options, "notes": self.notes,
                "layers": [clean(asdict(d)) for d in self.layers], "blocks": self.blocks}


@dataclass
class QuantizedYolo:
    """A detector with fake-quant convs in place (returned by :func:`quantize_yolo`)."""

    detector: Detector
    config: YoloQuantConfig
    quantized: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> nn.Module:
        return self.detector.model


# ---- placement ------------------------------------------------------------------------------------

def _layer_index(name: str) -> Optional[int]:
    """``"model.12.cv1.conv"`` → 12 (None for names outside ``model.model``)."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[0] == "model" and parts[1].isdigit():
        return int(parts[1])
    return None


def placement_rule(n_layers: int, w_bits: int, a_bits: int,
                   quantize_head: bool = False) -> Callable[[str, nn.Module], Optional[LayerBits]]:
    """The paper's placement as a ``qwt_core.quantize_layers`` rule: Conv2d of layers 1..n-2 (and of
    the head, DFL excluded, with ``quantize_head``)."""

    def rule(name: str, module: nn.Module) -> Optional[LayerBits]:
        if not isinstance(module, nn.Conv2d):
            return None
        i = _layer_index(name)
        if i is None or i == 0:
            return None
        if i == n_layers - 1 and (not quantize_head or ".dfl." in f".{name}."):
            return None
        return LayerBits(w_bits, a_bits)

    return rule


def expected_quantized(model: nn.Module, quantize_head: bool = False) -> list[str]:
    """Names of the Conv2d the placement selects, from the FP model (for checks and reports)."""
    rule = placement_rule(len(model.model), 8, 8, quantize_head)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and rule(n, m) is not None]


@torch.no_grad()
def fold_batchnorms(model: nn.Module) -> int:
    """Fold every ``Conv``-block BatchNorm into its conv, as Ultralytics' / YOLOv5's ``fuse()`` does
    (the conv gains a bias, ``bn`` is removed, ``forward`` becomes ``forward_fuse``). Returns the count."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights
    n = 0
    for m in model.modules():
        conv, bn = getattr(m, "conv", None), getattr(m, "bn", None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and hasattr(m, "forward_fuse"):
            w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                        bn.eps, bn.weight, bn.bias)
            conv.weight, conv.bias = nn.Parameter(w, requires_grad=False), nn.Parameter(b, requires_grad=False)
            delattr(m, "bn")
            m.forward = m.forward_fuse
            n += 1
    return n


def _no_fuse(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    """Replacement for ``DetectionModel.fuse`` on a quantized model: folding BatchNorm into a
    calibrated fake-quant conv would change its weight behind its quantizer, so nothing is folded."""
    return self


def quantize_yolo(det: Detector, config: YoloQuantConfig) -> QuantizedYolo:
    """Swap the selected convs of ``det.model`` for fake-quant convs, in place (uncalibrated).

    Returns a :class:`QuantizedYolo`; ``quantized`` lists the swapped layers by qualified name.
    The model's ``fuse`` becomes a no-op (see the module docstring).
    """
    model = det.model
    model.eval()
    n_folded = fold_batchnorms(model) if config.bn == "folded" else 0
    rule = placement_rule(len(model.model), config.w_bits, config.a_bits, config.quantize_head)
    swapped = quantize_layers(model, rule)
    model.fuse = types.MethodType(_no_fuse, model)
    n_conv = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    meta = {"family": det.family, "bn_folded_count": n_folded, "quantized_convs": len(swapped),
            "conv2d_total": n_conv, "fp_convs": n_conv - len(swapped),
            "fuse": "disabled on the quantized model (Ultralytics' validator would refold BatchNorm "
                    "into calibrated fake-quant convs)",
            "placement": "every Conv2d of model.model[1:-1]" +
                         (" and of the Detect head (DFL excluded)" if config.quantize_head else
                          "; stem and Detect head full precision")}
    return QuantizedYolo(det, config, list(swapped), meta)


# ---- calibration (the one call into qwt_core's calibration) ----------------------------------------

@torch.no_grad()
def calibrate_yolo(qy: QuantizedYolo, images: torch.Tensor) -> dict[str, Any]:
    """RepQ-ViT-style calibration: one forward of ``images`` ``(B, 3, H, W)`` in [0, 1] (32 in the
    paper's recipe) initialises every quantizer in forward order on already quantized inputs.
    Returns the calibration report as a dict."""
    model = qy.model
    model.eval()
    report = repq_calibrate_model(model, lambda: model(images), ln_pairs=None, warn=False)
    return report.to_dict()


# ---- the layer walk ----------------------------------------------------------------------------------

LayerInput = Union[torch.Tensor, list]


def _gather(f: Union[int, Sequence[int]], x: Any, y: list) -> Any:
    """Input of a layer with ``from`` = ``f`` given the previous output ``x`` and saved outputs ``y``."""
    if f == -1:
        return x
    if isinstance(f, int):
        return y[f]
    return [x if j == -1 else y[j] for j in f]


def _has_quant(layer: nn.Module) -> bool:
    return any(isinstance(m, QuantConv2d) for m in layer.modules())


def _why_not(i: int, layer: nn.Module, n_layers: int) -> Optional[str]:
    """Why layer ``i`` is not a QwT block (None if it is one)."""
    f = layer.f
    if i == n_layers - 1:
        return (f"Detect head: multi-input (f={list(f)}), "
                + ("quantized convs left uncompensated" if _has_quant(layer) else "full precision"))
    if not isinstance(f, int):
        return f"multi-input (f={list(f)}): {type(layer).__name__} takes several tensors"
    if not _has_quant(layer):
        return "full precision (stem)" if i == 0 else f"no quantized conv ({type(layer).__name__})"
    return None


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(t, device) for t in x)
    return x


# ---- QwT (the one call into qwt_core's compensation) -------------------------------------------------

def _qwt_block(model: nn.Module, name: str, inputs: list[torch.Tensor], options: dict[str, Any],
               notes: list[str]):
    """QwT on the single block ``name`` with its calibration inputs (one tensor per batch); the
    engine's warnings are collected into ``notes`` (one run per layer would repeat them)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = apply_qwt(model, [name], inputs, lambda x: x, form="conv", progress=False,
                                 **options)
    notes += [f"{name}: {w.message}" for w in caught]
    return rep


@torch.no_grad()
def compensate_yolo(qy: QuantizedYolo, batches: Sequence[torch.Tensor], progress: bool = True,
                    store_device: Optional[Union[str, torch.device]] = None,
                    **qwt_options: Any) -> YoloQwTReport:
    """QwT over the layers of a calibrated quantized YOLO (in place), walking its graph.

    Args:
        qy: from :func:`quantize_yolo`, calibrated by :func:`calibrate_yolo`.
        batches: calibration images, each ``(B, 3, H, W)`` in [0, 1] (the held-out gate holds out
            one image in four: use at least 8 images in all).
        progress: a tqdm bar over the layers.
        store_device: where the saved layer outputs are kept between layers (default: the model's).
        qwt_options: ``qwt_core.apply_qwt`` options overriding :data:`QWT_DEFAULTS` (``gate``,
            ``ridge``, ``conv_kernel``, ``conv_group_channels``, ``solver`` ...).
    Returns:
        A :class:`YoloQwTReport` with one :class:`LayerDecision` per layer of ``model.model``.
    """
    model = qy.model
    model.eval()
    device = next(model.parameters()).device
    store = torch.device(store_device) if store_device is not None else device
    options = {**QWT_DEFAULTS, **{k: v for k, v in qwt_options.items() if v is not None}}
    layers = list(model.model)
    n = len(layers)
    save = set(model.save)
    report = YoloQwTReport(options=dict(options))
    t0 = time.perf_counter()
    states = [{"x": b.to(store), "y": []} for b in batches]
    bar = tqdm(range(n), desc="QwT layers", disable=not progress)
    for i in bar:
        layer = model.model[i]
        inputs = [_gather(layer.f, st["x"], st["y"]) for st in states]
        reason = _why_not(i, layer, n)
        dec = LayerDecision(index=i, name=f"model.{i}", type=type(layer).__name__,
                            inputs=layer.f if isinstance(layer.f, int) else list(layer.f),
                            applied=False, reason=reason or "")
        if reason is None:
            rep = _qwt_block(model, f"model.{i}", [_to(x, device) for x in inputs], options, report.notes)
            b = rep.blocks[0]
            report.blocks.append(rep.to_dict()["blocks"][0])
            dec.applied, dec.r2, dec.rows, dec.ridge = b.applied, b.r2, b.rows, b.ridge
            dec.mse_before, dec.mse_after = b.mse_before, b.mse_after
            gate = options.get("gate", "holdout")
            r2 = "-" if b.r2 is None else f"{b.r2:.4f}"
            dec.reason = (f"compensated ({gate} R² {r2})" if b.applied else
                          f"gate: {gate} R² {r2} ≤ 0, left as quantized")
            layer = model.model[i]        # a CompensatedBlock when applied
            bar.set_postfix(layer=i, r2=r2)
        report.layers.append(dec)
        if i < n - 1:
            for st, x in zip(states, inputs):
                out = layer(_to(x, device)).to(store)
                st["x"] = out
                st["y"].append(out if i in save else None)
    report.seconds = time.perf_counter() - t0
    if report.notes:
        warnings.warn(f"QwT: {len(report.notes)} layer warnings, e.g. {report.notes[0]} "
                      "(all in the report's notes)", stacklevel=2)
    return report


@torch.no_grad()
def layer_outputs(model: nn.Module, images: torch.Tensor) -> list[Any]:
    """Outputs of every layer of ``model.model`` for ``images`` ``(B, 3, H, W)`` (the same walk as
    the model's own forward; the Detect output in its eval form)."""
    y, outs, x = [], [], images
    save = set(model.save)
    for m in model.model:
        x = m(_gather(m.f, x, y))
        outs.append(x)
        y.append(x if m.i in save else None)
    return outs
