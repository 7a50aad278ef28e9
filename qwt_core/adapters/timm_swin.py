"""RepQ-ViT adapter for timm Swin Transformer (v1)."""
from __future__ import annotations

import torch
from torch import nn

from ..attention import QuantWindowAttention
from ..quantize import quantize_layers
from .base import QuantizedModel, transformer_layer_rule


def quantize_timm_swin(model: nn.Module, w_bits: int, a_bits: int) -> QuantizedModel:
    """Quantize a timm ``SwinTransformer`` in place, RepQ-ViT style.

    Block Linears and PatchMerging reductions at ``w_bits``/``a_bits`` (qkv, fc1 and reduction inputs
    channel-wise, reparameterized into the preceding LayerNorm), window-attention matmuls at
    ``a_bits``, patch embedding and head at W8/A8. Blocks work on NHWC tokens ``(B, H, W, C)``; the
    patch merging at the start of stages 2-4 is the transition between blocks.
    """
    if not hasattr(model, "layers") or not hasattr(model, "patch_embed"):
        raise TypeError(f"{type(model).__name__} is not a timm SwinTransformer")
    block_names: list[str] = []
    stage_of_block: list[int] = []
    for s, stage in enumerate(model.layers):
        for j, blk in enumerate(stage.blocks):
            blk.attn = QuantWindowAttention(blk.attn, a_bits)
            block_names.append(f"layers.{s}.blocks.{j}")
            stage_of_block.append(s)
    quantize_layers(model, transformer_layer_rule(
        w_bits, a_bits, eight_bit=("patch_embed", "head"),
        channel_wise_suffixes=(".attn.qkv", ".mlp.fc1", ".downsample.reduction")))

    ln_pairs = []
    for stage in model.layers:
        if hasattr(stage.downsample, "reduction"):
            ln_pairs.append((stage.downsample.norm, stage.downsample.reduction))
        for blk in stage.blocks:
            ln_pairs += [(blk.norm1, blk.attn.qkv), (blk.norm2, blk.mlp.fc1)]

    def first_block_input(images: torch.Tensor) -> torch.Tensor:
        """images ``(B, 3, H, W)`` → NHWC tokens ``(B, H/4, W/4, C)`` entering stage 0's first block."""
        x = model.patch_embed(images)
        if getattr(model, "absolute_pos_embed", None) is not None:
            x = x + model.absolute_pos_embed
        x = getattr(model, "pos_drop", nn.Identity())(x)
        return model.layers[0].downsample(x)

    def transition(i: int, x: torch.Tensor) -> torch.Tensor:
        """Apply the next stage's patch merging when block ``i`` starts a new stage."""
        s = stage_of_block[i]
        if s != stage_of_block[i - 1]:
            x = model.layers[s].downsample(x)
        return x

    return QuantizedModel(model=model, ln_pairs=ln_pairs, block_names=block_names,
                          first_block_input=first_block_input, transition=transition, form="token",
                          meta={"family": "swin", "w_bits": w_bits, "a_bits": a_bits})
