"""Length-grouped batches (`data.group_by_length`): mega-batches of optimizer steps sorted longest first,
the longest first of all; the order follows from the epoch, so a run resumes exactly, and N processes
take the batches one process takes with N times the accumulation."""

import itertools
import json
import random
import shutil
from types import SimpleNamespace

import pytest
import torch
from accelerate.data_loader import prepare_data_loader, skip_first_batches

from minigpt5_cli import recipe as R
from minigpt5_cli.data.batching import MULT, GroupedSampler, grouped, lengths
from minigpt5_cli.data.collate import Collator
from minigpt5_cli.data.samples import TrainSet
from minigpt5_cli.data.sources import load_source, load_sources
from minigpt5_cli.modeling.checkpoint import checkpoints
from minigpt5_cli.modeling.model import MiniGPT5
from minigpt5_cli.training import train as train_module
from minigpt5_cli.training.train import model_for

from conftest import DEBUG, launch, run_cli
from test_fsdp import close
from test_train import interrupt_after_saving, weights

LENGTHS = [random.Random(i).randrange(10, 3000) for i in range(48)]


def test_mega_batches_are_sorted_longest_first_and_the_longest_leads():
    step = 2
    order = grouped(LENGTHS, step, seed=7)
    assert sorted(order) == list(range(len(LENGTHS)))
    size = step * (len(LENGTHS) // (4 * step))  # under 4 mega-batches of MULT steps: fewer steps, as HF's Trainer
    assert size < step * MULT
    megas = [order[i:i + size] for i in range(0, len(order), size)]
    assert len(megas) == 4
    for mega in megas:
        assert [LENGTHS[i] for i in mega] == sorted((LENGTHS[i] for i in mega), reverse=True)
    assert LENGTHS[order[0]] == max(LENGTHS)
    assert order == grouped(LENGTHS, step, seed=7) and order != grouped(LENGTHS, step, seed=8)
    # the mega-batches hold the plain shuffle's samples: torch.randperm seeded as accelerate seeds it
    shuffle = torch.randperm(len(LENGTHS), generator=torch.Generator().manual_seed(7)).tolist()
    assert sorted(map(sorted, megas)) == sorted(sorted(shuffle[i:i + size]) for i in range(0, len(shuffle), size))


def micro_batches(processes: int, accum: int, process: int, start: int, count: int) -> list[list[int]]:
    """Micro-batches `start` to `start + count` of one process, as train._batches takes them from the
    loader accelerate prepares for `processes` processes (samples by index)."""
    t = R.TrainConfig(batch_size=2, grad_accum=accum, seed=3)
    loader = torch.utils.data.DataLoader(range(len(LENGTHS)), batch_size=t.batch_size, collate_fn=list,
                                         sampler=GroupedSampler(LENGTHS, t, processes))
    loader = prepare_data_loader(loader, num_processes=processes, process_index=process, put_on_device=False,
                                 use_seedable_sampler=True, data_seed=t.seed)
    batches = train_module._batches(SimpleNamespace(skip_first_batches=skip_first_batches), loader, start)
    return list(itertools.islice(batches, count))


def test_two_processes_take_the_steps_of_one_process_with_twice_the_accumulation():
    steps = 13  # 6 steps an epoch: three epochs begun
    one = micro_batches(1, 4, 0, 0, 4 * steps)
    two = [micro_batches(2, 2, r, 0, 2 * steps) for r in (0, 1)]
    # accelerate deals the batches out in turn: micro-batch i of process r is batch 2i + r
    assert [two[r][i] for i in range(2 * steps) for r in (0, 1)] == one
    epochs = [list(itertools.chain(*one[e * 24:(e + 1) * 24])) for e in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(len(LENGTHS))) and epochs[0] != epochs[1]
    assert epochs[0] == grouped(LENGTHS, 8, 3) and epochs[1] == grouped(LENGTHS, 8, 4)  # seeded by the epoch
    # a resumed run, mid-epoch or at an epoch's start, goes on with the same batches
    for start in (5, 12, 19):
        assert micro_batches(2, 2, 1, start, 6) == two[1][start:start + 6]


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    """Stage-2 stories of 2 to 4 steps, their texts 1 to 30 words long, images in some steps."""
    root = tmp_path_factory.mktemp("stories")
    shutil.copytree(DEBUG / "data" / "images", root / "images")
    pictures = sorted(p.name for p in (root / "images").iterdir())
    rng = random.Random(0)
    with (root / "stories.jsonl").open("w") as f:
        for s in range(10):
            steps = [{"text": " ".join(["a red circle moves to the right"] * rng.randrange(1, 6))}
                     for _ in range(rng.randrange(2, 5))]
            for step in steps:
                if rng.random() < 0.6:
                    step["image"] = f"images/{rng.choice(pictures)}"
            f.write(json.dumps({"id": f"s{s}", "steps": steps}) + "\n")
    return root / "stories.jsonl"


def grouped_args(out, data, *extra):
    return ["train", "--recipe", str(DEBUG / "stage2_lora.yaml"), f"data.train={data}", f"train.output_dir={out}",
            "train.init_from=none", "data.group_by_length=true", "train.batch_size=1", "train.warmup_steps=1",
            "train.save_every=2", "adapter.dropout=0.3", "data.tasks=[gen,multimodal,understanding]", *extra]


def train_set(recipe: R.Recipe, model) -> TrainSet:
    """The stage-2 samples of `recipe`'s data, as train builds them."""
    return TrainSet(load_sources([recipe.data.train], "2"), stage="2", resolution=model.generator.resolution,
                    history=recipe.data.history, seed=0, instruction_prob=0.0, images_in_prompt=True,
                    tasks=recipe.data.tasks)


def test_estimated_lengths_follow_the_collated_ones(stories):
    recipe = R.load(DEBUG / "stage2_lora.yaml", [f"data.train={stories}", "data.tasks=[gen,multimodal,understanding]"])
    model = model_for(recipe)
    dataset = train_set(recipe, model)
    collate = Collator.for_model(model, recipe.data)
    estimate = lengths(dataset, collate)
    exact = [len(collate.encode(dataset[i])[1]) for i in range(len(dataset))]
    assert len(set(exact)) > 10
    # within a tenth of the collated count, and in its order but for near ties
    assert all(abs(e - x) <= 0.1 * x for e, x in zip(estimate, exact)), list(zip(estimate, exact))
    ranks = sorted(range(len(exact)), key=lambda i: estimate[i])
    assert not any(exact[a] > exact[b] + 8 for a, b in itertools.pairwise(ranks))


def test_a_prepared_dataset_gives_the_characters_its_stories_give(stories, tmp_path):
    """Read from a prepared dataset's Arrow columns (no image copied), a continuation set's target
    last, the texts' characters are those of the stories it holds."""
    import datasets

    from minigpt5_cli.data.batching import _chars

    folder = tmp_path / "prepared"
    records = [json.loads(line) for line in stories.read_text().splitlines()]
    steps = [[{"text": s["text"], "image": None} for s in r["steps"]] for r in records]
    datasets.Dataset.from_list([{"id": r["id"], "steps": s[:-1], "target": s[-1]}
                                for r, s in zip(records, steps)]).save_to_disk(str(folder))
    (folder / "summary.json").write_text("{}")
    assert _chars(load_source(folder, "2")) == _chars(load_source(stories, "2"))
    assert _chars(load_source(stories, "2")) == [[len(s["text"]) for s in r["steps"]] for r in records]


def test_grouped_training_resumes_exactly(stories, tmp_path, monkeypatch):
    """4 steps straight == 2 steps, interruption, --resume, 2 steps; the batches are grouped: the first
    micro-batch holds the longest sample, and its mega-batch runs longest first."""
    seen, forward = [], MiniGPT5.forward
    monkeypatch.setattr(MiniGPT5, "forward", lambda self, batch: seen.append(batch["input_ids"].shape[1])
                        or forward(self, batch))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = ("train.grad_accum=2", "train.max_steps=4")
    assert run_cli(*grouped_args(straight, stories, *extra)) == 0
    recipe = R.load(straight / "recipe.yaml")
    model = model_for(recipe)
    dataset = train_set(recipe, model)
    longest = max(len(Collator.for_model(model, recipe.data).encode(dataset[i])[1]) for i in range(len(dataset)))
    size = 2 * max(1, min(MULT, len(dataset) // 8))
    assert seen[0] == longest and seen[:size] == sorted(seen[:size], reverse=True), seen

    real_save = interrupt_after_saving(monkeypatch, 2)
    assert run_cli(*grouped_args(resumed, stories, *extra)) != 0  # Ctrl-C ends the run
    assert [p.name for p in checkpoints(resumed)] == ["checkpoint-2"]
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    seen.clear()
    assert run_cli(*grouped_args(resumed, stories, *extra), "--resume") == 0
    a, b = weights(straight / "checkpoint-4"), weights(resumed / "checkpoint-4")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(seen) == 4


def test_grouped_on_two_processes_trains_what_one_process_trains(stories, tmp_path):
    extra = ("train.mixed_precision=no", "train.max_steps=4")
    assert run_cli(*grouped_args(tmp_path / "one", stories, "train.grad_accum=4", *extra)) == 0
    proc = launch(*grouped_args(tmp_path / "two", stories, "train.grad_accum=2", *extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    two, earlier = weights(tmp_path / "two" / "checkpoint-4"), weights(tmp_path / "two" / "checkpoint-2")
    close(two, weights(tmp_path / "one" / "checkpoint-4"), earlier)
