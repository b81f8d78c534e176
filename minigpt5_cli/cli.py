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


_register_unbuilt("generate", "evaluate")


def main(argv: list[str] | None = None) -> None:
    """Entry point: a UserError becomes one line on stderr and exit code 2, with no traceback."""
    try:
        app(args=argv, prog_name="minigpt5")
    except UserError as e:
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        # Raised in a DataLoader worker, the message carries the worker's traceback: keep the last line.
        message = lines[-1].removeprefix(f"{UserError.__module__}.{UserError.__name__}: ") if lines else "error"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
