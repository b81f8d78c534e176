"""import-official: the LAVIS / MiniGPT-4 files as a transformers Blip2 folder, and the released Lightning
checkpoints as a minigpt5 checkpoint over it.

The source files are made here at tiny widths, their names written out as the original code saves them
(not derived from the importer's tables), with random values: every value the import writes can then be
traced back to the one tensor it came from. Where the official outputs made by the original code are in
tests/fixtures/official/, the imports are also compared with them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import REPO, run_cli

OFFICIAL = REPO / "tests" / "fixtures" / "official"
WIDTH, HEADS, QUERIES, GRID = 16, 2, 4, 2  # EVA and Q-Former widths, heads, queries, patches per side
LAYERS = 2  # the ViT blocks built; the EVA files hold one more, as the released one holds 40 for the 39 built
COND = (16, 32)  # tiny:sd's conditioning: length, width
SCALE = 0.99  # the released matrices: the base's rows shrunk (weight decay), here uniformly
LLM = "model.llama_model."
# Stand-in system prompts of our own, in a dataloader.py laid out as the original's (one of them split over two
# literals, and a decoy: the stage-1 dataset's prompt of the same name)
STORY, DIALOGUE = "Pictures come in <Img></Img>. Tell the tale on.", "Pictures come in <Img></Img>. Chat on."
DATALOADER = """
class CC3MDataset(Dataset):
    def __init__(self, data_path, test=False):
        system_prompt = "a decoy"


class VISTDataset(CC3MDataset):
    def __init__(self, data_path, test=False):
        system_prompt1 = {story!r} \\
            {tail!r}


class MMDialogDataset(CC3MDataset):
    def __init__(self, data_path, test=False):
        self.test = test
        system_prompt = {dialogue!r}
"""


def _r(*shape) -> torch.Tensor:
    return torch.randn(*shape)


def eva_state(w: int = WIDTH, layers: int = LAYERS + 1, mlp: int = 24, patch: int = 14, grid: int = GRID) -> dict:
    """An EVA ViT state dict as LAVIS's eva_vit_g.pth holds it."""
    state = {"cls_token": _r(1, 1, w), "pos_embed": _r(1, grid * grid + 1, w),
             "patch_embed.proj.weight": _r(w, 3, patch, patch), "patch_embed.proj.bias": _r(w)}
    for i in range(layers):
        b = f"blocks.{i}."
        state |= {b + "norm1.weight": _r(w), b + "norm1.bias": _r(w), b + "attn.q_bias": _r(w),
                  b + "attn.v_bias": _r(w), b + "attn.qkv.weight": _r(3 * w, w), b + "attn.proj.weight": _r(w, w),
                  b + "attn.proj.bias": _r(w),
                  b + "norm2.weight": _r(w), b + "norm2.bias": _r(w), b + "mlp.fc1.weight": _r(mlp, w),
                  b + "mlp.fc1.bias": _r(mlp), b + "mlp.fc2.weight": _r(w, mlp), b + "mlp.fc2.bias": _r(w)}
    return state


def blip2_state(w: int = WIDTH, h: int = WIDTH, layers: int = 2, inner: int = 32) -> dict:
    """LAVIS's BLIP-2 file's model: the Q-Former (cross-attention every other layer, text parts included),
    ln_vision, the queries, and a head MiniGPT-4 does not use (t5_proj)."""
    state = {"query_tokens": _r(1, QUERIES, h), "ln_vision.weight": _r(w), "ln_vision.bias": _r(w),
             "Qformer.bert.embeddings.LayerNorm.weight": _r(h), "Qformer.bert.embeddings.LayerNorm.bias": _r(h),
             "Qformer.bert.embeddings.word_embeddings.weight": _r(30, h),
             "Qformer.bert.embeddings.position_embeddings.weight": _r(8, h),
             "Qformer.bert.embeddings.position_ids": torch.arange(8)[None], "Qformer.cls.predictions.bias": _r(30),
             "t5_proj.weight": _r(8, h), "t5_proj.bias": _r(8)}
    for i in range(layers):
        b = f"Qformer.bert.encoder.layer.{i}."
        for a in ["attention"] + (["crossattention"] if i % 2 == 0 else []):
            kv = w if a == "crossattention" else h
            state |= {b + f"{a}.self.query.weight": _r(h, h), b + f"{a}.self.query.bias": _r(h),
                      b + f"{a}.self.key.weight": _r(h, kv), b + f"{a}.self.key.bias": _r(h),
                      b + f"{a}.self.value.weight": _r(h, kv), b + f"{a}.self.value.bias": _r(h),
                      b + f"{a}.output.dense.weight": _r(h, h), b + f"{a}.output.dense.bias": _r(h),
                      b + f"{a}.output.LayerNorm.weight": _r(h), b + f"{a}.output.LayerNorm.bias": _r(h)}
        for s in ["", "_query"]:
            state |= {b + f"intermediate{s}.dense.weight": _r(inner, h), b + f"intermediate{s}.dense.bias": _r(inner),
                      b + f"output{s}.dense.weight": _r(h, inner), b + f"output{s}.dense.bias": _r(h),
                      b + f"output{s}.LayerNorm.weight": _r(h), b + f"output{s}.LayerNorm.bias": _r(h)}
    return state


def vicuna() -> Path:
    from minigpt5_cli import hub

    return Path(hub.resolve("tiny:llama"))


def lavis_files(folder: Path, eva: dict | None = None, blip2: dict | None = None) -> list[str]:
    """The three weight files in `folder` and the import-official minigpt4 options naming them."""
    from transformers import AutoConfig

    folder.mkdir(parents=True, exist_ok=True)
    width = AutoConfig.from_pretrained(vicuna()).hidden_size
    torch.save(eva if eva is not None else eva_state(), folder / "eva_vit_g.pth")
    torch.save({"model": blip2 if blip2 is not None else blip2_state()}, folder / "blip2_pretrained_flant5xxl.pth")
    torch.save({"model": {"llama_proj.weight": _r(width, WIDTH), "llama_proj.bias": _r(width)}},
               folder / "prerained_minigpt4_7b.pth")
    return ["--vicuna", str(vicuna()), "--eva-vit", str(folder / "eva_vit_g.pth"), "--qformer",
            str(folder / "blip2_pretrained_flant5xxl.pth"), "--minigpt4", str(folder / "prerained_minigpt4_7b.pth"),
            "--vision-heads", str(HEADS), "--qformer-heads", str(HEADS), "--vision-layers", str(LAYERS)]


def import_base(folder: Path) -> Path:
    """A MiniGPT-4 folder imported from tiny files under `folder`."""
    assert run_cli("import-official", "minigpt4", *lavis_files(folder / "lavis"), "--output", str(folder / "base")) == 0
    return folder / "base"


def upstream(folder: Path, story: str = STORY, dialogue: str = DIALOGUE) -> Path:
    """A stand-in checkout of the original code in `folder`: its dataloader.py with these system prompts."""
    folder.mkdir(parents=True, exist_ok=True)
    half = len(story) // 2
    (folder / "dataloader.py").write_text(DATALOADER.format(story=story[:half], tail=story[half:], dialogue=dialogue))
    return folder


def official_transformer(width: int) -> nn.Transformer:
    """The original mapper's transformer, built as its code builds it."""
    return nn.Transformer(batch_first=True, norm_first=True, d_model=width, num_encoder_layers=4, num_decoder_layers=4,
                          dim_feedforward=width * 4, dropout=0.0)


def official_checkpoints(folder: Path, base: Path) -> tuple[Path, Path]:
    """stage1.ckpt and stage2.ckpt in `folder` as the original training saves them, over `base`: the LLM's
    matrices (the base's rows times SCALE, then [IMG0..7] and <ImageHere>), the mapper, LoRA (r 8)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base)
    text, n = config.text_config, config.image_token_index
    d, (length, w) = text.hidden_size, COND
    weights = load_file(base / "model.safetensors")
    rows = {k: torch.cat([weights[f"language_model.{name}"][:n] * SCALE, _r(9, d)])
            for k, name in (("embed", "model.embed_tokens.weight"), ("head", "lm_head.weight"))}
    mapping = {f"llm_to_t2i_mapping.{k}": _r(*v.shape) for k, v in official_transformer(w).state_dict().items()}
    stage1 = {LLM + "model.embed_tokens.weight": rows["embed"], LLM + "lm_head.weight": rows["head"],
              "fc.0.weight": _r(w, d), "fc.0.bias": _r(w), "fc.2.weight": _r(w, w), "fc.2.bias": _r(w),
              "t2i_decoder_prompt": _r(1, length, w), **mapping}
    peft = LLM + "base_model.model."
    stage2 = {peft + "model.embed_tokens.modules_to_save.default.weight": rows["embed"] * 0.5,
              peft + "lm_head.modules_to_save.default.weight": rows["head"] * 0.5,
              **{k: _r(*v.shape) for k, v in mapping.items()}}
    head_dim = d // text.num_attention_heads
    for i in range(text.num_hidden_layers):
        for proj, out in (("q_proj", d), ("v_proj", text.num_key_value_heads * head_dim)):
            stem = f"{peft}model.layers.{i}.self_attn.{proj}.lora_"
            stage2 |= {stem + "A.default.weight": _r(8, d), stem + "B.default.weight": _r(out, 8)}
    torch.save({"state_dict": stage1, "epoch": 1}, folder / "stage1.ckpt")
    torch.save({"state_dict": stage2, "epoch": 1}, folder / "stage2.ckpt")
    return folder / "stage1.ckpt", folder / "stage2.ckpt"


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("official")
    torch.manual_seed(0)
    base = import_base(root)
    s1, s2 = official_checkpoints(root, base)
    assert run_cli("import-official", "minigpt5", "--stage1", str(s1), "--stage2", str(s2), "--base", str(base),
                   "--generator", "tiny:sd", "--upstream", str(upstream(root / "MiniGPT-5")),
                   "--output", str(root / "vist")) == 0
    return root


def test_every_source_tensor_lands_once_in_the_blip2_folder(imported):
    """Each tensor of the three files (but those MiniGPT-4 never reads, the EVA block past those built among
    them) is found in the written model, the EVA q and v biases as the thirds of the qkv bias; the model loads
    with no weight missing."""
    from transformers import Blip2ForConditionalGeneration

    root = imported
    model = Blip2ForConditionalGeneration.from_pretrained(root / "base", dtype=torch.float32)
    written = list(model.state_dict().values())
    eva = torch.load(root / "lavis" / "eva_vit_g.pth")
    blip2 = torch.load(root / "lavis" / "blip2_pretrained_flant5xxl.pth")["model"]
    proj = torch.load(root / "lavis" / "prerained_minigpt4_7b.pth")["model"]
    unused = re.compile(r"Qformer\.cls\.|Qformer\.bert\.embeddings\.(word|position)_|t5_proj\.|"
                        r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.|"  # the text parts, T5's
                        rf"blocks\.{LAYERS}\.")
    for name, tensor in {**eva, **blip2, **proj}.items():
        if unused.match(name):
            continue
        if name.endswith(("q_bias", "v_bias")):
            layer = int(name.split(".")[1])
            qkv = model.vision_model.encoder.layers[layer].self_attn.qkv.bias
            part = qkv[:WIDTH] if name.endswith("q_bias") else qkv[2 * WIDTH:]
            assert torch.equal(part, tensor), name
            assert not qkv[WIDTH:2 * WIDTH].any()
            continue
        assert sum(t.shape == tensor.shape and torch.equal(t, tensor) for t in written) == 1, name
    assert model.config.num_query_tokens == QUERIES
    assert model.config.vision_config.num_hidden_layers == LAYERS
    assert model.config.vision_config.image_size == GRID * 14


def test_the_blip2_folder_keeps_the_language_model_and_the_original_preprocessing(imported):
    from transformers import AutoModelForCausalLM, AutoProcessor, Blip2ForConditionalGeneration

    base = imported / "base"
    model = Blip2ForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    lm = AutoModelForCausalLM.from_pretrained(vicuna(), dtype=torch.float32)
    n = lm.config.vocab_size
    assert model.config.image_token_index == n  # the image token follows the text tokens
    for name, tensor in lm.state_dict().items():
        mine = model.language_model.state_dict()[name]
        assert torch.equal(mine[:n] if mine.shape[0] == n + 1 else mine, tensor), name
    processor = AutoProcessor.from_pretrained(base)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == n
    image = processor.image_processor
    size = GRID * 14
    assert (image.size["shortest_edge"], image.crop_size["height"], image.do_center_crop) == (size, size, True)
    assert int(image.resample) == 2  # bilinear
    assert image.image_mean == pytest.approx([0.48145466, 0.4578275, 0.40821073])


def test_a_vision_tower_in_the_blip2_file_is_the_one_used(tmp_path, capsys):
    """The original loads the BLIP-2 file after the EVA file: a vision tower there wins, checked the same way."""
    from transformers import Blip2ForConditionalGeneration

    tower = eva_state()
    blip2 = {**blip2_state(), **{f"visual_encoder.{k}": v for k, v in tower.items()}}
    options = lavis_files(tmp_path / "lavis", blip2=blip2)
    assert run_cli("import-official", "minigpt4", *options, "--output", str(tmp_path / "base")) == 0
    model = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "base", dtype=torch.float32)
    assert torch.equal(model.vision_model.encoder.layers[1].mlp.fc2.weight, tower["blocks.1.mlp.fc2.weight"])
    assert run_cli("import-official", "minigpt4", *options, "--output", str(tmp_path / "base"), "--overwrite") == 0
    del blip2["visual_encoder.pos_embed"]
    lavis_files(tmp_path / "lavis", blip2=blip2)
    assert run_cli("import-official", "minigpt4", *options, "--output", str(tmp_path / "again")) == 2
    assert "blip2_pretrained_flant5xxl.pth lacks visual_encoder.pos_embed" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


def test_the_vit_is_built_39_blocks_deep_as_the_original_builds_it(tmp_path):
    """The released eva_vit_g.pth holds 40 blocks; the original builds 39, and its non-strict load drops the
    40th: so does the import unless --vision-layers says otherwise."""
    from transformers import AutoConfig

    eva = eva_state(layers=40)
    options = lavis_files(tmp_path / "lavis", eva=eva)
    assert run_cli("import-official", "minigpt4", *options[:-2], "--output", str(tmp_path / "base")) == 0
    assert AutoConfig.from_pretrained(tmp_path / "base").vision_config.num_hidden_layers == 39

def _model(folder: Path):
    from minigpt5_cli import recipe as recipes
    from minigpt5_cli.modeling import checkpoint
    from minigpt5_cli.modeling.bundle import located
    from minigpt5_cli.modeling.model import build_model

    recipe = located(folder, recipes.load(folder / "recipe.yaml"))
    model = build_model(recipe.model, recipe.adapter)
    checkpoint.load(model, folder)
    return model.eval(), recipe


def test_the_checkpoint_holds_the_released_weights_in_our_places(imported):
    """Mapper: fc and queries of stage 1, transformer of stage 2, the conditioning as the original computes
    it; the LLM's rows: the stage-2 matrices, the vokens and the image placeholder moved to our ids; LoRA."""
    from transformers import GenerationConfig

    root = imported
    one = torch.load(root / "stage1.ckpt")["state_dict"]
    two = torch.load(root / "stage2.ckpt")["state_dict"]
    model, recipe = _model(root / "vist" / "checkpoint-0")
    assert recipe.adapter.kind == "lora" and (recipe.adapter.r, recipe.adapter.alpha) == (8, 16)
    mapper = recipe.model.mapper
    assert (mapper.heads, mapper.ffn, recipe.data.prompt_format) == (8, 4 * COND[1], "official")
    s = recipe.sample
    eos = GenerationConfig.from_pretrained(vicuna()).eos_token_id
    assert (s.top_p, s.temperature, s.repetition_penalty, s.max_new_tokens) == (0.9, 1.0, 2.0, 256)
    assert (s.penalize, s.eos_ids, s.mask_vokens, s.render, s.min_images) == ("response", [eos], False, "first", 0)
    assert (recipe.data.story_system, recipe.data.dialogue_system) == (STORY, DIALOGUE)  # read, never run

    transformer = official_transformer(COND[1]).eval()
    transformer.load_state_dict({k.removeprefix("llm_to_t2i_mapping."): v for k, v in two.items()
                                 if k.startswith("llm_to_t2i_mapping.")})
    fc = nn.Sequential(nn.Linear(*one["fc.0.weight"].shape[::-1]), nn.GELU(), nn.Linear(COND[1], COND[1]))
    fc.load_state_dict({k.removeprefix("fc."): v for k, v in one.items() if k.startswith("fc.")})
    states = torch.randn(2, 8, model.llm_info.width)
    with torch.no_grad():
        want = transformer(fc(states), one["t2i_decoder_prompt"].expand(2, -1, -1))
        null = transformer(fc(torch.zeros(1, 8, model.llm_info.width)), one["t2i_decoder_prompt"])
        torch.testing.assert_close(model.mapper(states)[0], want, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.mapper(torch.zeros(1, 8, model.llm_info.width))[0], null, atol=1e-5, rtol=0)

    n, first = model.first_voken - 1, model.first_voken
    embed = two[LLM + "base_model.model.model.embed_tokens.modules_to_save.default.weight"]
    head = two[LLM + "base_model.model.lm_head.modules_to_save.default.weight"]
    released = torch.tensor([[5, n + 8, n, n + 7]])  # a text token, <ImageHere>, [IMG0], [IMG7]
    ours = torch.tensor([[5, n, first, first + 7]])
    llm = model.llm.get_base_model()
    with torch.no_grad():
        assert torch.equal(llm.get_input_embeddings()(ours), embed[released])
        h = torch.randn(1, 4, model.llm_info.width)
        order = torch.cat([torch.arange(n), torch.tensor([n + 8]), torch.arange(n, n + 8)])
        assert torch.allclose(llm.get_output_embeddings()(h), h @ head[order].T, atol=1e-6)
    lora = dict(model.llm.named_parameters())
    a = next(v for k, v in lora.items() if k.endswith("layers.1.self_attn.v_proj.lora_A.default.weight"))
    assert torch.equal(a, two[LLM + "base_model.model.model.layers.1.self_attn.v_proj.lora_A.default.weight"])
    record = json.loads((root / "vist" / "imported.json").read_text())
    assert record["row_scale"]["embed"]["median"] == pytest.approx(SCALE * 0.5, abs=1e-5)
    assert record["row_scale"]["head"]["max"] == pytest.approx(SCALE * 0.5, abs=1e-5)


def test_a_stage1_import_has_no_adapter_and_its_own_transformer(imported, tmp_path):
    root = imported
    assert run_cli("import-official", "minigpt5", "--stage1", str(root / "stage1.ckpt"), "--base", str(root / "base"),
                   "--generator", "tiny:sd", "--upstream", str(root / "MiniGPT-5"), "--output",
                   str(tmp_path / "cc3m")) == 0
    one = torch.load(root / "stage1.ckpt")["state_dict"]
    model, recipe = _model(tmp_path / "cc3m" / "checkpoint-0")
    assert recipe.adapter.kind == "none" and not (tmp_path / "cc3m" / "checkpoint-0" / "adapter").exists()
    assert torch.equal(model.mapper.transformer.decoder.norm.weight, one["llm_to_t2i_mapping.decoder.norm.weight"])
    assert torch.equal(model.vokens.rows_out, one[LLM + "lm_head.weight"][model.first_voken - 1:][:8])


def test_generate_runs_the_imported_checkpoint_and_training_on_keeps_its_rows(imported, tmp_path):
    """The import is a run: generate takes it (its recipe's min_images 0 unless --min-images says otherwise; the
    image token keeps its released LM-head row and may be sampled), and a checkpoint saved from a model built on
    it, or a bundle of it, holds the released matrices again."""
    from safetensors.torch import load_file

    from minigpt5_cli.modeling import checkpoint

    run = imported / "vist"
    for flag, want in (([], 0), (["--min-images", "1"], 1)):
        out = tmp_path / f"out{want}"
        assert run_cli("generate", "-s", "a circle.", "-m", str(run), "-o", str(out), "--diffusion-steps", "2",
                       "--max-new-tokens", "12", *flag) == 0
        doc = json.loads((out / "story.json").read_text())
        assert doc["generated"] and doc["settings"]["min_images"] == want
    model, _ = _model(run / "checkpoint-0")
    checkpoint.save(model, tmp_path / "again")
    assert run_cli("bundle", str(run), str(tmp_path / "bundle")) == 0
    for key, tensor in load_file(run / "checkpoint-0" / checkpoint.BASE_ROWS_FILE).items():
        for copy in ("again", "bundle"):
            assert torch.equal(load_file(tmp_path / copy / checkpoint.BASE_ROWS_FILE)[key], tensor)


# The original code's own outputs (tests/fixtures/official/SOURCE.md): its tiny files imported through both
# commands, and what our model computes from them compared in fp32.
ATOL = 1e-5


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> dict:
    from safetensors.torch import load_file

    from minigpt5_cli.builders import tiny

    if not (OFFICIAL / "case.safetensors").is_file():
        pytest.skip("no official fixtures")
    root = tmp_path_factory.mktemp("oracle")
    f = OFFICIAL
    assert run_cli("import-official", "minigpt4", "--vicuna", str(f / "vicuna"), "--eva-vit", str(f / "eva_vit_g.pth"),
                   "--qformer", str(f / "blip2_pretrained_flant5xxl.pth"), "--minigpt4",
                   str(f / "prerained_minigpt4_7b.pth"), "--vision-heads", "2", "--qformer-heads", "2",
                   "--vision-layers", "2", "--output", str(root / "base")) == 0
    with torch.random.fork_rng():  # a Stable Diffusion whose conditioning is the fixtures' 77 x 16
        torch.manual_seed(0)
        tiny._build_sd(root / "sd", {**tiny.SIZES["tiny:sd"], "cond_len": 77, "width": 16})
    # the story system prompt the original fed, as the fixtures record it (its dialogue prompt is not in them)
    story = json.loads((f / "case.json").read_text())["cases"]["vist"]["source"].split("###Human:")[0]
    checkout = upstream(root / "MiniGPT-5", story=story)
    for stage, given in (("stage1", ["--stage1", str(f / "stage1.ckpt")]),
                         ("stage2", ["--stage1", str(f / "stage1.ckpt"), "--stage2", str(f / "stage2.ckpt")])):
        assert run_cli("import-official", "minigpt5", *given, "--base", str(root / "base"), "--generator",
                       str(root / "sd"), "--upstream", str(checkout), "--output", str(root / stage)) == 0
    return {"root": root, "case": load_file(OFFICIAL / "case.safetensors"), "story": story}


def _close(mine: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(mine.float(), theirs.float(), atol=ATOL, rtol=0)


def test_the_blip2_folder_gives_the_original_query_embeddings(official):
    from transformers import Blip2ForConditionalGeneration

    model = Blip2ForConditionalGeneration.from_pretrained(official["root"] / "base", dtype=torch.float32).eval()
    case = official["case"]
    with torch.no_grad():
        queries = model.get_image_features(case["vist.pixels"], return_dict=True).pooler_output
    for stage in ("stage1", "stage2"):
        _close(queries, case[f"{stage}.vist.query_embeds"])


def _ours(ids: list[int], n: int) -> list[int]:
    """Released ids as ours, BOS first: <ImageHere> (n + 8) as one image token per query, [IMGk] (n + k) one up."""
    out = [1]
    for i in ids:
        out += [n] * QUERIES if i == n + 8 else [i + 1] if n <= i < n + 8 else [i]
    return out


def _batch(case: dict, item: str, ids: list[int]) -> dict:
    t = torch.tensor([ids])
    pixels = {"pixel_values": case[f"{item}.pixels"]} if f"{item}.pixels" in case else {}
    return {"input_ids": t, "attention_mask": torch.ones_like(t), **pixels}


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_the_import_computes_what_the_original_does(official, stage):
    """Teacher-forced, through our model: what the LLM is fed (the query embeddings spliced in place), its last
    hidden states, the logits over all 409 released ids, the voken states; the mapper's conditioning and null
    conditioning."""
    case = official["case"]
    model, recipe = _model(official["root"] / stage / "checkpoint-0")
    assert recipe.data.story_system == official["story"]  # the one the original fed, from --upstream
    n = model.first_voken - 1
    released = torch.cat([torch.arange(n), torch.arange(n + 1, n + 9), torch.tensor([n])])  # our id of each
    fed = []
    model.runner.call.register_forward_pre_hook(lambda m, args, kwargs: fed.append(kwargs["inputs_embeds"]),
                                                with_kwargs=True)
    for item in ("text", "vist"):
        k = f"{stage}.{item}."
        ids = _ours(case[f"{item}.input_ids"][0].tolist(), n)
        with torch.no_grad():
            out = model.runner(_batch(case, item, ids))
            hidden = out.hidden_states[-1]
            _close(fed[-1], case[k + "inputs_embeds"])
            _close(hidden, case[k + "hidden_last"])
            tail = case[k + "logits_tail"]
            _close(out.logits[:, -tail.shape[1]:, released], tail)
            _close(model.voken_states(hidden, torch.tensor([ids])), case[k + "voken_states"])
            _close(model.mapper(case[k + "voken_states"])[0], case[k + "conditioning"])
            _close(model.mapper(torch.zeros(1, 8, model.llm_info.width))[0], case[k + "null_conditioning"])


class _ForceFirstVoken:
    """A logits processor that makes [IMG0] the only choice until the sequence holds it, as the original's
    force_generation did (every fixture trace was made with it)."""

    def __init__(self, first: int):
        self.first, self.picked = first, []

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.first not in ids:
            scores = torch.where(torch.arange(scores.shape[-1]) == self.first, scores, float("-inf"))
        self.picked.append(int(scores.argmax()))  # decoding is greedy: the argmax is the pick
        return scores


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_greedy_decoding_on_the_import_follows_the_original_trace(official, stage):
    """generate's decoder with the imported recipe's sampling (repetition penalty 2.0 over the response, stop at
    eos id 1), greedily: the original's tokens, voken states and conditioning."""
    from minigpt5_cli.generation.decoder import Decoder
    from minigpt5_cli.generation.settings import Settings

    case = official["case"]
    model, recipe = _model(official["root"] / stage / "checkpoint-0")
    n = model.first_voken - 1
    released = torch.cat([torch.arange(n), torch.arange(n + 1, n + 9), torch.tensor([n])])
    back = {int(ours): theirs for theirs, ours in enumerate(released.tolist())}
    for item in ("text", "vist"):
        k = f"{stage}.{item}."
        want = case[k + "trace_tokens"][0].tolist()  # the generation config's BOS (0), then the picks
        labels = case[f"{item}.labels"][0]
        prompt = case[f"{item}.input_ids"][0][:int((labels != -100).nonzero()[0])].tolist()
        # our decoder counts the 8 vokens of a group against max_new_tokens, the original only [IMG0]
        settings = Settings(temperature=0.0, max_new_tokens=len(want) - 1 + 7).resolve(recipe.sample)
        decoder = Decoder(model, recipe.data, settings)
        force = _ForceFirstVoken(model.first_voken)
        decoder.warpers.append(force)
        segments, states = decoder([_batch(case, item, _ours(prompt, n))], [0])
        assert [0] + [back[t] for t in force.picked] == want
        assert [seg for seg in segments[0] if "image" in seg] == [{"image": 0}]
        _close(states, case[k + "trace_voken_states"])
        with torch.no_grad():
            _close(model.mapper(states.clone())[0], case[k + "trace_conditioning"])
