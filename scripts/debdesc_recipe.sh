#!/usr/bin/env bash
# The mining and distillation recipe on debdesc (docs/training.md, "Re-mining, filtering, teacher
# scores"): four training runs with the same steps and seed, each evaluated on debdesc dev.
#   (a) configs/debdesc.yaml as documented (BM25 negatives from the data);
#   (b) (a)'s training file with negatives re-mined by (a)'s checkpoint, no filter;
#   (c) the same with likely positives dropped: candidates above (1 - 0.05) x the positive's score;
#   (d) (c) with (a)'s fused scores as teacher scores (written by the same mining pass).
# Mining ranks and filters by (a)'s fused score (colbert+sparse+dense); the corpus is encoded once.
#
#   scripts/debdesc_recipe.sh                      # from the repository root, data in data/debdesc
#   DATA=path/to/debdesc OUT=runs/recipe STEPS=80 MARGIN=0.05 scripts/debdesc_recipe.sh
#   TRAIN=small.jsonl CORPUS=small_corpus.jsonl STEPS=2 EXTRA="--eval-max-docs 300" \
#       scripts/debdesc_recipe.sh                  # a smoke run of the whole chain
# Rows already done are skipped on a rerun (each run's final checkpoint, each mined file).
set -euo pipefail
DATA=${DATA:-data/debdesc}
OUT=${OUT:-runs/recipe}
STEPS=${STEPS:-80}
MARGIN=${MARGIN:-0.05}
EXTRA=${EXTRA:-}
TRAIN=${TRAIN:-$DATA/train/train.jsonl.gz}
CORPUS=${CORPUS:-$DATA/train/corpus.jsonl}
mkdir -p "$OUT"

run() {  # run NAME TRAIN_FILE [train flags...]: train once, then skip on a rerun
    local name=$1 data=$2
    shift 2
    if [ -d "$OUT/$name/checkpoint-$STEPS" ]; then echo "($name) done: $OUT/$name"; return; fi
    # shellcheck disable=SC2086  # EXTRA is a list of flags
    m3embed train --config configs/debdesc.yaml --train-data "$data" --output-dir "$OUT/$name" \
        --max-steps "$STEPS" --save-steps 0 --eval "$DATA/dev" --no-progress-bar $EXTRA "$@" \
        > "$OUT/$name.log" 2>&1
}

mine() {  # mine OUTPUT [mine flags...]
    local out=$1
    shift
    if [ -f "$out" ]; then echo "mined: $out"; return; fi
    m3embed mine "$OUT/a/checkpoint-$STEPS" "$TRAIN" "$CORPUS" \
        --output "$out" --mode colbert+sparse+dense --range 10 100 --negatives 7 \
        --index-dir "$OUT/index" --no-progress "$@" 2>&1 | tee -a "$OUT/mine.log"
}

run a "$TRAIN"
mine "$OUT/b.jsonl"
mine "$OUT/c.jsonl" --relative-margin "$MARGIN"
mine "$OUT/d.jsonl" --relative-margin "$MARGIN" --write-scores
run b "$OUT/b.jsonl"
run c "$OUT/c.jsonl"
run d "$OUT/d.jsonl" --kd-loss-type m3_kd_loss

python - "$OUT" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
rows = {"a": "documented run (BM25 negatives)", "b": "re-mined by (a)", "c": "re-mined + filter",
        "d": "re-mined + filter + (a)'s scores"}
modes = ["dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense"]
print("| run | " + " | ".join(modes) + " |")
print("|---|" + "---|" * len(modes))
for key, what in rows.items():
    evals = [e for e in map(json.loads, (out / key / "train_log.jsonl").read_text().splitlines())
             if "eval_ndcg@10" in e]
    last = evals[-1]["eval_ndcg@10"]
    print(f"| ({key}) {what} | " + " | ".join(f"{last[m]:.4f}" for m in modes) + " |")
EOF
