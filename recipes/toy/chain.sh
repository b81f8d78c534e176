#!/usr/bin/env bash
# The shapes world from nothing: data, both backbones trained from scratch, MiniGPT-5 stages 1 and
# 2, a bundle, and the held-out stories generated and scored.
#
#   bash recipes/toy/chain.sh [ROOT]          # about 34 minutes on 2 CPU cores
#   QUICK=1 bash recipes/toy/chain.sh ROOT    # tiny step counts: checks the plumbing in minutes
#
# Everything is written under ROOT (default: the current directory), laid out as the recipes name it:
# ROOT/data/toy, ROOT/runs/toy (generator, llm_vision, llm, stage1, stage2_lora), ROOT/runs/toy/bundle and
# ROOT/runs/toy/test (metrics.json). So `chain.sh shapes` gives shapes/runs/toy; a ROOT under runs/ would
# give runs/NAME/runs/toy.
set -euo pipefail
# The minigpt5 program, as `python3 -m minigpt5_cli` (no need for the `minigpt5` script on PATH);
# PYTHON picks another interpreter, e.g. PYTHON=.venv/bin/python.
MINIGPT5=("${PYTHON:-python3}" -m minigpt5_cli)
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="${1:-.}"
mkdir -p "$ROOT" && cd "$ROOT"

if [[ "${QUICK:-0}" == 1 ]]; then
  DATA=(--pairs 64 --stories 24 --test-stories 6 --dialogs 8)
  GEN=(scratch.vae_steps=4 train.max_steps=4 scratch.eval_every=0 train.batch_size=8)
  LLM=(train.max_steps=4 train.batch_size=4)
  STAGE=(train.max_steps=2 train.batch_size=4 train.save_every=2)
  SAMPLE=(--diffusion-steps 2 --max-new-tokens 24)
else
  DATA=() GEN=() LLM=() STAGE=() SAMPLE=()
fi

"${MINIGPT5[@]}" prepare-data toy --output data/toy --seed 0 "${DATA[@]}"
"${MINIGPT5[@]}" train --recipe "$HERE/generator.yaml" "${GEN[@]}"
"${MINIGPT5[@]}" train --recipe "$HERE/llm_vision.yaml" "${LLM[@]}"
"${MINIGPT5[@]}" train --recipe "$HERE/llm.yaml" "${LLM[@]}"
"${MINIGPT5[@]}" train --recipe "$HERE/stage1.yaml" "${STAGE[@]}"
"${MINIGPT5[@]}" train --recipe "$HERE/stage2_lora.yaml" "${STAGE[@]}"
"${MINIGPT5[@]}" bundle runs/toy/stage2_lora runs/toy/bundle --overwrite
"${MINIGPT5[@]}" generate --story data/toy/stories_test --model runs/toy/bundle --output runs/toy/test \
  --batch-size 25 "${SAMPLE[@]}"
"${MINIGPT5[@]}" evaluate --predictions runs/toy/test --references data/toy/stories_test --metrics toy \
  --output runs/toy/test/metrics.json
