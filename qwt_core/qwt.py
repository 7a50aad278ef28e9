"""QwT engine: compensate a quantized model block by block, for any model.

For each block in forward order, with ``X`` the block input produced by the already compensated
quantized model:

1. ``Y_q = block_q(X)`` and ``Y_fp = block(X)`` with quantization off inside this block only;
2. least squares ``[X, 1] → Y_fp - Y_q`` accumulated over the calibration set (float64 moments);
3. if ``R² > 0`` (and the block is at or after ``start_block``) the block becomes
   ``CompensatedBlock(block, compensation)``; otherwise it is left as is (zero compensation);
4. the next block's input is ``Y_q + compensation(X)`` (reusing ``Y_q``; no third block run).

The user supplies the list of block names, a function producing the first block's input from a
calibration batch and, if the model has glue between blocks (Swin patch merging), a transition.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Literal, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .compensation import CompensatedBlock, GroupedConvLeastSquares, TokenLeastSquares
from .distributed import is_main_process
from .modules import quant_disabled

Transition = Callable[[int, torch.Tensor], torch.Tensor]
RunBlock = Callable[[int, nn.Module, torch.Tensor], torch.Tensor]


@dataclass
class BlockReport:
    """What QwT did to one block."""

    index: int
    name: str
    r2: Optional[float]  # None for blocks before start_block
    applied: bool
    rows: int
    seconds: float


@dataclass
class QwTReport:
    """Per-block R² and timings of one QwT run."""

    blocks: list[BlockReport] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "blocks": [asdict(b) for b in self.blocks]}

    def format_table(self) -> str:
        lines = [f"{'#':>3}  {'block':<28} {'R2':>9}  applied"]
        for b in self.blocks:
            r2 = "-" if b.r2 is None else f"{b.r2:9.4f}"
            lines.append(f"{b.index:>3}  {b.name:<28} {r2:>9}  {'yes' if b.applied else 'no'}")
        return "\n".join(lines)


def _default_run_block(i: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return block(x)


def _make_fitter(form: str, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                 conv_kernel: int, conv_group_channels: int, ridge: Optional[float]):
    if form == "token":
        return TokenLeastSquares(x.shape[-1], y.shape[-1], device=device,
                                 ridge=0.0 if ridge is None else ridge)
    if form == "conv":
        if x.dim() != 4 or y.dim() != 4:
            raise ValueError("form='conv' expects NCHW block inputs and outputs")
        stride = max(1, x.shape[-1] // y.shape[-1])
        return GroupedConvLeastSquares(x.shape[1], y.shape[1], stride, conv_kernel,
                                       conv_group_channels, 1e-3 if ridge is None else ridge,
                                       device=device)
    raise ValueError(f"unknown compensation form {form!r}: use 'token' or 'conv'")


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def apply_qwt(model: nn.Module, block_names: Sequence[str], calib_batches: Iterable[Any],
              first_block_input: Callable[[Any], torch.Tensor], transition: Optional[Transition] = None,
              run_block: Optional[RunBlock] = None, form: Literal["token", "conv"] = "token",
              start_block: int = 0, conv_kernel: int = 1, conv_group_channels: int = 64,
              ridge: Optional[float] = None, store_device: Optional[torch.device | str] = None,
              progress: bool = True) -> QwTReport:
    """Add QwT compensation to the blocks of a quantized ``model`` (in place).

    Args:
        model: the quantized model (quantizers already calibrated).
        block_names: qualified names of the blocks in forward order (``model.get_submodule``).
        calib_batches: calibration batches (e.g. image tensors ``(B, 3, H, W)``); in distributed
            runs each rank passes its own shard, and the moments are all-reduced.
        first_block_input: batch → input of block 0 computed by the quantized model.
        transition: ``(i, x) → x``, applied to the output of block ``i-1`` before block ``i``.
        run_block: ``(i, block, x) → y``; default ``block(x)``.
        form: ``"token"`` (channels last, Linear compensation) or ``"conv"`` (NCHW, grouped conv).
        start_block: blocks before this index get no compensation.
        conv_kernel, conv_group_channels: grouped-conv form (k, input channels per group).
        ridge: λ of the least squares (default 0 with a Cholesky fallback for tokens, 1e-3 for conv).
        store_device: where the per-batch features are kept between blocks (default: model device).
        progress: show a progress bar (main process only).
    Returns:
        A :class:`QwTReport` with each block's R², whether it was compensated, rows and time.
    """
    run = run_block or _default_run_block
    device = _model_device(model)
    store = torch.device(store_device) if store_device is not None else device
    report = QwTReport()
    t_start = time.perf_counter()

    xs = [first_block_input(batch).detach().to(store) for batch in calib_batches]
    if not xs:
        raise ValueError("apply_qwt got no calibration batches")

    bar = tqdm(list(enumerate(block_names)), desc="QwT", disable=not (progress and is_main_process()))
    for i, name in bar:
        t0 = time.perf_counter()
        block = model.get_submodule(name)
        if i > 0 and transition is not None:
            xs = [transition(i, x.to(device)).to(store) for x in xs]
        compensate = i >= start_block
        fitter = None
        ys_q: list[torch.Tensor] = []
        for x in xs:
            x_dev = x.to(device)
            y_q = run(i, block, x_dev)
            if compensate:
                with quant_disabled(block):
                    y_fp = run(i, block, x_dev)
                if fitter is None:
                    fitter = _make_fitter(form, x_dev, y_q, device, conv_kernel, conv_group_channels, ridge)
                fitter.update(x_dev, y_fp - y_q)
                del y_fp
            ys_q.append(y_q.to(store))

        r2, applied, rows = None, False, 0
        if fitter is not None:
            fitter.all_reduce()
            fit = fitter.solve()
            r2, rows = fit.r2, fit.rows
            applied = r2 > 0
            if applied:
                compensation = fit.module.to(device)
                model.set_submodule(name, CompensatedBlock(block, compensation))
                ys_q = [(y + compensation(x.to(device))).to(store) for x, y in zip(xs, ys_q)]
        xs = ys_q
        report.blocks.append(BlockReport(i, name, r2, applied, rows, time.perf_counter() - t0))
        if r2 is not None:
            bar.set_postfix(block=name, r2=f"{r2:.3f}")
    report.seconds = time.perf_counter() - t_start
    return report
