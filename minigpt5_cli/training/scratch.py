"""`minigpt5 train` stages `llm` and `generator`: a backbone trained from scratch.

They exist for the shapes world (`toyworld/world.py`), whose backbones (`toy:llava`, `toy:sd`) start from
random weights. The result is a plain `save_pretrained` folder in `train.output_dir`, which stage-1
and stage-2 recipes name as `model.llm` or `model.generator` like any local backbone.

- llm: every weight of the LLM (vision tower and projector included) learns the text targets of
  `TrainSet` stage "llm": captions of the pairs, and the stories' and dialogues' next steps.
- generator: first the VAE alone (`scratch.vae_steps`, reconstruction plus a small KL term), then
  its latent scale is measured, then the UNet and text encoder together, with the generator's own
  noise schedule, Min-SNR weighting, null captions at `loss.cfg_drop` and EMA weights. Every image
  is held in memory: this stage is meant for small worlds.

Both honour `train.max_steps` (or `train.epochs` when it is 0), `train.batch_size` and
`train.grad_accum`, in the loop of `loop.py`; they run in one process in float32 (the recipe must
say `train.mixed_precision: "no"`), without `--resume`: a run interrupted (Ctrl-C, SIGTERM) saves
what it has to `output_dir` and says so.
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console

from minigpt5_cli import files
from minigpt5_cli import images as imaging
from minigpt5_cli import recipe as recipes
from minigpt5_cli.data.collate import Collator
from minigpt5_cli.data.samples import TrainSet
from minigpt5_cli.data.sources import load_sources
from minigpt5_cli.errors import UserError
from minigpt5_cli.modeling.llm_families import quirks
from minigpt5_cli.modeling.runner import LLMRunner
from minigpt5_cli.toyworld import world as toy
from minigpt5_cli.training.loop import Loop, locked, running, total_steps

SCRATCH_STATE = "scratch_state.json"  # what the run did: its steps, and the samples' accuracy on toy data
CONFIGS = ("config.json", "model_index.json")  # what from_pretrained reads first, of a model and of a pipeline
KL_WEIGHT = 1e-6  # VAE: the KL term only keeps the posterior from collapsing; reconstruction dominates
VAE_WARMUP = 20  # VAE: warm up over 1/20 of its steps
ENCODE_BATCH = 256  # images per VAE call when measuring the latents
FOREGROUND_LEVEL = 0.1  # summed |pixel - border| in [-1, 1] units above which a pixel is an object's
SAMPLE_STEPS, SAMPLE_GUIDANCE = 20, 3.0  # the in-training samples read by the attribute checker
REPORT = Console()  # what a stage reports goes to stdout; warnings and progress to stderr


def train_backbone(recipe: recipes.Recipe, resume: bool = False, console: Console | None = None) -> Path:
    console = console or Console(stderr=True)
    t = recipe.train
    if resume:
        raise UserError(f"stage {t.stage} cannot resume; run it again into an empty train.output_dir")
    if not recipe.data.train:
        raise UserError("no training data: set data.train")
    out = Path(t.output_dir)
    _check_empty(out)
    with locked(out):
        _check_empty(out)  # again: a run that held the lock until now may have filled it
        torch.manual_seed(t.seed)
        source = load_sources([recipe.data.train, *recipe.data.extra], "1" if t.stage == "generator" else "2",
                              recipe.data.allow_outside_paths)
        run = _train_generator if t.stage == "generator" else _train_llm
        return run(recipe, source, out, console)


def _check_empty(out: Path) -> None:
    """Refuse an output_dir that holds anything but the lock file (which a run that failed leaves)."""
    if out.exists() and any(p.name != files.LOCK_FILE for p in out.iterdir()):
        raise UserError(f"{out} is not empty; pick another train.output_dir")


def _schedule(optimizer, warmup: int, total: int):
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, min(warmup, total), total)


def _save(out: Path, write: Callable[[Path], None], recipe: recipes.Recipe, state: dict) -> None:
    """Write beside `output_dir`, then move what was written into it (`files.staged`), the configs
    last. `output_dir` holds nothing else (the run checked, and holds it), and its lock file stays in
    place, held: were it replaced, another run could lock the new one while this one still writes."""
    with files.staged(out, into=True, last=CONFIGS) as tmp:
        write(tmp)
        recipes.save(recipes.anchored(recipe, out), tmp / "recipe.yaml")  # backbones relative to `out`
        (tmp / SCRATCH_STATE).write_text(json.dumps(state, indent=2))


@contextmanager
def _saving(out: Path, write: Callable[[Path], None], recipe: recipes.Recipe, state: dict, console: Console,
            what: str):
    """The stage's progress display. Afterwards what `write` writes is saved to `out` with the recipe and
    `state`; an interrupted run saves it as it was, and says so (`what`, formatted with `state`)."""
    def interrupted() -> None:
        _save(out, write, recipe, {**state, "interrupted": True})
        console.print(f"interrupted: saved {what.format(**state)} to {out}")

    with running(console, interrupted) as progress:
        yield progress
    _save(out, write, recipe, state)
    REPORT.print(f"done: {out}")


# -- the LLM ---------------------------------------------------------------------------------------

def _train_llm(recipe: recipes.Recipe, source, out: Path, console: Console) -> Path:
    from minigpt5_cli.modeling.backbones import load_llm
    from minigpt5_cli.modeling.losses import text_loss

    t = recipe.train
    llm = load_llm(recipe.model.llm, trust_remote_code=recipe.model.trust_remote_code)
    model = llm.model.float().train()
    model.requires_grad_(True)
    # No vokens in this stage, so no target images: the resolution is never used.
    dataset = TrainSet(source, stage="llm", resolution=0, history=recipe.data.history, seed=t.seed,
                       instruction_prob=0.0, images_in_prompt=llm.accepts_images, tasks=recipe.data.tasks)
    collate = Collator(tokenizer=llm.tokenizer, processor=llm.processor, first_voken=0,
                       n_vokens=0, max_length=recipe.data.max_length, prompt_format=recipe.data.prompt_format,
                       quirks=quirks(llm.model))
    loader = torch.utils.data.DataLoader(dataset, batch_size=t.batch_size, shuffle=True, collate_fn=collate,
                                         num_workers=recipe.data.num_workers,
                                         generator=torch.Generator().manual_seed(t.seed))
    total = total_steps(t, len(loader))
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay, eps=t.adam_eps)
    scheduler = _schedule(optimizer, t.warmup_steps, total)
    REPORT.print(f"llm {recipe.model.llm}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
                  f"{len(dataset)} samples")

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        (llm.processor or llm.tokenizer).save_pretrained(folder)

    batches, runner = _forever(loader), LLMRunner(model)

    def micro(i: int) -> dict[str, torch.Tensor]:
        batch = next(batches)
        logits = runner(batch).logits
        return {"text": text_loss(logits, batch["labels"])}

    state = {"step": 0, "of": total}
    with _saving(out, write, recipe, state, console, "the LLM at step {step} of {of}") as progress:
        for step, _ in Loop(optimizer, scheduler, model.parameters(), t).steps(progress, "llm", total, micro):
            state["step"] = step
    return out


def _forever(loader):
    while True:
        yield from loader


# -- the generator ---------------------------------------------------------------------------------

def _pairs(source, resolution: int) -> tuple[torch.Tensor, list[str]]:
    images, captions = [], []
    for r, flags in enumerate(source.images):
        if not any(flags):
            continue
        for step in source[r].steps:
            if step.image is not None:
                images.append(imaging.to_pixels(step.image.open(), resolution))
                captions.append(step.text)
    if not images:
        raise UserError("the training data holds no images")
    return torch.stack(images), captions


def _foreground(x: torch.Tensor) -> torch.Tensor:
    """Pixels unlike the image's border colour: the objects, which a plain MSE under-weights."""
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1).mean(-1)
    return ((x - border[..., None, None]).abs().sum(1, keepdim=True) > FOREGROUND_LEVEL).float()


def _train_generator(recipe: recipes.Recipe, source, out: Path, console: Console) -> Path:
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    from minigpt5_cli.modeling.generators import SD, load_generator
    from minigpt5_cli.modeling.losses import diffusion_loss

    t, s, w = recipe.train, recipe.scratch, recipe.loss
    gen = load_generator(recipe.model.generator)
    if type(gen) is not SD:
        raise UserError(f"stage generator trains Stable Diffusion 1.x / 2.x-style pipelines (as toy:sd); "
                        f"{recipe.model.generator!r} is {gen.family}")
    pipe = gen.pipe
    images, captions = _pairs(source, gen.resolution)
    fg = _foreground(images)
    total = total_steps(t, len(images), per_batch=t.batch_size)
    REPORT.print(f"generator {recipe.model.generator}: {len(images)} images at {gen.resolution}px; VAE "
                  f"{_millions(pipe.vae)}, UNet {_millions(pipe.unet)}, text encoder {_millions(pipe.text_encoder)}")
    checker = _checker(source, captions, s.eval_samples) if s.eval_every else None
    state = {"vae_steps": 0, "steps": 0}

    def write(folder: Path) -> None:
        _saved_pipeline(gen, ema).save_pretrained(folder)

    ema = None
    with _saving(out, write, recipe, state, console, "the generator as it was") as progress:
        # 1. The autoencoder.
        vae = pipe.vae.float().train().requires_grad_(True)
        opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr)
        sched = _schedule(opt, max(1, s.vae_steps // VAE_WARMUP), s.vae_steps)

        def reconstruction(i: int) -> dict[str, torch.Tensor]:
            idx = torch.randint(0, len(images), (t.batch_size,))
            x = images[idx]
            posterior = vae.encode(x).latent_dist
            rec = vae.decode(posterior.sample()).sample
            return {"reconstruction": ((1 + s.foreground_weight * fg[idx]) * (rec - x) ** 2).mean() +
                    KL_WEIGHT * posterior.kl().mean()}

        for step, _ in Loop(opt, sched, vae.parameters(), t).steps(progress, "vae", s.vae_steps, reconstruction):
            state["vae_steps"] = step
        vae.eval().requires_grad_(False)
        with torch.no_grad():
            mean, std = _posterior(vae, images)
        if s.vae_steps:
            vae.register_to_config(scaling_factor=float(1 / mean.std()))
        if checker:
            state["vae_accuracy"] = checker(_decoded(vae, mean[checker.rows]))
            REPORT.print(f"vae: reconstructions read right: {_fmt(state['vae_accuracy'])}")
            # Every picture the world has, through the VAE and back: one it cannot carry, no caption can draw.
            state["vae_round_trip_wrong"] = wrong = _round_trip(vae, gen.resolution)
            REPORT.print(f"vae: round trip of the world's {len(toy.combinations())} pictures: {len(wrong)} read back "
                         "wrong" + (f" ({', '.join(wrong[:6])}{', ...' if len(wrong) > 6 else ''})" if wrong else ""))

        # 2. The UNet and text encoder, on the frozen VAE's latents.
        unet, text_encoder = pipe.unet.float().train(), pipe.text_encoder.float().train()
        params = [*unet.parameters(), *text_encoder.parameters()]
        for p in params:
            p.requires_grad_(True)
        noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
        tok = gen.tokenizer
        ids = tok(captions, padding="max_length", truncation=True, max_length=tok.model_max_length,
                  return_tensors="pt").input_ids
        null = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        sched = _schedule(opt, t.warmup_steps, total)
        if s.ema > 0:
            ema = (EMAModel(unet.parameters(), decay=s.ema), EMAModel(text_encoder.parameters(), decay=s.ema))
        scale = vae.config.scaling_factor

        def diffusion(i: int) -> dict[str, torch.Tensor]:
            idx = torch.randint(0, len(images), (t.batch_size,))
            latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape)) * scale
            cond_ids = torch.where((torch.rand(len(idx)) < w.cfg_drop)[:, None], null, ids[idx])
            return {"diffusion": diffusion_loss(unet, noise_sched, text_encoder(cond_ids).last_hidden_state, latents,
                                                w.snr_gamma)}

        for step, _ in Loop(opt, sched, params, t).steps(progress, "unet", total, diffusion):
            if ema is not None:
                ema[0].step(unet.parameters())
                ema[1].step(text_encoder.parameters())
            state["steps"] = step
            if checker and (step % s.eval_every == 0 or step == total):
                state["accuracy"] = checker(_sampled(gen, ema, captions, checker.rows, t.seed))
                REPORT.print(f"unet step {step}: samples read right: {_fmt(state['accuracy'])}")
    return out


def _millions(module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f}M"


def _fmt(acc: dict) -> str:
    return " ".join(f"{k} {v:.2f}" for k, v in acc.items())


@dataclass
class _Checker:
    """Scores images drawn for the captions of `rows` with the shapes world's attribute checker."""

    rows: list[int]
    truth: list[tuple]

    def __call__(self, images: list) -> dict:
        return toy.accuracy(images, self.truth)


def _checker(source, captions: list[str], n: int) -> _Checker | None:
    """On shapes-world data, a checker for `n` fixed captions; None for other data."""
    if (source.summary or {}).get("format") != "toy":
        return None
    truth = {toy.caption(*a): a for a in toy.combinations()}
    rows = [i for i, c in enumerate(captions) if c in truth]
    rows = sorted({captions[i]: i for i in rows}.values())[:n]  # distinct captions, a fixed choice
    return _Checker(rows, [truth[captions[i]] for i in rows])


def _round_trip(vae, resolution: int) -> list[str]:
    """The captions of the world's pictures that its exact render, encoded and decoded, does not show."""
    combos = toy.combinations()
    pixels = torch.stack([imaging.to_pixels(toy.render(*c, size=resolution), resolution) for c in combos])
    with torch.no_grad():
        means, _ = _posterior(vae, pixels)
    return [toy.caption(*c) for c, image in zip(combos, _decoded(vae, means)) if toy.read_attributes(image) != c]


def _posterior(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and standard deviation of the VAE's posterior for each image, ENCODE_BATCH images a call."""
    posts = [vae.encode(pixels[i:i + ENCODE_BATCH]).latent_dist for i in range(0, len(pixels), ENCODE_BATCH)]
    return torch.cat([p.mean for p in posts]), torch.cat([p.std for p in posts])


def _decoded(vae, latents: torch.Tensor) -> list:
    from diffusers.image_processor import VaeImageProcessor

    with torch.no_grad():
        return VaeImageProcessor().postprocess(vae.decode(latents).sample, output_type="pil")


def _saved_pipeline(gen, ema):
    """The pipeline as it is saved: copies of the UNet and text encoder, holding the EMA weights when kept."""
    unet, text_encoder = copy.deepcopy(gen.pipe.unet).eval(), copy.deepcopy(gen.pipe.text_encoder).eval()
    if ema is not None:
        ema[0].copy_to(unet.parameters())
        ema[1].copy_to(text_encoder.parameters())
    pipe = type(gen.pipe)(**{**gen.pipe.components, "unet": unet, "text_encoder": text_encoder})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sampled(gen, ema, captions: list[str], rows: list[int], seed: int) -> list:
    """Samples from the saved pipeline's weights."""
    pipe, size = _saved_pipeline(gen, ema), gen.resolution
    with torch.no_grad():
        return pipe([captions[i] for i in rows], num_inference_steps=SAMPLE_STEPS, guidance_scale=SAMPLE_GUIDANCE,
                    height=size, width=size, generator=torch.Generator().manual_seed(seed)).images
