"""Exact trainable-parameter counts: for this run, and for the paper's backbones (7B LLM, SD 2.1).

The paper column is computed by building the modules on the meta device from their configs, so no
weights are downloaded or allocated.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import torch
from rich.table import Table

from minigpt5_cli.recipe import AdapterConfig, MapperConfig, Recipe

# Vicuna-7B v1.5 / the language model of LLaVA-1.5-7B, and SD 2.1's conditioning (77 x 1024).
PAPER_LLM = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)
PAPER_COND = (77, 1024)
# The conditioning of the larger generators the mapper may feed: (length, width, pooled width).
OTHER_CONDS = {"SDXL (77 x 2048, pooled 1280)": (77, 2048, 1280),
               "SD3 ((77 + 256) x 4096, pooled 2048)": (77 + 256, 4096, 2048),
               "FLUX.1-dev (512 x 4096, pooled 768)": (512, 4096, 768)}


def _count(params) -> int:
    return sum(p.numel() for p in params)


@lru_cache(maxsize=8)
def paper_counts(mapper_kind: str, adapter_kind: str, n_vokens: int) -> dict[str, int]:
    """Trainable counts for the paper's backbones with the paper's mapper and adapter settings."""
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from minigpt5_cli.modeling.llm_families import lora_targets

    adapter = dataclasses.replace(AdapterConfig(), kind=adapter_kind)
    with torch.device("meta"):
        counts = {"vokens": 2 * n_vokens * PAPER_LLM["hidden_size"], "mapper": mapper_count(mapper_kind, *PAPER_COND),
                  "adapter": 0}
        if adapter.kind != "none":
            llm = LlamaForCausalLM(LlamaConfig(**PAPER_LLM))
            llm.requires_grad_(False)
            if adapter.kind == "lora":
                targets = lora_targets(llm, llm.model, list(adapter.target_modules))
                config = LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, target_modules=targets, task_type="CAUSAL_LM")
            else:
                config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=adapter.virtual_tokens,
                                            prefix_projection=True, encoder_hidden_size=adapter.prefix_hidden)
            counts["adapter"] = _count(p for p in get_peft_model(llm, config).parameters() if p.requires_grad)
    return counts


@lru_cache(maxsize=8)
def mapper_count(kind: str, length: int, width: int, pooled: int = 0) -> int:
    """Parameters of the paper-sized mapper (its recipe defaults) for a 7B LLM and a conditioning of
    `length` x `width` (and a `pooled` vector), built on the meta device."""
    from minigpt5_cli.modeling.mapper import FeatureMapper

    m = dataclasses.replace(MapperConfig(), kind=kind)
    with torch.device("meta"):
        mapper = FeatureMapper(llm_width=PAPER_LLM["hidden_size"], cond_len=length, cond_width=width, kind=m.kind,
                               hidden=m.hidden, heads=m.heads, encoder_layers=m.encoder_layers,
                               decoder_layers=m.decoder_layers, ffn=m.ffn, pooled_width=pooled)
        return _count(mapper.parameters())


def table(model, recipe: Recipe) -> Table:
    """A rich table of trainable parameters per component, this run beside the paper's configuration."""
    ours = {name: _count(ps) for name, ps in model.trainable_groups().items()}
    paper = paper_counts(recipe.model.mapper.kind, recipe.adapter.kind, recipe.model.n_vokens)
    frozen = _count(p for p in model.parameters() if not p.requires_grad)
    t = Table(title=f"Trainable parameters (stage {recipe.train.stage})")
    t.add_column("component")
    t.add_column("this run", justify="right")
    t.add_column("paper config (7B LLM, SD 2.1)", justify="right")
    for name in ("vokens", "mapper", "adapter"):
        t.add_row(name, f"{ours[name]:,}", f"{paper[name]:,}")
    t.add_row("total trainable", f"{sum(ours.values()):,}", f"{sum(paper.values()):,}", style="bold")
    t.add_row("frozen", f"{frozen:,}", "")
    for name, cond in OTHER_CONDS.items():  # the same mapper for the larger generators
        t.add_row(f"mapper for {name}", "", f"{mapper_count(recipe.model.mapper.kind, *cond):,}", style="dim")
    return t
