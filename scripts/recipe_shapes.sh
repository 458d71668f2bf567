#!/usr/bin/env bash
# The recipe of the bundled model: a small dVAE, prior and reranker trained on the shapes
# dataset's training split with the project's own commands, exported (float16) into
# dalle_fast/assets/model/, then scored by eval-shapes on test captions.
#
#   bash scripts/recipe_shapes.sh            # CPU: about 1.5 hours on 2 cores with the defaults
#
# Environment: RUNS (training run folders, default runs/bundled), MODEL (where the model folder
# goes, default dalle_fast/assets/model), EVAL (eval-shapes output, default
# benchmarks/results/eval_shapes_bundled), VAE_STEPS, PRIOR_STEPS, RERANK_STEPS, IMAGES (images in
# the prior's token cache), EVAL_CAPTIONS (default 100), COLOUR_CODES (dVAE codes factored into
# this many colours x shapes, see train-vae --colour-codes; default 8; 0: plain codes) and USAGE
# (the dVAE's code-usage weight; default 3 with COLOUR_CODES, 0.1 without). Every stage resumes
# where it stopped (--resume), so an interrupted recipe is rerun with the same command.
#
#   COLOUR_CODES=0 RUNS=runs/plain MODEL=runs/plain/model EVAL=runs/plain/eval \
#     bash scripts/recipe_shapes.sh   # the plain-code model bundled until 2026-11-27
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/dev.sh setup
DF=("${VENV:-.venv}/bin/dalle-fast")

RUNS=${RUNS:-runs/bundled}
MODEL=${MODEL:-dalle_fast/assets/model}
EVAL=${EVAL:-benchmarks/results/eval_shapes_bundled}
VAE_STEPS=${VAE_STEPS:-1500}
PRIOR_STEPS=${PRIOR_STEPS:-5000}
RERANK_STEPS=${RERANK_STEPS:-1500}
IMAGES=${IMAGES:-20000}
EVAL_CAPTIONS=${EVAL_CAPTIONS:-100}
COLOUR_CODES=${COLOUR_CODES:-8}
if [ "$COLOUR_CODES" -gt 0 ]; then USAGE=${USAGE:-3}; else USAGE=${USAGE:-0.1}; fi

echo "== 1/6 tokenizer (BPE on the training captions; the prior and the reranker share it)"
"${DF[@]}" train-tokenizer --data shapes --num-captions "$IMAGES" --out "$RUNS/tokenizer.json"

echo "== 2/6 dVAE ($VAE_STEPS steps)"
"${DF[@]}" train-vae --data shapes --preset small --out "$RUNS/dvae" --steps "$VAE_STEPS" \
  --beta-end 0 --usage "$USAGE" --mse 100 --logit-init 10 --colour-codes "$COLOUR_CODES" --resume

echo "== 3/6 prior ($PRIOR_STEPS steps on $IMAGES cached token grids)"
"${DF[@]}" train-prior --data shapes --dvae "$RUNS/dvae/checkpoint.safetensors" --out "$RUNS/prior" \
  --tokenizer "$RUNS/tokenizer.json" --preset small --layers 8 --d-model 128 --heads 4 --num-images "$IMAGES" --steps "$PRIOR_STEPS" --resume

echo "== 4/6 reranker ($RERANK_STEPS steps)"
"${DF[@]}" train-reranker --data shapes --tokenizer "$RUNS/tokenizer.json" --out "$RUNS/reranker" \
  --image-encoder split --steps "$RERANK_STEPS" --resume

echo "== 5/6 export to $MODEL"
"${DF[@]}" export-model --dvae "$RUNS/dvae" --prior "$RUNS/prior" --reranker "$RUNS/reranker" \
  --tokenizer "$RUNS/tokenizer.json" --dtype float16 --out "$MODEL"

echo "== 6/6 eval-shapes ($EVAL_CAPTIONS captions of each kind)"
"${DF[@]}" eval-shapes --model "$MODEL" --captions "$EVAL_CAPTIONS" --out "$EVAL"
