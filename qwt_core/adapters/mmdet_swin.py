"""RepQ-ViT / QwT adapter for detectors with mmdet 3.x's ``SwinTransformer`` backbone.

What it does to a detector (``nn.Module`` with a ``backbone`` that is mmdet's SwinTransformer):

* each ``SwinBlock.attn`` (``ShiftWindowMSA``) becomes :class:`QuantShiftWindowMSA`, which computes
  window attention with two explicit :class:`~qwt_core.modules.QuantMatMul` (``q·kᵀ`` uniform,
  ``attn·v`` log-√2) and keeps the parameter names of mmdet (``attn.w_msa.qkv`` ...), so
  checkpoints load unchanged;
* every ``nn.Linear``/``nn.Conv2d`` of the detector (backbone, neck, RPN and RoI heads) becomes a
  fake-quant layer at ``w_bits``/``a_bits``; the patch-embedding conv reads its input at 8 bits;
  Linears fed by a LayerNorm (``attn.w_msa.qkv``, ``ffn.layers.0.0``, ``downsample.reduction``) get a
  channel-wise input quantizer that RepQ-ViT folds into the LayerNorm;
* QwT blocks are ``backbone.stages.{s}.blocks.{j}``; they run on NHWC tokens ``(B, H, W, C)`` during
  QwT so the spatial shape travels with the tensor. mmdet applies the stage's ``PatchMerging`` at the
  *end* of a stage, so the transition into the first block of stage ``s`` is
  ``stages[s-1].downsample``.

Padding and the LayerNorm reparameterization: mmdet pads the *output* of ``norm1`` with zeros to a
multiple of the window size. After RepQ-ViT rescales ``norm1`` (``y' = y/r - β``) a zero in the
original coordinates is ``-β`` in the new ones, so padding with zeros would change the function.
:class:`QuantShiftWindowMSA` pads with the value that corresponds to the original zero, recovered
from the LayerNorm bias and the ``qkv`` column norms recorded at quantization time (zero before
any reparameterization). The floating-point detector is therefore unchanged by the reparameterization
(the reference implementation pads with zeros after the rescale).
"""
from __future__ import annotations

import time
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..calibrate import CalibrationReport
from ..modules import QuantMatMul, quantizers
from ..quantize import LayerBits, quantize_layers
from ..repq import repq_calibrate, uninitialized_quantizers
from .base import QuantizedModel

#: Linears whose input comes straight out of a LayerNorm (reparameterized by RepQ-ViT).
LN_FED_SUFFIXES = (".attn.w_msa.qkv", ".ffn.layers.0.0", ".downsample.reduction")


class QuantWindowMSA(nn.Module):
    """Window attention with quantizable matmuls; drop-in for mmdet's ``WindowMSA``.

    x: ``(num_windows·B, N, C)`` with ``N = Wh·Ww``; mask: ``(num_windows, N, N)`` (0 / -100) or None
    → ``(num_windows·B, N, C)``. Parameters (``qkv``, ``proj``, ``relative_position_bias_table``) are
    the original modules, not copies.
    """

    def __init__(self, w_msa: nn.Module, a_bits: int) -> None:
        super().__init__()
        self.embed_dims = w_msa.embed_dims
        self.num_heads = w_msa.num_heads
        self.window_size = tuple(w_msa.window_size)
        self.scale = w_msa.scale
        self.relative_position_bias_table = w_msa.relative_position_bias_table
        self.register_buffer("relative_position_index", w_msa.relative_position_index)
        self.qkv = w_msa.qkv
        self.attn_drop = w_msa.attn_drop
        self.proj = w_msa.proj
        self.proj_drop = w_msa.proj_drop
        self.matmul1 = QuantMatMul(a_bits, "uniform")  # (q·scale) @ kᵀ
        self.matmul2 = QuantMatMul(a_bits, "log2")     # softmax(attn) @ v

    def relative_position_bias(self) -> torch.Tensor:
        """``(1, heads, N, N)`` bias gathered from the table."""
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b_, n, c = x.shape
        qkv = self.qkv(x).reshape(b_, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self.relative_position_bias()
        if not (self.matmul1.use_act_quant or self.matmul2.use_act_quant):
            # FP path (e.g. QwT's reference pass): same function, fused kernel.
            if mask is not None:
                nw = mask.shape[0]
                bias = (bias.unsqueeze(1) + mask.unsqueeze(1).unsqueeze(0)).expand(
                    b_ // nw, -1, -1, -1, -1).reshape(b_, self.num_heads, n, n)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=self.scale)
        else:
            attn = self.matmul1(q * self.scale, k.transpose(-2, -1)) + bias
            if mask is not None:
                nw = mask.shape[0]
                attn = attn.view(b_ // nw, nw, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
                attn = attn.view(-1, self.num_heads, n, n)
            attn = self.attn_drop(attn.softmax(dim=-1))
            out = self.matmul2(attn, v)
        out = out.transpose(1, 2).reshape(b_, n, c)
        return self.proj_drop(self.proj(out))


class QuantShiftWindowMSA(nn.Module):
    """Drop-in for mmdet's ``ShiftWindowMSA`` (query ``(B, H·W, C)``, hw_shape ``(H, W)`` →
    ``(B, H·W, C)``) around a :class:`QuantWindowMSA`, padding with the reparameterization-aware
    value described in the module docstring.

    ``norm`` is the LayerNorm whose output this module receives (the block's ``norm1``).
    """

    MASK_CACHE_SIZE = 4  # shifted-window masks kept per module (one per padded input size)

    def __init__(self, shift_msa: nn.Module, norm: nn.LayerNorm, a_bits: int) -> None:
        super().__init__()
        self.window_size = shift_msa.window_size
        self.shift_size = shift_msa.shift_size
        self.w_msa = QuantWindowMSA(shift_msa.w_msa, a_bits)
        self.drop = shift_msa.drop
        self._norm = [norm]  # a list keeps it out of this module's children / state_dict
        with torch.no_grad():
            self.register_buffer("pad_ref_bias", norm.bias.detach().clone())
            self.register_buffer("pad_ref_colnorm", self.w_msa.qkv.weight.detach().norm(dim=0).clone())
        self._mask_cache: dict[tuple, torch.Tensor] = {}

    def pad_value(self) -> torch.Tensor:
        """``(C,)``: the current-coordinates image of a zero output of the original ``norm1``.

        With ``r_c = ‖W'[:, c]‖ / ‖W[:, c]‖`` (the reparameterization's channel scale) and LayerNorm
        biases ``b`` (recorded) and ``b'`` (now): ``-β = b' - b / r``. Exactly zero before RepQ-ViT.
        """
        norm = self._norm[0]
        col = self.w_msa.qkv.weight.detach().norm(dim=0)
        ref = self.pad_ref_colnorm
        r = torch.where(ref > 0, col / ref.clamp_min(1e-30), torch.ones_like(col))
        same = torch.equal(norm.bias.detach(), self.pad_ref_bias)
        if same:
            return torch.zeros_like(self.pad_ref_bias)
        return norm.bias.detach() - self.pad_ref_bias / r

    def _shift_mask(self, h_pad: int, w_pad: int, device: torch.device) -> torch.Tensor:
        """``(num_windows, N, N)`` additive mask (0 within a region, -100 across) for SW-MSA."""
        key = (h_pad, w_pad, str(device))
        if key not in self._mask_cache:
            ws, ss = self.window_size, self.shift_size
            region = torch.zeros(h_pad, w_pad, device=device)
            bounds = ((0, -ws), (-ws, -ss), (-ss, None))
            label = 0
            for h0, h1 in bounds:
                for w0, w1 in bounds:
                    region[slice(h0, h1), slice(w0, w1)] = label
                    label += 1
            win = self._partition(region.view(1, h_pad, w_pad, 1)).reshape(-1, ws * ws)
            diff = win.unsqueeze(1) - win.unsqueeze(2)
            if len(self._mask_cache) >= self.MASK_CACHE_SIZE:  # COCO images have many sizes
                self._mask_cache.pop(next(iter(self._mask_cache)))
            self._mask_cache[key] = torch.zeros_like(diff).masked_fill(diff != 0, -100.0)
        return self._mask_cache[key]

    def _partition(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` → ``(B·H/ws·W/ws, ws, ws, C)``."""
        b, h, w, c = x.shape
        ws = self.window_size
        x = x.reshape(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(-1, ws, ws, c)

    def _reverse(self, windows: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
        """``(B·H/ws·W/ws, ws, ws, C)`` → ``(B, H, W, C)``."""
        ws = self.window_size
        x = windows.reshape(b, h // ws, w // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, h, w, -1)

    def forward(self, query: torch.Tensor, hw_shape: tuple[int, int]) -> torch.Tensor:
        b, length, c = query.shape
        h, w = hw_shape
        if length != h * w:
            raise ValueError(f"ShiftWindowMSA got {length} tokens for hw_shape {tuple(hw_shape)}")
        ws = self.window_size
        x = query.reshape(b, h, w, c)
        pad_r, pad_b = (ws - w % ws) % ws, (ws - h % ws) % ws
        if pad_r or pad_b:
            fill = self.pad_value().to(x.dtype)
            padded = x.new_empty(b, h + pad_b, w + pad_r, c)
            padded.copy_(fill.view(1, 1, 1, c).expand_as(padded))
            padded[:, :h, :w] = x
            x = padded
        h_pad, w_pad = x.shape[1], x.shape[2]
        mask = None
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
            mask = self._shift_mask(h_pad, w_pad, x.device)
        windows = self._partition(x).reshape(-1, ws * ws, c)
        out = self.w_msa(windows, mask=mask).view(-1, ws, ws, c)
        x = self._reverse(out, b, h_pad, w_pad)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = x[:, :h, :w].reshape(b, h * w, c)
        return self.drop(x)


def detector_layer_rule(w_bits: int, a_bits: int, backbone_prefix: str = "backbone"):
    """Bits for every Linear/Conv2d of a detector: ``w_bits``/``a_bits``; the patch-embedding conv reads
    its input at 8 bits; LayerNorm-fed backbone Linears get a channel-wise input quantizer."""
    patch_conv = f"{backbone_prefix}.patch_embed.projection"

    def rule(name: str, module: nn.Module) -> Optional[LayerBits]:
        if name == patch_conv:
            return LayerBits(w_bits, 8)
        if (isinstance(module, nn.Linear) and name.startswith(backbone_prefix + ".")
                and name.endswith(LN_FED_SUFFIXES)):
            return LayerBits(w_bits, a_bits, act_channel_wise=True)
        return LayerBits(w_bits, a_bits)

    return rule


def _check_swin(backbone: nn.Module) -> None:
    if not (hasattr(backbone, "stages") and hasattr(backbone, "patch_embed")
            and hasattr(backbone, "drop_after_pos")):
        raise TypeError(f"{type(backbone).__name__} is not mmdet's SwinTransformer backbone "
                        "(expected .patch_embed, .drop_after_pos and .stages)")


def quantize_mmdet_swin_detector(detector: nn.Module, w_bits: int, a_bits: int,
                                 backbone_attr: str = "backbone") -> QuantizedModel:
    """Quantize an mmdet detector with a Swin backbone in place (RepQ-ViT layout) for QwT.

    Returns a :class:`QuantizedModel` whose ``model`` is the detector, whose ``block_names`` are the
    Swin blocks (``backbone.stages.s.blocks.j``) and whose ``first_block_input`` maps images
    ``(B, 3, H, W)`` (already normalised by the data preprocessor) to NHWC tokens
    ``(B, H/4, W/4, C)``; it also takes a preprocessed batch ``{"inputs": images, ...}``.
    :func:`qwt_core.calibrate` takes one preprocessed batch ``{"inputs": (B, 3, H, W),
    "data_samples": [...]}`` and runs it through the whole detector (:func:`calibrate_detector`).
    """
    backbone = getattr(detector, backbone_attr)
    _check_swin(backbone)
    block_names: list[str] = []
    stage_of_block: list[int] = []
    ln_pairs = []
    for s, stage in enumerate(backbone.stages):
        for j, blk in enumerate(stage.blocks):
            if not isinstance(blk.attn, QuantShiftWindowMSA):
                blk.attn = QuantShiftWindowMSA(blk.attn, blk.norm1, a_bits)
            block_names.append(f"{backbone_attr}.stages.{s}.blocks.{j}")
            stage_of_block.append(s)
    quantize_layers(detector, detector_layer_rule(w_bits, a_bits, backbone_attr))
    for stage in backbone.stages:
        for blk in stage.blocks:
            ln_pairs += [(blk.norm1, blk.attn.w_msa.qkv), (blk.norm2, blk.ffn.layers[0][0])]
        down = stage.downsample
        if down is not None and getattr(down, "norm", None) is not None:
            ln_pairs.append((down.norm, down.reduction))

    def first_block_input(images: Any) -> torch.Tensor:
        """Normalised images ``(B, 3, H, W)`` (or a batch dict with them under ``"inputs"``) → NHWC
        tokens ``(B, H/4, W/4, C)`` of stage 0's first block."""
        if isinstance(images, dict):
            images = images["inputs"]
        x, (h, w) = backbone.patch_embed(images)
        if backbone.use_abs_pos_embed:
            x = x + backbone.absolute_pos_embed
        x = backbone.drop_after_pos(x)
        return x.view(x.shape[0], h, w, x.shape[-1])

    def transition(i: int, x: torch.Tensor) -> torch.Tensor:
        """NHWC output of block ``i-1`` → input of block ``i`` (previous stage's PatchMerging)."""
        prev = stage_of_block[i - 1]
        if stage_of_block[i] == prev:
            return x
        b, h, w, c = x.shape
        y, (h2, w2) = backbone.stages[prev].downsample(x.reshape(b, h * w, c), (h, w))
        return y.view(b, h2, w2, y.shape[-1])

    def run_block(i: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Call an mmdet ``SwinBlock`` (tokens ``(B, H·W, C)`` + hw_shape) on NHWC ``x``."""
        b, h, w, c = x.shape
        return block(x.reshape(b, h * w, c), (h, w)).view(b, h, w, -1)

    return QuantizedModel(model=detector, ln_pairs=ln_pairs, block_names=block_names,
                          first_block_input=first_block_input, transition=transition,
                          run_block=run_block, form="token", calibrator=calibrate_detector,
                          meta={"family": "mmdet_swin", "w_bits": w_bits, "a_bits": a_bits})


@torch.no_grad()
def calibrate_detector(qm: QuantizedModel, batch: dict, ln_pairs: Any = "adapter", row_mask: Any = None,
                       integer_zero_point: bool = False) -> CalibrationReport:
    """RepQ-ViT calibration of a quantized mmdet detector on one preprocessed batch ``{"inputs":
    (B, 3, H, W), "data_samples": [...]}`` (what :func:`qwt_core.calibrate` runs for this adapter).

    Raises ``RuntimeError`` naming quantizers the detector never reached (e.g. a head that got no RoIs).
    """
    if not isinstance(batch, dict) or "inputs" not in batch or "data_samples" not in batch:
        raise TypeError("calibrating a detector takes one preprocessed batch {'inputs': images, "
                        "'data_samples': [...]} (the data preprocessor's output)")
    if ln_pairs != "adapter" or row_mask is not None:
        raise ValueError("the mmdet Swin adapter calibrates with its own LayerNorm pairs and no row mask")
    t0 = time.perf_counter()
    model = qm.model
    model.eval()
    # rescale=False: the masks need not be pasted back at the original image size
    repq_calibrate(lambda: model.predict(batch["inputs"], batch["data_samples"], rescale=False),
                   model, qm.ln_pairs, integer_zero_point=integer_zero_point)
    missing = uninitialized_quantizers(model)
    if missing:
        raise RuntimeError(f"{len(missing)} quantizers saw no data during RepQ-ViT calibration "
                           f"(e.g. {missing[:3]}); use more or larger calibration images")
    return CalibrationReport(quantizers=sum(1 for _ in quantizers(model)), seconds=time.perf_counter() - t0)
