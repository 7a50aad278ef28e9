"""The classification scripts end to end on a small ImageFolder, with tiny random-init timm models;
save/reload; two gloo processes give the same top-1 as one."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from cls_helpers import SCRIPT, VAL_PER_CLASS, N_CLASSES, base_argv, make_image_folder
from cls_repq_vit import cli
from cls_repq_vit.data import ShardSampler
from cls_repq_vit.evaluate import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_VAL = VAL_PER_CLASS * N_CLASSES


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("imagefolder")))


def _check_results(res, n_blocks, baseline="RepQ-ViT"):
    acc = res["accuracy"]
    assert set(acc) >= {"fp32", "baseline", "qwt"}
    for key in ("fp32", "baseline", "qwt"):
        assert acc[key]["count"] == N_VAL
        assert 0.0 <= acc[key]["top1"] <= acc[key]["top5"] <= 100.0
    assert res["baseline"] == baseline
    blocks = res["qwt"]["blocks"]
    assert len(blocks) == n_blocks
    for b in blocks:  # r2 None: before --start_block, left alone
        assert (b["r2"] is None and not b["applied"]) or (b["rows"] > 0 and b["applied"] == (b["r2"] > 0))
    assert any(b["applied"] for b in blocks)
    assert res["timings_s"]["qwt"] > 0 and res["timings_s"]["total"] >= res["timings_s"]["qwt"]


@pytest.mark.parametrize("model,n_blocks,extra,baseline", [
    ("vit_small", 2, [], "RepQ-ViT"),
    ("deit_tiny_distilled", 2, ["--integer_zero_point"], "RepQ-ViT"),
    ("swin_tiny", 4, [], "RepQ-ViT"),
    ("resnet18", 8, ["--act_mode", "true", "--w_bits", "4", "--a_bits", "4"], "Percentile"),
])
def test_script_end_to_end_in_process(data_dir, tmp_path, model, n_blocks, extra, baseline):
    out = tmp_path / "r.json"
    res = cli.main(base_argv(model, data_dir, str(out)) + ["--eval_fp"] + extra,
                   choices=None)
    assert json.loads(out.read_text())["accuracy"] == res["accuracy"]
    _check_results(res, n_blocks, baseline)
    if model == "resnet18":
        assert res["act_mode"] == "true"


def test_script_subprocess_save_and_reload(data_dir, tmp_path):
    """Run the real entry point; the saved quantized model reloads to the same top-1 without
    calibration data or the original weights."""
    out, saved = tmp_path / "r.json", tmp_path / "q.pt"
    argv = base_argv("deit_small", data_dir, str(out)) + ["--eval_fp", "--start_block", "1",
                                                          "--save_quantized", str(saved)]
    res = subprocess.run([sys.executable, os.path.join(ROOT, "cls_repq_vit", SCRIPT["deit_small"]), *argv],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "RepQ-ViT + QwT" in res.stdout and "R2" in res.stdout
    first = json.loads(out.read_text())
    _check_results(first, 2)
    assert first["qwt"]["blocks"][0]["r2"] is None  # before --start_block
    assert saved.is_file()

    reloaded = cli.main(["--model", "deit_small", "--data_dir", data_dir, "--load_quantized", str(saved),
                         "--workers", "0", "--device", "cpu", "--no_progress",
                         "--output", str(tmp_path / "l.json")])
    assert reloaded["accuracy"]["loaded"]["top1"] == first["accuracy"]["qwt"]["top1"]
    assert reloaded["accuracy"]["loaded"]["top5"] == first["accuracy"]["qwt"]["top5"]


# ------------------------------------------------------------------------------------ distributed
class BrightnessClassifier(nn.Module):
    """Class k ↔ mean pixel ≈ (49.5 + 80k)/255 (the test ImageFolder's rule)."""

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3)) * 255.0
        centers = 49.5 + 80.0 * torch.arange(N_CLASSES, dtype=x.dtype)
        return -(m[:, None] - centers[None]) ** 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _eval_worker(rank, world, port, data_dir, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ds = datasets.ImageFolder(os.path.join(data_dir, "val"), transform=transforms.ToTensor())
        loader = DataLoader(ds, batch_size=4, sampler=ShardSampler(len(ds), rank, world))
        acc = evaluate(BrightnessClassifier(), loader, "cpu", progress=False)
        torch.save(acc.to_dict(), os.path.join(out_dir, f"eval{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_eval_equals_one_process(data_dir, tmp_path):
    ds = datasets.ImageFolder(os.path.join(data_dir, "val"), transform=transforms.ToTensor())
    assert len(ds) % 2 == 1
    single = evaluate(BrightnessClassifier(), DataLoader(ds, batch_size=4), "cpu", progress=False)
    assert 0 < single.top1 < 100 and single.count == len(ds)
    mp.spawn(_eval_worker, args=(2, _free_port(), data_dir, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"eval{rank}.pt")
        assert got["count"] == len(ds)
        assert got["top1"] == pytest.approx(single.top1) and got["top5"] == pytest.approx(single.top5)


def _cli_worker(rank, world, port, argv):
    torch.set_num_threads(1)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    cli.main(argv)


def test_two_process_pipeline_equals_one_process(data_dir, tmp_path):
    """The whole script under two gloo ranks (QwT moments all-reduced, eval sharded) gives the same
    top-1 and R² as one process."""
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    single = cli.main(base_argv("deit_small", data_dir, str(one)) + ["--eval_fp"])
    mp.spawn(_cli_worker, args=(2, _free_port(), base_argv("deit_small", data_dir, str(two)) + ["--eval_fp"]),
             nprocs=2, join=True)
    multi = json.loads(two.read_text())
    assert multi["world_size"] == 2
    for key in ("fp32", "baseline", "qwt"):
        assert multi["accuracy"][key]["count"] == N_VAL
        assert multi["accuracy"][key]["top1"] == pytest.approx(single["accuracy"][key]["top1"])
    r2_one = [b["r2"] for b in single["qwt"]["blocks"]]
    r2_two = [b["r2"] for b in multi["qwt"]["blocks"]]
    assert r2_two == pytest.approx(r2_one, abs=1e-5)
