#!/usr/bin/env bash
# The slicing study of docs/slicing.md, on the CPU: SMoE-Dropout trained with the global k schedule and
# with per-layer random k (k_sampling=per-layer), 3 seeds each, on Transformer-XL `tiny` (enwik8-head)
# and on the upcycled Llama of scripts/upcycling-study.sh (continued 300 steps on Dickens); every run
# sliced at the FLOPs of uniform k = 2, 4 and 8 (each layer any k from 1 to N), then the test split of slices
# against uniform k.
#   bash scripts/slicing-study.sh [OUT] [UPCYCLED_LLAMA_DIR]
set -euo pipefail
out=${1:-runs/slicing-study}
upcycled=${2:-runs/upcycling-study/upcycled}
enwik8=${ENWIK8:-../shared/data/enwik8/enwik8-head-4154399}
dickens=${DICKENS:-../shared/data/books/dickens.txt}
for seed in 0 1 2; do  # one seed at a time: a stop leaves whole seeds, and the same command continues
    smoe bench quality --data-file "$enwik8" --out "$out/txl" --seeds "$seed" \
        --methods "smoe-dropout,smoe-dropout:k_sampling=per-layer"
done
for seed in 0 1 2; do
    smoe bench quality --preset causal-lm --data-files "$dickens" --out "$out/llama" --seeds "$seed" \
        --methods "smoe-dropout:init=$upcycled,smoe-dropout:init=$upcycled:k_sampling=per-layer" \
        text_encoding=latin-1 block_size=128 batch_size=16 lr=1e-3 warmup_steps=10 max_steps=300 eval_every=300 \
        save_every=300 log_every=25 eval_segments=10
done
for run in "$out"/*/*/seed-*; do
    [ -f "$run/slices.json" ] || smoe slice "$run" $(python scripts/slicing_study.py args "$run")
done
python scripts/slicing_study.py summary "$out" > "$out/study.md"
cat "$out/study.md"
