#!/usr/bin/env bash
# Continue pretraining a Hugging Face model on your own text, with its own tokenizer:
# Hugging Face -> universal -> fine-tune at TP=2 PP=2 -> ZeRO -> universal -> Hugging Face.
#
#   1. take an HF model folder (HF_DIR=...: config.json, weights and its tokenizer, as the Hub gives them)
#      or build one with transformers at random init from a local config (MODEL_FAMILY llama | qwen2 |
#      qwen3 | mistral | gpt | mixtral | qwen3_moe, the tiny sizes below, HF_TOKENIZER's tokenizer saved
#      beside it, plus any HF_SET config entries);
#   2. tools/hf_to_universal.py: universal atoms, zero moments, step 0, the model's own sizes from its
#      config.json (model_args.yaml; no size below overrides them) and its tokenizer's identity;
#   3. tools/preprocess_data.py: DATA tokenized with the folder's own tokenizer (HFTokenizer), cached
#      per tokenizer hash (and per data file) under $OUTPUT_DIR/data;
#   4. fine-tune with --universal-checkpoint --finetune at TP x PP x DP, validating before the first
#      step and after the last (printed, with the loss plot in $RUN_DIR/plots);
#   5. tools/ds_to_universal.py on the last checkpoint, then tools/universal_to_hf.py (fp32, with the
#      tokenizer);
#   6. tools/hf_logits_check.py: transformers' logits of the export against ours at TP x PP (fails
#      above HF_ATOL), and a transformers generate() from the export.
#
# Knobs: those of common.sh (TP PP DP DTYPE SEQ_LEN GLOBAL_BATCH MICRO_BATCH TRAIN_ITERS SAVE_INTERVAL
# EVAL_INTERVAL EVAL_ITERS LOG_INTERVAL LR MIN_LR WARMUP SEED DROPOUT OUTPUT_DIR LAUNCHER ...), with tiny
# defaults here; NUM_LAYERS HIDDEN HEADS KV_HEADS FFN_HIDDEN (and NUM_EXPERTS TOPK MOE_LOSS_COEFF of a
# mixture of experts) only size a model the recipe builds; EP (an MoE model's expert parallel size,
# dividing DP) applies to any MoE folder; and
#   HF_DIR      an existing HF folder with its tokenizer (tokenizer.json, tokenizer_config.json, ...)
#   DATA        your text: a .jsonl (JSON_KEYS, default "text"; the first key is trained on), a .txt or
#               .txt.xz (a paragraph is a document), or a folder of them (default: the bundled corpus)
#   ADD_TOKENS  new tokens, separated by spaces: added to a copy of the folder's tokenizer, and the model's
#               vocabulary extended (--allow-vocab-extension: new rows initialised as a fresh model's)
#   HF_TOKENIZER  the tokenizer of a built model: a SentencePiece .model, an HF tokenizer folder, or
#               bpe:N (an N-token byte-level BPE trained on the bundled corpus, Llama 3's special tokens)
#               (default: the bundled SentencePiece model)
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
HF_TOKENIZER="${HF_TOKENIZER:-$TOKENIZER_MODEL}"
DATA="${DATA:-$REPO_ROOT/data/austen/austen-novels.txt.xz}"
JSON_KEYS="${JSON_KEYS:-text}"
ADD_TOKENS="${ADD_TOKENS:-}"
PROMPT="${PROMPT:-It is a truth universally acknowledged}"

RUN_DIR="$OUTPUT_DIR/hf_finetune_$(run_name "$TP" "$PP" "$DP")"
mkdir -p "$RUN_DIR"

if [[ -z "$HF_DIR" ]]; then
    HF_DIR="$RUN_DIR/hf_init"
    if [[ ! -f "$HF_DIR/config.json" ]]; then
        SETS=()
        # An MoE family's experts, under the config.json names both Mixtral's and Qwen3-MoE's configs take.
        [[ -n "$NUM_EXPERTS" ]] && SETS+=(--set "num_experts=$NUM_EXPERTS" --set "num_experts_per_tok=$TOPK")
        [[ -n "$NUM_EXPERTS" && -n "$MOE_LOSS_COEFF" ]] && SETS+=(--set "router_aux_loss_coef=$MOE_LOSS_COEFF")
        for entry in $HF_SET; do SETS+=(--set "$entry"); done
        if [[ "$HF_TOKENIZER" == bpe:* ]]; then TOKENIZER_ARGS=(--byte-level-bpe "${HF_TOKENIZER#bpe:}")
        else TOKENIZER_ARGS=(--tokenizer-model "$HF_TOKENIZER"); fi
        # Families without grouped-query attention (gpt) ignore --num-kv-heads.
        python -m megatron_ucp.hf.build "${SETS[@]}" --family "$MODEL_FAMILY" "${TOKENIZER_ARGS[@]}" \
            --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN" --num-heads "$HEADS" --num-kv-heads "$KV_HEADS" \
            --ffn-hidden-size "$FFN_HIDDEN" --max-position-embeddings "$SEQ_LEN" --seed "$SEED" --output-dir "$HF_DIR"
    fi
fi

echo "== 1. $HF_DIR -> universal"
python "$REPO_ROOT/tools/hf_to_universal.py" --hf_checkpoint_dir "$HF_DIR" \
    --save_dir "$RUN_DIR/hf_universal/hf_universal" --model_args_yaml "$RUN_DIR/model_args.yaml" --overwrite

echo "== 2. $DATA -> tokens, with the model's own tokenizer"
TOKENIZER_DIR="$HF_DIR"
EXTEND=()
if [[ -n "$ADD_TOKENS" ]]; then  # a deliberate vocabulary extension: a copy of the tokenizer with the new tokens
    TOKENIZER_DIR="$RUN_DIR/tokenizer"
    python - "$HF_DIR" "$TOKENIZER_DIR" $ADD_TOKENS <<'PY'
import sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1], local_files_only=True, trust_remote_code=False)
before = len(tok)
tok.add_tokens(sys.argv[3:])
tok.save_pretrained(sys.argv[2])
print(f"{sys.argv[2]}: {before} + {len(tok) - before} new tokens = {len(tok)}")
PY
    EXTEND=(--allow-vocab-extension)
fi
# The cache key: the tokenizer's identity (its files' sha256) and the data files' names, sizes and times.
KEY="$(python - "$TOKENIZER_DIR" "$DATA" <<'PY'
import hashlib, os, sys
from pathlib import Path
from megatron_ucp.data.tokenizer import files_sha256, hf_tokenizer_files
data = Path(sys.argv[2]).resolve()
files = sorted(p for p in data.iterdir() if p.is_file()) if data.is_dir() else [data]
stamp = hashlib.sha256("".join(f"{p}\0{p.stat().st_size}\0{p.stat().st_mtime_ns}\n" for p in files).encode())
name = data.name.split(".")[0]
print(f"{name}_{stamp.hexdigest()[:8]}_tok{files_sha256(hf_tokenizer_files(sys.argv[1]))[:12]}")
PY
)"
FIRST_KEY="${JSON_KEYS%% *}"
DATA_PATH="$OUTPUT_DIR/data/${KEY}_${FIRST_KEY}_document"
if [[ ! -f "$DATA_PATH.idx" ]]; then
    python "$REPO_ROOT/tools/preprocess_data.py" --input "$DATA" --output-prefix "$OUTPUT_DIR/data/$KEY" \
        --json-keys $JSON_KEYS --tokenizer-type HFTokenizer --tokenizer-model "$TOKENIZER_DIR" --append-eod --workers 2
else
    echo "cached: $DATA_PATH"
fi

tokenizer_args() {
    echo --tokenizer-type HFTokenizer --tokenizer-model "$TOKENIZER_DIR"
}
echo "== 3. fine-tune at TP=$TP PP=$PP DP=$DP ($DTYPE) for $TRAIN_ITERS iterations"
rm -rf "$RUN_DIR/checkpoints" "$RUN_DIR/loss.jsonl" "$RUN_DIR/tensorboard"
launch $(( TP * PP * DP )) --yaml-cfg "$RUN_DIR/model_args.yaml" $(train_args) $(run_dir_args "$RUN_DIR") \
    "${EXTEND[@]}" $(ep_args "$EP") --eval-at-start \
    --seq-length "$SEQ_LEN" --hidden-dropout "$DROPOUT" --attention-dropout "$DROPOUT" \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
    --load "$RUN_DIR/hf_universal" --universal-checkpoint --finetune 2>&1 | tee "$RUN_DIR/train.log"
python - "$RUN_DIR/loss.jsonl" <<'PY'
import json, sys
valid = [r for r in map(json.loads, open(sys.argv[1])) if r["split"] == "valid"]
(first, last) = valid[0], valid[-1]
verdict = "lower" if last["loss"] < first["loss"] else "NOT lower"
print(f"validation loss: {first['loss']:.4f} before the first step, {last['loss']:.4f} after iteration "
      f"{last['iteration']} ({verdict})")
PY
python "$REPO_ROOT/tools/plot_loss_curves.py" --output-dir "$RUN_DIR/plots" --labels "fine-tune" \
    --title "continued pretraining of $(basename "$HF_DIR") at TP=$TP PP=$PP DP=$DP" "$RUN_DIR" >/dev/null

echo "== 4. ZeRO -> universal -> Hugging Face"
UNIVERSAL="$RUN_DIR/universal/global_step${TRAIN_ITERS}_universal"
python "$REPO_ROOT/tools/ds_to_universal.py" --input_folder "$RUN_DIR/checkpoints/global_step${TRAIN_ITERS}" \
    --output_folder "$UNIVERSAL" --verify --overwrite --quiet
python "$REPO_ROOT/tools/universal_to_hf.py" --input_folder "$UNIVERSAL" --output_dir "$RUN_DIR/hf_export" \
    --dtype fp32 --overwrite

echo "== 5. transformers against ours at TP=$TP PP=$PP, and generate()"
python "$REPO_ROOT/tools/hf_logits_check.py" --hf_dir "$RUN_DIR/hf_export" --universal "$UNIVERSAL" \
    --tp "$TP" --pp "$PP" --batch 2 --seq "$SEQ_LEN" --atol "$HF_ATOL" --generate "$PROMPT" \
    2>&1 | tee "$RUN_DIR/logits_check.log" | grep -E "^(TP|generate|error)"
echo "fine-tuned Hugging Face model: $RUN_DIR/hf_export"
