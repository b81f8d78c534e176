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


_register_unbuilt("prepare-data")  # listed in pipeline order


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
