"""RepQ-ViT (+ optional QwT) on one open_clip tower, with the qwt_core entry points.

Calibration data: the RepQ-ViT batch (the first ``--repq-size`` drawn pairs) is the same on every
rank, so every rank calibrates identical quantizers; QwT gets this rank's share of the drawn pairs
and ``apply_qwt`` all-reduces the least-squares moments, so every rank fits the same compensation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from qwt_core import QuantizedModel, calibrate, compensate
from qwt_core.cli_options import qwt_overrides
from qwt_core.adapters.open_clip import ZeroShotHead, quantize_open_clip_text, quantize_open_clip_visual

from .diagnostics import block_errors, embeddings, relative_mse


@dataclass(frozen=True)
class PTQConfig:
    """How to quantize a tower.

    ``patch_embed_bits``: ``(weight bits, input bits)`` of the visual ``conv1`` (published: ``(W, 8)``).
    ``diagnostics`` measures per-block and embedding errors to FP on the QwT calibration data.
    ``qwt_gate`` / ``qwt_ridge``: the QwT gate and ridge (None: the engine default, held-out gate with
    λ chosen on held-out rows; ``qwt_gate="insample"`` is the papers' rule), ``qwt_solver`` the
    least-squares factorisation (None: ``auto``), see :func:`qwt_core.cli_options.qwt_overrides`.
    """

    w_bits: int
    a_bits: int
    patch_embed_bits: tuple[int, int]
    qwerty: bool = False
    quant_attn_matmul: bool = False
    start_block: int = 0
    integer_zero_point: bool = False
    diagnostics: bool = False
    progress: bool = True
    qwt_gate: Optional[str] = None
    qwt_ridge: Union[float, str, None] = None
    qwt_solver: Optional[str] = None


def split_batches(x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """``(N, ...)`` → consecutive batches of ``batch_size`` (the last may be smaller)."""
    return list(torch.split(x, batch_size, dim=0))


def _quantize_tower(qm: QuantizedModel, encode: Callable[[torch.Tensor], torch.Tensor],
                    repq: torch.Tensor, batches: list[torch.Tensor], cfg: PTQConfig, device: torch.device,
                    fp_embeddings: Optional[torch.Tensor]) -> dict[str, Any]:
    """RepQ-ViT on ``repq`` (one batch), then QwT over this rank's ``batches`` if ``cfg.qwerty``."""
    t0 = time.perf_counter()
    calibrate(qm, repq.to(device), integer_zero_point=cfg.integer_zero_point)
    report: dict[str, Any] = {"repq_samples": len(repq), "repq_seconds": time.perf_counter() - t0,
                              "qwt": None}
    if fp_embeddings is not None:
        report["embedding_rel_mse_repq"] = relative_mse(embeddings(encode, batches), fp_embeddings, device)
    if cfg.qwerty:
        qwt = compensate(qm, batches, start_block=cfg.start_block, progress=cfg.progress,
                         **qwt_overrides(cfg.qwt_gate, cfg.qwt_ridge, solver=cfg.qwt_solver))
        report["qwt"] = qwt.to_dict()
        if cfg.progress:
            print(qwt.format_table())
        if fp_embeddings is not None:
            report["embedding_rel_mse_repq_qwt"] = relative_mse(embeddings(encode, batches), fp_embeddings,
                                                                device)
    if cfg.diagnostics:
        report["block_errors"] = block_errors(qm, batches)
    return report


def quantize_visual(model: nn.Module, repq_images: torch.Tensor, qwt_images: torch.Tensor, batch_size: int,
                    cfg: PTQConfig, device: torch.device, head: Optional[ZeroShotHead] = None
                    ) -> tuple[QuantizedModel, dict[str, Any]]:
    """Quantize ``model.visual`` in place.

    ``repq_images`` ``(R, 3, H, W)``: the RepQ-ViT batch; ``qwt_images`` ``(N_rank, 3, H, W)``: this
    rank's QwT calibration images. A (quantized) zero-shot ``head`` is calibrated on the RepQ-ViT batch
    together with the tower (its input = the tower's normalised output).
    """
    batches = [b.to(device) for b in split_batches(qwt_images, batch_size)]
    fp = embeddings(model.encode_image, batches) if cfg.diagnostics else None
    qm = quantize_open_clip_visual(model.visual, cfg.w_bits, cfg.a_bits, cfg.quant_attn_matmul,
                                   cfg.patch_embed_bits, head=head)
    return qm, _quantize_tower(qm, model.encode_image, repq_images, batches, cfg, device, fp)


def quantize_text(model: nn.Module, repq_tokens: torch.Tensor, qwt_tokens: torch.Tensor, batch_size: int,
                  cfg: PTQConfig, device: torch.device) -> tuple[QuantizedModel, dict[str, Any]]:
    """Quantize the text transformer in place; ``repq_tokens`` ``(R, L)`` / ``qwt_tokens``
    ``(N_rank, L)`` are the RepQ-ViT batch and this rank's QwT captions."""
    batches = [b.to(device) for b in split_batches(qwt_tokens, batch_size)]
    fp = embeddings(model.encode_text, batches) if cfg.diagnostics else None
    qm = quantize_open_clip_text(model, cfg.w_bits, cfg.a_bits, cfg.quant_attn_matmul)
    return qm, _quantize_tower(qm, model.encode_text, repq_tokens, batches, cfg, device, fp)
