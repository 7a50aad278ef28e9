"""QwT engine: compensate a quantized model block by block, for any model.

For each block in forward order, with ``X`` the block input produced by the already compensated
quantized model:

1. ``Y_q = block_q(X)`` and ``Y_fp = block(X)`` with quantization off inside this block only;
2. least squares ``[X, 1] → Y_fp - Y_q`` accumulated over the calibration set (float64 moments; rows
   with ``row_mask == 0`` excluded), in two parts: *fit* rows and *held-out* rows;
3. the gate decides (default ``gate="holdout"``: ridge λ picked on the held-out rows, compensate iff
   the held-out R² > 0, refit on all rows; ``gate="insample"``: the papers' rule, in-sample R² > 0);
4. the next block's input is ``Y_q + compensation(X)`` (reusing ``Y_q``; no third block run).

**Held-out split.** A *sample* is one index along dim 0 of a block input (an image, a sentence).
Samples are numbered in the order this process sees them (over all its calibration batches); sample
``s`` is held out iff ``s % holdout_period == 1`` (one in four by default; with 2 or 3 samples one is
held out). The rule depends only on that order, so every rank applies the same rule to its shard;
when every batch size (interleaved shards) or every rank's sample count (contiguous shards) is a
multiple of ``holdout_period``, the split of a sharded run equals that of a single-process run over
the same samples, so distributed and single-process results agree. Decisions are taken on the
all-reduced moments, hence identical on every rank.

**Fail early.** Block names are resolved and checked (unknown names with close-name suggestions,
duplicates, nesting, registration order, already compensated) before any work; NaN/Inf in a block's
input or output is reported with the block's name. The model is modified only after every block has
been fitted: an exception mid-way (including KeyboardInterrupt) leaves it exactly as it was.
"""
from __future__ import annotations

import difflib
import math
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Literal, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .compensation import (NULL_RTOL, RIDGE_GRID, CompensatedBlock, ConvR2Mean, Fit, Gate, Solver,
                           GroupedConvLeastSquares, Ridge, TokenLeastSquares, _check_gate_args,
                           _resolve_solver)
from .distributed import all_reduce_sum, is_main_process
from .modules import quant_disabled

Transition = Callable[[int, torch.Tensor], torch.Tensor]
#: ``run_block(i, block, x, **block_kwargs) -> y`` (adapters written for ``(i, block, x)`` still work:
#: the keyword arguments are only passed when the batch carries some).
RunBlock = Callable[..., torch.Tensor]


@dataclass
class BlockInput:
    """What ``first_block_input(batch)`` may return instead of a bare tensor.

    Attributes:
        x: input of block 0, token form ``(..., C)`` or conv form ``(B, C, H, W)``.
        row_mask: bool or 0/1 tensor of shape ``x.shape[:-1]`` (token form only): 1 marks real rows,
            0 padding rows, which are excluded from every least-squares moment (and from the NaN check).
        block_kwargs: keyword arguments for every block of this batch (attention mask, position ids),
            passed as ``run_block(i, block, x, **block_kwargs)``, default run ``block(x, **block_kwargs)``.
    """

    x: torch.Tensor
    row_mask: Optional[torch.Tensor] = None
    block_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class BlockReport:
    """What QwT did to one block.

    ``r2`` is the R² the decision used (held-out R² for ``gate="holdout"``, in-sample R² for
    ``"insample"``); None for blocks before ``start_block``. ``ridge`` is the absolute λ of the final
    fit (mean over groups for the conv form), ``ridge_rel`` its multiple of the mean feature variance
    eigenvalue (``"auto"`` only). ``mse_before``/``mse_after``: mean squared error of the block output
    vs FP on all calibration rows, without / with the compensation. ``rank_deficiency``: number of
    numerically null directions of the centred feature covariance (summed over groups). ``solver``:
    the factorisation that solved the block (``"eigh"``, ``"cholesky"`` or ``"mixed"``: see
    :class:`qwt_core.compensation.Fit`).
    """

    index: int
    name: str
    applied: bool
    rows: int
    r2: Optional[float] = None
    r2_insample: Optional[float] = None
    r2_heldout: Optional[float] = None
    ridge: Optional[float] = None
    mse_before: Optional[float] = None
    mse_after: Optional[float] = None
    rank_deficiency: Optional[int] = None
    seconds: float = 0.0
    rows_heldout: int = 0
    ridge_rel: Optional[float] = None
    solver: Optional[str] = None


@dataclass
class QwTReport:
    """Per-block decisions, R², λ, errors and timings of one QwT run."""

    blocks: list[BlockReport] = field(default_factory=list)
    seconds: float = 0.0
    gate: str = "holdout"
    ridge: Union[str, float, None] = None
    form: str = "token"
    solver: str = "auto"
    #: the :class:`~qwt_core.QwTConfig` used, as a dict (set by :func:`qwt_core.compensate`)
    config: Optional[dict[str, Any]] = None

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "gate": self.gate, "ridge": self.ridge, "form": self.form,
                "solver": self.solver, "config": self.config,
                "blocks": [_finite_or_none(asdict(b)) for b in self.blocks]}

    def format_table(self) -> str:
        def num(v, fmt):
            return "-" if v is None else format(v, fmt)

        head = (f"{'#':>3}  {'block':<28} {'rows':>8} {'held':>7} {'R2 in':>8} {'R2 held':>8} "
                f"{'ridge':>9} {'rankdef':>7} {'MSE before':>10} {'MSE after':>10}  applied")
        lines = [f"QwT gate: {self.gate}" + ("" if self.gate != "holdout" else
                                              " (applied iff held-out R2 > 0)"), head]
        for b in self.blocks:
            lines.append(f"{b.index:>3}  {b.name:<28} {b.rows:>8} {b.rows_heldout:>7} "
                         f"{num(b.r2_insample, '8.4f'):>8} {num(b.r2_heldout, '8.4f'):>8} "
                         f"{num(b.ridge, '9.2e'):>9} {num(b.rank_deficiency, 'd'):>7} "
                         f"{num(b.mse_before, '10.3e'):>10} {num(b.mse_after, '10.3e'):>10}  "
                         f"{'yes' if b.applied else 'no'}")
        return "\n".join(lines)


def _finite_or_none(d: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe floats: ±inf / nan become None."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _default_run_block(i: int, block: nn.Module, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    return block(x, **kwargs)


def _make_fitter(form: str, x: torch.Tensor, y: torch.Tensor, device: torch.device, conv_kernel: int,
                 conv_group_channels: int, ridge: Optional[float], conv_r2_mean: ConvR2Mean):
    """``ridge`` here is the reference λ of the in-sample solver (None: 0 for tokens, 1e-3 for conv)."""
    if form == "token":
        return TokenLeastSquares(x.shape[-1], y.shape[-1], device=device,
                                 ridge=0.0 if ridge is None else ridge)
    if x.dim() != 4 or y.dim() != 4:
        raise ValueError("form='conv' expects NCHW block inputs and outputs")
    stride = max(1, x.shape[-1] // y.shape[-1])
    return GroupedConvLeastSquares(x.shape[1], y.shape[1], stride, conv_kernel, conv_group_channels,
                                   1e-3 if ridge is None else ridge, device=device, r2_mean=conv_r2_mean,
                                   out_hw=(y.shape[-2], y.shape[-1]))


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def resolve_blocks(model: nn.Module, block_names: Sequence[str]) -> list[nn.Module]:
    """The block modules for ``block_names``, after checking the list; raises before any change.

    Errors (one line each): a name that is not a submodule (with close-name suggestions), an empty
    name, duplicates, one name nested inside another, names out of module-registration order, a
    block that is already a :class:`CompensatedBlock`.
    """
    if isinstance(block_names, str):
        raise TypeError(f"block_names must be a list of names, got the string {block_names!r}")
    names = list(block_names)
    if not names:
        raise ValueError("block_names is empty: give the qualified names of the blocks to compensate")
    order: dict[str, int] = {}
    for i, (n, _) in enumerate(model.named_modules(remove_duplicate=False)):
        order.setdefault(n, i)
    for name in names:
        if not isinstance(name, str) or name == "":
            raise ValueError(f"QwT block name {name!r} is not a submodule name (the whole model cannot "
                             "be a block)")
        if name not in order:
            close = difflib.get_close_matches(name, [n for n in order if n], n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else \
                "; list the names with [n for n, _ in model.named_modules()]"
            raise ValueError(f"QwT block {name!r} is not a submodule of {type(model).__name__}{hint}")
    dups = [n for n, c in Counter(names).items() if c > 1]
    if dups:
        raise ValueError(f"QwT block {dups[0]!r} is listed {Counter(names)[dups[0]]} times: give each block once")
    for a in names:
        for b in names:
            if b.startswith(a + "."):
                raise ValueError(f"QwT blocks {a!r} and {b!r} are nested (one inside the other): "
                                 "give non-overlapping blocks")
    for a, b in zip(names, names[1:]):
        if order[b] < order[a]:
            raise ValueError(f"QwT blocks must be in forward order (module registration order): {b!r} "
                             f"is registered before {a!r}")
    blocks = [model.get_submodule(n) for n in names]
    for n, blk in zip(names, blocks):
        if isinstance(blk, CompensatedBlock):
            raise ValueError(f"QwT block {n!r} is already compensated (CompensatedBlock): run QwT once, "
                             "on a freshly quantized model")
    return blocks


def _as_block_input(out: Any, k: int) -> BlockInput:
    if isinstance(out, BlockInput):
        bi = out
    elif isinstance(out, torch.Tensor):
        bi = BlockInput(out)
    else:
        raise TypeError(f"first_block_input returned {type(out).__name__} for calibration batch {k}: "
                        "return a Tensor or a qwt_core.BlockInput")
    if not isinstance(bi.x, torch.Tensor):
        raise TypeError(f"BlockInput.x of calibration batch {k} is a {type(bi.x).__name__}, not a Tensor")
    if not isinstance(bi.block_kwargs, dict):
        raise TypeError(f"BlockInput.block_kwargs of calibration batch {k} must be a dict")
    if bi.row_mask is not None:
        if tuple(bi.row_mask.shape) != tuple(bi.x.shape[:-1]):
            raise ValueError(f"row_mask of calibration batch {k} has shape {tuple(bi.row_mask.shape)}; "
                             f"expected x.shape[:-1] = {tuple(bi.x.shape[:-1])}")
        m = bi.row_mask
        if m.dtype != torch.bool and not bool(((m == 0) | (m == 1)).all()):
            raise ValueError(f"row_mask of calibration batch {k} has values other than 0/1: "
                             "use 1 for real rows and 0 for padding")
    return bi


def _rows_finite(t: torch.Tensor, mask: Optional[torch.Tensor], token: bool) -> torch.Tensor:
    """0-dim bool tensor: every real row of ``t`` is finite (no host sync)."""
    if mask is None or not token:
        return torch.isfinite(t).all()
    ok = torch.isfinite(t).all(dim=-1)
    return (ok | ~mask.to(ok.device, torch.bool)).all()


def _sample_flags(sizes: Sequence[int], period: int) -> list[torch.Tensor]:
    """Per batch, a CPU bool tensor ``(size,)``: held-out samples (global sample index % period == 1)."""
    flags, start = [], 0
    for n in sizes:
        idx = torch.arange(start, start + n)
        flags.append(idx % period == 1)
        start += n
    return flags


@torch.no_grad()
def apply_qwt(model: nn.Module, block_names: Sequence[str], calib_batches: Iterable[Any],
              first_block_input: Callable[[Any], Union[torch.Tensor, BlockInput]],
              transition: Optional[Transition] = None, run_block: Optional[RunBlock] = None,
              form: Literal["token", "conv"] = "token", start_block: int = 0, conv_kernel: int = 1,
              conv_group_channels: int = 64, ridge: Ridge = None,
              store_device: Optional[torch.device | str] = None, progress: bool = True,
              gate: Gate = "holdout", conv_r2_mean: ConvR2Mean = "channel_position",
              holdout_period: int = 4, null_rtol: float = NULL_RTOL,
              ridge_grid: Sequence[float] = RIDGE_GRID, solver: Solver = "auto") -> QwTReport:
    """Add QwT compensation to the blocks of a quantized ``model`` (in place, at the end).

    Args:
        model: the quantized model (quantizers already calibrated).
        block_names: qualified names of the blocks in forward order (``model.get_submodule``).
        calib_batches: iterable of calibration batches (whatever ``first_block_input`` takes); in
            distributed runs each rank passes its own shard, and the moments are all-reduced.
        first_block_input: batch → input of block 0 computed by the quantized model: a Tensor or a
            :class:`BlockInput` (row mask, per-batch block kwargs).
        transition: ``(i, x) → x``, applied to the output of block ``i-1`` before block ``i``.
        run_block: ``(i, block, x, **block_kwargs) → y``; default ``block(x, **block_kwargs)``.
        form: ``"token"`` (channels last, Linear compensation) or ``"conv"`` (NCHW, grouped conv).
        start_block: blocks before this index get no compensation.
        conv_kernel, conv_group_channels: grouped-conv form (k, input channels per group).
        ridge: ``"auto"`` (λ from ``ridge_grid`` × mean feature-covariance eigenvalue, chosen on
            held-out rows; ``gate="holdout"`` only), a float λ, or None: ``"auto"`` for the holdout
            gate, the reference λ (0 for tokens, 1e-3 for conv, on every column) for the insample gate.
        store_device: where the per-batch features are kept between blocks (default: model device).
        progress: show a progress bar (main process only).
        gate: ``"holdout"`` (default: compensate iff held-out R² > 0, refit on all rows) or
            ``"insample"`` (the papers' rule: in-sample R² > 0, reference solver; reproduces them).
        conv_r2_mean: SS_tot of the conv-form R²: ``"channel_position"`` (default, the published
            ResNet code: per-(channel, h, w) mean over samples) or ``"channel"``.
        holdout_period: sample ``s`` (dim 0 index, counted over this process's batches) is held out
            iff ``s % holdout_period == 1``.
        null_rtol: relative eigenvalue threshold of the numerical null space (holdout solver).
        ridge_grid: λ multiples tried by ``ridge="auto"``.
        solver: how each block's least squares is factorised: ``"eigh"`` (one eigen-decomposition per
            system serves the whole λ grid), ``"cholesky"`` (one batched Cholesky per λ, triangular
            solves and GEMMs: no eigen-decomposition, which is slow on GPUs at these sizes; taken only
            where the covariance is certified full rank, so that it gives eigh's solution, else eigh)
            or ``"auto"`` (default: eigh on every device, until Cholesky has been timed on a GPU).
            The block report says which ran.
    Returns:
        A :class:`QwTReport`.
    Raises:
        ValueError/TypeError before anything runs for bad arguments or block names; ValueError naming
        the block for NaN/Inf in a block's input or output. The model is only modified at the end.
    """
    # ---- argument checks: nothing has run yet --------------------------------------------------
    if form not in ("token", "conv"):
        raise ValueError(f"unknown compensation form {form!r}: use 'token' or 'conv'")
    _check_gate_args(gate, ridge)
    device = _model_device(model)
    solver_used = _resolve_solver(solver, device)  # ValueError for an unknown solver
    if conv_r2_mean not in ("channel", "channel_position"):
        raise ValueError(f"conv_r2_mean={conv_r2_mean!r}: use 'channel_position' or 'channel'")
    if not isinstance(holdout_period, int) or holdout_period < 2:
        raise ValueError(f"holdout_period={holdout_period!r}: use an int >= 2")
    if isinstance(calib_batches, torch.Tensor):
        raise TypeError("calib_batches is a single tensor: pass a list of batches, e.g. [x] or "
                        "list(x.split(32))")
    names = list(block_names) if not isinstance(block_names, str) else block_names
    blocks = resolve_blocks(model, names)
    if not isinstance(start_block, int) or not 0 <= start_block <= len(names):
        raise ValueError(f"start_block={start_block!r}: use an int in [0, {len(names)}]")
    run = run_block or _default_run_block
    ref_ridge = None if ridge in (None, "auto") else float(ridge)
    store = torch.device(store_device) if store_device is not None else device
    token = form == "token"
    report = QwTReport(gate=gate, ridge=ridge if ridge is not None else
                       ("auto" if gate == "holdout" else (0.0 if token else 1e-3)), form=form,
                       solver=solver)
    t_start = time.perf_counter()

    # ---- block-0 inputs of every batch ---------------------------------------------------------
    inputs = [_as_block_input(first_block_input(batch), k) for k, batch in enumerate(calib_batches)]
    if not inputs:
        raise ValueError("apply_qwt got no calibration batches: pass a non-empty list of batches")
    if form == "conv":
        for k, bi in enumerate(inputs):
            if bi.x.dim() != 4:
                raise ValueError(f"form='conv' expects NCHW block inputs; batch {k} gives shape "
                                 f"{tuple(bi.x.shape)}")
            if bi.row_mask is not None:
                raise ValueError("row_mask is supported for the token form only")
    xs = [bi.x.detach().to(store) for bi in inputs]
    masks = [None if bi.row_mask is None else bi.row_mask.detach().to(store) for bi in inputs]
    kwargs_list = [bi.block_kwargs for bi in inputs]
    del inputs

    installs: list[tuple[str, nn.Module, nn.Module]] = []
    warned_rows = False
    bar = tqdm(list(enumerate(names)), desc="QwT", disable=not (progress and is_main_process()))
    for i, name in bar:
        t0 = time.perf_counter()
        block = blocks[i]
        if i > 0 and transition is not None:
            xs = [transition(i, x.to(device)).to(store) for x in xs]
            for k, (x, m) in enumerate(zip(xs, masks)):
                if m is not None and tuple(m.shape) != tuple(x.shape[:-1]):
                    raise ValueError(f"QwT block {i} ({name!r}): the transition changed the rows to "
                                     f"{tuple(x.shape[:-1])}, the row_mask of batch {k} is "
                                     f"{tuple(m.shape)}; row masks need transitions that keep the rows")
        compensate = i >= start_block
        flags = _sample_flags([x.shape[0] for x in xs], holdout_period)
        fitter = None
        ys_q: list[torch.Tensor] = []
        for x, m, kw, hv in zip(xs, masks, kwargs_list, flags):
            x_dev = x.to(device)
            y_q = run(i, block, x_dev, **kw) if kw else run(i, block, x_dev)
            if not isinstance(y_q, torch.Tensor):
                raise TypeError(f"QwT block {i} ({names[i]!r}) returned a {type(y_q).__name__}, not a Tensor: "
                                "give a run_block that returns the block's output tensor (e.g. out[0])")
            if compensate:
                with quant_disabled(block):
                    y_fp = run(i, block, x_dev, **kw) if kw else run(i, block, x_dev)
                if fitter is None:
                    fitter = _make_fitter(form, x_dev, y_q, device, conv_kernel, conv_group_channels,
                                          ref_ridge, conv_r2_mean)
                fitter.update(x_dev, y_fp - y_q, mask=None if m is None else m.to(device), heldout=hv)
                del y_fp
            ys_q.append(y_q.to(store))

        fit: Optional[Fit] = None
        if fitter is not None:
            fitter.all_reduce()
            x_ok, y_ok = fitter.finite()
            if not (x_ok and y_ok):
                _raise_non_finite(i, name, xs, ys_q, masks, token, device, input_bad=not x_ok)
            rows_fit, rows_held = fitter.rows((0,)), fitter.rows((1,))
            if gate == "holdout" and (rows_held == 0 or rows_fit == 0):
                raise ValueError(f"QwT block {i} ({name!r}): gate='holdout' needs fit and held-out rows, "
                                 f"got {rows_fit} and {rows_held} (sample s is held out iff "
                                 f"s % {holdout_period} == 1): pass more calibration samples or "
                                 "gate='insample'; the model was not modified")
            if gate == "insample":
                rows_fit += rows_held
            features = fitter.features
            if rows_fit < 10 * features and not warned_rows:
                warned_rows = True
                advice = ("the held-out gate and ridge guard the fit" if gate == "holdout" else
                          "the in-sample R² is unreliable here; consider gate='holdout'")
                warnings.warn(f"QwT block {i} ({name!r}): {rows_fit} fit rows for {features} features "
                              f"(< 10x); {advice}; more calibration samples are advised "
                              "(warned once per run)", stacklevel=3)
            fit = fitter.fit(gate=gate, ridge=ridge, null_rtol=null_rtol, grid=ridge_grid,
                             solver=solver_used)
            if fit.applied:
                compensation = fit.module.to(device)
                installs.append((name, block, compensation))
                ys_q = [(y.to(device) + compensation(x.to(device))).to(store) for x, y in zip(xs, ys_q)]
        else:
            _check_finite_uncompensated(i, name, xs, ys_q, masks, token, device)
        xs = ys_q
        if fit is None:
            rep = BlockReport(index=i, name=name, applied=False, rows=0, seconds=time.perf_counter() - t0)
        else:
            rep = BlockReport(index=i, name=name, applied=fit.applied, rows=fit.rows, r2=fit.r2,
                              r2_insample=fit.r2_insample, r2_heldout=fit.r2_heldout, ridge=fit.ridge,
                              mse_before=fit.mse_before, mse_after=fit.mse_after,
                              rank_deficiency=fit.rank_deficiency, seconds=time.perf_counter() - t0,
                              rows_heldout=fit.rows_heldout, ridge_rel=fit.ridge_rel, solver=fit.solver)
            bar.set_postfix(block=name, r2=f"{fit.r2:.3f}" if fit.r2 is not None else "-")
        report.blocks.append(rep)
    # ---- every block fitted: now (and only now) modify the model --------------------------------
    for name, block, compensation in installs:
        model.set_submodule(name, CompensatedBlock(block, compensation))
    report.seconds = time.perf_counter() - t_start
    return report


def _any_bad(tensors: Sequence[torch.Tensor], masks: Sequence[Optional[torch.Tensor]], token: bool,
             device: torch.device) -> bool:
    """True if any real row of any tensor is not finite, on any rank (one all-reduce on ``device``)."""
    bad = torch.zeros((), dtype=torch.float64, device=device)
    for t, m in zip(tensors, masks):
        bad = bad + (~_rows_finite(t, m, token)).to(device, torch.float64)
    return bool(all_reduce_sum(bad) > 0)


def _raise_non_finite(i: int, name: str, xs, ys_q, masks, token: bool, device: torch.device,
                      input_bad: bool) -> None:
    """The moments of block ``i`` are not finite: find out where and raise (all ranks agree)."""
    if input_bad or _any_bad(xs, masks, token, device):
        where = "input (output of the previous block, or first_block_input for block 0)"
    elif _any_bad(ys_q, masks, token, device):
        where = "quantized output"
    else:
        where = "full-precision output (quantization off inside the block)"
    raise ValueError(f"NaN/Inf in the {where} of QwT block {i} ({name!r}) on real rows; the model was "
                     "not modified")


def _check_finite_uncompensated(i: int, name: str, xs, ys_q, masks, token: bool,
                                device: torch.device) -> None:
    if i == 0 and _any_bad(xs, masks, token, device):
        raise ValueError(f"NaN/Inf in the input of QwT block 0 ({name!r}) on real rows (from "
                         "first_block_input); the model was not modified")
    if _any_bad(ys_q, masks, token, device):
        raise ValueError(f"NaN/Inf in the quantized output of QwT block {i} ({name!r}) on real rows; "
                         "the model was not modified")
