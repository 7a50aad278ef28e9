"""FP → RepQ-ViT-style PTQ → + QwT for a Hugging Face transformers text model, from the command line.

    python -m hf_transformers.main --model PATH_OR_HUB_NAME --calib-text calib.txt \\
        --eval-text heldout.txt --w_bits 4 --a_bits 4 [--kind auto|encoder|decoder] \\
        [--calib-size N] [--repq-size N] [--eval-size N] [--max-length L] [--batch-size B] \\
        [--gate|--qwt_gate holdout|insample] [--qwt_ridge auto|FLOAT] [--qwt_solver auto|eigh|cholesky] \\
        [--output result.json] [--fused_fake_quant] [--compile_model] \\
        [--save_quantized q.pt | --load_quantized q.pt]

Text files hold one text per line (empty lines are ignored). The model is read from a local folder
or from the Hugging Face cache (no download unless ``--allow-download``). Metric: encoders (BERT
family) — mean cosine similarity of mean-pooled last hidden states to the FP model's on the held-out
texts; decoders (LLaMA family) — perplexity of the held-out texts. Printed and written as JSON:
FP, baseline (quantized), + QwT, the calibration report and the per-block QwT report.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np
import torch

import qwt_core
from qwt_core.adapters import hf as hf_adapter
from qwt_core.cli_options import (add_solver_argument, add_speed_arguments, apply_speed_arguments,
                                  compiled_for_eval, parse_ridge, qwt_overrides)
from qwt_core.cli_options import malloc_tunables
from qwt_core.model_io import atomic_write_json
from qwt_core.quantizers import validate_bits

DEFAULT_CALIB_SIZE = 512


class CLIError(Exception):
    """A problem with the command line or its inputs: printed as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line (no usage dump), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m hf_transformers.main", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True,
                   help="local model folder (config.json, weights, tokenizer) or a hub name already in "
                        "the Hugging Face cache")
    p.add_argument("--calib-text", "--calib_text", dest="calib_text", default=None,
                   help="calibration texts, one per line (needed unless --load_quantized)")
    p.add_argument("--eval-text", "--eval_text", dest="eval_text", required=True,
                   help="held-out texts, one per line")
    p.add_argument("--w_bits", "--w-bits", dest="w_bits", type=int, default=4, help="weight bits 2..8 (4)")
    p.add_argument("--a_bits", "--a-bits", dest="a_bits", type=int, default=4,
                   help="activation bits 2..8 (4)")
    p.add_argument("--kind", choices=["auto", "encoder", "decoder"], default="auto",
                   help="encoder (BERT family, metric: cosine to FP) or decoder (LLaMA family, metric: "
                        "perplexity); auto picks from the layer structure")
    p.add_argument("--calib-size", "--calib_size", dest="calib_size", type=int, default=None,
                   help=f"QwT calibration texts (default: all lines, at most {DEFAULT_CALIB_SIZE})")
    p.add_argument("--repq-size", "--repq_size", dest="repq_size", type=int, default=32,
                   help="texts of the one RepQ calibration batch (first lines of --calib-text; 32)")
    p.add_argument("--eval-size", "--eval_size", dest="eval_size", type=int, default=None,
                   help="held-out texts used (default: all lines)")
    p.add_argument("--max-length", "--max_length", dest="max_length", type=int, default=128,
                   help="tokens per text (longer texts are truncated; 128)")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=16,
                   help="texts per batch (16)")
    p.add_argument("--gate", "--qwt_gate", "--qwt-gate", dest="gate", choices=["holdout", "insample"],
                   default="holdout",
                   help="QwT gate: holdout (default; compensate a block only if it helps on held-out "
                        "calibration rows) or insample (the papers' rule); --qwt_gate is the name the "
                        "other scripts use")
    p.add_argument("--qwt_ridge", "--qwt-ridge", dest="qwt_ridge", type=parse_ridge, default=None,
                   metavar="{auto,FLOAT}",
                   help="QwT ridge λ: 'auto' (holdout gate only) or a number >= 0; default: 'auto' with "
                        "the holdout gate, 0 with insample")
    add_solver_argument(p)
    p.add_argument("--no-qwt", "--no_qwt", "--skip_qwt", "--skip-qwt", dest="no_qwt", action="store_true",
                   help="stop after the baseline (no QwT)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument("--save_quantized", "--save-quantized", dest="save_quantized", default=None,
                   help="save the quantized (+QwT) model here (qwt_core.save_quantized format)")
    p.add_argument("--load_quantized", "--load-quantized", dest="load_quantized", default=None,
                   help="evaluate a model saved with --save_quantized instead of calibrating")
    p.add_argument("--allow-download", "--allow_download", dest="allow_download", action="store_true",
                   help="let transformers download a hub model missing from the cache")
    p.add_argument("--no-progress", "--no_progress", dest="no_progress", action="store_true")
    add_speed_arguments(p, compile_model=True)
    return p


# --------------------------------------------------------------------------- inputs
def read_texts(path: str, what: str, limit: Optional[int], default_limit: Optional[int] = None
               ) -> list[str]:
    """Non-empty stripped lines of ``path``; clear errors for a missing/empty file or a short one."""
    if not os.path.isfile(path):
        raise CLIError(f"{what} file not found: {path}")
    with open(path, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f]
    texts = [ln for ln in lines if ln]
    if not texts:
        raise CLIError(f"{what} file {path} has no non-empty lines: put one text per line")
    if limit is not None:
        if limit < 1:
            raise CLIError(f"the number of {what} texts must be >= 1, got {limit}")
        if limit > len(texts):
            raise CLIError(f"{what} file {path} has {len(texts)} texts, {limit} were asked for: "
                           "pass a smaller size or more text")
        return texts[:limit]
    return texts[:default_limit] if default_limit is not None else texts


def resolve_model_source(name: str, allow_download: bool) -> tuple[str, bool]:
    """``(path or hub name, local_files_only)``; one-line error for a folder that does not exist."""
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise CLIError(f"model folder {expanded} has no config.json: pass a folder written by "
                           "save_pretrained (or a hub name)")
        return expanded, True
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 \
        or os.path.exists(expanded)
    if looks_like_path:
        raise CLIError(f"model folder not found: {name}")
    return name, not allow_download


def load_model_and_tokenizer(source: str, local_only: bool, kind: str):
    """Load the FP model (float32, eval) and its tokenizer with transformers' Auto classes."""
    try:
        import transformers
    except ImportError:
        raise CLIError("transformers is not installed: pip install transformers (or pip install "
                       "-e .[hf])") from None
    try:
        config = transformers.AutoConfig.from_pretrained(source, local_files_only=local_only)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        where = ("neither a local folder nor in the Hugging Face cache; pass a folder or add "
                 "--allow-download" if local_only else "could not be loaded")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CLIError(f"model {source!r} is {where} ({first})") from None
    decoder_arch = any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))
    want_lm = kind == "decoder" or (kind == "auto" and decoder_arch)
    auto = transformers.AutoModelForCausalLM if want_lm else transformers.AutoModel
    try:
        model = auto.from_pretrained(source, local_files_only=local_only, dtype=torch.float32)
    except TypeError:  # transformers < 4.56 names it torch_dtype
        model = auto.from_pretrained(source, local_files_only=local_only, torch_dtype=torch.float32)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CLIError(f"could not load the weights of {source!r} ({first})") from None
    model = model.float().eval()
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise CLIError(f"the tokenizer of {source!r} has no pad, eos or unk token to pad batches with")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "right"
    return model, tokenizer


def make_batches(tokenizer, texts: Sequence[str], batch_size: int, max_length: int) -> list[dict]:
    """Tokenizer batches (dicts of ``(B, L)`` tensors), padded to each batch's longest text."""
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        batches.append({k: v for k, v in enc.items() if k in ("input_ids", "attention_mask",
                                                              "token_type_ids")})
    return batches


# --------------------------------------------------------------------------- metrics
def evaluate(model, kind: str, batches: list[dict], fp_embeddings: Optional[torch.Tensor],
             compile_model: bool = False) -> float:
    """Perplexity (decoder) or cosine to the FP embeddings (encoder); ``compile_model``: through
    ``torch.compile`` of ``model`` (``--compile_model``)."""
    model = compiled_for_eval(model, compile_model)
    if kind == "decoder":
        return hf_adapter.perplexity(model, batches)
    emb = hf_adapter.mean_pooled_embeddings(model, batches)
    return hf_adapter.embedding_cosine(fp_embeddings, emb)


def _device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine")
    return dev


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole pipeline; returns the JSON payload (also written to ``--output``)."""
    t_start = time.time()
    for value, name in ((args.w_bits, "--w_bits"), (args.a_bits, "--a_bits")):
        try:
            validate_bits(value, name)
        except ValueError as exc:
            raise CLIError(str(exc)) from None
    for value, name in ((args.max_length, "--max-length"), (args.batch_size, "--batch-size"),
                        (args.repq_size, "--repq-size")):
        if value < 1:
            raise CLIError(f"{name} must be >= 1, got {value}")
    try:
        qwt_kwargs = qwt_overrides(args.gate, getattr(args, "qwt_ridge", None), solver=args.qwt_solver)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if args.load_quantized and args.save_quantized:
        raise CLIError("--load_quantized and --save_quantized together: pick one")
    if args.load_quantized and not os.path.isfile(args.load_quantized):
        raise CLIError(f"quantized model file not found: {args.load_quantized}")
    if not args.load_quantized and not args.calib_text:
        raise CLIError("--calib-text is required (unless --load_quantized)")
    if args.save_quantized and os.path.isdir(args.save_quantized):
        raise CLIError(f"--save_quantized {args.save_quantized} is a folder: give a file path")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = _device(args.device)

    # Inputs first: every file error is reported before any model is loaded or changed.
    eval_texts = read_texts(args.eval_text, "held-out text", args.eval_size)
    calib_texts = None if args.load_quantized else read_texts(
        args.calib_text, "calibration text", args.calib_size, DEFAULT_CALIB_SIZE)
    if calib_texts is not None and args.repq_size > len(calib_texts):
        raise CLIError(f"--repq-size {args.repq_size} is larger than the {len(calib_texts)} calibration "
                       "texts: pass a smaller --repq-size or more text")
    source, local_only = resolve_model_source(args.model, args.allow_download)
    try:
        apply_speed_arguments(args, str(device))
    except SystemExit as exc:  # e.g. a flag that compiles kernels without a C++ compiler: one line, exit 2
        raise CLIError(str(exc.code).removeprefix("error: ")) from None
    model, tokenizer = load_model_and_tokenizer(source, local_only, args.kind)
    model.to(device)
    try:
        kind = hf_adapter.detect_kind(model) if args.kind == "auto" else args.kind
    except TypeError as exc:
        raise CLIError(str(exc)) from None
    if kind == "decoder" and not hasattr(model, "lm_head") and "CausalLM" not in type(model).__name__:
        raise CLIError(f"{type(model).__name__} has no language-model head: perplexity needs a "
                       "*ForCausalLM model")
    eval_batches = make_batches(tokenizer, eval_texts, args.batch_size, args.max_length)
    result: dict[str, Any] = {
        "model": args.model, "model_class": type(model).__name__, "kind": kind,
        "metric": "perplexity" if kind == "decoder" else "cosine_to_fp",
        "w_bits": args.w_bits, "a_bits": args.a_bits, "eval_texts": len(eval_texts),
        "max_length": args.max_length, "seed": args.seed, "device": str(device),
        "fused_fake_quant": bool(args.fused_fake_quant), "compile_model": bool(args.compile_model),
        "malloc_tunables": malloc_tunables(),
        "torch": torch.__version__, "python": platform.python_version()}
    print(f"model {args.model} ({type(model).__name__}, {kind}); W{args.w_bits}A{args.a_bits}; "
          f"{len(eval_texts)} held-out texts")

    fp_emb = None if kind == "decoder" else hf_adapter.mean_pooled_embeddings(model, eval_batches)
    result["fp"] = 1.0 if kind != "decoder" else hf_adapter.perplexity(model, eval_batches)
    print(f"FP: {result['metric']} = {result['fp']:.4f}")

    if args.load_quantized:
        try:
            qm, meta = qwt_core.load_quantized(args.load_quantized, hf_adapter.build_hf_from_meta)
        except (ValueError, FileNotFoundError, TypeError) as exc:
            raise CLIError(str(exc).splitlines()[0]) from None
        if meta.get("kind") != kind:
            raise CLIError(f"{args.load_quantized} holds a {meta.get('kind')} model, --model is a {kind}")
        qm.model.to(device).eval()
        result["quantized"] = evaluate(qm.model, kind, eval_batches, fp_emb, args.compile_model)
        result["loaded"] = args.load_quantized
        result["saved_w_bits"], result["saved_a_bits"] = meta["w_bits"], meta["a_bits"]
        print(f"loaded {args.load_quantized}: {result['metric']} = {result['quantized']:.4f}")
    else:
        qm = qwt_core.quantize(model, qwt_core.QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits, kind=kind),
                               adapter="hf")
        qm.meta["source"] = args.model
        calib_batches = make_batches(tokenizer, calib_texts, args.batch_size, args.max_length)
        repq_batch = make_batches(tokenizer, calib_texts[:args.repq_size], args.repq_size,
                                  args.max_length)[0]
        report = qwt_core.calibrate(qm, repq_batch)
        print(report.format_summary())
        result["calibration"] = report.to_dict()
        result["calib_texts"] = len(calib_texts)
        result["repq_texts"] = args.repq_size
        result["baseline"] = evaluate(qm.model, kind, eval_batches, fp_emb, args.compile_model)
        print(f"baseline (W{args.w_bits}A{args.a_bits}): {result['metric']} = {result['baseline']:.4f}")
        if not args.no_qwt:
            qwt_report = qwt_core.compensate(qm, calib_batches, progress=not args.no_progress, **qwt_kwargs)
            print(qwt_report.format_table())
            result["qwt_report"] = qwt_report.to_dict()
            result["qwt_gate"], result["qwt_ridge"] = qwt_report.gate, qwt_report.ridge
            result["qwt"] = evaluate(qm.model, kind, eval_batches, fp_emb, args.compile_model)
            print(f"+ QwT: {result['metric']} = {result['qwt']:.4f}")
        if args.save_quantized:
            qwt_core.save_quantized(qm.model, args.save_quantized, qm.meta)
            result["saved"] = args.save_quantized
            print(f"saved the quantized model to {args.save_quantized}")
    result["seconds"] = time.time() - t_start
    if args.output:
        atomic_write_json(args.output, result)
        print(f"wrote {args.output}")
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except CLIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
