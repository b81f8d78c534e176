"""The oracle fixtures of the released MiniGPT-5 checkpoints (tests/fixtures/official, made by
tools/official_fixtures.py from the original code) against current libraries, by renaming keys only: the key
layout, the mapper's conditioning and null conditioning, and the language side (Llama + LoRA) on the original's
embedded inputs: logits, hidden states, voken states, image splice positions, and the argmax trace."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "tests" / "fixtures" / "official"
META = json.loads((FIX / "case.json").read_text())
CASE = load_file(str(FIX / "case.safetensors"))
ATOL = 1e-5
STOP = json.loads((FIX / "vicuna" / "generation_config.json").read_text())["eos_token_id"]  # Vicuna v0's 1
LORA = re.compile(r"^model\.llama_model\.(base_model\.model\.model\.layers\.\d+\.self_attn\.[qv]_proj\.lora_[AB]"
                  r"\.default\.weight)$")


def ckpt(name: str) -> dict[str, torch.Tensor]:
    return torch.load(FIX / name, map_location="cpu", weights_only=True)["state_dict"]


def report(what: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    diff = (ours - theirs).abs().max().item()
    print(f"{what}: max abs diff {diff:.3g}")
    assert diff <= ATOL, (what, diff)


def mapper_names(n_enc: int = 4, n_dec: int = 4) -> set[str]:
    attn = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
    ffn = [f"{p}.{w}" for p in ("linear1", "linear2") for w in ("weight", "bias")]
    enc = [f"self_attn.{a}" for a in attn] + ffn + [f"norm{i}.{w}" for i in (1, 2) for w in ("weight", "bias")]
    dec = enc + [f"multihead_attn.{a}" for a in attn] + [f"norm3.{w}" for w in ("weight", "bias")]
    names = {f"llm_to_t2i_mapping.encoder.layers.{i}.{k}" for i in range(n_enc) for k in enc}
    names |= {f"llm_to_t2i_mapping.decoder.layers.{i}.{k}" for i in range(n_dec) for k in dec}
    return names | {f"llm_to_t2i_mapping.{p}.norm.{w}" for p in ("encoder", "decoder") for w in ("weight", "bias")}


def test_the_checkpoints_have_the_released_key_layout():
    vicuna = json.loads((FIX / "vicuna" / "config.json").read_text())
    layers, width, vocab = vicuna["num_hidden_layers"], vicuna["hidden_size"], vicuna["vocab_size"]
    s1, s2 = ckpt("stage1.ckpt"), ckpt("stage2.ckpt")
    mapper = mapper_names()
    assert len(mapper) == 124
    assert set(s1) == mapper | {"model.llama_model.model.embed_tokens.weight", "model.llama_model.lm_head.weight",
                                "t2i_decoder_prompt", "fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias"}
    assert len(s1) == 131  # as released, whatever the depth
    lora = {f"model.llama_model.base_model.model.model.layers.{i}.self_attn.{m}_proj.lora_{ab}.default.weight"
            for i in range(layers) for m in "qv" for ab in "AB"}
    assert set(s2) == mapper | lora | {
        "model.llama_model.base_model.model.model.embed_tokens.modules_to_save.default.weight",
        "model.llama_model.base_model.model.lm_head.modules_to_save.default.weight"}
    assert len(s2) == 2 + 4 * layers + 124  # 254 at Vicuna 7B's 32 layers
    assert all(v.dtype == torch.float32 for v in [*s1.values(), *s2.values()])
    added = len(META["tokens"])
    assert s1["model.llama_model.lm_head.weight"].shape == (vocab + added, width)
    assert s2["model.llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"].shape == (
        8, width)
    assert s1["t2i_decoder_prompt"].shape == (1, 77, META["cond_width"])
    # every old row moved, not only the added ones (weight decay on the whole matrix)
    base = load_file(str(FIX / "vicuna" / "model.safetensors"))["model.embed_tokens.weight"]
    moved = (s1["model.llama_model.model.embed_tokens.weight"][:vocab] - base).abs().amax(1)
    assert (moved > 0).all()
    bases = [torch.load(FIX / f, weights_only=True) for f in ("blip2_pretrained_flant5xxl.pth",
                                                                "prerained_minigpt4_7b.pth")]
    assert {"query_tokens", "ln_vision.weight", "t5_proj.weight"} <= set(bases[0]["model"])
    assert set(bases[1]["model"]) == {"llama_proj.weight", "llama_proj.bias"}
    assert torch.load(FIX / "eva_vit_g.pth", weights_only=True)["cls_token"].dtype == torch.float16


def mapper(stage: str):
    from minigpt5_cli.modeling.mapper import FeatureMapper

    state = {}
    for name in ["stage1.ckpt"] + (["stage2.ckpt"] if stage == "stage2" else []):  # stage 2 overrides the transformer
        for k, v in ckpt(name).items():
            if k.startswith("llm_to_t2i_mapping."):
                state["transformer." + k.removeprefix("llm_to_t2i_mapping.")] = v
            elif k == "t2i_decoder_prompt":
                state["queries"] = v
            elif k.startswith("fc."):
                state[k] = v
    width = META["cond_width"]
    m = FeatureMapper(llm_width=META["llm"]["hidden_size"], cond_len=77, cond_width=width, kind="paper", heads=8,
                      encoder_layers=4, decoder_layers=4, ffn=4 * width)
    m.load_state_dict(state, strict=True)
    return m.eval()


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_the_paper_mapper_gives_the_original_conditioning(stage):
    m = mapper(stage)
    with torch.no_grad():
        null = m(torch.zeros(1, 8, META["llm"]["hidden_size"]))[0]
        for case in ("text", "vist"):
            key = f"{stage}.{case}"
            report(f"{key} conditioning", m(CASE[f"{key}.voken_states"])[0], CASE[f"{key}.conditioning"])
            report(f"{key} trace conditioning", m(CASE[f"{key}.trace_voken_states"])[0],
                   CASE[f"{key}.trace_conditioning"])
            report(f"{key} null conditioning", null, CASE[f"{key}.null_conditioning"])


def language_model(stage: str):
    """Vicuna from its folder, the checkpoint's full matrices in place of its own, and the stage-2 LoRA."""
    from transformers import LlamaForCausalLM

    lm = LlamaForCausalLM.from_pretrained(FIX / "vicuna", dtype=torch.float32)
    s1 = ckpt("stage1.ckpt")
    inp, out = s1["model.llama_model.model.embed_tokens.weight"], s1["model.llama_model.lm_head.weight"]
    if stage == "stage2":
        from peft import LoraConfig, get_peft_model

        s2 = ckpt("stage2.ckpt")
        inp = s2["model.llama_model.base_model.model.model.embed_tokens.modules_to_save.default.weight"]
        out = s2["model.llama_model.base_model.model.lm_head.modules_to_save.default.weight"]
    lm.resize_token_embeddings(inp.shape[0])
    lm.get_input_embeddings().weight.data.copy_(inp)
    lm.get_output_embeddings().weight.data.copy_(out)
    if stage == "stage2":
        lm = get_peft_model(lm, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
        lora = {LORA.match(k)[1]: v for k, v in s2.items() if LORA.match(k)}
        missing, unexpected = lm.load_state_dict(lora, strict=False)
        assert not unexpected and not set(lora) & set(missing)
    return lm.eval()


def splice(case: str, stage: str, lm) -> torch.Tensor:
    """The original's embedded prompt, rebuilt: the tokenizer's BOS (1), then the ids' embeddings with each
    <ImageHere> replaced by its image's query embeddings (taken from the fixture)."""
    ids = CASE[f"{case}.input_ids"][0]
    table = lm.get_input_embeddings()
    parts, queries = [table(torch.tensor([META["bos_token_id"]]))], CASE.get(f"{stage}.{case}.query_embeds")
    image = 0
    for i in ids.tolist():
        if i == META["tokens"]["<ImageHere>"]:
            parts.append(queries[image])
            image += 1
        else:
            parts.append(table(torch.tensor([i])))
    assert image == META["cases"][case]["images"]
    return torch.cat(parts)[None]


def trace(lm, embeds: torch.Tensor, forced: bool) -> tuple[list[int], torch.Tensor]:
    """The original generation rule: argmax of the logits after a 2.0 repetition penalty over the generation's own
    sequence ([gen bos] + new ids); [IMG0] set to 10x the best score while absent if forced; after [IMG0] the 8
    vokens go in as one step; stop at eos id 1 or after the new-token limit."""
    img0 = META["tokens"]["[IMG0]"]
    seq, states = [0], None
    out = lm(inputs_embeds=embeds, use_cache=True, output_hidden_states=True)
    while len(seq) - 1 < META["max_new_tokens"]:
        scores = out.logits[0, -1].clone()
        seen = torch.tensor(sorted(set(seq)))
        scores[seen] = torch.where(scores[seen] > 0, scores[seen] / 2.0, scores[seen] * 2.0)
        best = scores.argmax()
        if forced and img0 not in seq:
            keep = torch.full_like(scores, float("-inf"))
            keep[best] = scores[best]
            keep[img0] = 10 * scores[best]
            best = keep.argmax()
        token = int(best)
        seq.append(token)
        if token == STOP:
            break
        if token == img0:
            before = out.hidden_states[-1][:, -1:]
            vokens = torch.tensor([[META["tokens"][f"[IMG{i}]"] for i in range(8)]])
            out = lm(inputs_embeds=lm.get_input_embeddings()(vokens), past_key_values=out.past_key_values,
                     use_cache=True, output_hidden_states=True)
            states = torch.cat([before, out.hidden_states[-1][:, :-1]], 1)
        else:
            out = lm(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True,
                     output_hidden_states=True)
    return seq, states


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_llama_and_lora_reproduce_the_original_language_side(stage):
    lm = language_model(stage)
    with torch.no_grad():
        for case in ("text", "vist"):
            key = f"{stage}.{case}"
            embeds = splice(case, stage, lm)
            report(f"{key} inputs_embeds", embeds, CASE[f"{key}.inputs_embeds"])
            out = lm(inputs_embeds=embeds, output_hidden_states=True)
            tail = CASE[f"{key}.logits_tail"]
            report(f"{key} logits (target span)", out.logits[:, -tail.shape[1]:], tail)
            hidden = out.hidden_states[-1]
            report(f"{key} last hidden states", hidden, CASE[f"{key}.hidden_last"])
            b, p = CASE[f"{key}.voken_index"][0].tolist()
            report(f"{key} voken states", hidden[b:b + 1, p:p + 8], CASE[f"{key}.voken_states"])
            labels = CASE[f"{case}.labels"][0]
            source = embeds[:, :embeds.shape[1] - (labels.shape[0] - int((labels != -100).nonzero()[0, 0]))]
            seq, states = trace(lm, source, META["stages"][stage]["cases"][case]["forced"])
            assert seq == CASE[f"{key}.trace_tokens"][0].tolist(), key
            report(f"{key} trace voken states", states, CASE[f"{key}.trace_voken_states"])


@pytest.mark.skipif(not (os.environ.get("MINIGPT5_UPSTREAM") and os.environ.get("MINIGPT5_LEGACY_PYTHON")),
                    reason="needs MINIGPT5_UPSTREAM (a MiniGPT-5 checkout) and MINIGPT5_LEGACY_PYTHON (its env)")
def test_the_original_code_reproduces_the_committed_fixtures(tmp_path):
    subprocess.run([os.environ["MINIGPT5_LEGACY_PYTHON"], str(REPO / "tools" / "official_fixtures.py"),
                    "--upstream", os.environ["MINIGPT5_UPSTREAM"], "--out", str(tmp_path)], check=True,
                   capture_output=True)
    fresh = load_file(str(tmp_path / "case.safetensors"))
    assert set(fresh) == set(CASE)
    for k, v in CASE.items():
        assert torch.equal(fresh[k], v), k
    for name in ("stage1.ckpt", "stage2.ckpt"):
        theirs = torch.load(tmp_path / name, weights_only=True)["state_dict"]
        assert all(torch.equal(theirs[k], v) for k, v in ckpt(name).items()), name
    assert json.loads((tmp_path / "case.json").read_text()) == META
