"""The recipe schema: one tree of dataclasses, loaded from YAML, overridden with `key.sub=value`.

Every field is typed; loading checks types and rejects unknown keys with a "did you mean" hint.
The resolved recipe is written into every checkpoint folder as `recipe.yaml`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from minigpt5_cli.errors import UserError


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
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    virtual_tokens: int = 5
    prefix_hidden: int = 1024


@dataclass
class DataConfig:
    train: str = ""  # a folder written by prepare-data, or JSONL of pairs (stage 1) / sequences (stage 2)
    extra: list[str] = field(default_factory=list)  # more sources trained on together with `train`
    tasks: list[Literal["turn", "gen", "multimodal", "understanding"]] = field(default_factory=lambda: ["turn"])
    max_length: int = 512  # tokens per sample; older history steps are dropped to fit
    history: int = 4  # previous steps kept in a stage-2 prompt
    instruction_prob: float = 0.01  # stage 1: share of samples in instruction form
    num_workers: int = 0


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
    stage: Literal[1, 2, "llm", "generator"] = 1
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
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
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


def _unknown(key: str) -> UserError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return UserError(f"unknown recipe key {key!r}{hint}")


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
        raise UserError(f"recipe key {key!r} must be {names}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(hint):
            choices = ", ".join(map(str, typing.get_args(hint)))
            quote = " (quote it: YAML reads a bare no/yes as a bool)" if isinstance(value, bool) else ""
            raise UserError(f"recipe key {key!r} must be one of {choices}, got {value!r}{quote}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise UserError(f"recipe key {key!r} must be a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is bool and not isinstance(value, bool) or hint is not bool and isinstance(value, bool):
        raise UserError(f"recipe key {key!r} must be {hint.__name__}, got {value!r}")
    if not isinstance(value, hint):
        raise UserError(f"recipe key {key!r} must be {hint.__name__}, got {value!r}")
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
        raise UserError(f"override {item!r} must look like key.sub=value")
    if key not in all_keys():
        raise _unknown(key)
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override {item!r}: {part!r} is not a section")
    hint = _leaf_hint(parts)
    if dataclasses.is_dataclass(hint):
        raise UserError(f"override {item!r}: {key!r} is a section; set one of its keys")
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
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def load(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Load a recipe file (or the defaults when `path` is None) and apply `key=value` overrides."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"recipe not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise UserError(f"recipe {path} must be a mapping of sections")
    for item in overrides:
        _parse_override(item, tree)
    recipe = _build(Recipe, tree)
    check(recipe)
    return recipe


def check(recipe: Recipe) -> None:
    """Cross-field rules that types alone cannot say."""
    t, m = recipe.train, recipe.model
    if m.n_vokens < 2:
        raise UserError("recipe key 'model.n_vokens' must be at least 2")
    for key in ("batch_size", "grad_accum", "keep_checkpoints", "save_every", "log_every"):
        if getattr(t, key) < 1:
            raise UserError(f"recipe key 'train.{key}' must be at least 1")
    if not recipe.data.tasks:
        raise UserError("recipe key 'data.tasks' needs at least one task")
    if t.stage != 2 and recipe.adapter.kind != "none":
        raise UserError(f"stage {t.stage} trains no adapter: set adapter.kind=none")
    if t.stage in ("llm", "generator") and t.mixed_precision != "no":
        raise UserError(f"stage {t.stage} trains in float32: set train.mixed_precision=no")


def to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def dump(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)


def save(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(dump(recipe))
