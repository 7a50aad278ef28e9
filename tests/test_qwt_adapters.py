"""QwT on every timm adapter: each compensated block is closer to FP on the calibration data, and
the end-to-end logits move closer to FP."""
import pytest
import torch

from helpers_models import images, tiny_resnet, tiny_swin, tiny_vit
from qwt_core import calibrate, compensate, quant_disabled
from qwt_core.compensation import CompensatedBlock
from qwt_core.qwt import apply_qwt
from qwt_core.adapters import quantize_resnet, quantize_timm_swin, quantize_timm_vit
from qwt_core.modules import set_quant_state

CASES = {
    "vit": (lambda: tiny_vit(), quantize_timm_vit, 32, {}),
    "deit_distilled": (lambda: tiny_vit(distilled=True), quantize_timm_vit, 32, {}),
    "swin": (tiny_swin, quantize_timm_swin, 56, {}),
    "resnet_true": (tiny_resnet, quantize_resnet, 64, {"act_mode": "true"}),
    "resnet_reference8": (tiny_resnet, quantize_resnet, 64, {"act_mode": "reference8"}),
}


def _block_errors(qm, batches):
    """Per block: (MSE of block_q to FP, MSE of compensated block to FP) on the QwT inputs."""
    model = qm.model
    errors = []
    with torch.no_grad():
        for batch in batches:
            x = qm.first_block_input(batch)
            for i, name in enumerate(qm.block_names):
                if i > 0 and qm.transition is not None:
                    x = qm.transition(i, x)
                blk = model.get_submodule(name)
                inner = blk.block if isinstance(blk, CompensatedBlock) else blk
                y_q = inner(x)
                with quant_disabled(inner):
                    y_fp = inner(x)
                y_c = blk(x)
                if len(errors) <= i:
                    errors.append([0.0, 0.0])
                errors[i][0] += (y_q - y_fp).pow(2).mean().item()
                errors[i][1] += (y_c - y_fp).pow(2).mean().item()
                x = y_c
    return errors


@pytest.mark.parametrize("case", list(CASES))
def test_qwt_reduces_block_and_output_error(case):
    build, quantize, size, kwargs = CASES[case]
    model = build()
    calib = images(64, size, seed=1)
    with torch.no_grad():
        fp_logits = model(calib)
    qm = quantize(model, 4, 4, **kwargs)
    calibrate(qm, calib[:32])
    with torch.no_grad():
        q_logits = model(calib)
    batches = [calib[:32], calib[32:]]
    report = compensate(qm, batches, progress=False)
    assert len(report.blocks) == len(qm.block_names)
    assert any(b.applied for b in report.blocks)
    for b in report.blocks:
        assert b.applied == (b.r2 > 0)
        assert b.rows > 0
    errors = _block_errors(qm, batches)
    for i, (err_q, err_c) in enumerate(errors):
        assert err_c <= err_q * (1 + 1e-4) + 1e-12, f"block {i}: {err_c} > {err_q}"
    assert sum(c for _, c in errors) < sum(q for q, _ in errors)
    with torch.no_grad():
        qwt_logits = model(calib)
    assert (qwt_logits - fp_logits).pow(2).mean() < (q_logits - fp_logits).pow(2).mean()


def test_start_block_leaves_early_blocks_alone():
    model = tiny_vit()
    x = images(32, 32)
    qm = quantize_timm_vit(model, 4, 4)
    calibrate(qm, x)
    report = compensate(qm, [x], start_block=2, progress=False)
    assert [b.r2 is None for b in report.blocks] == [True, True, False]
    assert not isinstance(model.blocks[0], CompensatedBlock)
    assert isinstance(model.blocks[2], CompensatedBlock)


def test_generic_entry_point_on_a_plain_model():
    """apply_qwt on a user model: a stack of quantized MLP blocks, no adapter."""
    from torch import nn

    from qwt_core import LayerBits, quantize_layers

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x):
            return x + self.fc2(torch.relu(self.fc1(x)))

    model = nn.Sequential(nn.Linear(8, 16), Block(), Block()).eval()
    quantize_layers(model, lambda name, m: None if name == "0" else LayerBits(3, 3))
    data = [torch.randn(64, 8) for _ in range(3)]
    with torch.no_grad():
        model(data[0])  # calibrate the quantizers
    set_quant_state(model, True, True)
    report = apply_qwt(model, ["1", "2"], data, first_block_input=lambda b: model[0](b), progress=False)
    assert all(b.r2 is not None and b.r2 > 0 for b in report.blocks)
    assert isinstance(model[1], CompensatedBlock)


def test_conv_form_rejects_token_inputs():
    from torch import nn
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    with pytest.raises(ValueError, match="NCHW"):
        apply_qwt(model, ["0"], [torch.randn(2, 4)], lambda b: b, form="conv", progress=False)
