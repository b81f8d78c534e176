from pathlib import Path

import pytest
import yaml

from minigpt5_cli import recipe as R
from minigpt5_cli.errors import UserError

REPO = Path(__file__).resolve().parents[1]
# recipes/accelerate/ holds accelerate's launch configs, not recipes.
ALL_RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if p.parent.name != "accelerate")
ACCELERATE_CONFIGS = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))


def test_recipes_exist():
    names = {p.relative_to(REPO / "recipes").as_posix() for p in ALL_RECIPES}
    assert {"cc3m_stage1.yaml", "vist_stage2_lora.yaml", "vist_stage2_prefix.yaml", "mmdialog_stage2_lora.yaml",
            "mmdialog_stage2_prefix.yaml", "debug/stage1.yaml", "debug/stage2_lora.yaml"} <= names


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_load_as_accelerate_reads_them(path):
    """Each config opens with its launch command and is a valid accelerate config file."""
    from accelerate.commands.config.config_args import load_config_from_file

    assert path.read_text().startswith("#") and "accelerate launch --config_file recipes/accelerate/" in path.read_text()
    config = load_config_from_file(str(path))
    assert config.distributed_type in ("MULTI_GPU", "FSDP") and config.num_processes > 1


@pytest.mark.parametrize("path", ALL_RECIPES, ids=lambda p: p.relative_to(REPO / "recipes").as_posix())
def test_every_recipe_validates(path, tmp_path):
    recipe = R.load(path)
    (tmp_path / "recipe.yaml").write_text(R.dump(recipe))
    assert R.load(tmp_path / "recipe.yaml") == recipe, "the resolved recipe, as written, loads back the same"
    assert path.read_text().startswith("#"), "a recipe opens with a comment giving its command"
    # Every key written in the file survives, with its value, into the resolved recipe.
    resolved = yaml.safe_load(R.dump(recipe))
    written = list(_leaves(yaml.safe_load(path.read_text())))
    assert written
    for key, value in written:
        found = resolved
        for part in key.split("."):
            found = found[part]
        assert found == (float(value) if isinstance(found, float) else value), key


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def test_paper_hyperparameters():
    r = R.load(REPO / "recipes" / "vist_stage2_lora.yaml")
    assert (r.adapter.r, r.adapter.alpha, r.adapter.dropout, r.adapter.target_modules) == (8, 16, 0.05, ["q_proj", "v_proj"])
    assert (r.train.lr, r.train.mapper_lr_scale, r.train.warmup_steps, r.model.n_vokens) == (2e-5, 10.0, 1000, 8)
    assert (r.loss.text, r.loss.caption, r.loss.snr_gamma, r.loss.cfg_drop) == (0.01, 0.1, 5.0, 0.1)
    assert R.load(REPO / "recipes" / "vist_stage2_prefix.yaml").adapter.virtual_tokens == 5


def test_override_splits_on_first_equals():
    r = R.load(None, ["data.train=/data/a=b.jsonl", "train.lr=1e-3", "train.mixed_precision=no",
                      "adapter.target_modules=[q_proj, k_proj]", "model.llm=007"])
    assert r.data.train == "/data/a=b.jsonl"
    assert r.train.lr == 1e-3
    assert r.train.mixed_precision == "no"
    assert r.adapter.target_modules == ["q_proj", "k_proj"]
    assert r.model.llm == "007"  # strings stay verbatim


def test_unknown_key_suggests():
    with pytest.raises(UserError, match=r"unknown recipe key 'train\.lrr'; did you mean 'train\.lr'\?"):
        R.load(None, ["train.lrr=1"])
    with pytest.raises(UserError, match="did you mean 'model.mapper.heads'"):
        R.load(None, ["model.mapper.head=4"])


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  batchsize: 4\n")
    with pytest.raises(UserError, match="train.batchsize.*did you mean 'train.batch_size'"):
        R.load(path)


@pytest.mark.parametrize("item,key", [("train.batch_size=two", "train.batch_size"), ("train.lr=fast", "train.lr"),
                                      ("model.trust_remote_code=3", "model.trust_remote_code"),
                                      ("adapter.kind=qlora", "adapter.kind"), ("train.stage=3", "train.stage")])
def test_wrong_type_names_key(item, key):
    with pytest.raises(UserError, match=f"'{key}'"):
        R.load(None, [item])


def test_bad_override_form_and_missing_recipe(tmp_path):
    with pytest.raises(UserError, match="key.sub=value"):
        R.load(None, ["train.lr"])
    with pytest.raises(UserError, match="recipe not found"):
        R.load(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="is a section"):
        R.load(None, ["train=1"])


def test_save_round_trip(tmp_path):
    r = R.load(REPO / "recipes" / "debug" / "stage2_lora.yaml", ["train.seed=7"])
    R.save(r, tmp_path / "recipe.yaml")
    assert R.load(tmp_path / "recipe.yaml") == r


def test_stage_is_a_string_written_as_recipes_write_it(tmp_path):
    """`stage: 1` (YAML's number, as recipes and the checkpoints of earlier versions write it), "1" and
    `train.stage=1` are one stage; a saved recipe writes it as recipes do."""
    path = tmp_path / "r.yaml"
    for text in ("train:\n  stage: 2\n", "train:\n  stage: '2'\n"):
        path.write_text(text)
        assert R.load(path).train.stage == "2"
    assert R.load(None, ["train.stage=2"]).train.stage == "2"
    assert R.load(None, ["train.stage=llm", "train.mixed_precision=no"]).train.stage == "llm"
    assert yaml.safe_load(R.dump(R.load(path)))["train"]["stage"] == 2
    with pytest.raises(UserError, match="'train.stage' must be one of 1, 2, llm, generator, got '3'"):
        R.load(None, ["train.stage=3"])


def test_stage1_refuses_adapter():
    with pytest.raises(UserError, match="adapter.kind=none"):
        R.load(None, ["train.stage=1", "adapter.kind=lora"])


def test_optional_and_union_types_are_checked(tmp_path):
    from dataclasses import dataclass
    from typing import Optional

    @dataclass
    class Section:
        size: Optional[int] = None
        memory: int | str = 0

    assert R._build(Section, {"size": None, "memory": "24GiB"}) == Section(None, "24GiB")
    assert R._build(Section, {"size": 3, "memory": 5}) == Section(3, 5)
    with pytest.raises(UserError, match="'size' must be int or null"):
        R._build(Section, {"size": "big"})


def test_scratch_stages_refuse_mixed_precision():
    with pytest.raises(UserError, match="trains in float32: set train.mixed_precision=no"):
        R.load(REPO / "recipes" / "toy" / "generator.yaml", ["train.mixed_precision=bf16"])


def _error(path: Path, text: str) -> str:
    path.write_text(text)
    with pytest.raises(UserError) as e:
        R.load(path)
    return str(e.value)


def test_deep_nesting_is_one_error(tmp_path):
    path = tmp_path / "r.yaml"
    assert _error(path, "[" * 100_000) == f"recipe {path} is not valid YAML: nested too deeply"
    with pytest.raises(UserError, match="recipe key 'train.lr' must be float, got '\\[\\[\\["):
        R.load(None, ["train.lr=" + "[" * 100_000])


def test_aliases_are_refused(tmp_path):
    """Aliases nested a few deep (a "billion laughs") expand into gigabytes; a recipe needs none."""
    message = _error(tmp_path / "r.yaml", "train:\n  output_dir: &out runs/x\ndata:\n  train: *out\n")
    assert message == f"recipe {tmp_path / 'r.yaml'} line 4: YAML aliases (*out) are not supported in a recipe; " \
        "write the value out"
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))
    assert "line 2: YAML aliases (*a)" in _error(tmp_path / "r.yaml", laughs)
    with pytest.raises(UserError, match="'adapter.target_modules' must be a list, got '\\[&a"):
        R.load(None, ["adapter.target_modules=[&a [q_proj], *a]"])


def test_values_in_messages_are_cut_short(tmp_path):
    message = _error(tmp_path / "r.yaml", f"train:\n  seed: {'x' * 100_000}\n")
    assert message.startswith("recipe key 'train.seed' must be int, got 'xxx") and message.endswith("...")
    assert len(message) < 150
    for override in ("train.seed=" + "1" * 5000, "train.mixed_precision=" + "y" * 5000, "x" * 5000):
        with pytest.raises(UserError) as e:
            R.load(None, [override])
        assert len(str(e.value)) < 200, override


def test_values_yaml_cannot_build(tmp_path):
    """A date that does not exist and an integer too long to convert fail inside the YAML reader."""
    assert _error(tmp_path / "r.yaml", "train:\n  output_dir: 2024-02-30\n").endswith(
        "is not valid YAML: day is out of range for month")
    message = _error(tmp_path / "r.yaml", f"train:\n  seed: {'1' * 5000}\n")
    assert message.endswith("is not valid YAML: Exceeds the limit (4300 digits) for integer string conversion: "
                            "value has 5000 digits")


def test_large_recipe_is_refused_unread(tmp_path):
    from minigpt5_cli.files import MAX_RECIPE

    path = tmp_path / "r.yaml"
    with path.open("wb") as f:
        f.truncate(2 * MAX_RECIPE)  # sparse: no disk used
    with pytest.raises(UserError, match=f"^{path} is too large \\(2 MiB; at most 1 MiB is read\\)$"):
        R.load(path)
