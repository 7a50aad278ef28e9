"""CLIP zero-shot classification: prompt-ensemble classifier and top-k evaluation."""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

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
    """
    columns = []
    chunks = range(0, len(classnames), classes_per_batch)
    for start in tqdm(chunks, desc="zero-shot classifier", disable=not progress):
        names = classnames[start:start + classes_per_batch]
        texts = [t.format(c) for c in names for t in templates]
        emb = F.normalize(encode_text(tokenizer(texts).to(device)).float(), dim=-1)
        emb = emb.reshape(len(names), len(templates), -1).mean(dim=1)
        columns.append(F.normalize(emb, dim=-1))
    return torch.cat(columns, dim=0).T.contiguous()


@torch.no_grad()
def evaluate_zero_shot(encode_image: Encoder, loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
                       classifier: torch.Tensor, device: torch.device,
                       progress: bool = True) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) of ``argmax(normalize(encode_image(x)) @ classifier)``.

    ``loader`` yields ``(images (B, 3, H, W), labels (B,))``; ``classifier`` is ``(E, C)``. With fewer
    than 5 classes, top-5 is top-C.
    """
    k = min(5, classifier.shape[1])
    correct1 = correct5 = total = 0
    for images, labels in tqdm(loader, desc="zero-shot eval", disable=not progress):
        images, labels = images.to(device), labels.to(device)
        feats = F.normalize(encode_image(images).float(), dim=-1)
        topk = (feats @ classifier).topk(k, dim=-1).indices
        hits = topk == labels[:, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
        total += labels.numel()
    if total == 0:
        raise ValueError("the evaluation set is empty")
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "num_images": total}
