"""`minigpt5 bundle`: one self-contained folder from a checkpoint, backbones included.

The folder holds `llm/`, `generator/` (both `save_pretrained`, in float16 unless asked otherwise),
the trained weights as `train` writes them, and a `recipe.yaml` whose backbones are those two
relative folders. `generate --model BUNDLE` loads it from anywhere; the default model that ships
with the package is such a bundle.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch

from minigpt5_cli import recipe as recipes
from minigpt5_cli.errors import UserError


DEFAULT = Path(__file__).parents[1] / "models" / "toy"


def default_model() -> Path:
    """The shapes-world bundle that ships with the package."""
    if not (DEFAULT / "recipe.yaml").is_file():
        raise UserError(f"no default model in {DEFAULT}; pass --model")
    return DEFAULT


def beside(folder: Path, name: str) -> str:
    """A backbone named by a relative path that exists inside `folder` (a bundle) is taken from there."""
    inside = folder / name
    return str(inside) if not Path(name).is_absolute() and ":" not in name and inside.is_dir() else name


def bundle(checkpoint: str | Path, output: str | Path, half: bool = True, overwrite: bool = False) -> Path:
    from minigpt5_cli.modeling.backbones import load_generator, load_llm
    from minigpt5_cli.modeling.checkpoint import META_FILE, PREFIX_FILE, VOKENS_FILE, checkpoint_folder

    folder = checkpoint_folder(str(checkpoint))
    if not (folder / "recipe.yaml").is_file() or not (folder / META_FILE).is_file():
        raise UserError(f"{folder} is not a minigpt5 checkpoint (no recipe.yaml or {META_FILE})")
    out = Path(output)
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    recipe = recipes.load(folder / "recipe.yaml", [])
    m = recipe.model
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # The trained weights as train wrote them (no optimizer state); the base backbones beside them,
    # without vokens or adapter: loading adds both again, as for any checkpoint.
    for name in (VOKENS_FILE, "mapper", "adapter", PREFIX_FILE, META_FILE):
        src = folder / name
        if src.is_dir():
            shutil.copytree(src, tmp / name)
        elif src.is_file():
            shutil.copy2(src, tmp / name)
    dtype = torch.float16 if half else torch.float32
    llm = load_llm(beside(folder, m.llm), dtype=dtype, trust_remote_code=m.trust_remote_code)
    llm.model.save_pretrained(tmp / "llm")
    (llm.processor or llm.tokenizer).save_pretrained(tmp / "llm")
    load_generator(beside(folder, m.generator), dtype=dtype).pipeline().save_pretrained(tmp / "generator")
    final = dataclasses.replace(
        recipe, model=dataclasses.replace(m, llm="llm", generator="generator"),
        train=dataclasses.replace(recipe.train, init_from="", output_dir=""))
    recipes.save(final, tmp / "recipe.yaml")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
