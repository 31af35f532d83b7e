"""Every code block of README.md runs here, as a user would run it.

Blocks are fenced (```python, ```bash/sh/shell/console) or indented; the README writes its
commands as indented blocks. The rules:

- Python blocks run in README order; the blocks of one ``##`` section share a namespace, so a
  later block continues an earlier one. A fragment's inputs (a model, a batch, weights) come
  from INPUTS, keyed by (section, n-th Python block of the section); each must be a name the
  block uses without defining it, and the block must define every other name it uses. What a
  block states in its comments (``# == F.linear(x, W[idx], b[idx])``) is checked in CHECKS
  against plain PyTorch. The packaged MiniLM is swapped for a tiny BERT, so training takes
  seconds; every call is the real one.
- Command blocks run in a fresh working folder per section, which SETUP fills with what the
  section presupposes (data files, experts). Commands are split as a shell splits them (globs
  expand in the working folder); ``[--flag]`` runs with the flag. Each ``doe`` command runs as
  its own process through the installed entry point, with ``--model`` pointing at a tiny BERT
  folder where the command takes one. ``doe serve`` listens on a free port (``--port 0``), must
  answer ``/health``, and gets SIGTERM at the end of its block, after which it must exit 0;
  ``curl`` sends its request to that server. Results that a command's comment states are
  checked in ``_check_doe``.
- ``<!-- readme-test: skip (reason) -->`` right before a block skips it;
  ``<!-- readme-test: skip "PREFIX" (reason) -->`` skips the block's commands that start with
  PREFIX. Each skip is a reported pytest skip with its reason (``test_skipped``); a command
  this file cannot run (``pip``, ``python``) fails unless a marker skips it.
- An indented block that holds no command (the Layout tree) must name paths that exist.
"""

from __future__ import annotations

import ast
import builtins
import csv
import glob
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import doe
import doe.models
from doe.tasks import OFFLINE_TASKS, load_task
from doe.testing import assert_same_as, random_expert_indices, snapshot
from doe_kernels import interpreting
from doe_kernels.dispatch import triton_available, use_backend
from tiny_models import make_config, tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SHELL_LANGS = {"bash", "sh", "shell", "console"}
COMMANDS = {"doe", "pip", "python", "python3", "curl"}
MODEL_COMMANDS = {"localize", "eval", "run", "serve", "router"}  # doe subcommands that take --model
MARKER = re.compile(r'<!--\s*readme-test:\s*(.*?)\s*-->')
SKIP = re.compile(r'skip\s*(?:"([^"]+)"\s*)?\((.+)\)$')


# --------------------------------------------------------------------------- parsing


@dataclass
class Command:
    text: str                  # as written, continuation lines joined
    comment: str = ""          # the trailing comment on its line
    output: list = field(default_factory=list)  # comment lines right after it (a stated output)


@dataclass
class Block:
    line: int                  # README line of the block's first code line
    section: str
    lang: str                  # the fence's language; "" for an indented block
    code: str
    skips: list                # (prefix or None for the whole block, reason)
    bad_markers: list

    @property
    def kind(self) -> str:
        first = self.code.split(None, 1)[0] if self.code.strip() else ""
        if self.lang == "python":
            return "python"
        if self.lang in SHELL_LANGS or (not self.lang and first in COMMANDS):
            return "commands"
        if not self.lang and all(re.match(r"[\w.-]+(/[\w.-]+)*/\s", ln) or ln.startswith(" ")
                                 for ln in self.code.splitlines() if ln.strip()):
            return "tree"
        return "unknown"

    @property
    def skipped(self) -> str | None:
        return next((reason for prefix, reason in self.skips if prefix is None), None)

    def where(self) -> str:
        return f"README.md:{self.line} ({self.section})"


def _markers(lines: list[str], start: int) -> tuple[list, list]:
    """The readme-test markers on the comment and blank lines right above line ``start``."""
    skips, bad = [], []
    i = start - 1
    while i >= 0 and (not lines[i].strip() or lines[i].strip().startswith("<!--")):
        m = MARKER.search(lines[i])
        if m:
            s = SKIP.match(m.group(1))
            if s:
                skips.append((s.group(1), s.group(2)))
            else:
                bad.append(lines[i].strip())
        i -= 1
    return skips[::-1], bad


def parse_readme(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks, section, i = [], "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        fence = re.match(r"^( *)```(\w*)\s*$", line)
        if fence:
            indent, lang = fence.groups()
            j = i + 1
            while not re.match(rf"^{indent}```\s*$", lines[j]):
                j += 1
            code = "".join(ln[len(indent):] + "\n" for ln in lines[i + 1:j])
            blocks.append(Block(i + 2, section, lang, code, *_markers(lines, i)))
            i = j + 1
            continue
        prev = lines[i - 1].strip() if i else ""
        if line.startswith("    ") and (not prev or prev.startswith("<!--")):
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            while not lines[j - 1].strip():
                j -= 1
            code = "".join(ln[4:] + "\n" for ln in lines[i:j])
            blocks.append(Block(i + 1, section, "", code, *_markers(lines, i)))
            i = j
            continue
        i += 1
    return blocks


def split_commands(code: str) -> list[Command]:
    """Commands as a shell reads them: backslash continuations, quotes across lines, comments."""
    cmds, cur = [], ""
    for line in code.splitlines():
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            if cmds and line.strip():
                cmds[-1].output.append(line.lstrip()[1:].strip())
            continue
        cur += line + "\n"
        if line.endswith("\\"):
            continue
        try:
            shlex.split(cur, comments=True)
        except ValueError:  # a quote still open
            continue
        text = cur.replace("\\\n", " ").strip()
        m = re.search(r"\s#\s(.*)$", text.splitlines()[-1])
        cmds.append(Command(text[:len(text) - len(m.group(0))].strip() if m else text, m.group(1) if m else ""))
        cur = ""
    assert not cur, f"unfinished command: {cur!r}"
    return cmds


BLOCKS = parse_readme(README.read_text())


def _starts(cmd: Command, prefix: str) -> bool:
    return " ".join(cmd.text.split()).startswith(prefix)


def _skip_reason(block: Block, cmd: Command) -> str | None:
    return next((reason for prefix, reason in block.skips if prefix and _starts(cmd, prefix)), None)


def _argv(text: str, cwd: Path) -> list[str]:
    """shlex-split ``text``; ``[--flag]`` becomes ``--flag``; globs expand in ``cwd`` (sorted, as bash)."""
    argv = []
    for tok in shlex.split(text, comments=True):
        opt = re.fullmatch(r"\[(.+)\]", tok)
        if opt:
            argv += shlex.split(opt.group(1))
        elif any(c in tok for c in "*?"):
            argv += sorted(glob.glob(tok, root_dir=cwd)) or [tok]
        else:
            argv.append(tok)
    return argv


# --------------------------------------------------------------------------- the model and the data


def _tiny_bert() -> nn.Module:
    config = make_config("bert")
    config.max_position_embeddings = 512  # room for `doe serve`'s --max-tokens default
    torch.manual_seed(0)
    from transformers import BertModel

    return BertModel(config).eval()


def _tokenizer(tasks=OFFLINE_TASKS):
    data = [load_task(t) for t in tasks]
    return tiny_tokenizer([e.text for d in data for e in d.train + d.eval],
                          [w for d in data for w in d.spec.label_words])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models gain nothing from a second thread, and a job on the other core would stall it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-bert")
    _tiny_bert().save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


def _write_csv(path: Path, rows) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return len(rows)


def _balanced(task: str, labels: list[str], split: str, per_label: int):
    d = load_task(task)
    rows = d.train if split == "train" else d.eval
    return [(e.text, labels[k]) for k in range(len(labels)) for e in [e for e in rows if e.label == k][:per_label]]


# --------------------------------------------------------------------------- Python blocks


def _free_names(code: str) -> set[str]:
    tree = ast.parse(code)
    loaded, bound = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
    return loaded - bound - set(dir(builtins))


@pytest.fixture
def quick_start(monkeypatch, tmp_path):
    """load_minilm gives a tiny BERT (and its tokenizer); the blocks write into tmp_path."""
    model = _tiny_bert()
    tok = _tokenizer(("offline_sentiment", "offline_question"))
    monkeypatch.setattr(doe.models, "load_minilm", lambda **kw: (tok, model))
    monkeypatch.chdir(tmp_path)
    return {"snapshot": snapshot(model)}


def _mixed_inputs(ns, ctx):
    model = _tiny_bert()
    tok = _tokenizer(("offline_sentiment", "offline_topic"))
    batch = tok(["What a wonderful film.", "Stocks fell sharply today.", "Is it raining?", "Awful, boring plot."],
                padding=True, return_tensors="pt")
    e_sent, e_topic = (doe.TaskExpert.from_indices(model, random_expert_indices(model, 0.35, seed=s), task=t)
                       for s, t in ((1, "sentiment"), (2, "topic")))
    return {"doe": doe, "model": model, "batch": batch, "e_sent": e_sent, "e_topic": e_topic}


def _kernel_inputs(ns, ctx):
    torch.manual_seed(0)
    up, gate, down = nn.Linear(768, 3072), nn.Linear(768, 3072), nn.Linear(3072, 768)
    return {"x": torch.randn(2, 5, 768), "h": torch.randn(2, 5, 3), "up": up, "gate": gate, "down": down}


INPUTS = {
    ("Quick start (Python)", 1): lambda ns, ctx: {"expert": ns["result"].expert},
    ("Mixed-task batches: many experts in one forward", 0): _mixed_inputs,
    ("The kernels (`doe_kernels`)", 0): _kernel_inputs,
}


def _check_quick_start(ns, ctx):
    model = ns["model"]
    assert not doe.is_unplugged(model)                       # the original modules back after
    assert_same_as(model, ctx["snapshot"])                   # ... exactly
    assert abs(ns["result"].expert.keep_ratio - 0.35) < 0.02  # keep 35%
    for task in ns["data"]:
        folder = Path("experts") / task                      # JSON config + safetensors
        assert sorted(p.suffix for p in folder.iterdir()) == [".json", ".safetensors"]
        assert doe.TaskExpert.from_pretrained(folder).task == task
    lines = ctx["capsys"].readouterr().out.splitlines()
    assert len(lines) == 2, lines
    routed, named = (ln.split() for ln in lines)
    assert routed[0] == "0" and routed[1] in ns["data"]
    assert named[:3] == ["1", "offline_question", "offline_question"]
    assert named[3] in ns["data"]["offline_question"].spec.labels and 0.0 <= float(named[4]) <= 1.0


def _check_model_lock(ns, ctx):
    model = ns["model"]
    assert doe.current_expert(model) is ns["expert"]
    assert ns["out"].last_hidden_state.shape[0] == ns["batch"]["input_ids"].shape[0]
    doe.restore_(model)
    assert_same_as(model, ctx["snapshot"])


def _check_mixed(ns, ctx):
    model, batch, out = ns["model"], ns["batch"], ns["out"].last_hidden_state
    doe.restore_(model)
    with torch.no_grad():
        dense = model(**batch).last_hidden_state
        alone = {}
        for task, expert in (("sentiment", ns["e_sent"]), ("topic", ns["e_topic"])):
            with doe.unplugged(model, expert):
                alone[task] = model(**batch).last_hidden_state
    for row, task in enumerate(["sentiment", "topic", None, "sentiment"]):  # None: a dense row
        want = dense if task is None else alone[task]
        torch.testing.assert_close(out[row], want[row], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(alone["sentiment"][0], dense[0], atol=1e-3)  # the experts do change the rows


def _check_kernels(ns, ctx):
    x, h, up, gate, down, idx = (ns[k] for k in ("x", "h", "up", "gate", "down", "idx"))
    i = idx.long()
    with torch.no_grad():
        torch.testing.assert_close(ns["y"], F.linear(x, up.weight[i], up.bias[i]))     # F.linear(x, W[idx], b[idx])
        torch.testing.assert_close(ns["z"], F.linear(h, down.weight[:, i], down.bias))  # F.linear(h, W[:, idx], b)
        torch.testing.assert_close(ns["g"], F.silu(x @ gate.weight[i].T) * (x @ up.weight[i].T))
    assert idx.tolist() == [0, 5, 9]


CHECKS = {
    ("Quick start (Python)", 0): _check_quick_start,
    ("Quick start (Python)", 1): _check_model_lock,
    ("Mixed-task batches: many experts in one forward", 0): _check_mixed,
    ("The kernels (`doe_kernels`)", 0): _check_kernels,
}
CONTEXTS = {"Quick start (Python)": "quick_start"}  # a fixture a section's blocks run in


def _python_sections() -> list[str]:
    return list(dict.fromkeys(b.section for b in BLOCKS if b.kind == "python" and not b.skipped))


def _run_python_section(section: str, ctx: dict, backend: str | None = None) -> None:
    ns: dict = {"__name__": "__readme__"}
    blocks = [b for b in BLOCKS if b.kind == "python" and b.section == section]
    for n, block in enumerate(blocks):
        if block.skipped:
            continue
        given = INPUTS.get((section, n), lambda ns, ctx: {})(ns, ctx)
        free = _free_names(block.code)
        assert set(given) <= free, f"{block.where()}: INPUTS gives {sorted(set(given) - free)}, which it defines"
        missing = free - set(given) - set(ns)
        assert not missing, f"{block.where()}: uses {sorted(missing)} without defining them"
        ns.update(given)
        with use_backend(backend or "auto"):
            exec(compile(block.code, f"README.md:{block.line}", "exec"), ns)
        if (section, n) in CHECKS:
            CHECKS[(section, n)](ns, ctx)


@pytest.mark.parametrize("section", _python_sections())
def test_python_blocks(section, request, capsys):
    ctx = dict(request.getfixturevalue(CONTEXTS[section]) if section in CONTEXTS else {}, capsys=capsys)
    _run_python_section(section, ctx)


def test_kernel_block_on_triton():
    """The kernels block once more, on the Triton kernels (interpreted on CPU)."""
    section = "The kernels (`doe_kernels`)"
    if not (triton_available() and interpreting()):
        pytest.skip("needs triton and TRITON_INTERPRET=1 (CPU tensors)")
    _run_python_section(section, {}, backend="triton")


# --------------------------------------------------------------------------- command blocks


def _setup_cli(cwd: Path) -> dict:
    rows = {
        "data/reviews/train.csv": _write_csv(cwd / "data/reviews/train.csv",
                                             _balanced("offline_sentiment", ["neg", "pos"], "train", 20)),
        "data/questions/train.csv": _write_csv(cwd / "data/questions/train.csv",
                                               _balanced("offline_question", ["statement", "question"], "train", 20)),
        "data/questions/test.csv": _write_csv(cwd / "data/questions/test.csv",
                                              _balanced("offline_question", ["statement", "question"], "eval", 8)),
    }
    requests = [{"text": "What a wonderful film."}, {"text": "Is it raining?", "task": "questions"},
                {"text": "The plot was dull and far too long.", "task": "reviews"}, {"text": "Where is the station?"}]
    (cwd / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    return {"rows": rows, "requests": requests}


def _setup_serving(cwd: Path, model_dir: Path) -> dict:
    """The experts and router that the section's request names: offline_spam and offline_question."""
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()
    config = doe.ExpertSearchConfig(prompt=doe.PromptTuningConfig(epochs=2, show_progress=False),
                                    attribution=doe.AttributionConfig(show_progress=False), retune_epochs=0)
    data = {t: load_task(t, max_train=48, max_eval=8) for t in ("offline_spam", "offline_question")}
    for task, d in data.items():
        doe.find_expert(model, tok, d, config).expert.save_pretrained(cwd / "experts" / task)
    doe.TaskRouter.fit(model, tok, {t: [e.text for e in d.train] for t, d in data.items()}).save_pretrained(
        cwd / "router")
    return {"tasks": {t: d.spec.labels for t, d in data.items()}}


SETUP = {"Quick start (command line)": lambda cwd, model_dir: _setup_cli(cwd),
         "Serving over HTTP": _setup_serving}


def _doe_exe() -> list[str]:
    script = Path(sys.executable).with_name("doe")
    return [str(script)] if script.exists() else [sys.executable, "-m", "doe.cli"]


class Server:
    """A `doe serve` process: started on a free port, stopped with SIGTERM."""

    def __init__(self, argv, cwd, env, written_port: str):
        self.written_port = written_port
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.stderr: list[str] = []
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        self.port = None
        timer = threading.Timer(180, self.proc.kill)
        timer.start()
        try:
            for line in self.proc.stdout:
                m = re.search(r"ready on http://[^:]+:(\d+)", line)
                if m:
                    self.port = m.group(1)
                    break
            assert self.port, f"doe serve never got ready:\n{''.join(self.stderr)}"
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=30) as r:
                assert r.status == 200
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            timer.cancel()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=60)
        self.proc.stdout.close()
        assert rc == 0, f"doe serve exited {rc} on SIGTERM:\n{''.join(self.stderr)}"
        assert "Traceback" not in "".join(self.stderr), "".join(self.stderr)


def _curl(argv: list[str], servers: list[Server]):
    """The request of a `curl URL -H ... -d ...` line, sent with urllib to the server it names."""
    url, headers, data, it = None, {}, None, iter(argv[1:])
    for a in it:
        if a == "-H":
            k, _, v = next(it).partition(":")
            headers[k.strip()] = v.strip()
        elif a == "-d":
            data = next(it).encode()
        elif not a.startswith("-"):
            url = a
    server = next(s for s in servers if f":{s.written_port}/" in url)
    url = url.replace(f":{server.written_port}/", f":{server.port}/")
    url = url if "://" in url else "http://" + url
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200
        return json.loads(r.read())


def _stated_items(output: list[str]) -> list[dict]:
    """The items of a stated JSON output that the README abbreviates with `...`: key -> raw value."""
    text = " ".join(output)
    return [dict(re.findall(r'"(\w+)":("[^"]*"|true|false|null|-?[\d.]+)', item))
            for item in re.findall(r"\{(.*?)\}", text)]


def _check_curl(cmd: Command, answer, state):
    sent = json.loads(shlex.split(cmd.text)[shlex.split(cmd.text).index("-d") + 1])
    stated = _stated_items(cmd.output)
    assert isinstance(answer, list) and len(answer) == len(sent) == len(stated), answer
    for item, got, want in zip(sent, answer, stated):
        assert set(want) <= set(got), f"keys {sorted(set(want) - set(got))} missing from {got}"
        assert got["routed"] == json.loads(want["routed"]) == ("task" not in item)
        assert got["task"] == item.get("task", got["task"]) and got["task"] in state["tasks"]
        assert got["label"] in state["tasks"][got["task"]]


def _check_doe(argv: list[str], cmd: Command, proc, cwd: Path, state: dict):
    """What a doe command's line or comment says it does."""
    sub = argv[1]
    opts = {a: argv[i + 1] for i, a in enumerate(argv[:-1]) if a.startswith("--")}
    if sub == "localize":
        keeps = [float(argv[i + 1]) for i, a in enumerate(argv) if a == "--keep"] or [0.35]
        for keep in keeps:
            folder = cwd / opts["--out"] / (f"keep{keep}" if len(keeps) > 1 else "")
            expert = doe.TaskExpert.from_pretrained(folder)
            assert abs(expert.keep_ratio - keep) < 0.02
            task = opts.get("--task") or Path(opts["--train"]).parent.name  # data/reviews/train.csv -> reviews
            assert expert.task == task
    elif sub == "eval":
        report = json.loads(proc.stdout) if "--json" in argv else None
        if "20% of train.csv held out" in cmd.comment:  # experts/reviews was found on data/reviews/train.csv
            n = int(re.search(r"(\d+) held-out examples", proc.stdout).group(1))
            assert n == round(0.2 * state["rows"][f"data/{Path(opts['--experts']).name}/train.csv"])
        if report:  # one row per expert, named by its folder, after the dense row
            experts = argv[argv.index("--experts") + 1:]
            experts = experts[:next((i for i, a in enumerate(experts) if a.startswith("--")), len(experts))]
            assert [r["name"].split(" ")[0] for r in report["rows"][1:]] == [Path(e).name for e in experts]
    elif sub == "router":
        assert doe.TaskRouter.from_pretrained(cwd / opts["--out"])
    elif sub == "run":
        results = [json.loads(x) for x in (cwd / opts["--out"]).read_text().splitlines()]
        assert len(results) == len(state["requests"])
        for req, res in zip(state["requests"], results):
            assert res["error"] is None and res["label"] is not None, res
            assert res["task"] == req.get("task", res["task"])
    elif sub == "tasks":  # registered tasks: offline suite, GLUE, IMDB, AG News
        names = {ln.split()[0] for ln in proc.stdout.splitlines()}
        assert set(OFFLINE_TASKS) | {"sst2", "imdb", "ag_news"} <= names


def _command_sections() -> list[str]:
    return list(dict.fromkeys(b.section for b in BLOCKS if b.kind == "commands" and not b.skipped))


@pytest.mark.parametrize("section", _command_sections())
def test_command_blocks(section, tmp_path, model_dir):
    cwd = tmp_path / "work"
    cwd.mkdir()
    env = {**os.environ, "HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "HF_HOME": str(tmp_path / "hf"), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    state = SETUP[section](cwd, model_dir) if section in SETUP else {}
    ran = 0
    for block in [b for b in BLOCKS if b.kind == "commands" and b.section == section and not b.skipped]:
        servers = []
        try:
            for cmd in split_commands(block.code):
                if _skip_reason(block, cmd):
                    continue
                argv = _argv(cmd.text, cwd)
                where = f"{block.where()}: `{cmd.text}`"
                if argv[0] == "curl":
                    _check_curl(cmd, _curl(argv, servers), state)
                    continue
                assert argv[0] == "doe", f"{where}: no way to run this here; mark it <!-- readme-test: skip ... -->"
                if argv[1] in MODEL_COMMANDS:
                    argv += ["--model", str(model_dir)]
                full = _doe_exe() + argv[1:]
                if argv[1] == "serve":
                    if "--port" not in full:
                        full += ["--port", "8000"]
                    at = full.index("--port") + 1
                    written, full[at] = full[at], "0"
                    servers.append(Server(full, cwd, env, written))
                    ran += 1
                    continue
                proc = subprocess.run(full, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
                assert "Traceback" not in proc.stderr, f"{where}:\n{proc.stderr}"
                assert proc.returncode == 0, f"{where} exited {proc.returncode}:\n{proc.stderr}"
                _check_doe(argv, cmd, proc, cwd, state)
                ran += 1
        finally:
            for s in servers:
                s.stop()
    assert ran


# --------------------------------------------------------------------------- the rest


def test_every_block_is_known():
    assert BLOCKS
    for b in BLOCKS:
        assert not b.bad_markers, f'{b.where()}: expected skip (reason) or skip "PREFIX" (reason), got {b.bad_markers}'
        assert b.kind != "unknown" or b.skipped, f"{b.where()}: no runner for this block; mark it skipped with a reason"
        if b.kind == "commands":
            cmds = split_commands(b.code)
            for prefix, _ in b.skips:
                assert prefix is None or any(_starts(c, prefix) for c in cmds), \
                    f"{b.where()}: the skip marker for {prefix!r} matches no command"
    keys = {(b.section, n) for s in {b.section for b in BLOCKS}
            for n, b in enumerate(b for b in BLOCKS if b.kind == "python" and b.section == s)}
    assert set(INPUTS) | set(CHECKS) <= keys, f"stale keys: {sorted(set(INPUTS) | set(CHECKS) - keys)}"
    assert set(SETUP) <= set(_command_sections())


def test_test_command_is_a_block():
    """CI runs the line after <!-- test-command -->: it is the first line of a (skipped) command block."""
    lines = README.read_text().splitlines()
    at = lines.index("<!-- test-command -->") + 2
    block = next(b for b in BLOCKS if b.line == at)
    assert block.kind == "commands" and block.skipped and "pytest" in block.code


def test_layout_paths_exist():
    trees = [b for b in BLOCKS if b.kind == "tree"]
    assert trees
    for b in trees:
        for ln in b.code.splitlines():
            m = re.match(r"([\w./-]+/)\s", ln)
            if m:
                assert (ROOT / m.group(1)).is_dir(), f"{b.where()}: {m.group(1)} does not exist"


def _skips():
    for b in BLOCKS:
        for prefix, reason in b.skips:
            what = prefix or b.code.strip().splitlines()[0]
            yield pytest.param(b, prefix, reason, id=f"L{b.line}-{what[:40]}")


@pytest.mark.parametrize("block,prefix,reason", list(_skips()))
def test_skipped(block, prefix, reason):
    what = f"`{prefix}` commands of the block" if prefix else f"block `{block.code.strip().splitlines()[0]}`"
    pytest.skip(f"{block.where()}: {what}: {reason}")
