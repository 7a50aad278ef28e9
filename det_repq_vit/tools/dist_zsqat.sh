#!/usr/bin/env bash
# Distributed zero-shot QAT on NGPUS GPUs (1 works too), run from det_repq_vit/:
#   bash tools/dist_zsqat.sh CONFIG CHECKPOINT NGPUS --synth-dir SYNTH --work-dir WORK --mode dfq
LAUNCHER_NAME=dist_zsqat.sh exec bash "$(dirname "$0")/dist_launch.sh" zsqat.py "$@"
