"""RepQ-ViT calibration: lazy init pass, post-LayerNorm reparameterization, weight re-fit pass.

The reparameterization works on *norm groups*: one norm whose output feeds one or more Linears
with channel-wise input quantizers (timm's fused ``qkv`` is one Linear; Hugging Face models have
separate ``q_proj``/``k_proj``/``v_proj``). The norm is folded once, every Linear of the group gets
the matching weight/bias change. Two cases:

* **LayerNorm with a bias** (:func:`qwt_core.reparam.reparameterize_layernorm`): scale *and*
  zero point are folded (``γ ← γ/r``, ``b ← b/r − β``; ``W ← W·r``, ``bias += W'β``). Exact in
  floating point; with an integer z̃ the quantized activations are unchanged too.
* **Norm without a bias** (RMSNorm, ``LayerNorm(bias=False)``): the shift β needs a norm bias, so
  only the scale is folded (:func:`fold_norm_scale`: ``γ ← γ/r``, ``W ← W·r`` with
  ``r_c = s_c / mean(s)``). Exact in floating point. The input quantizer becomes per tensor and is
  re-initialised by the second calibration pass on the rescaled activations, i.e. the Linear sees
  per-channel steps ``∝ s_c`` with one shared zero point (the per-channel zero points ``z_c`` cannot
  be folded without a bias).
"""
from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import torch
from torch import nn

from .modules import QuantConv2d, QuantLinear, quantizers, set_quant_state
from .quantizers import UniformQuantizer
from .reparam import reparameterize_layernorm


def uninitialized_quantizers(model: nn.Module) -> list[str]:
    """Names of enabled quantizers that have not seen data yet."""
    return [name for name, q in quantizers(model) if q.enabled and not q.is_inited]


def group_ln_pairs(ln_pairs: Sequence[tuple[nn.Module, QuantLinear]]
                   ) -> list[tuple[nn.Module, list[QuantLinear]]]:
    """``[(norm, linear), ...]`` → ``[(norm, [linears...]), ...]`` (first-seen order, by identity)."""
    groups: dict[int, tuple[nn.Module, list[QuantLinear]]] = {}
    for norm, linear in ln_pairs:
        entry = groups.setdefault(id(norm), (norm, []))
        if not any(linear is other for other in entry[1]):
            entry[1].append(linear)
    return list(groups.values())


def norm_fold_mode(norm: nn.Module) -> Literal["layernorm", "scale_only"]:
    """``"layernorm"`` if ``norm`` has an elementwise weight and bias, ``"scale_only"`` if it has
    a weight only (RMSNorm); ``ValueError`` if it has no 1-D weight to fold into."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise ValueError(f"{type(norm).__name__} has no elementwise affine weight to fold the "
                         "quantization scale into")
    bias = getattr(norm, "bias", None)
    return "layernorm" if isinstance(bias, torch.Tensor) else "scale_only"


def _check_group(norm: nn.Module, linears: Sequence[QuantLinear]) -> None:
    if not linears:
        raise ValueError("a norm group needs at least one Linear")
    first = linears[0].input_quantizer
    for lin in linears:
        q = lin.input_quantizer
        if not isinstance(lin, QuantLinear) or not isinstance(q, UniformQuantizer) \
                or not q.channel_wise or not q.is_inited:
            raise ValueError(f"{type(lin).__name__}: reparameterization needs QuantLinears with "
                             "calibrated channel-wise input quantizers (run a calibration forward first)")
        if q.delta.numel() != norm.weight.numel():
            raise ValueError(f"channel mismatch: quantizer {q.delta.numel()}, norm {norm.weight.numel()}")
        if q.n_bits != first.n_bits or not torch.equal(q.delta, first.delta) \
                or not torch.equal(q.zero_point, first.zero_point):
            raise ValueError("the Linears fed by one norm must have identical channel-wise input "
                             "quantizers (same bits, calibrated on the same input) to share one fold")


@torch.no_grad()
def fold_norm_scale(norm: nn.Module, linears: Sequence[QuantLinear]) -> None:
    """Scale-only RepQ fold for a norm without bias (RMSNorm): ``γ ← γ/r``, ``W[:, c] ← W[:, c]·r_c``.

    ``r_c = s_c / mean(s)`` from the (shared) calibrated channel-wise input quantizer of the
    Linears. The floating-point function is unchanged. Each input quantizer becomes per tensor and
    uninitialised (the next calibration forward fits one (Δ, z) on the rescaled activations); each
    weight quantizer is reset.
    """
    _check_group(norm, linears)
    s = linears[0].input_quantizer.delta.reshape(-1).to(torch.float64)
    r = s / s.mean()
    norm.weight.copy_((norm.weight.double() / r).to(norm.weight.dtype))
    for lin in linears:
        lin.weight.copy_((lin.weight.double() * r[None, :]).to(lin.weight.dtype))
        lin.input_quantizer.channel_wise = False
        lin.input_quantizer.reset()
        lin.weight_quantizer.reset()


@torch.no_grad()
def reparameterize_norm_group(norm: nn.Module, linears: Sequence[QuantLinear],
                              integer_zero_point: bool = False) -> Literal["layernorm", "scale_only"]:
    """Fold the channel-wise input quantizer shared by ``linears`` into ``norm`` and ``linears``.

    LayerNorm with bias: RepQ-ViT's full reparameterization (:func:`reparameterize_layernorm`)
    applied to the norm once and to every Linear. Norm without bias: :func:`fold_norm_scale`.
    Returns the mode used.
    """
    mode = norm_fold_mode(norm)
    _check_group(norm, linears)
    if mode == "scale_only":
        fold_norm_scale(norm, linears)
        return mode
    # The first Linear folds into the real norm; the others get the same (r, β) through a scratch
    # identity norm (their quantizers are identical, checked above), so the norm is folded once.
    scratch = [nn.LayerNorm(norm.weight.numel(), device=norm.weight.device, dtype=norm.weight.dtype)
               for _ in linears[1:]]
    reparameterize_layernorm(norm, linears[0], integer_zero_point=integer_zero_point)
    for tmp, lin in zip(scratch, linears[1:]):
        reparameterize_layernorm(tmp, lin, integer_zero_point=integer_zero_point)
    return mode


@torch.no_grad()
def refit_weight_quantizers(model: nn.Module) -> int:
    """Initialise every reset weight quantizer of a quant Linear / Conv directly on its weight.

    What the lazy second calibration forward would do for them (``quantized_weight`` calls the
    quantizer on ``self.weight``; a weight quantizer never sees activations), without running the
    model. Returns how many were initialised.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantConv2d)) and m.use_weight_quant:
            wq = m.weight_quantizer
            if wq.enabled and not wq.is_inited:
                wq.initialize(m.weight)
                n += 1
    return n


@torch.no_grad()
def repq_calibrate(forward: Callable[[], Any], model: nn.Module,
                   ln_pairs: Sequence[tuple[nn.Module, QuantLinear]],
                   integer_zero_point: bool = False) -> None:
    """Run RepQ-ViT's three calibration steps on ``model``.

    1. ``forward()`` with quantization on: every quantizer initialises lazily, in forward order, on
       already-quantized inputs;
    2. each norm with its Linears (pairs grouped by norm) is reparameterized (channel-wise →
       per-tensor input quantizer, the Linears' weight quantizers are reset);
    3. the reset quantizers are re-fitted: weight quantizers directly on their weights (what a
       forward would do for them), and ``forward()`` runs again only if an activation quantizer
       was reset too (norms without a bias, :func:`fold_norm_scale`).

    ``forward`` runs the model on the calibration batch (e.g. ``lambda: model(images)``). For any
    model with automatic pair detection and padding masks see :func:`qwt_core.calibrate.calibrate`.
    """
    set_quant_state(model, weight=True, act=True)
    forward()
    for norm, linears in group_ln_pairs(ln_pairs):
        reparameterize_norm_group(norm, linears, integer_zero_point=integer_zero_point)
    refit_weight_quantizers(model)
    if uninitialized_quantizers(model):
        forward()
