import dataclasses
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minigpt5_cli import recipe as R
from minigpt5_cli.modeling import checkpoint
from minigpt5_cli.modeling.checkpoint import checkpoints
from minigpt5_cli.training import train as train_module
from minigpt5_cli.training.loop import IN_USE
from minigpt5_cli.training.train import model_for

from conftest import DEBUG, REPO, run_cli

PAIRS = DEBUG / "data" / "pairs.jsonl"
SEQS = DEBUG / "data" / "sequences.jsonl"


def stage1_args(out, *extra):
    return ["train", "--recipe", str(DEBUG / "stage1.yaml"), f"data.train={PAIRS}", f"train.output_dir={out}", *extra]


def stage2_args(out, init, kind="lora", *extra):
    return ["train", "--recipe", str(DEBUG / f"stage2_{kind}.yaml"), f"data.train={SEQS}",
            f"train.output_dir={out}", f"train.init_from={init}", *extra]


def interrupt_after_saving(monkeypatch, at: int):
    """Training is interrupted (as by Ctrl-C) right after it saves step `at`; returns the real save."""
    real_save = train_module.save_checkpoint

    def save_then_interrupt(accelerator, model, optimizer, scheduler, recipe, step):
        folder = real_save(accelerator, model, optimizer, scheduler, recipe, step)
        if step == at:
            raise KeyboardInterrupt
        return folder

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_interrupt)
    return real_save


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
    assert {p.name for p in last.iterdir()} >= {"vokens.safetensors", "mapper", "recipe.yaml", "minigpt5.json",
                                                "optimizer.json", "optimizer.safetensors", "scheduler.json"}
    assert not list(last.glob("*.bin")), "nothing is pickled"
    assert sorted(p.name for p in last.glob("*.safetensors")) == ["optimizer.safetensors", "vokens.safetensors"], \
        "only the trained weights are written"
    recipe = R.load(last / "recipe.yaml")
    assert recipe.train.output_dir == str(stage1_run)
    model = model_for(recipe)
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
    model = model_for(R.load(last / "recipe.yaml"))
    checkpoint.load(model, last)


def test_resume_equals_straight_run(tmp_path, monkeypatch):
    """4 steps straight == 2 steps, interruption, --resume, 2 steps (stage 2 with LoRA dropout)."""
    init = tmp_path / "s1"
    assert run_cli(*stage1_args(init, "train.max_steps=2")) == 0
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # batch 1 and 2 accumulation steps: the resume lands mid-epoch and mid-shuffle
    extra = ("train.batch_size=1", "train.grad_accum=2", "train.warmup_steps=1", "adapter.dropout=0.3")
    assert run_cli(*stage2_args(straight, init, "lora", *extra)) == 0

    real_save = interrupt_after_saving(monkeypatch, 2)
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


# `minigpt5 ARGV` in which step 3 waits, once steps 1 and 2 are done, until a signal ends it; it writes
# the file MARKER when it starts waiting.
HELD = """
import sys, time
from pathlib import Path
from minigpt5_cli.cli import main
from minigpt5_cli.modeling.model import MiniGPT5

forward, calls, marker = MiniGPT5.forward, [], Path(sys.argv[1])

def held(self, batch):
    calls.append(1)
    if len(calls) == 3:
        marker.touch()
        while True:
            time.sleep(0.01)
    return forward(self, batch)

MiniGPT5.forward = held
sys.argv[1:] = sys.argv[2:]
main()
"""


def files_in(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_sigterm_saves_the_last_finished_step_and_resume_continues(tmp_path, capsys):
    """SIGTERM (a cluster preempting the job) in step 3 keeps step 2, as Ctrl-C does, and --resume ends
    where a straight run ends. While the run lives, a second run into its folder is refused."""
    straight, run, marker = tmp_path / "straight", tmp_path / "run", tmp_path / "waiting"
    extra = ("train.max_steps=4", "train.save_every=10")  # no checkpoint before step 4 but the one SIGTERM makes
    assert run_cli(*stage1_args(straight, *extra)) == 0
    proc = subprocess.Popen([sys.executable, "-c", HELD, str(marker), *stage1_args(run, *extra)], cwd=REPO,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        while not marker.exists() and proc.poll() is None:
            time.sleep(0.1)
        assert marker.exists(), proc.communicate()[1][-3000:]
        before = files_in(run)
        capsys.readouterr()
        assert run_cli(*stage1_args(run, *extra)) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"error: {run} is in use by another train run; wait for it to end, or pick another train.output_dir"]
        assert files_in(run) == before
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=600)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "interrupted: saved" in err and err.strip().splitlines()[-1] == "terminated", err[-3000:]
    assert [p.name for p in checkpoints(run)] == ["checkpoint-2"]
    assert run_cli(*stage1_args(run, *extra), "--resume") == 0
    a, b = weights(straight / "checkpoint-4"), weights(run / "checkpoint-4")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_stops_a_scratch_stage_as_ctrl_c_does(tmp_path, monkeypatch):
    """Stage llm saves the LLM as it was at the last finished step and ends with 143; the SIGTERM
    handler in place before the run is back after it."""
    from minigpt5_cli.modeling import losses

    def before_the_run(signum, frame):
        raise AssertionError("SIGTERM reached the handler outside the run")

    real, calls = losses.text_loss, []

    def loss_then_sigterm(*args):
        calls.append(1)
        if len(calls) == 3:  # in step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(losses, "text_loss", loss_then_sigterm)
    out = tmp_path / "llm"
    previous = signal.signal(signal.SIGTERM, before_the_run)
    try:
        code = run_cli("train", "--recipe", str(REPO / "recipes/toy/llm_vision.yaml"), "model.llm=tiny:llava",
                       f"data.train={SEQS}", "data.extra=[]", "train.batch_size=2", "train.max_steps=10",
                       f"train.output_dir={out}")
        assert signal.getsignal(signal.SIGTERM) is before_the_run
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 143
    assert json.loads((out / "scratch_state.json").read_text()) == {"step": 2, "of": 10, "interrupted": True}


def test_a_scratch_stage_keeps_its_lock_file_while_it_saves(tmp_path, monkeypatch):
    """The lock file in output_dir stays in place, held, while the stage saves into it: a run starting
    then is refused. The saved LLM loads with the file beside it."""
    from minigpt5_cli.modeling.backbones import load_llm
    from minigpt5_cli.training import scratch

    out, seen = tmp_path / "llm", []

    def report(*args, **kwargs):  # the stage reports as it starts and, after saving, as it ends
        with (out / ".lock").open("a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append("free")
            except BlockingIOError:
                seen.append("held")

    monkeypatch.setattr(scratch.REPORT, "print", report)
    assert run_cli("train", "--recipe", str(REPO / "recipes/toy/llm_vision.yaml"), "model.llm=tiny:llava",
                   f"data.train={SEQS}", "data.extra=[]", "train.batch_size=2", "train.max_steps=2",
                   f"train.output_dir={out}") == 0
    assert seen == ["held", "held"]
    assert {".lock", "config.json", "recipe.yaml", "scratch_state.json"} <= {p.name for p in out.iterdir()}
    assert not list(tmp_path.glob(".llm.*")), "nothing is left beside it"
    load_llm(str(out))


def test_fp16_without_a_gpu_keeps_the_recipe_as_given(tmp_path, monkeypatch):
    """fp16 trains in fp32 without a GPU, but the run's recipe says fp16, as given: the run resumes on a
    machine with a GPU (where a loss scaler starts new, none having been saved) as on one without."""
    from accelerate import Accelerator

    out, extra = tmp_path / "run", ("train.mixed_precision=fp16", "train.max_steps=2")
    assert run_cli(*stage1_args(out, *extra)) == 0
    assert R.load(out / "recipe.yaml").train.mixed_precision == "fp16"
    assert R.load(out / "checkpoint-2" / "recipe.yaml").train.mixed_precision == "fp16"
    real = Accelerator.__init__

    def with_scaler(self, *args, **kwargs):  # as with fp16 on a GPU
        real(self, *args, **kwargs)
        self.scaler = torch.amp.GradScaler("cpu")

    monkeypatch.setattr(Accelerator, "__init__", with_scaler)
    assert run_cli(*stage1_args(out, *extra), "--resume") == 0


def test_resume_refusals_cut_long_values(stage1_run):
    from minigpt5_cli.errors import UserError

    last = checkpoints(stage1_run)[-1]
    recipe = R.load(last / "recipe.yaml")
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, train="x" * 10_000))
    with pytest.raises(UserError) as e:
        train_module._check_resumed(recipe, last)
    assert str(e.value).startswith(f"--resume continues the run as saved in {last / 'recipe.yaml'}: data.train is "
                                   f"'{'x' * 76}... here, ")
    assert len(str(e.value)) < 400


def test_resume_may_change_how_the_run_saves_and_its_checkpoints_say_so(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = interrupt_after_saving(monkeypatch, 2)
    assert run_cli(*stage1_args(out)) == 130
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    assert run_cli(*stage1_args(out, "train.save_every=1", "train.keep_checkpoints=5"), "--resume") == 0
    assert [p.name for p in checkpoints(out)] == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    saved = R.load(out / "checkpoint-4" / "recipe.yaml").train
    assert (saved.save_every, saved.keep_checkpoints) == (1, 5)


def test_a_run_finds_its_local_backbones_from_anywhere_and_after_moving(tmp_path, monkeypatch):
    """Backbones given as folders relative to the working folder are saved relative to the run (its
    recipe and each checkpoint's): generate finds them from another working folder, and after the run
    and its backbones move together; --resume still sees the same backbones."""
    from minigpt5_cli import hub

    root, story = tmp_path / "root", tmp_path / "story.json"
    story.write_text(json.dumps({"id": "s", "steps": [{"text": "a red circle.", "image": None}]}))
    for name, folder in (("tiny:llava", "llm"), ("tiny:sd", "generator")):
        shutil.copytree(hub.resolve(name), root / "backbones" / folder)
    models = ("model.llm=backbones/llm", "model.generator=backbones/generator", "train.max_steps=2")
    monkeypatch.chdir(root)
    assert run_cli(*stage1_args("runs/s1", *models)) == 0
    assert run_cli(*stage2_args("runs/s2", "runs/s1", "lora", *models)) == 0
    assert R.load(root / "runs/s2/recipe.yaml").model.llm == "../../backbones/llm"
    saved = R.load(root / "runs/s2/checkpoint-2/recipe.yaml")
    assert (saved.model.llm, saved.model.generator) == ("../../../backbones/llm", "../../../backbones/generator")
    assert (saved.train.init_from, saved.train.output_dir) == ("runs/s1", "runs/s2")  # as given

    args = ["generate", "-s", str(story), "--diffusion-steps", "2", "--max-new-tokens", "12"]
    monkeypatch.chdir(tmp_path)
    assert run_cli(*args, "-m", "root/runs/s2", "-o", "a") == 0
    moved = tmp_path / "elsewhere" / "root"
    moved.parent.mkdir()
    root.rename(moved)
    monkeypatch.chdir(moved / "runs")
    assert run_cli(*args, "-m", "s2", "-o", str(tmp_path / "b")) == 0
    a, b = (json.loads((tmp_path / d / "story.json").read_text()) for d in "ab")
    assert a["generated"] == b["generated"]
    assert (tmp_path / "a" / "image-1.png").read_bytes() == (tmp_path / "b" / "image-1.png").read_bytes()
    assert json.loads((tmp_path / "b" / "story.json").read_text())["model"]["llm"] == str(moved / "backbones/llm")
    monkeypatch.chdir(moved)
    assert run_cli(*stage2_args("runs/s2", "runs/s1", "lora", *models), "--resume") == 0


def test_a_checkpoint_may_name_backbones_beside_its_run_a_bundle_only_inside_itself(tmp_path, monkeypatch):
    """A run's checkpoint names the user's own backbones, wherever they lie; one of an earlier version
    named them from the working folder, which is still read. A bundle's stay inside it. A local path
    found nowhere is our error, never a hub id."""
    from minigpt5_cli.errors import UserError
    from minigpt5_cli.modeling.bundle import located

    (tmp_path / "llm").mkdir()
    run, bundle = tmp_path / "runs" / "s2" / "checkpoint-2", tmp_path / "bundle"
    run.mkdir(parents=True)
    (run / checkpoint.STEP_FILE).write_text("{}")
    bundle.mkdir()
    monkeypatch.chdir(tmp_path)

    def found(folder, llm):
        return located(folder, R.load(None, [f"model.llm={llm}", "model.generator=tiny:sd"]))

    assert found(run, "../../../llm").model.llm == str(tmp_path / "llm")
    assert found(run, "llm").model.llm == str(tmp_path / "llm")  # as an earlier version saved it
    assert found(run, "org/model").model.llm == "org/model" and found(run, "tiny:llava").model.generator == "tiny:sd"
    monkeypatch.chdir(run)
    assert found(Path("."), "../../../llm").model.llm == str(tmp_path / "llm")  # `-m .` inside the checkpoint
    monkeypatch.chdir(tmp_path)
    for name in ("../llm", str(tmp_path / "llm")):  # `..` or an absolute path out of a bundle
        with pytest.raises(UserError, match="leads outside"):
            found(bundle, name)
    for name in ("./llm", "llm"):  # a folder of the current one is never a bundle's backbone
        with pytest.raises(UserError, match=f"recipe.yaml names the backbone '{name}', which is not in {bundle}"):
            found(bundle, name)
    # A name written relative to the run (it starts with '.') is never read from the current folder.
    for folder, name in ((run, "../../../gone"), (run, "runs/toy/llm"), (run, "./llm")):
        with pytest.raises(UserError, match=f"recipe.yaml names the backbone '{name}', which is not found"):
            found(folder, name)


def test_a_checkpoint_of_an_earlier_version_resumes(tmp_path):
    """Checkpoints written by 0.x (torch.save'd optimizer.bin keyed by position, as torch's own
    `optimizer.state_dict()`, and scheduler.bin) resume to the same weights, read with torch's
    allow-list unpickler."""
    from minigpt5_cli.training import state

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = ("train.max_steps=4", "train.save_every=2")
    assert run_cli(*stage1_args(straight, *extra)) == 0
    resumed.mkdir()
    old = resumed / "checkpoint-2"
    shutil.copytree(straight / "checkpoint-2", old)
    shutil.copy(straight / "recipe.yaml", resumed / "recipe.yaml")
    named, _ = state._read_optimizer(old)
    order = [name for group in named["param_groups"] for name in group["params"]]
    assert order and all(isinstance(n, str) for n in order)
    position = {name: i for i, name in enumerate(order)}
    torch.save({"state": {position[k]: v for k, v in named["state"].items()},
                "param_groups": [{**g, "betas": tuple(g["betas"]), "params": [position[n] for n in g["params"]]}
                                 for g in named["param_groups"]]}, old / "optimizer.bin")
    torch.save(json.loads((old / "scheduler.json").read_text()), old / "scheduler.bin")
    for name in ("optimizer.json", "optimizer.safetensors", "scheduler.json"):
        (old / name).unlink()
    assert run_cli(*stage1_args(resumed, *extra), "--resume") == 0
    a, b = weights(straight / "checkpoint-4"), weights(resumed / "checkpoint-4")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Payload:
    """Unpickled, this writes `marker`: what a shared checkpoint could do to whoever loads it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "x")


def plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(Payload(marker), path)


@pytest.mark.parametrize("new_files", [True, False])
def test_resume_never_unpickles_a_planted_file(stage1_run, tmp_path, capsys, new_files):
    """A checkpoint with pickles planted where earlier versions kept optimizer and scheduler state, and
    beside them: resuming runs none of them. With the state files of this version they are ignored;
    without, the old optimizer.bin is refused by torch's allow-list unpickler, in one line."""
    run, marker = tmp_path / "run", tmp_path / "marker"
    shutil.copytree(stage1_run, run)
    last = run / "checkpoint-4"
    for name in ("optimizer.bin", "scheduler.bin", "scaler.bin", "evil.pkl", "x.bin", "mapper/x.pt"):
        plant(last / name, marker)
    if not new_files:
        for name in ("optimizer.json", "optimizer.safetensors"):
            (last / name).unlink()
    code = run_cli(*stage1_args(run), "--resume")  # at its last step: it reads the state, trains no more
    err = capsys.readouterr().err
    assert not marker.exists(), "a planted pickle ran"
    if new_files:
        assert code == 0, err
    else:
        assert code == 2 and err.strip().splitlines() == [
            f"error: checkpoint {last} is damaged: {last / 'optimizer.bin'} does not load (it holds objects other "
            f"than tensors and plain values); use the checkpoint before it, {run / 'checkpoint-2'} (remove {last} "
            "to resume from there)"], err


@pytest.mark.parametrize("damage", ["vokens", "mapper"])
def test_generate_never_unpickles_a_planted_file(stage1_run, tmp_path, capsys, damage):
    """A damaged checkpoint with pickles beside the damaged file (and where diffusers would fall back to
    one for a missing mapper): the error names the damaged file; no pickle runs."""
    run, marker = tmp_path / "run", tmp_path / "marker"
    shutil.copytree(stage1_run, run)
    last = run / "checkpoint-4"
    for name in ("evil.pkl", "x.bin", "optimizer.bin", "mapper/diffusion_pytorch_model.bin", "mapper/x.pt"):
        plant(last / name, marker)
    if damage == "vokens":
        bad, what = last / "vokens.safetensors", "does not load"
        bad.write_bytes(bad.read_bytes()[:100])
    else:
        bad, what = last / "mapper" / "diffusion_pytorch_model.safetensors", "is missing"
        bad.unlink()
    code = run_cli("generate", "-s", "a red circle.", "-m", str(run), "-o", str(tmp_path / "out"),
                   "--diffusion-steps", "2", "--max-new-tokens", "4")
    err = capsys.readouterr().err
    assert not marker.exists(), "a planted pickle ran"
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: checkpoint {last} is damaged: {bad} {what}; use the checkpoint before it"), err
    assert not (tmp_path / "out").exists()


def test_the_fp16_loss_scaler_state_is_kept_as_json(tmp_path):
    """The scaler's state (fp16 on GPUs) goes through JSON whole; a file lacking part of it is refused."""
    from minigpt5_cli.errors import UserError
    from minigpt5_cli.training import state

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
    scaler.update(512.0)
    state._save_json(scaler.state_dict(), tmp_path / state.SCALER_FILE)
    fresh = torch.amp.GradScaler("cpu")
    fresh.load_state_dict(state._read_plain(tmp_path, state.SCALER_FILE, fresh.state_dict(), list(fresh.state_dict())))
    assert fresh.state_dict() == scaler.state_dict() and fresh.get_scale() == 512.0
    (tmp_path / state.SCALER_FILE).write_text('{"scale": 1.0}')
    with pytest.raises(UserError, match="scaler.json does not load .it lacks growth_factor"):
        state._read_plain(tmp_path, state.SCALER_FILE, fresh.state_dict(), list(fresh.state_dict()))


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a file system of its own, 64 KiB larger than a copy of a stage-1 run's first
    checkpoint: a tmpfs, mounted where this user may (root, with the capability), else the test skips."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_during_a_save_ends_in_one_line(stage1_run, small_disk, capsys):
    """A real full disk while checkpoint-4 is written: one line naming the file, checkpoint-2 whole,
    no partial folder."""
    run = small_disk / "run"
    shutil.copytree(stage1_run, run, ignore=shutil.ignore_patterns("checkpoint-4"))
    used = sum(-(-p.stat().st_size // 4096) * 4096 for p in run.rglob("*") if p.is_file())
    subprocess.run(["mount", "-o", f"remount,size={used + 64 * 1024}", str(small_disk)], check=True)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert run_cli(*stage1_args(run), "--resume") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: No space left on device writing {run}/.checkpoint-4.tmp/"), err
    assert {p: p.read_bytes() for p in before} == before
    assert [p.name for p in checkpoints(run)] == ["checkpoint-2"] and not list(run.glob(".checkpoint-*"))


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
    assert {p.name for p in last.iterdir()} >= {"optimizer.json", "optimizer.safetensors", "scheduler.json",
                                                "vokens.safetensors", "mapper"}
    assert not list(out.glob(".checkpoint-*")), "no half-written checkpoint is left"
    model = model_for(R.load(last / "recipe.yaml"))
    checkpoint.load(model, last)


def test_every_process_refuses_a_folder_in_use(tmp_path):
    """Another run holds OUTPUT: both processes of a 2-process run stop with the one-line error; neither
    goes on to wait for the other or prints a traceback."""
    out = tmp_path / "run"
    out.mkdir()
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "minigpt5_cli", *stage1_args(out)]
    with (out / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    line = f"error: {IN_USE.format(out)}"  # each process's, their writes may interleave
    assert proc.stderr.count(line) == 2 and "error: " not in proc.stderr.replace(line, ""), proc.stderr[-3000:]
    # The launcher's report of the failed processes follows (a traceback of its own): none of ours.
    assert "minigpt5_cli/" not in proc.stderr and "terminated" not in proc.stderr, proc.stderr[-3000:]
    assert [p.name for p in out.iterdir()] == [".lock"]


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


def test_off_a_terminal_training_prints_plain_progress_lines(tmp_path, monkeypatch, capsys):
    """A log file gets a line with the step, the rate and the loss; here every update, not every 30 s."""
    from minigpt5_cli import display

    monkeypatch.setattr(display, "PLAIN_EVERY", 0)
    assert run_cli(*stage1_args(tmp_path / "run", "train.max_steps=2")) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train ")]
    assert lines and lines[-1].startswith("train 2/2 (") and " steps/s) loss " in lines[-1], lines


def test_plain_progress_follows_the_phase_that_runs():
    """A stage of two phases (the generator's vae, then unet) reports the second once the first is done."""
    import io

    from rich.console import Console

    from minigpt5_cli import display

    log = io.StringIO()
    progress = display.progress(Console(file=log, force_terminal=False))
    progress.every = 0
    with progress:
        vae = progress.add_task("vae", total=2)
        progress.advance(vae, 2)
        unet = progress.add_task("unet", total=3)
        progress.advance(unet)
    lines = log.getvalue().splitlines()
    assert lines[-1].startswith("unet 1/3 ("), lines


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
