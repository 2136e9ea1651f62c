#!/usr/bin/env bash
# The Llama-family baseline: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention (8 heads,
# 4 key/value heads), untied head, no biases; TP=2 PP=2 DP=2, ZeRO-1, bf16, 200 iterations.
# The same environment variables as the GPT recipes (see ../common.sh).
export MODEL_FAMILY=llama
exec bash "$(dirname "${BASH_SOURCE[0]}")/../run_tp2_pp2.sh"
