#!/usr/bin/env bash
# Distributed RepQ-ViT + QwT evaluation on NGPUS GPUs (1 works too), run from det_repq_vit/:
#   bash tools/dist_test.sh CONFIG CHECKPOINT NGPUS --eval bbox segm --w_bits 4 --a_bits 4
LAUNCHER_NAME=dist_test.sh exec bash "$(dirname "$0")/dist_launch.sh" test.py "$@"
