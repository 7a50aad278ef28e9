"""Attention with explicit, quantizable matmuls for timm ViT/DeiT and Swin blocks.

timm >= 1.0 computes attention with ``F.scaled_dot_product_attention``; RepQ-ViT quantizes both
attention products, so these modules recompute attention explicitly:
``attn = softmax(Q_u(q·scale) @ Q_u(kᵀ) + bias)``, ``out = Q_log√2(attn) @ Q_u(v)``.
They reuse the original submodules and parameters (same state-dict names). With both matmul
quantizers switched off (the FP pass of QwT) they use the fused kernel, which computes the same
function faster.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .modules import QuantMatMul


def mask_scores(scores: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool) -> torch.Tensor:
    """Attention scores ``(B, H, N, N)`` with ``F.scaled_dot_product_attention``'s masks applied.

    ``is_causal``: -inf above the diagonal; ``attn_mask``: bool (False → -inf) or additive float."""
    if is_causal:
        n = scores.shape[-1]
        causal = torch.ones(n, n, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else scores + attn_mask
    return scores


class QuantViTAttention(nn.Module):
    """Drop-in for ``timm.layers.Attention`` (x: ``(B, N, C)`` → ``(B, N, C)``)."""

    def __init__(self, attn: nn.Module, a_bits: int) -> None:
        super().__init__()
        if getattr(attn, "gate", None) is not None:
            raise ValueError("gated attention is not supported by the RepQ-ViT adapter")
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.scale = attn.scale
        self.qkv = attn.qkv
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.attn_drop = attn.attn_drop
        self.norm = getattr(attn, "norm", nn.Identity())
        self.proj = attn.proj
        self.proj_drop = attn.proj_drop
        self.matmul1 = QuantMatMul(a_bits, "uniform")  # q @ kᵀ
        self.matmul2 = QuantMatMul(a_bits, "log2")     # attn @ v

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if not (self.matmul1.use_act_quant or self.matmul2.use_act_quant):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
            out = out.transpose(1, 2).reshape(b, n, self.attn_dim)
            return self.proj_drop(self.proj(self.norm(out)))
        attn = mask_scores(self.matmul1(q * self.scale, k.transpose(-2, -1)), attn_mask, is_causal)
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = self.matmul2(attn, v)
        out = out.transpose(1, 2).reshape(b, n, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(out)))


class QuantWindowAttention(nn.Module):
    """Drop-in for timm Swin ``WindowAttention`` (x: ``(num_windows·B, N, C)``, mask
    ``(num_windows, N, N)`` or None)."""

    def __init__(self, attn: nn.Module, a_bits: int) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.scale = attn.scale
        self.window_area = attn.window_area
        self.qkv = attn.qkv
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index,
                             persistent="relative_position_index" in attn.state_dict())
        self.attn_drop = attn.attn_drop
        self.proj = attn.proj
        self.proj_drop = attn.proj_drop
        self.matmul1 = QuantMatMul(a_bits, "uniform")
        self.matmul2 = QuantMatMul(a_bits, "log2")

    def _rel_pos_bias(self) -> torch.Tensor:
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(self.window_area, self.window_area, -1).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b_, n, _ = x.shape
        qkv = self.qkv(x).reshape(b_, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if not (self.matmul1.use_act_quant or self.matmul2.use_act_quant):
            bias = self._rel_pos_bias()
            if mask is not None:
                num_win = mask.shape[0]
                bias = (bias.unsqueeze(1) + mask.unsqueeze(1).unsqueeze(0)).expand(
                    b_ // num_win, -1, -1, -1, -1).reshape(b_, self.num_heads, n, n)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b_, n, -1)))
        attn = self.matmul1(q * self.scale, k.transpose(-2, -1)) + self._rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = self.matmul2(attn, v)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b_, n, -1)))
