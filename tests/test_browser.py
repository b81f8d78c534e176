"""The rating page and the demo in a real browser: headless Chromium (Debian's, as CI installs it)
driven by Playwright, with every request that leaves the machine blocked. Screenshots of each page
go to the test's temporary folder."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from test_rating import MARKUP, generated_pair, images_of

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DESKTOP, PHONE = {"width": 1200, "height": 900}, {"width": 390, "height": 844}


def _unavailable(why: str):
    if os.environ.get("CI"):
        pytest.fail(f"{why}: CI installs it")  # its absence there is a failure
    pytest.skip(why)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[test]')")
    if not Path(CHROMIUM).is_file():
        _unavailable("no chromium (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


class Offline:
    """A browser context in which only `allowed` addresses load; the rest are refused and listed."""

    def __init__(self, browser, allowed: tuple[str, ...], **options):
        self.blocked, self.errors = [], []
        self.context = browser.new_context(accept_downloads=True, **options)
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", self._dialog)
        self.allowed = allowed
        self.confirm = False  # whether to accept the page's confirm() dialogs

    def _dialog(self, dialog):
        if self.confirm and dialog.type == "confirm":
            dialog.accept()
        else:
            self.errors.append(f"{dialog.type}: {dialog.message}")
            dialog.dismiss()

    def _route(self, route):
        if route.request.url.startswith(self.allowed + ("data:", "blob:")):
            route.continue_()
        else:
            self.blocked.append(route.request.url)
            route.abort()


# The rating page

@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return generated_pair(tmp_path_factory)


class Rater:
    """One rater on the study page. Which model is on which side is told by the images' names (their
    content), so the choices below are made by model, whatever order the page drew."""

    def __init__(self, page, models: dict[str, set[str]]):
        self.page, self.models = page, models
        self.saw_markup = False

    def side_of(self, model: str) -> str:
        for side in ("a", "b"):
            if self.page.locator(f"#side-{side} img").first.get_attribute("src") in self.models[model]:
                return side.upper()
        raise AssertionError("neither side shows the model's images")

    def choice(self, want: str) -> str:
        """"a" or "b" (a model) or "tie", as the page's A, B or tie."""
        return "tie" if want == "tie" else self.side_of(want)

    def click(self, question: int, want: str) -> None:
        self.page.locator(".question").nth(question).locator(f"button[data-choice={self.choice(want)}]").click()

    def key(self, want: str) -> None:
        self.page.keyboard.press({"A": "a", "B": "b", "tie": "t"}[self.choice(want)])

    def pressed(self, question: int) -> list[str]:
        buttons = self.page.locator(".question").nth(question).locator("button[aria-pressed=true]")
        return [b.get_attribute("data-choice") for b in buttons.all()]

    def check_markup_is_inert(self) -> None:
        """Where the story with markup is shown, its text is text: no element, no image, no script."""
        texts = self.page.locator("#context p").all_inner_texts()
        if MARKUP in texts:
            self.saw_markup = True
            assert self.page.locator("#context img").count() == 0
        assert self.page.locator("script").count() == 2  # the page's data and its code
        assert self.page.title() != "pwned"


def start(page, url: str, rater: str) -> None:
    page.goto(url)
    page.fill("#rater", rater)
    page.click("#start-form button[type=submit]")
    page.wait_for_selector("#pair:not([hidden])")


def test_rating_page_answered_by_click_and_key_survives_reload_and_exports(browser, outputs, tmp_path):
    alpha, beta = outputs
    study = tmp_path / "study"
    assert run_cli("rate", "build", "--a", str(alpha), "--b", str(beta), "-o", str(study), "--seed", "11") == 0
    key = json.loads((study / "key.json").read_text())
    models = {m: set().union(*images_of(run, study).values()) for m, run in (("a", alpha), ("b", beta))}
    url = (study / "raters" / "index.html").as_uri()

    # Alice, on a desktop: the first story by clicking, the rest by keyboard, reloading half-way.
    alice = Offline(browser, ("file://",), viewport=DESKTOP)
    page = alice.page
    start(page, url, "alice")
    r = Rater(page, models)
    seen = [page.locator("#side-a img").first.get_attribute("src")]
    assert page.inner_text("#pair-title") == "Story 1 of 3"
    r.check_markup_is_inert()
    r.click(0, "a")
    r.click(1, "b")
    r.click(2, "tie")
    assert [r.pressed(q) for q in range(3)] == [[r.choice("a")], [r.choice("b")], ["tie"]]
    page.screenshot(path=tmp_path / "rating-desktop.png", full_page=True)
    page.click("#next")
    assert page.inner_text("#pair-title") == "Story 2 of 3"
    seen.append(page.locator("#side-a img").first.get_attribute("src"))
    r.check_markup_is_inert()
    r.key("a")
    assert "1 of 3 answered" in page.inner_text("#status")  # the first story; this one has one answer of three
    page.reload()
    page.wait_for_selector("#pair:not([hidden])")
    assert page.inner_text("#pair-title") == "Story 2 of 3"
    assert r.pressed(0) == [r.choice("a")] and r.pressed(1) == [] and r.pressed(2) == []
    assert "active" in page.locator(".question").nth(1).get_attribute("class")
    assert "1 of 3 answered" in page.inner_text("#status")
    r.key("b")
    r.key("tie")
    assert "2 of 3 answered" in page.inner_text("#status")
    page.keyboard.press("ArrowRight")
    seen.append(page.locator("#side-a img").first.get_attribute("src"))
    r.check_markup_is_inert()
    for want in ("a", "b", "tie"):
        r.key(want)
    assert page.get_attribute("#progress", "value") == "3" and r.saw_markup
    page.keyboard.press("ArrowRight")
    page.wait_for_selector("#done:not([hidden])")
    assert "You answered every story" in page.inner_text("#done-text")
    page.screenshot(path=tmp_path / "rating-done.png", full_page=True)
    with page.expect_download() as download:
        page.click("#download")
    download.value.save_as(tmp_path / "alice.json")
    assert alice.errors == [] and alice.blocked == []
    alice.context.close()

    # Bob, on a phone, taps; then starts over, which forgets his answers in this browser.
    bob = Offline(browser, ("file://",), viewport=PHONE, is_mobile=True, has_touch=True)
    page = bob.page
    start(page, url, "bob")
    r = Rater(page, models)
    for k in range(3):
        r.check_markup_is_inert()
        for q, want in enumerate(("a", "a", "b")):
            r.page.locator(".question").nth(q).locator(f"button[data-choice={r.choice(want)}]").tap()
        if k == 0:
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=tmp_path / "rating-phone.png", full_page=True)
        page.locator("#next").tap()
    page.wait_for_selector("#done:not([hidden])")
    assert r.saw_markup
    with page.expect_download() as download:
        page.locator("#export").tap()
    download.value.save_as(tmp_path / "bob.json")
    bob.confirm = True
    page.locator("#restart").tap()
    page.wait_for_selector("#start:not([hidden])")
    assert page.evaluate("Object.keys(localStorage).length") == 0
    assert bob.errors == [] and bob.blocked == []
    bob.context.close()

    # The order follows from the study seed and the rater id: alice again, elsewhere, sees hers.
    again = Offline(browser, ("file://",), viewport=DESKTOP)
    start(again.page, url, "alice")
    assert again.page.locator("#side-a img").first.get_attribute("src") == seen[0]
    again.context.close()

    exports = [json.loads((tmp_path / f"{name}.json").read_text()) for name in ("alice", "bob")]
    for doc, rater in zip(exports, ("alice", "bob")):
        assert (doc["study"], doc["seed"], doc["rater"]) == (key["study"], key["page_seed"], rater)
        assert sorted(p["id"] for p in doc["pairs"]) == ["circle", "markup", "square"]
        assert [p["position"] for p in doc["pairs"]] == [1, 2, 3]
        for p in doc["pairs"]:
            assert p["shown"] in ([0, 1], [1, 0]) and set(p["answers"]) == {"language", "image", "together"}
            assert p["first_shown"] <= p["answered"] <= doc["exported"]
    assert exports[0]["rater_seed"] != exports[1]["rater_seed"]

    assert run_cli("rate", "results", str(study), str(tmp_path / "alice.json"), str(tmp_path / "bob.json")) == 0
    report = json.loads((study / "results.json").read_text())
    counts = {q: {name: side["count"] for name, side in row["preferences"].items()}
              for q, row in report["questions"].items()}
    assert counts == {"language": {"alpha_run": 6, "beta_run": 0, "tie": 0},
                      "image": {"alpha_run": 3, "beta_run": 3, "tie": 0},
                      "together": {"alpha_run": 0, "beta_run": 3, "tie": 3}}
    assert report["agreement"]["fleiss_kappa"]["image"] == pytest.approx(-1.0)  # they never agreed on it


STEPS = ["We went to the lake for the family picnic this year.", "Grandpa brought his old fishing rods and bait.",
         "The kids ran along the shore looking for frogs all morning.",
         "By noon everyone was hungry and the grill was hot."]
SAID = "Then we ate by the water and watched the sun go down over the hills until it was dark."
WIDE = {"width": 1280, "height": 900}


def photo_output(root: Path, name: str, colour: tuple[int, int, int]) -> Path:
    """A generate output as a VIST study has them: stories of four steps with 512-pixel photographs, each
    continued with text and one more photograph, drawn in `colour`."""
    from PIL import Image, ImageDraw

    def photo(path: Path, k: int, fill: tuple[int, int, int]) -> None:
        img = Image.new("RGB", (512, 512), (80 + 30 * k, 150, 210))
        ImageDraw.Draw(img).ellipse((40 + 20 * k, 90, 330 + 20 * k, 420), fill=fill)
        img.save(path)

    for n, sid in enumerate(("lake", "party")):
        folder = root / name / sid
        folder.mkdir(parents=True)
        for k in range(len(STEPS)):
            photo(folder / f"input-{k + 1}.png", k, (120, 90, 60))
        photo(folder / "image-1.png", n, colour)
        doc = {"id": sid, "mode": "vokens",
               "input": [{"text": t, "image": f"input-{k + 1}.png", "source": None} for k, t in enumerate(STEPS)],
               "generated": [{"text": SAID, "images": ["image-1.png"],
                              "segments": [{"text": SAID}, {"image": "image-1.png"}]}]}
        (folder / "story.json").write_text(json.dumps(doc))
    return root / name


def loaded(page) -> None:
    page.evaluate("Promise.all([...document.images].map((i) => i.decode()))")


def until(page, condition: str) -> bool:
    """Whether `condition` (JavaScript) holds within 600 frames, checked at each; wait_for_function would
    need the eval that the page's policy forbids."""
    return page.evaluate("new Promise((done) => { let n = 0; const check = () => (%s) ? done(true) : "
                         "++n > 600 ? done(false) : requestAnimationFrame(check); check(); })" % condition)


def test_rating_page_fits_the_screen_and_keeps_its_place_and_focus(browser, tmp_path):
    a = photo_output(tmp_path, "vokens", (200, 40, 40))
    b = photo_output(tmp_path, "two_stage", (40, 160, 40))
    study = tmp_path / "study"
    assert run_cli("rate", "build", "--a", str(a), "--b", str(b), "-o", str(study), "--seed", "3") == 0
    url = (study / "raters" / "index.html").as_uri()

    wide = Offline(browser, ("file://",), viewport=WIDE)
    page = wide.page
    page.goto(url)
    assert not page.locator("#export").is_visible()  # nothing to download before a rater starts
    page.evaluate("document.getElementById('export').click()")
    start(page, url, "Zoë")
    loaded(page)
    page.screenshot(path=tmp_path / "rating-wide.png")  # the first screen
    # Both continuations begin on the first screen.
    assert page.locator("#side-a").bounding_box()["y"] < WIDE["height"]
    assert page.locator("#side-b").bounding_box()["y"] < WIDE["height"]
    # The arrow keys scroll, as on any page; they do not move the highlighted question.
    assert page.evaluate("document.documentElement.scrollHeight") > WIDE["height"]
    page.keyboard.press("ArrowDown")
    assert until(page, "window.scrollY > 0")
    assert "active" in page.locator(".question").first.get_attribute("class")

    # An answer updates its buttons in place: the same images, the page where it was, focus on the choice.
    questions = page.locator(".question")
    questions.nth(2).scroll_into_view_if_needed()
    page.evaluate("document.querySelectorAll('#pair img').forEach((i) => { i.dataset.kept = 'yes'; })")
    y = page.evaluate("window.scrollY")
    questions.nth(0).locator("button[data-choice=B]").click()
    assert page.evaluate("window.scrollY") == y
    assert page.evaluate("[...document.querySelectorAll('#pair img')].every((i) => i.dataset.kept === 'yes')")
    focused = "document.activeElement.id || document.activeElement.closest('.question').dataset.question + ':' + " \
              "document.activeElement.dataset.choice"
    assert page.evaluate(focused) == "language:B"
    assert "active" in questions.nth(1).get_attribute("class")
    page.keyboard.press("t")  # by key: the highlighted question, and focus stays where it was
    page.keyboard.press("3")
    assert "active" in questions.nth(2).get_attribute("class")
    page.keyboard.press("a")
    assert page.evaluate(focused) == "language:B"
    assert [questions.nth(q).locator("[aria-pressed=true]").inner_text() for q in range(3)] == ["B", "Tie", "A"]
    assert page.evaluate("[...document.querySelectorAll('#pair img')].every((i) => i.dataset.kept === 'yes')")
    page.screenshot(path=tmp_path / "rating-wide-answered.png")

    # Moving between stories keeps focus on a control that is still there.
    page.click("#next")
    assert page.inner_text("#pair-title") == "Story 2 of 2" and page.evaluate(focused) == "next"
    page.click("#prev")  # the first story: Previous is disabled, and focus goes to the story's title
    assert page.evaluate(focused) == "pair-title"
    page.keyboard.press("ArrowRight")
    for key in ("a", "b", "t"):
        page.keyboard.press(key)
    page.keyboard.press("ArrowRight")
    page.wait_for_selector("#done:not([hidden])")
    assert page.evaluate(focused) == "download"
    # The file is named after the rater, every letter kept.
    key = json.loads((study / "key.json").read_text())
    with page.expect_download() as download:
        page.keyboard.press("Enter")
    assert download.value.suggested_filename == f"answers-Zoë-{key['study']}.json"
    download.value.save_as(tmp_path / "zoe.json")
    assert json.loads((tmp_path / "zoe.json").read_text())["rater"] == "Zoë"
    assert wide.errors == [] and wide.blocked == []
    wide.context.close()

    # On a phone: the judged images near the screen's width, the continuations soon, the progress always in view.
    phone = Offline(browser, ("file://",), viewport=PHONE, is_mobile=True, has_touch=True)
    page = phone.page
    start(page, url, "bob")
    loaded(page)
    page.screenshot(path=tmp_path / "rating-phone-first-screen.png")
    page.screenshot(path=tmp_path / "rating-phone-page.png", full_page=True)
    for side in ("#side-a", "#side-b"):
        assert page.locator(side + " img").first.bounding_box()["width"] > 0.8 * PHONE["width"]
    assert page.locator("#side-a").bounding_box()["y"] < PHONE["height"]
    page.locator(".question").nth(2).locator("button[data-choice=tie]").tap()
    page.evaluate("window.scrollTo(0, document.documentElement.scrollHeight)")
    assert until(page, "window.scrollY > 0")
    assert page.locator("header").bounding_box()["y"] == 0
    assert "0 of 2 answered" in page.inner_text("#status")
    page.screenshot(path=tmp_path / "rating-phone-scrolled.png")
    assert phone.errors == [] and phone.blocked == []
    phone.context.close()


# The demo

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening_on(port: int) -> set[str]:
    """The local addresses a socket listens on at `port`, from /proc/net/tcp (IPv4, Linux)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`minigpt5 demo` with the shipped model, on a free port, and the file its output and errors go to;
    stopped with Ctrl-C at the end."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        _unavailable("gradio is not installed (pip install -e '.[test]')")
    port = _free_port()
    log = tmp_path_factory.mktemp("demo") / "demo.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "minigpt5_cli", "demo", "--port", str(port)], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 240
    while "the demo is at" not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.5)
    yield port, log
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0, log.read_text()
    assert "Traceback" not in log.read_text()


def test_demo_continues_a_story_with_text_and_images(browser, demo, tmp_path):
    from minigpt5_cli.toyworld.world import render

    port, _ = demo
    if Path("/proc/net/tcp").is_file():
        assert _listening_on(port) == {"127.0.0.1"}
    url = f"http://127.0.0.1:{port}/"
    session = Offline(browser, (url,), viewport=DESKTOP)
    page = session.page
    page.goto(url)
    box = page.locator("#step textarea")
    box.fill("Draw a red circle at the top left.")
    box.press("Enter")
    page.locator("[data-testid=bot] img").first.wait_for(timeout=180_000)
    assert "red circle" in page.locator(".bot-row").first.inner_text()  # the response's text, then its image

    # A second step with an uploaded picture, and markup in its text: the story goes on.
    render("green", "triangle", (2, 2)).save(tmp_path / "mine.png")
    page.set_input_files("#step input[type=file]", str(tmp_path / "mine.png"))
    page.locator("#step img").first.wait_for()
    box.fill("It moves. <img src=x onerror=\"document.title='pwned'\"> <script>document.title='pwned'</script>")
    box.press("Enter")
    page.wait_for_function("document.querySelectorAll('[data-testid=bot] img').length >= 2", timeout=180_000)
    users = page.locator("[data-testid=user]")
    assert "<img src=x onerror=" in users.nth(1).inner_text() and "<script>" in users.nth(1).inner_text()
    assert page.locator("[data-testid=user] img").count() == 1  # the upload; the markup made none
    page.get_by_text("Sampling settings").click()
    page.get_by_text("Diffusion steps").first.wait_for()
    assert page.title() != "pwned"
    page.screenshot(path=tmp_path / "demo.png", full_page=True)
    assert session.blocked == [], "the demo page asked for something outside this machine"
    phone = Offline(browser, (url,), viewport=PHONE, is_mobile=True)
    phone.page.goto(url)
    phone.page.locator("#step textarea").wait_for()
    phone.page.screenshot(path=tmp_path / "demo-phone.png", full_page=True)
    assert phone.blocked == []
    session.context.close()
    phone.context.close()


# Every element the page ever marks as an error (an error toast, a component's "Error" label), gone since or not;
# and how many submits were answered: the chat's progress mark hidden again.
WATCH = """window.marks = []; window.answered = 0;
new MutationObserver(changes => {
    document.querySelectorAll('.error').forEach(e => window.marks.push(e.className));
    for (const c of changes)
        if (c.type === 'attributes' && c.target.matches('#story .wrap.hide') && !/\\bhide\\b/.test(c.oldValue || ''))
            window.answered += 1;
}).observe(document.body, {subtree: true, childList: true, attributes: true, attributeFilter: ['class'],
                           attributeOldValue: true});"""


def test_demo_passes_over_an_empty_step_and_says_when_a_story_is_cut(browser, demo, tmp_path):
    port, log = demo
    url = f"http://127.0.0.1:{port}/"
    session = Offline(browser, (url,), viewport=DESKTOP)
    page = session.page
    page.goto(url)
    box = page.locator("#step textarea")
    box.wait_for()
    page.evaluate(WATCH)

    # Only spaces, then nothing at all: nothing happens, no error on the page or in the terminal. Each
    # submit is awaited to its answer: the box takes no other meanwhile.
    for answered, text in enumerate(("   ", ""), 1):
        box.fill(text)
        box.press("Enter")
        page.wait_for_function(f"window.answered >= {answered} || window.marks.length")
        assert page.evaluate("window.marks") == [] and box.input_value() == ""
        assert page.locator("[data-testid=user], [data-testid=bot]").count() == 0
    page.screenshot(path=tmp_path / "demo-empty.png", full_page=True)

    # A step longer than the model's prompt: a response, and a note that the story's start was dropped.
    step = "Draw a blue square at the bottom right. " * 60 + "Then draw a red circle at the top left."
    box.fill(step)
    box.press("Enter")
    page.locator("[data-testid=bot] img").first.wait_for(timeout=180_000)
    note = page.inner_text("#note")
    assert "The start of the story was dropped to fit the model's 256 tokens" in note  # its data.max_length
    page.screenshot(path=tmp_path / "demo-cut.png", full_page=True)
    assert page.locator("[data-testid=user]").count() == 1  # the empty steps left no trace
    assert page.evaluate("window.marks") == [] and session.errors == [] and session.blocked == []
    assert "Traceback" not in log.read_text()  # the empty steps were answered before this one

    page.get_by_role("button", name="New story").click()
    page.locator("#note").wait_for(state="hidden")
    session.context.close()
