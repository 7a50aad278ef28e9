#!/usr/bin/env bash
# Shared launcher of the detection tools on NGPUS GPUs (1 works too), used by dist_test.sh and
# dist_zsqat.sh:  bash tools/dist_launch.sh TOOL.py CONFIG CHECKPOINT NGPUS [TOOL options]
# One process runs TOOL directly; more run it under torchrun with --launcher pytorch.
# Environment: NNODES, NODE_RANK, PORT (29500), MASTER_ADDR (127.0.0.1), PYTHON (python).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TOOL=${1:-}
if [ -n "${LAUNCHER_NAME:-}" ]; then
    USAGE="bash tools/$LAUNCHER_NAME CONFIG CHECKPOINT NGPUS [$TOOL options]"
else
    USAGE="bash tools/dist_launch.sh TOOL.py CONFIG CHECKPOINT NGPUS [TOOL.py options]"
fi
if [ $# -lt 4 ] || [ ! -f "$HERE/$TOOL" ]; then
    echo "usage: $USAGE" >&2
    exit 2
fi
CONFIG=$2
CHECKPOINT=$3
GPUS=$4
shift 4
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
PYTHON=${PYTHON:-python}
export PYTHONPATH="$HERE/../..:${PYTHONPATH:-}"
if [ "$GPUS" = "1" ] && [ "$NNODES" = "1" ]; then
    # one process: no launcher needed (and errors are not buried under torchrun's report)
    exec "$PYTHON" "$HERE/$TOOL" "$CONFIG" "$CHECKPOINT" "$@"
fi
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$GPUS" --master_port="$PORT" \
    "$HERE/$TOOL" "$CONFIG" "$CHECKPOINT" --launcher pytorch "$@"
