"""Time and memory of one stage-1 optimizer step against the bare frozen parts doing the same work.

Ours: the full `MiniGPT5` step (LLM forward/backward, mapper, VAE encode, UNet forward/backward,
caption target, optimizer). Bare: the LLM forward and backward on the same tokens (to its input
embeddings), plus the UNet forward and backward to its conditioning input, with nothing trained.
Both run interleaved in one process, so machine noise hits them alike; the ratio of medians is
printed. Peak memory is read per variant in a child process, as the growth over the memory held
after setup (CPU: peak resident set; GPU: peak allocated), so it counts activations, gradients
and optimizer state, not the weights both share.

    python benchmarks/train_overhead.py                       # debug recipe, tiny backbones
    python benchmarks/train_overhead.py --steps 40 train.mixed_precision=bf16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def setup(overrides: list[str]):
    from minigpt5_cli import recipe as R
    from minigpt5_cli.data.collate import Collator
    from minigpt5_cli.data.samples import TrainSet
    from minigpt5_cli.data.sources import read_jsonl
    from minigpt5_cli.training.plan import forward_autocast
    from minigpt5_cli.training.train import model_for

    recipe = R.load(REPO / "recipes/debug/stage1.yaml",
                    [f"data.train={REPO}/recipes/debug/data/pairs.jsonl", "data.instruction_prob=0", *overrides])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = model_for(recipe).to(device)
    ds = TrainSet(read_jsonl(recipe.data.train, "1"), stage="1", resolution=model.generator.resolution, history=0,
                  seed=0, instruction_prob=0.0, images_in_prompt=model.llm_info.accepts_images)
    collate = Collator.for_model(model, recipe.data)
    batch = {k: v.to(device) if torch.is_tensor(v) else v  # captions stay texts
             for k, v in collate([ds[i] for i in range(recipe.train.batch_size)]).items()}
    groups = model.trainable_groups()
    opt = torch.optim.AdamW([{"params": groups["vokens"]}, {"params": groups["mapper"], "lr": 1e-4}], lr=1e-5)
    model.train()
    autocast = forward_autocast(recipe, device)

    def ours():
        with autocast():
            loss = model(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # The bare parts see the same tokens, and latents and conditioning of the same shapes.
    n_img = batch["target_pixels"].shape[0]
    latents = model.generator.latents(batch["target_pixels"])
    length, width = model.generator.cond_shape
    denoiser = model.generator.denoiser
    embed = model.llm.get_input_embeddings()
    llm_inputs = {k: batch[k] for k in ("attention_mask", "pixel_values") if k in batch}

    def bare():
        with autocast():
            embeds = embed(batch["input_ids"]).detach().requires_grad_(True)
            logits = model.llm(inputs_embeds=embeds, **llm_inputs, output_hidden_states=True).logits
            text = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                     batch["labels"][:, 1:].flatten(), ignore_index=-100)
            cond = torch.randn(n_img, length, width, device=device, dtype=denoiser.dtype, requires_grad=True)
            t = torch.randint(0, 1000, (n_img,), device=device)
            pred = denoiser(latents, t, encoder_hidden_states=cond).sample
            loss = text + pred.float().pow(2).mean()
        loss.backward()

    return ours, bare, device


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, steps: int, warmup: int, device: str) -> dict[str, float]:
    """Median seconds per call of each function, called in turns so that machine noise hits them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def timing(overrides, steps, warmup):
    ours, bare, device = setup(overrides)
    return interleaved({"ours": ours, "bare": bare}, steps, warmup, device), device


def peak_memory(variant, overrides, steps):
    """Runs in a child process: how far `steps` calls of one variant raise peak memory over setup."""
    ours, bare, device = setup(overrides)
    fn = ours if variant == "ours" else bare
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(steps):
        fn()
    if device == "cuda":
        return torch.cuda.max_memory_allocated() - base
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="recipe overrides, key.sub=value")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--memory-child", choices=["ours", "bare"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps({"peak": peak_memory(args.memory_child, args.overrides, 5)}))
        return
    medians, device = timing(args.overrides, args.steps, args.warmup)
    peaks = {}
    for variant in ("ours", "bare"):
        out = subprocess.run([sys.executable, __file__, "--memory-child", variant, *args.overrides],
                             capture_output=True, text=True, check=True)
        peaks[variant] = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    ratio = medians["ours"] / medians["bare"]
    print(f"device: {device}; recipe: recipes/debug/stage1.yaml {' '.join(args.overrides)}")
    print(f"step time: ours {medians['ours'] * 1e3:.1f} ms, bare {medians['bare'] * 1e3:.1f} ms (median of {args.steps})")
    print(f"time ratio ours/bare: {ratio:.3f}  (target <= 1.15)")
    memory = f"peak memory over setup: ours {peaks['ours'] / 2**20:.1f} MiB, bare {peaks['bare'] / 2**20:.1f} MiB"
    if min(peaks.values()) >= 2**20:
        memory += f", ratio {peaks['ours'] / peaks['bare']:.3f}"
    else:  # the resident set moves in pages and reuses freed memory: below 1 MiB a ratio means nothing
        memory += " (too small to compare on this configuration)"
    print(memory)
    print(f"reproduce: python benchmarks/train_overhead.py {' '.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
