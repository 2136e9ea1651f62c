#!/usr/bin/env bash
# Hugging Face -> universal -> fine-tune at TP=2 PP=2 -> ZeRO -> universal -> Hugging Face.
#
#   1. take an HF model folder (HF_DIR=...) or build one with transformers at random init from a local
#      config (MODEL_FAMILY llama | qwen2 | qwen3 | mistral | gpt, sizes below, the SentencePiece tokenizer's
#      8000-token vocabulary, plus any HF_SET config entries);
#   2. tools/hf_to_universal.py: universal atoms, zero moments, step 0, plus the trainer's model settings;
#   3. fine-tune it with --universal-checkpoint --finetune at TP x PP x DP on the bundled corpus;
#   4. tools/ds_to_universal.py on the last checkpoint, then tools/universal_to_hf.py (fp32);
#   5. tools/hf_logits_check.py: transformers' logits of the export against ours at TP x PP (fails
#      above HF_ATOL), and a transformers generate() from the export.
#
# Knobs: those of common.sh (TP PP DP DTYPE NUM_LAYERS HIDDEN HEADS KV_HEADS FFN_HIDDEN SEQ_LEN
# GLOBAL_BATCH MICRO_BATCH TRAIN_ITERS SAVE_INTERVAL EVAL_INTERVAL EVAL_ITERS LOG_INTERVAL LR MIN_LR
# WARMUP SEED DROPOUT OUTPUT_DIR DATA_PATH TOKENIZER_MODEL LAUNCHER ...), with tiny defaults here, and
#   HF_DIR      an existing HF folder (its config must use the tokenizer's vocabulary size)
#   HF_SET      further config.json entries of the built model, KEY=JSON separated by spaces (no spaces
#               inside a value), e.g. a Llama 3.1-style model with an explicit head dimension:
#               HF_SET='head_dim=32 rope_parameters={"rope_type":"llama3","rope_theta":500000.0,"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":16}'

#   HF_ATOL     logits tolerance of the final check (default 1e-4)
#   PROMPT      the generate() prompt
# Runs in a couple of minutes on 2 CPU cores with the defaults.
MODEL_FAMILY="${MODEL_FAMILY:-llama}"
TP="${TP:-2}" PP="${PP:-2}" DP="${DP:-1}" DTYPE="${DTYPE:-fp32}"
NUM_LAYERS="${NUM_LAYERS:-2}" HIDDEN="${HIDDEN:-64}" HEADS="${HEADS:-4}" KV_HEADS="${KV_HEADS:-2}"
FFN_HIDDEN="${FFN_HIDDEN:-128}" SEQ_LEN="${SEQ_LEN:-64}"
GLOBAL_BATCH="${GLOBAL_BATCH:-4}" MICRO_BATCH="${MICRO_BATCH:-2}"
TRAIN_ITERS="${TRAIN_ITERS:-20}" SAVE_INTERVAL="${SAVE_INTERVAL:-$TRAIN_ITERS}" EVAL_INTERVAL="${EVAL_INTERVAL:-10}"
LOG_INTERVAL="${LOG_INTERVAL:-5}" LR="${LR:-3e-3}" MIN_LR="${MIN_LR:-3e-4}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

HF_DIR="${HF_DIR:-}"
HF_SET="${HF_SET:-}"
HF_ATOL="${HF_ATOL:-1e-4}"
PROMPT="${PROMPT:-It is a truth universally acknowledged}"

prepare_data
RUN_DIR="$OUTPUT_DIR/hf_finetune_$(run_name "$TP" "$PP" "$DP")"
mkdir -p "$RUN_DIR"

if [[ -z "$HF_DIR" ]]; then
    HF_DIR="$RUN_DIR/hf_init"
    if [[ ! -f "$HF_DIR/config.json" ]]; then
        SETS=()
        for entry in $HF_SET; do SETS+=(--set "$entry"); done
        # Families without grouped-query attention (gpt) ignore --num-kv-heads.
        python -m megatron_ucp.hf.build "${SETS[@]}" --family "$MODEL_FAMILY" --tokenizer-model "$TOKENIZER_MODEL" \
            --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN" --num-heads "$HEADS" --num-kv-heads "$KV_HEADS" \
            --ffn-hidden-size "$FFN_HIDDEN" --max-position-embeddings "$SEQ_LEN" --seed "$SEED" --output-dir "$HF_DIR"
    fi
fi

echo "== 1. $HF_DIR -> universal"
python "$REPO_ROOT/tools/hf_to_universal.py" --hf_checkpoint_dir "$HF_DIR" \
    --save_dir "$RUN_DIR/hf_universal/hf_universal" --model_args_yaml "$RUN_DIR/model_args.yaml" --overwrite

echo "== 2. fine-tune at TP=$TP PP=$PP DP=$DP ($DTYPE) for $TRAIN_ITERS iterations"
rm -rf "$RUN_DIR/checkpoints"
launch $(( TP * PP * DP )) --yaml-cfg "$RUN_DIR/model_args.yaml" $(train_args) $(run_dir_args "$RUN_DIR") \
    --seq-length "$SEQ_LEN" --hidden-dropout "$DROPOUT" --attention-dropout "$DROPOUT" \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
    --load "$RUN_DIR/hf_universal" --universal-checkpoint --finetune 2>&1 | tee "$RUN_DIR/train.log"

echo "== 3. ZeRO -> universal -> Hugging Face"
UNIVERSAL="$RUN_DIR/universal/global_step${TRAIN_ITERS}_universal"
python "$REPO_ROOT/tools/ds_to_universal.py" --input_folder "$RUN_DIR/checkpoints/global_step${TRAIN_ITERS}" \
    --output_folder "$UNIVERSAL" --verify --overwrite --quiet
python "$REPO_ROOT/tools/universal_to_hf.py" --input_folder "$UNIVERSAL" --output_dir "$RUN_DIR/hf_export" \
    --dtype fp32 --overwrite

echo "== 4. transformers against ours at TP=$TP PP=$PP, and generate()"
python "$REPO_ROOT/tools/hf_logits_check.py" --hf_dir "$RUN_DIR/hf_export" --universal "$UNIVERSAL" \
    --tp "$TP" --pp "$PP" --batch 2 --seq "$SEQ_LEN" --atol "$HF_ATOL" --generate "$PROMPT" \
    2>&1 | tee "$RUN_DIR/logits_check.log" | grep -E "^(TP|generate|error)"
echo "fine-tuned Hugging Face model: $RUN_DIR/hf_export"
