"use strict";
// One rater's pass through the study. Every text reaches the page through textContent, never as
// markup. Answers are kept in localStorage after each change, so a reload or a closed tab loses
// nothing, and leave the browser only as the downloaded JSON file. The story on screen is built
// once; an answer only updates its buttons, so the page neither moves nor loses keyboard focus.
(function () {
  const data = JSON.parse(document.getElementById("study-data").textContent);
  const KEY = "minigpt5-rating:" + data.study;
  const CHOICES = [["A", "A"], ["B", "B"], ["tie", "Tie"]];
  const $ = (id) => document.getElementById(id);
  let state = load();
  let unsaved = false;  // this browser refused to store the answers
  let built = null;  // the story on screen: {state, k}

  function now() { return new Date().toISOString(); }

  function load() {
    try {
      const s = JSON.parse(localStorage.getItem(KEY));
      if (s && s.study === data.study && s.seed === data.seed && s.order.length === data.pairs.length) return s;
    } catch (e) { /* nothing stored, or not ours */ }
    return null;
  }

  function save() {
    try {
      localStorage.setItem(KEY, JSON.stringify(state));
    } catch (e) {
      unsaved = true;
    }
  }

  // FNV-1a, then mulberry32: the rater's order follows from the study seed and the rater id alone.
  function hash32(text) {
    let h = 0x811c9dc5;
    for (let i = 0; i < text.length; i++) h = Math.imul(h ^ text.charCodeAt(i), 0x01000193);
    return h >>> 0;
  }

  function mulberry32(seed) {
    let a = seed;
    return function () {
      a = (a + 0x6d2b79f5) | 0;
      let t = Math.imul(a ^ (a >>> 15), 1 | a);
      t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
      return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    };
  }

  function begin(rater) {
    const raterSeed = hash32(data.seed + ":" + rater);
    const rng = mulberry32(raterSeed);
    const order = data.pairs.map((_, i) => i);
    for (let i = order.length - 1; i > 0; i--) {
      const j = Math.floor(rng() * (i + 1));
      [order[i], order[j]] = [order[j], order[i]];
    }
    const n = order.length;
    state = {
      study: data.study, seed: data.seed, rater: rater, rater_seed: raterSeed, started: now(), order: order,
      shown: order.map(() => (rng() < 0.5 ? [0, 1] : [1, 0])),  // which continuation is A, which is B
      answers: order.map(() => ({})), first_shown: Array(n).fill(null), answered: Array(n).fill(null),
      current: 0, question: 0, finished: false,
    };
    save();
    render();
  }

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = text;
    if (cls) node.className = cls;
    return node;
  }

  function image(src, alt) {
    const img = el("img");
    img.alt = alt;
    img.addEventListener("load", () => { if (img.naturalWidth < 192) img.classList.add("small"); });
    img.src = src;
    return img;
  }

  function questionRows() {
    return data.questions.map((q, i) => {
      const row = el("div", null, "question");
      const text = el("p", (i + 1) + ". " + q.text);
      text.id = "question-" + i;
      row.setAttribute("role", "group");
      row.setAttribute("aria-labelledby", text.id);
      row.dataset.question = q.key;
      const choices = el("div", null, "choices");
      for (const [value, label] of CHOICES) {
        const b = el("button", label);
        b.type = "button";
        b.dataset.choice = value;
        b.addEventListener("click", () => answer(i, value, false));
        choices.append(b);
      }
      row.append(text, choices);
      $("questions").append(row);
      return row;
    });
  }
  const rows = questionRows();

  function showSegments(target, responses) {
    target.replaceChildren();
    responses.forEach((segments, k) => {
      if (k) target.append(el("hr"));
      for (const seg of segments) {
        target.append(seg.image ? image(seg.image, "generated image") : el("p", seg.text));
      }
    });
  }

  function answeredCount() {
    return state.answers.filter((a) => data.questions.every((q) => a[q.key])).length;
  }

  function showPair(k) {
    const pair = data.pairs[state.order[k]];
    $("pair-title").textContent = "Story " + (k + 1) + " of " + data.pairs.length;
    const context = $("context");
    context.replaceChildren();
    for (const step of pair.context) {
      const card = el("div", null, "step");
      if (step.text) card.append(el("p", step.text));
      if (step.image) card.append(image(step.image, "story image"));
      context.append(card);
    }
    showSegments($("side-a"), pair.continuations[state.shown[k][0]]);
    showSegments($("side-b"), pair.continuations[state.shown[k][1]]);
    built = { state: state, k: k };
  }

  // Focus stays where the rater put it; when that control is gone (hidden, disabled), it goes to
  // `fallback`, without scrolling.
  function settle(fallback) {
    const f = document.activeElement;
    if (!f || f === document.body || f.disabled || !f.offsetParent) fallback.focus({ preventScroll: true });
  }

  function render() {
    for (const id of ["start", "pair", "done"]) $(id).hidden = true;
    $("bar").hidden = $("restart").hidden = !state;
    if (!state) {
      $("intro").textContent = data.pairs.length + " stories to compare.";
      $("start").hidden = false;
      $("rater").focus();
      return;
    }
    const n = data.pairs.length, done = answeredCount();
    $("progress").max = n;
    $("progress").value = done;
    $("status").textContent = (state.finished ? "Review" : "Story " + (state.current + 1) + " of " + n) +
      " · " + done + " of " + n + " answered · rater " + state.rater +
      (unsaved ? " · this browser does not keep answers: download them before leaving" : "");
    if (state.finished) {
      $("done-text").textContent = done === n
        ? "You answered every story. Download your answers and send the file to the study's organiser."
        : (n - done) + " of " + n + " stories still lack an answer; you can download what you have now.";
      $("done").hidden = false;
      settle($("download"));
      return;
    }
    const k = state.current;
    if (!state.first_shown[k]) {
      state.first_shown[k] = now();
      save();
    }
    $("pair").hidden = false;
    if (!built || built.state !== state || built.k !== k) showPair(k);
    rows.forEach((row, i) => {
      row.classList.toggle("active", i === state.question);
      for (const b of row.querySelectorAll("button")) {
        b.setAttribute("aria-pressed", String(state.answers[k][data.questions[i].key] === b.dataset.choice));
      }
    });
    $("prev").disabled = k === 0;
    $("next").textContent = k === n - 1 ? "Finish →" : "Next →";
    settle($("pair-title"));
  }

  function answer(i, value, byKey) {
    const k = state.current;
    state.answers[k][data.questions[i].key] = value;
    state.answered[k] = now();
    const open = data.questions.findIndex((q, j) => j > i && !state.answers[k][q.key]);
    state.question = open >= 0 ? open : i;
    save();
    render();
    if (byKey) rows[state.question].scrollIntoView({ block: "nearest" });  // the highlighted question, in view
  }

  function go(step) {
    const k = state.current + step;
    if (k < 0) return;
    if (k >= data.pairs.length) {
      state.finished = true;
    } else {
      state.current = k;
      const open = data.questions.findIndex((q) => !state.answers[k][q.key]);
      state.question = open >= 0 ? open : 0;
    }
    save();
    window.scrollTo(0, 0);
    render();
  }

  // The rater's id in the file name, every letter of it kept: only what a file system refuses goes.
  function fileName(rater) {
    const safe = Array.from(rater.replace(/[\u0000-\u001f\u007f<>:"\/\\|?*]+/g, "_")).slice(0, 60).join("");
    return "answers-" + (safe.replace(/^[\s.]+|[\s.]+$/g, "") || "rater") + "-" + data.study + ".json";
  }

  function download() {
    if (!state) return;
    const doc = {
      format: "minigpt5-rating", study: data.study, seed: data.seed, rater: state.rater,
      rater_seed: state.rater_seed, started: state.started, exported: now(),
      questions: data.questions.map((q) => q.key),
      pairs: state.order.map((index, k) => ({
        id: data.pairs[index].id, position: k + 1, shown: state.shown[k], answers: state.answers[k],
        first_shown: state.first_shown[k], answered: state.answered[k],
      })),
    };
    const blob = new Blob([JSON.stringify(doc, null, 2)], { type: "application/json" });
    const link = el("a");
    link.href = URL.createObjectURL(blob);
    link.download = fileName(state.rater);
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  }

  $("start-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const rater = $("rater").value.trim();
    if (rater) begin(rater);
  });
  $("prev").addEventListener("click", () => go(-1));
  $("next").addEventListener("click", () => go(1));
  $("export").addEventListener("click", download);
  $("download").addEventListener("click", download);
  $("review").addEventListener("click", () => {
    state.finished = false;
    const open = state.answers.findIndex((a) => !data.questions.every((q) => a[q.key]));
    state.current = open >= 0 ? open : 0;
    save();
    window.scrollTo(0, 0);
    render();
  });
  $("restart").addEventListener("click", () => {
    if (!confirm("Forget these answers in this browser and start over? Download them first to keep them.")) return;
    try { localStorage.removeItem(KEY); } catch (e) { /* nothing was kept */ }
    state = null;
    render();
  });
  // The arrow keys up and down, page keys and space are left to the browser: they scroll.
  document.addEventListener("keydown", (event) => {
    if (!state || state.finished || event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.target instanceof HTMLInputElement) return;
    const key = event.key.toLowerCase(), number = Number(key);
    const choice = { a: "A", b: "B", t: "tie" }[key];
    if (choice) answer(state.question, choice, true);
    else if (Number.isInteger(number) && number >= 1 && number <= data.questions.length) {
      state.question = number - 1;
      save();
      render();
      rows[state.question].scrollIntoView({ block: "nearest" });
    } else if (key === "arrowright") go(1);
    else if (key === "arrowleft") go(-1);
    else return;
    event.preventDefault();
  });
  render();
})();
