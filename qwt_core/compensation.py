"""Closed-form QwT compensation: streaming least squares, the held-out gate and the compensation layers.

The targets are ``Y = block_fp(X) - block_q(X)``. Instead of stacking every calibration token, the
moments ``AᵀA``, ``AᵀY`` and ``YᵀY`` of ``A = [X, 1]`` are accumulated batch by batch in float64
(memory ``O(d²)``) and all-reduced across ranks. Every row goes to one of two parts, *fit* (part 0)
or *held-out* (part 1); the engine decides which (see :func:`qwt_core.qwt.apply_qwt`). Both parts
together are all the rows, so a held-out split costs no extra pass, only a second set of moments.

Two solvers:

* the **reference** solver (``gate="insample"``, what the papers do): ``(AᵀA + λI)Θ = AᵀY`` on all
  rows by Cholesky (λ on every column including the intercept; a growing jitter only if ``AᵀA`` is
  not positive definite), compensate when the in-sample R² > 0;
* the **held-out** solver (``gate="holdout"``, the default): centred features, the eigen-decomposition
  of their covariance, directions whose eigenvalue is ``<= null_rtol · max eigenvalue`` dropped
  (minimum-norm solution: no weight along directions the data never excites), a ridge λ on the
  weights only (the intercept is never shrunk). λ is picked from a grid by the validation residual
  (a quadratic form in Θ of the held-out moments); the block is compensated only if the held-out
  R² > 0; the final Θ is refit on all rows with the chosen λ.

The held-out solver has two factorisations of the same mathematics (``solver``): ``"eigh"`` (one
eigen-decomposition serves the whole λ grid; the CPU default) and ``"cholesky"`` (one batched
Cholesky factorisation per λ, triangular solves and GEMMs only; the CUDA default, where ``eigh`` of a
few hundred columns is latency-bound and its batched form - the grouped conv fitter - loops over
the groups). ``"cholesky"`` runs only when it provably gives ``"eigh"``'s answer: features that
never vary (dead ReLU channels) are set aside with weight 0 (:func:`_deflate_dead`), and every
remaining centred covariance must be certified free of the null directions ``"eigh"`` would drop
(:func:`_certified_groups`); the groups that cannot be certified are solved by ``"eigh"``
(``"mixed"``: :class:`_SplitSystem`; all of them: ``"eigh"``). The in-sample gate (a Cholesky solve
in any case) counts null directions with the same certificate and computes eigenvalues only for
the groups it cannot certify (``"mixed"`` too).

* :class:`TokenLeastSquares` - one Linear over the last dim (ViT/DeiT/Swin/CLIP tokens).
* :class:`GroupedConvLeastSquares` - one grouped k×k conv (ResNet blocks), solved per group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Union, get_args

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_reduce_sum

#: ridge grid of the held-out gate, as multiples of the mean eigenvalue of the centred feature
#: covariance (``trace(Cxx)/d``) of the rows being fitted.
RIDGE_GRID: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
#: eigenvalues of the centred feature covariance ``<= NULL_RTOL · max eigenvalue`` count as the
#: numerical null space (directions the calibration data never excites).
NULL_RTOL: float = 1e-10

Gate = Literal["holdout", "insample"]
Solver = Literal["auto", "eigh", "cholesky"]
#: the Cholesky path is taken when every centred covariance is proved to have its smallest eigenvalue
#: above ``CERT_MARGIN · null_rtol · trace`` (``trace`` >= the largest eigenvalue): no direction is
#: then dropped by the ``eigh`` path, whose rounding is far below this margin.
CERT_MARGIN: float = 10.0
Ridge = Union[float, Literal["auto"], None]
ConvR2Mean = Literal["channel", "channel_position"]


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


def _r2(ss_res: float, ss_tot: float) -> float:
    if ss_tot <= 0:
        return float("-inf") if ss_res > 0 else 0.0
    return 1.0 - ss_res / ss_tot


@dataclass
class Stats:
    """Moments of one set of rows (fit, held-out or all), batched over ``G`` groups.

    ata: ``(G, D, D)`` with the constant column last (``D = features + 1``); aty: ``(G, D, m)``;
    yy: ``Σ y²`` over all groups; ss_tot: ``Σ (y - mean)²`` with the fitter's mean; rows: real rows
    (per group).
    """

    ata: torch.Tensor
    aty: torch.Tensor
    yy: torch.Tensor
    ss_tot: torch.Tensor
    rows: int

    def ss_res(self, theta: torch.Tensor) -> float:
        """``Σ (y - AΘ)²`` of these rows for ``theta`` ``(G, D, m)``: a quadratic form of the moments."""
        return float(self.yy - 2 * (theta * self.aty).sum() + (theta * (self.ata @ theta)).sum())

    def r2(self, theta: torch.Tensor) -> float:
        return _r2(self.ss_res(theta), float(self.ss_tot))


class _CentredSystem:
    """Least squares with a free intercept on centred features, via ``eigh`` of their covariance.

    For ``λ`` ``(G,)``: ``W = Σ_{e_i > tol} v_i v_iᵀ Cxy / (e_i + λ)``, ``b = ȳ - μᵀW``; directions
    with ``e_i <= null_rtol · e_max`` get no weight (minimum norm), the intercept is never shrunk.
    """

    def __init__(self, ata: torch.Tensor, aty: torch.Tensor, null_rtol: float) -> None:
        self.mu, self.ybar, cxx, cxy = _centre(ata, aty)
        e, v = torch.linalg.eigh(cxx)
        e_max = e[:, -1:].clamp_min(0.0)
        self.keep = (e > null_rtol * e_max) & (e_max > 0)
        self.e, self.v = e, v
        self.z = v.transpose(1, 2) @ cxy                      # (G, d, m)
        self.scale = e.clamp_min(0.0).mean(-1)                # (G,) mean eigenvalue = trace(Cxx)/d
        self.rank_deficiency = int((~self.keep).sum())

    def heldout_ss_res(self, val: Stats, lams: Sequence[torch.Tensor]) -> list[float]:
        """``Σ (y - AΘ(λ))²`` over the rows of ``val`` for each ``λ`` ``(G,)`` in ``lams``.

        In the eigenbasis of the fit rows' covariance the residual is a quadratic in the
        per-direction factors ``f_i = 1/(e_i + λ)``: with the held-out moments centred on the fit
        means (``Sxx``, ``Sxy``, ``Syy``), ``P = VᵀSxxV``, ``Q = ZZᵀ`` and ``h_i = Σ_k Z_ik (VᵀSxy)_ik``,
        ``ss(λ) = Syy - 2 f·h + fᵀ(P∘Q)f``. Four GEMMs of size ``d²·max(d, m)`` serve the whole grid;
        each λ then costs ``O(d²)``, instead of two such GEMMs per λ (:meth:`theta` and
        :meth:`Stats.ss_res`).
        """
        sxx, sxy, syy = _centred_on(val, self.mu, self.ybar)
        vt = self.v.transpose(1, 2)
        h = (self.z * (vt @ sxy)).sum(-1)                         # (G, d)
        pq = (vt @ sxx @ self.v) * (self.z @ self.z.transpose(1, 2))  # (G, d, d)
        out = []
        for lam in lams:
            f = self._factors(lam)                                # (G, d)
            quad = (f[:, None, :] @ pq @ f[:, :, None]).sum()
            out.append(float(syy - 2 * (f * h).sum() + quad))
        return out

    def _factors(self, lam: torch.Tensor) -> torch.Tensor:
        """``(G, d)``: ``1/(e_i + λ)`` on the kept directions, 0 on the null space."""
        denom = torch.where(self.keep, self.e + lam[:, None], torch.ones_like(self.e))
        return torch.where(self.keep, 1.0 / denom, torch.zeros_like(self.e))

    def theta(self, lam: torch.Tensor) -> torch.Tensor:
        """``(G, D, m)`` solution for the per-group ridge ``lam`` ``(G,)``."""
        f = self._factors(lam)
        w = self.v @ (f[:, :, None] * self.z)                 # (G, d, m)
        b = self.ybar - (self.mu[:, None, :] @ w).squeeze(1)  # (G, m)
        return torch.cat([w, b[:, None, :]], dim=1)


def _centred_cov(ata: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(n (G,), mu (G, d), Cxx (G, d, d) symmetrised)`` of ``AᵀA`` with the constant column last:
    row count, feature means and the centred feature covariance sum."""
    d = ata.shape[-1] - 1
    n = ata[:, d, d]
    mu = ata[:, :d, d] / n.clamp_min(1e-30)[:, None]
    cxx = ata[:, :d, :d] - n[:, None, None] * mu[:, :, None] * mu[:, None, :]
    return n, mu, 0.5 * (cxx + cxx.transpose(1, 2))


def _centre(ata: torch.Tensor, aty: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mu (G, d), ybar (G, m), Cxx (G, d, d) symmetrised, Cxy (G, d, m))`` of moments with the
    constant column last: means and centred (co)variance sums of the rows."""
    d = ata.shape[-1] - 1
    n, mu, cxx = _centred_cov(ata)
    ybar = aty[:, d, :] / n.clamp_min(1e-30)[:, None]
    cxy = aty[:, :d, :] - n[:, None, None] * mu[:, :, None] * ybar[:, None, :]
    return mu, ybar, cxx, cxy


def _centred_on(val: Stats, mu: torch.Tensor, ybar: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Sxx (G, d, d), Sxy (G, d, m), Syy ())``: the moments of ``val``'s rows centred on another
    set's means ``mu`` ``(G, d)``, ``ybar`` ``(G, m)`` (the held-out residual of a fit with intercept
    ``ybar - muᵀW`` is ``Syy - 2<W, Sxy> + <W, Sxx W>``)."""
    d = mu.shape[-1]
    ata, aty = val.ata, val.aty
    n = ata[:, d, d]                                          # (G,)
    sx, sy = ata[:, :d, d], aty[:, d, :]                      # (G, d), (G, m)
    sxx = (ata[:, :d, :d] - mu[:, :, None] * sx[:, None, :] - sx[:, :, None] * mu[:, None, :]
           + n[:, None, None] * mu[:, :, None] * mu[:, None, :])
    sxy = (aty[:, :d, :] - mu[:, :, None] * sy[:, None, :] - sx[:, :, None] * ybar[:, None, :]
           + n[:, None, None] * mu[:, :, None] * ybar[:, None, :])
    syy = val.yy - 2 * (ybar * sy).sum() + (n * ybar.pow(2).sum(-1)).sum()
    return sxx, sxy, syy


def _certified_groups(cxx: torch.Tensor, null_rtol: float) -> torch.Tensor:
    """``(G,)`` bool: True where no eigenvalue of ``cxx[g]`` (symmetric PSD) is ``<= null_rtol · e_max``,
    proved without an eigen-decomposition: the Cholesky factorisation of ``Cxx - τI`` completes, with
    ``τ = (CERT_MARGIN · null_rtol + 2·d²·u) · trace(Cxx)`` (``u`` the unit roundoff). A completed
    factorisation of a symmetric ``M`` is the exact one of ``M + ΔM`` with ``|ΔM| <= γ_{d+1}|Lᵀ||L|``,
    hence ``‖ΔM‖₂ ≲ d·γ_{d+1}·‖M‖₂ ≈ d²·u·‖M‖₂`` (the backward error of Cholesky: Higham, *Accuracy and
    Stability of Numerical Algorithms*, 2nd ed., §10.1), so
    ``e_min(Cxx) >= τ - d²·u·trace >= CERT_MARGIN · null_rtol · trace``, and ``trace(Cxx) >= e_max``.
    False where not proved (some direction within about 10× of the null threshold). No host read."""
    d = cxx.shape[-1]
    trace = torch.diagonal(cxx, dim1=-2, dim2=-1).sum(-1)               # (G,) >= e_max
    unit = torch.finfo(cxx.dtype).eps / 2
    tau = (CERT_MARGIN * null_rtol + 2.0 * d * d * unit) * trace
    eye = torch.eye(d, dtype=cxx.dtype, device=cxx.device)
    _, info = torch.linalg.cholesky_ex(cxx - tau[:, None, None] * eye)
    return (info == 0) & (trace > 0) & torch.isfinite(trace)


def _certified_full_rank(cxx: torch.Tensor, null_rtol: float) -> bool:
    """:func:`_certified_groups` for every group (one host read)."""
    return bool(_certified_groups(cxx, null_rtol).all())


def _deflate_dead(cxx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Cxx', k (G,))``: features that never vary (a dead ReLU channel: an exactly zero row and
    column of the centred covariance, and of ``Cxy``) get a unit-scale diagonal entry instead of 0, so
    that the remaining matrix can be certified and factorised with its shape kept; their weight solves
    ``(c + λ)·w = 0``, i.e. 0, as on ``eigh``'s null space. ``k``: how many per group. No host read."""
    diag = torch.diagonal(cxx, dim1=-2, dim2=-1)
    dead = diag == 0
    fill = diag.sum(-1) / (~dead).sum(-1).clamp_min(1)       # (G,) mean variance of the live features
    fill = torch.where(fill > 0, fill, torch.ones_like(fill))
    return cxx + torch.diag_embed(dead.to(cxx.dtype) * fill[:, None]), dead.sum(-1)


class _CholeskySystem:
    """:class:`_CentredSystem`'s solutions by Cholesky factorisations (one per λ, batched), for
    covariances certified full rank (:func:`_certified_full_rank`) once features that never vary are
    set aside (:func:`_deflate_dead`): then ``eigh`` drops exactly those directions, and
    ``W(λ) = (Cxx + λI)⁻¹ Cxy`` (zero on the dead features), ``b = ȳ - μᵀW`` is the same solution.
    Only batched factorisations, triangular solves and GEMMs: no eigen-decomposition (slow on GPUs at
    these sizes)."""

    def __init__(self, ata: torch.Tensor, aty: torch.Tensor) -> None:
        self.mu, self.ybar, cxx, self.cxy = _centre(ata, aty)
        d = cxx.shape[-1]
        self.scale = torch.diagonal(cxx, dim1=-2, dim2=-1).sum(-1) / d  # (G,) trace(Cxx)/d
        self.cxx, dead = _deflate_dead(cxx)
        self.rank_deficiency = int(dead.sum())

    def weights(self, lams: torch.Tensor) -> torch.Tensor:
        """``(J, G, d, m)``: ``W`` for each row of ``lams`` ``(J, G)``."""
        d = self.cxx.shape[-1]
        eye = torch.eye(d, dtype=self.cxx.dtype, device=self.cxx.device)
        mats = self.cxx[None] + lams[:, :, None, None] * eye
        chol, info = torch.linalg.cholesky_ex(mats)
        if bool(info.any()):  # cannot happen for certified Cxx and λ >= 0; never silently wrong
            raise RuntimeError("QwT Cholesky solve: a certified covariance plus λ·I did not factorise; "
                               "pass solver='eigh'")
        rhs = self.cxy[None].expand(lams.shape[0], *self.cxy.shape)
        z = torch.linalg.solve_triangular(chol, rhs, upper=False)
        return torch.linalg.solve_triangular(chol.transpose(-2, -1), z, upper=True)

    def heldout_ss_res(self, val: Stats, lams: Sequence[torch.Tensor]) -> list[float]:
        """``Σ (y - AΘ(λ))²`` over the rows of ``val`` for each ``λ`` ``(G,)`` in ``lams`` (one host
        read for the whole grid)."""
        sxx, sxy, syy = _centred_on(val, self.mu, self.ybar)
        w = self.weights(torch.stack(list(lams)))                  # (J, G, d, m)
        ss = syy - 2 * (w * sxy).sum((1, 2, 3)) + (w * (sxx @ w)).sum((1, 2, 3))
        return ss.tolist()

    def theta(self, lam: torch.Tensor) -> torch.Tensor:
        """``(G, D, m)`` solution for the per-group ridge ``lam`` ``(G,)``."""
        w = self.weights(lam[None])[0]
        b = self.ybar - (self.mu[:, None, :] @ w).squeeze(1)
        return torch.cat([w, b[:, None, :]], dim=1)


class _SplitSystem:
    """Per group the Cholesky system where it is certified (``ok``) and the ``eigh`` one elsewhere:
    the held-out residual sums and the solutions of :class:`_CentredSystem` with eigenvalues only for
    the groups that need them (a ResNet block whose few groups keep a nearly null direction)."""

    def __init__(self, ata: torch.Tensor, aty: torch.Tensor, ok: torch.Tensor, null_rtol: float) -> None:
        self.ok = ok.nonzero().flatten().to(ata.device)
        self.bad = (~ok).nonzero().flatten().to(ata.device)
        self.chol = _CholeskySystem(ata.index_select(0, self.ok), aty.index_select(0, self.ok))
        self.eig = _CentredSystem(ata.index_select(0, self.bad), aty.index_select(0, self.bad), null_rtol)
        self.scale = self._merge(self.chol.scale, self.eig.scale)
        self.rank_deficiency = self.chol.rank_deficiency + self.eig.rank_deficiency

    def _merge(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Rows of ``a`` (certified groups) and ``b`` (the others) back in group order."""
        out = a.new_empty((a.shape[0] + b.shape[0], *a.shape[1:]))
        return out.index_copy_(0, self.ok, a).index_copy_(0, self.bad, b)

    def heldout_ss_res(self, val: Stats, lams: Sequence[torch.Tensor]) -> list[float]:
        """:meth:`_CentredSystem.heldout_ss_res`, each part on its groups (``Σy²`` counted once)."""
        def part(idx: torch.Tensor, yy: torch.Tensor) -> Stats:
            return Stats(val.ata.index_select(0, idx), val.aty.index_select(0, idx), yy, val.ss_tot, val.rows)

        a = self.chol.heldout_ss_res(part(self.ok, val.yy), [lam.index_select(0, self.ok) for lam in lams])
        b = self.eig.heldout_ss_res(part(self.bad, torch.zeros_like(val.yy)),
                                    [lam.index_select(0, self.bad) for lam in lams])
        return [x + y for x, y in zip(a, b)]

    def theta(self, lam: torch.Tensor) -> torch.Tensor:
        """``(G, D, m)`` solution for the per-group ridge ``lam`` ``(G,)``."""
        return self._merge(self.chol.theta(lam.index_select(0, self.ok)),
                           self.eig.theta(lam.index_select(0, self.bad)))


def _resolve_solver(solver: str, device: torch.device) -> str:
    if solver not in get_args(Solver):
        raise ValueError(f"solver={solver!r}: use 'auto' (eigh), 'eigh' or 'cholesky'")
    # 'auto' stays eigh on every device until the Cholesky path has been timed on a GPU
    return "eigh" if solver == "auto" else solver


def rank_deficiency(ata: torch.Tensor, null_rtol: float = NULL_RTOL) -> int:
    """Number of numerically null directions of the centred feature covariance (summed over groups).

    ata: ``(G, D, D)`` or ``(D, D)`` moments with the constant column last.
    """
    return _null_count(_centred_cov(ata[None] if ata.dim() == 2 else ata)[2], null_rtol)


def _null_count(cxx: torch.Tensor, null_rtol: float) -> int:
    """Eigenvalues ``<= null_rtol · e_max`` of the centred covariances ``cxx`` ``(G, d, d)``, summed."""
    e = torch.linalg.eigvalsh(cxx)
    e_max = e[:, -1:].clamp_min(0.0)
    return int(((e <= null_rtol * e_max) | (e_max <= 0)).sum())


@dataclass
class Fit:
    """Result of a solve: the compensation layer and what the gate saw.

    ``r2`` is the R² the decision used (held-out for ``gate="holdout"``, in-sample otherwise);
    ``theta`` ``(G, D, m)`` float64 is the solution (constant row last); ``ridge`` the absolute λ of the
    final solve (mean over groups), ``ridge_rel`` the chosen grid multiple (None for a fixed λ);
    ``mse_before``/``mse_after``: mean squared error of the block output vs FP on all calibration rows
    without / with the compensation (``mse_after == mse_before`` when not applied); ``solver``: the
    factorisation that ran: ``"cholesky"`` (no eigendecomposition), ``"eigh"`` (also when ``"cholesky"``
    was asked for and no covariance could be certified full rank) or ``"mixed"`` (eigenvalues of the
    groups that could not be certified only: their ``eigh`` solve under the held-out gate, their rank
    count under the in-sample gate).
    """

    module: nn.Module
    r2: Optional[float]
    rows: int
    theta: Optional[torch.Tensor] = None
    applied: bool = False
    r2_insample: Optional[float] = None
    r2_heldout: Optional[float] = None
    rows_heldout: int = 0
    ridge: Optional[float] = None
    ridge_rel: Optional[float] = None
    mse_before: Optional[float] = None
    mse_after: Optional[float] = None
    rank_deficiency: Optional[int] = None
    solver: Optional[str] = None


def _check_gate_args(gate: str, ridge: Ridge) -> None:
    if gate not in ("holdout", "insample"):
        raise ValueError(f"gate={gate!r}: use 'holdout' (default) or 'insample' (the papers' rule)")
    if ridge is not None and ridge != "auto":
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) \
                or ridge < 0:
            raise ValueError(f"ridge={ridge!r}: use 'auto', None or a finite float >= 0")
    if gate == "insample" and ridge == "auto":
        raise ValueError("ridge='auto' picks λ on held-out rows: use gate='holdout', or a float ridge "
                         "(or None for the reference λ) with gate='insample'")


class _LeastSquares:
    """Shared solve/gate logic; subclasses accumulate the moments of parts 0 (fit) and 1 (held-out)."""

    ridge: float
    n_out: int

    def _stats(self, parts: Sequence[int]) -> Stats:  # pragma: no cover - abstract
        raise NotImplementedError

    def _module(self, theta: torch.Tensor) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def stats(self, part: Literal["fit", "heldout", "all"] = "all") -> Stats:
        """Moments of the fit rows, the held-out rows or all rows."""
        return self._stats({"fit": (0,), "heldout": (1,), "all": (0, 1)}[part])

    @torch.no_grad()
    def solve(self) -> Fit:
        """Reference solve on all rows with the fixed ``self.ridge``; ``r2`` is the in-sample R²."""
        return self.fit(gate="insample", ridge=self.ridge)

    @torch.no_grad()
    def fit(self, gate: Gate = "holdout", ridge: Ridge = None, null_rtol: float = NULL_RTOL,
            grid: Sequence[float] = RIDGE_GRID, solver: Solver = "auto") -> Fit:
        """Solve and decide whether to compensate.

        gate ``"insample"``: reference Cholesky solve with λ = ``ridge`` (None: ``self.ridge``) on all
        rows, applied iff in-sample R² > 0 (a held-out R² of the same solver fitted on the fit rows is
        reported when there are held-out rows). gate ``"holdout"``: λ from ``grid`` (``ridge="auto"`` or
        None) or fixed (a float), chosen and judged on the held-out rows, refit on all rows.
        ``solver``: ``"eigh"``, ``"cholesky"`` (the same solutions, taken only when proved to be:
        see the module docstring) or ``"auto"`` (eigh).
        """
        _check_gate_args(gate, ridge)
        every, fit_s, val = self._stats((0, 1)), self._stats((0,)), self._stats((1,))
        if every.rows == 0:
            raise ValueError("QwT least squares saw no rows (every row masked out?)")
        solver = _resolve_solver(solver, every.ata.device)
        ridge_rel: Optional[float] = None
        if gate == "insample":
            lam = float(self.ridge if ridge is None else ridge)
            theta = solve_normal_equations(every.ata, every.aty, lam)
            ss_every = every.ss_res(theta)
            r2_in = _r2(ss_every, float(every.ss_tot))
            r2_ho = None
            if val.rows > 0 and fit_s.rows > 0:
                r2_ho = val.r2(solve_normal_equations(fit_s.ata, fit_s.aty, lam))
            if solver == "cholesky":  # rank_deficiency() without eigenvalues where certified
                cxx = _centred_cov(every.ata)[2]
                deflated, dead = _deflate_dead(cxx)
                ok = _certified_groups(deflated, null_rtol).cpu()
                rank_def = int(dead.cpu()[ok].sum())
                if not bool(ok.all()):  # eigenvalues of the groups that could not be certified only
                    bad = (~ok).nonzero().flatten().to(cxx.device)
                    rank_def += _null_count(cxx.index_select(0, bad), null_rtol)
                    solver = "mixed" if bool(ok.any()) else "eigh"
            else:
                rank_def = rank_deficiency(every.ata, null_rtol)
            applied, r2, lam_report = r2_in > 0, r2_in, lam
        else:
            if val.rows == 0 or fit_s.rows == 0:
                raise ValueError(f"gate='holdout' needs fit and held-out rows, got {fit_s.rows} fit and "
                                 f"{val.rows} held-out rows: pass more calibration samples or "
                                 "gate='insample'")
            system: Union[_CentredSystem, _CholeskySystem, _SplitSystem]
            full: Union[_CentredSystem, _CholeskySystem, _SplitSystem]
            if solver == "cholesky":
                system = _CholeskySystem(fit_s.ata, fit_s.aty)
                full = _CholeskySystem(every.ata, every.aty)
                ok = (_certified_groups(system.cxx, null_rtol) & _certified_groups(full.cxx, null_rtol)).cpu()
                if not bool(ok.all()):  # eigenvalues for the groups that could not be certified only
                    solver = "mixed" if bool(ok.any()) else "eigh"
            if solver == "mixed":
                system = _SplitSystem(fit_s.ata, fit_s.aty, ok, null_rtol)
                full = _SplitSystem(every.ata, every.aty, ok, null_rtol)
            if solver == "eigh":
                system = _CentredSystem(fit_s.ata, fit_s.aty, null_rtol)
                full = _CentredSystem(every.ata, every.aty, null_rtol)
            auto = ridge is None or ridge == "auto"
            candidates = [float(g) for g in grid] if auto else [float(ridge)]
            lams = [c * system.scale if auto else torch.full_like(system.scale, c) for c in candidates]
            best_ss, best = float("inf"), candidates[0]
            for c, ss in zip(candidates, system.heldout_ss_res(val, lams)):
                if ss < best_ss:  # ties keep the smaller λ (grid is increasing)
                    best_ss, best = ss, c
            r2_ho = _r2(best_ss, float(val.ss_tot))
            lam_t = best * full.scale if auto else torch.full_like(full.scale, best)
            theta = full.theta(lam_t)
            ss_every = every.ss_res(theta)
            r2_in = _r2(ss_every, float(every.ss_tot))
            rank_def = full.rank_deficiency
            ridge_rel = best if auto else None
            applied, r2, lam_report = r2_ho > 0, r2_ho, float(lam_t.mean())
        n_el = every.rows * self.n_out
        mse_before = float(every.yy) / n_el
        mse_after = ss_every / n_el if applied else mse_before
        return Fit(module=self._module(theta), r2=r2, rows=every.rows, theta=theta, applied=applied,
                   r2_insample=r2_in, r2_heldout=r2_ho, rows_heldout=val.rows, ridge=lam_report,
                   ridge_rel=ridge_rel, mse_before=mse_before, mse_after=max(mse_after, 0.0),
                   rank_deficiency=rank_def, solver=solver)

    def finite(self) -> tuple[bool, bool]:
        """``(features finite, targets finite)`` of the accumulated moments."""
        x_ok = all(bool(torch.isfinite(t).all()) for t in self._x_moments())
        y_ok = all(bool(torch.isfinite(t).all()) for t in self._y_moments())
        return x_ok, y_ok

    def _x_moments(self) -> list[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _y_moments(self) -> list[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def rows(self, parts: Sequence[int] = (0, 1)) -> int:  # pragma: no cover - abstract
        """Real rows accumulated in ``parts`` (0: fit, 1: held-out), per group."""
        raise NotImplementedError


def _sum_sq(t: torch.Tensor) -> torch.Tensor:
    """``Σ t²`` as a 0-dim tensor, by one dot product (no squared copy of ``t``)."""
    flat = t.reshape(-1)
    return torch.dot(flat, flat)


def _split_rows(heldout: Union[None, bool, torch.Tensor], n_samples: int):
    """``[(part, sample_index or None)]`` for a batch: whole batch to one part, or split by dim 0."""
    if heldout is None or isinstance(heldout, bool):
        return [(int(bool(heldout)), None)]
    hv = torch.as_tensor(heldout, dtype=torch.bool).reshape(-1).cpu()
    if hv.numel() != n_samples:
        raise ValueError(f"held-out flags have {hv.numel()} entries, the batch has {n_samples} samples")
    if bool(hv.all()):
        return [(1, None)]
    if not bool(hv.any()):
        return [(0, None)]
    return [(0, torch.nonzero(~hv).flatten()), (1, torch.nonzero(hv).flatten())]


def _binary_mask(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("row_mask must be bool or 0/1 (1 = real row, 0 = padding); got other values")
    return mask != 0


class TokenLeastSquares(_LeastSquares):
    """Accumulates ``[X, 1]ᵀ[X, 1]``, ``[X, 1]ᵀY`` and ``YᵀY`` for token features (channels last).

    ``update(x, y, mask=None, heldout=None)`` takes x: ``(..., d_in)``, y: ``(..., d_out)`` (same leading
    dims, flattened into rows); ``mask`` ``x.shape[:-1]`` (bool or 0/1) drops rows with 0 from every
    moment; ``heldout`` is None/False (all rows to the fit part), True (all to the held-out part) or a
    bool tensor ``(x.shape[0],)`` splitting by index along dim 0. ``solve()``/``fit()`` give an
    ``nn.Linear(d_in, d_out)`` with ``weight = Wᵀ`` and ``bias = b`` of ``y ≈ x·W + b``.
    """

    def __init__(self, d_in: int, d_out: int, device: torch.device | str = "cpu",
                 ridge: float = 0.0, dtype: torch.dtype = torch.float64) -> None:
        self.d_in, self.d_out, self.n_out, self.ridge, self.dtype = d_in, d_out, d_out, ridge, dtype
        self.device = torch.device(device)

        def zeros(*shape):
            return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2)]

        self.xtx, self.x_sum = zeros(d_in, d_in), zeros(d_in)
        self.xty, self.y_sum = zeros(d_in, d_out), zeros(d_out)
        self.yy, self.n = zeros(), zeros()

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor] = None,
               heldout: Union[None, bool, torch.Tensor] = None) -> None:
        if mask is not None and tuple(mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"row_mask has shape {tuple(mask.shape)}, expected x.shape[:-1] = "
                             f"{tuple(x.shape[:-1])}")
        for part, idx in _split_rows(heldout, x.shape[0] if x.dim() > 1 else 1):
            xp, yp, mp = x, y, mask
            if idx is not None:
                dev_idx = idx.to(x.device)
                xp, yp = x.index_select(0, dev_idx), y.index_select(0, dev_idx.to(y.device))
                mp = None if mask is None else mask.index_select(0, idx.to(mask.device))
            self._update_part(part, xp, yp, mp)

    def _update_part(self, p: int, x: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        x = x.reshape(-1, self.d_in)
        y = y.reshape(-1, self.d_out)
        if mask is not None:
            keep = _binary_mask(mask.reshape(-1)).to(x.device)
            x, y = x[keep], y[keep.to(y.device)]
        x = x.to(self.dtype)
        y = y.to(self.dtype)
        self.xtx[p].addmm_(x.T, x)
        self.xty[p].addmm_(x.T, y)
        self.x_sum[p] += x.sum(0)
        self.y_sum[p] += y.sum(0)
        self.yy[p] += _sum_sq(y)
        self.n[p] += x.shape[0]

    def moments(self, parts: Sequence[int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
        """``(AᵀA, AᵀY)`` with the constant column last: ``(d_in+1, d_in+1)``, ``(d_in+1, d_out)``."""
        d = self.d_in
        xtx = sum(self.xtx[p] for p in parts)
        x_sum = sum(self.x_sum[p] for p in parts)
        ata = xtx.new_zeros(d + 1, d + 1)
        ata[:d, :d] = xtx
        ata[:d, d] = x_sum
        ata[d, :d] = x_sum
        ata[d, d] = sum(self.n[p] for p in parts)
        aty = torch.cat([sum(self.xty[p] for p in parts), sum(self.y_sum[p] for p in parts)[None]], dim=0)
        return ata, aty

    def _stats(self, parts: Sequence[int]) -> Stats:
        ata, aty = self.moments(parts)
        n = ata[-1, -1]
        yy = sum(self.yy[p] for p in parts)
        ss_tot = yy - aty[-1].pow(2).sum() / n.clamp_min(1e-30)
        return Stats(ata[None], aty[None], yy, ss_tot, int(round(float(n))))

    def all_reduce(self) -> None:
        _all_reduce_(*self.xtx, *self.x_sum, *self.xty, *self.y_sum, *self.yy, *self.n)

    @property
    def features(self) -> int:
        """Columns of ``A`` (inputs + intercept)."""
        return self.d_in + 1

    def rows(self, parts: Sequence[int] = (0, 1)) -> int:
        return int(round(float(sum(self.n[p] for p in parts))))

    def _x_moments(self) -> list[torch.Tensor]:
        return [*self.xtx, *self.x_sum]

    def _y_moments(self) -> list[torch.Tensor]:
        return [*self.xty, *self.y_sum, *self.yy]

    def _module(self, theta: torch.Tensor) -> nn.Module:
        theta = theta[0]
        layer = nn.Linear(self.d_in, self.d_out, bias=True, device=self.device)
        with torch.no_grad():
            layer.weight.copy_(theta[:-1].T.float())
            layer.bias.copy_(theta[-1].float())
        return layer


class GroupedConvLeastSquares(_LeastSquares):
    """Per-group least squares for QwT's ResNet form: a grouped k×k conv on the block input.

    x: ``(B, C_in, H, W)``, y: ``(B, C_out, H', W')``. ``groups = max(1, C_in // group_channels)``,
    stride ``H // H'``, padding ``k // 2``. Each group's unfolded patches
    ``(B·H'·W', C_in/groups·k²)`` plus a constant column are regressed on its ``C_out/groups``
    output channels (reference solve: ``(AᵀA + λI)⁻¹AᵀY``, λ on every column).

    ``r2_mean`` sets SS_tot of the R²: ``"channel_position"`` (default; the published ResNet code)
    around the per-(channel, h, w) mean over the samples, ``"channel"`` around the per-channel mean
    over samples and positions. ``out_hw`` ``(H', W')`` pre-allocates the per-position sums (needed
    under torch.distributed, where every rank must hold the same tensors).
    """

    def __init__(self, c_in: int, c_out: int, stride: int, kernel_size: int = 1,
                 group_channels: int = 64, ridge: float = 1e-3, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float64, r2_mean: ConvR2Mean = "channel_position",
                 out_hw: Optional[tuple[int, int]] = None) -> None:
        if r2_mean not in ("channel", "channel_position"):
            raise ValueError(f"conv_r2_mean={r2_mean!r}: use 'channel_position' or 'channel'")
        groups = max(1, c_in // group_channels)
        if c_in % groups or c_out % groups:
            groups = 1
        self.c_in, self.c_out, self.n_out, self.groups = c_in, c_out, c_out, groups
        self.k, self.stride, self.padding = kernel_size, stride, kernel_size // 2
        self.ridge, self.dtype, self.r2_mean = ridge, dtype, r2_mean
        self.device = torch.device(device)
        d = c_in // groups * kernel_size ** 2 + 1
        m = c_out // groups
        self.ata = [torch.zeros(groups, d, d, dtype=dtype, device=device) for _ in range(2)]
        self.aty = [torch.zeros(groups, d, m, dtype=dtype, device=device) for _ in range(2)]
        self.yy = [torch.zeros((), dtype=dtype, device=device) for _ in range(2)]
        self.n_samples = [torch.zeros((), dtype=dtype, device=device) for _ in range(2)]
        self.y_pos_sum: Optional[list[torch.Tensor]] = None
        if out_hw is not None:
            self._alloc_pos(tuple(out_hw))

    def _alloc_pos(self, hw: tuple[int, int]) -> None:
        self.y_pos_sum = [torch.zeros(self.c_out, *hw, dtype=self.dtype, device=self.device)
                          for _ in range(2)]

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        """``(G, B·L, C_in/G·k² + 1)`` unfolded patches with a constant column (a view of
        :meth:`_patches_t`)."""
        return self._patches_t(x).transpose(1, 2)

    def _patches_t(self, x: torch.Tensor) -> torch.Tensor:
        """``(G, C_in/G·k² + 1, B·L)``: the design matrix transposed, contiguous along its rows.

        In this layout the products ``AᵀA`` and ``AᵀY`` run along contiguous memory (about 1.4x
        the float64 GEMM throughput of the row-major ``(G, B·L, D)`` on the 2-core CPU host), and
        building it from NCHW moves whole ``h·w`` runs instead of transposing channels and pixels.
        """
        g = self.groups
        if self.k == 1:  # 1x1: the patches are the strided pixels; one copy (and cast) into place
            xs = x[:, :, ::self.stride, ::self.stride]
            b, c, h, w = xs.shape
            cg = c // g
            at = torch.empty(g, cg + 1, b * h * w, dtype=self.dtype, device=x.device)
            at[:, :cg].view(g, cg, b, h, w).copy_(xs.unflatten(1, (g, cg)).permute(1, 2, 0, 3, 4))
            at[:, cg] = 1.0
            return at
        cols = F.unfold(x.to(self.dtype), self.k, padding=self.padding, stride=self.stride)
        b, ck, length = cols.shape
        at = torch.empty(g, ck // g + 1, b * length, dtype=self.dtype, device=x.device)
        at[:, :-1].view(g, ck // g, b, length).copy_(cols.view(b, g, ck // g, length).permute(1, 2, 0, 3))
        at[:, -1] = 1.0
        return at

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor] = None,
               heldout: Union[None, bool, torch.Tensor] = None) -> None:
        if mask is not None:
            raise ValueError("row_mask is supported for the token form only (conv blocks have no padding rows)")
        for part, idx in _split_rows(heldout, x.shape[0]):
            xp, yp = x, y
            if idx is not None:
                xp, yp = x.index_select(0, idx.to(x.device)), y.index_select(0, idx.to(y.device))
            self._update_part(part, xp, yp)

    def _update_part(self, p: int, x: torch.Tensor, y: torch.Tensor) -> None:
        at = self._patches_t(x)  # (G, D, B·h·w)
        b, _, h, w = y.shape
        if at.shape[2] != b * h * w:
            raise ValueError(f"compensation conv (k={self.k}, stride={self.stride}) gives "
                             f"{at.shape[2] // b} positions, the block output has {h}x{w}")
        if self.y_pos_sum is None:
            self._alloc_pos((h, w))
        if tuple(self.y_pos_sum[p].shape[1:]) != (h, w):
            raise ValueError(f"block outputs of {h}x{w} after {tuple(self.y_pos_sum[p].shape[1:])}: the "
                             "per-(channel, position) R² needs one output size; use conv_r2_mean='channel'")
        g, m = self.groups, self.c_out // self.groups
        yt = torch.empty(g, m, b, h * w, dtype=self.dtype, device=y.device)
        yt.copy_(y.reshape(b, g, m, h * w).permute(1, 2, 0, 3))  # cast + layout in one copy
        self.y_pos_sum[p] += yt.sum(2).view(self.c_out, h, w)  # per-(channel, position) sums over samples
        yt = yt.view(g, m, b * h * w)
        self.ata[p].baddbmm_(at, at.transpose(1, 2))
        self.aty[p].baddbmm_(at, yt.transpose(1, 2))
        self.yy[p] += _sum_sq(yt)
        self.n_samples[p] += b

    def _stats(self, parts: Sequence[int]) -> Stats:
        ata = sum(self.ata[p] for p in parts)
        aty = sum(self.aty[p] for p in parts)
        yy = sum(self.yy[p] for p in parts)
        n = ata[0, -1, -1]
        if self.r2_mean == "channel" or self.y_pos_sum is None:
            ss_tot = yy - (aty[:, -1, :].pow(2).sum(-1) / n.clamp_min(1e-30)).sum()
        else:
            ns = sum(self.n_samples[p] for p in parts)
            ss_tot = yy - sum(self.y_pos_sum[p] for p in parts).pow(2).sum() / ns.clamp_min(1e-30)
        return Stats(ata, aty, yy, ss_tot, int(round(float(n))))

    def all_reduce(self) -> None:
        _all_reduce_(*self.ata, *self.aty, *self.yy, *self.n_samples, *(self.y_pos_sum or []))

    @property
    def features(self) -> int:
        """Columns of ``A`` per group (inputs·k² + intercept)."""
        return self.ata[0].shape[-1]

    def rows(self, parts: Sequence[int] = (0, 1)) -> int:
        return int(round(float(sum(self.ata[p][0, -1, -1] for p in parts))))

    def _x_moments(self) -> list[torch.Tensor]:
        return list(self.ata)

    def _y_moments(self) -> list[torch.Tensor]:
        return [*self.aty, *self.yy, *(self.y_pos_sum or [])]

    def _module(self, theta: torch.Tensor) -> nn.Module:
        conv = nn.Conv2d(self.c_in, self.c_out, self.k, stride=self.stride, padding=self.padding,
                         groups=self.groups, bias=True, device=self.device)
        g, d, m = theta.shape
        weight = theta[:, :-1, :].permute(0, 2, 1).reshape(g * m, self.c_in // g, self.k, self.k)
        with torch.no_grad():
            conv.weight.copy_(weight.float())
            conv.bias.copy_(theta[:, -1, :].reshape(-1).float())
        return conv


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
