#!/usr/bin/env bash
# The shapes-world experiment: MiniGPT-5 against the two-stage baseline and five ablations, each
# scored on the 200 held-out stories (steps 1-4 in, step 5 out). Run chain.sh first, in the same ROOT.
#
#   bash recipes/toy/experiment.sh [ROOT]          # writes ROOT/runs/toy/experiment.md
#   JOBS=6 bash recipes/toy/experiment.sh [ROOT]   # trains the ablations 6 at a time (many cores)
set -euo pipefail
# The minigpt5 program, as `python3 -m minigpt5_cli` (no need for the `minigpt5` script on PATH);
# PYTHON picks another interpreter, e.g. PYTHON=.venv/bin/python.
MINIGPT5=("${PYTHON:-python3}" -m minigpt5_cli)
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="${1:-.}"
cd "$ROOT"
JOBS="${JOBS:-1}"
A=runs/toy/ablate
mkdir -p "$A"
if (( JOBS > 1 )); then export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"; fi

train() {  # NAME RECIPE OVERRIDES...: one run, logged, skipped when already done
  local name=$1 recipe=$2; shift 2
  if [[ -f "$A/$name.done" ]]; then return; fi
  rm -rf "$A/$name"
  "${MINIGPT5[@]}" train --recipe "$HERE/$recipe" train.output_dir="$A/$name" "$@" > "$A/$name.log" 2>&1
  touch "$A/$name.done"
}
wait_for_slot() { while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n; done; }

# Stage-1 variants first: two stage-2 runs start from them.
train s1_nocaption stage1.yaml loss.caption=0 &
wait_for_slot
train s1_compact stage1.yaml model.mapper.kind=compact &
wait_for_slot
train nostage1 stage2_lora.yaml train.init_from=none &
wait_for_slot
train prefix stage2_prefix.yaml &
wait
train nocaption stage2_lora.yaml train.init_from="$A/s1_nocaption" loss.caption=0 &
wait_for_slot
train compact stage2_lora.yaml train.init_from="$A/s1_compact" model.mapper.kind=compact &
wait
for name in s1_nocaption s1_compact nostage1 prefix nocaption compact; do
  if [[ ! -f "$A/$name.done" ]]; then
    echo "training $name failed; its log: $A/$name.log" >&2
    tail -n 5 "$A/$name.log" >&2
    exit 1
  fi
done

gen() {  # NAME MODEL OPTIONS...: generate the held-out stories and score them
  local name=$1 model=$2; shift 2
  "${MINIGPT5[@]}" generate --story data/toy/stories_test --model "$model" --output "$A/out/$name" --batch-size 25 "$@"
  "${MINIGPT5[@]}" evaluate --predictions "$A/out/$name" --references data/toy/stories_test --metrics toy \
    --output "$A/out/$name/metrics.json"
}
gen minigpt5 runs/toy/stage2_lora
gen two_stage runs/toy/stage2_lora --mode two-stage
gen no_cfg runs/toy/stage2_lora --guidance-scale 1
gen no_caption_loss "$A/nocaption"
gen no_stage1 "$A/nostage1"
gen prefix "$A/prefix"
gen compact_mapper "$A/compact"

python - "$A/out" > runs/toy/experiment.md <<'EOF'
import json, sys
from pathlib import Path
rows = ["minigpt5", "two_stage", "no_cfg", "no_caption_loss", "no_stage1", "prefix", "compact_mapper"]
names = {"minigpt5": "MiniGPT-5 (vokens, LoRA, paper mapper)", "two_stage": "two-stage baseline",
         "no_cfg": "no CFG (guidance 1)", "no_caption_loss": "no caption loss", "no_stage1": "no stage 1",
         "prefix": "prefix tuning instead of LoRA", "compact_mapper": "compact mapper"}
cols = ["toy_colour", "toy_shape", "toy_position", "toy_text"]
print("| run | colour | shape | position | text exact |")
print("|---|---|---|---|---|")
for row in rows:
    m = json.loads((Path(sys.argv[1]) / row / "metrics.json").read_text())["metrics"]
    cells = [f"{m[c]['value']:.3f} ({m[c]['ci95'][0]:.2f}-{m[c]['ci95'][1]:.2f})" for c in cols]
    print(f"| {names[row]} | " + " | ".join(cells) + " |")
n = json.loads((Path(sys.argv[1]) / "minigpt5" / "metrics.json").read_text())["metrics"]["toy_colour"]["n"]
print(f"\n{n} held-out stories; 95% bootstrap intervals in brackets.")
EOF
cat runs/toy/experiment.md
