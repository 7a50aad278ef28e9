"""Tiny random-init models of the real timm architectures, shared by the core tests."""
import math

import timm
import torch
from torch import nn


def tiny_vit(distilled: bool = False) -> nn.Module:
    name = "deit_tiny_distilled_patch16_224" if distilled else "vit_small_patch16_224"
    return timm.create_model(name, pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                             depth=3, num_heads=3, num_classes=10).eval()


def tiny_swin() -> nn.Module:
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56,
                             embed_dim=24, depths=(2, 2), num_heads=(2, 4), num_classes=10).eval()


def randomize_batchnorms(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every BatchNorm2d non-trivial affine parameters and statistics (timm zero-initialises
    the last BN of each residual block); returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = 0.5 + torch.rand(m.num_features, generator=g)
            m.bias.data = 0.1 * torch.randn(m.num_features, generator=g)
            m.running_mean = 0.1 * torch.randn(m.num_features, generator=g)
            m.running_var = 0.5 + torch.rand(m.num_features, generator=g)
    return model


def tiny_resnet() -> nn.Module:
    return randomize_batchnorms(timm.create_model("resnet18", pretrained=False, num_classes=10).eval())


def kthvalue_quantile(x: torch.Tensor, q: float, dim: int) -> torch.Tensor:
    """The former ``exact_quantile`` (two kthvalue calls per quantile), kept verbatim as the
    reference of the topk implementation."""
    n = x.shape[dim]
    rank = float(torch.tensor(q, dtype=x.dtype)) * (n - 1)
    lo_idx, hi_idx = math.floor(rank), math.ceil(rank)
    weight = torch.tensor(rank - lo_idx, dtype=x.dtype, device=x.device)
    lo = torch.kthvalue(x, lo_idx + 1, dim=dim).values
    hi = lo if hi_idx == lo_idx else torch.kthvalue(x, hi_idx + 1, dim=dim).values
    return torch.lerp(lo, hi, weight)


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


@torch.no_grad()
def block_errors_with_and_without_qwt(qm, model: nn.Module, batches) -> tuple[float, float]:
    """Sum over batches and blocks of the block-output MSE to FP, without and with the QwT
    compensation, each block fed the compensated output of the previous one (how the model runs).

    ``qm``: a QuantizedModel after ``compensate``; ``batches``: what ``qm.first_block_input`` takes
    (a tensor, or a dict with ``"inputs"``)."""
    from qwt_core import quant_disabled
    from qwt_core.compensation import CompensatedBlock

    err_q = err_c = 0.0
    for b in batches:
        x = qm.first_block_input(b["inputs"] if isinstance(b, dict) else b)
        for i, name in enumerate(qm.block_names):
            if i > 0 and qm.transition is not None:
                x = qm.transition(i, x)
            blk = model.get_submodule(name)
            inner = blk.block if isinstance(blk, CompensatedBlock) else blk
            run = qm.run_block or (lambda _i, block, inp: block(inp))
            y_q = run(i, inner, x)
            with quant_disabled(inner):
                y_fp = run(i, inner, x)
            y_c = run(i, blk, x)
            err_q += (y_q - y_fp).pow(2).mean().item()
            err_c += (y_c - y_fp).pow(2).mean().item()
            x = y_c
    return err_q, err_c


def log_edge_values() -> torch.Tensor:
    """Attention-like values plus zeros, denormals, values at and next to every power of √2, -0.0,
    NaN and inf."""
    g = torch.Generator().manual_seed(5)
    grid = torch.exp2(-torch.arange(0, 300, 0.25))
    return torch.cat([torch.rand(200_000, generator=g), torch.zeros(1000), torch.full((1000,), 1e-40),
                      torch.exp2(-torch.rand(200_000, generator=g) * 140), grid,
                      grid.nextafter(torch.tensor(0.0)), grid.nextafter(torch.tensor(1.0)),
                      torch.tensor([float("nan"), float("inf"), -0.0, 1e-45])])


def least_squares_fitter(groups: int, case: str, device: str = "cpu"):
    """A fitter with fit and held-out rows; ``case``: ``"full"`` (well conditioned), ``"null"`` (an
    exact linear dependence: a direction eigh drops) or ``"ill"`` (a direction at 3e-10 of the largest
    variance: kept by eigh, beyond what the certificate can prove); with groups: ``"dead"`` (features that
    are always 0 - dead ReLU channels - in two groups) or ``"dead+null"`` (those and an exact linear
    dependence in a third group). The moments live on ``device``."""
    from qwt_core.compensation import GroupedConvLeastSquares, TokenLeastSquares

    g = torch.Generator().manual_seed(5)
    if groups == 1:
        x = (torch.randn(40, 9, 24, generator=g) * torch.logspace(-1, 1, 24) + 3.0).double()
        if case == "null":
            x[..., 5] = 2 * x[..., 3] - x[..., 7]
        elif case == "ill":
            x[..., 5] = x[..., 3] + 3e-4 * torch.randn(40, 9, generator=g, dtype=torch.float64)
        y = x @ torch.randn(24, 16, generator=g, dtype=torch.float64) * 0.1 \
            + torch.randn(40, 9, 16, generator=g, dtype=torch.float64)
        fitter = TokenLeastSquares(24, 16, device=device)
    else:
        x = torch.randn(40, 8, 5, 5, generator=g) + 1.0
        if case == "null":
            x[:, 1] = x[:, 0]  # group 0's two channels equal
        if case.startswith("dead"):
            x[:, 0], x[:, 3] = 0.0, 0.0  # one dead channel in groups 0 and 1
        if case == "dead+null":
            x[:, 5] = 2.0 * x[:, 4]
        y = 0.3 * x[:, :6].repeat(1, 2, 1, 1) + torch.randn(40, 12, 5, 5, generator=g)
        fitter = GroupedConvLeastSquares(8, 12, 1, kernel_size=1, group_channels=2, device=device)
    fitter.update(x.float().to(device), y.float().to(device), heldout=torch.arange(40) % 4 == 1)
    return fitter


def counting_compile(calls: list):
    """A stand-in for ``torch.compile`` that records the class name of every model it compiles in
    ``calls`` and compiles it for real (patch it in with ``monkeypatch.setattr(torch, "compile", ...)``)."""
    real_compile = torch.compile

    def compile_and_count(model, **kwargs):
        calls.append(type(model).__name__)
        return real_compile(model, **kwargs)
    return compile_and_count
