"""`minigpt5 judge --benchmark opening`: IntJudge's prompt, its answers read as ours and as OpenING's script
reads them, and a tiny random Qwen2-VL judging exported outputs end to end (resumed, then scored).

With MINIGPT5_ORACLE_OPENING naming a checkout of OpenING, its own prompts are read from it (never run), and
the chat its judge script builds (its function pulled out of the script, no model loaded) equals ours.
"""

import ast
import json
import os
import random
import re
from pathlib import Path

import pytest
from PIL import Image

import families
from conftest import run_cli
from minigpt5_cli.errors import UserError
from minigpt5_cli.interleaved import arena, intjudge

ORACLE = os.environ.get("MINIGPT5_ORACLE_OPENING")
UID = "0101001"

# What each reader makes of a judge's answer: (text, ours, OpenING's), each (winner, how); "coin": the toss.
TABLE = [
    ("A is better", ("A", "exact"), ("A", "exact")),
    ("B is better", ("B", "exact"), ("B", "exact")),
    ("Tie(A is better)", ("Tie(A)", "exact"), ("Tie(A)", "tie")),
    ("Tie(B is better)", ("Tie(B)", "exact"), ("Tie(B)", "tie")),
    ("tie(a is better)", ("Tie(A)", "exact"), ("tie(a)", "tie")),
    ("B is better, since its picture fits", ("B", "exact"), ("B", "exact")),
    ("Both answers are good", ("coin", "coin"), ("B", "exact")),
    ("After reading both, A", ("Tie(A)", "fallback"), ("A", "exact")),
    ("I think B", ("Tie(B)", "fallback"), ("Tie(B)", "fallback")),
    ("Overall A is better", ("A", "fallback"), ("Tie(A)", "fallback")),
    (" A is better", ("A", "exact"), ("Tie(A)", "fallback")),
    ("Tie", ("Tie", "tie"), ("Tie)", "tie")),
    ("Tie, B slightly", ("Tie(B)", "tie"), ("Tie, )", "tie")),
    ("???", ("coin", "coin"), ("coin", "coin")),
    ("", ("coin", "coin"), ("coin", "coin")),  # their script fails on an empty answer
]


@pytest.mark.parametrize("text,ours,theirs", TABLE)
def test_answers_read_both_ways(text, ours, theirs):
    toss = "Tie(A)"
    swap = {"coin": toss}
    assert intjudge.parse(text, toss) == (swap.get(ours[0], ours[0]), ours[1])
    assert intjudge.parse_opening(text, toss) == (swap.get(theirs[0], theirs[0]), theirs[1])


def test_the_coin_is_seeded_by_seed_and_battle():
    keys = [f"{i}_0_1" for i in range(40)]
    first = [intjudge.coin(0, k) for k in keys]
    assert first == [intjudge.coin(0, k) for k in keys]
    assert set(first) == {"Tie(A)", "Tie(B)"}
    assert first != [intjudge.coin(1, k) for k in keys]


def script(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / intjudge.SCRIPT).write_text(body)
    return folder


def test_their_prompts_are_read_not_run(tmp_path):
    checkout = script(tmp_path / "c", 'import sys\nsys.exit("ran")\ndef ask(content):\n'
                      '    content.append({"text": "Pick one: \\"A is better\\" or \\"B is better\\" '
                      'or \\"Tie(A is better)\\" or \\"Tie(B is better)\\""})\n'
                      'if __name__ == "__main__":\n    SYSTEM_MESSAGE = "Judge A and B.\\n"\n')
    system, ask = intjudge.their_prompts(checkout)
    assert system == "Judge A and B.\n" and ask.startswith("Pick one:")
    with pytest.raises(UserError, match="no SYSTEM_MESSAGE string"):
        intjudge.their_prompts(script(tmp_path / "d", 'SYSTEM_MESSAGE = open("x").read()\nprint("A is better")\n'))
    with pytest.raises(UserError, match="no IntJudge_judge_AB.py"):
        intjudge.their_prompts(tmp_path)


@pytest.mark.skipif(not ORACLE, reason="MINIGPT5_ORACLE_OPENING names no OpenING checkout")
def test_their_prompts_from_their_checkout():
    system, ask = intjudge.their_prompts(Path(ORACLE))
    assert "<OUTPUT_A>" in system and "<OUTPUT_B>" in system
    assert all(f'"{label}"' in ask.lower() for label in intjudge.LABELS)



def their_chat(checkout: Path, system: str, inputs, a, b) -> list[dict]:
    """The chat OpenING's get_gpt4answer builds (pulled out of their script's syntax tree, the model never
    loaded), from steps tagged as their main loop tags them."""
    tree = ast.parse((checkout / intjudge.SCRIPT).read_text())
    function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "get_gpt4answer")

    class Built(Exception):
        pass

    class Processor:
        def apply_chat_template(self, chat, **kwargs):
            raise Built(chat)

    space = {"SYSTEM_MESSAGE": system, "processor": Processor()}
    exec(compile(ast.Module([function], []), intjudge.SCRIPT, "exec"), space)
    count, tagged = 0, []
    for steps in (inputs, a, b):
        texts = []
        for text, image in steps:
            texts.append(text.strip().replace("<image>", "") + (f" <IMG_{count}></IMG_{count}>" if image else ""))
            count += image is not None
        tagged += [texts, [image for _, image in steps]]
    with pytest.raises(Built) as built:
        space["get_gpt4answer"](*tagged)
    return built.value.args[0]


@pytest.mark.skipif(not ORACLE, reason="MINIGPT5_ORACLE_OPENING names no OpenING checkout")
def test_prompt_equals_theirs_with_their_prompts():
    system, ask = intjudge.their_prompts(Path(ORACLE))
    rng = random.Random(0)
    texts = ["", "  ", "<BEGIN> What next? <image>", "a step <image>", " the end "]
    for case in range(300):
        count = iter(range(100))

        def steps(least: int):
            return [(rng.choice(texts), rng.choice([None, f"i{next(count)}.png"]))
                    for _ in range(rng.randint(least, 4))]

        inputs, a, b = steps(1), steps(0), steps(0)
        ours = intjudge.messages(intjudge.Battle({}, *([(t, i and Path(i)) for t, i in s] for s in (inputs, a, b))),
                                 system, ask)
        assert ours == their_chat(Path(ORACLE), system, inputs, a, b), case

def test_prompt_structure():
    img = [Path(f"i{k}.png") for k in range(5)]
    battle = intjudge.Battle({}, inputs=[("<BEGIN> Look <image>", img[0]), ("", img[1]), ("and then?", None)],
                             a=[(" first <image>", img[2]), ("second", None), ("third", img[3])],
                             b=[("", img[4])])
    chat = intjudge.messages(battle, "SYS", "ASK")
    assert chat[0] == {"role": "system", "content": "SYS"}
    content = chat[1]["content"]
    assert [c.get("image") for c in content if c["type"] == "image"] == [str(i) for i in img]
    texts = [c["text"] for c in content if c["type"] == "text"]
    assert texts == ["<INPUT>:  Look  <IMG_0></IMG_0>", " <IMG_1></IMG_1>", "and then?",
                     "<OUTPUT_A>: first  <IMG_2></IMG_2>", "second", "third <IMG_3></IMG_3>",
                     "\n<OUTPUT_B>:  <IMG_4></IMG_4>", "ASK"]
    assert content[1] == {"type": "image", "image": "i0.png"}  # each image right after its step's text
    empty = intjudge.messages(intjudge.Battle({}, [("q", None)], a=[], b=[("", None)]), "S", "Q")[1]["content"]
    assert [c["text"] for c in empty] == ["<INPUT>: q", "\n<OUTPUT_A>:", "\n<OUTPUT_B>:", "Q"]


# ---- end to end


def picture(path: Path, colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), colour).save(path)


def record(output: list[dict]) -> dict:
    return {"total_uid": UID, "meta_task_id": "1", "subtask_id": "1", "data_id": "1", "subtask_name": "Sub",
            "conversations": [{"input": [{"image": "./images/Sub/1-i-0.jpg", "text": "<BEGIN> Look <image>"},
                                         {"image": None, "text": "What next?"}]}, {"output": output}]}


def export(root: Path, model: str, images: int, present: bool = True) -> None:
    folder = root / f"{model}_output"
    folder.mkdir(parents=True)
    steps = [{"text": f"step {k} <image>", "image": f"{UID}-o-{k}.jpg"} for k in range(images)] + \
        [{"text": "the end", "image": None}]
    (folder / f"{UID}.json").write_text(json.dumps(record(steps)))
    for k in range(images if present else 0):
        picture(folder / f"{UID}-o-{k}.jpg", (60 * k, 100, 200))


def pair(a: str, b: str, ids="XYZ") -> dict:
    return {"data_id": UID, "model_A": {"id": str(ids.index(a)), "name": a},
            "model_B": {"id": str(ids.index(b)), "name": b}}


@pytest.fixture(scope="module")
def judge_folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("intjudge")
    families.qwen2_vl(out)
    return out


@pytest.fixture
def arena_files(tmp_path) -> dict:
    data = tmp_path / "data"
    picture(data / "images" / "Sub" / "1-i-0.jpg", (255, 0, 0))
    exp, exp2 = tmp_path / "exp", tmp_path / "exp2"
    export(exp, "X", 1)
    export(exp, "Y", 1, present=False)  # its image is missing: judged as an answer without it
    export(exp2, "Z", 2)
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([pair("X", "Z"), pair("Z", "Y"), pair("Y", "X")]))
    return {"data": data, "exp": exp, "exp2": exp2, "pairs": pairs, "out": tmp_path / "j.jsonl"}


def judge_args(f: dict, judge: Path | str, *extra: str) -> list[str]:
    return ["judge", "--benchmark", "opening", "--judge", str(judge), "--pairs", str(f["pairs"]), "--exports",
            str(f["exp"]), "--exports", str(f["exp2"]), "--data", str(f["data"]), "-o", str(f["out"]), *extra]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_tiny_qwen2_vl_judges_resumes_and_is_scored(judge_folder, arena_files, monkeypatch, capsys):
    f = arena_files
    seen = []
    encode = intjudge.encode

    def spy(processor, chats):
        batch = encode(processor, chats)
        seen.append((chats, batch["input_ids"], processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")))
        return batch

    monkeypatch.setattr(intjudge, "encode", spy)
    assert run_cli(*judge_args(f, judge_folder, "--batch-size", "2", "--max-new-tokens", "6")) == 0
    out = capsys.readouterr()
    assert "3 battles judged" in out.out
    assert "IntJudge was trained with OpenING's" in out.err and "1 output image not found" in out.err
    assert [len(chats) for chats, _, _ in seen] == [2, 1]
    # Input first, then A's images, then B's (Y's is missing), numbered on from 0.
    x, z = f["exp"] / "X_output", f["exp2"] / "Z_output"
    given = f["data"] / "images" / "Sub" / "1-i-0.jpg"
    expected = [[given, x / f"{UID}-o-0.jpg", z / f"{UID}-o-0.jpg", z / f"{UID}-o-1.jpg"],
                [given, z / f"{UID}-o-0.jpg", z / f"{UID}-o-1.jpg"], [given, x / f"{UID}-o-0.jpg"]]
    rows = [(chat, row, pad) for chats, ids, pad in seen for chat, row in zip(chats, ids.tolist())]
    for (chat, row, pad), images in zip(rows, expected, strict=True):
        assert [c["image"] for c in chat[1]["content"] if c["type"] == "image"] == [str(i) for i in images]
        text = "".join(c["text"] for c in chat[1]["content"] if c["type"] == "text")
        assert re.findall(r"<IMG_(\d+)>", text) == [str(k) for k in range(len(images))]
        runs = sum(t == pad and (i == 0 or row[i - 1] != pad) for i, t in enumerate(row))
        assert runs == len(images)  # the processor's image tokens: one run per image passed
    judged = lines(f["out"])
    assert [(j["model_A"]["name"], j["model_B"]["name"]) for j in judged] == [("X", "Z"), ("Z", "Y"), ("Y", "X")]
    for j in judged:
        assert j["winner"] in arena.WINNERS and j["parse"] in ("exact", "tie", "fallback", "coin")
        assert j["raw"] is not None and j["prompt"] == "minigpt5" and j["judge"] == str(judge_folder)
        if j["parse"] == "coin":
            assert j["winner"] == intjudge.coin(0, arena.key(j))

    # A rerun skips what is there; a line cut short by a kill is dropped and judged again.
    seen.clear()
    whole = f["out"].read_text().splitlines(keepends=True)
    f["out"].write_text("".join(whole[:2]) + whole[2][:25])
    assert run_cli(*judge_args(f, judge_folder, "--max-new-tokens", "6")) == 0
    assert "1 battle judged" in capsys.readouterr().out
    assert len(seen) == 1 and lines(f["out"])[:2] == judged[:2] and len(lines(f["out"])) == 3
    seen.clear()
    assert run_cli(*judge_args(f, judge_folder)) == 0
    assert "0 battles judged, 3 battles already there" in capsys.readouterr().out and not seen

    assert run_cli("arena", "results", str(f["out"]), "-o", str(f["out"].parent / "r.json")) == 0
    assert json.loads((f["out"].parent / "r.json").read_text())["battles"] == 3


def canned(monkeypatch, answers: list[str]) -> None:
    """The judge replaced by fixed answers, in order."""
    given = iter(answers)
    monkeypatch.setattr(intjudge, "load", lambda job: (None, None))
    monkeypatch.setattr(intjudge, "judge_batch", lambda m, p, chats, n: [next(given) for _ in chats])


@pytest.mark.parametrize("compat", [None, "opening"])
def test_answers_recorded_as_read(arena_files, monkeypatch, capsys, compat):
    canned(monkeypatch, ["Both are fine", "tie(b is better)", "???"])
    assert run_cli(*judge_args(arena_files, "judge", *(["--compat", compat] if compat else []))) == 0
    assert "2 verdicts read differently by OpenING's parser" in capsys.readouterr().err
    judged = lines(arena_files["out"])
    read = intjudge.parse_opening if compat else intjudge.parse
    assert [(j["winner"], j["parse"]) for j in judged] == [read(j["raw"], intjudge.coin(0, arena.key(j)))
                                                           for j in judged]
    assert [j["parse"] for j in judged] == (["exact", "tie", "coin"] if compat else ["coin", "exact", "coin"])
    assert {j["compat"] for j in judged} == {compat}


def test_their_prompts_recorded(arena_files, monkeypatch, capsys, tmp_path):
    checkout = script(tmp_path / "c", 'SYSTEM_MESSAGE = "S"\nASK = "\\"A is better\\" \\"B is better\\" '
                      '\\"Tie(A is better)\\" \\"Tie(B is better)\\""\n')
    canned(monkeypatch, ["A is better"] * 3)
    chats = []
    messages = intjudge.messages
    monkeypatch.setattr(intjudge, "messages", lambda b, s, a: chats.append((s, a)) or messages(b, s, a))
    assert run_cli(*judge_args(arena_files, "judge", "--prompts", str(checkout))) == 0
    assert "trained with" not in capsys.readouterr().err
    assert chats[0][0] == "S" and chats[0][1].startswith('"A is better"')
    assert {j["prompt"] for j in lines(arena_files["out"])} == {"opening"}


def test_missing_outputs_refused_before_the_judge_loads(arena_files, monkeypatch):
    monkeypatch.setattr(intjudge, "load", lambda job: pytest.fail("loaded"))
    (arena_files["exp2"] / "Z_output" / f"{UID}.json").unlink()
    assert run_cli(*judge_args(arena_files, "judge")) == 2
    assert not arena_files["out"].exists()


def test_output_step_without_image_and_last_line_kept(tmp_path):
    """An output step may leave out "image"; a whole judgement whose newline was not written is kept (the newline
    added), not judged again."""
    doc = {"conversations": [{"input": []}, {"output": [{"text": "only text"}]}]}
    assert intjudge._steps(doc, "x.json", 1, "output") == [("only text", None)]
    line = json.dumps({"data_id": "1", "model_A": {"id": "0", "name": "a"}, "model_B": {"id": "1", "name": "b"},
                       "winner": "A"})
    (tmp_path / "j.jsonl").write_text(line)
    assert intjudge.read_done(tmp_path / "j.jsonl") == {"1_0_1"}
    assert (tmp_path / "j.jsonl").read_text() == line + "\n"


@pytest.mark.parametrize("extra, size", [([], 4), (["--compat", "opening"], 1), (["--compat", "opening", "-b", "3"], 3)])
def test_compat_opening_judges_one_battle_at_a_time_unless_told(monkeypatch, tmp_path, extra, size):
    """OpenING's script decodes one prompt at a time; left-padded batches can change a greedy verdict."""
    seen = []
    monkeypatch.setattr(intjudge, "run", lambda job: seen.append(job.batch_size) or "judged")
    assert run_cli("judge", "--benchmark", "opening", "--judge", "j", "--exports", str(tmp_path),
                   "-o", str(tmp_path / "j.jsonl"), *extra) == 0
    assert seen == [size]
