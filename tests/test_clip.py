"""CLIP task (mm_clip) on a tiny random-init open_clip model with tiny data written here: webdataset
shards of image-caption pairs and an ImageNet-style folder. CPU only, no network."""
import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile

import open_clip
import pytest
import torch
from PIL import Image

from torch.utils.data import DataLoader

from mm_clip.errors import InputError
from mm_clip.imagenet_zeroshot_data import (IMAGENET_CLASSNAMES, IMAGENET_WNIDS,
                                            OPENAI_IMAGENET_TEMPLATES)
from mm_clip.main import main, prepare
from mm_clip.models import canonical_model_name, load_clip, register_model_config, resolve_pretrained
from mm_clip.wds_calib import draw_samples, expand_shards, index_shards, sample_calibration_pairs
from mm_clip.zeroshot import evaluate_zero_shot
from qwt_core import calibrate
from qwt_core.compensation import CompensatedBlock
from qwt_core.modules import QuantConv2d, QuantLinear, set_quant_state
from qwt_core.quantizers import UniformQuantizer
from qwt_core import compensate as qwt_compensate
from qwt_core.adapters.open_clip import (OpenCLIPSelfAttention, ZeroShotHead, quantize_open_clip_text,
                                         quantize_open_clip_visual, quantize_zero_shot_head, swap_attention)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
WNIDS = ["n01440764", "n01443537", "n02085620"]  # tench, goldfish, Chihuahua
WORDS = "a photo of dog cat fish red blue green small large on the grass water tree sky".split()
NUM_SHARDS, PER_SHARD = 12, 8


def _jpeg(rng: random.Random, size: int = 40) -> bytes:
    img = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(6):  # a few random rectangles so images differ in structure, not just colour
        x0, y0 = rng.randrange(size - 8), rng.randrange(size - 8)
        img.paste(tuple(rng.randrange(256) for _ in range(3)),
                  (x0, y0, x0 + rng.randrange(4, 8), y0 + rng.randrange(4, 8)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="session")
def clip_data(tmp_path_factory):
    """Shards ``cc3m-train-{0000..0011}.tar`` (8 pairs each, plus one caption-less member), a val folder
    with 3 WordNet-id classes x 4 images, and the tiny model config."""
    root = tmp_path_factory.mktemp("clip_data")
    rng = random.Random(0)
    shard_dir = root / "shards"
    shard_dir.mkdir()
    for s in range(NUM_SHARDS):
        with tarfile.open(shard_dir / f"cc3m-train-{s:04d}.tar", "w") as tf:
            for j in range(PER_SHARD):
                key = f"{s:04d}{j:05d}"
                _add(tf, f"{key}.jpg", _jpeg(rng))
                _add(tf, f"{key}.txt", " ".join(rng.choice(WORDS) for _ in range(6)).encode())
                _add(tf, f"{key}.json", b"{}")
            _add(tf, f"{s:04d}99999.jpg", _jpeg(rng))  # no caption: not a sample
    val = root / "val"
    for w in WNIDS:
        (val / w).mkdir(parents=True)
        for j in range(4):
            (val / w / f"img{j}.JPEG").write_bytes(_jpeg(rng))
    config = root / "tiny_clip.json"
    config.write_text(json.dumps(TINY_CONFIG))
    return {"root": root, "val": str(val), "config": str(config),
            "shards": str(shard_dir / ("cc3m-train-{0000..%04d}.tar" % (NUM_SHARDS - 1)))}


def _base_args(d, choice, out):
    return ["--choice", choice, "--model-config", d["config"], "--pretrained", "none",
            "--imagenet-val", d["val"], "--restrict-classes", "--train-data", d["shards"],
            "--dataset-type", "webdataset", "--workers", "0", "--index-cache", "none",
            "--output", str(out), "--no-progress"]


def _exit_message(argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    msg = str(exc.value.code)
    assert msg.startswith("error: ") and "\n" not in msg
    return msg


# --- shipped metadata -------------------------------------------------------------------------------

def test_zeroshot_metadata_shapes_and_anchors():
    assert len(IMAGENET_WNIDS) == len(set(IMAGENET_WNIDS)) == 1000
    assert list(IMAGENET_WNIDS) == sorted(IMAGENET_WNIDS)  # ImageFolder order = standard index order
    assert all(re.fullmatch(r"n\d{8}", w) for w in IMAGENET_WNIDS)
    assert len(IMAGENET_CLASSNAMES) == 1000 and len(OPENAI_IMAGENET_TEMPLATES) == 80
    assert all(t.count("{}") == 1 for t in OPENAI_IMAGENET_TEMPLATES)
    index = dict(zip(IMAGENET_WNIDS, IMAGENET_CLASSNAMES))
    assert index["n01440764"] == "tench" and index["n01443537"] == "goldfish"
    assert index["n02085620"] == "Chihuahua" and index["n15075141"] == "toilet paper"
    assert OPENAI_IMAGENET_TEMPLATES[0] == "a bad photo of a {}."


def test_model_name_spellings():
    assert canonical_model_name("ViT-B/32") == "ViT-B-32"
    assert canonical_model_name("ViT-B-32") == "ViT-B-32"
    assert canonical_model_name("vit-l/14") == "ViT-L-14"
    with pytest.raises(InputError, match="unknown model"):
        canonical_model_name("ViT-Q/99")


def test_pretrained_resolution_and_local_checkpoint(clip_data, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    assert resolve_pretrained("ViT-B-32", None, str(weights)) == ("openai", True)
    assert resolve_pretrained("ViT-B-32", "none", str(weights)) == (None, False)
    (weights / "ViT-B-32-openai.bin").write_bytes(b"")
    assert resolve_pretrained("ViT-B-32", None, str(weights)) == (str(weights / "ViT-B-32-openai.bin"), True)
    assert resolve_pretrained("ViT-B-32", "openai", str(weights))[0] == str(weights / "ViT-B-32-openai.bin")
    with pytest.raises(InputError, match="no such checkpoint"):
        resolve_pretrained("ViT-B-32", str(tmp_path / "missing.pt"), str(weights))
    with pytest.raises(InputError, match="not a checkpoint file nor an open_clip tag"):
        resolve_pretrained("ViT-B-32", "no-such-tag", str(weights))
    # A local checkpoint of the tiny model loads its weights (QuickGELU forced as for OpenAI weights).
    name = register_model_config(clip_data["config"])
    model, _, _ = load_clip(name, None, torch.device("cpu"))
    ckpt = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    source, is_openai = resolve_pretrained(name, str(ckpt), str(weights))
    assert (source, is_openai) == (str(ckpt), False)
    loaded, _, _ = load_clip(name, source, torch.device("cpu"), quick_gelu=True)
    torch.testing.assert_close(loaded.visual.conv1.weight, model.visual.conv1.weight)
    assert isinstance(loaded.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    assert not isinstance(model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)


# --- attention swap ---------------------------------------------------------------------------------

@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_swap_is_exact(batch_first):
    torch.manual_seed(0)
    tr = open_clip.transformer.Transformer(width=32, layers=2, heads=4, batch_first=batch_first).eval()
    x = torch.randn(3, 7, 32)  # Transformer.forward takes (B, L, D); blocks see (L, B, D) if not batch first
    causal = torch.full((7, 7), float("-inf")).triu(1)
    with torch.no_grad():
        ref, ref_masked = tr(x), tr(x, attn_mask=causal)
        assert swap_attention(tr) == 2
        assert isinstance(tr.resblocks[0].attn, OpenCLIPSelfAttention)
        torch.testing.assert_close(tr(x), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tr(x, attn_mask=causal), ref_masked, atol=1e-5, rtol=1e-5)


def test_attention_swap_masks_match_multihead_attention():
    """Boolean / float masks, a key padding mask and is_causal give nn.MultiheadAttention's result."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
    attn = OpenCLIPSelfAttention(mha).eval()
    x = torch.randn(2, 5, 16)
    causal_bool = torch.ones(5, 5, dtype=torch.bool).triu(1)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    with torch.no_grad():
        for kwargs in ({"attn_mask": causal_bool}, {"key_padding_mask": pad},
                       {"attn_mask": causal_bool.float().masked_fill(causal_bool, float("-inf")),
                        "key_padding_mask": torch.zeros(2, 5).masked_fill(pad, float("-inf"))}):
            ref = mha(x, x, x, need_weights=False, **kwargs)[0]
            torch.testing.assert_close(attn(x, x, x, **kwargs)[0], ref, atol=1e-5, rtol=1e-5)
        ref = mha(x, x, x, need_weights=False, attn_mask=causal_bool)[0]
        torch.testing.assert_close(attn(x, x, x, is_causal=True)[0], ref, atol=1e-5, rtol=1e-5)


def test_adapter_block_inputs_reproduce_the_towers(clip_data):
    """first_block_input + run_block over the block list give the towers' transformer outputs
    (quantization off), so QwT sees the real block inputs: visual tokens after ln_pre, text
    embeddings with the causal mask."""
    name = register_model_config(clip_data["config"])
    model, _, tokenizer = load_clip(name, None, torch.device("cpu"))
    images = torch.randn(3, 3, 32, 32)
    tokens = tokenizer(["a red fish", "the dog on the grass", "sky"])
    with torch.no_grad():
        ref_v = model.visual.transformer(model.visual._embeds(images))
        emb = model.token_embedding(tokens) + model.positional_embedding
        ref_t = model.transformer(emb, attn_mask=model.attn_mask)
        ref_t_nomask = model.transformer(emb)
        qv = quantize_open_clip_visual(model.visual, 4, 4, patch_embed_bits=(8, 8))
        qt = quantize_open_clip_text(model, 4, 4)
        set_quant_state(model, False, False)
        for qm, batch, ref in ((qv, images, ref_v), (qt, tokens, ref_t)):
            x = qm.first_block_input(batch)
            for i, block_name in enumerate(qm.block_names):
                block = qm.model.get_submodule(block_name)
                x = qm.run_block(i, block, x) if qm.run_block else block(x)
            torch.testing.assert_close(x, ref, atol=1e-5, rtol=1e-5)
        assert (ref_t - ref_t_nomask).abs().max() > 1e-3  # the mask matters
        assert len(qv.ln_pairs) == len(qt.ln_pairs) == 4
        assert isinstance(model.visual.conv1, QuantConv2d) and model.visual.conv1.w_bits == 8
        assert model.visual.transformer.resblocks[0].attn.in_proj.w_bits == 4
        assert model.transformer.resblocks[1].mlp.c_proj.a_bits == 4


def test_quantized_attention_matmul_path():
    """The explicit (quantizable) matmul path computes the same attention as nn.MultiheadAttention
    when its quantizers pass values through, and 8-bit products change it only a little."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    attn = OpenCLIPSelfAttention(mha, a_bits=8, quant_matmul=True).eval()
    x = torch.randn(2, 9, 32)
    mask = torch.full((9, 9), float("-inf")).triu(1)
    quantizers = [attn.matmul1.quantizer_a, attn.matmul1.quantizer_b,
                  attn.matmul2.quantizer_a, attn.matmul2.quantizer_b]
    with torch.no_grad():
        ref = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
        for q in quantizers:
            q.enabled = False  # explicit path, no rounding
        torch.testing.assert_close(attn(x, x, x, attn_mask=mask)[0], ref, atol=1e-5, rtol=1e-5)
        for q in quantizers:
            q.enabled = True
        out = attn(x, x, x, attn_mask=mask)[0]
        assert all(q.is_inited for q in quantizers)
        set_quant_state(attn, False, False)  # fused FP path
        torch.testing.assert_close(attn(x, x, x, attn_mask=mask)[0], ref, atol=1e-5, rtol=1e-5)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.1


# --- calibration sampling ---------------------------------------------------------------------------

def test_global_sampling_draws_across_shards(clip_data):
    shards = expand_shards(clip_data["shards"])
    assert len(shards) == NUM_SHARDS
    indexes = index_shards(shards, workers=2, cache_dir=None, progress=False)
    assert [len(ix) for ix in indexes] == [PER_SHARD] * NUM_SHARDS  # caption-less member skipped
    draws = {seed: draw_samples(indexes, 16, seed) for seed in range(10)}
    for seed, refs in draws.items():
        assert len(refs) == 16 and len({(r.shard, r.key) for r in refs}) == 16
        assert len({r.shard for r in refs}) > 1
    assert draws[0] == draw_samples(indexes, 16, 0)  # deterministic for a seed
    assert draws[0] != draws[1]
    used = {r.shard for refs in draws.values() for r in refs}
    assert used == set(shards)  # not biased to the first shards: every shard gets drawn
    assert len(draw_samples(indexes, NUM_SHARDS * PER_SHARD, 3)) == NUM_SHARDS * PER_SHARD
    with pytest.raises(InputError, match="fewer than"):
        draw_samples(indexes, NUM_SHARDS * PER_SHARD + 1, 0)


def test_sampled_pairs_decode_and_index_cache(clip_data, tmp_path):
    pairs, refs, total = sample_calibration_pairs(clip_data["shards"], 10, 5, workers=1,
                                                  cache_dir=str(tmp_path), progress=False)
    assert total == NUM_SHARDS * PER_SHARD and len(pairs) == len(refs) == 10
    assert all(img.size == (40, 40) and len(cap.split()) == 6 for img, cap in pairs)
    assert len(os.listdir(tmp_path)) == NUM_SHARDS  # one cached index per shard
    again, refs2, _ = sample_calibration_pairs(clip_data["shards"], 10, 5, workers=1,
                                               cache_dir=str(tmp_path), progress=False)
    assert refs2 == refs and [c for _, c in again] == [c for _, c in pairs]


# --- bad input ----------------------------------------------------------------------------------------

def test_bad_inputs_give_one_line_errors(clip_data, tmp_path):
    d = clip_data
    out = tmp_path / "r.json"
    args = _base_args(d, "image_only", out)

    def with_arg(flag, value):
        a = list(args)
        if flag in a:
            i = a.index(flag)
            if value is None:
                del a[i:i + 2]
            else:
                a[i + 1] = value
        else:
            a += [flag, value]
        return a

    assert "--train-data is required" in _exit_message(with_arg("--train-data", None))
    missing = str(d["root"] / "nowhere" / "cc3m-train-{0000..0003}.tar")
    assert "matches no files" in _exit_message(with_arg("--train-data", missing))
    too_many = d["shards"].replace("%04d" % (NUM_SHARDS - 1), "%04d" % (NUM_SHARDS + 1))
    assert "2 of 14 shards" in _exit_message(with_arg("--train-data", too_many))
    bad_model = [a for a in with_arg("--model", "ViT-Q/99") if a not in ("--model-config", d["config"])]
    assert "unknown model 'ViT-Q/99'" in _exit_message(bad_model)
    assert "no such directory" in _exit_message(with_arg("--imagenet-val", str(tmp_path / "val")))
    assert "--imagenet-val is required" in _exit_message(with_arg("--imagenet-val", None))
    assert "--wq_params=9" in _exit_message(with_arg("--wq_params", "9"))
    assert "--aq_params=1" in _exit_message(with_arg("--aq_params", "1"))
    assert "no such file" in _exit_message(with_arg("--model-config", str(tmp_path / "x.json")))
    assert "fewer than the 4096" in _exit_message(with_arg("--iter", "128"))  # 128 x 32
    assert not out.exists()


# --- end to end ---------------------------------------------------------------------------------------

def _assert_accuracy(res, n_images=12):
    assert res["num_images"] == n_images and res["num_classes"] == len(WNIDS)
    assert 0.0 <= res["top1"] <= res["top5"] <= 100.0


def _assert_qwt_reduces_block_error(tower):
    errors = tower["block_errors"]
    assert len(errors) == 2 and tower["qwt"] is not None
    applied = [e for e in errors if e["compensated"]]
    assert applied, "QwT compensated no block"
    for e in errors:
        assert e["mse_quant"] > 0
        if e["compensated"]:
            assert e["mse_compensated"] < e["mse_quant"]
        else:
            assert e["mse_compensated"] == e["mse_quant"]
    assert tower["embedding_rel_mse_repq_qwt"] < tower["embedding_rel_mse_repq"]


def test_fp32_eval_end_to_end(clip_data, tmp_path):
    out = tmp_path / "fp32.json"
    res = main(_base_args(clip_data, "fp32_eval", out) + ["--batch-size", "5"])
    _assert_accuracy(res)
    saved = json.loads(out.read_text())
    assert saved["top1"] == res["top1"] and "calibration" not in saved and "visual" not in saved


def test_image_only_with_qwerty_reduces_visual_error(clip_data, tmp_path):
    out = tmp_path / "img.json"
    res = main(_base_args(clip_data, "image_only", out) +
               ["--batch-size", "8", "--iter", "5", "--repq-size", "16", "--wq_params", "4",
                "--aq_params", "4", "--qwerty", "--diagnostics", "--seed", "1"])
    _assert_accuracy(res)
    calib = res["calibration"]
    assert calib["samples"] == 40 and calib["repq_samples"] == 16 and calib["shards_used"] > 1
    assert res["visual"]["qwt_samples"] == 40 and "text" not in res
    _assert_qwt_reduces_block_error(res["visual"])
    assert json.loads(out.read_text())["visual"]["block_errors"] == res["visual"]["block_errors"]


def test_compile_model_evaluates_the_quantized_bundle_in_one_graph(clip_data, tmp_path, monkeypatch):
    """--compile_model: the zero-shot evaluation runs through torch.compile of the quantized bundle,
    which traces in one graph; the accuracy is the eager one up to inductor's rounding (at most one
    of the 12 images moves)."""
    compiled = []
    real_compile = torch.compile

    def one_graph_compile(model, **kwargs):
        compiled.append(type(model).__name__)
        return real_compile(model, fullgraph=True, **kwargs)  # a graph break raises

    args = ["--batch-size", "6", "--iter", "1", "--repq-size", "8", "--wq_params", "4", "--aq_params", "4",
            "--qwerty", "--seed", "1"]
    eager = main(_base_args(clip_data, "image_only", tmp_path / "e.json") + args)
    monkeypatch.setattr(torch, "compile", one_graph_compile)
    comp = main(_base_args(clip_data, "image_only", tmp_path / "c.json") + args + ["--compile_model"])
    assert compiled == ["ZeroShotCLIP"]
    assert comp["compile_model"] is True and eager["compile_model"] is False
    _assert_accuracy(comp)
    assert abs(comp["top1"] - eager["top1"]) <= 100 / 12 + 1e-9, (comp["top1"], eager["top1"])


def test_all_quant_with_qwerty_reduces_visual_and_text_error(clip_data, tmp_path):
    out = tmp_path / "all.json"
    res = main(_base_args(clip_data, "all_quant", out) +
               ["--batch-size", "16", "--calib-size", "36", "--wq_params", "4", "--aq_params", "4",
                "--qwerty", "--diagnostics", "--quant-attn-matmul"])
    _assert_accuracy(res)
    assert res["calibration"]["samples"] == 36  # exact count, last batch partial
    _assert_qwt_reduces_block_error(res["visual"])
    _assert_qwt_reduces_block_error(res["text"])


def test_all_quant_without_qwerty_quantizes_text_and_keeps_visual_path(clip_data, tmp_path):
    """Without --qwerty: no compensation anywhere; all_quant quantizes the text tower (its embeddings
    move away from FP) and treats the visual tower exactly as image_only does (same seed, same data)."""
    common = ["--batch-size", "8", "--iter", "2", "--wq_params", "3", "--aq_params", "3"]
    img = main(_base_args(clip_data, "image_only", tmp_path / "a.json") + common + ["--diagnostics"])
    allq = main(_base_args(clip_data, "all_quant", tmp_path / "b.json") + common + ["--diagnostics"])
    assert img["visual"]["block_errors"] == allq["visual"]["block_errors"]  # same visual path
    assert img["visual"]["qwt"] is None and allq["text"]["qwt"] is None
    assert allq["text"]["embedding_rel_mse_repq"] > 0 and "text" not in img
    assert all(not e["compensated"] for e in allq["text"]["block_errors"])


# --- the published bit table -------------------------------------------------------------------------

LINEARS = ("attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")


def _published_table(choice, w, a, patch=None, classifier=True):
    """layer → (weight bits, input bits) of the published QwT CLIP recipe on the 2+2-block tiny model:
    conv1 W=w / A=8, every block Linear of a quantized tower W=w / A=a, the zero-shot classifier W=w / A=a
    in image_only and fp32 (None) in all_quant; ``patch`` / ``classifier=False`` are the overrides."""
    table = {"visual.conv1": patch or (w, 8)}
    towers = ["visual"] + (["text"] if choice == "all_quant" else [])
    for tower in towers:
        for i in range(2):
            for lin in LINEARS:
                table[f"{tower}.transformer.resblocks.{i}.{lin}"] = (w, a)
    table["classifier"] = (w, a) if choice == "image_only" and classifier else (None, None)
    return table


@pytest.mark.parametrize("choice, options, patch, classifier, published", [
    ("image_only", [], None, True, True),
    ("all_quant", [], None, True, True),
    ("image_only", ["--patch-embed-wbits", "3", "--patch-embed-abits", "7", "--fp32-classifier"], (3, 7), False,
     False),
    ("all_quant", ["--patch-embed-bits", "5"], (5, 5), True, False),
])
def test_bit_table_is_the_published_recipe(clip_data, tmp_path, choice, options, patch, classifier, published):
    """Each quantized layer's weight and input bits, read from its quantizers, equal the published
    table (conv1 W/A8, blocks W/A, classifier W/A in image_only, fp32 in all_quant) or the options."""
    out = tmp_path / "bits.json"
    res = main(_base_args(clip_data, choice, out) + ["--batch-size", "8", "--iter", "1", "--repq-size", "8",
                                                     "--wq_params", "4", "--aq_params", "5"] + options)
    table = {r["layer"]: (r["w_bits"], r["a_bits"]) for r in res["bit_table"]}
    assert table == _published_table(choice, 4, 5, patch, classifier)
    rows = {r["layer"]: r for r in res["bit_table"]}
    # after the RepQ-ViT reparameterization every activation quantizer is per tensor
    assert {r["input"] for r in res["bit_table"] if r["w_bits"] is not None} == {"per-tensor"}
    assert rows["visual.conv1"]["type"] == "Conv2d"
    saved = json.loads(out.read_text())
    assert saved["bit_table"] == res["bit_table"]
    assert saved["recipe"]["published_defaults"] is published
    assert saved["patch_embed_bits"] == list(patch or (4, 8))
    assert saved["classifier"] == ([4, 5] if choice == "image_only" and classifier else "fp32")
    assert saved["recipe"]["text_blocks"] == ({"w_bits": 4, "a_bits": 5} if choice == "all_quant" else "fp32")


def test_quantized_classifier_is_calibrated_by_the_repq_batch(clip_data):
    """The zero-shot classifier is a QuantLinear (normalised image features per tensor at A bits, class
    embeddings per class at W bits) whose quantizers the RepQ-ViT batch initialises, in the first
    calibration forward, through the visual tower; conv1 reads its input at 8 bits by default."""
    import copy

    name = register_model_config(clip_data["config"])
    model, _, _ = load_clip(name, None, torch.device("cpu"))
    torch.manual_seed(0)
    classes = torch.nn.functional.normalize(torch.randn(32, 5), dim=0)  # (E, C)
    images = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        fp_logits = ZeroShotHead(classes)(model.encode_image(images))
        head = quantize_zero_shot_head(ZeroShotHead(classes), 3, 4)
        assert isinstance(head.fc, QuantLinear) and head.quantized
        qm = quantize_open_clip_visual(model.visual, 4, 4, head=head)
        assert qm.block_names == ["transformer.resblocks.0", "transformer.resblocks.1"]
        conv1 = model.visual.conv1
        assert (conv1.weight_quantizer.n_bits, conv1.input_quantizer.n_bits) == (4, 8)
        first_pass = copy.deepcopy(qm.model)  # the state the first RepQ-ViT forward sees
        set_quant_state(first_pass, True, True)
        first_pass(images)
        calibrate(qm, images)
        fc = head.fc
        assert fc.input_quantizer.is_inited and fc.weight_quantizer.is_inited
        assert fc.input_quantizer.delta.numel() == 1  # per tensor
        assert fc.weight_quantizer.delta.shape == (5, 1)  # per class
        torch.testing.assert_close(fc.input_quantizer.delta, first_pass.head.fc.input_quantizer.delta)
        reference = UniformQuantizer(3, channel_wise=True, channel_dim=0)
        reference(classes.T.contiguous())
        torch.testing.assert_close(fc.weight_quantizer.delta, reference.delta)
        levels = conv1.input_quantizer(images).unique().numel()
        assert 2 ** 4 < levels <= 2 ** 8  # 8-bit input, not the 4 activation bits
        q_logits = qm.model(images)
        with torch.no_grad():
            set_quant_state(head, False, False)
            fp_head_logits = qm.model(images)
        assert (q_logits - fp_head_logits).abs().max() > 0  # the classifier quantization is active
        assert q_logits.shape == fp_logits.shape == (8, 5)


def test_visual_block0_null_direction_gets_no_weight(clip_data):
    """Block 0 reads ln_pre's output, whose channels satisfy Σ_c (x_c − β_c)/γ_c = 0 exactly: the QwT
    features are rank-deficient. The default fit reports it and puts no weight along that direction;
    the papers' rule (in-sample gate, no ridge) puts a huge one there, which an input slightly off the
    LayerNorm manifold turns into a huge error."""
    import copy

    name = register_model_config(clip_data["config"])
    torch.manual_seed(0)
    base, _, _ = load_clip(name, None, torch.device("cpu"))
    with torch.no_grad():
        gamma = base.visual.ln_pre.weight
        gamma.copy_(torch.rand_like(gamma) * 1.5 + 0.25)
        gamma[:3] *= 20  # LayerNorm outlier channels, as in real CLIP checkpoints
        base.visual.ln_pre.bias.normal_(0, 0.5)
    null = (1 / base.visual.ln_pre.weight.detach().double())
    null = null / null.norm()
    images = torch.randn(128, 3, 32, 32)
    norms = {}
    for label, kwargs in (("default", {}), ("papers", {"gate": "insample", "ridge": 0.0})):
        model = copy.deepcopy(base)
        qm = quantize_open_clip_visual(model.visual, 4, 4)
        calibrate(qm, images[:32])
        report = qwt_compensate(qm, list(images.split(32)), progress=False, **kwargs)
        block = model.visual.transformer.resblocks[0]
        assert report.blocks[0].rank_deficiency == 1 and isinstance(block, CompensatedBlock)
        weight = block.compensation.weight.detach().double()
        norms[label] = ((weight @ null).norm().item(), weight.norm().item())
    assert norms["default"][0] < 1e-4 and norms["default"][1] < 10
    assert norms["papers"][0] > 1e2  # what the bounded fit avoids (the issue measured 3.8e4 on ViT-B/32)


# --- multi-process, save / load, plot -------------------------------------------------------------------

def _distributed_args(d, out):
    return _base_args(d, "image_only", out) + ["--batch-size", "8", "--iter", "4", "--repq-size", "8",
                                              "--wq_params", "4", "--aq_params", "4", "--qwerty",
                                              "--diagnostics"]


def test_two_process_gloo_run_matches_single_process(clip_data, tmp_path):
    """torchrun --nproc_per_node=2 on CPU (gloo): same RepQ-ViT batch on both ranks, QwT pairs split
    16 + 16 with all-reduced moments, sharded evaluation counting each image once; top-1 / top-5 equal
    the single-process run's, and so do the per-block R² and errors. The single run also draws --plot."""
    single_out, dual_out, png = tmp_path / "single.json", tmp_path / "dual.json", tmp_path / "blocks.png"
    single = main(_distributed_args(clip_data, single_out) + ["--plot", str(png)])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "mm_clip", "main.py")] + _distributed_args(clip_data, dual_out),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dual = json.loads(dual_out.read_text())
    assert (single["world_size"], dual["world_size"]) == (1, 2)
    assert dual["num_images"] == single["num_images"] == 12
    assert (dual["top1"], dual["top5"]) == (single["top1"], single["top5"])
    assert dual["calibration"]["qwt_samples_per_rank"] == [16, 16]
    assert single["calibration"]["qwt_samples_per_rank"] == [32]
    assert dual["bit_table"] == single["bit_table"]
    for b1, b2 in zip(single["visual"]["qwt"]["blocks"], dual["visual"]["qwt"]["blocks"]):
        assert (b1["applied"], b1["rows"]) == (b2["applied"], b2["rows"])
        assert b1["r2"] == pytest.approx(b2["r2"], abs=1e-5)
    for e1, e2 in zip(single["visual"]["block_errors"], dual["visual"]["block_errors"]):
        assert e1["mse_compensated"] == pytest.approx(e2["mse_compensated"], rel=1e-4)
    # the figure of the single run
    assert single["plot"] == str(png) and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_save_and_load_quantized_all_quant(clip_data, tmp_path):
    """--save_quantized writes both quantized + compensated towers and the classifier; --load_quantized
    rebuilds them without calibration data and gives identical embeddings, logits and top-1."""
    path = tmp_path / "clip_w4a4.pt"
    args = _base_args(clip_data, "all_quant", tmp_path / "a.json") + [
        "--batch-size", "8", "--iter", "2", "--repq-size", "8", "--wq_params", "4", "--aq_params", "4",
        "--qwerty"]
    original = prepare(args + ["--save_quantized", str(path)])
    assert path.is_file()
    load_args = ["--choice", "all_quant", "--imagenet-val", clip_data["val"], "--restrict-classes",
                 "--load_quantized", str(path), "--workers", "0", "--no-progress", "--batch-size", "5"]
    loaded = prepare(load_args)
    a, b = original.bundle, loaded.bundle
    n_comp = sum(isinstance(m, CompensatedBlock) for m in a.modules())
    assert n_comp > 0 and sum(isinstance(m, CompensatedBlock) for m in b.modules()) == n_comp
    images = torch.stack([original.dataset[i][0] for i in range(6)])
    tokens = open_clip.get_tokenizer("tiny_clip")(["a red fish", "the dog on the grass", "sky"])
    with torch.no_grad():
        assert torch.equal(a.clip.encode_image(images), b.clip.encode_image(images))
        assert torch.equal(a.clip.encode_text(tokens), b.clip.encode_text(tokens))
        assert torch.equal(a(images), b(images))
    assert torch.equal(a.head.fc.weight, b.head.fc.weight) and not b.head.quantized  # all_quant: fp32 product
    assert loaded.results["bit_table"] == original.results["bit_table"]
    meta = loaded.results["loaded_meta"]
    assert (meta["choice"], meta["w_bits"], meta["patch_embed_bits"], meta["qwt"]) == ("all_quant", 4, [4, 8], True)
    res = main(load_args + ["--output", str(tmp_path / "loaded.json")])
    want = evaluate_zero_shot(a, DataLoader(original.dataset, batch_size=5), torch.device("cpu"), progress=False)
    assert (res["top1"], res["top5"], res["num_images"]) == (want["top1"], want["top5"], want["num_images"])
    # a file must be loaded with its own choice and bits
    assert "saved from --choice all_quant, not image_only" in _exit_message(
        ["--choice", "image_only"] + load_args[2:])
    assert "saved with --wq_params 4, not 6" in _exit_message(load_args + ["--wq_params", "6"])


def test_cli_option_errors(clip_data, tmp_path):
    args = _base_args(clip_data, "image_only", tmp_path / "r.json")
    assert "--patch-embed-bits sets both" in _exit_message(args + ["--patch-embed-bits", "8",
                                                                   "--patch-embed-abits", "8"])
    assert "--patch-embed-abits=9" in _exit_message(args + ["--patch-embed-abits", "9"])
    assert "add --qwerty" in _exit_message(args + ["--plot", str(tmp_path / "p.png")])
    assert "ending in .png" in _exit_message(args + ["--qwerty", "--plot", str(tmp_path / "p.pdf")])
    fp32 = _base_args(clip_data, "fp32_eval", tmp_path / "r.json")
    assert "needs a quantized model" in _exit_message(fp32 + ["--save_quantized", str(tmp_path / "m.pt")])
    assert "no such file" in _exit_message(args + ["--load_quantized", str(tmp_path / "missing.pt")])
    assert "exclude each other" in _exit_message(args + ["--load_quantized", str(tmp_path / "m.pt"),
                                                         "--save_quantized", str(tmp_path / "n.pt")])
    assert not (tmp_path / "r.json").exists()


def test_qwt_gate_flag_reaches_apply_qwt(clip_data, tmp_path):
    """--qwt_gate insample (the papers' rule) reaches both towers' QwT and the results; default: holdout."""
    args = _base_args(clip_data, "all_quant", tmp_path / "r.json") + [
        "--batch-size", "8", "--iter", "2", "--repq-size", "8", "--qwerty", "--seed", "2"]
    ins = prepare(args + ["--qwt_gate", "insample"]).results
    hold = prepare(args).results
    assert (ins["qwt_gate"], ins["qwt_ridge"]) == ("insample", 0.0)
    assert (hold["qwt_gate"], hold["qwt_ridge"]) == ("holdout", "auto")
    for tower in ("visual", "text"):
        blocks = ins[tower]["qwt"]["blocks"]
        assert ins[tower]["qwt"]["gate"] == "insample"
        assert all(b["r2"] == b["r2_insample"] and b["ridge"] == 0.0 for b in blocks)
        assert all(b["r2"] == b["r2_heldout"] for b in hold[tower]["qwt"]["blocks"])
    fixed = prepare(args + ["--qwt-ridge", "0.25"]).results
    assert (fixed["qwt_gate"], fixed["qwt_ridge"]) == ("holdout", 0.25)
    assert all(hold[t]["qwt"]["solver"] == "auto" for t in ("visual", "text"))


def test_qwt_gate_option_errors(clip_data, tmp_path, capsys):
    args = _base_args(clip_data, "image_only", tmp_path / "r.json")
    assert "add --qwerty" in _exit_message(args + ["--qwt_gate", "insample"])
    assert "add --qwerty" in _exit_message(args + ["--qwt_solver", "eigh"])
    assert "needs --qwt_gate holdout" in _exit_message(args + ["--qwerty", "--qwt_gate", "insample",
                                                               "--qwt_ridge", "auto"])
    for bad in (["--qwt_gate", "oracle"], ["--qwt_ridge", "-1"], ["--qwt_solver", "qr"]):
        with pytest.raises(SystemExit) as exc:
            main(args + ["--qwerty"] + bad)
        assert exc.value.code == 2 and bad[0] in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


# --- scripts/run.sh -----------------------------------------------------------------------------------

def test_run_sh_explains_missing_env():
    env = {k: v for k, v in os.environ.items() if k not in ("IMAGENET_VAL", "CC3M_SHARDS")}
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "run.sh")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "IMAGENET_VAL" in proc.stderr and "CC3M_SHARDS" in proc.stderr


def test_run_sh_end_to_end_on_test_data(clip_data, tmp_path):
    env = dict(os.environ, IMAGENET_VAL=clip_data["val"], CC3M_SHARDS=clip_data["shards"],
               CLIP_MODEL_CONFIG=clip_data["config"], CLIP_PRETRAINED="none",
               CLIP_OUTPUT_DIR=str(tmp_path), PYTHON=sys.executable,
               CLIP_EXTRA_ARGS="--restrict-classes --iter 1 --batch-size 12 --workers 0 "
                               "--index-cache none --no-progress", OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "run.sh")], env=env,
                          capture_output=True, text=True, timeout=600)  # a hang guard, not a timing check
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = sorted(os.listdir(tmp_path))
    assert names == ["all_quant_qwt.json", "fp32_eval.json", "image_only_qwt.json"]
    for name in names:
        _assert_accuracy(json.loads((tmp_path / name).read_text()))
