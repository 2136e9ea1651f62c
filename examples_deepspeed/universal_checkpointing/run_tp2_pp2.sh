#!/usr/bin/env bash
# Baseline of the universal-checkpointing demo: a tiny GPT trained at TP=2 PP=2 DP=2 (8 ranks) with
# ZeRO-1 and bf16 for 200 iterations, saving DeepSpeed checkpoints at 100 and 200.
# Knobs are environment variables (see common.sh), e.g. TRAIN_ITERS=20 SAVE_INTERVAL=10 bash run_tp2_pp2.sh;
# a mixture of experts: MODEL_FAMILY=mixtral NUM_EXPERTS=8 EP=2 bash run_tp2_pp2.sh (EP divides DP);
# sequence parallelism: SP=2 (Ulysses, 2 x the ranks) or SEQUENCE_PARALLEL=1 (Megatron's, within TP).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

prepare_data
RUN_DIR="$OUTPUT_DIR/$(run_name "$TP" "$PP" "$DP")"
mkdir -p "$RUN_DIR"
EXPERTS=""
[[ -n "$NUM_EXPERTS" ]] && EXPERTS=" EP=$EP ($NUM_EXPERTS experts, top-$TOPK)"
SEQ=""
(( SP > 1 )) && SEQ=" SP=$SP (Ulysses)"
[[ "$SEQUENCE_PARALLEL" == 1 ]] && SEQ=" (Megatron sequence parallel)"
echo "baseline run: TP=$TP PP=$PP DP=$DP$EXPERTS$SEQ ZeRO-$ZERO_STAGE $DTYPE -> $RUN_DIR"
launch $(( TP * PP * DP * SP )) $(model_args) $(train_args) $(run_dir_args "$RUN_DIR") $(ep_args "$EP") \
    $(sp_args "$SP" "$SEQUENCE_PARALLEL") \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" 2>&1 | tee "$RUN_DIR/train.log"
echo "checkpoints: $RUN_DIR/checkpoints  losses: $RUN_DIR/loss.jsonl  TensorBoard: $RUN_DIR/tensorboard"
