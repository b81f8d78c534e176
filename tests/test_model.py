import pytest
import torch

from minigpt5_cli import recipe as R
from minigpt5_cli.data.collate import Collator
from minigpt5_cli.data.samples import TrainSet
from minigpt5_cli.data.sources import read_jsonl
from minigpt5_cli.modeling import checkpoint
from minigpt5_cli.modeling.mapper import FeatureMapper
from minigpt5_cli.modeling.params import paper_counts
from minigpt5_cli.training.train import model_for

from conftest import DEBUG


def make(stage=1, adapter="none", llm="tiny:llava", extra=()):
    name = "stage1.yaml" if stage == 1 else f"stage2_{adapter}.yaml"
    data = DEBUG / "data" / ("pairs.jsonl" if stage == 1 else "sequences.jsonl")
    recipe = R.load(DEBUG / name, [f"model.llm={llm}", f"data.train={data}", *extra])
    return recipe, model_for(recipe)


def batch_for(model, recipe, size=4):
    records = read_jsonl(recipe.data.train, recipe.train.stage)
    ds = TrainSet(records, stage=recipe.train.stage, resolution=model.generator.resolution,
                  history=recipe.data.history, seed=0, instruction_prob=recipe.data.instruction_prob,
                  images_in_prompt=model.llm_info.accepts_images)
    return Collator.for_model(model, recipe.data)([ds[i] for i in range(min(size, len(ds)))])


@pytest.mark.parametrize("llm", ["tiny:llava", "tiny:llama"])
def test_vokens_added_with_mean_rows(llm):
    recipe, model = make(llm=llm)
    tok, n = model.tokenizer, recipe.model.n_vokens
    ids = tok.convert_tokens_to_ids([f"[IMG{i}]" for i in range(n)])
    assert ids == list(range(model.first_voken, model.first_voken + n))
    base = model.llm.get_input_embeddings().weight
    mean = base[:model.first_voken].mean(0)
    torch.testing.assert_close(model.vokens.rows_in, mean.expand(n, -1))
    # Only voken rows train: the embedding and LM head matrices stay frozen.
    assert not base.requires_grad and not model.llm.get_output_embeddings().weight.requires_grad
    assert sum(p.numel() for p in model.trainable_groups()["vokens"]) == 2 * n * base.shape[1]


def test_voken_hooks_route_rows_into_embeddings_and_logits():
    _, model = make()
    with torch.no_grad():
        model.vokens.rows_in[0] = 3.0
        model.vokens.rows_out[1] = 0.0
    ids = torch.tensor([[1, model.first_voken, model.first_voken + 1]])
    emb = model.llm.get_input_embeddings()(ids)
    assert torch.all(emb[0, 1] == 3.0) and not torch.all(emb[0, 0] == 3.0)
    logits = model.llm(input_ids=ids).logits
    assert torch.all(logits[..., model.first_voken + 1] == 0.0)


@pytest.mark.parametrize("stage,adapter,llm", [(1, "none", "tiny:llava"), (1, "none", "tiny:llama"),
                                               (2, "lora", "tiny:llava"), (2, "prefix", "tiny:llava"),
                                               (2, "lora", "tiny:llama")])
def test_step_changes_exactly_the_trainable_tensors(stage, adapter, llm):
    extra = ["loss.cfg_drop=0.0"]
    recipe, model = make(stage, adapter, llm, extra)
    assert recipe.train.freeze_mapper_input == (stage == 2)  # the debug stage-2 recipes freeze fc and queries
    batch = batch_for(model, recipe)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {"vokens", "mapper"} | ({"adapter"} if adapter != "none" else set())
    assert {k for k, v in model.trainable_groups().items() if v} == expected
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(batch)["loss"].backward()
    opt.step()
    after = dict(model.named_parameters())
    frozen_changed = [n for n in before if n not in trainable and not torch.equal(before[n], after[n])]
    trainable_same = [n for n in trainable if torch.equal(before[n], after[n])]
    assert frozen_changed == []
    assert trainable_same == []
    frozen_input = {n for n in before if n.startswith(("mapper.fc.", "mapper.queries"))}
    assert frozen_input and (frozen_input <= trainable) == (stage == 1)
    assert all(torch.equal(before[n], after[n]) for n in frozen_input) == (stage == 2)


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_mapper_input_freezes_exactly_fc_and_queries(freeze):
    _, model = make(2, "lora", extra=[f"train.freeze_mapper_input={str(freeze).lower()}"])
    frozen = {n for n, p in model.mapper.named_parameters() if not p.requires_grad}
    expected = {n for n, _ in model.mapper.named_parameters() if n.startswith(("fc.", "queries"))}
    assert frozen == (expected if freeze else set()) and expected


@pytest.mark.parametrize("stage,adapter", [(1, "none"), (2, "lora")])
def test_loss_falls_when_overfitting_one_batch(stage, adapter):
    recipe, model = make(stage, adapter, extra=["loss.cfg_drop=0.0"])
    batch = batch_for(model, recipe)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    history = []
    for _ in range(40):
        torch.manual_seed(0)  # the same noise and timesteps each step: a true overfit
        out = model(batch)
        history.append({k: v.item() for k, v in out.items()})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    first, last = history[0], history[-1]
    parts = ["loss", "text", "image"] + (["caption"] if stage == 1 else [])
    assert all(last[k] < first[k] for k in parts), (first, last)
    assert last["loss"] < 0.95 * first["loss"], (first, last)
    if stage == 1:  # the text and caption targets are easy for vokens + mapper to fit
        assert last["text"] < 0.7 * first["text"] and last["caption"] < 0.3 * first["caption"], (first, last)


def test_text_labels_supervise_first_voken_only():
    recipe, model = make()
    batch = batch_for(model, recipe, size=2)
    ids, labels = batch["input_ids"], batch["labels"]
    first, n = model.first_voken, recipe.model.n_vokens
    assert torch.all(labels[ids == first] == first)
    later = (ids > first) & (ids < first + n)
    assert later.sum() == 2 * (n - 1) and torch.all(labels[later] == -100)
    states = model.voken_states(torch.arange(ids.numel()).view(*ids.shape, 1).float(), ids)
    row, col = (ids == first).nonzero()[0]
    assert states.shape == (2, n, 1)
    assert states[0, :, 0].tolist() == [float(row * ids.shape[1] + col - 1 + i) for i in range(n)]


@pytest.mark.parametrize("kind", ["paper", "compact"])
def test_mapper_shapes_and_round_trip(kind, tmp_path):
    mapper = FeatureMapper(llm_width=24, cond_len=5, cond_width=16, kind=kind, heads=4, encoder_layers=1,
                           decoder_layers=1, ffn=32)
    x = torch.randn(3, 8, 24)
    seq, pooled = mapper(x)
    assert seq.shape == (3, 5, 16) and pooled is None
    mapper.save_pretrained(tmp_path / "m")
    loaded = FeatureMapper.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(loaded(x)[0], seq)
    with_pooled = FeatureMapper(llm_width=24, cond_len=5, cond_width=16, kind=kind, heads=4, encoder_layers=1,
                                decoder_layers=1, ffn=32, pooled_width=12)
    assert with_pooled(x)[1].shape == (3, 12)  # SDXL and SD3 take a pooled vector beside the sequence


def test_paper_counts_match_the_architecture():
    d, w, length = 4096, 1024, 77
    fc = d * w + w + w * w + w
    attn, ffn, norm = 4 * w * w + 4 * w, 2 * w * 4096 + 4096 + w, 2 * w
    encoder = 4 * (attn + ffn + 2 * norm) + norm
    decoder = 4 * (2 * attn + ffn + 3 * norm) + norm
    counts = paper_counts("paper", "lora", 8)
    assert counts["mapper"] == fc + encoder + decoder + length * w
    assert counts["adapter"] == 32 * 2 * 8 * (d + d)  # LoRA r=8 on q and v of 32 layers
    assert counts["vokens"] == 2 * 8 * d
    assert 120e6 < counts["mapper"] < 125e6  # the paper's "about 123M"


def test_checkpoint_round_trip(tmp_path):
    recipe, model = make(2, "lora")
    with torch.no_grad():
        for p in (p for ps in model.trainable_groups().values() for p in ps):
            p.add_(torch.randn_like(p))
    checkpoint.save(model, tmp_path / "ckpt")
    _, fresh = make(2, "lora")
    checkpoint.load(fresh, tmp_path / "ckpt")
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), name


def test_bf16_keeps_frozen_parts_low_and_trainables_fp32():
    recipe, model = make(2, "lora", extra=["train.mixed_precision=bf16"])
    assert model.generator.denoiser.dtype == torch.bfloat16 and model.llm.get_input_embeddings().weight.dtype == torch.bfloat16
    for name, params in model.trainable_groups().items():
        assert params and all(p.dtype == torch.float32 for p in params), name
    batch = batch_for(model, recipe)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(p.grad is not None for ps in model.trainable_groups().values() for p in ps)


@pytest.mark.parametrize("part,key", [("adapter/adapter_model.safetensors", None), ("mapper", "queries"),
                                      ("vokens.safetensors", "rows_out")])
def test_a_checkpoint_missing_a_tensor_is_refused(tmp_path, part, key):
    from safetensors.torch import load_file, save_file

    from minigpt5_cli.errors import UserError

    _, model = make(2, "lora")
    checkpoint.save(model, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / part
    path = path / "diffusion_pytorch_model.safetensors" if path.is_dir() else path
    state = load_file(path)
    state.pop(key or sorted(state)[0])
    save_file(state, path)
    _, fresh = make(2, "lora")
    with pytest.raises(UserError, match="does not fit"):
        checkpoint.load(fresh, tmp_path / "ckpt")


@pytest.mark.parametrize("stage,adapter", [(1, "none"), (2, "lora")])
def test_gradient_checkpointing_keeps_gradients_and_saves_memory(stage, adapter):
    """Checkpointed LLM layers and UNet blocks give the same gradients while keeping fewer tensors for
    the backward pass (counted with saved-tensor hooks)."""
    grads, kept = {}, {}
    for on in (False, True):
        extra = [f"train.gradient_checkpointing={str(on).lower()}", "train.mixed_precision=no"]
        with torch.random.fork_rng():
            torch.manual_seed(0)
            recipe, model = make(stage, adapter, extra=extra)
        batch = batch_for(model, recipe)
        model.train()
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        torch.manual_seed(1)  # the same noise, timesteps, dropout and guidance drops both times
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(batch)["loss"]
        loss.backward()
        kept[on] = sum(saved)
        grads[on] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert kept[True] < 0.8 * kept[False], kept


def test_fsdp_wraps_the_layers_that_run_every_step():
    """The LLM's decoder layers and the UNet's blocks; not the vision tower, text encoder or VAE, which
    run for some batches only (a sharded layer must run on every process at every step)."""
    _, model = make(2, "lora")
    wrapped = set(model._no_split_modules)
    assert "LlamaDecoderLayer" in wrapped and {"CrossAttnDownBlock2D", "UpBlock2D"} <= wrapped
    kinds = {type(m).__name__ for part in (model.llm_info.model.get_base_model().model.vision_tower,
                                           model.generator.vae, model.frozen["text_encoder"]) for m in part.modules()}
    assert not wrapped & kinds, wrapped & kinds
