#!/usr/bin/env bash
# One node (one torchrun agent) of an elastic job: the tiny GPT trained with torchrun's c10d rendezvous,
# --nnodes MIN:MAX, saving to one checkpoint folder it also loads from, so the same command starts the job,
# re-forms it when a node is lost or joins, and resumes it at the new world size.
# Start it once per node, with the same RDZV_ENDPOINT and RDZV_ID; exactly one node hosts the rendezvous
# store (RDZV_HOST=1: its agent is the job's single point of failure). On one machine, two shells:
#   RDZV_HOST=1 bash run_elastic.sh        # node 1, hosts the store at RDZV_ENDPOINT (127.0.0.1:29400)
#   RDZV_HOST=0 bash run_elastic.sh        # node 2
# Kill node 2's agent and workers (SIGKILL): node 1 re-forms alone and resumes from the newest complete
# checkpoint; start node 2 again: node 1's workers save on SIGTERM and the job goes on at both nodes' ranks.
# Knobs (besides common.sh's; TP and PP default to 1 here, DP is what the world leaves):
#   NNODES            MIN:MAX nodes (default 1:2)
#   NPROC_PER_NODE    ranks on this node (default 2)
#   RDZV_ENDPOINT     HOST:PORT of the rendezvous store, the RDZV_HOST=1 node's address (default 127.0.0.1:29400)
#   RDZV_ID           the job's name; every node of one job gives the same (default megatron_ucp_elastic)
#   RDZV_HOST         1 on the node that hosts the store, 0 on the others, auto: the node whose address is the
#                     endpoint's (default auto; on one machine say 1 and 0, or the first agent to start hosts)
#   MAX_RESTARTS      worker-group failures an agent recovers from (default 3; a node joining costs none)
#   ELASTIC_LAYOUT=1  --elastic-layout: where the world does not fit TP x PP, lower TP or PP to fit (default 0:
#                     the job keeps TP and PP, and stops with the world sizes that would work)
#   MOCK_DATA=1       synthetic tokens instead of the tokenized corpus (no preprocessing step; MOCK_VOCAB ids,
#                     default 64)
#   RUN_DIR           where the checkpoints, losses and logs go (default $OUTPUT_DIR/elastic_<run name>)
# torchrun's settings and why: megatron_ucp/elastic.py (and the README's "Elastic training").
NNODES="${NNODES:-1:2}"
TP="${TP:-1}"
PP="${PP:-1}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NPROC_PER_NODE="${NPROC_PER_NODE:-2}"
RDZV_ENDPOINT="${RDZV_ENDPOINT:-127.0.0.1:29400}"
RDZV_ID="${RDZV_ID:-megatron_ucp_elastic}"
RDZV_HOST="${RDZV_HOST:-auto}"
MAX_RESTARTS="${MAX_RESTARTS:-3}"
ELASTIC_LAYOUT="${ELASTIC_LAYOUT:-0}"
MOCK_DATA="${MOCK_DATA:-0}"
MOCK_VOCAB="${MOCK_VOCAB:-64}"
if [[ ! "$NNODES" =~ ^[1-9][0-9]*:[1-9][0-9]*$ ]]; then
    echo "error: NNODES=$NNODES: an elastic job takes MIN:MAX nodes, e.g. 1:2" >&2
    exit 1
fi

DATA_ARGS=()
if [[ "$MOCK_DATA" == 1 ]]; then
    DATA_ARGS=(--mock-data --vocab-size "$MOCK_VOCAB" --make-vocab-size-divisible-by 8)
    tokenizer_args() { :; }  # synthetic token ids need no tokenizer
else
    prepare_data
fi
RUN_DIR="${RUN_DIR:-$OUTPUT_DIR/elastic_$(run_name "$TP" "$PP" x)}"
CKPT="$RUN_DIR/checkpoints"
mkdir -p "$CKPT"  # --load of an empty folder starts from scratch
# train_args names --data-path (an empty DATA_PATH leaves the flag alone); with MOCK_DATA it is dropped.
TRAIN_ARGS=()
for arg in $(train_args); do
    if [[ "$MOCK_DATA" == 1 && ( "$arg" == "--data-path" || "$arg" == "$DATA_PATH" ) ]]; then
        continue
    fi
    TRAIN_ARGS+=("$arg")
done
AGENT=($(python -m megatron_ucp.elastic --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
    --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID" --host "$RDZV_HOST" --max-restarts "$MAX_RESTARTS"))
echo "elastic node: $NPROC_PER_NODE ranks, $NNODES nodes, rendezvous $RDZV_ENDPOINT ($RDZV_ID, host: $RDZV_HOST)," \
    "TP=$TP PP=$PP ZeRO-$ZERO_STAGE $DTYPE -> $RUN_DIR"
"${AGENT[@]}" -m megatron_ucp.train $(model_args) "${TRAIN_ARGS[@]}" "${DATA_ARGS[@]}" \
    --tensorboard-dir "$RUN_DIR/tensorboard" --loss-log "$RUN_DIR/loss.jsonl" \
    --load "$CKPT" --save "$CKPT" --exit-signal-handler \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
    $( [[ "$ELASTIC_LAYOUT" == 1 ]] && echo --elastic-layout ) 2>&1 | tee -a "$RUN_DIR/train.$(hostname).$$.log"
echo "checkpoints: $CKPT  losses: $RUN_DIR/loss.jsonl"
