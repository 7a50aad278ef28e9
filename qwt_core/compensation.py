"""Closed-form QwT compensation: streaming least squares and the compensation layers.

The targets are ``Y = block_fp(X) - block_q(X)``. Instead of stacking every calibration token, the
normal equations ``AᵀA`` and ``AᵀY`` of ``A = [X, 1]`` are accumulated batch by batch in float64
(memory ``O(d²)``), all-reduced across ranks, and solved by Cholesky (with a growing ridge only if
``AᵀA`` is not positive definite).

* :class:`TokenLeastSquares` - one Linear over the last dim (ViT/DeiT/Swin/CLIP tokens).
* :class:`GroupedConvLeastSquares` - one grouped k×k conv (ResNet blocks), ridge per group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_reduce_sum


def _all_reduce_(*tensors: torch.Tensor) -> None:
    for t in tensors:
        all_reduce_sum(t)


def solve_normal_equations(ata: torch.Tensor, aty: torch.Tensor, ridge: float = 0.0,
                           max_tries: int = 12) -> torch.Tensor:
    """Solve ``(AᵀA + λI) Θ = AᵀY`` by Cholesky, batched over leading dims.

    ``ridge`` (λ) is added as given. If the Cholesky factorisation fails, a jitter of
    ``1e-12·mean(diag)`` is added and multiplied by 10 until it succeeds.
    ata: ``(..., d, d)``, aty: ``(..., d, m)`` → ``(..., d, m)``.
    """
    eye = torch.eye(ata.shape[-1], dtype=ata.dtype, device=ata.device)
    mat = ata + ridge * eye
    scale = torch.diagonal(mat, dim1=-2, dim2=-1).mean(dim=-1).clamp_min(1e-30)[..., None, None]
    jitter = 0.0
    for _ in range(max_tries):
        chol, info = torch.linalg.cholesky_ex(mat + jitter * scale * eye)
        if not bool(info.any()):
            return torch.cholesky_solve(aty, chol)
        jitter = 1e-12 if jitter == 0.0 else jitter * 10
    raise RuntimeError("normal equations are not positive definite even with a ridge of "
                       f"{jitter:.1e}·mean(diag); the calibration features are degenerate")


def r2_from_moments(ata: torch.Tensor, aty: torch.Tensor, yy: torch.Tensor,
                    theta: torch.Tensor) -> float:
    """R² = 1 - SS_res/SS_tot of the fit ``AΘ`` from the accumulated moments.

    The last column of ``A`` is the constant 1, so ``n = AᵀA[-1, -1]`` and the per-column sums of Y
    are ``AᵀY[-1]``. SS_tot is taken around each output column's mean and summed over columns.
    Works batched over leading (group) dims, summing over them.
    """
    n = ata[..., -1, -1]
    y_sum = aty[..., -1, :]
    ss_tot = yy - (y_sum.pow(2).sum(-1) / n).sum()
    ss_res = yy - 2 * (theta * aty).sum() + (theta * (ata @ theta)).sum()
    if float(ss_tot) <= 0:
        return float("-inf") if float(ss_res) > 0 else 0.0
    return float(1.0 - ss_res / ss_tot)


@dataclass
class Fit:
    """Result of a solve: the compensation layer and its R² on the calibration data."""

    module: nn.Module
    r2: float
    rows: int


class TokenLeastSquares:
    """Accumulates ``[X, 1]ᵀ[X, 1]`` and ``[X, 1]ᵀY`` for token features (channels last).

    ``update(x, y)`` takes x: ``(..., d_in)``, y: ``(..., d_out)`` (same leading dims); the leading dims
    are flattened into rows. ``solve()`` gives an ``nn.Linear(d_in, d_out)`` with
    ``weight = Wᵀ`` and ``bias = b`` of ``y ≈ x·W + b``.
    """

    def __init__(self, d_in: int, d_out: int, device: torch.device | str = "cpu",
                 ridge: float = 0.0, dtype: torch.dtype = torch.float64) -> None:
        self.d_in, self.d_out, self.ridge, self.dtype = d_in, d_out, ridge, dtype
        self.xtx = torch.zeros(d_in, d_in, dtype=dtype, device=device)
        self.x_sum = torch.zeros(d_in, dtype=dtype, device=device)
        self.xty = torch.zeros(d_in, d_out, dtype=dtype, device=device)
        self.y_sum = torch.zeros(d_out, dtype=dtype, device=device)
        self.yy = torch.zeros((), dtype=dtype, device=device)
        self.n = torch.zeros((), dtype=dtype, device=device)

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.reshape(-1, self.d_in).to(self.dtype)
        y = y.reshape(-1, self.d_out).to(self.dtype)
        self.xtx.addmm_(x.T, x)
        self.xty.addmm_(x.T, y)
        self.x_sum += x.sum(0)
        self.y_sum += y.sum(0)
        self.yy += y.pow(2).sum()
        self.n += x.shape[0]

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(AᵀA, AᵀY)`` with the constant column last: ``(d_in+1, d_in+1)``, ``(d_in+1, d_out)``."""
        d = self.d_in
        ata = self.xtx.new_zeros(d + 1, d + 1)
        ata[:d, :d] = self.xtx
        ata[:d, d] = self.x_sum
        ata[d, :d] = self.x_sum
        ata[d, d] = self.n
        aty = torch.cat([self.xty, self.y_sum[None]], dim=0)
        return ata, aty

    def all_reduce(self) -> None:
        _all_reduce_(self.xtx, self.x_sum, self.xty, self.y_sum, self.yy, self.n)

    @torch.no_grad()
    def solve(self) -> Fit:
        ata, aty = self.moments()
        theta = solve_normal_equations(ata, aty, self.ridge)
        layer = nn.Linear(self.d_in, self.d_out, bias=True, device=self.xtx.device)
        layer.weight.copy_(theta[:-1].T.float())
        layer.bias.copy_(theta[-1].float())
        return Fit(layer, r2_from_moments(ata, aty, self.yy, theta), int(self.n))


class GroupedConvLeastSquares:
    """Per-group ridge least squares for QwT's ResNet form: a grouped k×k conv on the block input.

    x: ``(B, C_in, H, W)``, y: ``(B, C_out, H', W')``. ``groups = max(1, C_in // group_channels)``,
    stride ``H // H'``, padding ``k // 2``. Each group's unfolded patches
    ``(B·H'·W', C_in/groups·k²)`` plus a constant column are regressed on its ``C_out/groups``
    output channels with ``(AᵀA + λI)⁻¹AᵀY``.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, kernel_size: int = 1,
                 group_channels: int = 64, ridge: float = 1e-3, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float64) -> None:
        groups = max(1, c_in // group_channels)
        if c_in % groups or c_out % groups:
            groups = 1
        self.c_in, self.c_out, self.groups = c_in, c_out, groups
        self.k, self.stride, self.padding = kernel_size, stride, kernel_size // 2
        self.ridge, self.dtype = ridge, dtype
        d = c_in // groups * kernel_size ** 2 + 1
        m = c_out // groups
        self.ata = torch.zeros(groups, d, d, dtype=dtype, device=device)
        self.aty = torch.zeros(groups, d, m, dtype=dtype, device=device)
        self.yy = torch.zeros((), dtype=dtype, device=device)

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        """``(G, B·L, C_in/G·k² + 1)`` unfolded patches with a constant column."""
        cols = F.unfold(x.to(self.dtype), self.k, padding=self.padding, stride=self.stride)
        b, _, length = cols.shape
        cols = cols.reshape(b, self.groups, -1, length).permute(1, 0, 3, 2).reshape(self.groups, b * length, -1)
        return torch.cat([cols, cols.new_ones(self.groups, b * length, 1)], dim=2)

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        a = self._patches(x)
        b, _, h, w = y.shape
        if a.shape[1] != b * h * w:
            raise ValueError(f"compensation conv (k={self.k}, stride={self.stride}) gives "
                             f"{a.shape[1] // b} positions, the block output has {h}x{w}")
        t = y.to(self.dtype).reshape(b, self.groups, -1, h * w).permute(1, 0, 3, 2).reshape(self.groups, b * h * w, -1)
        self.ata += a.transpose(1, 2) @ a
        self.aty += a.transpose(1, 2) @ t
        self.yy += t.pow(2).sum()

    def all_reduce(self) -> None:
        _all_reduce_(self.ata, self.aty, self.yy)

    @torch.no_grad()
    def solve(self) -> Fit:
        theta = solve_normal_equations(self.ata, self.aty, self.ridge)  # (G, d, m)
        conv = nn.Conv2d(self.c_in, self.c_out, self.k, stride=self.stride, padding=self.padding,
                         groups=self.groups, bias=True, device=self.ata.device)
        g, d, m = theta.shape
        weight = theta[:, :-1, :].permute(0, 2, 1).reshape(g * m, self.c_in // g, self.k, self.k)
        conv.weight.copy_(weight.float())
        conv.bias.copy_(theta[:, -1, :].reshape(-1).float())
        n = int(self.ata[0, -1, -1])
        return Fit(conv, r2_from_moments(self.ata, self.aty, self.yy, theta), n)


class CompensatedBlock(nn.Module):
    """``block(x, *args, **kwargs) + compensation(x)``: a block with its QwT linear compensation.

    The compensation is a Linear over the last dim (token form) or a grouped conv (ResNet form).
    """

    def __init__(self, block: nn.Module, compensation: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.compensation = compensation

    def __getattr__(self, name: str):
        # Code that reads attributes of the wrapped block keeps working (e.g. open_clip's
        # ``Transformer.get_cast_dtype`` reads ``resblocks[0].mlp.c_fc``).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("block"), name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.block(x, *args, **kwargs) + self.compensation(x)
