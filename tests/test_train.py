import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minigpt5_cli import recipe as R
from minigpt5_cli.training import train as train_module
from minigpt5_cli.modeling.model import build_model
from minigpt5_cli.modeling import checkpoint
from minigpt5_cli.modeling.checkpoint import checkpoints

from conftest import DEBUG, REPO, run_cli

PAIRS = DEBUG / "data" / "pairs.jsonl"
SEQS = DEBUG / "data" / "sequences.jsonl"


def stage1_args(out, *extra):
    return ["train", "--recipe", str(DEBUG / "stage1.yaml"), f"data.train={PAIRS}", f"train.output_dir={out}", *extra]


def stage2_args(out, init, kind="lora", *extra):
    return ["train", "--recipe", str(DEBUG / f"stage2_{kind}.yaml"), f"data.train={SEQS}",
            f"train.output_dir={out}", f"train.init_from={init}", *extra]


def weights(folder: Path) -> dict:
    found = dict(load_file(folder / "vokens.safetensors"))
    found.update({f"mapper.{k}": v for k, v in load_file(folder / "mapper" / "diffusion_pytorch_model.safetensors").items()})
    if (folder / "adapter").is_dir():
        found.update({f"adapter.{k}": v for k, v in load_file(folder / "adapter" / "adapter_model.safetensors").items()})
    return found


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    assert run_cli(*stage1_args(out)) == 0
    return out


def test_stage1_writes_rotating_checkpoints_that_reload(stage1_run):
    found = checkpoints(stage1_run)
    assert [p.name for p in found] == ["checkpoint-2", "checkpoint-4"]
    last = found[-1]
    assert {p.name for p in last.iterdir()} >= {"vokens.safetensors", "mapper", "recipe.yaml", "minigpt5.json", "optimizer.bin"}
    assert not list(last.glob("*.safetensors"))[1:], "only the trained weights are written"
    recipe = R.load(last / "recipe.yaml")
    assert recipe.train.output_dir == str(stage1_run)
    model = build_model(recipe)
    before = {k: v.clone() for k, v in model.vokens.state_dict().items()}
    checkpoint.load(model, last)
    saved = weights(last)
    assert torch.equal(model.vokens.rows_in, saved["rows_in"])
    assert not torch.equal(before["rows_in"], saved["rows_in"]), "training changed the voken rows"


@pytest.mark.parametrize("kind", ["lora", "prefix"])
def test_stage2_from_stage1(stage1_run, tmp_path, kind):
    out = tmp_path / kind
    assert run_cli(*stage2_args(out, stage1_run, kind)) == 0
    last = checkpoints(out)[-1]
    assert (last / "adapter" / "adapter_config.json").is_file()
    config = json.loads((last / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == {"lora": "LORA", "prefix": "PREFIX_TUNING"}[kind]
    # fc and queries come from stage 1 and stay frozen; the rest of the mapper trained on.
    s1, s2 = weights(checkpoints(stage1_run)[-1]), weights(last)
    assert torch.equal(s1["mapper.queries"], s2["mapper.queries"])
    assert not torch.equal(s1["mapper.out.weight"] if "mapper.out.weight" in s1 else s1["mapper.transformer.decoder.norm.weight"],
                           s2["mapper.out.weight"] if "mapper.out.weight" in s2 else s2["mapper.transformer.decoder.norm.weight"])
    model = build_model(R.load(last / "recipe.yaml"))
    checkpoint.load(model, last)


def test_resume_equals_straight_run(tmp_path, monkeypatch):
    """4 steps straight == 2 steps, interruption, --resume, 2 steps (stage 2 with LoRA dropout)."""
    init = tmp_path / "s1"
    assert run_cli(*stage1_args(init, "train.max_steps=2")) == 0
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # batch 1 and 2 accumulation steps: the resume lands mid-epoch and mid-shuffle
    extra = ("train.batch_size=1", "train.grad_accum=2", "train.warmup_steps=1", "adapter.dropout=0.3")
    assert run_cli(*stage2_args(straight, init, "lora", *extra)) == 0

    real_save = train_module.save_checkpoint

    def save_then_interrupt(accelerator, model, optimizer, scheduler, recipe, step):
        folder = real_save(accelerator, model, optimizer, scheduler, recipe, step)
        if step == 2:
            raise KeyboardInterrupt
        return folder

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_interrupt)
    assert run_cli(*stage2_args(resumed, init, "lora", *extra)) != 0  # Ctrl-C ends the run
    assert [p.name for p in checkpoints(resumed)] == ["checkpoint-2"]
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    assert run_cli(*stage2_args(resumed, init, "lora", *extra), "--resume") == 0

    a, b = weights(straight / "checkpoint-4"), weights(resumed / "checkpoint-4")
    assert a.keys() == b.keys() and len(a) > 3
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    # and the run really moved between step 2 and 4
    mid = weights(straight / "checkpoint-2")
    assert any(not torch.equal(mid[k], a[k]) for k in a)


def test_a_checkpoint_with_position_keyed_optimizer_state_resumes(tmp_path):
    """Checkpoints written before optimizer state was keyed by parameter name (torch's own
    `optimizer.state_dict()`, keyed by position) resume to the same weights."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = ("train.max_steps=4", "train.save_every=2")
    assert run_cli(*stage1_args(straight, *extra)) == 0
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copy(straight / "recipe.yaml", resumed / "recipe.yaml")
    named = torch.load(resumed / "checkpoint-2" / "optimizer.bin", weights_only=False)
    order = [name for group in named["param_groups"] for name in group["params"]]
    assert order and all(isinstance(n, str) for n in order)
    position = {name: i for i, name in enumerate(order)}
    torch.save({"state": {position[k]: v for k, v in named["state"].items()},
                "param_groups": [{**g, "params": [position[n] for n in g["params"]]} for g in named["param_groups"]]},
               resumed / "checkpoint-2" / "optimizer.bin")
    assert run_cli(*stage1_args(resumed, *extra), "--resume") == 0
    a, b = weights(straight / "checkpoint-4"), weights(resumed / "checkpoint-4")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_write_one_loadable_checkpoint(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "minigpt5_cli", *stage1_args(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done:") == 1, "one process reports and writes"
    last = checkpoints(out)[-1]
    assert last.name == "checkpoint-4"
    assert {p.name for p in last.iterdir()} >= {"optimizer.bin", "scheduler.bin", "vokens.safetensors", "mapper"}
    assert not list(out.glob(".checkpoint-*")), "no half-written checkpoint is left"
    model = build_model(R.load(last / "recipe.yaml"))
    checkpoint.load(model, last)


def test_a_multi_gpu_config_without_gpus_is_refused(tmp_path):
    """recipes/accelerate/ddp.yaml on a machine with no GPU: the processes cannot form a group, and
    would each train alone into the same folder. They stop with one line; nothing is written."""
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs the config asks for")
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "recipes/accelerate/ddp.yaml"),
           "--num_processes", "2", "-m", "minigpt5_cli", *stage1_args(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=REPO, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: accelerate started 2 processes")]
    assert ours, proc.stderr[-2000:]  # the first to stop has the others stopped by the launcher
    assert 'minigpt5_cli/' not in proc.stderr  # accelerate's report of the failed processes only, no trace of ours
    assert not checkpoints(tmp_path / "run")


def _error(capsys, *argv) -> str:
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("error: ")
    return last


def test_bad_input_gives_one_line_and_exit_2(tmp_path, capsys, stage1_run):
    assert "recipe not found" in _error(capsys, "train", "--recipe", str(tmp_path / "missing.yaml"))
    assert "data file not found" in _error(capsys, *stage1_args(tmp_path / "o1", f"data.train={tmp_path}/none.jsonl"))
    assert "did you mean 'train.lr'" in _error(capsys, *stage1_args(tmp_path / "o2", "train.lrr=1"))

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"not a png")
    (bad / "pairs.jsonl").write_text(json.dumps({"caption": "a red circle", "image": "x.png"}) + "\n")
    assert "image does not decode" in _error(capsys, *stage1_args(tmp_path / "o3", f"data.train={bad}/pairs.jsonl"))

    (bad / "broken.jsonl").write_text("{not json\n")
    assert "line 1: not valid JSON" in _error(capsys, *stage1_args(tmp_path / "o4", f"data.train={bad}/broken.jsonl"))

    # a stage-1 checkpoint trained on tiny:llava cannot seed a stage 2 on tiny:llama
    err = _error(capsys, *stage2_args(tmp_path / "o5", stage1_run, "lora", "model.llm=tiny:llama"))
    assert "made for other backbones" in err

    assert "already holds checkpoints" in _error(capsys, *stage1_args(stage1_run))


def test_tensorboard_tracker_writes_events(tmp_path):
    out = tmp_path / "tb"
    assert run_cli(*stage1_args(out, "train.tracker=tensorboard", "train.max_steps=1")) == 0
    assert list(out.rglob("events.out.tfevents.*"))


def test_module_entry_point_lists_commands():
    proc = subprocess.run([sys.executable, "-m", "minigpt5_cli", "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0
    for name in ("prepare-data", "train", "generate", "evaluate"):
        assert name in proc.stdout


def test_logged_losses_are_the_mean_over_accumulated_micro_batches(tmp_path, monkeypatch):
    from accelerate import Accelerator

    from minigpt5_cli.modeling.model import MiniGPT5

    forward, calls, logged = MiniGPT5.forward, [], []

    def counted(self, batch):
        out = forward(self, batch)
        calls.append(1)
        return {**out, "text": torch.tensor(float(len(calls)))}  # micro-batch k reports text loss k

    monkeypatch.setattr(MiniGPT5, "forward", counted)
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, **kw: logged.append((step, values)))
    assert run_cli(*stage1_args(tmp_path / "run", "train.grad_accum=2", "train.max_steps=2")) == 0
    assert [(step, values["text"]) for step, values in logged] == [(1, 1.5), (2, 3.5)]


def test_a_diverging_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    from minigpt5_cli.modeling.model import MiniGPT5

    forward, calls = MiniGPT5.forward, []

    def diverging(self, batch):
        out = forward(self, batch)
        calls.append(1)
        return {**out, "loss": out["loss"] * float("nan")} if len(calls) >= 3 else out

    monkeypatch.setattr(MiniGPT5, "forward", diverging)
    out = tmp_path / "run"
    assert run_cli(*stage1_args(out, "train.max_steps=4", "train.save_every=2")) == 2
    assert f"the last good checkpoint is {out / 'checkpoint-2'}" in capsys.readouterr().err
    assert [p.name for p in checkpoints(out)] == ["checkpoint-2"]
    assert all(torch.isfinite(v).all() for v in weights(out / "checkpoint-2").values())
