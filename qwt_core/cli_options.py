"""The QwT gate/ridge (and fused fake-quant) command-line options shared by the repository's scripts.

``add_qwt_arguments(parser)`` adds ``--qwt_gate {holdout,insample}`` and ``--qwt_ridge {auto,FLOAT}``
(also spelled ``--qwt-gate`` / ``--qwt-ridge``); both default to None = "the adapter's recipe". Then
``qwt_overrides(args.qwt_gate, args.qwt_ridge, default_gate)`` gives the keyword arguments for
:func:`qwt_core.compensate` / :func:`qwt_core.qwt.apply_qwt`:

* no flag: ``{}`` (the adapter's ``qwt_kwargs``, else the engine default ``gate="holdout"``, ``ridge="auto"``);
* ``--qwt_gate G`` alone: ``gate=G`` with the engine's ridge for that gate (``"auto"`` for holdout, the
  reference λ - 0 for token blocks, 1e-3 for conv blocks - for insample), whatever ridge the adapter set;
* ``--qwt_ridge R``: ``ridge=R`` on top of the chosen (or the adapter's) gate.

``--qwt_gate insample`` (no ridge) is the papers' rule. ``--qwt_ridge auto`` needs the holdout gate.
``--qwt_solver {auto,eigh,cholesky}`` (default None = ``auto`` = eigh) picks
the least-squares factorisation; both give the same fit (see :mod:`qwt_core.compensation`).
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

if TYPE_CHECKING:
    from torch import nn

GATES = ("holdout", "insample")
SOLVERS = ("auto", "eigh", "cholesky")


def parse_ridge(value: str) -> Union[float, str]:
    """argparse ``type`` of ``--qwt_ridge``: ``"auto"`` or a finite float >= 0."""
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        lam = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not 'auto' or a number >= 0") from None
    if not math.isfinite(lam) or lam < 0:
        raise argparse.ArgumentTypeError(f"{value!r}: the ridge λ must be a finite number >= 0")
    return lam


def add_qwt_arguments(parser: argparse.ArgumentParser,
                      gate_flags: Sequence[str] = ("--qwt_gate", "--qwt-gate"),
                      ridge_flags: Sequence[str] = ("--qwt_ridge", "--qwt-ridge"),
                      default_note: str = "the adapter's recipe: holdout for token blocks") -> None:
    """Add ``--qwt_gate`` (dest ``qwt_gate``), ``--qwt_ridge`` (dest ``qwt_ridge``) and ``--qwt_solver``
    (dest ``qwt_solver``), default None."""
    parser.add_argument(*gate_flags, dest="qwt_gate", choices=list(GATES), default=None,
                        help=f"QwT gate: holdout (compensate a block iff its held-out R² > 0, λ chosen on "
                             f"held-out rows) or insample (the papers' rule: in-sample R² > 0); default: "
                             f"{default_note}")
    parser.add_argument(*ridge_flags, dest="qwt_ridge", type=parse_ridge, default=None, metavar="{auto,FLOAT}",
                        help="QwT ridge λ: 'auto' (holdout gate only) or a number >= 0; default: 'auto' "
                             "with the holdout gate, the reference λ (0 for token blocks, 1e-3 for conv "
                             "blocks) with insample")
    add_solver_argument(parser)


def add_solver_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--qwt_solver`` / ``--qwt-solver`` (dest ``qwt_solver``, auto|eigh|cholesky, default None)."""
    parser.add_argument("--qwt_solver", "--qwt-solver", dest="qwt_solver", choices=list(SOLVERS), default=None,
                        help="QwT least-squares factorisation: eigh, cholesky (batched factorisations and "
                             "GEMMs, no eigendecomposition; used only where it provably gives eigh's fit) "
                             "or auto (default: eigh)")


def qwt_overrides(gate: Optional[str], ridge: Union[float, str, None],
                  default_gate: str = "holdout", solver: Optional[str] = None) -> dict[str, Any]:
    """The ``compensate`` keyword arguments for the flags (see the module docstring).

    ``default_gate``: the gate used when ``--qwt_gate`` is not given (the adapter's, e.g. ``insample``
    for the published ResNet recipe). ``solver``: ``--qwt_solver`` (None: the engine's ``auto``).
    Raises ``ValueError`` for ``ridge="auto"`` with the insample gate or an unknown gate/solver.
    """
    if gate is not None and gate not in GATES:
        raise ValueError(f"--qwt_gate {gate!r}: use holdout or insample")
    if solver is not None and solver not in SOLVERS:
        raise ValueError(f"--qwt_solver {solver!r}: use auto, eigh or cholesky")
    out: dict[str, Any] = {} if solver is None else {"solver": solver}
    if gate is not None:
        out["gate"] = gate
        out["ridge"] = "auto" if gate == "holdout" else None
    if ridge is not None:
        out["ridge"] = ridge
    effective = gate or default_gate
    if effective == "insample" and out.get("ridge") == "auto":
        raise ValueError("--qwt_ridge auto picks λ on held-out rows and needs --qwt_gate holdout"
                         + ("" if gate else f" (this model's default gate is {default_gate})"))
    return out


def add_speed_arguments(parser: argparse.ArgumentParser, compile_model: bool = False) -> None:
    """Add ``--fused_fake_quant`` (dest ``fused_fake_quant``, default False); with ``compile_model`` also
    ``--compile_model`` (dest ``compile_model``, default False: evaluate through
    :func:`compiled_for_eval`) for the command lines that honour it."""
    parser.add_argument("--fused_fake_quant", "--fused-fake-quant", dest="fused_fake_quant",
                        action="store_true",
                        help="fake quantization through torch.compile-fused kernels (same values; faster "
                             "calibration, evaluation and QwT on long runs; compiling costs tens of seconds "
                             "once per process and needs a C++ compiler on CPU)")
    if compile_model:
        parser.add_argument("--compile_model", "--compile-model", dest="compile_model", action="store_true",
                            help="evaluate through torch.compile of the whole model (inductor, one graph): "
                                 "faster evaluation on long runs (ResNet-50 W4A4+QwT on CPU: 0.8x the eager FP "
                                 "forward), but not bit for bit: inductor's fused LayerNorm / softmax / GELU "
                                 "round differently and move a few values across quantization boundaries; "
                                 "compiling costs tens of seconds per model and batch shape (in the "
                                 "evaluation time) and needs a C++ compiler on CPU")


def apply_speed_arguments(args: argparse.Namespace, device: Optional[str] = None) -> bool:
    """Switch fused fake quantization on if ``args.fused_fake_quant``; returns the setting.

    Raises ``SystemExit`` with one line, before anything runs, when inductor would need a C++
    compiler that is not on ``PATH`` (a CPU run): torch.compile would otherwise fail mid-run.
    """
    from .quantizers import set_fused_fake_quant

    on = bool(getattr(args, "fused_fake_quant", False))
    cpu = device is None or not str(device).startswith("cuda")
    compiling = [f for f in ("fused_fake_quant", "compile_model") if getattr(args, f, False)]
    if compiling and cpu:
        cxx = os.environ.get("CXX") or "g++"
        if not any(shutil.which(c) for c in (cxx, "g++", "c++", "clang++")):
            raise SystemExit(f"error: --{compiling[0]} compiles CPU kernels with torch.compile, which needs a "
                             "C++ compiler (g++ or clang++) on PATH: install one or drop the flag")
    set_fused_fake_quant(on)
    return on


def compiled_for_eval(model: nn.Module, enabled: bool = True) -> nn.Module:
    """``torch.compile(model, dynamic=False)`` when ``enabled`` (``--compile_model``), else ``model``.

    A calibrated quantized model compiles into one graph (its caches step aside while compiling;
    tested), and each batch shape compiles once on first use. The compiled module shares the model's
    parameters and buffers; the model itself is unchanged and still runs eagerly.
    """
    import torch

    return torch.compile(model, dynamic=False) if enabled else model


def malloc_tunables() -> str | None:
    """The process's ``GLIBC_TUNABLES`` (how the launcher tuned the C allocator), for the JSON."""
    return os.environ.get("GLIBC_TUNABLES")
