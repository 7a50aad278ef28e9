"""Task-agnostic distillation losses for zero-shot QAT (student = fake-quant model, teacher = FP).

* :func:`kl_distill` - temperature-τ KL divergence of the teacher's distribution from the
  student's, ``τ²·KL(p_T ‖ p_S)`` (softmax logits, or per-element sigmoid logits such as RPN
  objectness), averaged over rows / feature levels.
* :class:`BlockOutputRecorder` - forward hooks that record the outputs of named blocks.
* :func:`flatten_concat` - per-sample concatenation of several output maps into one logit vector
  (DFQ's RPN KL: objectness and box deltas of all levels in one softmax).
* :func:`block_mse` - mean over blocks of the MSE between student and teacher block outputs.
* :class:`Distiller` - runs teacher (frozen, no grad) and student on the same input and returns
  ``{"kl", "mse", "total"}`` with ``total = w_kl·kl + w_mse·mse``.
"""
from __future__ import annotations

from typing import Any, Callable, Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["kl_distill", "flatten_concat", "BlockOutputRecorder", "block_mse", "Distiller"]

Logits = Union[torch.Tensor, Sequence[torch.Tensor]]


def _as_list(x: Logits) -> list[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else list(x)


def kl_distill(student: Logits, teacher: Logits, tau: float = 1.0,
               kind: Literal["softmax", "sigmoid"] = "softmax", dim: int = -1) -> torch.Tensor:
    """``τ²·KL(p_T ‖ p_S)`` with ``p = softmax(logits/τ)`` (or per-element Bernoulli ``sigmoid``).

    Args:
        student, teacher: logits of equal shapes, e.g. ``(B, K)`` class logits or a list of
            per-level RPN objectness maps ``(B, A, H_l, W_l)``; a list is averaged over its items.
        tau: temperature (> 0).
        kind: ``"softmax"`` (distribution along ``dim``, mean over the other positions) or
            ``"sigmoid"`` (independent binary distributions, mean over elements).
    Returns:
        Scalar tensor; differentiable w.r.t. the student only (the teacher is detached).
    """
    if tau <= 0:
        raise ValueError(f"tau={tau} must be > 0")
    s_list, t_list = _as_list(student), _as_list(teacher)
    if len(s_list) != len(t_list) or any(s.shape != t.shape for s, t in zip(s_list, t_list)):
        raise ValueError("kl_distill: student and teacher outputs differ in number or shape "
                         f"({[tuple(s.shape) for s in s_list]} vs {[tuple(t.shape) for t in t_list]})")
    losses = []
    for s, t in zip(s_list, t_list):
        s, t = s.float() / tau, t.detach().float() / tau
        if kind == "softmax":
            log_ps, log_pt = F.log_softmax(s, dim=dim), F.log_softmax(t, dim=dim)
            kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=dim).mean()
        elif kind == "sigmoid":
            log_ps, log_qs = F.logsigmoid(s), F.logsigmoid(-s)
            log_pt, log_qt = F.logsigmoid(t), F.logsigmoid(-t)
            kl = (log_pt.exp() * (log_pt - log_ps) + log_qt.exp() * (log_qt - log_qs)).mean()
        else:
            raise ValueError(f"kind={kind!r}: use 'softmax' or 'sigmoid'")
        losses.append(kl)
    return torch.stack(losses).mean() * tau ** 2


def flatten_concat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[(B, ...), (B, ...), ...]`` → ``(B, Σ numel/B)``: each tensor flattened per sample, then
    concatenated along dim 1 (order kept). DFQ's detection KL applies one softmax at τ=1 over
    ``flatten_concat(cls_scores + bbox_preds)`` of the RPN (all levels), ``batchmean`` reduction."""
    if not tensors:
        raise ValueError("flatten_concat needs at least one tensor")
    b = tensors[0].shape[0]
    if any(t.shape[0] != b for t in tensors):
        raise ValueError(f"flatten_concat: batch sizes differ ({[tuple(t.shape) for t in tensors]})")
    return torch.cat([t.reshape(b, -1) for t in tensors], dim=1)


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"block output of type {type(out).__name__} has no tensor to distil")


class BlockOutputRecorder:
    """Record the outputs of ``model``'s submodules ``names`` (forward hooks), in ``names`` order.

    Use as a context manager; ``outputs`` is a list of tensors (one per name; a tuple output
    contributes its first tensor) filled by the last forward; ``clear()`` empties it.
    Raises ``ValueError`` naming the first missing submodule before any hook is registered.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"no submodule {missing[0]!r} in {type(model).__name__}: "
                             "pass block names from model.named_modules()")
        self.names = list(names)
        self._store: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            self._store[name] = _first_tensor(out)
        return hook

    @property
    def outputs(self) -> list[torch.Tensor]:
        missing = [n for n in self.names if n not in self._store]
        if missing:
            raise RuntimeError(f"block {missing[0]!r} did not run in the last forward")
        return [self._store[n] for n in self.names]

    def clear(self) -> None:
        self._store.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "BlockOutputRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def block_mse(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of ``mean((s - t)²)``; teacher outputs are detached. Scalar tensor."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"block_mse needs equally many (>0) student and teacher blocks, got "
                         f"{len(student)} and {len(teacher)}")
    for i, (s, t) in enumerate(zip(student, teacher)):
        if s.shape != t.shape:
            raise ValueError(f"block {i}: student output {tuple(s.shape)} != teacher {tuple(t.shape)}")
    return torch.stack([F.mse_loss(s.float(), t.detach().float()) for s, t in zip(student, teacher)]).mean()


class Distiller:
    """KL on outputs + MSE on block outputs between a student and a frozen teacher.

    Args:
        student, teacher: modules with the same block names (the teacher is put in eval mode and
            its parameters get ``requires_grad=False``; it is never modified).
        block_names: submodule names whose outputs are matched by MSE (may be empty).
        logits_fn: maps a model output to the logits given to :func:`kl_distill` (identity default).
        tau, kind: see :func:`kl_distill`. w_kl, w_mse: loss weights.
    Call ``distiller(inputs)`` → ``{"kl", "mse", "total"}`` (scalars; ``total`` carries the graph);
    ``forward(model, inputs)`` runs a model (default ``model(inputs)``; override for dict batches).
    Call ``close()`` (or use as a context manager) to remove the hooks.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, block_names: Sequence[str] = (),
                 logits_fn: Optional[Callable[[Any], Logits]] = None, tau: float = 1.0,
                 kind: Literal["softmax", "sigmoid"] = "softmax", w_kl: float = 1.0,
                 w_mse: float = 1.0, forward: Optional[Callable[[nn.Module, Any], Any]] = None) -> None:
        if student is teacher:
            raise ValueError("student and teacher are the same module: pass a copy as the teacher")
        self.student_rec = BlockOutputRecorder(student, block_names)
        try:
            self.teacher_rec = BlockOutputRecorder(teacher, block_names)
        except ValueError:
            self.student_rec.remove()
            raise
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.student, self.teacher = student, teacher
        self.logits_fn = logits_fn or (lambda out: out)
        self.forward = forward or (lambda model, inputs: model(inputs))
        self.tau, self.kind, self.w_kl, self.w_mse = tau, kind, w_kl, w_mse
        self.block_names = list(block_names)

    def __call__(self, inputs: Any) -> dict[str, torch.Tensor]:
        self.student_rec.clear()
        self.teacher_rec.clear()
        with torch.no_grad():
            t_out = self.forward(self.teacher, inputs)
        s_out = self.forward(self.student, inputs)
        kl = kl_distill(self.logits_fn(s_out), self.logits_fn(t_out), self.tau, self.kind)
        mse = (block_mse(self.student_rec.outputs, self.teacher_rec.outputs) if self.block_names
               else kl.new_zeros(()))
        return {"kl": kl, "mse": mse, "total": self.w_kl * kl + self.w_mse * mse}

    def close(self) -> None:
        self.student_rec.remove()
        self.teacher_rec.remove()

    def __enter__(self) -> "Distiller":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
