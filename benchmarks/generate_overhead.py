"""`minigpt5 generate` against the bare parts doing the same work, and batch 4 against batch 1.

1. One story. Ours: the `generate` stage (prompt, sampling with voken groups, mapper, one diffusion
   call, PNG/HTML/JSON files). Bare: `model.llm.generate` sampling exactly as many new tokens as ours
   fed, plus the bare diffusers pipeline rendering as many images from the same `prompt_embeds`
   and negative embeddings with the same steps. Ratio of medians, ours / bare (target <= 1.10).
2. Throughput. Stories per second over the same stories at `--batch-size 4` against 1 (target >= 2).

Both pairs run interleaved in one process, so machine noise hits them alike. The backbones come
from a recipe (default: the debug recipe, tiny random-weight backbones); the vokens and mapper
stay untrained, which changes no cost.

    python benchmarks/generate_overhead.py
    python benchmarks/generate_overhead.py --recipe recipes/vist_stage2_lora.yaml --tokens 64 --diffusion-steps 50
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

STORY = "there is a circle in the middle. it moves to the right."


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(REPO / "recipes/debug/stage2_lora.yaml"))
    parser.add_argument("--tokens", type=int, default=48, help="max new tokens per response")
    parser.add_argument("--diffusion-steps", type=int, default=20)
    parser.add_argument("--stories", type=int, default=8, help="stories in the throughput comparison")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from rich.console import Console

    from minigpt5_cli.generation import generate as G
    from minigpt5_cli.generation.settings import Settings
    from minigpt5_cli.generation.stories import read_stories

    loaded = G.load(args.recipe)
    model, info = loaded.net, loaded.info
    device = info["device"]
    quiet = Console(file=io.StringIO())
    tmp = Path(tempfile.mkdtemp(prefix="minigpt5-bench-"))

    # Count the tokens our decoder feeds after each prompt, to give the bare LLM the same work.
    fed = []
    embed = model.llm.get_input_embeddings()
    hook = embed.register_forward_pre_hook(lambda m, a: fed.append(a[0].shape[1]))

    def settings(batch: int) -> Settings:
        return Settings(max_new_tokens=args.tokens, diffusion_steps=args.diffusion_steps, batch_size=batch)

    def ours():
        fed.clear()
        G.generate(read_stories(STORY), loaded, settings(1), tmp / "one", nested=False, overwrite=True,
                   console=quiet)

    ours()
    new_tokens = sum(fed[1:])
    images = len(read_json(tmp / "one")["generated"][0]["images"])
    hook.remove()

    prompt = model.tokenizer(f"###Human: {STORY} ###Assistant: ", return_tensors="pt").to(device)
    pipe = model.generator.pipeline()
    n, width = model.vokens.n, model.llm_info.width
    with torch.no_grad():
        states = torch.randn(images, n, width, device=device)
        cond, neg = model.mapper(states)[0], model.mapper(torch.zeros_like(states))[0]
    size = model.generator.resolution

    def bare():
        with torch.no_grad():
            model.llm.generate(**prompt, do_sample=True, top_p=0.9, temperature=1.0, repetition_penalty=2.0,
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               pad_token_id=model.tokenizer.pad_token_id)
        pipe(prompt_embeds=cond, negative_prompt_embeds=neg, num_inference_steps=args.diffusion_steps,
             guidance_scale=7.5, height=size, width=size, output_type="pil")

    stories = tmp / "stories.jsonl"
    stories.write_text("\n".join(f'{{"id": "s{i}", "steps": [{{"text": "story {i}. {STORY}"}}]}}'
                                 for i in range(args.stories)))

    def batch(b: int):
        return lambda: G.generate(read_stories(str(stories)), loaded, settings(b), tmp / f"b{b}", nested=True,
                                  overwrite=True, console=quiet)

    bare()
    batch(4)()
    times = {"ours": [], "bare": [], "b1": [], "b4": []}
    for _ in range(args.repeats):
        for name, fn in (("ours", ours), ("bare", bare), ("b1", batch(1)), ("b4", batch(4))):
            times[name].append(timed(fn, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"device: {device}; recipe: {args.recipe}; {new_tokens} new tokens, {images} image(s), "
          f"{args.diffusion_steps} diffusion steps; medians of {args.repeats}")
    print(f"one story: ours {med['ours'] * 1e3:.0f} ms, bare {med['bare'] * 1e3:.0f} ms; "
          f"ratio ours/bare {med['ours'] / med['bare']:.3f}  (target <= 1.10)")
    print(f"{args.stories} stories: batch 1 {args.stories / med['b1']:.2f} stories/s, batch 4 "
          f"{args.stories / med['b4']:.2f} stories/s; speed-up {med['b1'] / med['b4']:.2f}x  (target >= 2)")
    print(f"reproduce: python benchmarks/generate_overhead.py {' '.join(sys.argv[1:])}".rstrip())


def read_json(folder: Path) -> dict:
    import json

    return json.loads((folder / "story.json").read_text())


if __name__ == "__main__":
    main()
