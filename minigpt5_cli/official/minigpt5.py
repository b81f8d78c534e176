"""The released MiniGPT-5 checkpoints (Lightning files of the original training) as a minigpt5 checkpoint over
the MiniGPT-4 folder `import-official minigpt4` writes.

A stage-1 file holds the LLM's whole input embedding and LM head, the mapper's fc, its 77 queries and its
transformer; a stage-2 file holds only what stage 2 trained: the two matrices again (as PEFT's
`modules_to_save`), the LoRA weights and the transformer. Names and shapes are checked against the model the
recipe builds (the base's widths and vocabulary, the generator's conditioning), so any file that differs is
refused naming the first difference. The matrices differ from the base's in every row (weight decay acted
on all of them), so they are kept whole, in `base_rows.safetensors`. The system prompts the model was trained
with are read as text from the original code's dataloader.py (parsed, never run) into the recipe.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path

from minigpt5_cli import files, hub, recipe as recipes
from minigpt5_cli.errors import UserError
from minigpt5_cli.official import sources

LLM = "model.llama_model."  # the LLM's prefix in the files
STAGE1_ROWS = {"embed": LLM + "model.embed_tokens.weight", "head": LLM + "lm_head.weight"}
STAGE2_ROWS = {"embed": LLM + "base_model.model.model.embed_tokens.modules_to_save.default.weight",
               "head": LLM + "base_model.model.lm_head.modules_to_save.default.weight"}
MAPPER = "llm_to_t2i_mapping."  # the mapper's transformer, as `transformer.` here
QUERIES = "t2i_decoder_prompt"
LORA = re.compile(r"layers\.(\d+)\.self_attn\.(q_proj|v_proj)\.lora_(A|B)\.weight$")
N_VOKENS = 8
# Where the original's dataloader.py assigns the system prompts: recipe key -> (dataset class, variable)
SYSTEMS = {"story_system": ("VISTDataset", "system_prompt1"), "dialogue_system": ("MMDialogDataset", "system_prompt")}


def system_prompts(upstream: Path) -> dict[str, str]:
    """The released model's system prompts (recipe key -> text), read from the original code's dataloader.py
    in the checkout `upstream` by parsing it: the string each dataset class assigns (SYSTEMS)."""
    path = upstream / "dataloader.py"
    if not path.is_file():
        raise UserError(f"--upstream {upstream} has no dataloader.py; give a checkout of eric-ai-lab/MiniGPT-5")
    tree = files.python_tree(path, "--upstream")
    found = {}
    for cls in (node for node in tree.body if isinstance(node, ast.ClassDef)):
        for node in ast.walk(cls):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) \
                    and isinstance(node.value.value, str):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        found.setdefault((cls.name, target.id), node.value.value)
    for key, (cls, name) in SYSTEMS.items():
        if (cls, name) not in found:
            raise UserError(f"--upstream {path} assigns no string to {name} in {cls} (the {key.split('_')[0]} "
                            "system prompt)")
    return {key: found[where] for key, where in SYSTEMS.items()}


def official_recipe(base: str, generator: str, width: int, lora: bool, eos_ids: list[int],
                    systems: dict[str, str]) -> recipes.Recipe:
    """The recipe of the released model: its mapper (8 heads, 4 + 4 layers, a feed-forward 4 times the
    conditioning width), its LoRA (stage 2), and the original prompts (`systems`: its system prompts),
    preprocessing and sampling."""
    overrides = [f"model.llm={base}", f"model.generator={generator}", f"model.n_vokens={N_VOKENS}",
                 "model.mapper.kind=paper", "model.mapper.hidden=0", "model.mapper.heads=8",
                 "model.mapper.encoder_layers=4", "model.mapper.decoder_layers=4", f"model.mapper.ffn={4 * width}",
                 f"train.stage={2 if lora else 1}",
                 "sample.max_new_tokens=256", "sample.top_p=0.9", "sample.temperature=1.0",
                 "sample.repetition_penalty=2.0", "sample.diffusion_steps=50", "sample.guidance_scale=7.5",
                 "data.prompt_format=official", "data.image_preprocessing=official", "sample.penalize=response",
                 f"sample.eos_ids={json.dumps(eos_ids)}", "sample.mask_vokens=false", "sample.render=first",
                 "sample.min_images=0"]
    if lora:
        overrides += ["adapter.kind=lora", "adapter.r=8", "adapter.alpha=16", "adapter.dropout=0.05",
                      "adapter.target_modules=[q_proj, v_proj]", "train.freeze_mapper_input=true"]
    recipe = recipes.load(None, overrides)
    return dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, **systems))  # texts, not YAML


def _empty(build):
    """What `build()` makes, its networks built from their configs alone: no weights are read."""
    import diffusers
    import torch
    from accelerate import init_empty_weights

    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # its notes on networks without weights
    try:
        with init_empty_weights(), torch.random.fork_rng():
            return build()
    finally:
        diffusers.utils.logging.set_verbosity(level)


def layouts(model, vocab: int) -> tuple[dict, dict, dict]:
    """The names and shapes of the released stage-1 and stage-2 files for `model` (over a base of `vocab`
    text tokens: its matrices have the 8 vokens and the image placeholder after them), and the file's name
    of each LoRA tensor of ours."""
    width = model.llm_info.width
    rows = (vocab + N_VOKENS + 1, width)
    mapper = {k: tuple(v.shape) for k, v in model.mapper.state_dict().items()}
    transformer = {MAPPER + k.removeprefix("transformer."): s for k, s in mapper.items()
                   if k.startswith("transformer.")}
    stage1 = {STAGE1_ROWS["embed"]: rows, STAGE1_ROWS["head"]: rows, QUERIES: mapper["queries"],
              **{k: s for k, s in mapper.items() if k.startswith("fc.")}, **transformer}
    lora = {}
    if model.adapter_kind == "lora":
        from peft import get_peft_model_state_dict

        for name, tensor in get_peft_model_state_dict(model.llm, save_embedding_layers=False).items():
            i, proj, ab = LORA.search(name).groups()
            lora[name] = (f"{LLM}base_model.model.model.layers.{i}.self_attn.{proj}.lora_{ab}.default.weight",
                          tuple(tensor.shape))
    stage2 = {STAGE2_ROWS["embed"]: rows, STAGE2_ROWS["head"]: rows, **dict(lora.values()), **transformer}
    return stage1, stage2, {ours: theirs for ours, (theirs, _) in lora.items()}


def _stage(path: Path, stage: int, wanted: dict, other: dict) -> dict:
    """The tensors of the stage-`stage` file `path`, refused as the other stage's file when it holds only
    names of that one, else at its first difference from `wanted`."""
    option = f"--stage{stage}"
    state = sources.tensors(sources.load(path, option), "state_dict", path, option)
    theirs, ours = set(other) - set(wanted), set(wanted) - set(other)
    if any(k in theirs for k in state) and not any(k in ours for k in state):
        raise UserError(f"{option} {path} is a stage-{3 - stage} checkpoint; give it as --stage{3 - stage}")
    sources.check(state, wanted, f"{option} {path}")
    return state


def _ours(matrix, vocab: int):
    """A matrix of the released vocabulary (text, [IMG0..7], <ImageHere>) in ours (text, the image token,
    the vokens)."""
    import torch

    return torch.cat([matrix[:vocab], matrix[vocab + N_VOKENS:], matrix[vocab:vocab + N_VOKENS]]).float().contiguous()


def _base_rows(base: Path, names: dict) -> dict:
    """The base folder's tensors `names` (key -> name), from its safetensors file(s), which its index may
    place only inside it."""
    from safetensors import SafetensorError, safe_open

    index = base / "model.safetensors.index.json"
    out = {}
    try:
        doc = files.read_json(index) if index.is_file() else {"weight_map": {}}
    except UserError as e:
        raise UserError(f"--base {base} is damaged: {e}") from None
    try:
        where = doc["weight_map"]
        for key, name in names.items():
            shard = base / where.get(name, "model.safetensors")
            if not files.inside(shard, base):
                raise UserError(f"--base {base} is damaged: its index places {name} in {shard}, outside it")
            with safe_open(shard, "pt") as f:
                out[key] = f.get_tensor(name).float()
    except KeyError as e:
        raise UserError(f"--base {base} is damaged: {index if index.is_file() else base} lacks {e}") from None
    except (OSError, SafetensorError, ValueError, TypeError, AttributeError) as e:  # JSON errors are ValueErrors
        raise UserError(f"--base {base} is damaged: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    return out


def row_scale(new, old) -> dict:
    """Median, min and max of the norm of each row of `new` over that of `old` (their shared rows)."""
    ratio = new[:old.shape[0]].norm(dim=1) / old.norm(dim=1)
    ratio = ratio[ratio.isfinite()]
    if not ratio.numel():  # the base's rows are all zero
        return {"median": None, "min": None, "max": None}
    return {"median": ratio.median().item(), "min": ratio.min().item(), "max": ratio.max().item()}


def import_minigpt5(stage1: Path, stage2: Path | None, base: Path, generator: str, upstream: Path, output: Path, *,
                    overwrite: bool = False) -> dict:
    """Write the checkpoint folder `output` (and its recipe); returns what `imported.json` records."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, GenerationConfig

    from minigpt5_cli.modeling import checkpoint
    from minigpt5_cli.modeling.generators import load_generator
    from minigpt5_cli.modeling.mapper import FeatureMapper
    from minigpt5_cli.modeling.model import build_model

    inputs = [stage1, base] + ([stage2] if stage2 else []) + ([Path(generator)] if recipes.local(generator) else [])
    sources.check_output(output, inputs, overwrite)
    if not (base / sources.MARK).is_file() or not (base / "config.json").is_file():
        raise UserError(f"--base {base} is not a folder import-official minigpt4 wrote")
    systems = system_prompts(upstream)
    config = AutoConfig.from_pretrained(base)
    vocab = config.image_token_index  # the image token follows the text tokens
    eos = GenerationConfig.from_pretrained(base).eos_token_id if (base / "generation_config.json").is_file() else None
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    named = str(Path(generator).resolve()) if recipes.local(generator) else generator
    hub.resolve(named, shapes_only=True)  # a tiny backbone is built (with weights) before anything is built empty
    width = _empty(lambda: load_generator(named, empty=True)).cond_shape[1]
    recipe = official_recipe(str(base.resolve()), named, width, stage2 is not None, eos_ids, systems)
    model = _empty(lambda: build_model(recipe.model, recipe.adapter, empty=True))
    want1, want2, lora_names = layouts(model, vocab)
    one = _stage(stage1, 1, want1, want2)
    two = _stage(stage2, 2, want2, want1) if stage2 else None
    last, rows = (two, STAGE2_ROWS) if two is not None else (one, STAGE1_ROWS)
    embed, head = (last[rows["embed"]].float(), last[rows["head"]].float())

    # fc and the queries are frozen in stage 2, so they are stage 1's; the transformer is the last stage's.
    mapper = FeatureMapper(**{k: v for k, v in model.mapper.config.items() if not k.startswith("_")})
    mapper.load_state_dict({"queries": one[QUERIES], **{k: v for k, v in one.items() if k.startswith("fc.")},
                            **{"transformer." + k.removeprefix(MAPPER): v for k, v in last.items()
                               if k.startswith(MAPPER)}})
    vokens = {"rows_in": embed[vocab:vocab + N_VOKENS].contiguous(),
              "rows_out": head[vocab:vocab + N_VOKENS].contiguous()}
    old = _base_rows(base, {"embed": "language_model.model.embed_tokens.weight",
                            "head": "language_model.lm_head.weight"})
    scale = {k: row_scale(new[:vocab], old[k][:vocab]) for k, new in (("embed", embed), ("head", head))}
    record = {"kind": "minigpt5", "stage1": str(stage1), "stage2": str(stage2) if stage2 else None, "base": str(base),
              "generator": generator, "row_scale": scale}
    with files.staged(output, replace=overwrite) as tmp:
        # A run whose one checkpoint is step 0: generate, bundle and train.init_from take it as any run's.
        folder = tmp / "checkpoint-0"
        folder.mkdir()
        with checkpoint.writing(folder / checkpoint.VOKENS_FILE):
            save_file(vokens, folder / checkpoint.VOKENS_FILE)
            save_file({"embed": _ours(embed, vocab), "head": _ours(head, vocab)}, folder / checkpoint.BASE_ROWS_FILE)
        mapper.save_pretrained(folder / "mapper")
        if two is not None:
            (folder / "adapter").mkdir()
            save_file({ours: two[theirs].float().contiguous() for ours, theirs in lora_names.items()},
                      folder / "adapter" / checkpoint.ADAPTER_FILE)
            model.llm.peft_config[model.llm.active_adapter].save_pretrained(folder / "adapter")
        (folder / checkpoint.META_FILE).write_text(json.dumps(checkpoint.describe(model), indent=2))
        given = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, llm=str(base), generator=generator))
        recipes.save(recipes.anchored(given, output / folder.name), folder / "recipe.yaml")  # as the user named them
        checkpoint.read(model, folder)  # as generate reads it: every file fits the model
        sources.mark(tmp, record)
        (folder / checkpoint.STEP_FILE).write_text(json.dumps({"step": 0}))
    return record
