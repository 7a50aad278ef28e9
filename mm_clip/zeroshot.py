"""CLIP zero-shot classification: prompt-ensemble classifier and top-k evaluation (sharded across ranks)."""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qwt_core.distributed import all_reduce_sum, get_rank, get_world_size, is_main_process

Encoder = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def build_zero_shot_classifier(encode_text: Encoder, tokenizer: Callable[[list[str]], torch.Tensor],
                               classnames: Sequence[str], templates: Sequence[str],
                               device: torch.device, classes_per_batch: int = 10,
                               progress: bool = True) -> torch.Tensor:
    """Class embeddings ``(E, C)`` from a prompt ensemble.

    For each class, every template (``str.format`` pattern with one ``{}``) is filled in and encoded,
    each text embedding is L2-normalised, the ``len(templates)`` embeddings are averaged and the mean
    is normalised again. ``encode_text`` maps tokens ``(N, L)`` to embeddings ``(N, E)``.

    In a distributed run the chunks of ``classes_per_batch`` classes are shared out round robin and
    the columns summed across ranks (each column is non-zero on one rank only, so the sum is exact);
    the chunks are the same as in a single-process run, so each text batch is the same.
    """
    rank, world = get_rank(), get_world_size()
    starts = list(range(0, len(classnames), classes_per_batch))
    mine = starts[rank::world]
    columns: dict[int, torch.Tensor] = {}
    for start in tqdm(mine, desc="zero-shot classifier", disable=not (progress and is_main_process())):
        names = classnames[start:start + classes_per_batch]
        texts = [t.format(c) for c in names for t in templates]
        emb = F.normalize(encode_text(tokenizer(texts).to(device)).float(), dim=-1)
        emb = emb.reshape(len(names), len(templates), -1).mean(dim=1)
        columns[start] = F.normalize(emb, dim=-1)
    if world == 1:
        return torch.cat([columns[s] for s in starts], dim=0).T.contiguous()
    if columns:
        dim = next(iter(columns.values())).shape[-1]
    else:  # more ranks than chunks: learn the embedding width from one prompt
        dim = encode_text(tokenizer([templates[0].format(classnames[0])]).to(device)).shape[-1]
    out = torch.zeros(len(classnames), dim, device=device)
    for start, emb in columns.items():
        out[start:start + emb.shape[0]] = emb
    return all_reduce_sum(out).T.contiguous()


@torch.no_grad()
def evaluate_zero_shot(logits_fn: Encoder, loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
                       device: torch.device, progress: bool = True) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) of ``argmax(logits_fn(images))`` over all ranks.

    ``loader`` yields ``(images (B, 3, H, W), labels (B,))`` (this rank's shard; use
    :class:`qwt_core.distributed.ShardSampler` so no image is counted twice); ``logits_fn`` maps images
    to class scores ``(B, C)``. ``(correct@1, correct@5, count)`` are summed across ranks. With fewer
    than 5 classes, top-5 is top-C.
    """
    stats = torch.zeros(3, dtype=torch.float64, device=device)
    for images, labels in tqdm(loader, desc="zero-shot eval", disable=not (progress and is_main_process())):
        images, labels = images.to(device), labels.to(device)
        logits = logits_fn(images)
        topk = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hits = topk == labels[:, None]
        stats[0] += hits[:, 0].sum()
        stats[1] += hits.any(dim=1).sum()
        stats[2] += labels.numel()
    correct1, correct5, total = all_reduce_sum(stats).tolist()
    if total == 0:
        raise ValueError("the evaluation set is empty")
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "num_images": int(total)}
