#!/usr/bin/env bash
# Convert the Llama baseline's iteration-LOAD_ITER checkpoint and resume it at TARGET_TP/PP/DP
# (default TP=1 PP=4 DP=1); plots and verdict.json under OUTPUT_DIR. Same variables as the baseline.
export MODEL_FAMILY=llama
exec bash "$(dirname "${BASH_SOURCE[0]}")/../run_universal_resume_tp1_pp4.sh"
