"""Error measurements of a quantized tower against full precision, on the calibration data.

In a distributed run every rank measures its own calibration shard and the sums are all-reduced, so
the figures are those of the whole calibration set."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch

from qwt_core import QuantizedModel, quant_disabled
from qwt_core.compensation import CompensatedBlock
from qwt_core.distributed import all_reduce_sum


@torch.no_grad()
def block_errors(qm: QuantizedModel, batches: Iterable[Any]) -> list[dict[str, float | str | bool]]:
    """Per block, the mean squared error to the FP block on the inputs QwT sees.

    The input of block ``i`` is the output of the (compensated, if QwT ran) quantized model up to
    block ``i``. For each block: ``mse_quant`` = ``block_q(X)`` vs ``block_fp(X)``, ``mse_compensated``
    = ``block_q(X) + compensation(X)`` vs ``block_fp(X)`` (equal to ``mse_quant`` when the block has no
    compensation), ``fp_power`` = mean of ``block_fp(X)²``.
    """
    run = qm.run_block or (lambda i, block, x: block(x))
    sums = [[0.0, 0.0, 0.0, 0] for _ in qm.block_names]
    applied = [False] * len(qm.block_names)
    device = torch.device("cpu")
    for batch in batches:
        x = qm.first_block_input(batch)
        device = x.device
        for i, name in enumerate(qm.block_names):
            if i > 0 and qm.transition is not None:
                x = qm.transition(i, x)
            blk = qm.model.get_submodule(name)
            applied[i] = isinstance(blk, CompensatedBlock)
            inner = blk.block if applied[i] else blk
            y_q = run(i, inner, x)
            with quant_disabled(inner):
                y_fp = run(i, inner, x)
            y_c = run(i, blk, x) if applied[i] else y_q
            s = sums[i]
            s[0] += float((y_q - y_fp).double().pow(2).sum())
            s[1] += float((y_c - y_fp).double().pow(2).sum())
            s[2] += float(y_fp.double().pow(2).sum())
            s[3] += y_fp.numel()
            x = y_c
    totals = all_reduce_sum(torch.tensor(sums, dtype=torch.float64, device=device)).tolist()  # NCCL: on GPU
    return [{"block": name, "compensated": applied[i], "mse_quant": s[0] / s[3],
             "mse_compensated": s[1] / s[3], "fp_power": s[2] / s[3]}
            for i, (name, s) in enumerate(zip(qm.block_names, totals))]


@torch.no_grad()
def embeddings(encode: Callable[[torch.Tensor], torch.Tensor],
               batches: Sequence[torch.Tensor]) -> torch.Tensor:
    """``encode`` over the batches, concatenated: ``(N, E)`` on the CPU."""
    return torch.cat([encode(b).float().cpu() for b in batches], dim=0)


def relative_mse(x: torch.Tensor, reference: torch.Tensor, device: torch.device | str = "cpu") -> float:
    """``‖x − ref‖² / ‖ref‖²`` over the rows of every rank (``device``: where the sums are all-reduced,
    the GPU under NCCL)."""
    sums = torch.stack([(x - reference).double().pow(2).sum(), reference.double().pow(2).sum()]).to(device)
    num, den = all_reduce_sum(sums).tolist()
    return num / max(den, 1e-30)
