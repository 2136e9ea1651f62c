# Shared settings for the universal-checkpointing recipes. Source it; do not run it.
#
# Every knob is an environment variable, read here before any path is derived:
#   TP PP DP               parallel degrees of the baseline run (default 2 2 2: 8 ranks)
#   ZERO_STAGE DTYPE       ZeRO stage and bf16 | fp16 | fp32. Stages 0/1 train with DeepSpeed's pipeline
#                          engine; 2 and 3 train the non-pipeline model (same parameter names), so they
#                          need PP=1, and 3 needs TP=1 (e.g. ZERO_STAGE=3 TP=1 PP=1 DP=4)
#   MODEL_FAMILY           gpt (default) | llama (RMSNorm, rotary, SwiGLU, GQA, untied head, no biases)
#                          | qwen2 (llama plus QKV biases) | ...: a family of megatron_ucp/families
#                          (python -m megatron_ucp.families lists them), which gives the family's
#                          trainer flags, --model-family NAME first (python -m megatron_ucp.families NAME)
#   NUM_LAYERS HIDDEN HEADS SEQ_LEN   the tiny GPT (4 layers, 256 hidden, 8 heads, 256 tokens)
#   KV_HEADS FFN_HIDDEN    grouped-query families only: key/value heads (default 4) and SwiGLU width (default 688;
#                          of an MoE family: each expert's width)
#   NUM_EXPERTS TOPK EP    mixture of experts (MODEL_FAMILY mixtral | qwen3_moe): experts per layer (default 8 for
#                          an MoE family; empty for a dense one), experts per token (default 2) and the expert
#                          parallel degree of the baseline (default 1). EP is carved out of DP, so it must divide
#                          DP; the world size stays TP x PP x DP. MOE_LOSS_COEFF: weight of the load-balancing
#                          loss (default: the trainer's)
#   SP SEQUENCE_PARALLEL   sequence parallelism of the baseline: SP is DeepSpeed-Ulysses' degree (default 1; the
#                          world is TP x PP x DP x SP; SP must divide SEQ_LEN and each TP rank's heads and
#                          key/value heads), SEQUENCE_PARALLEL=1 Megatron's (needs TP > 1; not with SP > 1)
#   GLOBAL_BATCH MICRO_BATCH          samples per step (fixed across layouts) and per micro batch
#   TRAIN_ITERS SAVE_INTERVAL EVAL_INTERVAL EVAL_ITERS LOG_INTERVAL
#   LR MIN_LR WARMUP (default TRAIN_ITERS/10) SEED DROPOUT
#   OUTPUT_DIR             the folder under which every run's checkpoints and logs go
#   DATA_PATH              a preprocessed dataset prefix (default: the bundled Austen corpus,
#                          tokenized into $OUTPUT_DIR/data on first use)
#   TOKENIZER_MODEL        SentencePiece model (default: data/tokenizer/austen-bpe-8k.model)
#   LAUNCHER               torchrun (default) | deepspeed
#   NNODES NODE_RANK MASTER_ADDR MASTER_PORT HOSTFILE   multi-node settings for the launcher
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

MODEL_FAMILY="${MODEL_FAMILY:-gpt}"
TP="${TP:-2}"
PP="${PP:-2}"
DP="${DP:-2}"
ZERO_STAGE="${ZERO_STAGE:-1}"
DTYPE="${DTYPE:-bf16}"
NUM_LAYERS="${NUM_LAYERS:-4}"
HIDDEN="${HIDDEN:-256}"
HEADS="${HEADS:-8}"
SEQ_LEN="${SEQ_LEN:-256}"
KV_HEADS="${KV_HEADS:-4}"
FFN_HIDDEN="${FFN_HIDDEN:-688}"
# The family's trainer flags (an unknown family stops the recipe here, with one error line).
FAMILY_FLAGS="$(python -m megatron_ucp.families "$MODEL_FAMILY" --kv-heads "$KV_HEADS" --ffn-hidden "$FFN_HIDDEN")"
FAMILY_MOE="$(python -c 'import sys; from megatron_ucp.families import family_named
print("moe" if family_named(sys.argv[1]).moe else "")' "$MODEL_FAMILY")"
NUM_EXPERTS="${NUM_EXPERTS:-}"
[[ -n "$FAMILY_MOE" && -z "$NUM_EXPERTS" ]] && NUM_EXPERTS=8
TOPK="${TOPK:-2}"
EP="${EP:-1}"
MOE_LOSS_COEFF="${MOE_LOSS_COEFF:-}"
if [[ -z "$FAMILY_MOE" && -n "$NUM_EXPERTS" ]]; then
    echo "error: NUM_EXPERTS=$NUM_EXPERTS: MODEL_FAMILY $MODEL_FAMILY is dense; experts need a mixture-of-experts" \
        "family (mixtral, qwen3_moe)" >&2
    exit 1
fi
SP="${SP:-1}"
SEQUENCE_PARALLEL="${SEQUENCE_PARALLEL:-0}"
GLOBAL_BATCH="${GLOBAL_BATCH:-8}"
MICRO_BATCH="${MICRO_BATCH:-4}"
TRAIN_ITERS="${TRAIN_ITERS:-200}"
SAVE_INTERVAL="${SAVE_INTERVAL:-100}"
EVAL_INTERVAL="${EVAL_INTERVAL:-20}"
EVAL_ITERS="${EVAL_ITERS:-2}"
LOG_INTERVAL="${LOG_INTERVAL:-10}"
# Peak LR 5e-4: at 1e-3 the step at the end of the 20-iteration warm-up overshoots (validation 12.1
# after step 22, training loss 11.9 at 23, grad norm 38) at every layout and in fp32 too.
LR="${LR:-5e-4}"
MIN_LR="${MIN_LR:-5e-5}"
WARMUP="${WARMUP:-$(( TRAIN_ITERS / 10 ))}"
SEED="${SEED:-1234}"
DROPOUT="${DROPOUT:-0.0}"
OUTPUT_DIR="${OUTPUT_DIR:-$REPO_ROOT/outputs/universal_checkpointing}"
DATA_PATH="${DATA_PATH:-}"
TOKENIZER_MODEL="${TOKENIZER_MODEL:-$REPO_ROOT/data/tokenizer/austen-bpe-8k.model}"
LAUNCHER="${LAUNCHER:-torchrun}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
HOSTFILE="${HOSTFILE:-}"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"  # DeepSpeed's CPU accelerator, gloo backend
fi
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

OUTPUT_DIR="$(mkdir -p "$OUTPUT_DIR" && cd "$OUTPUT_DIR" && pwd)"

# check_ep DP EP WHAT: EP divides DP (expert parallelism is carved out of data parallelism) and the experts;
# a dense model has EP 1.
check_ep() {
    if [[ -z "$NUM_EXPERTS" && "$2" != 1 ]]; then
        echo "error: $3: expert parallelism needs a mixture-of-experts MODEL_FAMILY (mixtral, qwen3_moe)," \
            "not $MODEL_FAMILY" >&2
        exit 1
    fi
    if [[ -n "$NUM_EXPERTS" ]] && (( $2 < 1 || $1 % $2 || NUM_EXPERTS % $2 )); then
        echo "error: $3: expert parallel size $2 must divide the data parallel size $1 and NUM_EXPERTS $NUM_EXPERTS" >&2
        exit 1
    fi
}
check_ep "$DP" "$EP" "DP=$DP EP=$EP"

# check_sp SP SEQUENCE_PARALLEL WHAT: a Ulysses degree and Megatron's switch the trainer can take.
check_sp() {
    if [[ ! "$1" =~ ^[1-9][0-9]*$ || ! "$2" =~ ^[01]$ ]]; then
        echo "error: $3: SP must be a positive integer and SEQUENCE_PARALLEL 0 or 1" >&2
        exit 1
    fi
    if (( $1 > 1 && $2 == 1 )); then
        echo "error: $3: Ulysses (SP > 1) and Megatron's sequence parallelism are not built together" >&2
        exit 1
    fi
}
check_sp "$SP" "$SEQUENCE_PARALLEL" "SP=$SP SEQUENCE_PARALLEL=$SEQUENCE_PARALLEL"

# run_name TP PP DP [DTYPE ZERO_STAGE EP SP SEQUENCE_PARALLEL]: the folder name of one run (Megatron-DeepSpeed's
# tp/pp/dp/sp naming, sp the Ulysses degree; an MoE run adds its expert parallel size, e.g.
# mixtral_fp32_z1_tp2_pp2_dp2_ep2_sp1; Megatron's sequence parallelism adds _seqpar).
run_name() {
    local family="" experts="" seqpar=""
    [[ "$MODEL_FAMILY" == "gpt" ]] || family="${MODEL_FAMILY}_"
    [[ -n "$NUM_EXPERTS" ]] && experts="_ep${6:-$EP}"
    [[ "${8:-$SEQUENCE_PARALLEL}" == 1 ]] && seqpar="_seqpar"
    echo "${family}${4:-$DTYPE}_z${5:-$ZERO_STAGE}_tp${1}_pp${2}_dp${3}${experts}_sp${7:-$SP}${seqpar}"
}

# sp_args SP SEQUENCE_PARALLEL: the trainer's flags of either kind of sequence parallelism.
sp_args() {
    (( $1 > 1 )) && echo --ds-sequence-parallel-size "$1"
    [[ "$2" == 1 ]] && echo --sequence-parallel
    return 0
}

# prepare_data: tokenize the bundled corpus once, unless DATA_PATH names a dataset.
prepare_data() {
    if [[ -z "$DATA_PATH" ]]; then
        DATA_PATH="$OUTPUT_DIR/data/austen_text_document"
        if [[ ! -f "$DATA_PATH.idx" ]]; then
            python "$REPO_ROOT/tools/preprocess_data.py" --input "$REPO_ROOT/data/austen/austen-novels.txt.xz" \
                --output-prefix "$OUTPUT_DIR/data/austen" --tokenizer-type SentencePieceTokenizer \
                --tokenizer-model "$TOKENIZER_MODEL" --append-eod --workers 2
        fi
    fi
}

# launch WORLD_SIZE ARGS...: start megatron_ucp.train on WORLD_SIZE ranks of this node.
launch() {
    local nproc="$1"
    shift
    local per_node=$(( nproc / NNODES ))
    if [[ "$LAUNCHER" == "deepspeed" ]]; then
        local hosts=()
        [[ -n "$HOSTFILE" ]] && hosts=(--hostfile "$HOSTFILE")
        deepspeed "${hosts[@]}" --num_nodes "$NNODES" --num_gpus "$per_node" --master_addr "$MASTER_ADDR" \
            --master_port "$MASTER_PORT" --module megatron_ucp.train "$@"
    else
        torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$per_node" \
            --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m megatron_ucp.train "$@"
    fi
}

# model_args / train_args: the flags shared by every run of a recipe.
model_args() {
    echo --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN" --num-attention-heads "$HEADS" \
        --seq-length "$SEQ_LEN" --max-position-embeddings "$SEQ_LEN" \
        --hidden-dropout "$DROPOUT" --attention-dropout "$DROPOUT"
    echo "$FAMILY_FLAGS"
    moe_args
}

# moe_args: an MoE model's expert flags (nothing for a dense one); ep_args EP: its expert parallel size.
moe_args() {
    [[ -n "$NUM_EXPERTS" ]] || return 0
    echo --num-experts "$NUM_EXPERTS" --topk "$TOPK" ${MOE_LOSS_COEFF:+--moe-loss-coeff "$MOE_LOSS_COEFF"}
}
ep_args() {
    [[ -n "$NUM_EXPERTS" ]] || return 0
    echo --moe-expert-parallel-size "$1"
}

# tokenizer_args: the run's tokenizer (a recipe may define its own before calling train_args).
tokenizer_args() {
    echo --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL"
}

train_args() {
    echo --data-path "$DATA_PATH" $(tokenizer_args) \
        --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --train-iters "$TRAIN_ITERS" \
        --lr "$LR" --min-lr "$MIN_LR" --lr-warmup-iters "$WARMUP" --lr-decay-style cosine --seed "$SEED" \
        --zero-stage "$ZERO_STAGE" "--$DTYPE" --log-interval "$LOG_INTERVAL" --eval-interval "$EVAL_INTERVAL" \
        --eval-iters "$EVAL_ITERS" --save-interval "$SAVE_INTERVAL"
}

# run_dir_args RUN_DIR: where one run's checkpoints, TensorBoard events, loss log and config go.
run_dir_args() {
    echo --save "$1/checkpoints" --tensorboard-dir "$1/tensorboard" --loss-log "$1/loss.jsonl" \
        --ds-config-out "$1/ds_config.json"
}

# The resume side (run_universal_resume_*.sh): which checkpoint to convert and where to resume it.
LOAD_ITER="${LOAD_ITER:-100}"
TARGET_TP="${TARGET_TP:-1}"
TARGET_PP="${TARGET_PP:-4}"
TARGET_DP="${TARGET_DP:-1}"
TARGET_EP="${TARGET_EP:-1}"                           # an MoE model's expert parallel size after the resume
TARGET_SP="${TARGET_SP:-1}"                           # the Ulysses degree after the resume
TARGET_SEQUENCE_PARALLEL="${TARGET_SEQUENCE_PARALLEL:-0}"  # Megatron's sequence parallelism after the resume
TARGET_ZERO_STAGE="${TARGET_ZERO_STAGE:-$ZERO_STAGE}"  # resume at another ZeRO stage (2/3: TARGET_PP=1)
TARGET_DTYPE="${TARGET_DTYPE:-$DTYPE}"                # or in another precision (the loss scaler is reset)
CONVERTER="${CONVERTER:-ours}"          # ours | deepspeed | auto (no conversion: direct reshard at load)
ASSERT_ATOL="${ASSERT_ATOL:-}"          # e.g. 1e-3: fail the recipe if the curves differ by more
RTOL_FIRST="${RTOL_FIRST:-}"            # e.g. 1e-5: ... or the first resumed step differs by more, relatively

# convert_to_universal ZERO_FOLDER UNIVERSAL_FOLDER: run the chosen converter. Ours verifies before it
# publishes and keeps a finished, verified output of the same input, so a rerun after a crash resumes
# only from a verified conversion; DeepSpeed's output is checked against its input with ours
# (--certify), which writes the completion marker the trainer requires.
convert_to_universal() {
    if [[ "$CONVERTER" == "deepspeed" ]]; then
        if ! python "$REPO_ROOT/tools/ds_to_universal.py" --input_folder "$1" --output_folder "$2" --certify \
                2>/dev/null; then
            rm -rf "$2"
            python -m deepspeed.checkpoint.ds_to_universal --input_folder "$1" --output_folder "$2"
            python "$REPO_ROOT/tools/ds_to_universal.py" --input_folder "$1" --output_folder "$2" --certify
        fi
    else
        python "$REPO_ROOT/tools/ds_to_universal.py" --input_folder "$1" --output_folder "$2"
    fi
}
