"""prepare-data throughput with 2 processes against 1, and a training step on cached latents
against on-the-fly VAE encoding.

1. Images per second. A CC3M fixture in img2dataset's `files` layout (default 2,000 JPEGs of
   800x600) is prepared with `--num-proc 2` and with `--num-proc 1` (decode, downscale to 256,
   re-encode); the ratio of rates is printed.
2. Stage-1 step time (forward, backward, optimizer) with the target images' latents read from the
   cache against encoding them with the VAE in the step, interleaved in one process. The generator
   has Stable Diffusion's VAE at its real 512px resolution (random weights) with a small UNet
   and text encoder; the LLM is the tiny debug one. So the ratio shows what the cache saves on the
   VAE; with a 7B LLM and SD's UNet the rest of the step is larger and the ratio smaller.

    python benchmarks/prepare_data.py
    python benchmarks/prepare_data.py --images 4000 --steps 10
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def fixture(folder: Path, n: int, size=(800, 600)) -> Path:
    """img2dataset `files` layout: 00000/000000000.jpg + .txt, smooth random pictures."""
    rng = np.random.default_rng(0)
    for i in range(n):
        shard = folder / f"{i // 10000:05d}"
        shard.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size, Image.BICUBIC).save(shard / f"{i:09d}.jpg", quality=90)
        (shard / f"{i:09d}.txt").write_text(f"a picture number {i}")
    return folder


def throughput(work: Path, n: int, repeats: int) -> dict[int, float]:
    """Median images per second, runs of 1 and 2 processes alternating."""
    from minigpt5_cli.data.prepare import Settings, prepare

    raw = fixture(work / "raw", n)
    quiet = Console(file=io.StringIO())
    rates = {1: [], 2: []}
    for _ in range(repeats):
        for procs in (1, 2):
            out = work / f"out{procs}"
            start = time.perf_counter()
            summary = prepare("cc3m", raw, out, Settings(num_proc=procs, image_size=256), console=quiet)
            rates[procs].append(summary["kept"] / (time.perf_counter() - start))
            shutil.rmtree(out)
    return {procs: statistics.median(r) for procs, r in rates.items()}


def sd_resolution_generator(folder: Path) -> Path:
    """The tiny SD pipeline with Stable Diffusion's own VAE (random weights) and a UNet sized for 512px."""
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel

    from minigpt5_cli import hub

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    pipe = DiffusionPipeline.from_pretrained(hub.resolve("tiny:sd"))
    torch.manual_seed(0)
    pipe.vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, sample_size=512,
    )
    # Attention only at 16x16, so the small UNet stays cheap on 64x64 latents.
    pipe.unet = UNet2DConditionModel.from_config({
        **pipe.unet.config, "sample_size": 64, "block_out_channels": (16, 32, 32),
        "down_block_types": ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D")})
    pipe.save_pretrained(folder)
    return folder


def step_times(work: Path, steps: int) -> dict[str, float]:
    from minigpt5_cli import recipe as R
    from minigpt5_cli.data.collate import Collator
    from minigpt5_cli.data.prepare import Settings, prepare
    from minigpt5_cli.data.samples import TrainSet
    from minigpt5_cli.data.sources import load_source
    from minigpt5_cli.training.train import model_for

    generator = sd_resolution_generator(work / "sd512")
    raw = fixture(work / "pairs", 4, size=(640, 512))
    quiet = Console(file=io.StringIO())
    prepare("cc3m", raw, work / "plain", Settings(), console=quiet)
    prepare("cc3m", raw, work / "cached", Settings(cache_latents=True, generator=str(generator)), console=quiet)
    recipe = R.load(REPO / "recipes/debug/stage1.yaml", [f"model.generator={generator}", "data.instruction_prob=0"])
    torch.manual_seed(0)
    model = model_for(recipe)
    collate = Collator.for_model(model, recipe.data)
    groups = model.trainable_groups()
    opt = torch.optim.AdamW([{"params": groups["vokens"]}, {"params": groups["mapper"]}], lr=1e-5)
    model.train()

    def step_for(folder):
        ds = TrainSet(load_source(folder, "1"), stage="1", resolution=model.generator.resolution, history=0, seed=0,
                      instruction_prob=0.0, images_in_prompt=model.llm_info.accepts_images)

        def step():
            # The batch is built inside the step: reading pixels or latents is part of the cost.
            batch = collate([ds[i] for i in range(2)])
            model(batch)["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    variants = {"on the fly": step_for(work / "plain"), "cached": step_for(work / "cached")}
    for fn in variants.values():
        fn()
    times = {name: [] for name in variants}
    for _ in range(steps):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3, help="prepare runs per process count")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="minigpt5-bench-"))
    try:
        rates = throughput(work, args.images, args.repeats)
        print(f"prepare-data on {args.images} JPEGs (800x600, downscaled to 256): 1 process {rates[1]:.0f} images/s, "
              f"2 processes {rates[2]:.0f} images/s (medians of {args.repeats}); ratio {rates[2] / rates[1]:.2f}x "
              f"({os.cpu_count()} CPUs)")
        times = step_times(work, args.steps)
        print(f"stage-1 step, batch 2, SD VAE at 512px: on the fly {times['on the fly'] * 1e3:.0f} ms, cached "
              f"{times['cached'] * 1e3:.0f} ms (median of {args.steps}); ratio on-the-fly/cached "
              f"{times['on the fly'] / times['cached']:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"reproduce: python benchmarks/prepare_data.py {' '.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
