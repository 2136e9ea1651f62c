#!/usr/bin/env bash
# The whole universal-checkpointing demo in one command: train the baseline at TP=2 PP=2 DP=2, then
# resume its iteration-100 checkpoint at TP=1 PP=4 DP=1 two ways and plot each against the baseline:
# converted by our converter and loaded as a universal checkpoint (verdict.json), and resharded
# directly from the ZeRO checkpoint with no conversion (CONVERTER=auto, verdict_direct.json).
# All knobs of common.sh apply (e.g. TRAIN_ITERS=20 SAVE_INTERVAL=10 LOAD_ITER=10 for a short demo).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$here/run_tp2_pp2.sh"
bash "$here/run_universal_resume_tp1_pp4.sh"
CONVERTER=auto bash "$here/run_universal_resume_tp1_pp4.sh"
