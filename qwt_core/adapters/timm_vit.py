"""RepQ-ViT adapter for timm ViT / DeiT (incl. distilled DeiT)."""
from __future__ import annotations

import torch
from torch import nn

from ..attention import QuantViTAttention
from ..quantize import quantize_layers
from .base import QuantizedModel, transformer_layer_rule


def quantize_timm_vit(model: nn.Module, w_bits: int, a_bits: int) -> QuantizedModel:
    """Quantize a timm ``VisionTransformer`` in place, RepQ-ViT style.

    Every block Linear at ``w_bits``/``a_bits`` (qkv and fc1 inputs channel-wise, to be
    reparameterized into norm1/norm2), both attention matmuls at ``a_bits``, patch embedding and
    head(s) at W8/A8. LayerNorms, softmax, GELU and residual adds stay in fp32.
    """
    if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
        raise TypeError(f"{type(model).__name__} is not a timm VisionTransformer")
    for blk in model.blocks:
        blk.attn = QuantViTAttention(blk.attn, a_bits)
    heads = tuple(n for n in ("head", "head_dist") if isinstance(getattr(model, n, None), nn.Linear))
    quantize_layers(model, transformer_layer_rule(
        w_bits, a_bits, eight_bit=("patch_embed",) + heads,
        channel_wise_suffixes=(".attn.qkv", ".mlp.fc1")))
    ln_pairs = [(blk.norm1, blk.attn.qkv) for blk in model.blocks] + \
               [(blk.norm2, blk.mlp.fc1) for blk in model.blocks]

    def first_block_input(images: torch.Tensor) -> torch.Tensor:
        """images ``(B, 3, H, W)`` → tokens ``(B, N, C)`` entering ``blocks[0]``."""
        x = model.patch_embed(images)
        x = model._pos_embed(x)
        x = model.patch_drop(x)
        return model.norm_pre(x)

    return QuantizedModel(
        model=model, ln_pairs=ln_pairs,
        block_names=[f"blocks.{i}" for i in range(len(model.blocks))],
        first_block_input=first_block_input, form="token",
        meta={"family": "vit", "w_bits": w_bits, "a_bits": a_bits})
