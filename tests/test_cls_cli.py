"""Classification command line: bad input gives one-line errors; registry, checkpoint and data helpers."""
import os
import subprocess
import sys

import pytest
import timm
import torch

from cls_helpers import base_argv, make_image_folder
from cls_repq_vit import cli
from cls_repq_vit.data import CalibrationSet, ShardSampler, eval_transform
from cls_repq_vit.evaluate import evaluate, logits_of
from cls_repq_vit.models import FAMILY_MODELS, MODELS, get_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("imagefolder")))


def _script(name, *args, timeout=120):
    return subprocess.run([sys.executable, os.path.join(ROOT, "cls_repq_vit", name), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _one_line_exit(argv, capsys, choices=None):
    """Run main(argv) in process; return the SystemExit message (must be one line, non-zero)."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv, choices=choices)
    code = exc.value.code
    msg = code if isinstance(code, str) else capsys.readouterr().err.strip()
    assert code not in (0, None)
    assert msg and "\n" not in msg.strip(), msg
    assert "Traceback" not in msg
    return msg


# ------------------------------------------------------------------------------------ bad input
def test_unknown_model_subprocess(data_dir):
    res = _script("qwt_vit_and_deit.py", "--model", "deit_huge", "--data_dir", data_dir)
    assert res.returncode != 0
    err = res.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "deit_huge" in err and "deit_small_distilled" in err and "vit_base" in err


def test_family_script_rejects_other_family(data_dir):
    res = _script("qwt_swin.py", "--model", "resnet50", "--data_dir", data_dir)
    assert res.returncode != 0
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and "swin_tiny, swin_small" in err, err


@pytest.mark.parametrize("flag,value", [("--w_bit", "9"), ("--a_bit", "1"), ("--w_bits", "16"),
                                        ("--a_bits", "four")])
def test_bits_outside_2_to_8(data_dir, capsys, flag, value):
    argv = base_argv("deit_small", data_dir, os.devnull) + [flag, value]
    msg = _one_line_exit(argv, capsys)
    assert "2 to 8" in msg and value in msg


def test_missing_data_dir_subprocess(tmp_path):
    res = _script("qwt_resnet.py", "--model", "resnet18", "--data_dir", str(tmp_path / "nope"))
    assert res.returncode != 0
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and "nope" in err and "does not exist" in err, err


def test_data_dir_without_val(tmp_path, capsys):
    (tmp_path / "train" / "a").mkdir(parents=True)
    msg = _one_line_exit(base_argv("deit_small", str(tmp_path), os.devnull), capsys)
    assert "val" in msg and "missing" in msg


def test_empty_val_folder(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    msg = _one_line_exit(base_argv("deit_small", str(tmp_path), os.devnull), capsys)
    assert "val" in msg and "no images" in msg


def test_checkpoint_with_wrong_keys(data_dir, tmp_path, capsys):
    wrong = tmp_path / "resnet_weights.pth"
    torch.save({"state_dict": timm.create_model("resnet18", num_classes=3).state_dict()}, wrong)
    argv = base_argv("deit_small", data_dir, os.devnull)
    argv.remove("--random-init")
    msg = _one_line_exit(argv + ["--checkpoint", str(wrong)], capsys)
    assert "missing keys" in msg and "unexpected keys" in msg and "conv1.weight" in msg
    assert "--model" in msg  # says how to fix it


def test_missing_checkpoint_file(data_dir, tmp_path, capsys):
    argv = base_argv("deit_small", data_dir, os.devnull)
    argv.remove("--random-init")
    msg = _one_line_exit(argv + ["--checkpoint", str(tmp_path / "none.pth")], capsys)
    assert "not found" in msg


def test_act_mode_only_for_resnet(data_dir, capsys):
    msg = _one_line_exit(base_argv("deit_small", data_dir, os.devnull) + ["--act_mode", "true"], capsys)
    assert "ResNet" in msg


def test_start_block_beyond_depth(data_dir, tmp_path, capsys):
    argv = base_argv("deit_small", data_dir, str(tmp_path / "r.json")) + ["--start_block", "5"]
    msg = _one_line_exit(argv, capsys)
    assert "--start_block 5" in msg and "2 blocks" in msg


# ------------------------------------------------------------------------------------- registry
def test_registry_covers_the_scripts_and_preprocessing():
    assert set(FAMILY_MODELS["vit"]) == {"vit_small", "vit_base", "deit_tiny", "deit_small", "deit_base",
                                         "deit_tiny_distilled", "deit_small_distilled",
                                         "deit_base_distilled"}
    assert FAMILY_MODELS["swin"] == ["swin_tiny", "swin_small"]
    assert FAMILY_MODELS["resnet"] == ["resnet18", "resnet50", "resnet101"]
    assert MODELS["deit_small"].resize_size() == 256 and MODELS["deit_small"].std[0] == 0.229
    assert MODELS["vit_base"].resize_size() == 248 and MODELS["vit_base"].mean == (0.5, 0.5, 0.5)
    assert MODELS["swin_tiny"].crop_pct == 0.9 and MODELS["swin_tiny"].mean[0] == 0.485
    assert MODELS["resnet50"].hub_name == "resnet50.tv_in1k" and MODELS["resnet50"].crop_pct == 0.875
    assert "deit_small_patch16_224-cd65a155.pth" in MODELS["deit_small"].weight_file_names()
    t = eval_transform(MODELS["vit_small"])
    assert t.transforms[0].size == 248 and t.transforms[1].size == (224, 224)
    with pytest.raises(SystemExit, match="unknown model"):
        get_spec("resnet34")


@pytest.mark.parametrize("wrapper", ["plain", "model", "state_dict", "module_prefix", "safetensors"])
def test_checkpoint_formats_load(tmp_path, wrapper):
    spec = MODELS["deit_small"]
    kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, num_classes=3)
    src = spec.create(kwargs)
    sd = src.state_dict()
    path = tmp_path / ("w.safetensors" if wrapper == "safetensors" else "w.pth")
    if wrapper == "safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        blob = {"plain": sd, "model": {"model": sd, "epoch": 3}, "state_dict": {"state_dict": sd},
                "module_prefix": {f"module.{k}": v for k, v in sd.items()}}[wrapper]
        torch.save(blob, path)
    torch.manual_seed(123)
    model, source = spec.build(str(path), pretrained=True, model_kwargs=kwargs)
    assert str(path) in source
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_local_pretrained_weights_dir(tmp_path):
    spec = MODELS["resnet18"]
    src = spec.create({"num_classes": 3})
    torch.save(src.state_dict(), tmp_path / "resnet18.tv_in1k.pth")
    model, source = spec.build(None, pretrained=True, model_kwargs={"num_classes": 3},
                               weights_dir=str(tmp_path))
    assert "resnet18.tv_in1k.pth" in source
    assert torch.equal(model.fc.weight, src.fc.weight)


# ----------------------------------------------------------------------------------------- data
def test_calibration_split_across_ranks(data_dir):
    spec = MODELS["deit_small"]
    full = CalibrationSet(data_dir, spec, 32, calib_size=24, repq_calib_size=8, seed=5)
    shards = [CalibrationSet(data_dir, spec, 32, 24, 8, seed=5, rank=r, world_size=2) for r in range(2)]
    assert len(full.qwt_indices) == 24 and all(len(s.qwt_indices) == 12 for s in shards)
    assert sorted(shards[0].qwt_indices + shards[1].qwt_indices) == sorted(full.qwt_indices)
    assert shards[0].repq_indices == shards[1].repq_indices == full.repq_indices  # same quantizers
    other_seed = CalibrationSet(data_dir, spec, 32, 24, 8, seed=6)
    assert other_seed.qwt_indices != full.qwt_indices


def test_shard_sampler_counts_each_image_once():
    n, world = 21, 4
    parts = [list(ShardSampler(n, r, world)) for r in range(world)]
    assert sorted(i for p in parts for i in p) == list(range(n))
    assert [len(ShardSampler(n, r, world)) for r in range(world)] == [len(p) for p in parts]


def test_distilled_deit_evaluates_mean_of_both_heads():
    model = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8,
                              embed_dim=48, depth=1, num_heads=3, num_classes=3).eval()
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        cls_logits, dist_logits = model.head(feats[:, 0]), model.head_dist(feats[:, 1])
    expected = ((cls_logits + dist_logits) / 2).argmax(-1)
    acc = evaluate(model, [(x, expected)], "cpu", progress=False)
    assert acc.top1 == 100.0 and acc.count == 16
    # a tuple output (distilled training mode) is averaged the same way
    assert torch.allclose(logits_of((cls_logits, dist_logits)), (cls_logits + dist_logits) / 2)
    # and the average is what was scored: against the cls head alone the score differs wherever
    # the heads disagree
    agree = (cls_logits.argmax(-1) == expected).float().mean().item() * 100
    assert evaluate(model, [(x, cls_logits.argmax(-1))], "cpu", progress=False).top1 == pytest.approx(agree)


# ------------------------------------------------------------------------------ fused fake quant
def test_fused_fake_quant_flag_gives_the_same_numbers(data_dir, tmp_path):
    """--fused_fake_quant (torch.compile kernels) changes the speed, not the results."""
    import json

    from qwt_core import quantizers as qz

    runs = {}
    try:
        for name, extra in (("eager", []), ("fused", ["--fused_fake_quant"])):
            out = tmp_path / f"{name}.json"
            cli.main(base_argv("deit_small", data_dir, str(out)) + extra)
            runs[name] = json.loads(out.read_text())
    finally:
        qz.set_fused_fake_quant(False)
    assert runs["eager"]["fused_fake_quant"] is False and runs["fused"]["fused_fake_quant"] is True
    for method in ("baseline", "qwt"):
        fused, eager = runs["fused"]["accuracy"][method], runs["eager"]["accuracy"][method]
        assert (fused["top1"], fused["top5"], fused["count"]) == (eager["top1"], eager["top5"], eager["count"])
    for a, b in zip(runs["fused"]["qwt"]["blocks"], runs["eager"]["qwt"]["blocks"]):
        assert a["applied"] == b["applied"] and a["r2"] == pytest.approx(b["r2"], rel=1e-6, abs=1e-9)


def test_fused_fake_quant_without_compiler_is_one_line(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ / clang++ here
    monkeypatch.delenv("CXX", raising=False)
    argv = base_argv("deit_small", data_dir, str(tmp_path / "r.json")) + ["--fused_fake_quant", "--device", "cpu"]
    msg = _one_line_exit(argv, capsys)
    assert "C++ compiler" in msg and not (tmp_path / "r.json").exists()


def test_compile_model_flag_evaluates_through_torch_compile(data_dir, tmp_path, monkeypatch):
    """--compile_model: every evaluation runs through torch.compile of the whole model (one graph;
    counted here), the JSON says so, and the accuracies are the eager ones up to the rounding of
    inductor's fused FP ops (at most one of the 21 images moves)."""
    import json

    import torch
    from helpers_models import counting_compile

    compiled_calls = []
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile_model"])):
        out = tmp_path / f"{name}.json"
        with monkeypatch.context() as m:
            m.setattr(torch, "compile", counting_compile(compiled_calls))
            cli.main(base_argv("deit_small", data_dir, str(out)) + ["--batch_size", "7"] + extra)
        runs[name] = json.loads(out.read_text())
    assert compiled_calls == ["VisionTransformer", "VisionTransformer"]  # baseline, + QwT
    assert runs["eager"]["compile_model"] is False and runs["compiled"]["compile_model"] is True
    for method in ("baseline", "qwt"):
        comp, eager = runs["compiled"]["accuracy"][method], runs["eager"]["accuracy"][method]
        assert comp["count"] == eager["count"] == 21
        assert abs(comp["top1"] - eager["top1"]) <= 100 / 21 + 1e-9, (method, comp, eager)


def test_compile_model_without_compiler_is_one_line(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ / clang++ here
    monkeypatch.delenv("CXX", raising=False)
    argv = base_argv("deit_small", data_dir, str(tmp_path / "r.json")) + ["--compile_model"]
    msg = _one_line_exit(argv, capsys)
    assert "--compile_model" in msg and "C++ compiler" in msg and not (tmp_path / "r.json").exists()


# ------------------------------------------------------------------------------ QwT gate / ridge
def test_qwt_gate_flag_reaches_apply_qwt(data_dir, tmp_path):
    """--qwt_gate insample: the papers' rule (in-sample R², λ 0) reaches apply_qwt and the JSON."""
    import json

    runs = {}
    for name, extra in (("default", []), ("insample", ["--qwt_gate", "insample"]),
                        ("fixed", ["--qwt-gate", "holdout", "--qwt-ridge", "0.5"]),
                        ("cholesky", ["--qwt_solver", "cholesky"])):
        out = tmp_path / f"{name}.json"
        cli.main(base_argv("deit_small", data_dir, str(out)) + extra)
        runs[name] = json.loads(out.read_text())
    assert (runs["default"]["qwt_gate"], runs["default"]["qwt_ridge"]) == ("holdout", "auto")
    assert (runs["insample"]["qwt_gate"], runs["insample"]["qwt_ridge"]) == ("insample", 0.0)
    assert (runs["fixed"]["qwt_gate"], runs["fixed"]["qwt_ridge"]) == ("holdout", 0.5)
    assert runs["insample"]["qwt"]["gate"] == "insample" and runs["insample"]["qwt"]["ridge"] == 0.0
    ins, hold = runs["insample"]["qwt"]["blocks"], runs["default"]["qwt"]["blocks"]
    # the gate's R² is the in-sample one with insample, the held-out one with holdout
    assert all(b["r2"] == b["r2_insample"] for b in ins)
    assert all(b["r2"] == b["r2_heldout"] for b in hold)
    assert [b["r2"] for b in ins] != [b["r2"] for b in hold]
    assert all(b["ridge"] == 0.0 for b in ins)
    assert all(b["ridge"] == pytest.approx(0.5) for b in runs["fixed"]["qwt"]["blocks"])
    # --qwt_solver reaches every block (auto: eigh on the CPU); Cholesky gives eigh's decisions
    assert runs["default"]["qwt"]["solver"] == "auto" and {b["solver"] for b in hold} == {"eigh"}
    chol = runs["cholesky"]["qwt"]["blocks"]
    assert runs["cholesky"]["qwt"]["solver"] == "cholesky" and {b["solver"] for b in chol} == {"cholesky"}
    assert [b["applied"] for b in chol] == [b["applied"] for b in hold]


def test_qwt_gate_flag_overrides_resnet_recipe(data_dir):
    """ResNet keeps its published insample/λ 1e-3 unless a flag is given; --qwt_gate holdout → auto λ."""
    spec = get_spec("resnet18")
    qm = cli.quantize_model(spec.create({"num_classes": 3}), spec, 4, 4)

    def effective(*extra):
        args = cli.build_parser().parse_args(base_argv("resnet18", data_dir, os.devnull) + list(extra))
        cli.validate_args(args)
        cfg = qm.qwt_config.replace(**args.qwt_options)
        return cfg.gate, 1e-3 if cfg.ridge == "paper" else cfg.ridge  # "paper": the conv form's λ

    assert effective() == ("insample", 1e-3)                      # the published recipe
    assert effective("--qwt_gate", "insample") == ("insample", 1e-3)
    assert effective("--qwt_gate", "holdout") == ("holdout", "auto")
    assert effective("--qwt_ridge", "0.01") == ("insample", 0.01)
    assert effective("--qwt_gate", "holdout", "--qwt_ridge", "0") == ("holdout", 0.0)
    args = cli.build_parser().parse_args(base_argv("resnet18", data_dir, os.devnull) + ["--qwt-solver", "eigh"])
    cli.validate_args(args)
    assert qm.qwt_config.replace(**args.qwt_options).solver == "eigh"


@pytest.mark.parametrize("extra,needle", [
    (["--qwt_gate", "oracle"], "--qwt_gate"),
    (["--qwt_ridge", "-1"], "--qwt_ridge"),
    (["--qwt_ridge", "big"], "--qwt_ridge"),
    (["--qwt_ridge", "nan"], "--qwt_ridge"),
    (["--qwt_gate", "insample", "--qwt_ridge", "auto"], "holdout"),
    (["--qwt_gate", "insample", "--skip_qwt"], "--skip_qwt"),
    (["--qwt_solver", "qr"], "--qwt_solver"),
    (["--qwt_solver", "eigh", "--skip_qwt"], "--skip_qwt"),
])
def test_qwt_gate_bad_values(data_dir, capsys, extra, needle):
    msg = _one_line_exit(base_argv("deit_small", data_dir, os.devnull) + extra, capsys)
    assert needle in msg


def test_qwt_ridge_auto_needs_holdout_on_resnet(data_dir, capsys):
    msg = _one_line_exit(base_argv("resnet18", data_dir, os.devnull) + ["--qwt_ridge", "auto"], capsys)
    assert "holdout" in msg and "insample" in msg
