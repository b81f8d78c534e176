"""The memory plan against real steps: for a few configurations (stage 1 and 2, widths, precision,
gradient checkpointing, a micro-batch the plan extrapolates to), the activations, temporaries and
gradients `train --plan` measures on fake tensors against the memory a real step adds, measured in
a fresh process (CPU: peak resident set; GPU: peak allocated). Prints the table and the ratios.

    python benchmarks/plan_accuracy.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEBUG = REPO / "recipes" / "debug"
# name: (recipe, LLM size, overrides, micro-batch)
CONFIGS = {
    "stage 1, width 256 x 3 layers, fp32, 256 tokens": (
        "stage1.yaml", (256, 3), ["data.max_length=256", "train.mixed_precision=no"], 2),
    "stage 2 LoRA, width 512 x 6 layers, bf16, 384 tokens": (
        "stage2_lora.yaml", (512, 6), ["data.max_length=384", "train.mixed_precision=bf16"], 2),
    "stage 2 LoRA, width 512 x 6, fp32, checkpointing": (
        "stage2_lora.yaml", (512, 6), ["data.max_length=384", "train.mixed_precision=no",
                                       "train.gradient_checkpointing=true"], 2),
    "stage 1, width 512 x 6, bf16, 512 tokens, batch 3 (extrapolated)": (
        "stage1.yaml", (512, 6), ["data.max_length=512", "train.mixed_precision=bf16"], 3),
}


def llm(folder: Path, width: int, layers: int) -> str:
    import torch

    from minigpt5_cli.builders import tiny

    if not folder.exists():
        with torch.random.fork_rng():
            torch.manual_seed(0)
            tiny._build_llm(folder, {"vision": True, "width": width, "layers": layers, "heads": 8,
                                     "kv_heads": 8, "vision_width": 32})
    return str(folder)


def main() -> None:
    from minigpt5_cli import recipe as R
    from minigpt5_cli.training import plan as P

    data = {"stage1.yaml": DEBUG / "data" / "pairs.jsonl", "stage2_lora.yaml": DEBUG / "data" / "sequences.jsonl"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (recipe_file, (width, layers), extra, size) in CONFIGS.items():
            overrides = [f"model.llm={llm(Path(tmp) / f'llm{width}x{layers}', width, layers)}",
                         f"data.train={data[recipe_file]}", *extra]
            recipe = R.load(DEBUG / recipe_file, overrides)
            estimated = P.measure(recipe).activations(size, recipe.train.gradient_checkpointing)
            code = ("import json; from minigpt5_cli import recipe as R; from minigpt5_cli.training import plan as P; "
                    f"print(json.dumps(P.measured_growth(R.load({str(DEBUG / recipe_file)!r}, {overrides!r}), "
                    f"{size})))")
            out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                                 env=P.child_environment(), check=True)
            measured = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((name, estimated, measured))
            print(f"{name}: estimated {estimated / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB, "
                  f"ratio {estimated / measured:.3f}", flush=True)
    print("\n| configuration | estimated (MiB) | measured (MiB) | estimated / measured |\n| --- | --- | --- | --- |")
    for name, estimated, measured in rows:
        print(f"| {name} | {estimated / 2**20:.1f} | {measured / 2**20:.1f} | {estimated / measured:.3f} |")
    print("\nreproduce: python benchmarks/plan_accuracy.py")


if __name__ == "__main__":
    main()
