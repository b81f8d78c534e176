"""`minigpt5 import-official minigpt4` and `minigpt5 import-official minigpt5`: thin commands over
minigpt4.py and minigpt5.py."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

official_app = typer.Typer(
    help="The paper's released model on current libraries: MiniGPT-4 as a transformers folder, then the "
         "released MiniGPT-5 checkpoints as a minigpt5 checkpoint over it.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)

MINIGPT4_HELP = """Write MiniGPT-4 (EVA ViT-g, the BLIP-2 Q-Former, MiniGPT-4's projection and Vicuna) as one
transformers Blip2ForConditionalGeneration folder, with its tokenizer (an image token added) and the original
image preprocessing (short side to 224, bilinear, centre crop, CLIP mean and std). Every tensor of the three
weight files is checked, and placed or ignored as the original ignores it (ViT blocks past --vision-layers,
parts MiniGPT-4 never reads); the files are read as tensors only, never as code.

\b
Example:
  minigpt5 import-official minigpt4 --vicuna vicuna-7b --eva-vit eva_vit_g.pth \\
      --qformer blip2_pretrained_flant5xxl.pth --minigpt4 prerained_minigpt4_7b.pth --output minigpt4-7b
"""

MINIGPT5_HELP = """Write the released MiniGPT-5 checkpoints (stage1_cc3m.ckpt, and stage2_vist.ckpt or
stage2_mmdialog.ckpt) as a minigpt5 checkpoint over the folder `import-official minigpt4` wrote: the mapper,
the voken rows, the LoRA adapter (stage 2), the LLM's whole input embedding and LM head, and a recipe with
the original prompts and sampling, as the one checkpoint (checkpoint-0) of a run folder, which generate,
bundle and train.init_from take. The files are checked name by name and shape by shape first; stage 2 holds
only what it trained, so the stage-1 file is always needed. The system prompts the model was trained with
are read from the original code's dataloader.py in --upstream (a checkout of eric-ai-lab/MiniGPT-5; it is
parsed, never run). Prints how the released matrices' rows compare with the base's in norm (weight decay
shrank them all).

\b
Example:
  minigpt5 import-official minigpt5 --stage1 stage1_cc3m.ckpt --stage2 stage2_vist.ckpt --base minigpt4-7b \\
      --generator stabilityai/stable-diffusion-2-1-base --upstream MiniGPT-5 --output minigpt5-vist
"""


@official_app.command("minigpt4", help=MINIGPT4_HELP, short_help="MiniGPT-4 as a transformers Blip2 folder.")
def minigpt4(
    vicuna: Path = typer.Option(..., "--vicuna", help="The Vicuna folder (transformers layout)."),
    eva_vit: Path = typer.Option(..., "--eva-vit", help="LAVIS's eva_vit_g.pth."),
    qformer: Path = typer.Option(..., "--qformer", help="LAVIS's blip2_pretrained_flant5xxl.pth."),
    minigpt4_file: Path = typer.Option(..., "--minigpt4", help="MiniGPT-4's checkpoint (prerained_minigpt4_7b.pth)."),
    output: Path = typer.Option(..., "--output", "-o", help="The folder to write."),
    vision_heads: Optional[int] = typer.Option(None, "--vision-heads", min=1, help="The ViT's attention heads "
                                               "\\[default: its width / 88, as EVA ViT-g].", show_default=False),
    qformer_heads: Optional[int] = typer.Option(None, "--qformer-heads", min=1, help="The Q-Former's attention "
                                                "heads \\[default: its width / 64, as BERT].", show_default=False),
    vision_layers: int = typer.Option(39, "--vision-layers", min=1, help="The ViT blocks to build; the file's "
                                      "later blocks are ignored, as the original does with the 40 of eva_vit_g.pth."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a folder this command wrote."),
) -> None:
    from minigpt5_cli.official.minigpt4 import import_minigpt4

    record = import_minigpt4(vicuna, eva_vit, qformer, minigpt4_file, output, vision_heads=vision_heads,
                             qformer_heads=qformer_heads, vision_layers=vision_layers, overwrite=overwrite)
    typer.echo(f"wrote {output} (image token id {record['image_token_index']})")


@official_app.command("minigpt5", help=MINIGPT5_HELP, short_help="The released checkpoints as a minigpt5 checkpoint.")
def minigpt5(
    stage1: Path = typer.Option(..., "--stage1", help="stage1_cc3m.ckpt."),
    stage2: Optional[Path] = typer.Option(None, "--stage2", help="stage2_vist.ckpt or stage2_mmdialog.ckpt."),
    base: Path = typer.Option(..., "--base", help="The folder `import-official minigpt4` wrote."),
    generator: str = typer.Option("stabilityai/stable-diffusion-2-1-base", "--generator",
                                  help="The Stable Diffusion the checkpoints were trained for (hub id or folder)."),
    upstream: Path = typer.Option(..., "--upstream", help="A checkout of eric-ai-lab/MiniGPT-5: the system prompts "
                                  "are read from its dataloader.py (parsed, never run)."),
    output: Path = typer.Option(..., "--output", "-o", help="The run folder to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a folder this command wrote."),
) -> None:
    from minigpt5_cli.official.minigpt5 import import_minigpt5

    record = import_minigpt5(stage1, stage2, base, generator, upstream, output, overwrite=overwrite)
    typer.echo(f"wrote {output}")
    for key, name in (("embed", "input embedding"), ("head", "LM head")):
        s = record["row_scale"][key]
        typer.echo(f"{name}: row norm / base row norm: " + (f"median {s['median']:.6f}, min {s['min']:.6f}, "
                   f"max {s['max']:.6f}" if s["median"] is not None else "none (the base's rows are zero)"))
