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

from minigpt5_cli import files, hub
from minigpt5_cli import recipe as recipes
from minigpt5_cli.errors import UserError


DEFAULT = Path(__file__).parents[1] / "models" / "toy"


def default_model() -> Path:
    """The shapes-world bundle that ships with the package."""
    if not (DEFAULT / "recipe.yaml").is_file():
        raise UserError(f"no default model in {DEFAULT}; pass --model")
    return DEFAULT


def beside(folder: Path, name: str, inside: bool = True) -> str:
    """Where the backbone `name`, named by the recipe.yaml of model folder `folder`, lies. `train` names a
    local backbone relative to the folder it saves the recipe in, so a relative path is read against
    `folder`: a run or a bundle works from any folder, and after moving together with its backbones.
    `inside` (a bundle, shipped to others): the backbone must lie inside `folder`; one that leads out of
    it (`..`, a symbolic link) is refused. Otherwise (a run's checkpoint, whose recipe names the user's
    own backbones) it may lie anywhere; a name of an earlier version's recipe (a relative path not
    starting with '.') that is not found there is read from the current folder, as it was then. A local
    path found nowhere is refused; hub ids and `tiny:`-style names pass through."""
    recipe = folder / "recipe.yaml"
    if name.startswith(hub.NAMED):
        return name
    there = folder / name  # an absolute name stays itself
    if there.exists():
        if files.inside(there, folder):
            return str(there)
        if inside:  # `..`, a link or an absolute path out of a bundle
            raise UserError(f"{recipe} names the backbone {recipes._show(name)}, which leads outside {folder}; "
                            "a bundle's backbones are folders inside it (only a run's checkpoint-STEP folder "
                            "names others)")
        return str(there.resolve())
    if inside:
        # Not in the bundle: a hub id, never a folder of the current one (the hub's loaders look there first).
        if recipes.local(name) or Path(name).is_absolute() or Path(name).exists():
            raise UserError(f"{recipe} names the backbone {recipes._show(name)}, which is not in {folder}; a "
                            "bundle's backbones are folders inside it")
        return name
    if not name.startswith(".") and not Path(name).is_absolute() and Path(name).exists():
        return str(Path(name).resolve())
    if recipes.local(name) or Path(name).is_absolute():
        raise UserError(f"{recipe} names the backbone {recipes._show(name)}, which is not found relative to "
                        f"{folder}" + ("" if name.startswith(".") else ", nor to the current folder"))
    return name



def located(folder: Path, recipe: recipes.Recipe) -> recipes.Recipe:
    """`recipe`, read from model folder `folder`, with its backbones found (`beside`): a run's checkpoint
    (`checkpoint-STEP`, as train writes it) may name them anywhere, any other folder (a bundle) only
    inside itself."""
    from minigpt5_cli.modeling.checkpoint import STEP_FILE, is_checkpoint_name

    run = is_checkpoint_name(folder.resolve()) and (folder / STEP_FILE).is_file()  # resolved: `-m .` works
    m = recipe.model
    return dataclasses.replace(recipe, model=dataclasses.replace(
        m, **{key: beside(folder, getattr(m, key), inside=not run) for key in recipes.BACKBONES}))


# What a bundle folder holds: `--overwrite` replaces a folder holding nothing else.
BUNDLE_ENTRIES = {"llm", "generator", "recipe.yaml", "mapper", "adapter", "recipes"}


def _is_bundle(folder: Path) -> bool:
    from minigpt5_cli.modeling.checkpoint import BASE_ROWS_FILE, META_FILE, PREFIX_FILE, VOKENS_FILE

    names = {p.name for p in folder.iterdir()}
    return {"llm", "generator", "recipe.yaml", META_FILE} <= names and \
        names <= BUNDLE_ENTRIES | {META_FILE, PREFIX_FILE, VOKENS_FILE, BASE_ROWS_FILE}


def _check_output(out: Path, folder: Path, overwrite: bool) -> None:
    """Never write into, or over, the checkpoint or its run; replace only a bundle."""
    from minigpt5_cli.modeling.checkpoint import owners

    for source in owners(folder):
        if files.overlaps(out, source):
            raise UserError(f"{out} overlaps {source}, which holds the checkpoint; write the bundle elsewhere")
    if out.exists():
        if not overwrite:
            raise UserError(f"{out} exists; pass --overwrite to replace it")
        if not out.is_dir() or not _is_bundle(out):
            raise UserError(f"{out} is not a bundle minigpt5 wrote; --overwrite replaces only a bundle")


def _verify(folder: Path, recipe: recipes.Recipe) -> None:
    """Read the trained weights of checkpoint `folder` as generate reads them, checked against the model
    its recipe builds from the backbones' configs alone (no backbone weights are read): a file that is
    missing, damaged or made for other backbones ends here, before anything is written."""
    import diffusers
    from accelerate import init_empty_weights

    from minigpt5_cli.modeling import checkpoint
    from minigpt5_cli.modeling.model import build_model

    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # its notes on casting networks without weights
    try:
        with init_empty_weights(), torch.random.fork_rng():
            model = build_model(recipe.model, recipe.adapter, precision=recipe.train.mixed_precision, empty=True)
    finally:
        diffusers.utils.logging.set_verbosity(level)
    checkpoint.read(model, folder)


def bundle(checkpoint: str | Path, output: str | Path, half: bool = True, overwrite: bool = False,
           trust_remote_code: bool = False) -> Path:
    """`trust_remote_code`: the user's --trust-remote-code, without which a checkpoint whose recipe asks to
    run its LLM's code is refused."""
    from minigpt5_cli.modeling.backbones import load_llm, remote_code
    from minigpt5_cli.modeling.generators import load_generator
    from minigpt5_cli.modeling.checkpoint import (BASE_ROWS_FILE, META_FILE, PREFIX_FILE, VOKENS_FILE,
                                               checkpoint_folder)

    out = Path(output)
    files.writable_folder(out, "OUTPUT")
    folder = checkpoint_folder(str(checkpoint))
    if not (folder / "recipe.yaml").is_file() or not (folder / META_FILE).is_file():
        raise UserError(f"{folder} is not a minigpt5 checkpoint (no recipe.yaml or {META_FILE})")
    _check_output(out, folder, overwrite)
    recipe = recipes.load(folder / "recipe.yaml", [])
    m = recipe.model
    trusted = remote_code(folder, m.trust_remote_code, trust_remote_code, m.llm)
    found = located(folder, recipe).model
    _verify(folder, dataclasses.replace(recipe, model=dataclasses.replace(found, trust_remote_code=trusted)))
    with files.staged(out, replace=overwrite) as tmp:
        # The trained weights as train wrote them (no optimizer state); the base backbones beside them,
        # without vokens or adapter: loading adds both again, as for any checkpoint.
        for name in (VOKENS_FILE, "mapper", "adapter", PREFIX_FILE, BASE_ROWS_FILE, META_FILE):
            src = folder / name
            if src.is_dir():
                shutil.copytree(src, tmp / name)
            elif src.is_file():
                shutil.copy2(src, tmp / name)
        dtype = torch.float16 if half else torch.float32
        llm = load_llm(found.llm, dtype=dtype, trust_remote_code=trusted)
        llm.model.save_pretrained(tmp / "llm")
        (llm.processor or llm.tokenizer).save_pretrained(tmp / "llm")
        load_generator(found.generator, dtype=dtype).pipeline().save_pretrained(tmp / "generator")
        final = dataclasses.replace(
            recipe, model=dataclasses.replace(m, llm="llm", generator="generator"),
            train=dataclasses.replace(recipe.train, init_from="", output_dir=""))
        recipes.save(final, tmp / "recipe.yaml")
    return out
