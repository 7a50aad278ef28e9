"""Configs: frozen dataclasses that validate on construction and round-trip through a dict.

* :class:`QuantConfig` — what :func:`qwt_core.quantize` builds: bits and the adapter options.
* :class:`QwTConfig` — how :func:`qwt_core.compensate` fits and gates each block's compensation.
* :class:`ExportConfig` — how :func:`qwt_core.export_onnx` writes the int8 graph.

Every config has ``to_dict()`` / ``from_dict()`` (JSON friendly, ``from_dict(c.to_dict()) == c``)
and ``replace(**changes)`` (a new, validated config). An impossible combination raises a one-line
``ValueError`` when the config is built, before any model is touched::

    QwTConfig(gate="insample", ridge="auto")   # ValueError: ridge='auto' is chosen on held-out rows ...
    cfg = QwTConfig()                          # held-out gate, ridge chosen on held-out rows
    cfg.replace(gate="insample")               # the papers' rule with the published λ ("paper")
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional, TypeVar, Union, get_args

from .compensation import NULL_RTOL, RIDGE_GRID
from .quantizers import validate_bits

Gate = Literal["holdout", "insample"]
Solver = Literal["auto", "eigh", "cholesky"]
ConvR2Mean = Literal["channel_position", "channel"]
#: ``"auto"``: λ chosen on held-out rows (held-out gate only); ``"paper"``: the published λ of the
#: block form (0 for token blocks, 1e-3 for conv blocks); or a float λ ≥ 0.
RidgeSpec = Union[Literal["auto", "paper"], float]
ActMode = Literal["reference8", "true"]
Recipe = Literal["published", "folded"]
Compensation = Literal["fp32", "int8"]
WeightDtype = Literal["auto", "int8", "portable"]

C = TypeVar("C", bound="_Config")


def _choice(name: str, value: Any, allowed: tuple, optional: bool = False) -> None:
    if optional and value is None:
        return
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: use one of {', '.join(repr(a) for a in allowed)}")


def _int(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name}={value!r}: use an int >= {lo}")


class _Config:
    """``to_dict`` / ``from_dict`` / ``replace`` shared by the configs."""

    config_name: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly dict (tuples as lists), with ``"config": <name>``."""
        out: dict[str, Any] = {"config": self.config_name}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        """The config ``to_dict`` wrote; unknown keys raise ``ValueError`` naming them."""
        d = dict(d)
        name = d.pop("config", cls.config_name)
        if name != cls.config_name:
            raise ValueError(f"this is a {name!r} config, not a {cls.config_name!r} one")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid: {sorted(names)}")
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if isinstance(d.get(f.name), list):
                d[f.name] = tuple(d[f.name])
        return cls(**d)

    label: ClassVar[str] = ""

    def _check_names(self, changes: dict[str, Any]) -> None:
        names = [f.name for f in dataclasses.fields(self)]  # type: ignore[arg-type]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise TypeError(f"unknown {self.label} option(s) {unknown}; valid: {', '.join(names)}")

    def replace(self: C, **changes: Any) -> C:
        """A new config with ``changes`` applied (validated like a new one)."""
        self._check_names(changes)
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class QuantConfig(_Config):
    """What to quantize and how (:func:`qwt_core.quantize`).

    Attributes:
        w_bits, a_bits: 2..8 (the adapters keep their published 8-bit layers: patch embedding,
            heads, ResNet stem and fc).
        integer_zero_point: round the reparameterized LayerNorm zero points (exact
            reparameterization; the reference keeps them fractional) — used by ``calibrate``.
        act_mode: ResNet adapters: ``"reference8"`` (every conv input at 8 bits, as the published
            code runs) or ``"true"`` (inputs at ``a_bits``); None = the adapter's default.
        recipe: ResNet adapters: ``"published"`` (BatchNorm kept) or ``"folded"``; None = default.
        quant_attn_matmul: CLIP towers: also quantize the attention products; None = default (off).
        kind: Hugging Face adapter: ``"auto"``, ``"encoder"`` or ``"decoder"``; None = ``"auto"``.
    """

    config_name: ClassVar[str] = "quant"
    label: ClassVar[str] = "quantization"
    w_bits: int = 4
    a_bits: int = 4
    integer_zero_point: bool = False
    act_mode: Optional[ActMode] = None
    recipe: Optional[Recipe] = None
    quant_attn_matmul: Optional[bool] = None
    kind: Optional[str] = None

    def __post_init__(self) -> None:
        validate_bits(self.w_bits, "w_bits")
        validate_bits(self.a_bits, "a_bits")
        _choice("act_mode", self.act_mode, get_args(ActMode), optional=True)
        _choice("recipe", self.recipe, get_args(Recipe), optional=True)
        _choice("kind", self.kind, ("auto", "encoder", "decoder"), optional=True)
        for name in ("integer_zero_point",):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}: use True or False")
        if self.quant_attn_matmul is not None and not isinstance(self.quant_attn_matmul, bool):
            raise ValueError(f"quant_attn_matmul={self.quant_attn_matmul!r}: use True, False or None")

    def adapter_options(self) -> dict[str, Any]:
        """The adapter options that were set (None = the adapter's default), by adapter argument name."""
        opts = {"act_mode": self.act_mode, "recipe": self.recipe, "quant_attn_matmul": self.quant_attn_matmul,
                "kind": self.kind}
        return {k: v for k, v in opts.items() if v is not None}


@dataclass(frozen=True)
class QwTConfig(_Config):
    """How QwT fits and gates each block's compensation (:func:`qwt_core.compensate`).

    Attributes:
        gate: ``"holdout"`` (default: a block is compensated only if its fit explains held-out
            calibration rows better than nothing) or ``"insample"`` (the papers' rule: in-sample R² > 0).
        ridge: ``"auto"`` (λ chosen on the held-out rows; held-out gate only), ``"paper"`` (the
            published λ of the block form: 0 for token blocks, 1e-3 for conv blocks) or a float
            λ ≥ 0. None when building means the gate's natural choice (``"auto"`` for holdout,
            ``"paper"`` for insample) and is stored as that, so a saved config is explicit.
        solver: least-squares factorisation, ``"auto"`` (eigh), ``"eigh"`` or ``"cholesky"``.
        start_block: blocks before this index get no compensation.
        conv_kernel, conv_group_channels: the grouped-conv form (CNN blocks): k and input channels
            per group (``groups = C_in // conv_group_channels``).
        conv_r2_mean: SS_tot of the conv-form R² (``"channel_position"`` as the published ResNet code).
        holdout_period: sample ``s`` is held out iff ``s % holdout_period == 1``.
        ridge_grid: λ multiples tried by ``ridge="auto"``.
        null_rtol: relative eigenvalue threshold of the numerical null space.
    """

    config_name: ClassVar[str] = "qwt"
    label: ClassVar[str] = "QwT"
    gate: Gate = "holdout"
    ridge: Optional[RidgeSpec] = None
    solver: Solver = "auto"
    start_block: int = 0
    conv_kernel: int = 1
    conv_group_channels: int = 64
    conv_r2_mean: ConvR2Mean = "channel_position"
    holdout_period: int = 4
    ridge_grid: tuple[float, ...] = RIDGE_GRID
    null_rtol: float = NULL_RTOL

    def __post_init__(self) -> None:
        _choice("gate", self.gate, get_args(Gate))
        if self.ridge is None:
            object.__setattr__(self, "ridge", "auto" if self.gate == "holdout" else "paper")
        r = self.ridge
        if r not in ("auto", "paper"):
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r < 0:
                raise ValueError(f"ridge={r!r}: use 'auto', 'paper' or a finite float >= 0")
            object.__setattr__(self, "ridge", float(r))
        if self.gate == "insample" and self.ridge == "auto":
            raise ValueError("ridge='auto' is chosen on held-out rows: use gate='holdout', or with "
                             "gate='insample' ridge='paper' or a float")
        _choice("solver", self.solver, get_args(Solver))
        _choice("conv_r2_mean", self.conv_r2_mean, get_args(ConvR2Mean))
        _int("start_block", self.start_block, 0)
        _int("conv_kernel", self.conv_kernel, 1)
        if self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel={self.conv_kernel}: use an odd kernel size (1, 3, ...)")
        _int("conv_group_channels", self.conv_group_channels, 1)
        _int("holdout_period", self.holdout_period, 2)
        grid = tuple(float(v) for v in self.ridge_grid)
        if not grid or any(not math.isfinite(v) or v < 0 for v in grid):
            raise ValueError(f"ridge_grid={self.ridge_grid!r}: use a non-empty sequence of floats >= 0")
        object.__setattr__(self, "ridge_grid", grid)
        if not (isinstance(self.null_rtol, (int, float)) and 0 < self.null_rtol < 1):
            raise ValueError(f"null_rtol={self.null_rtol!r}: use a float in (0, 1)")

    def replace(self, **changes: Any) -> "QwTConfig":
        """A new config with ``changes``; a new ``gate`` without a ``ridge`` takes that gate's
        natural ridge (``"auto"`` / ``"paper"``) rather than the old gate's."""
        self._check_names(changes)
        if "gate" in changes and "ridge" not in changes and changes["gate"] != self.gate:
            changes["ridge"] = None
        return dataclasses.replace(self, **changes)

    def engine_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the block engine (:mod:`qwt_core.qwt`)."""
        return {"gate": self.gate, "ridge": None if self.ridge == "paper" else self.ridge,
                "solver": self.solver, "start_block": self.start_block, "conv_kernel": self.conv_kernel,
                "conv_group_channels": self.conv_group_channels, "conv_r2_mean": self.conv_r2_mean,
                "holdout_period": self.holdout_period, "ridge_grid": self.ridge_grid,
                "null_rtol": self.null_rtol}


@dataclass(frozen=True)
class ExportConfig(_Config):
    """How :func:`qwt_core.export_onnx` writes the ONNX QDQ graph.

    Attributes:
        compensation: ``"fp32"`` (QwT compensation Linears stay float) or ``"int8"`` (W8A8 QDQ,
            calibrated on the ``calib_images`` given to ``export_onnx``).
        weight_dtype: ``"auto"`` (``"int8"`` where the exporting CPU has AVX-512 VNNI, AVX-VNNI or
            AMX, else ``"portable"``), ``"int8"`` (full-range int8 weights: exact and fast on those
            CPUs) or ``"portable"`` (int8 only within ±64, else uint8: exact on every x86 CPU).
        round_zero_points: round fractional activation zero points instead of refusing.
        dynamic_batch: batch dim symbolic in the graph.
        check: run onnxruntime on the written file and count its integer kernels.
        threads: onnxruntime threads for the check.
    """

    config_name: ClassVar[str] = "export"
    label: ClassVar[str] = "export"
    compensation: Compensation = "fp32"
    weight_dtype: WeightDtype = "auto"
    round_zero_points: bool = False
    dynamic_batch: bool = True
    check: bool = True
    threads: int = 2

    def __post_init__(self) -> None:
        _choice("compensation", self.compensation, get_args(Compensation))
        _choice("weight_dtype", self.weight_dtype, get_args(WeightDtype))
        for name in ("round_zero_points", "dynamic_batch", "check"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}: use True or False")
        _int("threads", self.threads, 1)
