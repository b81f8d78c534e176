"""The BLIP-2 LLM family (MiniGPT-4's layout: a ViT, a Q-Former and a projection into a Llama) and the
released MiniGPT-5's prompts, tokenisation, image preprocessing and sampling (`official`)."""

import pytest
import torch
from PIL import Image

from conftest import DEBUG

N_QUERIES = 4  # tiny:blip2's query tokens
# Stand-in system prompts (the released ones are the recipe's, written by import-official from the original code)
STORY, DIALOGUE = "Pictures come in <Img></Img>. Tell the tale on.", "Pictures come in <Img></Img>. Chat on."
SYSTEMS = ("data.prompt_format=official", f"data.story_system={STORY}", f"data.dialogue_system={DIALOGUE}")


def model_and_collator(*overrides: str, recipe: str = "stage1.yaml"):
    from minigpt5_cli import recipe as R
    from minigpt5_cli.data.collate import Collator
    from minigpt5_cli.training.train import model_for

    rec = R.load(DEBUG / recipe, ["model.llm=tiny:blip2", "data.max_length=512", "train.init_from=none", *overrides])
    torch.manual_seed(0)
    model = model_for(rec).eval()
    return model, Collator.for_model(model, rec.data), rec


def pictures() -> list[Image.Image]:
    return [Image.new("RGB", (40, 30), (200, 20, 20)), Image.new("RGB", (30, 44), (20, 20, 200))]


def story(images) -> list:
    from minigpt5_cli.data.prompts import GEN

    return [("there is a circle.", images[0]), ("it turns into a square.", images[1]), (GEN.format("it moves."), None)]


def test_images_are_spliced_in_place_and_give_the_models_own_logits():
    """Each image's query tokens stand where the image is (not before the text, as Blip2Processor puts
    them), its pixels are the image processor's own, and our runner (images encoded once, spliced,
    the language model on the embeddings) gives the logits of the model's own forward."""
    from minigpt5_cli.data.samples import Sample
    from minigpt5_cli.modeling.runner import TARGETS

    model, collate, _ = model_and_collator()
    images = pictures()
    batch = collate([Sample(history=story(images), target="it stays.", vokens=True, image=torch.zeros(3, 32, 32))])
    image_id = model.llm.config.image_token_id
    ids = batch["input_ids"][0]
    slots = (ids == image_id).nonzero().flatten().tolist()
    assert len(slots) == 2 * N_QUERIES and slots[0] > 1 and slots[N_QUERIES] > slots[N_QUERIES - 1] + 1
    text = model.tokenizer.decode(ids[:slots[0]], skip_special_tokens=True)
    assert text.strip().endswith("there is a circle."), text
    own = model.processor.image_processor(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(batch["pixel_values"], own, rtol=0, atol=0)
    inputs = {k: v for k, v in batch.items() if k not in TARGETS}
    with torch.no_grad():
        ours = model.runner(batch).logits
        theirs = model.llm(**inputs).logits
    torch.testing.assert_close(ours, theirs)


def test_text_only_prompts_need_no_pixels():
    from minigpt5_cli.data.samples import Sample

    model, collate, _ = model_and_collator()
    batch = collate([Sample(history=[("a circle.", None)], target="it moves.")])
    assert "pixel_values" not in batch
    with torch.no_grad():
        ours = model.runner(batch).logits
        theirs = model.llm.language_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(ours, theirs)


def test_lora_adapts_the_language_model_and_leaves_the_vision_side_frozen():
    model, _, _ = model_and_collator(recipe="stage2_lora.yaml")
    trained = [n for n, p in model.llm.named_parameters() if p.requires_grad]
    assert trained and all(".language_model." in n and "lora_" in n for n in trained), trained
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trained} == {"q_proj", "v_proj"}
    blip = model.llm.get_base_model()
    frozen = [*blip.vision_model.parameters(), *blip.qformer.parameters(), blip.query_tokens,
              *blip.language_projection.parameters()]
    assert not any(p.requires_grad for p in frozen)


def test_official_prompts_are_the_released_templates():
    """The story form (the recipe's story system prompt, no space after ###Human:, each image in <Img></Img>
    after its text, a newline, the instruction) and the dialogue form (the dialogue system prompt, turns joined
    by spaces, the last the human's); empty system prompts (the default) are left out."""
    from minigpt5_cli.data import prompts

    _, collate, _ = model_and_collator(*SYSTEMS)
    tokens = "<image>" * N_QUERIES
    images = pictures()
    text, shown = collate._render(_sample(story(images)), story(images))
    assert shown == images
    assert text == (STORY + f"###Human:there is a circle.<Img>{tokens}</Img>it turns into a square."
                    f"<Img>{tokens}</Img>\n Generate an image with the scene description: it moves. ###Assistant:")
    understanding = [("there is a circle.", images[0]), (prompts.DESCRIBE, images[1])]
    text, _ = collate._render(_sample(understanding), understanding)
    assert text == (STORY + f"###Human:there is a circle.<Img>{tokens}</Img>\n Tell me the next scene "
                    f"description by this image: <Img>{tokens}</Img> ###Assistant:")
    dialogue = [("hello there.", None), ("look at this.", images[0]), ("nice.", None)]
    text, _ = collate._render(_sample(dialogue), dialogue)
    assert text == (DIALOGUE + f" ###Human: hello there. ###Assistant: look at this. <Img>{tokens}</Img>"
                    " ###Human: nice. ###Assistant:")
    _, bare, _ = model_and_collator("data.prompt_format=official")
    assert bare._render(_sample(dialogue), dialogue)[0] == text.removeprefix(DIALOGUE + " ")
    assert bare._render(_sample(understanding), understanding)[0].startswith("###Human:there is a circle.")


def _sample(history):
    from minigpt5_cli.data.samples import Sample

    return Sample(history=history)


def legacy_tokenizer(tok, specials: list[str]):
    """The released model's slow LLaMA tokenizer (transformers 4.31, legacy) over `tok`'s vocabulary: every
    piece between special tokens starts with sentencepiece's "▁", and the special tokens added as strings
    eat the whitespace on both sides."""
    from tokenizers import AddedToken, Tokenizer, pre_tokenizers

    slow = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    slow.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    slow.add_special_tokens([AddedToken(t, lstrip=True, rstrip=True, normalized=False, special=True) for t in specials])
    return slow


def test_official_ids_are_the_released_tokenizers():
    """Tokenizer parity on a VIST prompt and its target: ours (a tokenizer that writes "▁" only at the
    text's start and strips nothing around added tokens) equal the released rule: BOS, then the text
    tokenized without special tokens, each <ImageHere> replaced by the image's query tokens."""
    from minigpt5_cli.data.samples import Sample
    from minigpt5_cli.modeling.vokens import voken_tokens

    model, collate, _ = model_and_collator(*SYSTEMS)
    tok = model.tokenizer
    vokens = voken_tokens(model.vokens.n)
    slow = legacy_tokenizer(tok, ["<image>", *vokens, "<ImageHere>"])
    assert slow.token_to_id("<image>") == model.llm.config.image_token_id  # the same ids for the same tokens
    assert slow.token_to_id(vokens[0]) == model.first_voken
    here, image = slow.token_to_id("<ImageHere>"), model.llm.config.image_token_id
    released = (STORY + "###Human:there is a circle.<Img><ImageHere></Img>it turns into a square."
                "<Img><ImageHere></Img>\n Generate an image with the scene description: it moves. ###Assistant:")
    expected = [tok.bos_token_id]
    for t in slow.encode(released, add_special_tokens=False).ids:
        expected += [image] * N_QUERIES if t == here else [t]
    sample = Sample(history=story(pictures()), target="it moves on.", vokens=True, image=torch.zeros(3, 32, 32))
    ids = collate.prompt(sample, 512)["input_ids"][0].tolist()
    assert ids == expected
    target = slow.encode(f"it moves on. {''.join(vokens)} ###", add_special_tokens=False).ids
    assert collate._target_ids(sample) == target
    assert tok(released.replace("<ImageHere>", "<image>" * N_QUERIES))["input_ids"] != expected  # not the default


def test_official_image_preprocessing():
    """The short side to the tower's size, the centre cropped (not squashed), CLIP's mean and std; with
    official_pad, a white square first."""
    from minigpt5_cli.data.samples import Sample
    from minigpt5_cli.images import CLIP_MEAN, CLIP_STD

    side = 28  # tiny:blip2's image size
    wide = Image.new("RGB", (3 * side, side), (255, 0, 0))
    wide.paste((0, 255, 0), (side, 0, 2 * side, side))  # green in the middle third
    green = (torch.tensor([0.0, 1.0, 0.0]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    white = (torch.ones(3) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    for option in ("official", "official_pad"):
        _, collate, _ = model_and_collator(f"data.image_preprocessing={option}")
        pixels = collate.prompt(Sample(history=[("a square.", wide)]), 512)["pixel_values"]
        assert pixels.shape == (1, 3, side, side)
        if option == "official":
            torch.testing.assert_close(pixels[0], green[:, None, None].expand(3, side, side))
        else:  # padded to 84 x 84, then 28 x 28: the top and bottom thirds white
            torch.testing.assert_close(pixels[0, :, :8], white[:, None, None].expand(3, 8, side), atol=1e-5, rtol=0)
            assert not torch.allclose(pixels[0, :, 14], white[:, None].expand(3, side))


def decode(model, collate, rec, boost: dict[int, float], history=None, **knobs):
    """Greedy decoding of one prompt with `boost` added to the logits of some ids; the ids picked, and
    the segments."""
    from minigpt5_cli.data.samples import Sample
    from minigpt5_cli.generation.decoder import Decoder
    from minigpt5_cli.generation.settings import Settings

    head = model.llm.get_output_embeddings()
    ids, bonus = torch.tensor(list(boost)), torch.tensor(list(boost.values()))
    handle = head.register_forward_hook(lambda m, a, out: out.index_add(-1, ids, bonus.expand(*out.shape[:-1], -1)
                                                                        .to(out.dtype)))
    try:
        settings = Settings(temperature=0.0, min_images=0, **knobs).resolve(rec.sample)
        decoder = Decoder(model, rec.data, settings)
        picked = []
        pick = decoder._pick
        decoder._pick = lambda row, logits: picked.append(pick(row, logits)) or picked[-1]
        segments, _ = decoder([collate.prompt(Sample(history=history or [("a red circle.", None)]), 512)], [0])
    finally:
        handle.remove()
    return picked, segments[0]


def test_official_sampling_knobs():
    model, collate, rec = model_and_collator("data.prompt_format=official")
    first, n = model.first_voken, model.vokens.n
    # render: every voken group becomes an image, or only the first
    _, segments = decode(model, collate, rec, {first: 1e4}, max_new_tokens=3 * n)
    assert sum("image" in s for s in segments) == 3
    _, segments = decode(model, collate, rec, {first: 1e4}, max_new_tokens=3 * n, render="first")
    assert [s for s in segments if "image" in s] == [{"image": 0}]
    # mask_vokens: [IMG3] is never sampled, or sampled as any token
    picked, _ = decode(model, collate, rec, {first + 3: 1e4}, max_new_tokens=n + 1)
    assert first + 3 not in picked
    picked, _ = decode(model, collate, rec, {first + 3: 1e4}, max_new_tokens=n + 1, mask_vokens=False)
    assert picked[0] == first + 3
    # eos_ids: the response ends at the ids given, else at the tokenizer's eos
    word = model.tokenizer("circle", add_special_tokens=False)["input_ids"][0]
    picked, segments = decode(model, collate, rec, {word: 1e4}, max_new_tokens=3)
    assert picked == [word] * 3 and segments
    picked, segments = decode(model, collate, rec, {word: 1e4}, max_new_tokens=3, eos_ids=[word])
    assert picked == [word] and segments == []
    # penalize: a token of the prompt (not its BOS) is penalised with it, or only once sampled
    prompt = collate.prompt(_sample([("a red circle.", None)]), 512)["input_ids"][0].tolist()
    assert word in prompt[1:]
    boost = {word: 5.0}
    picked, _ = decode(model, collate, rec, boost, max_new_tokens=1, repetition_penalty=1e6)
    assert picked != [word]
    picked, _ = decode(model, collate, rec, boost, max_new_tokens=2, repetition_penalty=1e6, penalize="response")
    assert picked[0] == word and picked[1] != word


def test_a_sampled_image_token_is_fed_by_its_own_row():
    """The image token may be sampled (the released model's <ImageHere> keeps its trained LM-head row, and its
    sampling masks nothing): it comes without pixels, so it is fed as any token, by its own embedding row, as
    the released code feeds it; image features go only where the prompt's pixels are."""
    model, collate, rec = model_and_collator(*SYSTEMS)
    image = model.llm.config.image_token_id
    history = story(pictures())
    picked, _ = decode(model, collate, rec, {image: 1e4}, history=history, max_new_tokens=3)
    assert picked == [image] * 3
    prompt = collate.prompt(_sample(history), 512)
    one = torch.tensor([[image]])
    with torch.no_grad():
        _, _, state = model.runner.start(prompt, 2)
        after, _ = model.runner.step(state, one, torch.ones_like(one))
        spliced = model.runner._feed(model.runner._inputs(prompt))["inputs_embeds"]
        row = model.llm.get_input_embeddings()(one)
        full = model.llm.language_model(inputs_embeds=torch.cat([spliced, row], 1)).logits[:, -1]
    torch.testing.assert_close(after, full.float())


def test_the_image_token_in_story_text_is_refused():
    """Story text holding the image token would take an image's place (with images in the prompt, one slot more
    than their query embeddings): refused, in the prompt and in the target."""
    from minigpt5_cli.data.samples import Sample
    from minigpt5_cli.errors import UserError

    model, collate, _ = model_and_collator(*SYSTEMS)
    token = model.processor.image_token
    images = pictures()
    with pytest.raises(UserError, match=f"a story step's text holds {token}.*'a circle {token} here.'"):
        collate.prompt(_sample([(f"a circle {token} here.", images[0]), ("it moves.", None)]), 512)
    with pytest.raises(UserError, match=f"holds {token}"):
        collate([Sample(history=story(images), target=f"it {token} stays.")])

def test_min_images_comes_from_the_recipe_unless_given():
    from minigpt5_cli import recipe as R
    from minigpt5_cli.errors import UserError
    from minigpt5_cli.generation.settings import Settings

    paper = R.load(DEBUG / "stage1.yaml").sample
    official = R.load(DEBUG / "stage1.yaml", ["sample.min_images=0"]).sample
    assert paper.min_images == 1 and Settings().resolve(paper).min_images == 1
    assert Settings().resolve(official).min_images == 0
    assert Settings(min_images=2).resolve(official).min_images == 2  # the flag over the recipe
    with pytest.raises(UserError, match="--min-images must be at least 0"):
        Settings(min_images=-1).resolve(paper)


@pytest.mark.parametrize("knob", ["penalize=everything", "render=some", "eos_ids=one", "eos_ids=[-1]",
                                  "min_images=-1"])
def test_sampling_knobs_are_checked(knob):
    from minigpt5_cli import recipe as R
    from minigpt5_cli.errors import UserError

    with pytest.raises(UserError, match=f"sample.{knob.split('=')[0]}"):
        R.load(DEBUG / "stage1.yaml", [f"sample.{knob}"])


def test_official_recipe_trains_and_generates(tmp_path):
    """The released model's prompts, image preprocessing and sampling through the command line: stage 1,
    stage 2 with LoRA, and a batched generate rendering only the first voken group of each response."""
    import json

    from conftest import run_cli
    from test_families import FAST, stories, train

    official = ["data.prompt_format=official", "data.image_preprocessing=official_pad", "sample.penalize=response",
                "sample.eos_ids=[2]", "sample.mask_vokens=false", "sample.render=first"]
    assert run_cli(*train("stage1.yaml", "tiny:blip2", tmp_path / "s1", *official)) == 0
    assert run_cli(*train("stage2_lora.yaml", "tiny:blip2", tmp_path / "s2", f"train.init_from={tmp_path / 's1'}",
                          *official)) == 0
    out = tmp_path / "out"
    assert run_cli("generate", "-s", stories(tmp_path), "-m", str(tmp_path / "s2"), "-o", str(out), "-b", "2",
                   *FAST) == 0
    for sid in ("two", "one"):
        doc = json.loads((out / sid / "story.json").read_text())
        assert len(doc["generated"][0]["images"]) == 1, sid
        assert {k: doc["settings"][k] for k in ("penalize", "eos_ids", "mask_vokens", "render")} == \
            {"penalize": "response", "eos_ids": [2], "mask_vokens": False, "render": "first"}


OFFICIAL = DEBUG.parents[1] / "tests" / "fixtures" / "official"


@pytest.mark.skipif(not (OFFICIAL / "case.json").is_file(), reason="no official fixtures")
@pytest.mark.parametrize("case", ["text", "vist"])
def test_official_ids_are_those_the_released_code_fed(case):
    """The released code's own token ids (its slow tokenizer, transformers 4.31) for its prompts and
    targets, recorded in the fixtures, from the same sentencepiece model loaded by today's transformers
    (which writes "▁" only at a text's start): BOS, the prompt with each <ImageHere> as the image's query
    tokens, the target; ids past the vocabulary renumbered ([IMG0..7] after our image token)."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from minigpt5_cli.data.collate import Collator
    from minigpt5_cli.data.samples import Sample
    from minigpt5_cli.modeling.llm_families import Quirks
    from minigpt5_cli.modeling.vokens import voken_tokens

    facts = json.loads((OFFICIAL / "case.json").read_text())
    source, target = facts["cases"][case]["source"], facts["cases"][case]["target"]
    tok = AutoTokenizer.from_pretrained(OFFICIAL / "vicuna")
    tok.add_tokens(["<image>", *voken_tokens(8)], special_tokens=True)
    image, first, queries = len(tok) - 9, len(tok) - 8, facts["queries"]

    class Processor:  # what the collator reads of a BLIP-2 processor
        image_token, num_query_tokens = "<image>", queries

    collate = Collator(tokenizer=tok, processor=Processor(), first_voken=first, n_vokens=8, max_length=512,
                       prompt_format="official", quirks=Quirks(images_in_place=True))
    fed = load_file(OFFICIAL / "case.safetensors")
    ids, labels = fed[f"{case}.input_ids"][0].tolist(), fed[f"{case}.labels"][0].tolist()
    start = next(k for k, label in enumerate(labels) if label != -100)
    ours = {**{t: t for t in range(facts["vocab"])}, **{v: first + k for k, v in enumerate(range(400, 408))}}
    expected = [facts["bos_token_id"]]
    for t in ids[:start]:
        expected += [image] * queries if t == facts["tokens"]["<ImageHere>"] else [ours[t]]
    marked = source.replace("<ImageHere>", "<image>" * queries)
    assert collate._encode(marked, [])["input_ids"][0].tolist() == expected
    sample = Sample(target=target.split("[IMG0]")[0].strip(), vokens=True)
    assert collate._target_ids(sample) == [ours[t] for t in ids[start:]]
