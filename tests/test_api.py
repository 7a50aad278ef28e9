"""The public API (qwt_core.quantize / calibrate / compensate, the configs, the adapter registry) and
the mistakes it stops with one line before the model changes. Real timm models, random weights."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import qwt_core as qc
from helpers_models import images, tiny_resnet, tiny_swin, tiny_vit
from qwt_core.config import ExportConfig, QuantConfig, QwTConfig
from qwt_core.pipeline import calibrate_repq


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("cfg", [QuantConfig(), QuantConfig(w_bits=3, a_bits=5, act_mode="true"),
                                 QwTConfig(), QwTConfig(gate="insample"), QwTConfig(ridge=0.5, start_block=2),
                                 ExportConfig(compensation="int8", weight_dtype="int8")])
def test_configs_round_trip_through_json(cfg):
    d = json.loads(json.dumps(cfg.to_dict()))
    assert type(cfg).from_dict(d) == cfg


@pytest.mark.parametrize("build,needle", [
    (lambda: QwTConfig(gate="insample", ridge="auto"), "ridge='auto' is chosen on held-out rows"),
    (lambda: QwTConfig(gate="oracle"), "gate='oracle'"),
    (lambda: QwTConfig(ridge=-1.0), "ridge=-1.0"),
    (lambda: QwTConfig(solver="qr"), "solver='qr'"),
    (lambda: QwTConfig(holdout_period=1), "holdout_period=1"),
    (lambda: QuantConfig(w_bits=9), "w_bits=9"),
    (lambda: QuantConfig(act_mode="fake"), "act_mode='fake'"),
    (lambda: ExportConfig(compensation="int4"), "compensation='int4'"),
    (lambda: QwTConfig().replace(bogus=1), "unknown QwT option"),
    (lambda: QwTConfig.from_dict({"config": "quant"}), "not a 'qwt' one"),
])
def test_impossible_configs_cannot_be_built(build, needle):
    with pytest.raises((ValueError, TypeError)) as exc:
        build()
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_ridge_is_stored_explicitly_and_follows_the_gate():
    assert QwTConfig().ridge == "auto" and QwTConfig(gate="insample").ridge == "paper"
    assert QwTConfig().replace(gate="insample").ridge == "paper"
    assert QwTConfig(ridge=0.1).replace(gate="insample", ridge=0.2).ridge == 0.2
    assert QwTConfig(gate="insample").engine_kwargs()["ridge"] is None  # the engine's reference λ


# ----------------------------------------------------------------------------------- registry
def test_quantize_picks_the_adapter_by_model_type():
    assert qc.quantize(tiny_vit(), QuantConfig(4, 4)).meta["adapter"] == "timm_vit"
    assert qc.quantize(tiny_swin(), QuantConfig(4, 4)).meta["adapter"] == "timm_swin"
    qm = qc.quantize(tiny_resnet(), QuantConfig(4, 4, act_mode="true"))
    assert qm.meta["adapter"] == "resnet" and qm.form == "conv" and qm.qwt_config.gate == "insample"
    assert qm.quant_config == QuantConfig(4, 4, act_mode="true")
    assert QuantConfig.from_dict(qm.meta["quant_config"]) == qm.quant_config
    assert {"timm_vit", "timm_swin", "resnet", "hf", "mmdet_swin", "torchvision_rcnn"} <= set(qc.list_adapters())


def test_quantize_recognises_a_torchvision_mask_rcnn():
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    det = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3).eval()
    qm = qc.quantize(det, QuantConfig(8, 8))
    assert qm.meta["adapter"] == "torchvision_rcnn" and qm.form == "conv" and qm.qwt_config.gate == "insample"


def test_quantize_errors_leave_the_model_alone():
    model = nn.Sequential(nn.Linear(4, 4))
    before = _state(model)
    with pytest.raises(ValueError, match="no adapter recognises .*quantize_layers"):
        qc.quantize(model)
    vit = tiny_vit()
    with pytest.raises(ValueError, match="'timm_vit' adapter has no option act_mode"):
        qc.quantize(vit, QuantConfig(act_mode="true"))
    with pytest.raises(ValueError, match="adapter='nope' is not registered"):
        qc.quantize(vit, adapter="nope")
    assert _same(before, _state(model)) and not any(isinstance(m, qc.modules.QuantLinear) for m in vit.modules())


def test_register_adapter_is_used_by_auto():
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), nn.Sequential(nn.Linear(8, 8)))

        def forward(self, x):
            return self.blocks(x)

    def build(model, cfg):
        qc.quantize_layers(model, lambda n, m: qc.LayerBits(cfg.w_bits, cfg.a_bits) if isinstance(m, nn.Linear) else None)
        return qc.QuantizedModel(model, [], ["blocks.0", "blocks.1"], first_block_input=lambda x: x)

    qc.register_adapter("test_tiny", build, lambda m: isinstance(m, Tiny), doc="test")
    try:
        qm = qc.quantize(Tiny(), QuantConfig(6, 6))
        x = torch.randn(64, 8)
        qc.calibrate(qm, x)
        rep = qc.compensate(qm, list(x.split(16)), progress=False)
        assert len(rep.blocks) == 2 and rep.config == QwTConfig().to_dict()
        with pytest.raises(ValueError, match="already registered"):
            qc.register_adapter("test_tiny", build)
    finally:
        from qwt_core import api

        api._REGISTRY.pop("test_tiny", None)


# ------------------------------------------------------------------------------ the way in
def test_calibrate_is_the_published_protocol_bit_for_bit():
    torch.manual_seed(0)
    a, b = tiny_vit(), None
    b = copy.deepcopy(a)
    x = images(8, 32)
    qa = qc.quantize(a, QuantConfig(4, 4))
    qb = qc.adapters.quantize_timm_vit(b, 4, 4)
    rep = qc.calibrate(qa, x)
    calibrate_repq(qb, x)
    assert rep.quantizers > 0 and _same(_state(qa.model), _state(qb.model))
    with torch.no_grad():
        assert torch.equal(qa.model(x), qb.model(x))
    with pytest.raises(ValueError, match="already calibrated"):
        qc.calibrate(qa, x)


def test_compensate_with_config_equals_keyword_changes_and_records_it():
    torch.manual_seed(0)
    x = images(32, 32, seed=1)
    qms = []
    for _ in range(2):
        torch.manual_seed(0)
        qm = qc.quantize(tiny_vit(), QuantConfig(4, 4))
        qc.calibrate(qm, x[:8])
        qms.append(qm)
    cfg = qms[0].qwt_config.replace(gate="insample", start_block=1)
    ra = qc.compensate(qms[0], list(x.split(8)), cfg, progress=False)
    rb = qc.compensate(qms[1], list(x.split(8)), progress=False, gate="insample", start_block=1)
    assert ra.to_dict()["config"] == rb.to_dict()["config"] == cfg.to_dict()
    assert [b.r2 for b in ra.blocks] == [b.r2 for b in rb.blocks] and ra.blocks[0].r2 is None
    with torch.no_grad():
        assert torch.equal(qms[0].model(x[:4]), qms[1].model(x[:4]))


# ---------------------------------------------------------------------- mistakes, one line each
def _calibrated_vit():
    torch.manual_seed(0)
    qm = qc.quantize(tiny_vit(), QuantConfig(4, 4))
    qc.calibrate(qm, images(8, 32))
    return qm


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_compensate_needs_a_quantized_model():
    with pytest.raises(TypeError) as e:
        qc.compensate(tiny_vit(), [images(4, 32)])
    assert "QuantizedModel" in _one_line(e)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    qm = qc.QuantizedModel(model, [], ["0", "1"], first_block_input=lambda x: x)
    with pytest.raises(ValueError) as e:
        qc.compensate(qm, [torch.randn(8, 4)])
    assert "no quantized layer" in _one_line(e)


def test_compensate_before_calibration_names_the_quantizer_and_changes_nothing():
    qm = qc.quantize(tiny_vit(), QuantConfig(4, 4))
    before = _state(qm.model)
    with pytest.raises(ValueError) as e:
        qc.compensate(qm, [images(4, 32)], progress=False)
    msg = _one_line(e)
    assert "not calibrated" in msg and "qwt_core.calibrate" in msg
    assert _same(before, _state(qm.model))


def test_block_that_is_a_linear_layer_is_refused():
    qm = _calibrated_vit()
    qm.block_names = ["blocks.0.attn.qkv", "blocks.1"]
    before = _state(qm.model)
    with pytest.raises(ValueError) as e:
        qc.compensate(qm, [images(8, 32)], progress=False)
    assert "'blocks.0.attn.qkv' is a QuantLinear layer, not a block" in _one_line(e)
    assert _same(before, _state(qm.model))


def test_run_block_with_the_wrong_signature_or_a_tuple_output():
    qm = _calibrated_vit()
    qm.run_block = lambda block, x: block(x)
    with pytest.raises(TypeError) as e:
        qc.compensate(qm, [images(8, 32)], progress=False)
    assert "run_block must take (i, block, x" in _one_line(e)
    qm.run_block = lambda i, block, x: (block(x), None)
    before = _state(qm.model)
    with pytest.raises(TypeError) as e:
        qc.compensate(qm, [images(8, 32)], progress=False)
    assert "returned a tuple, not a Tensor" in _one_line(e)
    assert _same(before, _state(qm.model))


def test_store_device_that_cannot_hold_tensors():
    qm = _calibrated_vit()
    with pytest.raises(ValueError) as e:
        qc.compensate(qm, [images(8, 32)], progress=False, store_device="meta:7")
    assert "store_device='meta:7'" in _one_line(e)


def test_calibrate_needs_quant_layers_and_a_module():
    with pytest.raises(ValueError, match="no quant"):
        qc.calibrate(tiny_vit(), images(4, 32))
    with pytest.raises(TypeError, match="QuantizedModel or an nn.Module"):
        qc.calibrate("model", images(4, 32))
