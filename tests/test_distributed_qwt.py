"""Two gloo processes on CPU (each with half the calibration batches) give the same W, b as one."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers_models import images, tiny_vit
from qwt_core import calibrate, compensate
from qwt_core.adapters import quantize_timm_vit


def _quantized_vit():
    torch.manual_seed(0)
    qm = quantize_timm_vit(tiny_vit(), 4, 4)
    calibrate(qm, images(32, 32, seed=1))
    return qm


def _compensations(qm):
    return {k: v.clone() for k, v in qm.model.state_dict().items() if ".compensation." in k}


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        qm = _quantized_vit()
        batches = [images(16, 32, seed=10 + i) for i in range(4)]
        report = compensate(qm, batches[rank::world], progress=False)
        torch.save({"comp": _compensations(qm), "r2": [b.r2 for b in report.blocks]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    qm = _quantized_vit()
    report = compensate(qm, [images(16, 32, seed=10 + i) for i in range(4)], progress=False)
    single = _compensations(qm)
    assert single, "no block was compensated"
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["comp"].keys() == single.keys()
        for k in single:
            assert torch.allclose(got["comp"][k], single[k], atol=1e-5, rtol=1e-4), k
        assert got["r2"] == [pytest_approx(r) for r in [b.r2 for b in report.blocks]]


def pytest_approx(v):
    import pytest
    return pytest.approx(v, abs=1e-6)
