#!/usr/bin/env bash
# Every GPU check of the speed work in one prepared run, for a GPU machine lent for a few minutes:
#   tests   tests/test_cuda.py but its whole-model compile tests: no GPU synchronisation in the
#           calibrated forward (eager and fused), fused == eager fake quantization bit for bit on CUDA,
#           a CPU-quantized model runs the same on CUDA, CUDA calibration as good as the CPU's, QwT
#           moments on the device in float64 and solved there by the Cholesky path with the CPU eigh
#           fit's result, ONNX export of a GPU model;
#   speed   python -m benchmarks.speed --device cuda (calibration / evaluation / QwT stage vs FP forwards,
#           eager and fused) -> speed_cuda.json;
#   phases  python -m benchmarks.speed --phases --device cuda (where the QwT stage's time goes) on 64 and on 512
#           QwT images (the papers' set; on a GPU the per-block solve is a fixed cost, so the ratio
#           depends on the size; the stage solves by Cholesky, and every block's solve is also timed
#           with eigh and Cholesky on the device and on a host copy: 'solve: eigh, CPU copy' ...)
#           -> qwt_phases_cuda_64.json, qwt_phases_cuda_512.json;
#   compiled (not in the default run: a second call if time is left) the whole-model compile tests of
#           tests/test_cuda.py.
#
#   bash benchmarks/gpu_checks.sh [STEP ...]        (default: tests speed phases)
#
# Writes to $OUT when set (the device tool's folder), else outputs/bench/gpu/: a log per step, the
# JSON files and summary.txt (versions, then one line per step: exit status and seconds); 8 files.
# Each step runs under its own time limit (GPU_CHECKS_LIMITS="tests=120 speed=270 phases=90 compiled=450",
# seconds; phases per size), so that a hung step cannot take the others' time. Needs python3 with
# torch, timm and pytest (PYTHON=... to choose one); the repository goes first on PYTHONPATH, so
# nothing is installed. Arguments for speed.py: SPEED_ARGS (default "--modes eager fused --reps 2
# --qwt_size 512 --eval_size 128"; it writes its JSON after every row, so a step stopped at its
# limit still leaves the rows done; so does qwt_phases.py, "complete": false until its last model).
# Exit status 0 only if every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
DEST=${OUT:-outputs/bench/gpu}
STEPS=("$@")
(( ${#STEPS[@]} )) || STEPS=(tests speed phases)
declare -A LIMIT=([tests]=120 [speed]=270 [phases]=90 [compiled]=450)
for kv in ${GPU_CHECKS_LIMITS:-}; do LIMIT[${kv%%=*}]=${kv#*=}; done
for s in "${STEPS[@]}"; do
    [[ -n "${LIMIT[$s]:-}" ]] || { echo "gpu_checks.sh: unknown step '$s' (steps: tests speed phases compiled)" >&2; exit 2; }
done
mkdir -p "$DEST" || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

ENV_PY='import platform, torch, timm
print("python", platform.python_version(), "| torch", torch.__version__, "| timm", timm.__version__,
      "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")'
env_line=$("$PY" -c "$ENV_PY" 2>&1) || { echo "$env_line"; echo "gpu_checks.sh: $PY cannot import torch and timm" >&2; exit 2; }
[[ $env_line != *"no GPU" ]] || { echo "$env_line"; echo "gpu_checks.sh: no CUDA device is visible to $PY" >&2; exit 2; }
echo "$env_line" | tee "$DEST/summary.txt"

run_step() {  # log name, limit key, command...: output to the screen and to DEST/<log name>.log
    local name=$1 key=$2 t0=$SECONDS rc
    shift 2
    echo "== $name (limit ${LIMIT[$key]} s): $*"
    timeout "${LIMIT[$key]}" "$@" 2>&1 | tee "$DEST/$name.log"
    rc=${PIPESTATUS[0]}
    echo "$name rc=$rc seconds=$((SECONDS - t0))$([[ $rc == 124 ]] && echo ' (time limit)')" | tee -a "$DEST/summary.txt"
}

for s in "${STEPS[@]}"; do
    case $s in
        tests)  run_step tests tests "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py -k "not whole_model" ;;
        # shellcheck disable=SC2086
        speed)  run_step speed speed "$PY" -m benchmarks.speed --device cuda \
                    ${SPEED_ARGS:---modes eager fused --reps 2 --qwt_size 512 --eval_size 128} \
                    --output "$DEST/speed_cuda.json" ;;
        compiled) run_step compiled compiled "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py -k whole_model ;;
        phases) for n in 64 512; do
                    run_step "phases_$n" phases "$PY" -m benchmarks.speed --phases --device cuda --qwt_size "$n" \
                        --output "$DEST/qwt_phases_cuda_$n.json"
                done ;;
    esac
done
! tail -n +2 "$DEST/summary.txt" | grep -qv " rc=0 "
