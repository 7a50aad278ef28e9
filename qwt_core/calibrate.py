"""RepQ-ViT calibration for any model: automatic norm → Linear pairs, post-LN detection, masks.

:func:`calibrate` is the public entry for models without an adapter (and for adapters whose
batches carry padding). It runs RepQ-ViT's three steps (:mod:`qwt_core.repq`):

1. one ``forward()`` with quantization on: every quantizer initialises lazily (input quantizers of
   Linears on the real rows only when a ``row_mask`` is given, see :func:`calibration_mask`);
2. the norm → Linear reparameterization (:func:`qwt_core.repq.reparameterize_norm_group`) of every
   pair that is exact;
3. the quantizers reset by step 2 are re-fitted: weight quantizers on their weights, and a second
   ``forward()`` only if an input quantizer was reset (norms without a bias).

``ln_pairs="auto"`` finds the pairs during step 1: a ``TorchFunctionMode`` follows every norm's
output tensor (through layout-only ops such as ``view``/``permute`` keeping channels last, and
identity ops such as dropout in eval mode) and records who consumes it. A norm is reparameterized
only if every consumer is a Linear with a channel-wise input quantizer that reads nothing else.
A norm whose output *also* feeds anything else (the residual add of a post-LN model such as BERT,
a per-tensor quantized layer, the model output) cannot be folded without changing the model; it is
skipped with a one-line warning and recorded in :class:`CalibrationReport`. The channel-wise input
quantizers that are not folded become per-tensor (re-initialised in step 3) unless
``keep_channel_wise=True``.
"""
from __future__ import annotations

import logging
import time
import warnings
import weakref
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Literal, Optional, Sequence, Union

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .modules import QuantLayerMixin, QuantLinear, quantizers, set_quant_state
from .quantizers import UniformQuantizer
from .repq import (group_ln_pairs, norm_fold_mode, refit_weight_quantizers, reparameterize_norm_group,
                   uninitialized_quantizers)

logger = logging.getLogger(__name__)

MaskLike = Union[torch.Tensor, Callable[[], Optional[torch.Tensor]], None]
PairSpec = Union[Literal["auto"], Sequence[tuple[Union[str, nn.Module], Union[str, nn.Module]]], None]

_ADD_OPS = {"add", "add_", "__add__", "__radd__", "__iadd__"}
_LAYOUT_OPS = {"view", "reshape", "flatten", "unflatten", "contiguous", "view_as", "reshape_as"}
_METADATA_OK = (torch.Size, torch.dtype, torch.device, int, float, bool, str, type(None))


# --------------------------------------------------------------------------- report
@dataclass
class NormGroup:
    """One norm whose output feeds channel-wise quantized Linears, and what calibration did to it.

    ``mode``: ``"layernorm"`` (scale and zero point folded, norm with bias) or ``"scale_only"``
    (RMSNorm: scale folded, one per-tensor zero point). ``reason`` says why it was skipped.
    """

    norm: str
    linears: list[str]
    mode: str = ""
    applied: bool = False
    reason: str = ""


@dataclass
class CalibrationReport:
    """What :func:`calibrate` did.

    Attributes:
        groups: every norm found feeding channel-wise quantized Linears (applied or skipped).
        per_tensor: Linears whose channel-wise input quantizer was made per tensor (no exact fold).
        masked: Linears whose input quantizer was initialised on the real rows of ``row_mask``.
        unmasked: activation quantizers initialised on all rows although a mask was given (their
            input's leading dims did not match the mask, e.g. attention matmuls).
        quantizers: number of quantizers calibrated.
        seconds: wall time.
    """

    groups: list[NormGroup] = field(default_factory=list)
    per_tensor: list[str] = field(default_factory=list)
    masked: list[str] = field(default_factory=list)
    unmasked: list[str] = field(default_factory=list)
    quantizers: int = 0
    seconds: float = 0.0

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """Reparameterized ``(norm name, linear name)`` pairs."""
        return [(g.norm, lin) for g in self.groups if g.applied for lin in g.linears]

    @property
    def skipped(self) -> list[NormGroup]:
        """Norm groups whose reparameterization was skipped."""
        return [g for g in self.groups if not g.applied]

    def to_dict(self) -> dict[str, Any]:
        return {"groups": [asdict(g) for g in self.groups], "per_tensor": list(self.per_tensor),
                "masked": len(self.masked), "unmasked": list(self.unmasked),
                "quantizers": self.quantizers, "seconds": self.seconds}

    def format_summary(self) -> str:
        applied = [g for g in self.groups if g.applied]
        lines = [f"calibrated {self.quantizers} quantizers in {self.seconds:.1f}s; "
                 f"{len(applied)} norms reparameterized, {len(self.skipped)} skipped"]
        for g in self.skipped:
            lines.append(f"  skipped {g.norm}: {g.reason}")
        if self.unmasked:
            lines.append(f"  {len(self.unmasked)} activation quantizers saw padding rows too "
                         f"(e.g. {self.unmasked[0]})")
        return "\n".join(lines)


# --------------------------------------------------------------------------- masks
def _as_bool_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask > 0


@contextmanager
def calibration_mask(model: nn.Module, mask: MaskLike) -> Iterator[list[str]]:
    """Initialise the input quantizers of the Linears below ``model`` on real rows only.

    ``mask``: bool (or float: ``> 0`` is real) tensor ``(B, L)`` marking real tokens, or a
    callable returning the current batch's mask (for a ``forward`` that loops over batches).
    While the context is active, a forward pre-hook on every :class:`QuantLinear` whose input
    ``x`` has leading dims equal to the mask's shape (``x: (B, L, ..., C)``) initialises its
    still uninitialised input quantizer on ``x[mask]`` before the layer runs. Other quant layers
    initialise lazily on all rows, as usual. Yields the list of Linear names initialised with the
    mask (filled while the context is active).
    """
    get = mask if callable(mask) else (lambda: mask)
    masked: list[str] = []

    def hook(name: str, module: QuantLinear, args: tuple, kwargs: dict) -> None:
        quant = module.input_quantizer
        if not (module.use_act_quant and quant.enabled and not quant.is_inited):
            return
        x = args[0] if args else kwargs.get("input")
        m = get()
        if m is None or not isinstance(x, torch.Tensor):
            return
        if x.dim() <= m.dim() or tuple(x.shape[: m.dim()]) != tuple(m.shape):
            return
        rows = x[_as_bool_mask(m).to(x.device)]
        if rows.shape[0] == 0:
            raise ValueError(f"calibration mask selects no rows for {name}: the batch has no real tokens")
        quant.initialize(rows)
        masked.append(name)

    handles = [layer.register_forward_pre_hook(
                   lambda mod, args, kwargs, _n=name: hook(_n, mod, args, kwargs), with_kwargs=True)
               for name, layer in model.named_modules() if isinstance(layer, QuantLinear)]
    try:
        yield masked
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- tracking
def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def is_norm_module(module: nn.Module) -> bool:
    """LayerNorm/RMSNorm-like: ``nn.LayerNorm``/``nn.RMSNorm`` or a leaf module named ``*Norm``
    with a 1-D ``weight`` (HF ``LlamaRMSNorm``, ``T5LayerNorm``...); batch/group norms excluded."""
    if isinstance(module, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
        return True
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.InstanceNorm1d,
                           nn.InstanceNorm2d, nn.InstanceNorm3d)):
        return False
    weight = getattr(module, "weight", None)
    return ("norm" in type(module).__name__.lower() and isinstance(weight, torch.Tensor)
            and weight.dim() == 1 and not any(True for _ in module.children()))


class _ConsumerTracker(TorchFunctionMode):
    """Follows norm output tensors through one forward and records their consumers."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.norms = [(n, m) for n, m in model.named_modules() if n and is_norm_module(m)]
        self.quant_layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)]
        self.tracked: dict[int, tuple[weakref.ref, str]] = {}
        # norm name -> consumer descriptions; channel-wise Linears reading each norm
        self.others: dict[str, set[str]] = defaultdict(set)
        self.cw_linears: dict[str, list[str]] = defaultdict(list)
        # channel-wise Linear name -> set of norms (None: a tensor that is no norm's output)
        self.linear_sources: dict[str, set[Optional[str]]] = defaultdict(set)
        self.depth = 0
        self.handles: list[Any] = []

    # -- tensor bookkeeping
    def _lookup(self, t: torch.Tensor) -> Optional[str]:
        entry = self.tracked.get(id(t))
        if entry is None or entry[0]() is not t:
            return None
        return entry[1]

    def _track(self, t: torch.Tensor, norm: str) -> None:
        self.tracked[id(t)] = (weakref.ref(t), norm)

    # -- hooks
    def _norm_hook(self, name: str, module: nn.Module, args: tuple, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            self._track(out, name)

    def _layer_pre(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.depth == 0:
            inputs = list(_tensors(args)) + list(_tensors(kwargs))
            sources = [self._lookup(t) for t in inputs]
            channel_wise = (isinstance(module, QuantLinear)
                            and isinstance(module.input_quantizer, UniformQuantizer)
                            and module.input_quantizer.channel_wise)
            if channel_wise:
                src = sources[0] if sources else None
                self.linear_sources[name].add(src)
                if src is not None and name not in self.cw_linears[src]:
                    self.cw_linears[src].append(name)
            else:
                kind = "per-tensor quantized" if isinstance(module, QuantLinear) else "quantized"
                for src in sources:
                    if src is not None:
                        self.others[src].add(f"{kind} layer {name}")
        self.depth += 1

    def _layer_post(self, module: nn.Module, args: tuple, out: Any) -> None:
        self.depth -= 1

    def __enter__(self):
        for name, m in self.norms:
            self.handles.append(m.register_forward_hook(
                lambda mod, a, o, _n=name: self._norm_hook(_n, mod, a, o)))
        for name, m in self.quant_layers:
            self.handles.append(m.register_forward_pre_hook(
                lambda mod, a, k, _n=name: self._layer_pre(_n, mod, a, k), with_kwargs=True,
                prepend=True))
            self.handles.append(m.register_forward_hook(self._layer_post))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for h in self.handles:
                h.remove()
            self.handles.clear()
            self.tracked.clear()

    # -- every torch call
    @staticmethod
    def _keeps_channels(name: str, args: tuple, kwargs: dict, t_in: torch.Tensor,
                        out: torch.Tensor) -> bool:
        """Layout op that keeps the last dim as the same channels (``x.view(B, H, W, C)``...)."""
        if out.shape[-1:] != t_in.shape[-1:] or out.dtype != t_in.dtype or t_in.dim() == 0:
            return False
        if name in _LAYOUT_OPS:
            return True
        nd = t_in.dim()
        rest = [a for a in args if a is not t_in]
        if name == "transpose" and len(rest) >= 2:
            dims = [int(d) % nd for d in rest[:2]]
            return nd - 1 not in dims
        if name == "permute":
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
            dims = kwargs.get("dims", dims)
            return len(dims) == nd and int(dims[-1]) % nd == nd - 1
        if name == "roll":
            dims = kwargs.get("dims", rest[1] if len(rest) > 1 else None)
            if dims is None:
                return False
            dims = [dims] if isinstance(dims, int) else list(dims)
            return all(int(d) % nd != nd - 1 for d in dims)
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth > 0 or not self.tracked:
            return func(*args, **kwargs)
        inputs = [(t, self._lookup(t)) for t in _tensors((args, kwargs))]
        hits = [(t, n) for t, n in inputs if n is not None]
        out = func(*args, **kwargs)
        if not hits:
            return out
        name = getattr(func, "__name__", str(func))
        if name == "__get__" or (isinstance(out, _METADATA_OK) and name != "__setitem__") or \
                (isinstance(out, tuple) and not any(True for _ in _tensors(out))):
            return out  # metadata (shape, dtype, size(), dim()...), not a data consumer
        if len(hits) == 1 and len(inputs) == 1 and isinstance(out, torch.Tensor):
            t_in, norm = hits[0]
            if self._keeps_channels(name, args, kwargs, t_in, out) or (
                    out.shape == t_in.shape and out.dtype == t_in.dtype and torch.equal(out, t_in)):
                self._track(out, norm)  # same values / same channels: follow the tensor
                return out
        for _, norm in hits:
            self.others[norm].add(f"op {name}")
        return out

    def note_returned(self, out: Any) -> None:
        """Mark norms whose output tensor is (part of) what ``forward()`` returned."""
        for t in _tensors(out if not hasattr(out, "to_tuple") else out.to_tuple()):
            norm = self._lookup(t)
            if norm is not None:
                self.others[norm].add("the forward's return value")


def _describe_others(others: set[str]) -> str:
    ops = sorted(others)
    text = ", ".join(ops[:4]) + (f" and {len(ops) - 4} more" if len(ops) > 4 else "")
    if any(o.startswith("op ") and o[3:] in _ADD_OPS for o in ops):
        return f"its output also feeds {text} (the residual stream: post-LN)"
    return f"its output also feeds {text}"


@torch.no_grad()
def _norm_is_affine(norm: nn.Module, mode: str) -> bool:
    """True if ``norm(x) = γ·u(x) (+ b)`` for the module's own ``weight``/``bias`` (probe check),
    i.e. folding a scale/shift into them is exact (catches e.g. ``(1 + γ)·u`` norms)."""
    w = norm.weight
    c = w.numel()
    g = torch.Generator().manual_seed(0)
    probe = torch.randn(2, 3, c, generator=g).to(device=w.device, dtype=w.dtype)
    a = (0.5 + torch.rand(c, generator=g)).to(device=w.device, dtype=w.dtype)
    b = torch.randn(c, generator=g).to(device=w.device, dtype=w.dtype)
    saved_w = w.detach().clone()
    saved_b = norm.bias.detach().clone() if mode == "layernorm" else None
    try:
        w.copy_(torch.ones_like(w))
        if saved_b is not None:
            norm.bias.zero_()
        u = norm(probe)
        w.copy_(a)
        if saved_b is not None:
            norm.bias.copy_(b)
        got = norm(probe)
    finally:
        w.copy_(saved_w)
        if saved_b is not None:
            norm.bias.copy_(saved_b)
    want = a * u + (b if saved_b is not None else 0)
    return isinstance(got, torch.Tensor) and got.shape == want.shape and \
        bool(torch.allclose(got.float(), want.float(), rtol=1e-4, atol=1e-5))


# --------------------------------------------------------------------------- API
def _resolve(model: nn.Module, item: Union[str, nn.Module], what: str) -> tuple[str, nn.Module]:
    names = {id(m): n for n, m in model.named_modules()}
    if isinstance(item, str):
        try:
            return item, model.get_submodule(item)
        except AttributeError:
            raise ValueError(f"ln_pairs: {what} {item!r} is not a submodule of the model") from None
    if id(item) not in names:
        raise ValueError(f"ln_pairs: the {what} {type(item).__name__} is not part of the model")
    return names[id(item)], item


def _explicit_groups(model: nn.Module, ln_pairs: Sequence) -> list[tuple[str, nn.Module, list[tuple[str, QuantLinear]]]]:
    resolved = []
    for pair in ln_pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"ln_pairs entries must be (norm, linear) pairs, got {pair!r}")
        norm_name, norm = _resolve(model, pair[0], "norm")
        lin_name, lin = _resolve(model, pair[1], "linear")
        if not isinstance(lin, QuantLinear) or not getattr(lin.input_quantizer, "channel_wise", False):
            raise ValueError(f"ln_pairs: {lin_name} is not a QuantLinear with a channel-wise input "
                             "quantizer (quantize it with LayerBits(..., act_channel_wise=True))")
        norm_fold_mode(norm)  # raises for a norm without elementwise weight
        resolved.append((norm, lin))
    names = {id(m): n for n, m in model.named_modules()}
    return [(names[id(norm)], norm, [(names[id(lin)], lin) for lin in lins])
            for norm, lins in group_ln_pairs(resolved)]


def _act_quantizers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, q) for n, q in quantizers(model) if not n.endswith("weight_quantizer")]


@torch.no_grad()
def calibrate(model: nn.Module, forward: Callable[[], Any], ln_pairs: PairSpec = "auto",
              row_mask: MaskLike = None, integer_zero_point: bool = False,
              keep_channel_wise: bool = False, warn: bool = True) -> CalibrationReport:
    """RepQ-ViT calibration of any quantized model (see the module docstring).

    Args:
        model: the model with quant layers in place (``quantize_layers`` or an adapter), not yet
            calibrated; a :class:`~qwt_core.QuantizedModel` is accepted too (its ``.model``).
        forward: runs the model on the calibration data, e.g. ``lambda: model(**batch)``; may loop
            over several batches (then pass a callable ``row_mask``).
        ln_pairs: ``"auto"`` (find norm → channel-wise Linear pairs during the first pass), an
            explicit list of ``(norm, linear)`` (modules or qualified names; still checked, unsafe
            ones are skipped like in auto mode), or ``None``/``[]`` (no reparameterization).
        row_mask: ``(B, L)`` bool/float tensor of real tokens (or a callable returning the current
            batch's mask); Linear input quantizers are initialised on those rows only.
        integer_zero_point: round z̃ in the LayerNorm fold (exact quantized equivalence).
        keep_channel_wise: keep channel-wise input quantizers that are not folded (per-channel
            activation quantization) instead of making them per tensor.
        warn: emit a one-line ``UserWarning`` when norms are skipped.
    Returns:
        A :class:`CalibrationReport`. The model is modified in place and left in eval mode.
    Raises:
        ValueError: no quant layers, already calibrated, bad ``ln_pairs`` (before anything runs).
        RuntimeError: a quantizer saw no data.
    """
    model = getattr(model, "model", model) if not isinstance(model, nn.Module) else model
    if not isinstance(model, nn.Module):
        raise TypeError(f"calibrate needs an nn.Module or QuantizedModel, got {type(model).__name__}")
    if not callable(forward):
        raise TypeError("calibrate: forward must be a callable that runs the model, e.g. lambda: model(x)")
    all_q = list(quantizers(model))
    if not all_q:
        raise ValueError("calibrate: the model has no quant layers; call quantize_layers (or an "
                         "adapter) first")
    done = [n for n, q in all_q if q.enabled and q.is_inited]
    if done:
        raise ValueError(f"calibrate: {len(done)} of {len(all_q)} quantizers are already calibrated "
                         f"(e.g. {done[0]!r}); calibrate a freshly quantized model")
    if ln_pairs is not None and not isinstance(ln_pairs, str) and len(ln_pairs) > 0:
        requested = _explicit_groups(model, ln_pairs)
    elif ln_pairs is None or isinstance(ln_pairs, (list, tuple)):
        requested = []
    elif ln_pairs == "auto":
        requested = None
    else:
        raise ValueError(f"ln_pairs={ln_pairs!r}: use 'auto', a list of (norm, linear) pairs or None")
    if row_mask is not None and not (callable(row_mask) or isinstance(row_mask, torch.Tensor)):
        raise TypeError("row_mask must be a (B, L) tensor, a callable returning one, or None")

    t0 = time.perf_counter()
    model.eval()
    set_quant_state(model, weight=True, act=True)
    act_before = {n for n, q in _act_quantizers(model) if q.enabled}
    tracker = _ConsumerTracker(model)
    with calibration_mask(model, row_mask) as masked, tracker:
        out = forward()
        tracker.note_returned(out)
    del out

    modules = dict(model.named_modules())
    if requested is None:  # auto: every norm read by channel-wise Linears
        candidates = [(n, modules[n], [(ln, modules[ln]) for ln in tracker.cw_linears[n]])
                      for n, _ in tracker.norms if tracker.cw_linears.get(n)]
    else:
        candidates = requested
    report = CalibrationReport()
    for norm_name, norm, linears in candidates:
        group = NormGroup(norm_name, [ln for ln, _ in linears])
        reason = ""
        if tracker.others.get(norm_name):
            reason = _describe_others(tracker.others[norm_name])
        else:
            for ln, _ in linears:
                src = tracker.linear_sources.get(ln, set())
                if src != {norm_name}:
                    reason = (f"{ln} was not reached by the forward" if not src else
                              f"{ln} also reads tensors that are not this norm's output")
                    break
            missing = [ln for ln in tracker.cw_linears.get(norm_name, []) if ln not in group.linears]
            if not reason and missing:
                reason = f"its output also feeds {missing[0]}, which is not in ln_pairs"
        if not reason:
            try:
                group.mode = norm_fold_mode(norm)
            except ValueError as exc:
                reason = str(exc)
        if not reason and not _norm_is_affine(norm, group.mode):
            reason = "its output is not weight·u(x) (+ bias) (e.g. a (1 + γ) norm): folding is not exact"
        if not reason:
            try:
                reparameterize_norm_group(norm, [lin for _, lin in linears], integer_zero_point)
                group.applied = True
            except ValueError as exc:
                reason = str(exc)
        group.reason = reason
        report.groups.append(group)
        if reason:
            logger.info("calibrate: skipped the reparameterization of %s: %s", norm_name, reason)

    folded = {ln for g in report.groups if g.applied for ln in g.linears}
    for name, layer in model.named_modules():
        q = getattr(layer, "input_quantizer", None)
        if isinstance(layer, QuantLinear) and isinstance(q, UniformQuantizer) and q.channel_wise \
                and name not in folded and not keep_channel_wise:
            q.channel_wise = False
            q.reset()
            report.per_tensor.append(name)
    skipped = report.skipped
    if warn and skipped:
        post_ln = [g for g in skipped if "post-LN" in g.reason]
        example = (post_ln or skipped)[0]
        warnings.warn(f"calibrate: skipped the reparameterization of {len(skipped)} norm(s) "
                      f"({len(post_ln)} feed the residual stream too: post-LN), e.g. {example.norm}: "
                      f"{example.reason}; their Linears get per-tensor input quantizers"
                      if not keep_channel_wise else
                      f"calibrate: skipped the reparameterization of {len(skipped)} norm(s), e.g. "
                      f"{example.norm}: {example.reason}", UserWarning, stacklevel=2)

    refit_weight_quantizers(model)  # weight quantizers need no forward
    masked2: list[str] = []
    if uninitialized_quantizers(model):
        with calibration_mask(model, row_mask) as masked2:
            forward()
    missing = uninitialized_quantizers(model)
    if missing:
        raise RuntimeError(f"{len(missing)} quantizers saw no data during calibration, e.g. {missing[:3]}; "
                           "the forward does not reach those layers")
    report.masked = sorted(set(masked) | set(masked2))
    if row_mask is not None:
        masked_q = {f"{n}.input_quantizer" for n in report.masked}
        report.unmasked = sorted(n for n in act_before if n not in masked_q)
    report.quantizers = sum(1 for _, q in quantizers(model) if q.enabled)
    report.seconds = time.perf_counter() - t0
    return report


@torch.no_grad()
def find_ln_pairs(model: nn.Module, forward: Callable[[], Any]) -> tuple[list[tuple[str, list[str]]],
                                                                         dict[str, str]]:
    """Which norms could be folded into their channel-wise Linears (no calibration, no change).

    Runs ``forward()`` once with quantization switched off and the consumer tracking of
    :func:`calibrate`. Returns ``([(norm name, [linear names]), ...], {norm name: reason skipped})``.
    """
    from .modules import quant_disabled  # local: keep the import list of the module short

    tracker = _ConsumerTracker(model)
    with quant_disabled(model), tracker:
        tracker.note_returned(forward())
    found, skipped = [], {}
    for name, _ in tracker.norms:
        lins = tracker.cw_linears.get(name)
        if not lins:
            continue
        if tracker.others.get(name):
            skipped[name] = _describe_others(tracker.others[name])
        elif any(tracker.linear_sources.get(ln) != {name} for ln in lins):
            skipped[name] = "one of its Linears also reads other tensors"
        else:
            found.append((name, list(lins)))
    return found, skipped
