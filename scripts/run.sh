#!/usr/bin/env bash
# Minimal CLIP example: FP32 zero-shot, image-only W6A6 RepQ-ViT + QwT, all-modules W6A6 RepQ-ViT + QwT.
#
#   IMAGENET_VAL=/data/imagenet/val CC3M_SHARDS='/data/cc3m/cc3m-train-{0000..0575}.tar' bash scripts/run.sh
#
# Required:  IMAGENET_VAL  ImageNet val folder (one n######## folder per class)
#            CC3M_SHARDS   webdataset shard pattern of image-caption pairs (quote the braces)
# Optional:  CLIP_MODEL (ViT-B/32), CLIP_PRETRAINED (openai), CLIP_MODEL_CONFIG (json config),
#            WBITS/ABITS (6/6), CLIP_OUTPUT_DIR (results/clip), PYTHON (python3),
#            CLIP_NPROC (1; N > 1 runs every command under torchrun --nproc_per_node=N: one GPU per
#            process, or gloo on CPU), CLIP_SAVE (1 = also save the quantized models next to the JSON,
#            {choice}_qwt.pt, re-evaluate with --load_quantized),
#            CLIP_EXTRA_ARGS (appended to every command, e.g. "--device cuda:1").
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
[[ -n "${IMAGENET_VAL:-}" ]] || missing+=("IMAGENET_VAL (ImageNet val folder with n######## class folders)")
[[ -n "${CC3M_SHARDS:-}" ]] || missing+=("CC3M_SHARDS (webdataset shards, e.g. '/data/cc3m/cc3m-train-{0000..0575}.tar')")
if (( ${#missing[@]} )); then
    {
        echo "scripts/run.sh: set these environment variables first:"
        for m in "${missing[@]}"; do echo "  $m"; done
        echo "example: IMAGENET_VAL=/data/imagenet/val CC3M_SHARDS='/data/cc3m/cc3m-train-{0000..0575}.tar' bash scripts/run.sh"
    } >&2
    exit 2
fi

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT="${CLIP_OUTPUT_DIR:-results/clip}"
mkdir -p "$OUT"
model_args=(--model "${CLIP_MODEL:-ViT-B/32}")
[[ -n "${CLIP_MODEL_CONFIG:-}" ]] && model_args=(--model-config "$CLIP_MODEL_CONFIG")
model_args+=(--pretrained "${CLIP_PRETRAINED:-openai}")
# shellcheck disable=SC2206  # CLIP_EXTRA_ARGS is a word list on purpose
extra=(${CLIP_EXTRA_ARGS:-})
bits=(--wq_params "${WBITS:-6}" --aq_params "${ABITS:-6}")
data=(--imagenet-val "$IMAGENET_VAL" --train-data "$CC3M_SHARDS" --dataset-type webdataset)

nproc="${CLIP_NPROC:-1}"
if ! [[ "$nproc" =~ ^[1-9][0-9]*$ ]]; then
    echo "scripts/run.sh: CLIP_NPROC=$nproc is not a positive integer" >&2
    exit 2
fi
launch=("$PYTHON")
if (( nproc > 1 )); then
    launch=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$nproc")
fi
save_image=()
save_all=()
if [[ "${CLIP_SAVE:-0}" != "0" && "${CLIP_SAVE:-0}" != "1" ]]; then
    echo "scripts/run.sh: CLIP_SAVE=${CLIP_SAVE} must be 0 or 1" >&2
    exit 2
fi
if [[ "${CLIP_SAVE:-0}" == "1" ]]; then
    save_image=(--save_quantized "$OUT/image_only_qwt.pt")
    save_all=(--save_quantized "$OUT/all_quant_qwt.pt")
fi

set -x
"${launch[@]}" mm_clip/main.py --choice fp32_eval "${model_args[@]}" --imagenet-val "$IMAGENET_VAL" \
    --batch-size 128 --output "$OUT/fp32_eval.json" "${extra[@]}"
"${launch[@]}" mm_clip/main.py --choice image_only "${model_args[@]}" "${data[@]}" --batch-size 32 \
    "${bits[@]}" --qwerty --output "$OUT/image_only_qwt.json" "${save_image[@]}" "${extra[@]}"
"${launch[@]}" mm_clip/main.py --choice all_quant "${model_args[@]}" "${data[@]}" --batch-size 32 \
    "${bits[@]}" --qwerty --output "$OUT/all_quant_qwt.json" "${save_all[@]}" "${extra[@]}"
