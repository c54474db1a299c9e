#!/usr/bin/env bash
# The runs behind the measured tables of docs/reproducing.md, exactly as they were run (CPU, one thread).
#
#   bash docs/results/commands.sh [RUN_DIR] [STEP...]     # from the repository root; default RUN_DIR runs/docs
#
# STEP is any of e2e lowdata mixed bart dartbase (default: all, in that order). Models are built from configs
# with seeded random weights (nothing is downloaded), so absolute scores are NOT the paper's. Each step writes
# its bank / model, loss log (CSV + PNG), run summary and evaluation (JSON + Markdown) under RUN_DIR, and
# copies the reports (never the shared data, never weights) into docs/results/<step>/.
set -euo pipefail
D=${PREFIXRT_SHARED_DATA:-../shared/data}
R=${1:-runs/docs}
shift || true
STEPS=${*:-e2e lowdata mixed bart dartbase}
export OMP_NUM_THREADS=1
TINY=(--model gpt2-tiny --model-config initializer_range=0.1)   # 2 layers, width 64; init 0.1 (see the doc)
E2E_TRAIN=$D/e2e/devset.csv         # the 42k-row E2E train set is not available offline: train on dev ...
E2E_TEST=$D/e2e/testset_w_refs.csv  # ... and evaluate on the test set (first 100 MRs, all references)
EVAL=(--max-examples 100 --no-progress)

keep() {  # keep(step, files...): copy reports into docs/results/<step>/
  local step=$1; shift
  mkdir -p "docs/results/$step"
  cp "$@" "docs/results/$step/"
}

for step in $STEPS; do
case $step in
e2e)  # 1. E2E, prefix-tuning vs fine-tuning: the same 2000 rows, 400 steps of 10 rows (2 epochs)
  common=(--task "e2e=$E2E_TRAIN" --max-rows 2000 --dev "e2e=$E2E_TEST" --dev-max-rows 200 --eval-every 100
          --epochs 2 --batch-size 10 --warmup-steps 20 --no-progress)
  prefixrt train "${TINY[@]}" "${common[@]}" --lr 1e-2 --out "$R/e2e/prefix/bank.safetensors"
  prefixrt train --finetune "${TINY[@]}" "${common[@]}" --lr 1e-3 --out "$R/e2e/finetune"
  prefixrt eval "${TINY[@]}" --bank "$R/e2e/prefix/bank.safetensors" --task "e2e=$E2E_TEST" "${EVAL[@]}" \
    --out "$R/e2e/prefix/eval"
  prefixrt eval --model "$R/e2e/finetune" --task "e2e=$E2E_TEST" "${EVAL[@]}" --out "$R/e2e/finetune/eval"
  keep e2e/prefix "$R"/e2e/prefix/bank.{summary.json,summary.md,loss.csv,loss.png} \
    "$R"/e2e/prefix/eval/{e2e.json,e2e.md,e2e.outputs.txt}
  keep e2e/finetune "$R"/e2e/finetune/{summary.json,summary.md,loss.csv,loss.png} \
    "$R"/e2e/finetune/eval/{e2e.json,e2e.md,e2e.outputs.txt}
  ;;
lowdata)  # 2. low-data E2E: 50 MRs (all their references) drawn per seed, 5 epochs, seeds 1, 2, 3
  common=(--task "e2e=$E2E_TRAIN" --low-data 50 --seeds 1,2,3 --dev "e2e=$E2E_TEST" --dev-max-rows 200
          --epochs 5 --batch-size 10 --warmup-steps 20 --no-progress)
  prefixrt train "${TINY[@]}" "${common[@]}" --lr 1e-2 --out "$R/lowdata/prefix/bank.safetensors"
  prefixrt train --finetune "${TINY[@]}" "${common[@]}" --lr 1e-3 --out "$R/lowdata/finetune"
  prefixrt eval "${TINY[@]}" --task "e2e=$E2E_TEST" "${EVAL[@]}" --out "$R/lowdata/prefix/eval" \
    --bank "$R/lowdata/prefix/bank.seed1.safetensors" --bank "$R/lowdata/prefix/bank.seed2.safetensors" \
    --bank "$R/lowdata/prefix/bank.seed3.safetensors"
  prefixrt eval --task "e2e=$E2E_TEST" "${EVAL[@]}" --out "$R/lowdata/finetune/eval" \
    --model "$R/lowdata/finetune/seed1" --model "$R/lowdata/finetune/seed2" --model "$R/lowdata/finetune/seed3"
  keep lowdata/prefix "$R"/lowdata/prefix/bank.{summary.json,summary.md} "$R"/lowdata/prefix/bank.seed1.loss.png \
    "$R"/lowdata/prefix/eval/{e2e.json,e2e.md}
  keep lowdata/finetune "$R"/lowdata/finetune/{summary.json,summary.md} "$R"/lowdata/finetune/eval/{e2e.json,e2e.md}
  ;;
mixed)  # 3. E2E and DART prefixes trained together in one mixed batch, each evaluated with its own prefix
  prefixrt train "${TINY[@]}" --task "e2e=$E2E_TRAIN" --task "dart=$D/dart/dart-v1.1.1-full-dev.json" \
    --max-rows 2000 --dev "e2e=$E2E_TEST" --dev "dart=$D/dart/dart-v1.1.1-full-test.xml" --dev-max-rows 200 \
    --eval-every 100 --epochs 1 --batch-size 10 --warmup-steps 20 --lr 1e-2 --no-progress \
    --out "$R/mixed/bank.safetensors"
  prefixrt eval "${TINY[@]}" --bank "$R/mixed/bank.safetensors" --task "e2e=$E2E_TEST" \
    --task "dart=$D/dart/dart-v1.1.1-full-test.xml" "${EVAL[@]}" --out "$R/mixed/eval"
  keep mixed "$R"/mixed/bank.{summary.json,summary.md,loss.csv,loss.png} \
    "$R"/mixed/eval/{e2e.json,dart.json,results.md,results.json}
  ;;
bart)  # 4. BART, prefixes at all three sites (P=200, the summarization default) vs fine-tuning, synthetic data
  python docs/results/synthetic_summaries.py "$R/bart/data"
  common=(--model bart-tiny --model-config init_std=0.1 --task "sum=$R/bart/data/train.jsonl"
          --dev "sum=$R/bart/data/dev.jsonl" --eval-every 100 --epochs 2 --batch-size 10 --warmup-steps 20
          --no-progress)
  prefixrt train "${common[@]}" --lr 1e-2 --out "$R/bart/prefix/bank.safetensors"
  prefixrt train --finetune "${common[@]}" --lr 1e-3 --out "$R/bart/finetune"
  # the paper's decoding (beam 6, length penalty 0.8) but no 10-token minimum: these summaries are ~6 tokens
  prefixrt eval --model bart-tiny --model-config init_std=0.1 --bank "$R/bart/prefix/bank.safetensors" \
    --task "sum=$R/bart/data/test.jsonl" --min-new-tokens 0 --no-progress --out "$R/bart/prefix/eval"
  prefixrt eval --model "$R/bart/finetune" --task "sum=$R/bart/data/test.jsonl" --min-new-tokens 0 \
    --no-progress --out "$R/bart/finetune/eval"
  keep bart/prefix "$R"/bart/prefix/bank.{summary.json,summary.md,loss.png} "$R"/bart/prefix/eval/{sum.json,sum.md}
  keep bart/finetune "$R"/bart/finetune/{summary.json,summary.md,loss.png} "$R"/bart/finetune/eval/{sum.json,sum.md}
  ;;
dartbase)  # 5. a "pretrained" stand-in: the tiny GPT-2 fine-tuned on DART, then E2E low-data from that base
  prefixrt train --finetune "${TINY[@]}" --task "dart=$D/dart/dart-v1.1.1-full-dev.json" --epochs 1 \
    --batch-size 10 --warmup-steps 50 --lr 1e-3 --no-progress --out "$R/dartbase/base"
  common=(--model "$R/dartbase/base" --task "e2e=$E2E_TRAIN" --low-data 50 --seeds 1,2,3 --dev "e2e=$E2E_TEST"
          --dev-max-rows 200 --epochs 5 --batch-size 10 --warmup-steps 20 --no-progress)
  prefixrt train "${common[@]}" --lr 1e-2 --out "$R/dartbase/prefix/bank.safetensors"
  prefixrt train --finetune "${common[@]}" --lr 1e-3 --out "$R/dartbase/finetune"
  prefixrt eval --model "$R/dartbase/base" --task "e2e=$E2E_TEST" "${EVAL[@]}" --out "$R/dartbase/base/eval"
  prefixrt eval --model "$R/dartbase/base" --task "e2e=$E2E_TEST" "${EVAL[@]}" --out "$R/dartbase/prefix/eval" \
    --bank "$R/dartbase/prefix/bank.seed1.safetensors" --bank "$R/dartbase/prefix/bank.seed2.safetensors" \
    --bank "$R/dartbase/prefix/bank.seed3.safetensors"
  prefixrt eval --task "e2e=$E2E_TEST" "${EVAL[@]}" --out "$R/dartbase/finetune/eval" \
    --model "$R/dartbase/finetune/seed1" --model "$R/dartbase/finetune/seed2" --model "$R/dartbase/finetune/seed3"
  keep dartbase/base "$R"/dartbase/base/{summary.json,summary.md,loss.png} \
    "$R"/dartbase/base/eval/{e2e.json,e2e.md,e2e.outputs.txt}
  keep dartbase/prefix "$R"/dartbase/prefix/bank.{summary.json,summary.md} "$R"/dartbase/prefix/eval/{e2e.json,e2e.md} \
    "$R"/dartbase/prefix/eval/e2e.bank.seed*.outputs.txt
  keep dartbase/finetune "$R"/dartbase/finetune/{summary.json,summary.md} \
    "$R"/dartbase/finetune/eval/{e2e.json,e2e.md} "$R"/dartbase/finetune/eval/e2e.seed*.outputs.txt
  ;;
*) echo "unknown step $step" >&2; exit 2 ;;
esac
done
