"""A quantized + compensated model reloads without recalibration and gives the same outputs."""
import functools

import pytest
import torch

from helpers_models import images, tiny_resnet, tiny_swin, tiny_vit
from qwt_core import calibrate, compensate, load_quantized, save_quantized
from qwt_core.compensation import CompensatedBlock
from qwt_core.adapters import quantize_resnet, quantize_timm_swin, quantize_timm_vit
from qwt_core.model_io import state_dict_mismatch
from qwt_core.repq import uninitialized_quantizers

BUILDERS = {
    "vit": (tiny_vit, quantize_timm_vit, 32),
    "swin": (tiny_swin, quantize_timm_swin, 56),   # reduction Linear gains a bias in the reparam
    # default (published) recipe: BatchNorm kept, its statistics come from the file; grouped-conv compensation
    "resnet": (tiny_resnet, quantize_resnet, 64),
    # folded recipe: the rebuild folds BN into the convs again before the saved weights are loaded
    "resnet_folded": (tiny_resnet, functools.partial(quantize_resnet, recipe="folded"), 64),
}


@pytest.mark.parametrize("family", list(BUILDERS))
def test_save_and_reload_roundtrip(tmp_path, family):
    build, quantize, size = BUILDERS[family]
    torch.manual_seed(3)
    qm = quantize(build(), 4, 4)
    x = images(16, size)
    calibrate(qm, x)
    compensate(qm, [x[:8], x[8:]], progress=False)
    with torch.no_grad():
        expected = qm.model(x)
    path = str(tmp_path / "q.pt")
    save_quantized(qm.model, path, {"family": family, "w_bits": 4, "a_bits": 4})

    torch.manual_seed(99)  # a different random init: everything must come from the file
    rebuilt, meta = load_quantized(path, lambda m: quantize(build(), m["w_bits"], m["a_bits"]))
    assert meta["family"] == family
    if family.startswith("resnet"):  # BatchNorm kept by the published recipe, folded away by "folded"
        n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in rebuilt.model.modules())
        assert (n_bn > 0) == (family == "resnet"), n_bn
    assert uninitialized_quantizers(rebuilt.model) == []
    with torch.no_grad():
        got = rebuilt.model(x)
    assert torch.allclose(got, expected, atol=1e-5)


def test_corrupt_and_foreign_files(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_quantized(str(bad), lambda m: None)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}}, foreign)
    with pytest.raises(ValueError, match="not a quantized model"):
        load_quantized(str(foreign), lambda m: None)
    with pytest.raises(FileNotFoundError):
        load_quantized(str(tmp_path / "missing.pt"), lambda m: None)


def test_state_dict_mismatch_names_each_problem():
    own = {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2), "rel.relative_position_index": torch.zeros(1)}
    assert state_dict_mismatch(own, {"a.weight": torch.ones(2, 3), "a.bias": torch.ones(2)},
                               ("relative_position_index",)) == ""
    msg = state_dict_mismatch(own, {"a.weight": torch.ones(3, 3), "b.weight": torch.ones(1)})
    assert "2 missing keys (e.g. 'a.bias')" in msg
    assert "1 unexpected keys (e.g. 'b.weight')" in msg
    assert "1 keys with other shapes (e.g. 'a.weight': (3, 3) vs (2, 3))" in msg


def test_compensated_block_reads_through_to_block():
    block = torch.nn.Sequential(torch.nn.Linear(4, 4))
    block.window_size = 7
    wrapped = CompensatedBlock(block, torch.nn.Linear(4, 4))
    assert wrapped.window_size == 7 and wrapped.block is block
    with pytest.raises(AttributeError):
        wrapped.no_such_attribute
