"""Top-1 / top-5 accuracy over a (sharded) validation loader, summed across ranks."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from qwt_core.distributed import all_reduce_sum, is_main_process


@dataclass
class Accuracy:
    """Accuracy in percent over ``count`` images (all ranks), and the wall time of the pass."""

    top1: float
    top5: float
    count: int
    seconds: float

    def to_dict(self) -> dict:
        return {"top1": self.top1, "top5": self.top5, "count": self.count, "seconds": self.seconds}


def logits_of(output) -> torch.Tensor:
    """The ``(B, num_classes)`` logits of a classifier output.

    timm's distilled DeiT in eval mode already returns ``(head + head_dist) / 2``; a tuple (the
    distilled-training output) is averaged the same way so both heads always count.
    """
    if isinstance(output, (tuple, list)):
        return sum(output) / len(output)
    return output


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device | str, desc: str = "eval",
             progress: bool = True) -> Accuracy:
    """Evaluate ``model`` on ``loader`` (``(images (B,3,H,W), targets (B,))``), all-reducing
    ``(correct@1, correct@5, count)`` across ranks so every image is counted exactly once."""
    model.eval()
    device = torch.device(device)
    stats = torch.zeros(3, dtype=torch.float64, device=device)
    t0 = time.perf_counter()
    bar = tqdm(loader, desc=desc, disable=not (progress and is_main_process()), leave=False)
    for i, (images, targets) in enumerate(bar):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        logits = logits_of(model(images))
        k = min(5, logits.shape[-1])
        topk = logits.topk(k, dim=-1).indices
        hit = topk == targets[:, None]
        stats[0] += hit[:, 0].sum()
        stats[1] += hit.any(dim=-1).sum()
        stats[2] += targets.numel()
        if not bar.disable and i % 10 == 0:  # reading the counts synchronises a GPU: not every batch
            seen = stats[2].item()
            if seen > 0:
                bar.set_postfix(top1=f"{100 * stats[0].item() / seen:.2f}")
    all_reduce_sum(stats)
    correct1, correct5, count = stats.tolist()
    if count == 0:
        raise SystemExit("error: the validation set is empty")
    return Accuracy(100.0 * correct1 / count, 100.0 * correct5 / count, int(count),
                    time.perf_counter() - t0)
