#!/usr/bin/env bash
# The GPU checks of docs/memory.md in one go, on one CUDA device (about 8 minutes on an H100 / H200):
#   1. decoder: a random Qwen3 at Qwen3-Embedding-0.6B's widths (4 layers, bf16, LoRA rank 16),
#      q64/p512, group 4: m3embed `cache` + layer checkpointing against FlagEmbedding's decoder-only
#      recipe (LoRA, sub-batches, gradient checkpointing) at B = 4, 16, 64;
#   2. long: all-MiniLM-L6-v2, q32/p512, group 8: `cache` with and without layer checkpointing, and
#      FlagEmbedding's M3 with checkpointing, at B = 4, 16, 64 (peak ratio, flatness, time ratio at 16);
#   3. qwen3-8b-width: Qwen3-Embedding-8B's widths with 2 layers, q64/p8192, group 8, LoRA rank 64:
#      the per-token and per-layer terms of the 8B prediction in docs/memory.md.
# Peak = torch.cuda.max_memory_allocated() above the loaded model; each point in a fresh process.
# Texts: benchmarks/data/debdesc_sample.jsonl.gz (the first 64 lines of debdesc's train file).
#
#   benchmarks/gpu.sh [OUT]          # on a CUDA machine; tables in OUT (default runs/gpu)/<check>/memory.md
#   benchmarks/gpu.sh --cpu [OUT]    # dry run on CPU: the same steps on the tiny workloads (a few minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
cpu=0
if [ "${1:-}" = "--cpu" ]; then cpu=1; shift; fi
OUT=${1:-runs/gpu}
DATA=benchmarks/data/debdesc_sample.jsonl.gz
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"

bench() {  # bench NAME [memory.py flags...]: one check into OUT/NAME, its tables printed at the end
    local name=$1
    shift
    echo "== $name: benchmarks/memory.py $*"
    "$PY" benchmarks/memory.py --fresh --out "$OUT/$name" --data "$DATA" "$@" | tee "$OUT/$name.out"
}

if [ "$cpu" = 1 ]; then
    bench decoder --workload tiny-decoder --device cpu
    bench long --workload tiny --methods m3embed-cache m3embed-cache-layerckpt --device cpu
else
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --cpu')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
    max_mb=$("$PY" -c "import torch; print(int(torch.cuda.get_device_properties(0).total_memory / 2**20 * 0.95))")
    bench decoder --workload decoder --device cuda --max-mb "$max_mb"
    bench long --workload long --device cuda --max-mb "$max_mb" \
        --methods m3embed-cache m3embed-cache-layerckpt flagembedding-checkpoint
    bench qwen3-8b-width --workload qwen3-8b-width --device cuda --max-mb "$max_mb"
fi
echo
echo "tables: $OUT/*/memory.md (raw rows: memory.csv)"
