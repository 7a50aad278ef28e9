#!/usr/bin/env bash
# Distributed zero-shot QAT on NGPUS GPUs (1 works too), run from det_repq_vit/:
#   bash tools/dist_zsqat.sh CONFIG CHECKPOINT NGPUS --synth-dir SYNTH --work-dir WORK --mode dfq
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: bash tools/dist_zsqat.sh CONFIG CHECKPOINT NGPUS [zsqat.py options]" >&2
    exit 2
fi
CONFIG=$1
CHECKPOINT=$2
GPUS=$3
shift 3
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python}
export PYTHONPATH="$HERE/../..:${PYTHONPATH:-}"
if [ "$GPUS" = "1" ] && [ "$NNODES" = "1" ]; then
    # one process: no launcher needed (and errors are not buried under torchrun's report)
    exec "$PYTHON" "$HERE/zsqat.py" "$CONFIG" "$CHECKPOINT" "$@"
fi
"$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$GPUS" --master_port="$PORT" \
    "$HERE/zsqat.py" "$CONFIG" "$CHECKPOINT" --launcher pytorch "$@"
