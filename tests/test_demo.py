"""The first ten minutes: `scripts/demo.py` end to end on a short schedule (real digits, real timm DeiT,
the real classification CLI), its JSON ↔ figure ↔ README table agreement, its determinism across
process counts, and the detection tool's one-line instruction when the detection layer is missing."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qwt_core.plotting import read_plot_data, summary_size_px

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import demo  # noqa: E402

ARGS = ["--seeds", "0", "1", "--bits", "W3A3", "--epochs", "1"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo"))
    summary = demo.main(ARGS + ["--out", out, "--jobs", "2"])
    return out, summary


def test_demo_writes_json_runs_and_figure(demo_run):
    out, summary = demo_run
    saved = json.load(open(os.path.join(out, "demo_results.json")))
    assert saved == json.loads(json.dumps(summary))
    assert saved["seeds"] == [0, 1] and saved["settings"] == ["W3A3"] and saved["train"]["epochs"] == 1
    r = saved["results"]["W3A3"]
    for key in ("fp32", "baseline", "qwt"):
        per = [s["runs"]["W3A3"]["accuracy"][key]["top1"] for s in saved["per_seed"]]
        assert r[key]["per_seed"] == [round(v, 2) for v in per]
        assert r[key]["mean"] == round(sum(per) / 2, 2)
        assert r[key]["std"] == pytest.approx(abs(per[0] - per[1]) / 2 ** 0.5, abs=0.01)  # n - 1
        assert all(s["runs"]["W3A3"]["accuracy"][key]["count"] == saved["dataset"]["val"] == 540
                   for s in saved["per_seed"])
    for s in saved["per_seed"]:  # every number comes from a CLI run whose JSON is kept
        run = json.load(open(os.path.join(out, s["runs"]["W3A3"]["json"])))
        assert run["accuracy"] == s["runs"]["W3A3"]["accuracy"] and run["seed"] == s["seed"]
        assert run["w_bit"] == 3 and run["a_bit"] == 3
    assert saved["blocks"]["W3A3"] == saved["per_seed"][0]["runs"]["W3A3"]["blocks"]
    assert len(saved["blocks"]["W3A3"]) == demo.MODEL_KWARGS["depth"]


def test_demo_figure_is_drawn_from_the_json(demo_run):
    from PIL import Image

    out, summary = demo_run
    png = os.path.join(out, "demo.png")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == summary_size_px(1)
    data = read_plot_data(png)
    assert data["accuracy"]["rows"] == demo.accuracy_rows(summary)
    assert {r["method"] for r in data["accuracy"]["rows"]} == {"FP32", "RepQ-ViT", "RepQ-ViT + QwT"}
    (blocks,) = data["block_sets"].values()
    assert [b["mse_before"] for b in blocks["blocks"]] == [b["mse_before"] for b in summary["blocks"]["W3A3"]]
    # --plot-only redraws the same figure from the JSON alone
    os.remove(png)
    demo.main(["--out", out, "--plot-only"])
    assert read_plot_data(png) == data


def test_readme_table_is_the_json(demo_run, capsys):
    out, summary = demo_run
    demo.main(["--out", out, "--readme-table"])
    table = capsys.readouterr().out
    r = summary["results"]["W3A3"]
    row = [line for line in table.splitlines() if line.startswith("| W3A3 |")][0]
    for key in ("fp32", "baseline", "qwt"):
        assert f"{r[key]['mean']:.2f} ± {r[key]['std']:.2f}" in row
    assert "seeds 0, 1" in table


def test_demo_exports_a_real_int8_onnx_model(demo_run):
    """Issue 11 item 5: the demo's W8A8 + QwT model runs as an int8 QDQ graph in onnxruntime."""
    out, summary = demo_run
    d = summary["deploy"]
    assert d["seed"] == 0 and d["setting"] == "W8A8" and d["images"] == 540
    assert os.path.getsize(os.path.join(out, d["onnx"])) > 0 and os.path.getsize(os.path.join(out, d["onnx_fp"])) > 0
    assert d["quantized_in_float"] == [] and d["integer_layers"] > 0
    assert sum(d["ort_integer_ops"].values()) >= d["integer_layers"] // 2
    assert abs(d["top1_ort_int8"] - d["top1_fake_quant"]) <= 0.2 and d["identical_predictions"] >= 0.99
    assert all(v > 0 for v in d["latency_ms"].values())
    assert "ONNX int8" in demo.format_deploy(d)


def test_demo_is_deterministic_across_process_counts(demo_run):
    """One process instead of two, same seeds: the same models (cached) and the same numbers."""
    out, summary = demo_run
    again = demo.main(ARGS + ["--out", out, "--jobs", "1", "--no-onnx"])
    assert again["deploy"] is None
    assert all(s["train"]["cached"] for s in again["per_seed"])
    assert again["results"] == summary["results"]
    def numbers(blocks):  # everything but the wall-clock seconds
        return {k: [{f: v for f, v in b.items() if f != "seconds"} for b in bs] for k, bs in blocks.items()}

    assert numbers(again["blocks"]) == numbers(summary["blocks"])


def test_demo_retrain_reproduces_the_model(demo_run, tmp_path):
    """Training again with the same seed gives the same weights (fixed threads, deterministic ops)."""
    import torch

    out, _ = demo_run
    path = str(tmp_path / "m.pth")
    with demo.deterministic():
        demo.train_demo_model(path, 1, dict(demo.TRAIN, epochs=1), out)
    a = torch.load(path, weights_only=True)["model"]
    b = torch.load(os.path.join(out, "models", "deit_digits_seed1.pth"), weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_demo_bad_arguments_are_one_line(tmp_path):
    for argv, match in ((["--bits", "W9"], "must look like W4A4"), (["--bits", "W1A4"], "2..8"),
                        (["--seeds", "0", "0"], "repeats"), (["--epochs", "0"], "at least 1")):
        with pytest.raises(SystemExit, match=match):
            demo.main(argv + ["--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit, match="run `make demo`"):
        demo.main(["--out", str(tmp_path / "none"), "--readme-table"])


def test_det_tool_names_the_command_when_the_detection_layer_is_missing(tmp_path):
    """Without mmcv (hidden here), tools/test.py exits with one line that says what to run."""
    code = ("import sys, runpy; sys.modules['mmcv'] = None; "
            "sys.argv = ['tools/test.py', 'configs/swin/x.py', 'x.pth', '--fp']; "
            "runpy.run_path('det_repq_vit/tools/test.py', run_name='__main__')")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert "`make det`" in lines[0] and "mmcv" in lines[0]


def test_shipped_models_match_the_default_recipe():
    """The models in scripts/demo_models are used only if their recorded recipe is the default one:
    a change of TRAIN or MODEL_KWARGS without retraining them would silently make `make demo` train."""
    for seed in demo.DEFAULT_SEEDS:
        assert demo.is_cached(demo.shipped_model(seed), seed, demo.TRAIN), seed
