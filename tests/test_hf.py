"""Hugging Face transformers adapter (qwt_core.adapters.hf) and the hf_transformers command line.

Tiny BERT (random init, outlier LayerNorm channels as in real post-LN models) and tiny LLaMA
(trained for a few hundred steps on synthetic Markov-chain text in the test) built from configs,
a WordLevel tokenizer saved to a folder: no download.
"""
import json

import pytest
import torch
from torch import nn

import qwt_core
from qwt_core.compensation import CompensatedBlock
from qwt_core.modules import quant_disabled, quantizers

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from qwt_core.adapters import hf  # noqa: E402
from hf_transformers import main as cli  # noqa: E402

N_WORDS = 40
SPECIAL = ["[PAD]", "[UNK]", "<s>", "</s>"]


def _chain(seed: int = 0) -> torch.Tensor:
    """A peaked first-order Markov chain over the words (learnable structure)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N_WORDS, N_WORDS, generator=g) * 3.0
    return torch.softmax(logits, dim=-1)


def synthetic_ids(n: int, length_range=(6, 20), seed: int = 0) -> list[list[int]]:
    """Word indices (0..N_WORDS-1) of ``n`` sentences sampled from the chain."""
    p = _chain()
    g = torch.Generator().manual_seed(seed)
    lo, hi = length_range
    lengths = torch.randint(lo, hi + 1, (n,), generator=g)
    w = [torch.randint(0, N_WORDS, (n,), generator=g)]
    for _ in range(hi - 1):
        w.append(torch.multinomial(p[w[-1]], 1, generator=g)[:, 0])
    seqs = torch.stack(w, dim=1)
    return [seqs[i, :int(lengths[i])].tolist() for i in range(n)]


def synthetic_texts(n: int, seed: int) -> list[str]:
    return [" ".join(f"w{i}" for i in s) for s in synthetic_ids(n, seed=seed)]


def save_tokenizer(folder: str):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIAL)}
    vocab.update({f"w{i}": len(SPECIAL) + i for i in range(N_WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


VOCAB = len(SPECIAL) + N_WORDS
TRAIN_STEPS = 100


def make_bert() -> nn.Module:
    torch.manual_seed(0)
    # Large weights (std 0.3 instead of 0.02): the layers change the residual stream as much as in a
    # trained model, so W4A4 damage shows (with std 0.02 every layer is nearly the identity).
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, pad_token_id=0,
                                  initializer_range=0.3)
    model = transformers.BertModel(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.bias.normal_(0, 0.1)
    return model


def train_llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0, bos_token_id=2, eos_token_id=3)
    model = transformers.LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest (and immune to oversubscription)
    try:
        for step in range(TRAIN_STEPS):
            ids = torch.tensor(synthetic_ids(32, (16, 16), seed=1000 + step)) + len(SPECIAL)
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {"root": str(root)}
    for name, build in (("bert", make_bert), ("llama", train_llama)):
        folder = str(root / name)
        model = build()
        model.save_pretrained(folder)
        save_tokenizer(folder)
        out[name] = folder
    for name, n, seed in (("calib", 96, 1), ("eval", 48, 2)):
        path = root / f"{name}.txt"
        path.write_text("\n".join(synthetic_texts(n, seed)) + "\n")
        out[name] = str(path)
    (root / "empty.txt").write_text("\n  \n")
    out["empty"] = str(root / "empty.txt")
    return out


def load(folder: str, causal: bool = False):
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model = auto.from_pretrained(folder, local_files_only=True).float().eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tok


def batches(tok, texts, bs=16, **kw):
    return cli.make_batches(tok, texts, bs, 64) if not kw else [
        dict(tok(texts[i:i + bs], return_tensors="pt", **kw)) for i in range(0, len(texts), bs)]


def texts_of(assets, name):
    return [ln for ln in open(assets[name]).read().splitlines() if ln]


def chain_layers(qm, batch):
    """Run the layers one by one from first_block_input (what QwT sees)."""
    bi = qm.first_block_input(batch)
    x = bi.x
    for i, name in enumerate(qm.block_names):
        x = qm.run_block(i, qm.model.get_submodule(name), x, **bi.block_kwargs)
    return x, bi


# --------------------------------------------------------------------------- adapter
def test_encoder_adapter_blocks_and_inputs(assets):
    model, tok = load(assets["bert"])
    texts = texts_of(assets, "eval")[:6]
    b = batches(tok, texts, bs=6)[0]
    with torch.no_grad():
        ref = model(**b).last_hidden_state
    qm = hf.quantize_hf_model(model, 8, 8, source=assets["bert"])
    assert qm.meta["kind"] == "encoder" and qm.ln_pairs == []
    assert qm.block_names == ["encoder.layer.0", "encoder.layer.1"]
    lin = [n for n, m in model.named_modules() if isinstance(m, qwt_core.modules.QuantLinear)]
    assert len(lin) == 12 and all(n.startswith("encoder.layer.") for n in lin)
    assert not any(getattr(q, "channel_wise", False) for n, q in quantizers(model) if "input" in n)
    with quant_disabled(model):
        x, bi = chain_layers(qm, b)
    assert torch.equal(bi.row_mask, b["attention_mask"].bool())
    assert "attention_mask" in bi.block_kwargs  # the extended mask the layers expect
    real = b["attention_mask"].bool()
    assert not real.all()  # the batch is padded
    torch.testing.assert_close(x[real], ref[real], rtol=1e-5, atol=1e-5)


def test_decoder_adapter_folds_rmsnorm_scale_exactly(assets):
    model, tok = load(assets["llama"], causal=True)
    b = batches(tok, texts_of(assets, "eval")[:8], bs=8)[0]
    with torch.no_grad():
        ref = model(**b).logits
        hidden_ref = model.model(**b).last_hidden_state
    qm = hf.quantize_hf_model(model, 4, 4)
    assert qm.meta["kind"] == "decoder" and qm.block_names == ["model.layers.0", "model.layers.1"]
    assert len(qm.ln_pairs) == 10
    report = hf.calibrate_hf(qm, b)
    assert [g.mode for g in report.groups] == ["scale_only"] * 4 and report.skipped == []
    assert report.unmasked == [] and len(report.masked) == 14
    real = b["attention_mask"].bool()
    with quant_disabled(model):
        torch.testing.assert_close(model(**b).logits[real], ref[real], rtol=1e-4, atol=1e-4)
        x, bi = chain_layers(qm, b)
    assert {"position_embeddings", "position_ids"} <= set(bi.block_kwargs)
    torch.testing.assert_close(model.model.norm(x)[real], hidden_ref[real], rtol=1e-4, atol=1e-4)


def test_kind_errors(assets):
    model, _ = load(assets["bert"])
    with pytest.raises(TypeError, match="no LLaMA-style decoder layers"):
        hf.quantize_hf_model(model, 4, 4, kind="decoder")
    with pytest.raises(ValueError, match="w_bits=9"):
        hf.quantize_hf_model(model, 9, 4)
    assert not any(isinstance(m, qwt_core.modules.QuantLinear) for m in model.modules())


# --------------------------------------------------------------------------- QwT helps, masks
def _pipeline(folder, causal, calib, evals, gate="holdout"):
    model, tok = load(folder, causal)
    eval_b = batches(tok, evals)
    fp = None if causal else hf.mean_pooled_embeddings(model, eval_b)
    metric = (lambda m: hf.perplexity(m, eval_b)) if causal else \
        (lambda m: hf.embedding_cosine(fp, hf.mean_pooled_embeddings(m, eval_b)))
    fp_value = metric(model)
    qm = hf.quantize_hf_model(model, 4, 4)
    hf.calibrate_hf(qm, batches(tok, calib[:32], bs=32)[0])
    base = metric(model)
    report = qwt_core.compensate(qm, batches(tok, calib), gate=gate, progress=False)
    return fp_value, base, metric(model), report, qm, tok


@pytest.mark.parametrize("name,causal", [("bert", False), ("llama", True)])
def test_padded_and_unpadded_batches_give_the_same_fit(assets, name, causal):
    """Padding rows are masked out of the least squares and attention: same compensated model."""
    calib = sorted(texts_of(assets, "calib")[:48], key=lambda t: len(t.split()))
    qms, tok = [], None
    for _ in range(2):  # two identically calibrated copies (calibration is deterministic)
        model, tok = load(assets[name], causal)
        qms.append(hf.quantize_hf_model(model, 4, 4))
        hf.calibrate_hf(qms[-1], batches(tok, calib[:16], bs=16)[0])
    qa, qb = qms
    padded = batches(tok, calib, bs=16)
    assert all(not bool(b["attention_mask"].all()) for b in padded)
    # the same texts in the same order, in batches of equal length (no padding at all)
    groups: dict[int, list[str]] = {}
    for t in calib:
        groups.setdefault(len(t.split()), []).append(t)
    unpadded = [b for g in groups.values() for b in batches(tok, g, bs=len(g))]
    assert all(bool(b["attention_mask"].all()) for b in unpadded)
    ra = qwt_core.compensate(qa, padded, progress=False)
    rb = qwt_core.compensate(qb, unpadded, progress=False)
    n_tokens = sum(len(t.split()) for t in calib)
    assert [b.rows for b in ra.blocks] == [b.rows for b in rb.blocks] == [n_tokens] * 2
    assert ra.blocks[0].applied  # something to compare
    for a, b in zip(ra.blocks, rb.blocks):
        assert a.applied == b.applied and a.rows_heldout == b.rows_heldout
        assert a.r2_heldout == pytest.approx(b.r2_heldout, abs=1e-4)
        assert a.ridge == pytest.approx(b.ridge, rel=1e-3)
    evals = batches(tok, texts_of(assets, "eval")[:16], bs=16)[0]
    real = evals["attention_mask"].bool()
    with torch.no_grad():
        out_a, out_b = qa.model(**evals), qb.model(**evals)
    key = "logits" if causal else "last_hidden_state"
    torch.testing.assert_close(out_a[key][real], out_b[key][real], rtol=1e-3, atol=1e-3)


def test_quantizer_init_ignores_padding(assets):
    """Padding a batch to a longer length changes no quantizer (initialised on real tokens only)."""
    out = []
    for extra in (False, True):
        model, tok = load(assets["llama"], True)
        qm = hf.quantize_hf_model(model, 4, 4)
        texts = texts_of(assets, "calib")[:8]
        b = (batches(tok, texts, bs=8, padding="max_length", max_length=40) if extra
             else batches(tok, texts, bs=8, padding=True))[0]
        hf.calibrate_hf(qm, b)
        out.append({n: q.delta.clone() for n, q in quantizers(model)})
    assert out[0].keys() == out[1].keys()
    for n in out[0]:
        torch.testing.assert_close(out[0][n], out[1][n], rtol=1e-5, atol=1e-7, msg=n)


# --------------------------------------------------------------------------- HF forward, save/load
def test_decoder_qwt_lowers_perplexity_forward_and_save_load(assets, tmp_path):
    fp, base, qwt, report, qm, tok = _pipeline(assets["llama"], True, texts_of(assets, "calib"),
                                               texts_of(assets, "eval"))
    assert fp < 6.0  # the model learnt the chain (uniform guessing: 44)
    assert base > fp * 1.005, "W4A4 should damage the model"
    assert qwt < base - 0.25 * (base - fp), (fp, base, qwt)  # QwT closes a good part of the gap
    assert all(isinstance(qm.model.get_submodule(n), CompensatedBlock) == b.applied
               for n, b in zip(qm.block_names, report.blocks))
    b = batches(tok, texts_of(assets, "eval")[:8])[0]
    with torch.no_grad():
        logits = qm.model(**b).logits  # the HF model's own forward works after QwT
        x, _ = chain_layers(qm, b)
    real = b["attention_mask"].bool()
    torch.testing.assert_close(qm.model.lm_head(qm.model.model.norm(x))[real], logits[real])
    path = str(tmp_path / "q.pt")
    qwt_core.save_quantized(qm.model, path, qm.meta)
    loaded, meta = qwt_core.load_quantized(path, hf.build_hf_from_meta)
    assert meta["kind"] == "decoder" and meta["w_bits"] == 4
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**b).logits, logits, rtol=0, atol=0)


def test_tuple_returning_layer_gets_the_compensation_on_output0():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    comp = nn.Linear(8, 8)
    layer = hf.HFCompensatedLayer(mha, comp)
    x = torch.randn(2, 5, 8)
    out, weights = layer(x, x, x)
    ref, ref_w = mha(x, x, x)
    torch.testing.assert_close(out, ref + comp(x))
    torch.testing.assert_close(weights, ref_w)


# --------------------------------------------------------------------------- command line
def _run_cli(argv):
    return cli.main(argv + ["--no-progress"])


def test_cli_encoder_end_to_end_json_save_and_load(assets, tmp_path, capsys):
    out, saved = str(tmp_path / "r.json"), str(tmp_path / "bert_w4a4.pt")
    args = ["--model", assets["bert"], "--calib-text", assets["calib"], "--eval-text", assets["eval"],
            "--w_bits", "4", "--a_bits", "4", "--calib-size", "96", "--output", out]
    assert _run_cli(args + ["--save_quantized", saved]) == 0
    res = json.load(open(out))
    assert res["kind"] == "encoder" and res["metric"] == "cosine_to_fp" and res["fp"] == 1.0
    assert res["baseline"] < 0.97, "W4A4 should visibly damage the model"
    assert res["qwt"] > res["baseline"] + 0.01 and len(res["qwt_report"]["blocks"]) == 2
    assert res["calib_texts"] == 96 and res["qwt_report"]["gate"] == "holdout"
    assert "R2 held" in capsys.readouterr().out
    out2 = str(tmp_path / "r2.json")
    assert _run_cli(["--model", assets["bert"], "--eval-text", assets["eval"], "--load_quantized", saved,
                     "--output", out2]) == 0
    res2 = json.load(open(out2))
    assert res2["quantized"] == pytest.approx(res["qwt"], abs=1e-6)


def test_cli_decoder_end_to_end(assets, tmp_path):
    out = str(tmp_path / "d.json")
    assert _run_cli(["--model", assets["llama"], "--calib-text", assets["calib"], "--eval-text",
                     assets["eval"], "--w_bits", "4", "--a_bits", "4", "--calib-size", "48",
                     "--eval-size", "16", "--output", out]) == 0
    res = json.load(open(out))
    assert res["kind"] == "decoder" and res["metric"] == "perplexity"
    assert res["fp"] < res["baseline"] and res["qwt"] < res["baseline"] and res["calib_texts"] == 48
    assert [g["mode"] for g in res["calibration"]["groups"]] == ["scale_only"] * 4


def test_cli_qwt_gate_alias_and_ridge(assets, tmp_path, capsys):
    """--qwt_gate (the other scripts' name) is --gate; --qwt_ridge reaches the fit; both go to the JSON;
    --qwt_solver reaches the QwT report."""
    base = ["--model", assets["llama"], "--calib-text", assets["calib"], "--eval-text", assets["eval"],
            "--calib-size", "48", "--eval-size", "8"]
    for k, (extra, gate, ridge) in enumerate(((["--qwt_gate", "insample"], "insample", 0.0),
                                              (["--gate", "holdout", "--qwt_ridge", "0.5"], "holdout", 0.5),
                                              (["--qwt_ridge", "0.5", "--qwt_solver", "cholesky"], "holdout",
                                               0.5))):
        out = str(tmp_path / f"run{k}.json")
        assert _run_cli(base + extra + ["--output", out]) == 0
        res = json.load(open(out))
        assert (res["qwt_gate"], res["qwt_ridge"]) == (gate, ridge) and res["qwt_report"]["gate"] == gate
        assert all(b["ridge"] == pytest.approx(ridge) for b in res["qwt_report"]["blocks"])
        # --qwt_solver reaches the report (auto otherwise: eigh on the CPU)
        solver = "cholesky" if "--qwt_solver" in extra else "auto"
        assert res["qwt_report"]["solver"] == solver
        assert {b["solver"] for b in res["qwt_report"]["blocks"]} <= {"eigh", "cholesky"}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        _run_cli(base + ["--qwt_ridge", "-1"])
    assert exc.value.code == 2 and "--qwt_ridge" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        _run_cli(base + ["--qwt_solver", "qr"])
    assert exc.value.code == 2 and "--qwt_solver" in capsys.readouterr().err


def test_cli_compile_model_evaluates_through_torch_compile(assets, tmp_path, monkeypatch, capsys):
    """--compile_model: the baseline and + QwT evaluations run through torch.compile of the quantized
    model (counted), the JSON says so, and the metric is the eager one up to inductor's rounding of
    the FP ops; without a C++ compiler on PATH it is a one-line error before anything runs."""
    base = ["--model", assets["bert"], "--calib-text", assets["calib"], "--eval-text", assets["eval"],
            "--calib-size", "48", "--eval-size", "8", "--batch-size", "8"]
    from helpers_models import counting_compile

    compiled_calls = []
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile_model"])):
        out = str(tmp_path / f"{name}.json")
        with monkeypatch.context() as m:
            m.setattr(torch, "compile", counting_compile(compiled_calls))
            assert _run_cli(base + extra + ["--output", out]) == 0
        runs[name] = json.load(open(out))
    assert len(compiled_calls) == 2 and runs["compiled"]["compile_model"] is True
    assert runs["eager"]["compile_model"] is False
    for key in ("baseline", "qwt"):
        assert runs["compiled"][key] == pytest.approx(runs["eager"][key], abs=1e-3), key
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ / clang++ here
    monkeypatch.delenv("CXX", raising=False)
    capsys.readouterr()
    assert _run_cli(base + ["--compile_model", "--device", "cpu", "--output", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--compile_model" in err and "C++ compiler" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("extra,message", [
    (["--model", "/nonexistent/model/dir"], "model folder not found: /nonexistent/model/dir"),
    (["--model", "someorg/not-cached-model"], "neither a local folder nor in the Hugging Face cache"),
    (["--calib-text", "EMPTY"], "has no non-empty lines"),
    (["--calib-text", "/no/such.txt"], "calibration text file not found"),
    (["--calib-size", "1000"], "has 96 texts, 1000 were asked for"),
    (["--w_bits", "1"], "w_bits=1 is not supported"),
    (["--save_quantized", "a.pt", "--load_quantized", "b.pt"], "--load_quantized and --save_quantized together: pick one"),
    (["--qwt_gate", "insample", "--qwt_ridge", "auto"], "needs --qwt_gate holdout"),
])
def test_cli_errors_are_one_line(assets, capsys, monkeypatch, tmp_path, extra, message):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = {"--model": assets["bert"], "--calib-text": assets["calib"], "--eval-text": assets["eval"]}
    for k, v in zip(extra[::2], extra[1::2]):
        args[k] = assets["empty"] if v == "EMPTY" else v
    argv = [x for kv in args.items() for x in kv]
    assert _run_cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
