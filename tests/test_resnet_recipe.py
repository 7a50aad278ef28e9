"""The ResNet Percentile recipe is the published QwT ResNet script's, point by point (issue 8).

BatchNorm kept as fp32 modules; weights per output channel and conv/fc inputs per tensor with the
RepQ-ViT three-candidate MSE quantizer, initialised by one forward of the calibration batch; stem and
fc at W8/A8; the reference8 / true bit tables; the recipe in the CLI JSON; save / load.
"""
import copy
import inspect
import json
import os

import pytest
import timm
import torch
from torch import nn

from cls_helpers import base_argv, make_image_folder
from cls_repq_vit import cli
from helpers_models import images, randomize_batchnorms
from qwt_core import calibrate, compensate, load_quantized, save_quantized
from qwt_core.compensation import CompensatedBlock
from qwt_core.quantizers import UniformQuantizer
from qwt_core.adapters import quantize_resnet
from qwt_core.modules import set_quant_state
from qwt_core.adapters.timm_resnet import PUBLISHED_QWT_CONFIG, fold_all_batchnorms
from qwt_core.modules import QuantConv2d, QuantLinear
from qwt_core.quantizers import PercentileQuantizer

SIZE = 32
#: a real timm ResNet-18 (BasicBlock, 2-2-2-2, timm layer names) with other stage widths so the tests
#: run in seconds: layer1.0 reads 64 channels (1 QwT group), layer2.0 reads 128 (2 groups, stride 2).
SMALL = {"num_classes": 10, "channels": (128, 64, 32, 32), "zero_init_last": False}
pytestmark = pytest.mark.skipif(
    "channels" not in inspect.signature(timm.models.resnet.ResNet).parameters,
    reason=f"timm {timm.__version__} builds no narrow ResNet (ResNet(channels=...) came in timm 1.0.9)")


def small_resnet() -> nn.Module:
    """Random-init narrow timm resnet18 with non-trivial BatchNorm statistics (eval mode)."""
    return randomize_batchnorms(timm.create_model("resnet18", pretrained=False, **SMALL).eval())


def _quant_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))]


def _n_bn(model):
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def _reference_init(x: torch.Tensor, bits: int):
    """The published per-tensor initialisation, written out with torch.quantile: for p in
    (0.999, 0.9999, 0.99999) clip to [q(1-p), q(p)], keep the smallest MSE (first wins ties)."""
    x = x.reshape(-1)
    best, delta, zero = 1e10, None, None
    for p in (0.999, 0.9999, 0.99999):
        hi, lo = torch.quantile(x, p), torch.quantile(x, 1.0 - p)
        d = (hi - lo) / (2 ** bits - 1)
        z = torch.round(-lo / d)
        xq = (torch.clamp(torch.round(x / d) + z, 0, 2 ** bits - 1) - z) * d
        score = (x - xq).pow(2).mean()
        if score < best:
            best, delta, zero = score, d, z
    return delta, zero


def _calibrated(recipe="published", act_mode="reference8", w_bits=4, a_bits=4, n=8, capture=False):
    """A quantized tiny ResNet-18 calibrated on ``n`` images; optionally the raw input of every
    quant layer in the first (initialising) forward."""
    fp = small_resnet()
    model = copy.deepcopy(fp)
    qm = quantize_resnet(model, w_bits, a_bits, act_mode=act_mode, recipe=recipe)
    x = images(n, SIZE, seed=2)
    seen = {}
    hooks = []
    if capture:
        for name, layer in _quant_layers(model):
            hooks.append(layer.register_forward_pre_hook(
                lambda mod, inp, name=name: seen.setdefault(name, inp[0].detach().clone())))
    calibrate(qm, x)
    for h in hooks:
        h.remove()
    return fp, qm, x, seen


def test_published_recipe_keeps_batchnorm_and_quant_off_is_the_fp_model():
    fp, qm, x, _ = _calibrated()
    model = qm.model
    assert _n_bn(model) == _n_bn(fp) == 21  # stem + 16 in blocks + 4 downsample
    assert not any(m.bias is not None for _, m in _quant_layers(model) if isinstance(m, QuantConv2d))
    with torch.no_grad():
        set_quant_state(model, False, False)
        off = model(x)
        ref = fp(x)
        set_quant_state(model, True, True)
        on = model(x)
    assert torch.equal(off, ref)
    assert (on - ref).pow(2).mean() > 1e-4 * ref.pow(2).mean()  # W4 weights do change the output


def test_folded_recipe_folds_every_batchnorm_and_keeps_the_function():
    fp, qm, x, _ = _calibrated(recipe="folded")
    model = qm.model
    assert _n_bn(model) == 0
    assert qm.meta["recipe"]["bn_folded_count"] == 21
    with torch.no_grad():
        set_quant_state(model, False, False)
        off = model(x)
        ref = fp(x)
    assert torch.allclose(off, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_fold_refuses_a_batchnorm_without_its_conv():
    model = small_resnet()
    model.extra_bn = nn.BatchNorm2d(8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="extra_bn"):
        fold_all_batchnorms(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing changed


def test_each_quantizer_is_the_repq_uniform_quantizer_on_the_tensor_it_saw():
    _, qm, _, seen = _calibrated(capture=True)
    layers = _quant_layers(qm.model)
    assert len(layers) == 22 and set(seen) == {n for n, _ in layers}  # 21 convs + fc, all reached
    for name, layer in layers:
        for q in (layer.input_quantizer, layer.weight_quantizer):
            assert type(q) is UniformQuantizer and q.percentiles == (0.999, 0.9999, 0.99999), name
        # input: per tensor, on the (already quantized upstream) input of the first forward
        x = seen[name]
        fresh = UniformQuantizer(layer.input_quantizer.n_bits)
        fresh.initialize(x)
        assert layer.input_quantizer.delta.numel() == 1, name
        assert torch.equal(layer.input_quantizer.delta, fresh.delta), name
        assert torch.equal(layer.input_quantizer.zero_point, fresh.zero_point), name
        d_ref, z_ref = _reference_init(x, layer.input_quantizer.n_bits)
        assert torch.allclose(layer.input_quantizer.delta, d_ref, rtol=1e-5, atol=0), name
        assert torch.equal(layer.input_quantizer.zero_point.reshape(()), z_ref), name
        # weight: per output channel
        w = layer.weight.detach()
        fresh = UniformQuantizer(layer.weight_quantizer.n_bits, channel_wise=True, channel_dim=0)
        fresh.initialize(w)
        assert layer.weight_quantizer.delta.shape[0] == w.shape[0], name
        assert torch.equal(layer.weight_quantizer.delta, fresh.delta), name
        assert torch.equal(layer.weight_quantizer.zero_point, fresh.zero_point), name
        for c in (0, w.shape[0] // 2, w.shape[0] - 1):
            d_ref, z_ref = _reference_init(w[c], layer.weight_quantizer.n_bits)
            assert torch.allclose(layer.weight_quantizer.delta[c].reshape(()), d_ref, rtol=1e-5), name
            assert torch.equal(layer.weight_quantizer.zero_point[c].reshape(()), z_ref), name


def test_the_old_choices_would_give_other_parameters():
    """Guard against the test above passing vacuously: min/max weights and a fixed 0.9999 clip
    (the previous ResNet baseline) calibrate to different (Δ, z) on the same tensors."""
    _, qm, _, seen = _calibrated(capture=True)
    layer = qm.model.layer2[0].conv1
    x = seen["layer2.0.conv1"]
    old_act = PercentileQuantizer(layer.input_quantizer.n_bits, 0.9999)
    old_act.initialize(x)
    old_w = PercentileQuantizer(layer.weight_quantizer.n_bits, 1.0, channel_wise=True, channel_dim=0)
    old_w.initialize(layer.weight.detach())
    assert not torch.equal(old_w.delta, layer.weight_quantizer.delta)
    assert not torch.equal(old_act.delta, layer.input_quantizer.delta) or \
        not torch.equal(old_act.zero_point, layer.input_quantizer.zero_point)


@pytest.mark.parametrize("act_mode", ["reference8", "true"])
def test_bit_table(act_mode):
    qm = quantize_resnet(small_resnet(), 4, 3, act_mode=act_mode)
    conv_a = 8 if act_mode == "reference8" else 3
    for name, layer in _quant_layers(qm.model):
        expected = (8, 8) if name in ("conv1", "fc") else (4, conv_a)
        got = (layer.weight_quantizer.n_bits, layer.input_quantizer.n_bits)
        assert got == expected, f"{name}: {got} != {expected}"
    rec = qm.meta["recipe"]
    assert rec["bits"] == {"conv1": [8, 8], "fc": [8, 8], "other_convs": [4, conv_a]}
    assert rec["act_mode"] == act_mode


def test_qwt_settings_are_the_published_ones():
    qm = quantize_resnet(small_resnet(), 4, 4)
    assert qm.form == "conv"
    c = qm.qwt_config
    assert (c.conv_kernel, c.conv_group_channels, c.ridge, c.gate, c.conv_r2_mean) == \
        (1, 64, 1e-3, "insample", "channel_position")
    assert c == PUBLISHED_QWT_CONFIG
    assert qm.block_names == ["layer1.0", "layer1.1", "layer2.0", "layer2.1",
                              "layer3.0", "layer3.1", "layer4.0", "layer4.1"]
    rec = qm.meta["recipe"]
    assert rec["name"] == "published" and rec["bn_folded"] is False
    assert rec["qwt"] == {"form": "conv", **PUBLISHED_QWT_CONFIG.to_dict()}
    json.dumps(qm.meta)  # JSON friendly


def _published_fit(x: torch.Tensor, y: torch.Tensor, groups: int, stride: int):
    """The published ResNet least squares written out directly: per group, [patches, 1] → Y with
    (AᵀA + 1e-3·I)⁻¹AᵀY on every column (intercept included); R² with SS_tot around the
    per-(channel, position) mean over the batch. x: (B, C_in, H, W), y: (B, C_out, H', W')."""
    x, y = x.double(), y.double()
    b, c_out, h, w = y.shape
    cin_g, cout_g = x.shape[1] // groups, c_out // groups
    pred = torch.empty_like(y)
    for g in range(groups):
        xg = x[:, g * cin_g:(g + 1) * cin_g, ::stride, ::stride]  # 1x1 kernel, padding 0
        a = xg.permute(0, 2, 3, 1).reshape(-1, cin_g)
        a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], dim=1)
        t = y[:, g * cout_g:(g + 1) * cout_g].permute(0, 2, 3, 1).reshape(-1, cout_g)
        theta = torch.linalg.solve(a.T @ a + 1e-3 * torch.eye(a.shape[1], dtype=a.dtype), a.T @ t)
        pred[:, g * cout_g:(g + 1) * cout_g] = (a @ theta).reshape(b, h, w, cout_g).permute(0, 3, 1, 2)
    ss_tot = (y - y.mean(dim=0)).pow(2).sum()
    ss_res = (y - pred).pow(2).sum()
    return float(1 - ss_res / ss_tot)


def test_qwt_r2_is_the_published_one_for_the_resnet_blocks():
    """End to end: the R² that gates each block equals the published formula on the same features
    (block 0: 64 channels → 1 group, stride 1; block 2 = layer2.0: 128 channels → 2 groups, stride 2)."""
    from qwt_core import quant_disabled
    _, qm, x, _ = _calibrated(n=16)
    model = qm.model
    report = compensate(qm, [x[:8], x[8:]], progress=False)
    assert report.gate == "insample"
    with torch.no_grad():
        feats = qm.first_block_input(x)
        inputs = {}
        for name in qm.block_names:
            inputs[name] = feats
            feats = model.get_submodule(name)(feats)
        for index, groups, stride in ((0, 1, 1), (2, 2, 2)):
            name = qm.block_names[index]
            blk = model.get_submodule(name)
            inner = blk.block if isinstance(blk, CompensatedBlock) else blk
            xin = inputs[name]
            y_q = inner(xin)
            with quant_disabled(inner):
                y_fp = inner(xin)
            expected = _published_fit(xin, y_fp - y_q, groups, stride)
            got = report.blocks[index]
            assert got.r2 == pytest.approx(expected, abs=1e-6), name
            assert got.applied == (expected > 0)
            assert isinstance(blk, CompensatedBlock) == (expected > 0)
            if isinstance(blk, CompensatedBlock):
                assert blk.compensation.groups == groups and blk.compensation.stride == (stride, stride)


def test_save_and_reload_keeps_the_batchnorm_modules(tmp_path):
    recipe = "published"  # folded files are reloaded by test_cli_loads_files_saved_before_the_recipe_existed
    _, qm, x, _ = _calibrated(recipe=recipe, n=16)
    compensate(qm, [x[:8], x[8:]], progress=False)
    assert any(isinstance(m, CompensatedBlock) for m in qm.model.modules())
    with torch.no_grad():
        expected = qm.model(x)
    path = str(tmp_path / "r.pt")
    save_quantized(qm.model, path, qm.meta)
    torch.manual_seed(7)
    rebuilt, meta = load_quantized(path, lambda m: quantize_resnet(
        small_resnet(), m["w_bits"], m["a_bits"], m["act_mode"], m["resnet_recipe"]))
    assert meta["recipe"]["name"] == recipe
    assert _n_bn(rebuilt.model) == 21
    with torch.no_grad():
        got = rebuilt.model(x)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("imagefolder")))


CLI_KWARGS = {**SMALL, "num_classes": 3}


def _argv(data_dir, out, *extra):
    argv = base_argv("resnet18", data_dir, out)
    i = argv.index("--model_kwargs")
    kwargs = [f"{k}={v!r}".replace(" ", "") for k, v in CLI_KWARGS.items()]
    return argv[:i] + list(extra) + ["--img_size", str(SIZE), "--model_kwargs", *kwargs]


def test_cli_records_the_recipe_and_reloads(data_dir, tmp_path):
    out, saved = str(tmp_path / "r.json"), str(tmp_path / "q.pt")
    res = cli.main(_argv(data_dir, out, "--save_quantized", saved))
    with open(out) as f:
        js = json.load(f)
    rec = js["recipe"]
    assert rec["name"] == "published" and rec["bn_folded"] is False
    assert rec["weight_quantizer"].startswith("uniform, per output channel")
    assert rec["act_quantizer"].startswith("uniform, per tensor")
    assert rec["bits"] == {"conv1": [8, 8], "fc": [8, 8], "other_convs": [4, 8]}
    assert rec["qwt"]["gate"] == "insample" and rec["qwt"]["ridge"] == 1e-3
    assert rec["qwt"]["conv_r2_mean"] == "channel_position"
    loaded_out = str(tmp_path / "loaded.json")
    argv = _argv(data_dir, loaded_out, "--load_quantized", saved)
    loaded = cli.main(argv)
    assert loaded["recipe"]["name"] == "published"
    assert loaded["accuracy"]["loaded"]["top1"] == res["accuracy"]["qwt"]["top1"]


def test_cli_folded_recipe(data_dir, tmp_path):
    out = str(tmp_path / "f.json")
    cli.main(_argv(data_dir, out, "--resnet_recipe", "folded", "--act_mode", "true", "--skip_qwt"))
    with open(out) as f:
        rec = json.load(f)["recipe"]
    assert rec["name"] == "folded" and rec["bn_folded"] is True and rec["bn_folded_count"] == 21
    assert rec["bits"]["other_convs"] == [4, 4]


def test_cli_recipe_flag_only_for_resnet(data_dir, capsys):
    argv = base_argv("deit_small", data_dir, os.devnull) + ["--resnet_recipe", "folded"]
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    msg = str(exc.value.code)
    assert "ResNet" in msg and "\n" not in msg


def test_cli_loads_files_saved_before_the_recipe_existed(tmp_path):
    """Files written before --resnet_recipe have no recipe in their meta: they hold folded models."""
    spec_kwargs = dict(CLI_KWARGS)
    from cls_repq_vit.models import MODELS
    model = MODELS["resnet18"].create(spec_kwargs)
    qm = quantize_resnet(model, 4, 4, recipe="folded")
    x = images(4, SIZE)
    calibrate(qm, x)
    with torch.no_grad():
        expected = model(x)
    path = str(tmp_path / "old.pt")
    save_quantized(model, path, {"model": "resnet18", "w_bits": 4, "a_bits": 4, "act_mode": "reference8",
                                 "model_kwargs": spec_kwargs, "img_size": SIZE, "qwt": False})
    rebuilt, meta = cli.load_saved(path, torch.device("cpu"))
    assert rebuilt.meta["resnet_recipe"] == "folded"
    with torch.no_grad():
        assert torch.allclose(rebuilt.model(x), expected, atol=1e-6, rtol=0)


def test_published_resnet18_checkpoint_name_is_found(tmp_path):
    """The QwT ResNet-18 row uses BRECQ's ``resnet18_imagenet.pth.tar`` (a torchvision-layout state
    dict): found in pretrained_weights/ and loaded into the timm model."""
    from cls_repq_vit.models import MODELS
    spec = MODELS["resnet18"]
    src = spec.create(CLI_KWARGS)
    torch.save(src.state_dict(), tmp_path / "resnet18_imagenet.pth.tar")
    model, source = spec.build(None, pretrained=True, model_kwargs=CLI_KWARGS, weights_dir=str(tmp_path))
    assert source.endswith("resnet18_imagenet.pth.tar")
    assert torch.equal(model.layer2[0].downsample[0].weight, src.layer2[0].downsample[0].weight)
