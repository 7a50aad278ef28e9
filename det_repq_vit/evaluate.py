"""COCO evaluation of a (quantized) mmdet detector with mmengine's evaluator, on one or more ranks."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from qwt_core.distributed import is_main_process


def build_test_loader(cfg: Any):
    """The test dataloader of ``cfg`` (distributed sampler when a process group is initialised)."""
    from mmengine.runner import Runner

    return Runner.build_dataloader(cfg.test_dataloader, seed=None)


def build_evaluator(cfg: Any, metrics: list[str] | None = None):
    """mmengine ``Evaluator`` from ``cfg.test_evaluator``; ``metrics`` (e.g. ["bbox", "segm"])
    overrides the metric list of the COCO metric."""
    from mmengine.evaluator import Evaluator

    ev_cfg = cfg.test_evaluator
    if metrics:
        ev_cfg = dict(ev_cfg)
        ev_cfg["metric"] = list(metrics)
    return Evaluator(ev_cfg)


@torch.no_grad()
def evaluate_detector(model: nn.Module, loader, evaluator, desc: str = "eval") -> dict[str, float]:
    """Run ``model.test_step`` over ``loader`` and return the evaluator's metrics
    (e.g. ``{"coco/bbox_mAP": 0.46, "coco/segm_mAP": 0.416, ...}``), gathered over ranks."""
    model.eval()
    evaluator.dataset_meta = loader.dataset.metainfo  # class names -> COCO category ids
    for batch in tqdm(loader, desc=desc, disable=not is_main_process()):
        outputs = model.test_step(batch)
        evaluator.process(data_samples=outputs, data_batch=batch)
    metrics = evaluator.evaluate(len(loader.dataset))
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
