"""The evaluated CLIP: the open_clip model plus its zero-shot classifier, and the table of its bits.

:class:`ZeroShotCLIP` is what ``--save_quantized`` writes and ``--load_quantized`` rebuilds: the whole
open_clip model (quantized / compensated towers in place, fp32 parts as they are) and the
:class:`~qwt_core.adapters.open_clip.ZeroShotHead` (class embeddings, quantized or fp32).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from qwt_core.adapters.open_clip import ZeroShotHead, bit_table


class ZeroShotCLIP(nn.Module):
    """``forward(images (B, 3, H, W)) → logits (B, C)`` = ``head(clip.encode_image(images))``."""

    def __init__(self, clip: nn.Module, head: ZeroShotHead) -> None:
        super().__init__()
        self.clip = clip
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.clip.encode_image(images))


def clip_bit_table(clip: nn.Module, head: Optional[ZeroShotHead]) -> list[dict[str, Any]]:
    """Input and weight bits of every quantized layer, read from the model's quantizers.

    Rows (see :func:`qwt_core.adapters.open_clip.bit_table`) named ``visual.conv1``,
    ``visual.transformer.resblocks.{i}.attn.in_proj`` …, ``text.transformer.resblocks.{i}…`` and
    ``classifier``; the classifier row has ``w_bits = a_bits = None`` and ``input = "fp32"`` when it is
    not quantized. fp32 towers have no rows.
    """
    rows = bit_table(clip.visual, "visual.")
    text = clip.text if hasattr(clip, "text") else clip
    transformer = getattr(text, "transformer", None)
    if transformer is not None:
        rows += bit_table(transformer, "text.transformer.")
    if head is not None:
        if head.quantized:
            rows += [dict(r, layer="classifier") for r in bit_table(head) if r["layer"] == "fc"]
        else:
            rows.append({"layer": "classifier", "type": "Linear", "w_bits": None, "a_bits": None,
                         "input": "fp32"})
    return rows


def recipe(choice: str, w_bits: int, a_bits: int, patch_embed_bits: tuple[int, int],
           classifier_quantized: bool, quant_attn_matmul: bool) -> dict[str, Any]:
    """The bit recipe of a run in words and numbers (recorded in the JSON next to the bit table)."""
    bits = {"w_bits": w_bits, "a_bits": a_bits}
    if choice == "fp32_eval":
        return {"visual_patch_embed": "fp32", "visual_blocks": "fp32", "text_blocks": "fp32",
                "classifier": "fp32", "attention_matmuls": "fp32"}
    published_classifier = choice == "image_only"
    return {
        "visual_patch_embed": {"w_bits": patch_embed_bits[0], "a_bits": patch_embed_bits[1]},
        "visual_blocks": bits,
        "text_blocks": bits if choice == "all_quant" else "fp32",
        "classifier": bits if classifier_quantized else "fp32",
        "classifier_built_by": "quantized text tower" if choice == "all_quant" else "fp32 text tower",
        "classifier_calibration": ("RepQ-ViT batch: the calibration images through the visual tower "
                                   "and the classifier in one forward") if classifier_quantized else None,
        "attention_matmuls": {"a_bits": a_bits} if quant_attn_matmul else "fp32",
        "fp32": ["LayerNorms", "softmax", "GELU", "residual adds", "token/positional embeddings",
                 "visual.proj", "text_projection"],
        "published_defaults": (tuple(patch_embed_bits) == (w_bits, 8)
                               and classifier_quantized == published_classifier
                               and not quant_attn_matmul),
    }
