#!/usr/bin/env bash
# Convert the baseline's iteration-LOAD_ITER ZeRO checkpoint into a universal checkpoint (if not done
# yet; CONVERTER=auto: no conversion, the trainer reshards the ZeRO checkpoint directly), resume it at TARGET_TP/TARGET_PP/TARGET_DP (default TP=1 PP=4 DP=1) with the same global
# batch, train to TRAIN_ITERS, and plot both runs: PNGs, CSVs and verdict.json under OUTPUT_DIR.
# TARGET_ZERO_STAGE and TARGET_DTYPE resume at another ZeRO stage or precision (default: the baseline's);
# TARGET_EP an MoE model at another expert parallel size (default 1; it must divide TARGET_DP); TARGET_SP
# and TARGET_SEQUENCE_PARALLEL the sequence parallelism after the resume (default: none).
# ASSERT_ATOL (every step) and RTOL_FIRST (the first resumed step, relative) fail the recipe when the curves
# differ by more: the LM loss and, for an MoE model, its load-balancing loss.
# Use the same environment variables as the baseline recipe, so OUTPUT_DIR finds the baseline run.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
check_ep "$TARGET_DP" "$TARGET_EP" "TARGET_DP=$TARGET_DP TARGET_EP=$TARGET_EP"
check_sp "$TARGET_SP" "$TARGET_SEQUENCE_PARALLEL" \
    "TARGET_SP=$TARGET_SP TARGET_SEQUENCE_PARALLEL=$TARGET_SEQUENCE_PARALLEL"

prepare_data
BASE_RUN="$OUTPUT_DIR/$(run_name "$TP" "$PP" "$DP")"
ZERO_CKPT="$BASE_RUN/checkpoints/global_step$LOAD_ITER"
if [[ ! -d "$ZERO_CKPT" ]]; then
    echo "error: $ZERO_CKPT not found; run run_tp2_pp2.sh with the same settings first" >&2
    exit 1
fi
RESUME_RUN="$OUTPUT_DIR/$(run_name "$TARGET_TP" "$TARGET_PP" "$TARGET_DP" "$TARGET_DTYPE" "$TARGET_ZERO_STAGE" \
    "$TARGET_EP" "$TARGET_SP" "$TARGET_SEQUENCE_PARALLEL")"
FROM_EP=""
[[ -n "$NUM_EXPERTS" ]] && FROM_EP="_ep$EP"
FROM_SP=""
(( SP > 1 )) && FROM_SP="_sp$SP"
[[ "$SEQUENCE_PARALLEL" == 1 ]] && FROM_SP="${FROM_SP}_seqpar"
RESUME_RUN="${RESUME_RUN}_from_tp${TP}_pp${PP}_dp${DP}${FROM_EP}${FROM_SP}_it${LOAD_ITER}"
if [[ "$CONVERTER" == "auto" ]]; then
    # No conversion: the trainer reads the ZeRO checkpoint's recorded layout and reshards it directly,
    # each rank reading only the bytes it owns.
    RESUME_RUN="${RESUME_RUN}_direct"
    LOAD_ARGS=(--load "$BASE_RUN/checkpoints" --ckpt-step "$LOAD_ITER")
    FROM="$ZERO_CKPT (direct)"
else
    UNIVERSAL_ROOT="$BASE_RUN/universal_$CONVERTER/iter_$LOAD_ITER"
    convert_to_universal "$ZERO_CKPT" "$UNIVERSAL_ROOT/global_step${LOAD_ITER}_universal"
    LOAD_ARGS=(--load "$UNIVERSAL_ROOT" --universal-checkpoint)
    FROM="$UNIVERSAL_ROOT"
fi
mkdir -p "$RESUME_RUN"
EXPERTS=""
[[ -n "$NUM_EXPERTS" ]] && EXPERTS=" EP=$TARGET_EP"
(( TARGET_SP > 1 )) && EXPERTS="$EXPERTS SP=$TARGET_SP (Ulysses)"
[[ "$TARGET_SEQUENCE_PARALLEL" == 1 ]] && EXPERTS="$EXPERTS (Megatron sequence parallel)"
echo "resume: TP=$TARGET_TP PP=$TARGET_PP DP=$TARGET_DP$EXPERTS ZeRO-$TARGET_ZERO_STAGE $TARGET_DTYPE from $FROM" \
    "-> $RESUME_RUN"
launch $(( TARGET_TP * TARGET_PP * TARGET_DP * TARGET_SP )) $(model_args) $(train_args) $(run_dir_args "$RESUME_RUN") \
    $(ep_args "$TARGET_EP") $(sp_args "$TARGET_SP" "$TARGET_SEQUENCE_PARALLEL") \
    --zero-stage "$TARGET_ZERO_STAGE" "--$TARGET_DTYPE" \
    --tensor-model-parallel-size "$TARGET_TP" --pipeline-model-parallel-size "$TARGET_PP" \
    "${LOAD_ARGS[@]}" 2>&1 | tee "$RESUME_RUN/train.log"

PLOTS="$OUTPUT_DIR/plots_$(basename "$RESUME_RUN")"
check=()
[[ -n "$ASSERT_ATOL" ]] && check=(--assert-close "$ASSERT_ATOL")
[[ -n "$RTOL_FIRST" ]] && check+=(--rtol-first "$RTOL_FIRST")
python "$REPO_ROOT/tools/plot_loss_curves.py" "$BASE_RUN" "$RESUME_RUN" --output-dir "$PLOTS" \
    --resume-iteration "$LOAD_ITER" "${check[@]}"
VERDICT="$OUTPUT_DIR/verdict.json"
[[ "$CONVERTER" == "auto" ]] && VERDICT="$OUTPUT_DIR/verdict_direct.json"
cp "$PLOTS/verdict.json" "$VERDICT"
echo "plots: $PLOTS/training_loss.png $PLOTS/validation_loss.png  verdict: $VERDICT"
