"""Smoke runs of every kept benchmark at a tiny size (seconds each): they run end to end through the
package's public functions, write their JSON where told, and record the machine they ran on.
The figures themselves come from full runs (``python -m benchmarks.<name>``) into ``results/``."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _machine_ok(m: dict) -> None:
    assert m["cpu"] and isinstance(m["cpu_flags"], list) and m["threads"] >= 1 and m["torch"]


def test_speed_smoke(tmp_path):
    out = tmp_path / "speed.json"
    _run("speed", "--models", "resnet50", "--reps", "1", "--calib_size", "2", "--qwt_size", "2",
         "--eval_size", "2", "--eval_rounds", "1", "--batch_size", "2", "--modes", "eager", "--threads", "1",
         "--device", "cpu", "--output", str(out))
    res = json.loads(out.read_text())
    _machine_ok(res["machine"])
    assert res["complete"] and len(res["rows"]) == 1
    row = res["rows"][0]
    assert all(row["ratios"][k] > 0 for k in ("calibration", "eval", "qwt"))


def test_speed_phases_smoke(tmp_path):
    out = tmp_path / "phases.json"
    _run("speed", "--phases", "--models", "resnet50", "--reps", "1", "--calib_size", "2", "--qwt_size", "2",
         "--batch_size", "2", "--threads", "1", "--device", "cpu", "--no-solve_ab", "--output", str(out))
    res = json.loads(out.read_text())
    _machine_ok(res["machine"])
    assert res["complete"]


def test_speed_bad_count_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--reps", "0", "--output",
                           str(tmp_path / "x.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--reps=0" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_onnx_latency_smoke(tmp_path):
    out = tmp_path / "onnx.json"
    _run("onnx_latency", "--models", "resnet50", "--resnet_w_bits", "8", "--batches", "1", "--rounds", "1", "--warmup", "0",
         "--calib", "2", "--img_size", "64", "--threads", "1", "--out", str(out))
    res = json.loads(out.read_text())
    _machine_ok(res["machine"])
    (info,) = res["models"].values()
    assert info["latency"]["1"]["median_ms"]


def test_qwt_calib_size_smoke(tmp_path):
    out = tmp_path / "calib.json"
    _run("qwt_calib_size", "--sizes", "8", "16", "--draws", "1", "--epochs", "1", "--depth", "1",
         "--n_test", "64", "--output", str(out))
    res = json.loads(out.read_text())
    _machine_ok(res["machine"])
    assert res["runs"]


def test_resnet_recipe_smoke(tmp_path):
    pytest.importorskip("timm")
    out = tmp_path / "recipe.json"
    _run("resnet_recipe", "--bits", "W4A4", "--act_modes", "true", "--recipes", "published", "--epochs", "1",
         "--threads", "1", "--cache", str(tmp_path / "cache"), "--output", str(out))
    res = json.loads(out.read_text())
    _machine_ok(res["machine"])
    assert res["rows"]


def test_datafree_smoke(tmp_path):
    _run("datafree", "--seeds", "0", "--bits", "W4A4", "--iterations", "2", "--synth_batch", "256", "--jobs", "1",
         "--out", str(tmp_path / "df"))
    res = json.loads((tmp_path / "df" / "results.json").read_text())
    _machine_ok(res["machine"])
    assert "W4A4" in json.dumps(res)
