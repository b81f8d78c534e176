"""ISG-Bench: `judge --benchmark isg` against a small OpenAI-compatible server started here on 127.0.0.1, and
`scores --benchmark isg`, by default and as ISG's own scripts compute (--compat isg).

The prompts are a stand-in get_judge_prompt.py with ISG's constant names and texts of our own. The oracle
test runs ISG's calculate_performance.analyze_data from a checkout named by MINIGPT5_ORACLE_ISG (skipped
without it) on random result sets.
"""

import importlib.util
import json
import os
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from conftest import run_cli
from minigpt5_cli.errors import UserError
from minigpt5_cli.interleaved import api, isg, scores
from minigpt5_cli.interleaved.scores_cli import scores as scores_command

ORACLE = os.environ.get("MINIGPT5_ORACLE_ISG")
needs_oracle = pytest.mark.skipif(not ORACLE, reason="MINIGPT5_ORACLE_ISG names no ISG checkout")

# Our own texts under ISG's names; running the file would fail on its first line.
STAND_IN = '''raise SystemExit("the prompt file must be read, not run")
_TEXT_TEXT_JUDGE_PROMPT = "TT {requirement} | {text1} | {text2} | {question}"
_TEXT_IMAGE_JUDGE_PROMPT = "TI {requirement} | {text} | {question}"
_IMAGE_IMAGE_JUDGE_PROMPT = "II {requirement} | {question}"
_DSG_PROMPT = "DSG {question}"
_EVALUATE_WHOLE_W_GT_PROMPT = ["HOL query:\\n", "answer:", "golden:", "end"]
VQA_dict = {"Yes_No": "say yes or no", "Score": "score it"}
'''


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """Requests to the server here go straight to it, whatever proxy the environment names."""
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


class Server:
    """An OpenAI-compatible chat endpoint on 127.0.0.1 answering by the prompt's first word (`answers`)."""

    def __init__(self, answers):
        self.requests, self.answers = [], answers
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                text = next(p["text"] for p in body["messages"][0]["content"] if p["type"] == "text")
                status, reply = server.answers(text)
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode() \
                    if status == 200 else reply.encode()
                self.send_response(status)
                if 300 <= status < 400:  # a redirect to the URL the reply names
                    self.send_header("Location", reply)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def texts(self, kind):
        return [p["text"] for r in self.requests for p in r["body"]["messages"][0]["content"]
                if p["type"] == "text" and p["text"].startswith(kind)]


def canned(text):
    """Scores 8 (Text-Image), 6 (Text-Text) and 4 in a code fence (Image-Image); Yes unless the question asks
    for a dog; holistic 7."""
    kind = text.split()[0]
    if kind == "II":
        return 200, '```json\n{"Judge": 4, "Reason": "r"}\n```'
    if kind == "DSG":
        return 200, json.dumps({"Judge": "No" if "dog" in text else "Yes", "Reason": "r"})
    if kind == "HOL":
        return 200, json.dumps({"overall_score": 7, "final_thoughts": "ok"})
    return 200, json.dumps({"Judge": {"TI": 8, "TT": 6}[kind], "Reason": "r"})


@pytest.fixture
def server():
    s = Server(canned)
    yield s
    s.close()


def png(path: Path, colour="red"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), colour).save(path)
    return path


def text(content):
    return {"type": "text", "content": content}


def image(content):
    return {"type": "image", "content": content}


def record(sid, category, output):
    """An ISG record: a text and an image asked, a text and an image golden, block and image questions."""
    block = [{"subject": "<gen_text1>", "object": "<gen_img1>", "Question": "Does <gen_text1> describe <gen_img1>?"},
             {"subject": "<gen_text1>", "object": "<query_text1>", "Question": "Does <gen_text1> answer <query_text1>?"},
             {"subject": "<gen_img1>", "object": "<query_img1>", "Question": "Is <gen_img1> like <query_img1>?"},
             {"subject": "<gen_img2>", "object": "<query_img1>", "Question": "Is there a second image?"}]
    images = [{"image": "<gen_img1>", "Question": "Is there a cat?", "id": 0, "Preliminary": []},
              {"image": "<gen_img1>", "Question": "Is the cat black?", "id": 1, "Preliminary": [0]},
              {"image": "<gen_img1>", "Question": "Is there a dog?", "id": 2, "Preliminary": []}]
    return {"id": sid, "Category": category, "Query": [text("Draw a cat.\nNow."), image("images/q1.png")],
            "Golden": [text("A cat."), image("images/g1.png")],
            "predict": {"block_qa": {"questions": block}, "image_qa": {"questions": images}}, "output": output}


@pytest.fixture
def bench(tmp_path):
    """A prepared folder, ISG's stand-in checkout and an export of three samples: one whose structure matches,
    one whose structure does not, one without output."""
    data, exp, checkout = tmp_path / "data", tmp_path / "exp", tmp_path / "ISG"
    png(data / "images" / "q1.png"), png(data / "images" / "g1.png", "blue"), png(exp / "m_images" / "0.png")
    (checkout / "ISG_eval").mkdir(parents=True)
    (checkout / "ISG_eval" / "get_judge_prompt.py").write_text(STAND_IN)
    lines = [record("0000", "Prediction", [text("A black cat."), image("m_images/0.png")]),
             record("0001", "painting", [image("m_images/0.png")]),
             record("0002", "HowTo", None)]
    (exp / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return tmp_path


def judge_args(tmp, url, *extra):
    return ["judge", "--benchmark", "isg", "--api", url, "--judge", "tiny", "--exports", str(tmp / "exp"),
            "--data", str(tmp / "data"), "--prompts", str(tmp / "ISG"), "--output", str(tmp / "j.jsonl"), *extra]


def read(path):
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_judge_end_to_end(bench, server, monkeypatch, capsys):
    """The four levels through the command line, and their scores: block questions through the prompt their
    block types pick (a block not in the output is not asked), image questions after their prerequisites,
    holistic with query, output and golden; the fenced answer read; a rerun asks nothing."""
    monkeypatch.setenv("JUDGE_KEY", "sekrit")
    assert run_cli(*judge_args(bench, server.url, "--api-key-env", "JUDGE_KEY")) == 0
    lines = read(bench / "j.jsonl")
    assert set(lines) == {"0000", "0001", "0002"}
    first = server.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sekrit"
    assert first["body"]["model"] == "tiny" and first["body"]["temperature"] == 0
    assert first["body"]["response_format"] == {"type": "json_object"}
    # block: Text-Image with the text's name replaced, Text-Text, Image-Image with both images; not <gen_img2>
    assert server.texts("TI") == ["TI score it | A black cat. | Does  `Text`  describe <gen_img1>?"]
    assert server.texts("TT") == ["TT score it | A black cat. | Draw a cat.\nNow. | Does  `Text 1`  answer  `Text 2` ?"]
    block = lines["0000"]["result"]["block"]
    assert [q.get("VQA_judge_Score", {}).get("Judge") for q in block] == [8, 6, 4, None]
    assert block[2]["raw"].startswith("```json")
    ii = next(r for r in server.requests if r["body"]["messages"][0]["content"][-1].get("text", "").startswith("II"))
    parts = ii["body"]["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,") and parts[0]["image_url"]["detail"] == "low"
    # image: the question whose prerequisite was answered Yes is asked
    assert [q["judge"]["Judge"] for q in lines["0000"]["result"]["image"]] == ["Yes", "Yes", "No"]
    # holistic: prompt, query, prompt, output, prompt, golden, prompt; newlines in texts become spaces
    holistic = [[p.get("text", p["type"]) for p in r["body"]["messages"][0]["content"]] for r in server.requests
                if r["body"]["messages"][0]["content"][0].get("text", "").startswith("HOL")]
    assert len(holistic) == 2 and max(holistic, key=len) == [
        "HOL query: ", "Draw a cat. Now.", "image_url", "answer:", "A black cat.", "image_url", "golden:", "A cat.",
        "image_url", "end"]
    assert lines["0001"]["result"] == {"structure": False, "holistic": {"overall_score": 7, "final_thoughts": "ok"},
                                       "holistic_raw": '{"overall_score": 7, "final_thoughts": "ok"}'}
    assert "result" not in lines["0002"] and lines["0002"]["model"] == "m"
    err = capsys.readouterr().err
    assert "the last sample of each export file judged" in err and ": 1;" in err
    assert "image questions with prerequisites answered Yes asked" in err
    # a rerun skips what is there
    asked = len(server.requests)
    assert run_cli(*judge_args(bench, server.url)) == 0
    assert len(server.requests) == asked and len((bench / "j.jsonl").read_text().splitlines()) == 3
    report = scores.compute("isg", [bench / "j.jsonl"], None)["models"]["m"]
    assert report["Temporal Prediction"] == {"samples": 2, "structure": 0.5, "block": 3.5, "image": pytest.approx(1 / 3),
                                             "holistic": 7}
    assert report["Image-Text Complementation"] == {"samples": 1, "structure": 0, "block": 1, "image": 0,
                                                    "holistic": 1}


def test_judge_compat(bench, server, capsys):
    """--compat isg: the last sample left out, the question with a prerequisite never asked, the text's
    content (not its name) replaced in a Text-Image question, the fenced answer an error."""
    assert run_cli(*judge_args(bench, server.url, "--compat", "isg")) == 0
    lines = read(bench / "j.jsonl")
    assert set(lines) == {"0000", "0001"}
    assert server.texts("TI") == ["TI score it | A black cat. | Does <gen_text1> describe <gen_img1>?"]
    result = lines["0000"]["result"]
    assert result["block"][2]["VQA_judge_Score"] == {"error": "Invalid JSON response",
                                                     "raw_output": '```json\n{"Judge": 4, "Reason": "r"}\n```'}
    assert ["judge" in q for q in result["image"]] == [True, False, True]
    err = capsys.readouterr().err
    for said in ("the last sample of each export file left out", "prerequisites answered Yes skipped",
                 "left with the text's name", "answers of JSON inside other text kept as errors"):
        assert said in err
    assert "--compat isg does" not in err
    report = scores.compute("isg", [bench / "j.jsonl"], "isg")["models"]["m"]["Temporal Prediction"]
    assert report == {"samples": 2, "structure": 0.5, "block": 4.0, "image": pytest.approx(1 / 6), "holistic": 7}


def test_limit_and_resume_in_parts(bench, server):
    assert run_cli(*judge_args(bench, server.url, "--limit", "1")) == 0
    assert set(read(bench / "j.jsonl")) == {"0000"}
    assert run_cli(*judge_args(bench, server.url, "--batch-size", "2")) == 0
    assert set(read(bench / "j.jsonl")) == {"0000", "0001", "0002"}
    assert len((bench / "j.jsonl").read_text().splitlines()) == 3


# The judge's answer: (text, default reading, compat reading, wrapped) -- ISG keeps what json.loads refuses.
MALFORMED = [
    ('{"Judge": "Yes"}', {"Judge": "Yes"}, {"Judge": "Yes"}, False),
    ('  {"Judge": 7}\n', {"Judge": 7}, {"Judge": 7}, False),
    ('```json\n{"Judge": 7}\n```', {"Judge": 7}, "error", True),
    ('Sure. {"Judge": "No", "Reason": "x"} Hope it helps.', {"Judge": "No", "Reason": "x"}, "error", True),
    ('{note} then {"Judge": 3}', {"Judge": 3}, "error", True),
    ('{"Judge": "Yes"', "error", "error", False),
    ("{'Judge': 'Yes'}", "error", "error", False),
    ("Yes", "error", "error", False),
    ("", "error", "error", False),
    ("null", "error", "error", False),
    ("[1, 2]", "object", "object", False),
    ('"Yes"', "object", "object", False),
]


@pytest.mark.parametrize("raw, ours, theirs, wrapped", MALFORMED)
def test_parse_table(raw, ours, theirs, wrapped):
    for compat, expected in ((False, ours), (True, theirs)):
        got, flag = isg.parse(raw, compat)
        assert flag == wrapped
        if expected == "error":
            assert got == {"error": "Invalid JSON response", "raw_output": raw.strip()}
        elif expected == "object":
            assert got == {"error": "not a JSON object", "raw_output": raw.strip()}
        else:
            assert got == expected


def test_names_and_structure():
    out = [text("a"), image("x.png"), text("b"), image("y.png")]
    assert isg.names(out, [image("q.png"), text("q")]) == {
        "<gen_text1>": "a", "<gen_img1>": "x.png", "<gen_text2>": "b", "<gen_img2>": "y.png",
        "<query_img1>": "q.png", "<query_text1>": "q"}
    assert isg.structure_matches(out, [text(""), image(""), text(""), image("")])
    assert not isg.structure_matches(out[:3], [text(""), image(""), text(""), image("")])
    assert not isg.structure_matches([], [text("")])


def test_prompts_are_read_not_run(tmp_path):
    (tmp_path / "ISG_eval").mkdir()
    path = tmp_path / "ISG_eval" / "get_judge_prompt.py"
    path.write_text(STAND_IN)
    prompts = isg.load_prompts(tmp_path)
    assert prompts["DSG"] == "DSG {question}" and prompts["Requirement"]["Score"] == "score it"
    path.write_text(STAND_IN.replace("_DSG_PROMPT", "_OTHER"))
    with pytest.raises(UserError, match="lacks _DSG_PROMPT"):
        isg.load_prompts(tmp_path)


def test_api_errors(server, tmp_path):
    """A 4xx is one line naming the URL and status; a 5xx is tried again, then refused; a reply that is not
    a chat completion is refused."""
    ask = api.Chat(server.url, "tiny", retries=1, wait=0)
    server.answers = lambda text: (400, "bad model")
    with pytest.raises(UserError, match=r"127.0.0.1:\d+/v1/chat/completions answered 400 Bad Request: bad model"):
        ask([api.text_part("hi")])
    assert len(server.requests) == 1
    server.answers = lambda text: (503, "busy")
    with pytest.raises(UserError, match="answered 503 Service Unavailable \\(tried 2 times\\)"):
        ask([api.text_part("hi")])
    assert len(server.requests) == 3
    server.answers = lambda text: (200, "fine")
    assert ask([api.text_part("hi")]) == "fine"
    gone = Server(canned)
    gone.close()
    with pytest.raises(UserError, match=f"cannot reach {gone.url}/chat/completions: .* \\(tried 2 times\\)"):
        api.Chat(gone.url, "tiny", retries=1, wait=0)([api.text_part("hi")])
    (tmp_path / "x.png").write_text("not an image")
    with pytest.raises(UserError, match="not a PNG, JPEG, GIF or WebP image"):
        api.image_part(tmp_path / "x.png")


def test_redirect_refused(server, monkeypatch):
    """A redirect is refused, not followed: the key goes to --api only."""
    other = Server(canned)
    server.answers = lambda text: (302, other.url + "/chat/completions")
    monkeypatch.setenv("JUDGE_KEY", "sekrit")
    try:
        with pytest.raises(UserError, match=f"--api answered a redirect to {other.url}/chat/completions; give the "
                                            "final URL"):
            api.Chat(server.url, "tiny", "JUDGE_KEY", retries=0)([api.text_part("hi")])
        assert not other.requests and server.requests[0]["auth"] == "Bearer sekrit"
    finally:
        other.close()


def test_output_that_is_an_export_is_refused(bench, server, capsys):
    """--output naming an export (not judgements) is refused and left as it is, nothing asked."""
    export = (bench / "exp" / "m.jsonl").read_bytes()
    (bench / "j.jsonl").write_bytes(export)
    assert run_cli(*judge_args(bench, server.url)) == 2
    assert f"{bench / 'j.jsonl'} is not a judgement file of ISG-Bench; give another --output" in capsys.readouterr().err
    assert (bench / "j.jsonl").read_bytes() == export and not server.requests


def test_resume_last_line(tmp_path):
    """The line after the last newline: a whole judgement kept (its newline added), a start of one removed, anything
    else refused with the file left as it is; the lines before are judgements or the file is refused."""
    path, check = tmp_path / "j.jsonl", api.judgement(tmp_path / "j.jsonl", "ISG-Bench", isg.KEYS)
    first = json.dumps({"id": "0", "Category": "HowTo", "model": "m", "judge": "j", "result": {}}) + "\n"
    second = json.dumps({"id": "1", "Category": "HowTo", "model": "m", "judge": "j", "result": {"raw": "a\u2028b"}},
                        ensure_ascii=False)
    for tail, keys, after in ((second, {("m", "0"), ("m", "1")}, first + second + "\n"), ('{"i', {("m", "0")}, first),
                              (second[:20], {("m", "0")}, first), ("", {("m", "0")}, first)):
        path.write_text(first + tail)
        assert api.resume(path, isg.LEAD, check) == keys
        assert path.read_text() == after
    path.write_text(first + second + "\n")
    assert api.resume(path, isg.LEAD, check) == {("m", "0"), ("m", "1")}
    for content, message in ((first + "my notes", "does not end with a judgement"),
                             (first + '{"id": "2"}', "is not a judgement file of ISG-Bench"),
                             ('{"id": "2"}\n' + second[:20], "is not a judgement file of ISG-Bench")):
        path.write_text(content)
        with pytest.raises(UserError, match=message):
            api.resume(path, isg.LEAD, check)
        assert path.read_text() == content


def test_exports_folder_skips_judgements(bench, server, capsys):
    """A folder of exports that also holds judgements (ours, ISG's *_judge.jsonl) takes the exports only."""
    assert run_cli(*judge_args(bench, server.url)) == 0
    judged = read(bench / "j.jsonl")
    theirs = [{**record("0000", "Prediction", [text("t")]), "result": {"structure": False}}]
    (bench / "exp" / "m_0_-1_judge.jsonl").write_text("".join(json.dumps(r) + "\n" for r in theirs))
    (bench / "exp" / "ours.jsonl").write_bytes((bench / "j.jsonl").read_bytes())
    (bench / "j.jsonl").unlink()
    capsys.readouterr()
    assert run_cli(*judge_args(bench, server.url)) == 0
    assert read(bench / "j.jsonl").keys() == judged.keys()
    assert f"--exports {bench / 'exp'}: 2 files that are not exports skipped" in capsys.readouterr().err


def test_answers_back_are_written_when_one_fails(tmp_path):
    """A failed request raises once the answers already on their way are written."""
    release = threading.Event()

    def judge(job):
        if job == "bad":
            release.set()
            raise UserError("refused")
        release.wait(5)
        time.sleep(0.2)  # the failure is back first
        return {"id": job}

    with pytest.raises(UserError, match="refused"):
        api.judge_all(["good", "bad"], judge, tmp_path / "j.jsonl", 2, "samples")
    assert read(tmp_path / "j.jsonl") == {"good": {"id": "good"}}


def test_scores_that_overflow(tmp_path):
    """A block or holistic score of 1e999 (inf once read) or a huge integer counts as no score, so the scores
    written stay JSON."""
    records = [isg_result("Prediction", True, [8, "1e999"], [], "1e999"),
               isg_result("Prediction", True, [6, int("9" * 400)], [], 1)]
    path = tmp_path / "j.jsonl"
    path.write_text("".join(json.dumps(r).replace('"1e999"', "1e999") + "\n" for r in records))
    for compat, block in ((None, 7.0), ("isg", 1.0)):
        scores_command(judgements=[path], benchmark="isg", output=tmp_path / "s.json", compat=compat)
        report = json.loads((tmp_path / "s.json").read_text(), parse_constant=pytest.fail)["models"]["j"]
        assert report["Temporal Prediction"]["block"] == block and report["Temporal Prediction"]["holistic"] == 1


def isg_result(category, structure, scores_, judged, holistic, output=True):
    """A result record as ISG-eval.py writes it."""
    r = {"id": "x", "Category": category, "output": [text("t")] if output else []}
    r["result"] = {"structure": structure, "holistic": {"overall_score": holistic}}
    if structure:
        r["result"]["block"] = [{"VQA_judge_Score": {"Judge": s}} for s in scores_]
        r["result"]["image"] = [{"judge": {"Judge": j}} if j else {} for j in judged]
    return r


def test_hand_made_scores(tmp_path, capsys):
    """The reference note's case: Scores [8, 6], images [Yes, no, unanswered], holistic 7, with a structure
    failure of holistic 4, both Temporal Prediction: .5 / .1667 / 4.0 / 5.5; a sample without output
    (no result) gives 0 / 0 / 1 / 1. Through the command, which writes the JSON and prints the table."""
    records = [isg_result("Prediction", True, [8, 6], ["Yes", "no", None], 7),
               isg_result("painting", False, [], [], 4),
               {"id": "y", "Category": "HowTo"}]
    path = tmp_path / "model_judge.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    scores_command(judgements=[path], benchmark="isg", output=tmp_path / "s.json", compat=None)
    report = json.loads((tmp_path / "s.json").read_text())["models"]["model_judge"]
    assert report["Temporal Prediction"] == {"samples": 2, "structure": 0.5, "image": pytest.approx(1 / 6),
                                             "block": 4.0, "holistic": 5.5}
    assert round(report["Temporal Prediction"]["image"], 4) == 0.1667
    assert report["Image-Text Complementation"] == {"samples": 1, "structure": 0, "image": 0, "block": 1,
                                                    "holistic": 1}
    assert report["VQA"] == {"samples": 0, "structure": None, "image": None, "block": None, "holistic": None}
    out = capsys.readouterr().out
    assert "Temporal Prediction" in out and "0.1667" in out and "5.5000" in out


def test_category_table_and_text_scores(tmp_path, capsys):
    """By default "Style Transfer" is spelt right and Semantic Segmentation counts under Image Decomposition;
    compat keeps their key and leaves it out. A block score written as text is read, or scores 1 (compat)."""
    records = [isg_result("Semantic Segmentation", True, ["6", 8], [], 5), isg_result("Photo Variation", False, [], [], 3)]
    path = tmp_path / "j.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    ours = scores.compute("isg", [path], None)
    assert ours["models"]["j"]["Image Decomposition"]["block"] == 7 and "Style Transfer" in ours["models"]["j"]
    theirs = scores.compute("isg", [path], "isg")
    assert theirs["models"]["j"]["Image Decomposition"]["samples"] == 0
    assert theirs["models"]["j"]["Image Decomposition"]["block"] == 0 and "Style Transer" in theirs["models"]["j"]
    assert theirs["unplaced"] == {"Semantic Segmentation": 1} and ours["unplaced"] == {}
    records[0]["Category"] = "Realistic Object Detection"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert scores.compute("isg", [path], "isg")["models"]["j"]["Image Decomposition"]["block"] == 1
    assert scores.compute("isg", [path], "isg")["text_scores"] == 1
    scores_command(judgements=[path], benchmark="isg", output=tmp_path / "s.json", compat=None)
    assert "1 sample with a block score written as text: read as numbers" in capsys.readouterr().err


def random_result(rng):
    """A random ISG-eval.py result record, over every subcategory theirs maps and one it does not."""
    subs = [s for subs in scores.CATEGORIES.values() for s in subs]
    r = {"id": str(rng.randrange(10**6)), "Category": rng.choice(subs)}
    if rng.random() < 0.1:
        return r
    r["output"] = rng.choice([[], [text("")], [text("t"), image("i.png")], [image("i.png")]])
    result = {"structure": rng.random() < 0.6}
    if result["structure"] and rng.random() < 0.9:
        result["block"] = [rng.choice([{"VQA_judge_Score": {"Judge": rng.choice([1, 5, 7.5, 10, "8"])}},
                                       {"VQA_judge_Score": {"error": "Invalid JSON response"}}, {"subject": "s"}])
                           for _ in range(rng.randrange(4))]
    if rng.random() < 0.8:
        result["image"] = [rng.choice([{"judge": {"Judge": rng.choice(["Yes", "yes", "No", "no"])}},
                                       {"judge": {"error": "x"}}, {"judge": None}, {}])
                           for _ in range(rng.randrange(5))]
    if rng.random() < 0.9:
        result["holistic"] = rng.choice([{"overall_score": rng.randrange(1, 11)}, {"error": "x"}, {}])
    r["result"] = result
    return r


@needs_oracle
def test_analyze_data_oracle(tmp_path):
    """500 random result sets: ISG's analyze_data (then print_statistics's means) equal ours in --compat isg."""
    spec = importlib.util.spec_from_file_location("isg_performance", Path(ORACLE) / "calculate_performance.py")
    theirs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(theirs)
    rng = random.Random(0)
    for n in range(500):
        records = [random_result(rng) for _ in range(rng.randrange(1, 30))]
        path = tmp_path / "r.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        ours = scores.compute("isg", [path], "isg")["models"].get("r", {})
        stats = theirs.analyze_data(json.loads(json.dumps(records)))
        assert set(stats) == set(scores.ISG_CATEGORIES)
        for category, s in stats.items():
            expected = {"samples": s["total"], "structure": s["structure"] / s["total"] if s["total"] else 0,
                        **{k: sum(s[k]) / len(s[k]) if s[k] else 0 for k in ("block", "image", "holistic")}}
            got = ours.get(category, {"samples": 0, "structure": 0, "block": 0, "image": 0, "holistic": 0})
            assert got == pytest.approx(expected), (n, category)


def load_isg_eval(monkeypatch):
    """ISG's ISG-eval.py, loaded from the checkout with its API client's modules stubbed (nothing is sent)."""
    import sys
    import types

    monkeypatch.chdir(ORACLE)  # it reads ISG_eval/task_few_shot.json from the working folder
    monkeypatch.syspath_prepend(ORACLE)
    monkeypatch.setitem(sys.modules, "openai", types.SimpleNamespace(OpenAI=None))
    spec = importlib.util.spec_from_file_location("isg_eval_script", Path(ORACLE) / "ISG-eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_oracle
def test_judge_oracle(tmp_path, monkeypatch):
    """With ISG's own prompts, --compat isg asks the judge exactly what ISG-eval.py asks, in the same order
    (image, block with the Score requirement, holistic), and records the same verdicts."""
    theirs = load_isg_eval(monkeypatch)
    answers = [{"Judge": "Yes", "Reason": "r"}, {"Judge": 6, "Reason": "r"}, {"overall_score": 5}, {"Judge": "no"}]

    def answer(content):  # a verdict that depends on the request only
        return answers[len(json.dumps(content)) % len(answers)]

    asked = {"theirs": [], "ours": []}

    class Fake:
        def generate_answer(self, content):
            asked["theirs"].append(content)
            return json.loads(json.dumps(answer(content)))

    def ours_ask(parts):
        asked["ours"].append(parts)
        return json.dumps(answer(parts))

    for colour, name in (("red", "q.png"), ("blue", "g.png"), ("green", "o1.png"), ("white", "o2.png")):
        png(tmp_path / name, colour)
    r = record("0000", "Prediction", [text("A black\ncat."), image(str(tmp_path / "o1.png")), text("More."),
                                      image(str(tmp_path / "o2.png"))])
    r["Query"][1]["content"], r["Golden"] = str(tmp_path / "q.png"), [text("G"), image(str(tmp_path / "g.png")),
                                                                       text("G2"), image(str(tmp_path / "g.png"))]
    r["predict"]["block_qa"]["questions"].append({"subject": "<gen_img2>", "object": "<gen_text2>",
                                                   "Question": "Does <gen_img2> show More.?"})
    prompts = isg.load_prompts(Path(ORACLE))
    item = json.loads(json.dumps(r))
    assert theirs.evaluate_structure(item)
    named = theirs.rename_content(item)
    expected = {"image": theirs.evaluate_image(item, named, theirs.judge_prompt, {}, Fake()),
                "block": theirs.evaluate_block(item, named, theirs.judge_prompt,
                                               {"Score": theirs.judge_prompt["Requirement"]["Score"]}, Fake()),
                "holistic": theirs.evaluate_response(item, theirs.judge_prompt, Fake(), with_gt=True)}
    files = {k: [{**b, "content": Path(b["content"])} if b["type"] == "image" else b for b in r[k]]
             for k in ("Query", "Golden", "output")}
    got = isg.Judge(ours_ask, prompts, True, "j")({"model": "m", "record": r, "files": files})["result"]
    assert asked["ours"] == asked["theirs"] and len(asked["ours"]) == 8
    for level in ("image", "block"):
        assert [{k: v for k, v in q.items() if k != "raw"} for q in got[level]] == expected[level]
    assert got["holistic"] == expected["holistic"] and got["structure"]
