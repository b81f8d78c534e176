"""The `minigpt5` command line: one thin command per pipeline stage."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from minigpt5_cli.errors import UserError

app = typer.Typer(
    help="Interleaved text-and-image generation with generative vokens (MiniGPT-5).",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)

TRAIN_HELP = """Train stage 1 (vokens + mapper on caption pairs) or stage 2 (plus LoRA or prefix tuning on
interleaved sequences). Settings come from a YAML recipe; override any key as key.sub=value.

\b
Examples:
  minigpt5 train --recipe recipes/debug/stage1.yaml
  minigpt5 train --recipe recipes/debug/stage1.yaml train.max_steps=20 train.lr=1e-3
  minigpt5 train --recipe recipes/debug/stage1.yaml --resume
  accelerate launch -m minigpt5_cli train --recipe recipes/vist_stage2_lora.yaml
"""


def _not_built(name: str):
    def command(ctx: typer.Context) -> None:
        raise UserError(f"minigpt5 {name} is not built yet in this version")

    command.__doc__ = f"(not built yet) The {name} stage."
    return command


def _register_unbuilt(*names: str) -> None:
    for name in names:
        app.command(name, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(_not_built(name))


PREPARE_HELP = """Turn CC3M, VIST or MMDialog, as found on disk, into one Hugging Face dataset that train
reads directly. Bad records are skipped, counted in DIR/summary.json and listed in DIR/rejects.jsonl.

\b
CC3M: a TSV (official caption<TAB>url with --images named by row number; MiniGPT-5's
caption<TAB>image_path; GILL's caption<TAB>image) or img2dataset output (webdataset .tar shards,
the files layout, or parquet with image bytes).
VIST: a story-in-sequence JSON with --images, or the VIST root with --split; or the derived
{story_id: [{caption, image_id, sequence_index}]} form with --image-mapping.
MMDialog: conversations as JSON Lines or one JSON array; images are <media_key>.jpg beside it.

\b
Examples:
  minigpt5 prepare-data cc3m --input cc3m_wds/ --output data/cc3m --num-proc 8
  minigpt5 prepare-data vist --input vist/ --split train --output data/vist
  minigpt5 prepare-data vist --input vist/ --split test --continuation --output data/vist_test
  minigpt5 prepare-data mmdialog --input mmdialog/train/conversations.json --output data/mmdialog
  minigpt5 prepare-data cc3m --input cc3m_wds/ --output data/cc3m --cache-latents --generator stabilityai/stable-diffusion-2-1-base
"""


@app.command("prepare-data", help=PREPARE_HELP)
def prepare_data(
    fmt: str = typer.Argument(..., metavar="FORMAT", help="cc3m, vist or mmdialog."),
    input_path: Path = typer.Option(..., "--input", "-i", help="The raw data: a file or a folder."),
    output: Path = typer.Option(..., "--output", "-o", help="The dataset folder to write."),
    split: str = typer.Option("train", help="VIST: the split, when --input is the VIST root."),
    images: Optional[Path] = typer.Option(None, help="The image folder, where the format keeps it apart."),
    image_mapping: Optional[Path] = typer.Option(None, help="VIST derived form: {image_id: path} JSON."),
    clean_captions: bool = typer.Option(True, help="CC3M: lower-case and strip punctuation as the original."),
    continuation: bool = typer.Option(False, "--continuation", help="VIST evaluation set: steps 1-4 in, step 5 "
                                      "as the target."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first bad record."),
    num_proc: int = typer.Option(1, help="Processes decoding and resizing images."),
    image_size: int = typer.Option(512, help="Images are downscaled so that their short side is this."),
    cache_latents: bool = typer.Option(False, "--cache-latents", help="Store VAE latents and caption embeddings."),
    generator: str = typer.Option("", help="With --cache-latents: the generator, a hub id or folder."),
    cache_dtype: str = typer.Option("float32", help="float32 or float16 for the cached tensors."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing dataset folder."),
) -> None:
    from minigpt5_cli import prepare as stage

    if cache_dtype not in ("float32", "float16"):
        raise UserError(f"--cache-dtype must be float32 or float16, got {cache_dtype!r}")
    settings = stage.Settings(
        split=split, images=str(images or ""), image_mapping=str(image_mapping or ""), clean_captions=clean_captions,
        continuation=continuation, strict=strict, num_proc=num_proc, image_size=image_size,
        cache_latents=cache_latents, generator=generator, cache_dtype=cache_dtype,
    )
    summary = stage.prepare(fmt, input_path, output, settings, overwrite=overwrite)
    rejected = ", ".join(f"{k} {v}" for k, v in summary["rejected"].items()) or "none"
    typer.echo(f"{summary['kept']} kept, rejected: {rejected}; written to {output}")


@app.command(help=TRAIN_HELP)
def train(
    recipe: Path = typer.Option(..., "--recipe", "-r", help="YAML recipe under recipes/."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides.", show_default=False),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in train.output_dir."),
) -> None:
    from minigpt5_cli import recipe as recipes
    from minigpt5_cli.train import train as run

    run(recipes.load(recipe, overrides or []), resume=resume)


GENERATE_HELP = """Continue stories with interleaved text and images. STORY is a .json story
({"id": ..., "steps": [{"text": ..., "image": ...}]} or a list of steps), a .jsonl file of stories,
or plain text. Writes story.json, story.md, story.html and PNGs to OUTPUT (one folder per story and
an index.html for a .jsonl). Stories already finished under OUTPUT are kept.

\b
Examples:
  minigpt5 generate --story "there is a circle." --model runs/debug/stage2_lora --output out/one
  minigpt5 generate --story stories.jsonl --model runs/vist_lora --output out/vist --batch-size 8
  minigpt5 generate --story stories.jsonl --model runs/vist_lora --output out/baseline --mode two-stage
"""


@app.command(help=GENERATE_HELP)
def generate(
    story: str = typer.Option(..., "--story", "-s", help="A .json / .jsonl story file, or plain text."),
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint or run folder from train, or a recipe "
                               "(base backbones, untrained vokens)."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder."),
    mode: str = typer.Option("vokens", help="vokens (MiniGPT-5) or two-stage (text, then text-to-image)."),
    batch_size: int = typer.Option(1, "--batch-size", "-b", help="Stories generated together."),
    steps: int = typer.Option(1, help="Responses per story, each appended to the story before the next."),
    max_new_tokens: int = typer.Option(256, help="Tokens per response, voken groups included."),
    top_p: float = typer.Option(0.9, help="Nucleus sampling."),
    temperature: float = typer.Option(1.0, help="Sampling temperature; 0 decodes greedily."),
    repetition_penalty: float = typer.Option(2.0, help="HF-style repetition penalty; 1 turns it off."),
    min_images: int = typer.Option(1, help="A response that ends with fewer images gets a voken group "
                                   "at its end; 0 lets the model decide alone."),
    diffusion_steps: int = typer.Option(50, help="Denoising steps per image."),
    guidance_scale: float = typer.Option(7.5, help="Classifier-free guidance; 1 turns it off."),
    image_size: int = typer.Option(0, help="Image side in pixels; 0 uses the generator's resolution."),
    seed: int = typer.Option(0, help="Base seed; each story and image derives its own from it."),
    precision: Optional[str] = typer.Option(None, help="no, bf16 or fp16; default: the recipe's."),
    device: Optional[str] = typer.Option(None, help="cuda, cpu, ...; default: cuda when available."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo stories already finished under OUTPUT."),
) -> None:
    from minigpt5_cli import generate as stage
    from minigpt5_cli.stories import read_stories

    settings = stage.Settings(mode=mode, steps=steps, max_new_tokens=max_new_tokens, top_p=top_p,
                              temperature=temperature, repetition_penalty=repetition_penalty,
                              min_images=min_images, diffusion_steps=diffusion_steps,
                              guidance_scale=guidance_scale, image_size=image_size, seed=seed,
                              batch_size=batch_size)
    settings.check()
    if precision not in (None, "no", "bf16", "fp16"):
        raise UserError(f"unknown precision {precision!r}; choose no, bf16 or fp16")
    stories = read_stories(story)
    net, info = stage.load(str(model), precision=precision, device=device)
    done = stage.generate(stories, net, info, settings, output, nested=story.lower().endswith(".jsonl"),
                          overwrite=overwrite)
    page = output / ("index.html" if story.lower().endswith(".jsonl") else "story.html")
    typer.echo(f"{len(done)} stories in {output}; open {page}")


_register_unbuilt("evaluate")


def main(argv: list[str] | None = None) -> None:
    """Entry point: a UserError becomes one line on stderr and exit code 2, with no traceback."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # the libraries' deprecation notes: nothing to act on
    try:
        app(args=argv, prog_name="minigpt5")
    except UserError as e:
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        # Raised in a DataLoader worker, the message carries the worker's traceback: keep the last line.
        message = lines[-1].removeprefix(f"{UserError.__module__}.{UserError.__name__}: ") if lines else "error"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
