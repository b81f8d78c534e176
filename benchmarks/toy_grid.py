"""The shipped shapes-world model on the whole grid of drawing requests, scored by the attribute checker.

1. Requests: all 162 "Draw a COLOUR SHAPE PLACE." (6 colours x 3 shapes x 9 places), as the training
   dialogues phrase them.
2. Follow-ups: the only change the world's dialogues make, "Now make it a SHAPE." (the two other shapes),
   from every start: 324 prompts. The prompt is the dialogue's first reply with its true picture and the
   request, as in training (the recipe's `data.history` keeps the last two steps).

Each response's picture is read by `toyworld.world.read_attributes` and compared with what was asked;
its text with the dialogue's own reply. Sampling uses the model recipe's `sample` section (greedy text,
its diffusion steps and guidance). Prints accuracy per attribute, shape accuracy per (shape, place), the
worst cells, and the command that reproduces the run.

    python benchmarks/toy_grid.py                      # both sets, 486 prompts: about 14 s on 2 CPU cores
    python benchmarks/toy_grid.py --follow-ups 60      # a seeded sample of 60 follow-ups
    python benchmarks/toy_grid.py --model runs/toy/bundle --json out/grid.json
    python benchmarks/toy_grid.py --model unseen/runs/toy/bundle --mode two-stage --held-out   # recipes/toy/unseen.sh
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from minigpt5_cli.toyworld import world as toy  # noqa: E402

ATTRIBUTES = ("colour", "shape", "position")


def picture(colour: str, shape: str, cell: tuple[int, int]):
    from minigpt5_cli.story import Picture

    buf = io.BytesIO()
    toy.render(colour, shape, cell).save(buf, format="PNG")
    return Picture(f"{colour} {shape} {toy.PLACES[cell]}", data=buf.getvalue())


def requests() -> list[dict]:
    """Every drawing request: its prompt steps, the attributes it asks for and the reply it was trained on."""
    from minigpt5_cli.story import Step

    return [{"set": "request", "cell": (colour, shape, cell),
             "steps": [Step(f"Draw {toy.caption(colour, shape, cell)}.")],
             "want": (colour, shape, cell), "reply": f"Here is {toy.caption(colour, shape, cell)}."}
            for colour, shape, cell in toy.combinations()]


def follow_ups() -> list[dict]:
    """Every "Now make it a SHAPE." after a drawn picture (the dialogues' only change: another shape)."""
    from minigpt5_cli.story import Step

    out = []
    for colour, shape, cell in toy.combinations():
        for other in toy.SHAPES:
            if other != shape:
                steps = [Step(f"Draw {toy.caption(colour, shape, cell)}."),
                         Step(f"Here is {toy.caption(colour, shape, cell)}.", picture(colour, shape, cell)),
                         Step(f"Now make it a {other}.")]
                out.append({"set": "follow-up", "cell": (colour, shape, cell, other), "steps": steps,
                            "want": (colour, other, cell), "reply": f"Here it is as a {other}."})
    return out


def run(loaded, cases: list[dict], batch_size: int, seed: int = 0, mode: str = "vokens") -> None:
    """Generate one response per case (through generate's own batch loop) and score it in place."""
    import torch

    from minigpt5_cli.generation.decoder import Decoder
    from minigpt5_cli.generation.generate import run_batch
    from minigpt5_cli.generation.renderer import Renderer
    from minigpt5_cli.generation.settings import Settings
    from minigpt5_cli.generation.stories import Job
    from minigpt5_cli.story import Story

    settings = Settings(mode=mode, batch_size=batch_size, seed=seed).resolve(loaded.sample)
    decoder, renderer = Decoder(loaded.net, loaded.data, settings), Renderer(loaded.net, settings)
    jobs = [Job(Story(id=str(i), steps=case["steps"]), i) for i, case in enumerate(cases)]
    with torch.inference_mode():
        for i in range(0, len(jobs), batch_size):
            run_batch(settings, jobs[i:i + batch_size], decoder, renderer)
    for case, job in zip(cases, jobs):
        segments = job.responses[0]
        case["text"] = " ".join(seg["text"] for seg in segments if "text" in seg).strip()
        image = next((seg["image"] for seg in segments if "image" in seg), None)
        case["got"] = toy.read_attributes(image) if image is not None else None


def right(case: dict) -> list[bool]:
    got = case["got"]
    return [got is not None and got[k] == case["want"][k] for k in range(3)]


def summary(cases: list[dict]) -> dict:
    marks = np.array([right(c) for c in cases], dtype=float).reshape(-1, 3)
    return {"n": len(cases), **{a: float(marks[:, k].mean()) for k, a in enumerate(ATTRIBUTES)},
            "all": float(marks.all(1).mean()), "text": float(np.mean([c["text"] == c["reply"] for c in cases])),
            "text_shape": float(np.mean([c["want"][1] in c["text"].split(".")[0].split() for c in cases]))}


def label(cell: tuple) -> str:
    colour, shape, place = cell[:3]
    text = f"{colour} {shape} {toy.PLACES[place]}"
    return text + (f" -> {cell[3]}" if len(cell) > 3 else "")


def report(cases: list[dict], worst: int, held_out: bool = False) -> None:
    print("\n| set | n | colour | shape | position | all three | reply text exact | reply names the shape |")
    print("|---|---|---|---|---|---|---|---|")
    # With held_out, each set also apart by whether the asked picture is a combination kept out of training.
    groups = [(name, cells) for name in ("request", "follow-up", None)
              for cells in ((None, False, True) if held_out else (None,))]
    for name, unseen in groups:
        chosen = [c for c in cases if (name is None or c["set"] == name) and unseen in (None, c["held_out"])]
        if chosen:
            s = summary(chosen)
            row = (name or "both") + ("" if unseen is None else ", unseen" if unseen else ", seen")
            print(f"| {row} | {s['n']} | {s['colour']:.3f} | {s['shape']:.3f} | {s['position']:.3f} | "
                  f"{s['all']:.3f} | {s['text']:.3f} | {s['text_shape']:.3f} |")
    # Shape accuracy per asked (shape, place), over colours (and, for follow-ups, starting shapes).
    for name in ("request", "follow-up"):
        chosen = [c for c in cases if c["set"] == name]
        if not chosen:
            continue
        table = defaultdict(list)
        for c in chosen:
            table[(c["want"][1], c["want"][2])].append(all(right(c)))
        print(f"\n{name}s, all three right per asked shape x place (right/n):")
        print("| shape | " + " | ".join(toy.PLACES.values()) + " |")
        print("|---|" + "---|" * len(toy.PLACES))
        for shape in toy.SHAPES:
            row = [table.get((shape, p), []) for p in toy.PLACES]
            print(f"| {shape} | " + " | ".join(f"{sum(r)}/{len(r)}" if r else "-" for r in row) + " |")
    wrong = [c for c in cases if not all(right(c))]
    print(f"\nwrong cells: {len(wrong)} of {len(cases)}" + (f" (the first {worst})" if len(wrong) > worst else ""))
    for c in wrong[:worst]:
        got = "nothing" if c["got"] is None else label(c["got"])
        print(f"  {c['set']:9s} {label(c['cell']):45s} drew {got:38s} said {c['text']!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a bundle or checkpoint folder (default: the shipped model)")
    parser.add_argument("--follow-ups", type=int, default=-1,
                        help="follow-ups to run: -1 all 324, 0 none, N a seeded sample of N")
    parser.add_argument("--batch-size", type=int, default=162)
    parser.add_argument("--seed", type=int, default=0, help="generate's seed, and the follow-up sample's")
    parser.add_argument("--worst", type=int, default=40, help="wrong cells to list")
    parser.add_argument("--json", type=Path, default=None, help="also write every case's result here")
    parser.add_argument("--mode", default="vokens", choices=["vokens", "two-stage"], help="generate's mode")
    parser.add_argument("--held-out", action="store_true", help="report the cells prepare-data toy --hold-out "
                        "keeps out of training apart (for a model trained on such data)")
    args = parser.parse_args()

    import torch

    from minigpt5_cli.generation.generate import load
    from minigpt5_cli.modeling.bundle import default_model

    torch.manual_seed(args.seed)
    model = args.model or str(default_model())
    start = time.perf_counter()
    loaded = load(model)
    info = loaded.info
    cases = requests()
    more = follow_ups()
    if args.follow_ups >= 0:
        pick = np.random.default_rng(args.seed).choice(len(more), min(args.follow_ups, len(more)), replace=False)
        more = [more[i] for i in sorted(pick)]
    cases += more
    for case in cases:
        case["held_out"] = toy.held_out(*case["want"])
    run(loaded, cases, args.batch_size, args.seed, args.mode)
    took = time.perf_counter() - start
    sample = loaded.sample
    print(f"model {info['name']} ({model}), mode {args.mode}; sampling from its recipe: temperature "
          f"{sample.temperature}, {sample.diffusion_steps} diffusion steps, guidance {sample.guidance_scale}; "
          f"seed {args.seed}; {len(cases)} prompts in {took:.0f} s")
    report(cases, args.worst, args.held_out)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([{k: c[k] for k in ("set", "cell", "want", "got", "text", "reply", "held_out")}
                                         for c in cases], indent=1))
    print("\nreproduce: " + shlex.join(["python", "benchmarks/toy_grid.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
