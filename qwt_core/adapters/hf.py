"""RepQ-ViT / QwT adapter for Hugging Face ``transformers`` text models.

Two recipes, picked from the model's structure (``kind="auto"``) or by name:

* ``"encoder"`` — BERT / RoBERTa / DistilBERT / MiniLM family (post-LayerNorm). Every
  ``nn.Linear`` inside the encoder layers is quantized at ``w_bits``/``a_bits`` (weights per
  output channel, inputs per tensor). No LayerNorm reparameterization: in a post-LN layer the
  LayerNorm output is also the residual stream, so folding a scale into it would change the model.
* ``"decoder"`` — LLaMA / Qwen2 / Mistral family (pre-RMSNorm decoder layers with
  ``input_layernorm → self_attn.{q,k,v}_proj`` and ``post_attention_layernorm → mlp.{gate,up}_proj``).
  q/k/v/o/gate/up/down are quantized; the q/k/v and gate/up inputs are first calibrated per channel
  and then folded into the RMSNorm **scale only** (RMSNorm has no bias, so RepQ-ViT's shift β has
  nowhere to go): ``γ_c ← γ_c / r_c``, ``W[:, c] ← W[:, c]·r_c`` with ``r_c = s_c / mean(s)``. This is
  exact in floating point (the norm's output is linear in γ and the Linears see ``W·r · x/r``); the
  activations are then quantized per tensor with one zero point re-fitted on the rescaled
  activations (= per-channel steps ``∝ s_c`` with a shared zero point; the per-channel zero points
  ``z_c`` cannot be folded without a bias). Embeddings and ``lm_head`` stay in floating point.

In both, attention products (``q·kᵀ``, ``softmax·v``) run in the model's own attention kernel, in
floating point. QwT blocks are the transformer layers; :meth:`QuantizedModel.first_block_input`
runs the model up to its first layer on a tokenizer batch (a dict with ``input_ids`` and
``attention_mask``) and returns a :class:`qwt_core.BlockInput` whose ``row_mask`` is the attention
mask (padding excluded from the least squares) and whose ``block_kwargs`` are the keyword arguments
the model itself passes to its layers (extended attention mask, rotary ``position_embeddings``,
``position_ids``...), captured with a forward pre-hook so that any transformers version works.

Compensated layers stay inside the HF model, whose ``forward`` keeps working: a layer that returns
a tuple (older transformers) gets the compensation added to ``output[0]``.
"""
from __future__ import annotations

import inspect
import json
from typing import Any, Iterable, Literal, Optional, Sequence

import torch
from torch import nn

from ..compensation import CompensatedBlock
from ..quantize import LayerBits, quantize_layers
from ..quantizers import validate_bits
from .base import QuantizedModel

Kind = Literal["auto", "encoder", "decoder"]

_LAYER_PATHS = ("layers", "encoder.layer", "transformer.layer", "encoder.layers", "decoder.layers",
                "layer", "h")
_DECODER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_DECODER_CHANNEL_WISE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                         "mlp.gate_proj", "mlp.up_proj")


class _StopForward(Exception):
    """Raised by the capture hook once the first layer's inputs are known."""


class HFCompensatedLayer(CompensatedBlock):
    """:class:`CompensatedBlock` for HF layers: adds the compensation to ``output[0]`` when the
    layer returns a tuple (transformers < 4.54 style), to the output itself otherwise."""

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out = self.block(x, *args, **kwargs)
        if isinstance(out, tuple):
            return (out[0] + self.compensation(x).to(out[0].dtype),) + tuple(out[1:])
        return out + self.compensation(x).to(out.dtype)


def _get(module: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Qualified name and ``nn.ModuleList`` of the transformer layers of a HF model.

    Looks for ``layers`` / ``encoder.layer`` / ``transformer.layer`` / ... under the model and its
    ``base_model`` and takes the one whose length is ``config.num_hidden_layers`` (or the longest).
    """
    n_cfg = None
    config = getattr(model, "config", None)
    for key in ("num_hidden_layers", "n_layers", "num_layers", "n_layer"):
        if config is not None and isinstance(getattr(config, key, None), int):
            n_cfg = getattr(config, key)
            break
    names = {id(m): n for n, m in model.named_modules()}
    roots = [model]
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model:
        roots.insert(0, base)
    found: list[tuple[str, nn.ModuleList]] = []
    for root in roots:
        for path in _LAYER_PATHS:
            m = _get(root, path)
            if isinstance(m, nn.ModuleList) and len(m) > 0 and id(m) in names:
                found.append((names[id(m)], m))
    if not found:
        raise TypeError(f"{type(model).__name__}: no transformer layer list found (looked for "
                        f"{', '.join(_LAYER_PATHS)}); this model is not supported by the HF adapter")
    exact = [f for f in found if n_cfg is not None and len(f[1]) == n_cfg]
    return (exact or sorted(found, key=lambda f: -len(f[1])))[0]


def _is_decoder_layer(layer: nn.Module) -> bool:
    return all(isinstance(_get(layer, p), nn.Linear) for p in _DECODER_LINEARS) and \
        _get(layer, "input_layernorm") is not None and _get(layer, "post_attention_layernorm") is not None


def detect_kind(model: nn.Module) -> Literal["encoder", "decoder"]:
    """``"decoder"`` for LLaMA-style pre-RMSNorm decoder layers, ``"encoder"`` for the BERT family."""
    _, layers = find_layers(model)
    if all(_is_decoder_layer(layer) for layer in layers):
        return "decoder"
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "is_decoder", False):
        raise TypeError(f"{type(model).__name__} is a decoder whose layers are not LLaMA-style "
                        "(input_layernorm, self_attn.q/k/v/o_proj, mlp.gate/up/down_proj)")
    return "encoder"


def _layer_rule(layer_prefixes: Sequence[str], kind: str, w_bits: int, a_bits: int):
    def rule(name: str, module: nn.Module) -> Optional[LayerBits]:
        if not isinstance(module, nn.Linear):
            return None
        prefix = next((p for p in layer_prefixes if name.startswith(p + ".")), None)
        if prefix is None:
            return None
        local = name[len(prefix) + 1:]
        if kind == "decoder":
            if local not in _DECODER_LINEARS:
                return None
            return LayerBits(w_bits, a_bits, act_channel_wise=local in _DECODER_CHANNEL_WISE)
        return LayerBits(w_bits, a_bits)
    return rule


def _bind_layer_inputs(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """A layer call's ``(args, kwargs)`` → ``(hidden_states, keyword arguments without None)``."""
    sig = inspect.signature(layer.forward)
    bound = sig.bind_partial(*args, **kwargs)
    params = list(sig.parameters.values())
    first = params[0].name
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind == inspect.Parameter.VAR_KEYWORD:
            out.update({k: v for k, v in value.items() if v is not None})
        elif kind == inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"{type(layer).__name__} got extra positional inputs; not supported")
        elif name != first and value is not None:
            out[name] = value
    x = bound.arguments.get(first)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{type(layer).__name__}: the first input is not the hidden states tensor")
    return x, out


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _check_batch(batch: Any) -> None:
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise TypeError("HF batches must be dicts with 'input_ids' (and 'attention_mask'), e.g. "
                        "tokenizer(texts, padding=True, return_tensors='pt')")


def quantize_hf_model(model: nn.Module, w_bits: int, a_bits: int, kind: Kind = "auto",
                      source: Optional[str] = None) -> QuantizedModel:
    """Quantize a Hugging Face transformers model in place (see the module docstring).

    Args:
        model: a ``transformers.PreTrainedModel`` (base model or one with a head, e.g. ``BertModel``,
            ``LlamaForCausalLM``), in float32.
        w_bits, a_bits: weight / activation bits (2..8).
        kind: ``"auto"``, ``"encoder"`` (post-LN BERT family) or ``"decoder"`` (LLaMA family).
        source: where the model came from (local folder or hub name), kept in ``meta``.
    Returns:
        A :class:`QuantizedModel`; batches are tokenizer dicts (``input_ids``, ``attention_mask``,
        optional ``token_type_ids``). ``meta`` holds what :func:`build_hf_from_meta` needs.
    """
    validate_bits(w_bits, "w_bits")
    validate_bits(a_bits, "a_bits")
    if kind not in ("auto", "encoder", "decoder"):
        raise ValueError(f"kind={kind!r}: use 'auto', 'encoder' or 'decoder'")
    layers_name, layers = find_layers(model)
    found = detect_kind(model)
    if kind == "auto":
        kind = found
    elif kind == "decoder" and found != "decoder":
        raise TypeError(f"{type(model).__name__} has no LLaMA-style decoder layers (input_layernorm, "
                        "self_attn.q/k/v/o_proj, mlp.gate/up/down_proj); use kind='encoder'")
    prefixes = [f"{layers_name}.{i}" for i in range(len(layers))]
    quantize_layers(model, _layer_rule(prefixes, kind, w_bits, a_bits))

    ln_pairs: list[tuple[nn.Module, nn.Module]] = []
    if kind == "decoder":
        for layer in layers:
            ln_pairs += [(layer.input_layernorm, layer.self_attn.q_proj),
                         (layer.input_layernorm, layer.self_attn.k_proj),
                         (layer.input_layernorm, layer.self_attn.v_proj),
                         (layer.post_attention_layernorm, layer.mlp.gate_proj),
                         (layer.post_attention_layernorm, layer.mlp.up_proj)]
    layer_objs = list(layers)
    config = getattr(model, "config", None)
    layer_types = getattr(config, "layer_types", None) or []
    per_layer = len(set(layer_types)) > 1  # e.g. sliding-window and full attention mixed

    @torch.no_grad()
    def capture_layer_inputs(batch: dict[str, Any]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """Run ``model`` on ``batch`` up to the first (or, with mixed layer types, last) layer and
        return the hidden states entering layer 0 and the kwargs of every captured layer call."""
        _check_batch(batch)
        captured: list[tuple[torch.Tensor, dict]] = []
        stop_at = len(layer_objs) - 1 if per_layer else 0

        def hook(idx: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.append(_bind_layer_inputs(module, args, kwargs))
            if idx == stop_at:
                raise _StopForward

        handles = [layer_objs[i].register_forward_pre_hook(
            lambda m, a, k, _i=i: hook(_i, m, a, k), with_kwargs=True) for i in range(stop_at + 1)]
        call = _to_device(batch, _model_device(model))
        if kind == "decoder":
            call.setdefault("use_cache", False)
        try:
            model(**call)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        if len(captured) != stop_at + 1:
            raise RuntimeError(f"the forward of {type(model).__name__} did not reach its layers")
        return captured[0][0], [kw for _, kw in captured]

    def first_block_input(batch: dict[str, Any]):
        """tokenizer batch → ``BlockInput(x (B, L, C), row_mask (B, L), block_kwargs)``."""
        from ..qwt import BlockInput  # the engine's dataclass

        x, kws = capture_layer_inputs(batch)
        mask = batch.get("attention_mask")
        row_mask = (mask.to(x.device) > 0) if isinstance(mask, torch.Tensor) else None
        if row_mask is not None and tuple(row_mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"attention_mask {tuple(row_mask.shape)} does not match the hidden states "
                             f"{tuple(x.shape[:-1])}")
        block_kwargs = {"_hf_layer_kwargs": tuple(kws)} if per_layer else kws[0]
        return BlockInput(x=x, row_mask=row_mask, block_kwargs=block_kwargs)

    def run_block(i: int, block: nn.Module, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Layer ``i`` on ``x`` with the captured kwargs; a tuple output gives its first element."""
        if "_hf_layer_kwargs" in kwargs:
            kwargs = kwargs["_hf_layer_kwargs"][i]
        out = block(x, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    slots = [(layers, i) for i in range(len(layers))]

    def upgrade_compensated(module: nn.Module, args: Any) -> None:
        for parent, i in slots:
            if type(parent[i]) is CompensatedBlock:
                parent[i].__class__ = HFCompensatedLayer  # same state, tuple-aware forward

    base = getattr(model, "base_model", None)
    for owner in {id(m): m for m in (model, base) if isinstance(m, nn.Module)}.values():
        owner.register_forward_pre_hook(upgrade_compensated)

    config_json = json.loads(config.to_json_string()) if config is not None else None
    meta = {"family": "hf", "kind": kind, "w_bits": w_bits, "a_bits": a_bits,
            "model_class": type(model).__name__,
            "config_class": type(config).__name__ if config is not None else None,
            "config": config_json, "source": source}
    try:
        import transformers
        meta["transformers_version"] = transformers.__version__
    except ImportError:  # pragma: no cover - the model itself comes from transformers
        pass
    qm = QuantizedModel(model=model, ln_pairs=ln_pairs, block_names=prefixes,
                        first_block_input=first_block_input, run_block=run_block, form="token",
                        meta=meta, calibrator=_calibrator)
    return qm


def _calibrator(qm: QuantizedModel, batch: dict[str, Any], ln_pairs: Any = "adapter", row_mask: Any = None,
                integer_zero_point: bool = False):
    """What :func:`qwt_core.calibrate` runs for this adapter: :func:`calibrate_hf` (padding masked)."""
    if row_mask is not None:
        raise ValueError("the Hugging Face adapter masks padding from the batch's attention_mask: "
                         "leave row_mask None")
    return calibrate_hf(qm, batch, ln_pairs=ln_pairs, integer_zero_point=integer_zero_point)


def build_hf_from_meta(meta: dict[str, Any]) -> QuantizedModel:
    """Rebuild the quantized (uncalibrated) structure from ``meta`` (for :func:`qwt_core.load_quantized`).

    Only the saved config is needed (no weights folder): the state dict overwrites every weight.
    """
    if meta.get("family") != "hf":
        raise ValueError(f"this file holds a {meta.get('family')!r} model, not a Hugging Face one")
    import transformers

    cfg_cls = getattr(transformers, meta.get("config_class") or "", None)
    model_cls = getattr(transformers, meta.get("model_class") or "", None)
    if cfg_cls is None or model_cls is None:
        raise ValueError(f"transformers {transformers.__version__} has no {meta.get('model_class')} / "
                         f"{meta.get('config_class')}; install the version that saved the model "
                         f"({meta.get('transformers_version')})")
    config = cfg_cls.from_dict(dict(meta["config"]))
    model = model_cls(config).float().eval()
    qm = quantize_hf_model(model, meta["w_bits"], meta["a_bits"], kind=meta["kind"],
                           source=meta.get("source"))
    return qm


# --------------------------------------------------------------------------- calibration / metrics
def calibrate_hf(qm: QuantizedModel, batch: dict[str, Any], ln_pairs: Any = "adapter", **kwargs: Any):
    """RepQ-ViT calibration of a HF model on one tokenizer batch, padding excluded.

    ``ln_pairs="adapter"`` uses ``qm.ln_pairs`` (decoder: RMSNorm scale folds; encoder: none);
    anything else goes to :func:`qwt_core.calibrate.calibrate`. Returns its ``CalibrationReport``.
    """
    from ..calibrate import calibrate

    _check_batch(batch)
    model = qm.model
    call = _to_device(batch, _model_device(model))
    if qm.meta.get("kind") == "decoder":
        call.setdefault("use_cache", False)
    mask = call.get("attention_mask")
    pairs = qm.ln_pairs if ln_pairs == "adapter" else ln_pairs
    return calibrate(model, lambda: model(**call), ln_pairs=pairs,
                     row_mask=(mask > 0) if isinstance(mask, torch.Tensor) else None, **kwargs)


@torch.no_grad()
def mean_pooled_embeddings(model: nn.Module, batches: Iterable[dict[str, Any]]) -> torch.Tensor:
    """Mean of the last hidden state over real tokens, per text: ``(N, C)`` float32 on CPU."""
    device = _model_device(model)
    outs = []
    for batch in batches:
        _check_batch(batch)
        call = _to_device(batch, device)
        out = model(**call)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        mask = call.get("attention_mask")
        mask = torch.ones(hidden.shape[:2], device=device) if mask is None else mask.to(hidden.dtype)
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        outs.append(pooled.float().cpu())
    return torch.cat(outs)


def embedding_cosine(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean cosine similarity between rows of ``reference`` and ``other`` (both ``(N, C)``)."""
    return float(torch.nn.functional.cosine_similarity(reference, other, dim=-1).mean())


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable[dict[str, Any]]) -> float:
    """Perplexity of a causal LM: ``exp(mean NLL)`` over every real next token of every batch."""
    device = _model_device(model)
    nll, count = 0.0, 0
    for batch in batches:
        _check_batch(batch)
        call = _to_device(batch, device)
        call.setdefault("use_cache", False)
        logits = model(**call).logits
        if logits is None:
            raise TypeError(f"{type(model).__name__} returns no logits: load it with "
                            "AutoModelForCausalLM to measure perplexity")
        ids = call["input_ids"]
        mask = call.get("attention_mask")
        valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask > 0
        target_ok = valid[:, 1:] & valid[:, :-1]
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        tok = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        nll -= float(tok[target_ok].sum())
        count += int(target_ok.sum())
    if count == 0:
        raise ValueError("perplexity: no next-token pairs (every text has fewer than 2 tokens)")
    return float(torch.exp(torch.tensor(nll / count)))
