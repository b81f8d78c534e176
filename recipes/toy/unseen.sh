#!/usr/bin/env bash
# Held-out must mean unseen: the shapes world with 3 colour-shape and 3 shape-place combinations (42 of
# the 162 cells) kept out of every pair, story and dialogue; both backbones and MiniGPT-5 trained on the
# rest with the toy recipes; then MiniGPT-5 and the two-stage baseline scored on held-out stories that
# end on a seen combination (stories_test) and on an unseen one (stories_unseen), and on the whole grid
# of drawing requests, seen and unseen cells apart.
#
#   bash recipes/toy/unseen.sh [ROOT]      # about 35 minutes on 2 CPU cores; writes ROOT/runs/toy/unseen.md
#
# ROOT is laid out as chain.sh lays it out (ROOT/data/toy, ROOT/runs/toy/...): use a ROOT of its own.
set -euo pipefail
MINIGPT5=("${PYTHON:-python3}" -m minigpt5_cli)
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
ROOT="${1:-.}"
mkdir -p "$ROOT" && cd "$ROOT"

"${MINIGPT5[@]}" prepare-data toy --output data/toy --seed 0 --hold-out
for recipe in generator llm_vision llm stage1 stage2_lora; do
  "${MINIGPT5[@]}" train --recipe "$HERE/$recipe.yaml"
done
"${MINIGPT5[@]}" bundle runs/toy/stage2_lora runs/toy/bundle --overwrite

O=runs/toy/unseen
for mode in vokens two-stage; do
  for split in stories_test stories_unseen; do
    "${MINIGPT5[@]}" generate --story "data/toy/$split" --model runs/toy/bundle --output "$O/$mode/$split" \
      --batch-size 25 --mode "$mode"
    "${MINIGPT5[@]}" evaluate --predictions "$O/$mode/$split" --references "data/toy/$split" --metrics toy \
      --output "$O/$mode/$split/metrics.json"
  done
  "${PYTHON:-python3}" "$REPO/benchmarks/toy_grid.py" --model runs/toy/bundle --mode "$mode" --held-out \
    --json "$O/$mode/grid.json" > "$O/$mode/grid.md"
done

"${PYTHON:-python3}" - "$O" > runs/toy/unseen.md <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| mode | set | n | colour | shape | position | all three |")
print("|---|---|---|---|---|---|---|")
for mode in ("vokens", "two-stage"):
    for split, name in (("stories_test", "stories ending on a seen cell"), ("stories_unseen", "stories ending on an unseen cell")):
        m = json.loads((out / mode / split / "metrics.json").read_text())["metrics"]
        cells = [f"{m[c]['value']:.3f}" for c in ("toy_colour", "toy_shape", "toy_position")]
        print(f"| {mode} | {name} | {m['toy_colour']['n']} | " + " | ".join(cells) + " | |")
    cases = json.loads((out / mode / "grid.json").read_text())
    for seen in (True, False):
        chosen = [c for c in cases if c["set"] == "request" and c["held_out"] != seen]
        marks = [[c["got"] is not None and c["got"][k] == c["want"][k] for k in range(3)] for c in chosen]
        cols = [sum(m[k] for m in marks) / len(marks) for k in range(3)]
        print(f"| {mode} | requests, {'seen' if seen else 'unseen'} cells | {len(chosen)} | "
              + " | ".join(f"{v:.3f}" for v in cols) + f" | {sum(all(m) for m in marks) / len(marks):.3f} |")
PY
cat runs/toy/unseen.md
