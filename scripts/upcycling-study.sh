#!/usr/bin/env bash
# The upcycling study of docs/upcycling.md, on the CPU: a small Llama pretrained dense by smoe on
# Dickens (its tokenizer trained on the same text), exported, upcycled to 8 experts (SMoE-Dropout's
# frozen random router, and a learned one), then continued for the same tokens three ways over three
# seeds: dense, SMoE-Dropout (k 1 -> 8), learned top-2 (the LLaMA-MoE recipe).
#   bash scripts/upcycling-study.sh [OUT] [DATA]
set -euo pipefail
out=${1:-runs/upcycling-study}
data=${2:-../shared/data/books/dickens.txt}  # Latin-1 text
pretrain_steps=${PRETRAIN_STEPS:-1000}
steps=${STEPS:-300}
smoe train --preset llama-tiny --method dense --data-files "$data" --out "$out/pretrain" --auto-resume \
    text_encoding=latin-1 max_steps="$pretrain_steps" eval_every="$pretrain_steps" save_every="$pretrain_steps"
[ -d "$out/dense" ] || smoe export "$out/pretrain" "$out/dense"   # a dense run: LlamaForCausalLM
[ -d "$out/upcycled" ] || smoe upcycle "$out/dense" "$out/upcycled" --num-experts 8
[ -d "$out/upcycled-learned" ] || smoe upcycle "$out/dense" "$out/upcycled-learned" --num-experts 8 --method smoe-learned
# One seed at a time, then all three read back together: a stop leaves whole seeds, and the same
# command continues (finished runs are read, not run again).
for seeds in 0 1 2 0,1,2; do
    smoe bench quality --preset causal-lm --data-files "$data" --out "$out/continued" --seeds "$seeds" \
        --methods "dense:init=$out/dense,smoe-dropout:init=$out/upcycled,smoe-learned:init=$out/upcycled-learned" \
        --json "$out/study.json" --markdown "$out/study.md" \
        text_encoding=latin-1 block_size=128 batch_size=16 lr=1e-3 warmup_steps=10 max_steps="$steps" \
        eval_every="$steps" save_every="$steps" log_every=25 eval_segments=10
done
