#!/usr/bin/env bash
# The GPU check: what only a GPU can measure, in one run sized for under 8 minutes on one H200 (its
# last lines say how long each part took), printed as one markdown table.
#   (a) training steps at the paper's full depth (LLaVA-1.5-7B, all 32 layers, and SD 2.1 base, random
#       weights) in bf16, stages 1 and 2: the step's peak memory against `train --plan` for the same
#       configuration, tokens per second and model-FLOPs utilisation (benchmarks/scale.py);
#   (b) `minigpt5 generate` on those backbones at 512 px, 50 diffusion steps, batch 1 and 8: seconds a
#       story, the model's loading apart (timed as a rerun that finds every story done);
#   (c) `generate --shard 1/2`, then `--shard 2/2`, in one process each (the N-process path on one
#       device): the folder they write equals a plain run's, byte for byte.
# --smoke runs the same three parts on CPU with tiny backbones and few steps; the test suite runs it.
#
#   bash benchmarks/gpu_check.sh              # a GPU machine, in the project's environment
#   bash benchmarks/gpu_check.sh --smoke      # anywhere
# PYTHON names the interpreter (default: python); the weights built for (a) stay in
# /tmp/minigpt5-scale for the next run.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
py=${PYTHON:-python}
work=$(mktemp -d "${TMPDIR:-/tmp}/minigpt5-gpu-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
rows=$work/rows.md
: >"$rows"
status=0

if [[ ${1:-} == --smoke ]]; then
    export CUDA_VISIBLE_DEVICES=""
    scale=(--tiny --length 128 --batch 2 --precision no --steps 1)
    llm=tiny:llava sd=tiny:sd
    gen=(--diffusion-steps 2 --max-new-tokens 8 --precision no)  # the generator's own size
    shard=("${gen[@]}")
    what="CPU, tiny:llava + tiny:sd, fp32"
elif [[ $# -eq 0 ]]; then
    cache=/tmp/minigpt5-scale
    scale=(--layers 32 --length 2560 --batch 2 --precision bf16 --steps 5 --cache "$cache")
    llm=$cache/llava-1.5-7b-32-layers sd=$cache/sd-2.1-base
    gen=(--image-size 512 --diffusion-steps 50 --max-new-tokens 32 --precision bf16)
    shard=(--image-size 512 --diffusion-steps 10 --max-new-tokens 16 --precision bf16)
    what="LLaVA-1.5-7B (32 layers) + SD 2.1 base, random weights, bf16"
else
    echo "usage: bash benchmarks/gpu_check.sh [--smoke]" >&2
    exit 2
fi

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
row() { echo "| $* |" >>"$rows"; }

# `minigpt5 generate` with its output in $work/log; on failure the log's last line is the reason.
generate() {
    "$py" -m minigpt5_cli generate "$@" >"$work/log" 2>&1 || { reason "$work/log"; return 1; }
}

# The last line of a log that says something (not a frame of a box), for a failed part's row.
reason() {
    grep -v '^[[:space:]]*[╭╰]' "$1" | tail -n 1 | tr -d '│' | tr '|' '/' | sed 's/  */ /g'
}

# Stories that open with one step each: stories FILE N.
stories() {
    for ((i = 0; i < $2; i++)); do
        echo "{\"id\": \"s$i\", \"steps\": [{\"text\": \"we went to the beach on day $i. the sky was blue.\"}]}"
    done >"$1"
}

# (a) training steps: benchmarks/scale.py's figures, one row per stage.
part_a() {
    "$py" benchmarks/scale.py "${scale[@]}" --json "$work/scale.json" >"$work/scale.log" 2>&1 \
        || { reason "$work/scale.log"; return 1; }
    "$py" - "$work/scale.json" >>"$rows" <<'EOF'
import json, sys

run, gib = json.load(open(sys.argv[1])), 2**30
for r in run["rows"]:
    mfu = f"MFU {r['mfu']:.1%}" if r["mfu"] is not None else "MFU n/a (CPU, or a device without a known peak)"
    peak = f"{r['peak_measured'] / gib:.1f} GiB" if r["peak_measured"] is not None else "n/a on CPU"
    print(f"| a | train stage {r['stage']} step: {run['shapes']}; {run['settings']} | peak memory {peak}, "
          f"plan {r['peak_plan'] / gib:.1f} GiB (1 GiB of it assumed slack); a step adds "
          f"{r['step_measured'] / gib:.2f} GiB, plan {r['step_plan'] / gib:.2f}; {r['tokens_per_s']:.0f} tokens/s; "
          f"{mfu}; {r['ours']:.2f} s a step |")
EOF
}

# The model (b) and (c) generate with: a checkpoint of the paper's stage-2 recipe on the backbones of (a),
# its vokens, mapper and LoRA as initialised from seed 0, loaded as a trained model is.
model() {
    [[ -f $work/model/recipe.yaml ]] && return
    "$py" - recipes/vist_stage2_lora.yaml "$work/model" "model.llm=$llm" "model.generator=$sd" train.init_from=none \
        >"$work/model.log" 2>&1 <<'EOF' || { reason "$work/model.log"; return 1; }
import sys

import torch

from minigpt5_cli import recipe as R
from minigpt5_cli.modeling import checkpoint
from minigpt5_cli.training.train import model_for

recipe = R.load(sys.argv[1], sys.argv[3:])
torch.manual_seed(0)
checkpoint.save(model_for(recipe), sys.argv[2])
R.save(recipe, f"{sys.argv[2]}/recipe.yaml")
EOF
}

# (b) generate at batch 1 and 8; a third run, which finds every story done, times the loading alone.
part_b() {
    model || return 1
    stories "$work/four.jsonl" 4
    stories "$work/eight.jsonl" 8
    local start one eight load
    start=$(now); generate -s "$work/four.jsonl" -m "$work/model" -o "$work/b1" -b 1 "${gen[@]}" || return 1
    one=$(since "$start")
    start=$(now); generate -s "$work/eight.jsonl" -m "$work/model" -o "$work/b8" -b 8 "${gen[@]}" || return 1
    eight=$(since "$start")
    start=$(now); generate -s "$work/eight.jsonl" -m "$work/model" -o "$work/b8" -b 8 "${gen[@]}" || return 1
    load=$(since "$start")
    local images1 images8
    images1=$(find "$work/b1" -name '*.png' | wc -l)
    images8=$(find "$work/b8" -name '*.png' | wc -l)
    awk -v one="$one" -v eight="$eight" -v load="$load" -v i1="$images1" -v i8="$images8" -v g="${gen[*]}" \
        -v what="$what" 'BEGIN {
        a = (one - load) / 4; b = (eight - load) / 8
        printf "| b | generate batch 1: %s; %s | %.2f s a story (4 stories, %d images; loading, %.1f s, apart) |\n", what, g, a, i1, load
        printf "| b | generate batch 8: %s; %s | %.2f s a story (8 stories, %d images), %.2fx batch 1 |\n", what, g, b, i8, a / b
    }' >>"$rows"
}

# (c) two shards in turn against a plain run: 5 stories at batch 2, so the shards are uneven.
part_c() {
    model || return 1
    stories "$work/five.jsonl" 5
    local args=(-s "$work/five.jsonl" -m "$work/model" -b 2 "${shard[@]}")
    generate "${args[@]}" -o "$work/plain" || return 1
    generate "${args[@]}" -o "$work/sharded" --shard 1/2 || return 1
    generate "${args[@]}" -o "$work/sharded" --shard 2/2 || return 1
    local files differ
    files=$(find "$work/plain" -type f | wc -l)
    if differ=$(diff -rq "$work/plain" "$work/sharded" 2>&1); then
        row "c | generate --shard 1/2 then 2/2 against a plain run: 5 stories, batch 2; ${shard[*]} | equal: $files files, byte for byte"
    else
        row "c | generate --shard 1/2 then 2/2 against a plain run: 5 stories, batch 2; ${shard[*]} | differ: $(echo "$differ" | head -n 3 | sed "s|$work/||g" | tr '\n|' '; ')"
        return 2
    fi
}

took=()
for part in a b c; do
    start=$(now)
    if ! why=$(part_$part); then
        [[ -n $why ]] && row "$part | failed | $why"
        status=1
    fi
    took+=("$part $(since "$start") s")
done

echo "| part | what | measured |"
echo "| --- | --- | --- |"
cat "$rows"
echo
device=$("$py" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")')
echo "device: $device; took: ${took[*]}; $(date -u +%Y-%m-%d)"
echo "reproduce: bash benchmarks/gpu_check.sh $*"
exit $status
