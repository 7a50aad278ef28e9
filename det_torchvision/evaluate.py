"""COCO bbox / segm evaluation of a torchvision Mask R-CNN through pycocotools, on one or more ranks.

Rank ``r`` of ``w`` runs the images ``r, r+w, ...`` of the split (ascending image id, one image per
forward so that a detection never depends on the other images of its batch); the result lists are
gathered on rank 0 (``all_gather_object``: gloo on CPU, NCCL on GPUs), merged in image-id order and
scored there; every rank returns the same metrics. Metric names follow mmdet's COCO metric
(``coco/bbox_mAP``, ``coco/bbox_mAP_50``, ..., ``coco/segm_mAP_l``), as the Swin tool's JSON.

    python -m det_torchvision.evaluate --checkpoint maskrcnn_resnet50_fpn.pth --coco-root data/coco
    torchrun --nproc_per_node=8 -m det_torchvision.evaluate --launcher pytorch --checkpoint ... --coco-root ...
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from qwt_core.distributed import get_rank, get_world_size, is_dist, is_main_process  # noqa: E402

METRICS = ("bbox", "segm")
_STAT_NAMES = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")
MASK_THRESHOLD = 0.5


def detections_to_coco(image_id: int, output: dict[str, torch.Tensor], segm: bool = True) -> list[dict[str, Any]]:
    """One image's torchvision output (``boxes (N, 4)`` xyxy, ``scores (N,)``, ``labels (N,)`` = COCO
    category ids, ``masks (N, 1, H, W)`` probabilities) → COCO result dicts (bbox xywh, RLE
    ``segmentation`` of ``mask > 0.5`` when ``segm``)."""
    import numpy as np
    from pycocotools import mask as mask_utils

    boxes = output["boxes"].detach().cpu().float()
    scores = output["scores"].detach().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    masks = None
    if segm and "masks" in output:
        masks = (output["masks"].detach().cpu()[:, 0] > MASK_THRESHOLD).numpy().astype(np.uint8)
    results = []
    for k, (box, score, label) in enumerate(zip(xywh, scores, labels)):
        r: dict[str, Any] = {"image_id": int(image_id), "category_id": int(label),
                             "bbox": [round(float(v), 3) for v in box], "score": float(score)}
        if masks is not None:
            rle = mask_utils.encode(np.asfortranarray(masks[k]))
            rle["counts"] = rle["counts"].decode("ascii")
            r["segmentation"] = rle
        results.append(r)
    return results


@torch.no_grad()
def predict_shard(model: nn.Module, dataset, device: torch.device | str, segm: bool = True,
                  desc: str = "eval", rank: Optional[int] = None,
                  world: Optional[int] = None) -> list[dict[str, Any]]:
    """COCO results of this rank's images (``dataset`` items ``(image_id, (3, H, W))``)."""
    rank = get_rank() if rank is None else rank
    world = get_world_size() if world is None else world
    model.eval()
    results: list[dict[str, Any]] = []
    for i in tqdm(range(rank, len(dataset), world), desc=desc, disable=not is_main_process()):
        image_id, image = dataset[i]
        out = model([image.to(device)])[0]
        results.extend(detections_to_coco(image_id, out, segm))
    return results


def gather_results(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All ranks' results in image-id order (stable: each image keeps its own detection order);
    the identity in a single process."""
    if is_dist():
        import torch.distributed as dist

        parts: list[Any] = [None] * get_world_size()
        dist.all_gather_object(parts, results)
        results = [r for part in parts for r in part]
    return sorted(results, key=lambda r: r["image_id"])


def coco_metrics(coco_gt, results: list[dict[str, Any]], metrics: Sequence[str] = METRICS,
                 image_ids: Optional[Sequence[int]] = None) -> dict[str, float]:
    """COCOeval stats as ``{"coco/bbox_mAP": 0.379, ..., "coco/segm_mAP_l": ...}`` (fractions, as
    mmdet); ``image_ids`` restricts the evaluation (default: every image of ``coco_gt``). No
    detection at all gives zeros."""
    from pycocotools.cocoeval import COCOeval

    out: dict[str, float] = {}
    for kind in metrics:
        if kind not in METRICS:
            raise ValueError(f"metric {kind!r}: use bbox or segm")
        dets = [r for r in results if kind == "bbox" or "segmentation" in r]
        if not dets:
            out.update({f"coco/{kind}_{n}": 0.0 for n in _STAT_NAMES})
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes([dict(r) for r in dets])
            ev = COCOeval(coco_gt, coco_dt, iouType=kind)
            if image_ids is not None:
                ev.params.imgIds = list(image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        for name, value in zip(_STAT_NAMES, ev.stats[:6]):
            out[f"coco/{kind}_{name}"] = max(float(value), 0.0)  # -1 (no object of that size) -> 0
    return out


def evaluate_coco(model: nn.Module, dataset, device: torch.device | str = "cpu",
                  metrics: Sequence[str] = METRICS, desc: str = "eval") -> dict[str, float]:
    """Box / mask AP of ``model`` on ``dataset`` (:class:`det_torchvision.data.CocoImages`), sharded
    over the ranks of the process group when there is one; the same dict on every rank."""
    results = predict_shard(model, dataset, device, segm="segm" in metrics, desc=desc)
    merged = gather_results(results)
    payload: list[Any] = [None]
    if is_main_process():
        payload[0] = coco_metrics(dataset.coco, merged, metrics, image_ids=dataset.ids)
    if is_dist():
        import torch.distributed as dist

        dist.broadcast_object_list(payload, src=0)
    return payload[0]


def ap_percent(metrics: dict[str, float]) -> dict[str, Optional[float]]:
    """``{"bbox": 37.9, "segm": 34.6}`` (percent, 2 decimals) from :func:`coco_metrics` output."""
    def pct(kind: str) -> Optional[float]:
        v = metrics.get(f"coco/{kind}_mAP")
        return None if v is None else round(100.0 * v, 2)

    return {"bbox": pct("bbox"), "segm": pct("segm")}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from det_torchvision.cli import add_common_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """FP COCO evaluation of a checkpoint; writes ``{"results": {"fp": metrics}, "ap": ...}``."""
    from det_torchvision.cli import load_model_and_data, setup, write_json

    args = parse_args(argv)
    device, rank, world = setup(args)
    model, info, dataset = load_model_and_data(args, device)
    metrics = evaluate_coco(model, dataset, device, args.eval, desc="fp")
    summary = {"checkpoint": args.checkpoint, "arch": info["arch"], "coco_root": args.coco_root,
               "split": args.split, "images": len(dataset), "world_size": world,
               "results": {"fp": metrics}, "ap": {"fp": ap_percent(metrics)}}
    if is_main_process():
        print(json.dumps(summary["ap"]))
        if args.output:
            write_json(summary, args.output)
    return summary


if __name__ == "__main__":
    main()
