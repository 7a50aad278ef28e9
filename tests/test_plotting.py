"""qwt_core.plotting: every figure is a valid PNG of the documented size, drawn from the numbers it
was given (checked on the matplotlib artists and on the data chunk stored in the PNG), written
atomically, with one-line errors before anything is written. The per-block figure is fed a real
QwT report of a real (tiny, random-init) timm DeiT; the classification CLI's ``--plot`` and the
detection tool's plot helper are checked against their own JSON."""
from __future__ import annotations

import json
import os

import pytest
import timm
import torch
from matplotlib.figure import Figure
from PIL import Image

import qwt_core
from qwt_core import plotting
from qwt_core.plotting import (ACCURACY_SIZE_PX, BLOCKS_SIZE_PX, plot_accuracy, plot_block_errors,
                               plot_summary, read_plot_data, summary_size_px)

ROWS = [{"setting": s, "method": m, "top1": v, "std": e}
        for s, vals in (("W4A4", (95.1, 88.4, 93.0)), ("W3A3", (95.1, 61.7, 80.2)))
        for m, v, e in zip(("FP32", "RepQ-ViT", "RepQ-ViT + QwT"), vals, (0.3, 2.5, 1.1))]


@pytest.fixture(scope="module")
def qwt_blocks() -> list[dict]:
    """``QwTReport.to_dict()["blocks"]`` of a real W3A3 RepQ-ViT + QwT run on a tiny timm DeiT."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=3,
                              num_heads=3, num_classes=5).eval()
    qm = qwt_core.adapters.quantize_timm_vit(model, 3, 3)
    x = torch.randn(24, 3, 32, 32)
    qwt_core.calibrate(qm, x[:8])
    report = qwt_core.compensate(qm, [x[:12], x[12:]], progress=False)
    return json.loads(json.dumps(report.to_dict()))["blocks"]


def _check_png(path: str, size: tuple[int, int]) -> None:
    assert os.path.isfile(path) and os.path.getsize(path) > 10_000
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == size
        colors = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colors is not None and len(colors) > 50  # drawn, not a blank canvas
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".plot-")]  # no temp left


def test_accuracy_png_size_and_data(tmp_path):
    path = plot_accuracy(ROWS, str(tmp_path / "acc.png"), "accuracy per bit width")
    _check_png(path, ACCURACY_SIZE_PX)
    data = read_plot_data(path)
    assert data["kind"] == "accuracy" and data["settings"] == ["W4A4", "W3A3"]
    assert data["rows"] == [{k: r[k] for k in ("setting", "method", "top1", "std")} for r in ROWS]


def test_accuracy_artists_are_the_rows():
    """Bar heights and error-bar half-lengths are the rows' top1 and std, per method and setting."""
    fig = Figure()
    ax = fig.add_subplot()
    plotting._draw_accuracy(ax, plotting._check_rows(ROWS), "t")
    from matplotlib.container import BarContainer

    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(bars) == 3  # one per method, each with its error bars
    for container, method in zip(bars, ("FP32", "RepQ-ViT", "RepQ-ViT + QwT")):
        heights = [p.get_height() for p in container.patches]
        assert heights == [r["top1"] for r in ROWS if r["method"] == method]
        segs = container.errorbar.lines[2][0].get_segments()
        assert [round(s[1][1] - s[0][1], 6) for s in segs] == [round(2 * r["std"], 6)
                                                               for r in ROWS if r["method"] == method]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["W4A4", "W3A3"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["FP32", "RepQ-ViT", "RepQ-ViT + QwT"]


def test_block_errors_from_a_real_qwt_report(tmp_path, qwt_blocks):
    assert all(b["mse_before"] is not None and b["mse_before"] > 0 for b in qwt_blocks)
    path = plot_block_errors(qwt_blocks, str(tmp_path / "blocks.png"), "per-block error, W3A3")
    _check_png(path, BLOCKS_SIZE_PX)
    data = read_plot_data(path)
    assert [b["mse_before"] for b in data["blocks"]] == [b["mse_before"] for b in qwt_blocks]
    assert [b["mse_after"] for b in data["blocks"]] == [b["mse_after"] for b in qwt_blocks]
    assert [b["r2"] for b in data["blocks"]] == [b["r2"] for b in qwt_blocks]

    fig = Figure()
    ax = fig.add_subplot()
    plotting._draw_blocks(ax, plotting._check_blocks(qwt_blocks), "t")
    assert ax.get_yscale() == "log"
    assert list(ax.lines[0].get_ydata()) == [b["mse_before"] for b in qwt_blocks]
    assert list(ax.lines[1].get_ydata()) == [b["mse_after"] for b in qwt_blocks]
    r2_axis = [a for a in fig.axes if a is not ax][0]
    assert list(r2_axis.lines[0].get_ydata()) == [b["r2"] for b in qwt_blocks]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:2] == ["before QwT (RepQ-ViT)", "after QwT"] and any("R²" in t for t in labels)


def test_summary_figure(tmp_path, qwt_blocks):
    path = plot_summary(ROWS, {"W4A4": qwt_blocks, "W3A3": qwt_blocks[:2]}, str(tmp_path / "s.png"), "summary")
    _check_png(path, summary_size_px(2))
    data = read_plot_data(path)
    assert list(data["block_sets"]) == ["W4A4", "W3A3"]
    assert len(data["block_sets"]["W3A3"]["blocks"]) == 2
    assert data["accuracy"]["rows"][1]["top1"] == ROWS[1]["top1"]


def test_blocks_before_start_block_are_gaps(tmp_path, qwt_blocks):
    blocks = [dict(qwt_blocks[0], r2=None, applied=False, mse_before=None, mse_after=None), *qwt_blocks[1:]]
    path = plot_block_errors(blocks, str(tmp_path / "b.png"), "start_block 1")
    assert read_plot_data(path)["blocks"][0]["mse_before"] is None


@pytest.mark.parametrize("call,match", [
    (lambda d: plot_accuracy(ROWS, str(d / "a.jpg"), "t"), "must end with .png"),
    (lambda d: plot_accuracy([], str(d / "a.png"), "t"), "no rows"),
    (lambda d: plot_accuracy([{"setting": "W4A4", "top1": 1.0}], str(d / "a.png"), "t"), "lacks method"),
    (lambda d: plot_accuracy([dict(ROWS[0], top1=float("nan"))], str(d / "a.png"), "t"), "finite"),
    (lambda d: plot_accuracy(ROWS + ROWS[:1], str(d / "a.png"), "t"), "repeat"),
    (lambda d: plot_block_errors([{"index": 0, "name": "blocks.0", "r2": 0.5, "applied": True, "rows": 3}],
                                 str(d / "a.png"), "t"), "mse_before"),
    (lambda d: plot_block_errors([], str(d / "a.png"), "t"), "no blocks"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, call, match):
    with pytest.raises(ValueError, match=match) as err:
        call(tmp_path)
    assert "\n" not in str(err.value)
    assert os.listdir(tmp_path) == []


def test_overwrite_is_atomic(tmp_path):
    path = str(tmp_path / "a.png")
    plot_accuracy(ROWS, path, "first")
    plot_accuracy(ROWS[:3], path, "second")
    assert read_plot_data(path)["title"] == "second"
    assert os.listdir(tmp_path) == ["a.png"]


def test_cls_cli_plot_matches_its_json(tmp_path):
    """``--plot`` of the classification CLI: same run as the JSON (accuracy and per-block report)."""
    from cls_helpers import base_argv, make_image_folder
    from cls_repq_vit import cli

    data = make_image_folder(str(tmp_path / "data"))
    out, png = tmp_path / "r.json", tmp_path / "fig" / "r.png"
    res = cli.main(base_argv("deit_small", data, str(out)) + ["--eval_fp", "--plot", str(png)])
    saved = json.loads(out.read_text())
    assert saved["plot"] == str(png)
    _check_png(str(png), summary_size_px(1))
    fig = read_plot_data(str(png))
    tops = {r["method"]: r["top1"] for r in fig["accuracy"]["rows"]}
    assert tops == {"FP32": saved["accuracy"]["fp32"]["top1"], "RepQ-ViT": saved["accuracy"]["baseline"]["top1"],
                    "RepQ-ViT + QwT": saved["accuracy"]["qwt"]["top1"]}
    (blocks,) = fig["block_sets"].values()
    assert [b["mse_after"] for b in blocks["blocks"]] == [b["mse_after"] for b in saved["qwt"]["blocks"]]
    assert res["accuracy"] == saved["accuracy"]


def test_cls_cli_plot_path_checked_before_the_run(tmp_path):
    from cls_helpers import base_argv, make_image_folder
    from cls_repq_vit import cli

    data = make_image_folder(str(tmp_path / "data"))
    with pytest.raises(SystemExit, match=r"--plot .*\.png"):
        cli.main(base_argv("deit_small", data, str(tmp_path / "r.json")) + ["--plot", str(tmp_path / "r.pdf")])
    assert not (tmp_path / "r.json").exists()


def test_det_plot_from_its_json_report(tmp_path, qwt_blocks):
    """The detection tool draws its figure from the summary it writes as JSON (``qwt_report``)."""
    from det_repq_vit.tools import test as det_test

    summary = {"config": "configs/swin/x.py", "w_bits": 4, "a_bits": 4,
               "ap": {"fp": {"bbox": 40.0, "segm": 37.0}, "repq": {"bbox": 30.0, "segm": 28.0},
                      "qwt": {"bbox": 33.0, "segm": 30.0}},
               "qwt_report": {"seconds": 1.0, "blocks": qwt_blocks}}
    path = det_test.write_plot(summary, str(tmp_path / "det.png"))
    _check_png(path, BLOCKS_SIZE_PX)
    data = read_plot_data(path)
    assert [b["mse_before"] for b in data["blocks"]] == [b["mse_before"] for b in qwt_blocks]
    assert "W4A4" in data["title"]
