"""RepQ-ViT (+ optional QwT) on one open_clip tower, with the qwt_core entry points."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from qwt_core import QuantizedModel, calibrate_repq, compensate
from qwt_core.adapters.open_clip import quantize_open_clip_text, quantize_open_clip_visual

from .diagnostics import block_errors, embeddings, relative_mse


@dataclass(frozen=True)
class PTQConfig:
    """How to quantize a tower.

    ``repq_size`` calibration samples (the first of the drawn set) initialise the quantizers
    (RepQ-ViT: 32); QwT uses all calibration batches. ``diagnostics`` measures per-block and embedding
    errors to FP on the calibration data.
    """

    w_bits: int
    a_bits: int
    qwerty: bool = False
    quant_attn_matmul: bool = False
    start_block: int = 0
    repq_size: int = 32
    integer_zero_point: bool = False
    patch_embed_bits: Optional[int] = None  # W and A bits of visual.conv1 (None: w_bits / a_bits)
    diagnostics: bool = False
    progress: bool = True


def split_batches(x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """``(N, ...)`` → consecutive batches of ``batch_size`` (the last may be smaller)."""
    return list(torch.split(x, batch_size, dim=0))


def _quantize_tower(qm: QuantizedModel, encode: Callable[[torch.Tensor], torch.Tensor],
                    calib: torch.Tensor, batch_size: int, cfg: PTQConfig, device: torch.device,
                    fp_embeddings: Optional[torch.Tensor]) -> dict[str, Any]:
    """RepQ-ViT on ``calib[:repq_size]``, then QwT over all ``calib`` batches if ``cfg.qwerty``."""
    batches = [b.to(device) for b in split_batches(calib, batch_size)]
    t0 = time.perf_counter()
    calibrate_repq(qm, calib[:cfg.repq_size].to(device), integer_zero_point=cfg.integer_zero_point)
    report: dict[str, Any] = {"repq_samples": min(cfg.repq_size, len(calib)),
                              "repq_seconds": time.perf_counter() - t0, "qwt": None}
    if fp_embeddings is not None:
        report["embedding_rel_mse_repq"] = relative_mse(embeddings(encode, batches), fp_embeddings)
    if cfg.qwerty:
        qwt = compensate(qm, batches, start_block=cfg.start_block, progress=cfg.progress)
        report["qwt"] = qwt.to_dict()
        report["qwt_samples"] = len(calib)
        if cfg.progress:
            print(qwt.format_table())
        if fp_embeddings is not None:
            report["embedding_rel_mse_repq_qwt"] = relative_mse(embeddings(encode, batches), fp_embeddings)
    if cfg.diagnostics:
        report["block_errors"] = block_errors(qm, batches)
    return report


def quantize_visual(model: nn.Module, images: torch.Tensor, batch_size: int, cfg: PTQConfig,
                    device: torch.device) -> tuple[QuantizedModel, dict[str, Any]]:
    """Quantize ``model.visual`` in place; ``images`` ``(N, 3, H, W)`` are the calibration images."""
    batches = [b.to(device) for b in split_batches(images, batch_size)]
    fp = embeddings(model.encode_image, batches) if cfg.diagnostics else None
    patch = None if cfg.patch_embed_bits is None else (cfg.patch_embed_bits, cfg.patch_embed_bits)
    qm = quantize_open_clip_visual(model.visual, cfg.w_bits, cfg.a_bits, cfg.quant_attn_matmul, patch)
    return qm, _quantize_tower(qm, model.encode_image, images, batch_size, cfg, device, fp)


def quantize_text(model: nn.Module, tokens: torch.Tensor, batch_size: int, cfg: PTQConfig,
                  device: torch.device) -> tuple[QuantizedModel, dict[str, Any]]:
    """Quantize the text transformer in place; ``tokens`` ``(N, L)`` are the calibration captions."""
    batches = [b.to(device) for b in split_batches(tokens, batch_size)]
    fp = embeddings(model.encode_text, batches) if cfg.diagnostics else None
    qm = quantize_open_clip_text(model, cfg.w_bits, cfg.a_bits, cfg.quant_attn_matmul)
    return qm, _quantize_tower(qm, model.encode_text, tokens, batch_size, cfg, device, fp)
