"""The recipe schema: one tree of dataclasses, loaded from YAML, overridden with `key.sub=value`.

Every field is typed; loading checks types and rejects unknown keys with a "did you mean" hint.
The resolved recipe is written into every checkpoint folder as `recipe.yaml`, local backbones named
relative to that folder (`anchored`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from minigpt5_cli.errors import UserError
from minigpt5_cli.files import MAX_RECIPE, read_text


Precision = Literal["no", "bf16", "fp16"]  # training's mixed precision, and generate's --precision
PRECISIONS = typing.get_args(Precision)


@dataclass
class MapperConfig:
    kind: Literal["paper", "compact"] = "paper"
    hidden: int = 0  # transformer width; 0 follows the generator's conditioning width
    heads: int = 8
    encoder_layers: int = 4
    decoder_layers: int = 4
    ffn: int = 4096


@dataclass
class ModelConfig:
    llm: str = "llava-hf/llava-1.5-7b-hf"  # hub id, local folder, or tiny:llama / tiny:llava
    generator: str = "stabilityai/stable-diffusion-2-1-base"  # hub id, local folder, or tiny:sd
    trust_remote_code: bool = False
    n_vokens: int = 8
    mapper: MapperConfig = field(default_factory=MapperConfig)


@dataclass
class AdapterConfig:
    kind: Literal["none", "lora", "prefix"] = "none"
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # LoRA: the language model's layers to adapt; empty: PEFT's default for the architecture (q_proj,
    # v_proj for Llama), else its fused attention projection (qkv_proj, query_key_value, c_attn)
    target_modules: list[str] = field(default_factory=list)
    virtual_tokens: int = 5
    prefix_hidden: int = 1024


@dataclass
class DataConfig:
    train: str = ""  # a folder written by prepare-data, or JSONL of pairs (stage 1) / sequences (stage 2)
    extra: list[str] = field(default_factory=list)  # more sources trained on together with `train`
    tasks: list[Literal["turn", "gen", "multimodal", "understanding"]] = field(default_factory=lambda: ["turn"])
    max_length: int = 512  # tokens per sample; older history steps are dropped to fit
    history: int = 4  # previous steps kept in a stage-2 prompt
    # paper: `###Human: ... ###Assistant:` text; chat: the LLM's chat template; auto: chat when it has one;
    # official: the released MiniGPT-5's templates and tokenisation (a BLIP-2 or text-only LLM)
    prompt_format: Literal["auto", "paper", "chat", "official"] = "auto"
    # how a BLIP-2 LLM's prompt images become pixels: its image processor, or the released MiniGPT-5's
    # preprocessing (short side resized, centre crop, CLIP's mean and std), official_pad after padding to a
    # white square (its demo)
    image_preprocessing: Literal["processor", "official", "official_pad"] = "processor"
    # official: the system prompts written before a story (instruction tasks) and before a dialogue; empty:
    # none (import-official writes the released model's own)
    story_system: str = ""
    dialogue_system: str = ""
    instruction_prob: float = 0.01  # stage 1: share of samples in instruction form
    num_workers: int = 0
    # Micro-batches of samples of about one length (mega-batches of 50 optimizer steps sorted longest
    # first, as HF's Trainer groups them): far less padding where prompt lengths vary (the stage-2
    # recipes set it). Off by default: a run saved without the key resumes in the order it began in.
    group_by_length: bool = False
    # JSONL training files: read images wherever they name them (by default only inside the file's folder)
    allow_outside_paths: bool = False


@dataclass
class LossConfig:
    text: float = 0.01
    image: float = 1.0
    caption: float = 0.1  # stage 1, and stage 2 where the data gives steps a caption (the shapes world)
    snr_gamma: float = 5.0  # Min-SNR weighting; 0 turns it off
    cfg_drop: float = 0.1  # probability that an image's condition is null


@dataclass
class ScratchConfig:
    """Stages `llm` and `generator`: a backbone trained from scratch (the shapes world's)."""

    vae_steps: int = 1500  # generator: autoencoder steps, before the UNet and text encoder train
    vae_lr: float = 2.0e-3
    foreground_weight: float = 4.0  # generator: extra reconstruction weight where a pixel differs from the border
    ema: float = 0.995  # generator: EMA decay of the UNet and text encoder; 0 turns it off
    eval_every: int = 500  # toy data: sample images and read their attributes every N steps; 0: never
    eval_samples: int = 54


@dataclass
class TrainConfig:
    # 1 and 2: MiniGPT-5's stages. llm and generator: train a backbone from scratch (see `scratch`).
    stage: Literal["1", "2", "llm", "generator"] = "1"
    init_from: str = ""  # stage 2: the stage-1 checkpoint folder; none starts the vokens and mapper fresh
    output_dir: str = "runs/minigpt5"
    lr: float = 2e-5
    mapper_lr_scale: float = 10.0
    freeze_mapper_input: bool = False  # stage 2: freeze the mapper's fc and queries
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    batch_size: int = 2
    grad_accum: int = 6
    epochs: int = 2
    max_steps: int = 0  # optimizer steps; 0 means `epochs` full passes
    warmup_steps: int = 1000
    mixed_precision: Precision = "bf16"
    # Recompute the LLM's layers and the denoiser's blocks in the backward pass: far less activation
    # memory (see `train --plan`) for about a third more compute; gradients are the same.
    gradient_checkpointing: bool = False
    seed: int = 42
    save_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    tracker: Literal["none", "tensorboard", "wandb"] = "none"


@dataclass
class SampleConfig:
    """generate's defaults for a model trained with this recipe (the paper's; the command line overrides)."""

    max_new_tokens: int = 256
    top_p: float = 0.9
    temperature: float = 1.0  # 0 decodes greedily
    repetition_penalty: float = 2.0
    diffusion_steps: int = 50
    guidance_scale: float = 7.5
    # The released MiniGPT-5's sampling, where it differs from ours (import-official's recipe sets these):
    penalize: Literal["prompt", "response"] = "prompt"  # response: its BOS and the sampled tokens only
    eos_ids: list[int] = field(default_factory=list)  # token ids that end a response; empty: the tokenizer's eos
    mask_vokens: bool = True  # [IMG1]..[IMG7] are never sampled (only [IMG0] opens a group)
    render: Literal["all", "first"] = "all"  # first: only a response's first voken group becomes an image
    min_images: int = 1  # a response that ends with fewer images gets a voken group at its end; 0: the model decides


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scratch: ScratchConfig = field(default_factory=ScratchConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def all_keys(cls: type = Recipe, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, sections included."""
    keys = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        keys.append(key)
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += all_keys(hint, key + ".")
    return keys


def _cut(text: str, limit: int = 80) -> str:
    """`text` cut short for a message: a value in a recipe may be a megabyte long."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _show(value: Any) -> str:
    return _cut(repr(value))


class _Alias(yaml.YAMLError):
    pass


class _Loader(yaml.SafeLoader):
    """Safe YAML (plain data, no Python objects) without aliases (`*name`): a recipe needs none, and a
    few nested ones (a "billion laughs") expand into gigabytes once the recipe is copied or quoted."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Alias(f"line {event.start_mark.line + 1}: YAML aliases (*{_cut(event.anchor)}) are not "
                         "supported in a recipe; write the value out")
        return super().compose_node(parent, index)


def _unknown(key: str) -> UserError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return UserError(f"unknown recipe key {_show(key)}{hint}")


def _coerce(key: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):  # Optional[X], X | None, X | Y: the first that fits
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(key, option, value)
            except UserError:
                pass
        names = " or ".join("null" if o is type(None) else getattr(o, "__name__", str(o)) for o in options)
        raise UserError(f"recipe key {key!r} must be {names}, got {_show(value)}")
    if origin is Literal:
        if type(value) is int and str(value) in typing.get_args(hint):  # `stage: 1`: YAML reads a number
            value = str(value)
        if value not in typing.get_args(hint):
            choices = ", ".join(map(str, typing.get_args(hint)))
            quote = " (quote it: YAML reads a bare no/yes as a bool)" if isinstance(value, bool) else ""
            raise UserError(f"recipe key {key!r} must be one of {choices}, got {_show(value)}{quote}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise UserError(f"recipe key {key!r} must be a list, got {_show(value)}")
        return [_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is bool and not isinstance(value, bool) or hint is not bool and isinstance(value, bool):
        raise UserError(f"recipe key {key!r} must be {hint.__name__}, got {_show(value)}")
    if not isinstance(value, hint):
        raise UserError(f"recipe key {key!r} must be {hint.__name__}, got {_show(value)}")
    return value


def _build(cls: type, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise UserError(f"recipe section {prefix.rstrip('.') or 'top level'!r} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise _unknown(prefix + str(key))
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, prefix + name + ".")
        else:
            kwargs[name] = _coerce(prefix + name, hint, value)
    return cls(**kwargs)


def _parse_override(item: str, tree: dict) -> None:
    key, sep, raw = item.partition("=")  # split on the first '=': values may contain '='
    key = key.strip()
    if not sep or not key:
        raise UserError(f"override {_show(item)} must look like key.sub=value")
    if key not in all_keys():
        raise _unknown(key)
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override {_show(item)}: {part!r} is not a section")
    hint = _leaf_hint(parts)
    if dataclasses.is_dataclass(hint):
        raise UserError(f"override {_show(item)}: {key!r} is a section; set one of its keys")
    # Strings stay verbatim (a path like "007" or a choice like "no" must not turn into a number or
    # a bool); other values are read as YAML.
    node[parts[-1]] = raw if _is_text(hint) else _yaml_value(raw)


def _is_text(hint: Any) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return all(_is_text(o) for o in typing.get_args(hint) if o is not type(None))
    return hint is str or typing.get_origin(hint) is Literal and all(isinstance(a, str) for a in typing.get_args(hint))


def _leaf_hint(parts: list[str]) -> Any:
    cls: Any = Recipe
    for part in parts:
        cls = typing.get_type_hints(cls)[part]
    return cls


def _yaml_value(raw: str) -> Any:
    try:
        return yaml.load(raw, Loader=_Loader)
    except (yaml.YAMLError, ValueError, RecursionError):  # then the key's type says what is wrong with it
        return raw


def load(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Load a recipe file (or the defaults when `path` is None) and apply `key=value` overrides."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"recipe not found: {path}")
        try:
            tree = yaml.load(read_text(path, MAX_RECIPE), Loader=_Loader) or {}
        except _Alias as e:
            raise UserError(f"recipe {path} {e}") from None
        except yaml.YAMLError as e:
            raise UserError(f"recipe {path} is not valid YAML: {_cut(str(e).splitlines()[0], 200)}") from None
        except RecursionError:  # raised as the stack runs out, and unwound: the stack is whole again here
            raise UserError(f"recipe {path} is not valid YAML: nested too deeply") from None
        except ValueError as e:  # a date that is none (2024-02-30), an integer too long to convert
            raise UserError(f"recipe {path} is not valid YAML: {_cut(str(e).split(';')[0], 200)}") from None
        if not isinstance(tree, dict):
            raise UserError(f"recipe {path} must be a mapping of sections")
    for item in overrides:
        _parse_override(item, tree)
    recipe = _build(Recipe, tree)
    check(recipe)
    return recipe


def _at_least(low):
    return low, math.inf, True


def _above(low):
    return low, math.inf, False


def _between(low, high, high_closed: bool = True):
    return low, high, True, high_closed


# The range of every numeric key: (low, high, low included[, high included]). Outside it, training
# or sampling would fail deep inside a library, or run and produce garbage (a NaN learning rate).
# model.n_vokens: the paper uses 8; every image takes that many tokens of the sequence, so a few
# hundred leave no room for text (and thousands fail in the tokenizer).
RANGES = {
    "model.n_vokens": _between(2, 256), "model.mapper.hidden": _at_least(0), "model.mapper.heads": _at_least(1),
    "model.mapper.encoder_layers": _at_least(1), "model.mapper.decoder_layers": _at_least(1),
    "model.mapper.ffn": _at_least(1),
    "adapter.r": _at_least(1), "adapter.alpha": _above(0), "adapter.dropout": _between(0, 1, False),
    "adapter.virtual_tokens": _at_least(1), "adapter.prefix_hidden": _at_least(1),
    "data.max_length": _at_least(1), "data.history": _at_least(0), "data.instruction_prob": _between(0, 1),
    "data.num_workers": _at_least(0),
    "loss.text": _at_least(0), "loss.image": _at_least(0), "loss.caption": _at_least(0),
    "loss.snr_gamma": _at_least(0), "loss.cfg_drop": _between(0, 1),
    "scratch.vae_steps": _at_least(0), "scratch.vae_lr": _above(0), "scratch.foreground_weight": _at_least(0),
    "scratch.ema": _between(0, 1, False), "scratch.eval_every": _at_least(0), "scratch.eval_samples": _at_least(1),
    "train.lr": _above(0), "train.mapper_lr_scale": _at_least(0), "train.weight_decay": _at_least(0),
    "train.adam_eps": _above(0), "train.max_grad_norm": _at_least(0), "train.batch_size": _at_least(1),
    "train.grad_accum": _at_least(1), "train.epochs": _at_least(0), "train.max_steps": _at_least(0),
    "train.warmup_steps": _at_least(0), "train.seed": _between(0, 2**32 - 1), "train.save_every": _at_least(1),
    "train.keep_checkpoints": _at_least(1), "train.log_every": _at_least(1),
    "sample.max_new_tokens": _at_least(1), "sample.top_p": (0, 1, False, True), "sample.temperature": _at_least(0),
    "sample.repetition_penalty": _above(0), "sample.diffusion_steps": _at_least(1),
    "sample.guidance_scale": _at_least(0), "sample.min_images": _at_least(0),
}


def in_range(key: str, value, bounds: tuple) -> None:
    """Refuse a value outside `bounds` (see RANGES), and any float that is not finite, naming the key."""
    low, high, low_closed, high_closed = (*bounds, True)[:4]
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{key} must be a finite number, got {_show(value)}")
    if (value < low if low_closed else value <= low) or (value > high if high_closed else value >= high):
        if high == math.inf:
            raise UserError(f"{key} must be {'at least' if low_closed else 'above'} {low}, got {_show(value)}")
        raise UserError(f"{key} must be in {'[' if low_closed else '('}{low}, {high}{']' if high_closed else ')'}, "
                        f"got {_show(value)}")


def check(recipe: Recipe) -> None:
    """Ranges, and cross-field rules that types alone cannot say."""
    t, m = recipe.train, recipe.model
    tree = to_dict(recipe)
    for key, bounds in RANGES.items():
        value = tree
        for part in key.split("."):
            value = value[part]
        in_range(f"recipe key {key!r}", value, bounds)
    if t.epochs == 0 and t.max_steps == 0:
        raise UserError("recipe keys 'train.epochs' and 'train.max_steps' are both 0: nothing to train")
    if m.mapper.kind == "paper" and m.mapper.hidden and m.mapper.hidden % m.mapper.heads:
        raise UserError(f"recipe key 'model.mapper.hidden' ({m.mapper.hidden}) must be a multiple of "
                        f"'model.mapper.heads' ({m.mapper.heads})")
    if any(i < 0 for i in recipe.sample.eos_ids):
        raise UserError(f"recipe key 'sample.eos_ids' holds token ids, none below 0; got "
                        f"{_show(recipe.sample.eos_ids)}")
    if not recipe.data.tasks:
        raise UserError("recipe key 'data.tasks' needs at least one task")
    if t.stage != "2" and recipe.adapter.kind != "none":
        raise UserError(f"stage {t.stage} trains no adapter: set adapter.kind=none")
    if t.stage in ("llm", "generator") and t.mixed_precision != "no":
        raise UserError(f"stage {t.stage} trains in float32: set train.mixed_precision=no")
    if t.stage in ("llm", "generator") and recipe.data.group_by_length:
        raise UserError(f"stage {t.stage} does not group batches by length: set data.group_by_length=false")
    if t.stage in ("llm", "generator") and t.gradient_checkpointing:
        raise UserError(f"stage {t.stage} does not checkpoint activations: set train.gradient_checkpointing=false")
    if t.gradient_checkpointing and recipe.adapter.kind == "prefix":
        # The prefix is the LLM's key/value cache, which a recomputed layer would write a second time.
        raise UserError("train.gradient_checkpointing does not combine with prefix tuning: use adapter.kind=lora, "
                        "or turn checkpointing off")


def to_dict(recipe: Recipe) -> dict:
    """The recipe as plain data, as YAML writes it: stages 1 and 2 as numbers, as recipes give them."""
    tree = dataclasses.asdict(recipe)
    stage = tree["train"]["stage"]
    tree["train"]["stage"] = int(stage) if stage.isdigit() else stage
    return tree


def dump(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)


def save(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(dump(recipe))


BACKBONES = ("llm", "generator")  # the keys of `model` that name a backbone


def local(name: str) -> bool:
    """Whether backbone `name` can only be a local path: it starts with '.', '/' or '~', or holds a backslash
    or more than one '/'. A hub id is `name` or `org/name`; `tiny:`-style names hold ':'."""
    return ":" not in name and (name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1)


def anchored(recipe: Recipe, folder: str | Path) -> Recipe:
    """`recipe` as saved in `folder`: a backbone given as a relative path that exists (from the current
    folder) is named relative to `folder`, so that the folder finds it from anywhere, and after moving
    together with it (`bundle.beside` reads it back); it starts with '.' (`./`, `../`), so it never reads as
    a hub id. Hub ids, `tiny:`-style names and absolute paths stay as given; so do the data paths and
    `train.init_from`, which only `train --resume` reads, from the folder the run started in."""
    def relative(name: str) -> str:
        if not name or ":" in name or Path(name).is_absolute() or not Path(name).exists():
            return name
        path = os.path.relpath(Path(name).resolve(), Path(folder).resolve())
        return path if path.startswith(".") else f"./{path}"

    m = recipe.model
    return dataclasses.replace(recipe, model=dataclasses.replace(m, **{k: relative(getattr(m, k)) for k in BACKBONES}))


def check_found(recipe: Recipe, keys: tuple[str, ...] = BACKBONES, where: str | Path | None = None) -> None:
    """Refuse a backbone (of `keys`) named by a local path that does not exist, read from the current
    folder: otherwise the hub's libraries take it for a malformed hub id. `where`: the recipe file."""
    for key in keys:
        name = getattr(recipe.model, key)
        if local(name) and not Path(name).exists():
            raise UserError(f"{f'{where}: ' if where else ''}recipe key 'model.{key}' names {_show(name)}, which is "
                            f"not found (no folder {_cut(str(Path(name).absolute()), 200)}); a relative path is read "
                            "from the current folder")
