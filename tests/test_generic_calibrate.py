"""qwt_core.calibrate (RepQ-ViT calibration for any model) and quantize_layers' double-call guard.

Real components only: timm ViT / Swin and transformers BERT / LLaMA / Gemma built from tiny configs
with random weights (no download).
"""
import copy
import warnings

import pytest
import torch
from torch import nn

from helpers_models import images, tiny_swin, tiny_vit
from qwt_core import LayerBits, quantize_layers
from qwt_core.modules import QuantLinear
from qwt_core.adapters import quantize_timm_swin, quantize_timm_vit
from qwt_core.calibrate import calibrate, calibration_mask, find_ln_pairs
from qwt_core.modules import quant_disabled, quantizers
from qwt_core.pipeline import calibrate_repq

transformers = pytest.importorskip("transformers")


def _names(model, pairs):
    names = {id(m): n for n, m in model.named_modules()}
    return sorted((names[id(a)], names[id(b)]) for a, b in pairs)


def _inited(model):
    return [n for n, q in quantizers(model) if q.is_inited]


# --------------------------------------------------------------------------- quantize_layers
def test_quantize_layers_twice_is_a_clear_error_and_changes_nothing():
    model = tiny_vit()
    rule = lambda name, m: LayerBits(4, 4) if name.startswith("blocks.") else None  # noqa: E731
    swapped = quantize_layers(model, rule)
    assert swapped and all(isinstance(m, QuantLinear) for m in swapped.values())
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"already quantized \(e\.g\. 'blocks\.0\.attn\.qkv'\)"):
        quantize_layers(model, rule)
    assert {n: type(m) for n, m in model.named_modules()} == before
    # quantizing *other* layers in a second call is allowed
    more = quantize_layers(model, lambda name, m: LayerBits(8, 8) if name == "head" else None)
    assert list(more) == ["head"]
    with pytest.raises(ValueError, match="selected none"):
        quantize_layers(model, lambda name, m: None)


# --------------------------------------------------------------------------- auto pairs
def test_auto_pairs_on_timm_vit_match_the_adapter_and_give_the_same_model():
    torch.manual_seed(0)
    base = tiny_vit()
    x = images(8, 32)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    qa, qb = quantize_timm_vit(a, 4, 4), quantize_timm_vit(b, 4, 4)
    found, skipped = find_ln_pairs(b, lambda: b(x))
    assert not _inited(b)  # detection alone changes nothing
    assert sorted((n, ln) for n, lins in found for ln in lins) == _names(b, qb.ln_pairs)
    assert skipped == {}
    calibrate_repq(qa, x)
    report = calibrate(b, lambda: b(x), ln_pairs="auto")
    assert sorted(report.pairs) == _names(b, qb.ln_pairs)
    assert report.skipped == [] and report.per_tensor == []
    assert all(g.mode == "layernorm" for g in report.groups)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


def test_auto_pairs_follow_layout_ops_in_swin():
    m = tiny_swin()
    qm = quantize_timm_swin(m, 4, 4)
    x = images(2, 56)
    found, skipped = find_ln_pairs(m, lambda: m(x))
    got = sorted((n, ln) for n, lins in found for ln in lins)
    assert got == _names(m, qm.ln_pairs), skipped


# --------------------------------------------------------------------------- post-LN (BERT)
def _tiny_bert(**kw):
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, **kw)
    return transformers.BertModel(cfg).eval()


def test_post_ln_bert_is_detected_and_skipped():
    torch.manual_seed(0)
    model = _tiny_bert()
    ids = torch.randint(5, 50, (4, 12))
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[0, 8:] = 0
    with quant_disabled(model):
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    cw = (".attention.self.query", ".attention.self.key", ".attention.self.value", ".intermediate.dense")
    quantize_layers(model, lambda n, m: LayerBits(8, 8, act_channel_wise=n.endswith(cw))
                    if n.startswith("encoder.layer.") else None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = calibrate(model, lambda: model(input_ids=ids, attention_mask=mask), ln_pairs="auto",
                           row_mask=mask)
    msgs = [str(w.message) for w in caught if "calibrate:" in str(w.message)]
    assert len(msgs) == 1 and "post-LN" in msgs[0]
    skipped = {g.norm: g.reason for g in report.skipped}
    # every LayerNorm feeding q/k/v or the FFN also feeds the residual add
    assert set(skipped) == {"embeddings.LayerNorm", "encoder.layer.0.output.LayerNorm",
                            "encoder.layer.0.attention.output.LayerNorm",
                            "encoder.layer.1.attention.output.LayerNorm"}
    assert all("residual stream: post-LN" in r for r in skipped.values())
    assert report.pairs == []
    assert len(report.per_tensor) == 8
    assert not any(getattr(q, "channel_wise", False) for n, q in quantizers(model)
                   if n.endswith("input_quantizer"))
    with quant_disabled(model):  # nothing was folded: the FP function is untouched
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).last_hidden_state, ref)
    # explicit pairs are checked the same way (skipped, not folded)
    m2 = _tiny_bert()
    quantize_layers(m2, lambda n, m: LayerBits(8, 8, act_channel_wise=n.endswith(cw))
                    if n.startswith("encoder.layer.") else None)
    with pytest.warns(UserWarning, match="post-LN"):
        r2 = calibrate(m2, lambda: m2(input_ids=ids),
                       ln_pairs=[("embeddings.LayerNorm", "encoder.layer.0.attention.self.query")])
    assert not r2.groups[0].applied


# --------------------------------------------------------------------------- RMSNorm (LLaMA), (1+γ) (Gemma)
def _decoder_rule(n, m):
    cw = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    if not n.startswith("model.layers.") or not isinstance(m, nn.Linear):
        return None
    return LayerBits(4, 4, act_channel_wise=n.endswith(cw))


def test_rmsnorm_scale_fold_is_exact_in_fp_and_found_automatically():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # uneven channel ranges, like real LLM activations
        for layer in model.model.layers:
            layer.input_layernorm.weight.mul_(torch.linspace(0.2, 5.0, 32)[torch.randperm(32)])
    ids = torch.randint(0, 64, (3, 10))
    with quant_disabled(model):
        ref = model(input_ids=ids).logits
    quantize_layers(model, _decoder_rule)
    report = calibrate(model, lambda: model(input_ids=ids, use_cache=False))
    applied = {g.norm: (g.mode, sorted(g.linears)) for g in report.groups if g.applied}
    assert applied["model.layers.0.input_layernorm"] == ("scale_only", [
        "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"])
    assert applied["model.layers.1.post_attention_layernorm"][0] == "scale_only"
    assert len(applied) == 4 and report.skipped == [] and report.per_tensor == []
    with quant_disabled(model):
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)
    q = model.model.layers[0].self_attn.q_proj.input_quantizer
    assert not q.channel_wise and q.delta.numel() == 1 and q.is_inited


def test_one_plus_gamma_norm_is_not_folded():
    cfg = transformers.GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=32)
    model = transformers.GemmaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.model.layers[0].input_layernorm.parameters():
            p.normal_()
    ids = torch.randint(0, 64, (2, 8))
    with quant_disabled(model):
        ref = model(input_ids=ids).logits
    quantize_layers(model, _decoder_rule)
    with pytest.warns(UserWarning, match="not exact"):
        report = calibrate(model, lambda: model(input_ids=ids, use_cache=False))
    assert {g.norm for g in report.skipped} == {"model.layers.0.input_layernorm",
                                                "model.layers.0.post_attention_layernorm"}
    with quant_disabled(model):
        torch.testing.assert_close(model(input_ids=ids).logits, ref)


# --------------------------------------------------------------------------- masks
def test_calibration_mask_initialises_on_real_rows_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    quantize_layers(model, lambda n, m: LayerBits(4, 4))
    x = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    x[~mask] = 1e3  # padding garbage: would dominate an unmasked init
    report = calibrate(model, lambda: model(x), ln_pairs=None, row_mask=mask)
    assert report.masked == ["0", "2"] and report.unmasked == []
    ref = copy.deepcopy(model[0].input_quantizer)
    ref.reset()
    ref.initialize(x[mask])
    torch.testing.assert_close(model[0].input_quantizer.delta, ref.delta.reshape(model[0].input_quantizer.delta.shape))
    assert float(model[0].input_quantizer.delta) < 1.0
    # a callable mask (forward over batches) and a mismatching shape (recorded, not masked)
    m2 = nn.Sequential(nn.Linear(8, 4))
    quantize_layers(m2, lambda n, m: LayerBits(4, 4))
    with calibration_mask(m2, lambda: torch.ones(2, 2, dtype=torch.bool)) as masked:
        m2(x)
    assert masked == []


def test_calibrate_errors_before_anything_changes():
    model = tiny_vit()
    x = images(2, 32)
    with pytest.raises(ValueError, match="no quant layers"):
        calibrate(model, lambda: model(x))
    qm = quantize_timm_vit(model, 4, 4)
    with pytest.raises(ValueError, match="'blocks.0.nrom1' is not a submodule"):
        calibrate(model, lambda: model(x), ln_pairs=[("blocks.0.nrom1", "blocks.0.attn.qkv")])
    with pytest.raises(ValueError, match="blocks.0.attn.proj is not a QuantLinear with a channel-wise"):
        calibrate(model, lambda: model(x), ln_pairs=[("blocks.0.norm1", "blocks.0.attn.proj")])
    with pytest.raises(ValueError, match="ln_pairs='all'"):
        calibrate(model, lambda: model(x), ln_pairs="all")
    assert not _inited(model)
    calibrate(qm, lambda: model(x))  # a QuantizedModel is accepted
    with pytest.raises(ValueError, match="already calibrated"):
        calibrate(model, lambda: model(x))
