"""Is cache's growth with B on the decoder workload live memory or glibc's heap? One `cache` step
twice on a 2-layer proxy of the decoder workload (Qwen3-Embedding-0.6B's widths, q64/p256, group 4),
peak RSS above the loaded model after each.

    python benchmarks/heap_probe.py B lora|none bf16|fp32 LAYERCKPT(0|1)
    MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/heap_probe.py ...   # glibc's mmap threshold fixed
"""

import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)
B = int(sys.argv[1])
lora = sys.argv[2] == "lora"
dtype = sys.argv[3]
layers_ckpt = sys.argv[4] == "1"
from m3embed.losses import LossConfig, M3Objective  # noqa: E402
from m3embed.memory import MemoryConfig, TokenBatch, run_step  # noqa: E402
from m3embed.peak_memory import PeakMemory  # noqa: E402
from workloads import DECODER_LORA, qwen3_0_6b_width  # noqa: E402

m = qwen3_0_6b_width(layers=2)
if dtype == "fp32":
    m.float()
if lora:
    m.add_lora(
        DECODER_LORA["rank"], DECODER_LORA["alpha"], DECODER_LORA["dropout"], DECODER_LORA["target_modules"]
    )
m.train()
G, L = 4, 256
ids = torch.randint(10, 1900, (B * G, L))
qids = torch.randint(10, 1900, (B, 64))
P = TokenBatch(ids, torch.ones_like(ids))
Q = TokenBatch(qids, torch.ones_like(qids))
cfg = MemoryConfig("cache", sub_batch_size=8, layer_checkpointing=layers_ckpt)
obj = M3Objective(LossConfig(), G)


def ck(on):
    m.gradient_checkpointing_enable() if on else m.gradient_checkpointing_disable()


gc.collect()
mem = PeakMemory("cpu")
mem.start()
t = time.time()
run_step(m, obj, Q, P, cfg, gradient_checkpointing=ck)
first = mem.peak_above_baseline()
m.zero_grad()
run_step(m, obj, Q, P, cfg, gradient_checkpointing=ck)
print(
    "peak MB after the first step",
    round(first / 2**20),
    "after the second",
    round(mem.peak_above_baseline() / 2**20),
)
print(
    json.dumps(
        {
            "B": B,
            "lora": lora,
            "dtype": dtype,
            "layerckpt": layers_ckpt,
            "peak_mb": round(mem.peak_above_baseline() / 2**20),
            "s": round(time.time() - t, 1),
        }
    )
)
