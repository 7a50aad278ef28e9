"""RepQ-ViT / QwT adapter for open_clip CLIP models (visual ``VisionTransformer``, the text tower and
the zero-shot classifier).

open_clip's ``ResidualAttentionBlock`` uses ``nn.MultiheadAttention``, whose input projection is a raw
``in_proj_weight`` parameter that no Linear-swapping rule can reach. :class:`OpenCLIPSelfAttention`
is an explicit drop-in for it (same call signature as the block uses) that exposes the projection as
``in_proj`` (an ``nn.Linear`` sharing the original parameters) and, optionally, quantizes the two
attention products (``q·kᵀ`` uniform/uniform, ``attn·v`` log-√2/uniform). The reference QwT CLIP runs
leave the attention products in fp32, so that is the default.

Per tower the adapter returns a :class:`~qwt_core.adapters.base.QuantizedModel`:

* visual: ``model.visual`` with ``conv1`` and every block Linear quantized; LN pairs
  ``ln_1 → attn.in_proj`` and ``ln_2 → mlp.c_fc``; blocks ``transformer.resblocks.{i}``; the first block
  input is conv1 → class token → positional embedding → (patch dropout) → ``ln_pre``, in the layout
  the blocks expect (recent open_clip is batch first, ``(B, L, D)``; older releases ``(L, B, D)``).
  ``conv1`` reads its input at 8 bits with weights at W (the published CLIP recipe). With a
  zero-shot ``head`` the model is :class:`OpenCLIPZeroShot` (images → logits), so the RepQ-ViT
  calibration forward also initialises the classifier's quantizers.
* text: an :class:`OpenCLIPTextTower` view (``forward(tokens) = clip.encode_text(tokens)``) whose
  ``transformer`` is the CLIP text transformer; the first block input is token + positional
  embedding; blocks run with the causal attention mask.
* zero-shot classifier: :class:`ZeroShotHead`, ``logits = normalize(features) · classifierᵀ`` as a
  Linear; :func:`quantize_zero_shot_head` makes it a QuantLinear (input per tensor at A bits, weight =
  the normalised class embeddings per output channel = per class at W bits).

``visual.proj``, ``text_projection`` and the token embedding are parameters / an Embedding and stay
fp32, as in the reference.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import QuantLinear, QuantMatMul, quant_layers
from ..quantize import LayerBits, quantize_layers
from .base import QuantizedModel

PATCH_EMBED_INPUT_BITS = 8  # published CLIP recipe: conv1 reads its input at 8 bits (forced)


class OpenCLIPSelfAttention(nn.Module):
    """Drop-in for the self-attention ``nn.MultiheadAttention`` of an open_clip residual block.

    Called as ``attn(x, x, x, need_weights=False, attn_mask=mask)`` and returns ``(out, None)`` like
    the original. ``x`` is ``(B, L, D)`` when ``batch_first`` else ``(L, B, D)``; ``attn_mask`` is
    ``(L, L)`` or ``(B·H, L, L)``, additive float or boolean (True = not allowed, as in
    ``nn.MultiheadAttention``); ``key_padding_mask`` ``(B, L)`` boolean (True = ignore); ``is_causal``
    without a mask masks future positions.

    ``in_proj`` (D → 3D) and ``out_proj`` (D → D) are plain Linears sharing the original parameters,
    so ``quantize_layers`` can swap them. With ``quant_matmul`` the products use
    :class:`~qwt_core.modules.QuantMatMul` (``matmul1`` uniform for ``q·scale @ kᵀ``, ``matmul2``
    log-√2 for ``attn @ v``); when they are off (or switched off) the fused SDPA kernel is used.
    """

    def __init__(self, mha: nn.MultiheadAttention, a_bits: int = 8, quant_matmul: bool = False) -> None:
        super().__init__()
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"expected nn.MultiheadAttention, got {type(mha).__name__}")
        if (not mha._qkv_same_embed_dim or mha.in_proj_weight is None or mha.bias_k is not None
                or mha.add_zero_attn):
            raise ValueError("only plain self-attention nn.MultiheadAttention (packed in_proj, no bias_k/"
                             "bias_v, no add_zero_attn) can be swapped")
        self.embed_dim = mha.embed_dim
        self.num_heads = mha.num_heads
        self.head_dim = mha.embed_dim // mha.num_heads
        self.scale = self.head_dim ** -0.5
        self.batch_first = mha.batch_first
        self.dropout = mha.dropout
        self.in_proj = nn.Linear(self.embed_dim, 3 * self.embed_dim, bias=mha.in_proj_bias is not None,
                                 device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        self.in_proj.weight = mha.in_proj_weight
        if mha.in_proj_bias is not None:
            self.in_proj.bias = mha.in_proj_bias
        out = nn.Linear(self.embed_dim, self.embed_dim, bias=mha.out_proj.bias is not None,
                        device=mha.out_proj.weight.device, dtype=mha.out_proj.weight.dtype)
        out.weight = mha.out_proj.weight
        out.bias = mha.out_proj.bias
        self.out_proj = out
        self.quant_matmul = quant_matmul
        if quant_matmul:
            self.matmul1 = QuantMatMul(a_bits, "uniform")  # q·scale @ kᵀ
            self.matmul2 = QuantMatMul(a_bits, "log2")     # attn @ v

    def _additive_mask(self, attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
                       b: int, n: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """Masks → one additive float mask broadcastable to ``(B, H, L, L)``, or None."""
        mask = None
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros_like(attn_mask, dtype=dtype).masked_fill_(attn_mask, float("-inf"))
            mask = attn_mask.to(dtype)
            if mask.dim() == 3:
                mask = mask.reshape(b, self.num_heads, n, n)
        if key_padding_mask is not None:
            kpm = key_padding_mask.to(torch.bool)
            pad = torch.zeros(b, 1, 1, n, dtype=dtype, device=kpm.device).masked_fill_(
                kpm[:, None, None, :], float("-inf"))
            mask = pad if mask is None else mask + pad
        return mask

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None,
                value: Optional[torch.Tensor] = None, need_weights: bool = False,
                attn_mask: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                **_: Any) -> tuple[torch.Tensor, None]:
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise NotImplementedError("OpenCLIPSelfAttention supports self-attention only (key is query)")
        if need_weights:
            raise NotImplementedError("OpenCLIPSelfAttention does not return attention weights")
        x = query if self.batch_first else query.transpose(0, 1)
        b, n, d = x.shape
        qkv = self.in_proj(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, L, hd) each
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
        mask = self._additive_mask(attn_mask, key_padding_mask, b, n, q.dtype)
        p_drop = self.dropout if self.training else 0.0
        if self.quant_matmul and (self.matmul1.use_act_quant or self.matmul2.use_act_quant):
            attn = self.matmul1(q * self.scale, k.transpose(-2, -1))
            if mask is not None:
                attn = attn + mask
            attn = F.dropout(attn.softmax(dim=-1), p_drop, self.training)
            out = self.matmul2(attn, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, d))
        return (out if self.batch_first else out.transpose(0, 1)), None


def swap_attention(transformer: nn.Module, a_bits: int = 8, quant_matmul: bool = False) -> int:
    """Replace the ``nn.MultiheadAttention`` of every block in ``transformer.resblocks``.

    Returns the number of blocks changed. Raises ``TypeError`` for block types this adapter does not
    know (open_clip's ``CustomResidualAttentionBlock``, cross-attention blocks).
    """
    count = 0
    for i, blk in enumerate(transformer.resblocks):
        if isinstance(blk.attn, OpenCLIPSelfAttention):
            continue
        if not isinstance(getattr(blk, "attn", None), nn.MultiheadAttention) or hasattr(blk, "ln_1_kv"):
            raise TypeError(f"resblocks.{i} ({type(blk).__name__}) is not a self-attention "
                            "ResidualAttentionBlock with nn.MultiheadAttention; not supported")
        blk.attn = OpenCLIPSelfAttention(blk.attn, a_bits, quant_matmul)
        count += 1
    return count


def _block_rule(w_bits: int, a_bits: int, extra: dict[str, LayerBits]):
    """Quantize every Linear inside ``transformer.resblocks`` (in_proj / c_fc inputs channel-wise,
    reparameterized into ln_1 / ln_2 later) plus the layers named in ``extra``."""

    def rule(name: str, module: nn.Module) -> Optional[LayerBits]:
        if name in extra:
            return extra[name]
        if name.startswith("transformer.resblocks.") and isinstance(module, nn.Linear):
            channel_wise = name.endswith(".attn.in_proj") or name.endswith(".mlp.c_fc")
            return LayerBits(w_bits, a_bits, act_channel_wise=channel_wise)
        return None

    return rule


def _ln_pairs(transformer: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    return [(blk.ln_1, blk.attn.in_proj) for blk in transformer.resblocks] + \
           [(blk.ln_2, blk.mlp.c_fc) for blk in transformer.resblocks]


def _is_batch_first(transformer: nn.Module) -> bool:
    if hasattr(transformer, "batch_first"):
        return bool(transformer.batch_first)
    return bool(transformer.resblocks[0].attn.batch_first)


class ZeroShotHead(nn.Module):
    """The zero-shot classifier as a Linear: ``logits = normalize(features) · classifierᵀ``.

    ``class_embeddings`` ``(E, C)`` are the normalised class embeddings (one column per class, as
    ``build_zero_shot_classifier`` returns them). ``forward(features (B, E)) → (B, C)``: the features
    are L2-normalised, then ``fc`` (``nn.Linear(E, C, bias=False)``, weight ``(C, E)``) is applied.
    The logit scale is left out: it does not change the argmax.
    """

    def __init__(self, class_embeddings: torch.Tensor) -> None:
        super().__init__()
        if class_embeddings.dim() != 2:
            raise ValueError(f"class_embeddings must be (E, C), got shape {tuple(class_embeddings.shape)}")
        e, c = class_embeddings.shape
        self.fc = nn.Linear(e, c, bias=False, device=class_embeddings.device,
                            dtype=class_embeddings.dtype)
        with torch.no_grad():
            self.fc.weight.copy_(class_embeddings.T)

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    @property
    def quantized(self) -> bool:
        return isinstance(self.fc, QuantLinear)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(F.normalize(features, dim=-1))


def quantize_zero_shot_head(head: ZeroShotHead, w_bits: int, a_bits: int) -> ZeroShotHead:
    """Make ``head.fc`` a QuantLinear in place: input (the normalised image features) per tensor at
    ``a_bits``, weight (the class embeddings) per output channel (= per class) at ``w_bits``.
    Its quantizers initialise on the first batch they see (the RepQ-ViT calibration batch when the
    head is passed to :func:`quantize_open_clip_visual`). Returns ``head``."""
    quantize_layers(head, lambda name, m: LayerBits(w_bits, a_bits) if name == "fc" else None)
    return head


class OpenCLIPZeroShot(nn.Module):
    """``visual`` followed by a :class:`ZeroShotHead`: images ``(B, 3, H, W)`` → logits ``(B, C)``.

    A view for calibration: the children of ``visual`` (``conv1``, ``transformer``, ``ln_pre`` …) are
    registered under their own names (shared, not copied) next to ``head``, so block names are those
    of the visual tower (``transformer.resblocks.{i}``) and every quantizer of the tower and the head
    is below this module. ``visual`` itself is referenced, not registered.
    """

    def __init__(self, visual: nn.Module, head: ZeroShotHead) -> None:
        super().__init__()
        for name, child in visual.named_children():
            self.add_module(name, child)
        self.head = head
        object.__setattr__(self, "_visual", visual)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self._visual(images))


def quantize_open_clip_visual(visual: nn.Module, w_bits: int, a_bits: int, quant_attn_matmul: bool = False,
                              patch_embed_bits: Optional[tuple[int, int]] = None,
                              head: Optional[ZeroShotHead] = None) -> QuantizedModel:
    """Quantize an open_clip ``VisionTransformer`` (``clip.visual``) in place, RepQ-ViT style.

    Every block Linear (in_proj, out_proj, c_fc, c_proj) at ``w_bits``/``a_bits`` with in_proj / c_fc
    inputs channel-wise (to be reparameterized into ln_1 / ln_2); ``conv1`` at ``patch_embed_bits``
    ``(w, a)``, default ``(w_bits, 8)``: weights at W, input at 8 bits, as the published CLIP code
    does; attention products at ``a_bits`` only with ``quant_attn_matmul``.

    Without ``head``, ``QuantizedModel.model`` is ``visual``: images ``(B, 3, H, W)`` → image
    embedding ``(B, E)``. With a (quantized) :class:`ZeroShotHead` it is
    ``OpenCLIPZeroShot(visual, head)``: images → logits ``(B, C)``; ``qwt_core.calibrate`` then runs the
    RepQ-ViT batch through the head too, which initialises the classifier's quantizers in the same
    forward (as in the published image-only flow). Block names are ``transformer.resblocks.{i}``
    either way.
    """
    needed = ("conv1", "class_embedding", "positional_embedding", "transformer", "ln_pre")
    if not all(hasattr(visual, a) for a in needed):
        raise TypeError(f"{type(visual).__name__} is not an open_clip VisionTransformer "
                        "(timm or ModifiedResNet towers are not supported by this adapter)")
    pw, pa = patch_embed_bits if patch_embed_bits is not None else (w_bits, PATCH_EMBED_INPUT_BITS)
    patch_bits = LayerBits(pw, pa)  # validates the bits before anything is modified
    transformer = visual.transformer
    swap_attention(transformer, a_bits, quant_attn_matmul)
    quantize_layers(visual, _block_rule(w_bits, a_bits, {"conv1": patch_bits}))
    batch_first = _is_batch_first(transformer)

    def first_block_input(images: torch.Tensor) -> torch.Tensor:
        """images ``(B, 3, H, W)`` → tokens ``(B, 1+N, D)`` (``(1+N, B, D)`` if not batch first)."""
        x = visual.conv1(images.to(visual.conv1.weight.dtype))       # (B, D, gh, gw)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)   # (B, N, D)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = getattr(visual, "patch_dropout", nn.Identity())(x)
        x = visual.ln_pre(x)
        return x if batch_first else x.transpose(0, 1)

    n = len(transformer.resblocks)
    model: nn.Module = visual if head is None else OpenCLIPZeroShot(visual, head)
    meta: dict[str, Any] = {"family": "open_clip_visual", "w_bits": w_bits, "a_bits": a_bits,
                            "quant_attn_matmul": quant_attn_matmul, "patch_embed_bits": [pw, pa]}
    if head is not None:
        meta["classifier_bits"] = ([head.fc.w_bits, head.fc.a_bits] if head.quantized else None)
    return QuantizedModel(
        model=model, ln_pairs=_ln_pairs(transformer),
        block_names=[f"transformer.resblocks.{i}" for i in range(n)],
        first_block_input=first_block_input, form="token", meta=meta)


def bit_table(module: nn.Module, prefix: str = "") -> list[dict[str, Any]]:
    """The bits every fake-quant layer below ``module`` actually uses, read from its quantizers.

    One row per QuantLinear / QuantConv2d: ``{"layer", "type", "w_bits", "a_bits", "input"}`` where
    ``input`` is ``"per-tensor"`` or ``"per-channel"`` (the latter only before reparameterization);
    one row per QuantMatMul of a swapped attention: ``{"layer", "type": "MatMul", "w_bits": None,
    "a_bits": [bits of operand a, bits of operand b]}``. Layer names get ``prefix``.
    """
    rows: list[dict[str, Any]] = []
    for name, layer in quant_layers(module):
        full = prefix + name
        if isinstance(layer, QuantMatMul):
            rows.append({"layer": full, "type": "MatMul", "w_bits": None,
                         "a_bits": [layer.quantizer_a.n_bits, layer.quantizer_b.n_bits],
                         "enabled": bool(layer.use_act_quant)})
            continue
        iq = layer.input_quantizer
        rows.append({"layer": full, "type": "Linear" if isinstance(layer, nn.Linear) else "Conv2d",
                     "w_bits": layer.weight_quantizer.n_bits, "a_bits": iq.n_bits,
                     "input": "per-channel" if getattr(iq, "channel_wise", False) else "per-tensor"})
    return rows


class OpenCLIPTextTower(nn.Module):
    """The text tower of an open_clip ``CLIP`` as one module: ``forward(tokens)`` = ``encode_text``.

    tokens ``(B, L)`` int64 → text embedding ``(B, E)``. Only ``transformer`` is registered as a
    submodule (so quantization rules and block names see the text transformer alone); the CLIP
    model is referenced, not owned. Works for ``CLIP`` (text parts on the model) and
    ``CustomTextCLIP`` (``clip.text`` is a ``TextTransformer``).
    """

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        source = clip.text if hasattr(clip, "text") else clip
        for a in ("token_embedding", "positional_embedding", "transformer"):
            if not hasattr(source, a):
                raise TypeError(f"{type(clip).__name__} has no open_clip text transformer (missing {a}); "
                                "HF text towers are not supported by this adapter")
        if getattr(source, "cls_emb", None) is not None or getattr(source, "use_pad_mask", False):
            raise NotImplementedError("text towers with a class token or padding mask need a per-batch "
                                      "attention mask, which this adapter does not support")
        self.transformer = source.transformer
        object.__setattr__(self, "_clip", clip)
        object.__setattr__(self, "_source", source)

    @property
    def attn_mask(self) -> Optional[torch.Tensor]:
        """The causal mask ``(L, L)`` (additive, -inf above the diagonal) or None."""
        return getattr(self._source, "attn_mask", None)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens ``(B, L)`` → token + positional embedding ``(B, L, D)``."""
        src = self._source
        x = src.token_embedding(tokens).to(self.transformer.get_cast_dtype())
        return x + src.positional_embedding[: x.shape[1]].to(x.dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._clip.encode_text(tokens)


def quantize_open_clip_text(clip: nn.Module, w_bits: int, a_bits: int,
                            quant_attn_matmul: bool = False) -> QuantizedModel:
    """Quantize the text transformer of an open_clip CLIP model in place, RepQ-ViT style.

    Every block Linear at ``w_bits``/``a_bits`` (in_proj / c_fc inputs channel-wise, reparameterized
    into ln_1 / ln_2); attention products at ``a_bits`` only with ``quant_attn_matmul``.
    ``QuantizedModel.model`` is an :class:`OpenCLIPTextTower`: calling it on tokens ``(B, L)`` gives the
    text embedding ``(B, E)``; QwT batches are token tensors ``(B, L)``.
    """
    tower = OpenCLIPTextTower(clip)
    transformer = tower.transformer
    swap_attention(transformer, a_bits, quant_attn_matmul)
    quantize_layers(tower, _block_rule(w_bits, a_bits, {}))
    batch_first = _is_batch_first(transformer)

    def first_block_input(tokens: torch.Tensor) -> torch.Tensor:
        """tokens ``(B, L)`` → embeddings ``(B, L, D)`` (``(L, B, D)`` if not batch first)."""
        x = tower.embed(tokens)
        return x if batch_first else x.transpose(0, 1)

    def run_block(i: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Block ``i`` on ``x`` with the causal mask (as ``clip.encode_text`` calls it)."""
        mask = tower.attn_mask
        if mask is not None:
            n = x.shape[1] if batch_first else x.shape[0]
            mask = mask[:n, :n].to(x.dtype)
        return block(x, attn_mask=mask)

    n = len(transformer.resblocks)
    return QuantizedModel(
        model=tower, ln_pairs=_ln_pairs(transformer),
        block_names=[f"transformer.resblocks.{i}" for i in range(n)],
        first_block_input=first_block_input, run_block=run_block, form="token",
        meta={"family": "open_clip_text", "w_bits": w_bits, "a_bits": a_bits,
              "quant_attn_matmul": quant_attn_matmul})
