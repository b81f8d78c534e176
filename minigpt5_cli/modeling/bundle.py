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

from minigpt5_cli import files
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


# What a bundle folder holds: `--overwrite` replaces a folder holding nothing else.
BUNDLE_ENTRIES = {"llm", "generator", "recipe.yaml", "mapper", "adapter", "recipes"}


def _is_bundle(folder: Path) -> bool:
    from minigpt5_cli.modeling.checkpoint import META_FILE, PREFIX_FILE, VOKENS_FILE

    names = {p.name for p in folder.iterdir()}
    return {"llm", "generator", "recipe.yaml", META_FILE} <= names and \
        names <= BUNDLE_ENTRIES | {META_FILE, PREFIX_FILE, VOKENS_FILE}


def _check_output(out: Path, folder: Path, overwrite: bool) -> None:
    """Never write into, or over, the checkpoint or its run; replace only a bundle."""
    from minigpt5_cli.modeling.checkpoint import is_checkpoint_name

    sources = [folder.resolve()] + ([folder.parent.resolve()] if is_checkpoint_name(folder) else [])
    target = out.resolve()
    for source in sources:
        if target == source or source in target.parents or target in source.parents:
            raise UserError(f"{out} overlaps {source}, which holds the checkpoint; write the bundle elsewhere")
    if out.exists():
        if not overwrite:
            raise UserError(f"{out} exists; pass --overwrite to replace it")
        if not out.is_dir() or not _is_bundle(out):
            raise UserError(f"{out} is not a bundle minigpt5 wrote; --overwrite replaces only a bundle")


def bundle(checkpoint: str | Path, output: str | Path, half: bool = True, overwrite: bool = False) -> Path:
    from minigpt5_cli.modeling.backbones import load_llm
    from minigpt5_cli.modeling.generators import load_generator
    from minigpt5_cli.modeling.checkpoint import META_FILE, PREFIX_FILE, VOKENS_FILE, checkpoint_folder

    folder = checkpoint_folder(str(checkpoint))
    if not (folder / "recipe.yaml").is_file() or not (folder / META_FILE).is_file():
        raise UserError(f"{folder} is not a minigpt5 checkpoint (no recipe.yaml or {META_FILE})")
    out = Path(output)
    _check_output(out, folder, overwrite)
    recipe = recipes.load(folder / "recipe.yaml", [])
    m = recipe.model
    with files.staged(out, replace=overwrite) as tmp:
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
    return out
