"""The unplug-and-play runtime and the task router, on a tiny BERT with two offline tasks.

Each result is compared with running the same request by hand: the task's TaskModel on the
model unplugged with that task's expert (or on the dense model).
"""

import threading

import pytest
import torch

import doe
from doe.attribution import AttributionConfig
from doe.localize import ExpertSearchConfig, LocalizationConfig, find_expert
from doe.prompt import PromptTuningConfig, TaskModel
from doe.router import TaskRouter
from doe.runtime import Request, UnplugAndPlay
from doe.tasks import load_task
from doe.testing import assert_same_as, gathered_wrappers, snapshot
from tiny_models import make_tiny, tiny_tokenizer

TASKS = ("offline_sentiment", "offline_topic")
QUIET = dict(show_progress=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data = {t: load_task(t, max_train=48, max_eval=16) for t in TASKS}
    words = [w for d in data.values() for w in d.spec.label_words]
    tok = tiny_tokenizer([e.text for d in data.values() for e in d.train], words)
    model = make_tiny("bert")
    config = ExpertSearchConfig(prompt=PromptTuningConfig(num_tokens=4, epochs=2, **QUIET),
                                attribution=AttributionConfig(**QUIET),
                                localization=LocalizationConfig(keep_ratio=0.35), retune_epochs=1)
    folders = {}
    for t in TASKS:
        result = find_expert(model, tok, data[t], config)
        folders[t] = result.expert.save_pretrained(tmp_path_factory.mktemp(t))
    router = TaskRouter.fit(model, tok, {t: [e.text for e in data[t].train] for t in TASKS})
    return model, tok, data, folders, router


def by_hand(model, tok, expert, spec, texts, on_expert=True):
    prompt = expert.prompt if on_expert else expert.dense_prompt
    head = expert.head if on_expert else expert.dense_head
    tm = TaskModel(model, tok, spec, prompt=prompt, head=head)
    examples = [doe.tasks.Example(t, 0) for t in texts]
    with torch.no_grad():
        if on_expert:
            with doe.unplugged(model, expert):
                logits = tm(**tm.encode(examples))
        else:
            logits = tm(**tm.encode(examples))
    return logits.argmax(-1).tolist()


def test_named_requests_run_on_their_expert_and_model_is_restored(setup):
    model, tok, data, folders, _ = setup
    snap = snapshot(model)
    rt = UnplugAndPlay(model, tok, max_batch=4)
    experts = {t: rt.add_expert(folders[t]) for t in TASKS}
    stream = [("offline_sentiment", e.text) for e in data["offline_sentiment"].eval[:6]]
    stream += [("offline_topic", e.text) for e in data["offline_topic"].eval[:5]]
    stream += [("offline_sentiment", e.text) for e in data["offline_sentiment"].eval[6:8]]
    results = rt.process([{"text": text, "task": task, "id": f"r{i}"} for i, (task, text) in enumerate(stream)])
    assert [r.id for r in results] == [f"r{i}" for i in range(len(stream))]
    assert all(r.error is None and not r.routed for r in results)
    for task in TASKS:
        idx = [i for i, (t, _) in enumerate(stream) if t == task]
        want = by_hand(model, tok, experts[task], data[task].spec, [stream[i][1] for i in idx])
        assert [results[i].label_id for i in idx] == want
        assert all(results[i].expert == task and results[i].label == data[task].spec.labels[results[i].label_id]
                   for i in idx)
    # Batching: 6 sentiment -> 4 + 2, then 5 topic -> 4 + 1, then 2 sentiment.
    assert [r.batch_size for r in results] == [4] * 4 + [2] * 2 + [4] * 4 + [1] + [2] * 2
    summary = rt.summary()
    assert summary["requests"] == len(stream) and summary["errors"] == 0
    assert summary["switches"] == 4  # in, switch, switch back, restore when idle
    assert not doe.is_unplugged(model) and not gathered_wrappers(model)
    assert_same_as(model, snap)


def test_router_identifies_tasks_and_low_confidence_falls_back_to_dense(setup):
    model, tok, data, folders, router = setup
    held_out = {t: [e.text for e in data[t].eval] for t in TASKS}
    accuracy = router.accuracy(model, tok, held_out)
    assert accuracy > 0.5  # better than chance on two tasks, even for a tiny random model
    texts = held_out["offline_topic"][:6]
    tasks, confs = router.route(model, tok, texts)
    rt = UnplugAndPlay(model, tok, router=router, threshold=0.0)
    experts = {t: rt.add_expert(folders[t]) for t in TASKS}
    results = rt.process(texts)
    assert [r.task for r in results] == tasks and all(r.routed for r in results)
    torch.testing.assert_close(torch.tensor([r.route_confidence for r in results]), torch.tensor(confs))
    strict = UnplugAndPlay(model, tok, router=router, threshold=1.0)
    for t in TASKS:
        strict.add_expert(folders[t])
    dense = strict.process(texts)
    assert all(r.expert == "dense" for r in dense)
    for r, text in zip(dense, texts):
        assert r.label_id == by_hand(model, tok, experts[r.task], data[r.task].spec, [text], on_expert=False)[0]


def test_router_round_trips(setup, tmp_path):
    model, tok, data, _, router = setup
    loaded = TaskRouter.from_pretrained(router.save_pretrained(tmp_path / "router"))
    texts = [e.text for e in data["offline_sentiment"].eval[:4]]
    assert loaded.route(model, tok, texts) == router.route(model, tok, texts)
    with pytest.raises(FileNotFoundError, match="not a router folder"):
        TaskRouter.from_pretrained(tmp_path / "nowhere")


def test_bad_requests_get_errors_and_the_rest_are_served(setup):
    model, tok, data, folders, _ = setup
    rt = UnplugAndPlay(model, tok)
    rt.add_expert(folders["offline_sentiment"])
    results = rt.process([
        {"text": "fine", "task": "offline_sentiment"},
        {"text": "who knows", "task": "offline_weather"},
        {"text": "no task and no router"},
    ])
    assert results[0].error is None
    assert "unknown task 'offline_weather'" in results[1].error
    assert "no router" in results[2].error
    for bad, message in [({"txt": "x"}, "unknown fields"), (42, "expected a Request, dict or str"),
                         ({"text": 5}, "'text' must be a string")]:
        with pytest.raises((ValueError, TypeError), match=message):
            rt.process([bad])
    assert not doe.is_unplugged(model)


def test_a_failing_batch_reports_its_error_and_leaves_the_model_usable(setup, monkeypatch):
    model, tok, data, folders, _ = setup
    rt = UnplugAndPlay(model, tok)
    rt.add_expert(folders["offline_sentiment"])
    entry = rt._entries["offline_sentiment"]

    def boom(*a, **k):
        raise RuntimeError("device on fire")

    monkeypatch.setattr(entry.on_expert, "encode", boom)
    results = rt.process([{"text": "ok", "task": "offline_sentiment"}])
    assert "device on fire" in results[0].error
    monkeypatch.undo()
    assert rt.process([{"text": "ok", "task": "offline_sentiment"}])[0].error is None
    assert not doe.is_unplugged(model)


def test_add_expert_validates(setup, tmp_path):
    model, tok, _, folders, _ = setup
    rt = UnplugAndPlay(model, tok)
    other = doe.TaskExpert.from_pretrained(folders["offline_topic"])
    llama = make_tiny("llama")
    with pytest.raises(ValueError, match="built for a 'bert' model"):
        UnplugAndPlay(llama, tok).add_expert(other)
    with pytest.raises(FileNotFoundError, match="not an expert folder"):
        rt.add_expert(tmp_path / "missing")
    bare = doe.TaskExpert(other.indices, other.num_neurons, model_type="bert", task="offline_topic")
    with pytest.raises(ValueError, match="carries no prompt"):
        rt.add_expert(bare)
    with pytest.raises(ValueError, match="threshold"):
        UnplugAndPlay(model, tok, threshold=1.5)


def test_threads_get_their_own_experts(setup):
    model, tok, data, folders, _ = setup
    rt = UnplugAndPlay(model, tok)
    experts = {t: rt.add_expert(folders[t]) for t in TASKS}
    texts = {t: [e.text for e in data[t].eval[:4]] for t in TASKS}
    want = {t: by_hand(model, tok, experts[t], data[t].spec, texts[t]) for t in TASKS}
    failures = []

    def worker(task):
        for _ in range(4):
            got = [r.label_id for r in rt.process([Request(x, task=task) for x in texts[task]])]
            if got != want[task]:
                failures.append(task)

    threads = [threading.Thread(target=worker, args=(t,)) for t in TASKS * 2]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert failures == [] and not doe.is_unplugged(model)


def test_compact_runtime_serves_the_same_answers_and_reports_its_memory(setup):
    model, tok, data, folders, _ = setup
    snap = snapshot(model)
    reqs = [{"text": e.text, "task": t} for t in TASKS for e in data[t].eval[:6]]
    plain = UnplugAndPlay(model, tok, max_batch=4)
    compact = UnplugAndPlay(model, tok, max_batch=4, compact=True)
    for rt in (plain, compact):
        for f in folders.values():
            rt.add_expert(f)
    want = [(r.label, r.expert) for r in plain.process(reqs)]
    got = compact.process(reqs)
    assert [(r.label, r.expert) for r in got] == want
    for r, p in zip(got, plain.records):
        assert r.probability == pytest.approx(p.probability, abs=1e-5)
    assert compact.summary()["compact_weight_bytes"] > 0
    assert_same_as(model, snap)
    doe.release_compact(model)
    assert compact.summary()["compact_weight_bytes"] == 0


def test_mixed_mode_batches_tasks_together_with_the_same_answers(setup):
    model, tok, data, folders, router = setup
    snap = snapshot(model)
    named = [{"text": e.text, "task": t} for t in TASKS for e in data[t].eval[:4]]
    routed = [{"text": e.text} for t in TASKS for e in data[t].eval[4:7]]
    stream = [r for pair in zip(named, named[::-1]) for r in pair][:8] + routed  # interleaved tasks
    confs = sorted(router.route(model, tok, [r["text"] for r in routed])[1])
    runtimes = {}
    for mixed in (False, True):  # the least confident routed request runs dense
        rt = runtimes[mixed] = UnplugAndPlay(model, tok, router=router, threshold=confs[1], max_batch=5, mixed=mixed)
        for t in TASKS:
            rt.add_expert(folders[t])
    one_at_a_time = runtimes[False].process(stream)
    results = runtimes[True].process(stream)
    assert all(r.error is None for r in results)
    assert {r.expert for r in results} >= {"dense", *TASKS}  # experts and dense rows in one batch
    for got, want in zip(results, one_at_a_time):
        assert (got.task, got.expert, got.label_id, got.routed) == (want.task, want.expert, want.label_id, want.routed)
        assert got.probability == pytest.approx(want.probability, abs=1e-5)
    assert [r.batch_size for r in results] == [5] * 5 + [5] * 5 + [4] * 4  # 14 requests, max_batch 5
    assert runtimes[True].summary()["switches"] == 2  # every expert in once, the dense model back once
    assert not doe.is_unplugged(model) and not gathered_wrappers(model)
    assert_same_as(model, snap)


def test_mixed_mode_token_budget_and_checks(setup):
    model, tok, data, folders, _ = setup
    with pytest.raises(ValueError, match="token_budget: expected None or >= 1 with mixed=True"):
        UnplugAndPlay(model, tok, token_budget=64)
    budget = 40
    rt = UnplugAndPlay(model, tok, mixed=True, token_budget=budget)
    prompts = {t: rt.add_expert(folders[t]).prompt.shape[0] for t in TASKS}
    stream = [{"text": e.text, "task": t} for t in TASKS for e in data[t].eval[:3]]
    results = rt.process(stream)
    assert all(r.error is None for r in results)
    sizes = [prompts[r["task"]] + len(tok(r["text"], truncation=True, max_length=rt.max_length)["input_ids"])
             for r in stream]
    i = 0
    while i < len(results):  # greedy: a batch holds what fits (rows x its longest row), the next row did not
        n = results[i].batch_size
        assert n == 1 or n * max(sizes[i:i + n]) <= budget
        assert i + n == len(results) or (n + 1) * max(sizes[i:i + n + 1]) > budget
        i += n
    assert len({r.batch_size for r in results}) > 1 or results[0].batch_size < len(stream)


def test_a_long_lived_runtime_keeps_a_bounded_log_and_counts_everything(setup):
    model, tok, data, folders, _ = setup
    seen = []
    rt = UnplugAndPlay(model, tok, max_batch=4, history=3, on_switch=seen.append)
    plain = UnplugAndPlay(model, tok, max_batch=4)  # unbounded reference on the same stream
    for r in (rt, plain):
        for t in TASKS:
            r.add_expert(folders[t])
    stream = [{"text": e.text, "task": t} for _ in range(3) for t in TASKS for e in data[t].eval[:2]]
    got = [x for i in range(0, len(stream), 4) for x in rt.process(stream[i:i + 4])]
    want = plain.process(stream)
    assert [(x.task, x.label_id) for x in got] == [(x.task, x.label_id) for x in want]
    assert len(rt.records) == 3 and len(rt.switches) == 3
    assert list(rt.records) == got[-3:]
    summary = rt.summary()
    assert summary["requests"] == len(stream) == 12 and summary["errors"] == 0
    assert summary["switches"] == len(seen) > 3  # every switch counted and reported, only 3 kept
    assert list(rt.switches) == seen[-3:]
    rt.reset_log()
    assert rt.summary()["requests"] == 0 and not rt.records and not rt.switches
    with pytest.raises(ValueError, match="history: expected an int >= 1, got 0"):
        UnplugAndPlay(model, tok, history=0)


def test_router_save_is_whole_or_nothing(setup, tmp_path, monkeypatch):
    _, _, _, _, router = setup
    (tmp_path / "router" / "expert_a").mkdir(parents=True)  # a folder the router shares with other files
    (tmp_path / "router" / "notes.txt").write_text("keep me")
    folder = router.save_pretrained(tmp_path / "router")
    assert {p.name for p in folder.iterdir()} >= {"expert_a", "notes.txt"}
    before = {p.name: p.is_dir() or p.read_bytes() for p in folder.iterdir()}
    other = TaskRouter(list(reversed(router.tasks)), router.weight.flip(0) + 1, router.bias.flip(0))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    import doe.router as router_module

    monkeypatch.setattr(router_module.json, "dumps", broken)  # fails after the weights were written
    with pytest.raises(OSError, match="disk full"):
        other.save_pretrained(folder)
    monkeypatch.undo()
    assert {p.name: p.is_dir() or p.read_bytes() for p in folder.iterdir()} == before  # no temporary file left
    loaded = TaskRouter.from_pretrained(folder)
    assert loaded.tasks == router.tasks and torch.equal(loaded.weight, router.weight)


def test_the_runtime_generates_on_a_task_expert_with_its_prompt_and_puts_the_model_back():
    import contextlib

    from doe.generation import GenerateParams
    from tiny_models import INTERMEDIATE

    data = load_task("offline_sentiment", max_train=40)
    tok = tiny_tokenizer([e.text for e in data.train], data.spec.label_words)
    model = make_tiny("llama")
    g = torch.Generator().manual_seed(5)
    expert = doe.TaskExpert.from_indices(
        model, [torch.randperm(INTERMEDIATE, generator=g)[:30] for _ in doe.find_ffn_blocks(model)],
        task="offline_sentiment")
    expert.prompt = torch.randn(4, model.get_input_embeddings().weight.shape[1], generator=g)
    snap = snapshot(model)

    def greedy_by_hand(on_expert, n):
        ids = tok("the movie was", return_tensors="pt")["input_ids"]
        soft, out = ([expert.prompt[None]] if on_expert else []), []
        with doe.unplugged(model, expert) if on_expert else contextlib.nullcontext(), torch.no_grad():
            for _ in range(n):
                nxt = int(model(inputs_embeds=torch.cat([*soft, model.get_input_embeddings()(ids)], 1)).logits[0, -1]
                          .argmax())
                out.append(nxt)
                if nxt == model.generation_config.eos_token_id:
                    break
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        return out

    rt = UnplugAndPlay(model, tok)
    rt.add_expert(expert)
    streamed = []
    got = rt.generate(GenerateParams("the movie was", max_new_tokens=5), task="offline_sentiment",
                      on_token=streamed.append)
    assert got.token_ids == greedy_by_hand(True, 5) == streamed and got.prompt_tokens == 3
    assert rt.generate("the movie was").token_ids[:1] == greedy_by_hand(False, 1)  # a string: greedy, dense
    assert rt.installed_tasks() is None and not doe.is_unplugged(model)  # put back when idle
    assert_same_as(model, snap)
    with pytest.raises(ValueError, match="unknown task 'offline_topic'; this runtime serves"):
        rt.generate("x", task="offline_topic")


def test_generate_needs_a_decoder(setup):
    model, tok, _, folders, _ = setup
    rt = UnplugAndPlay(model, tok)
    rt.add_expert(folders[TASKS[0]])
    assert rt.kind == "encoder" and rt.fingerprint == doe.model_fingerprint(model)
    with pytest.raises(ValueError, match="generate needs a decoder LM; this runtime's model is encoder"):
        rt.generate("x", task=TASKS[0])


def test_summary_is_safe_while_another_thread_serves(setup):
    model, tok, data, folders, _ = setup
    rt = UnplugAndPlay(model, tok, max_batch=4)
    rt.add_expert(folders[TASKS[0]])
    texts = [e.text for e in data[TASKS[0]].eval[:2]]
    first = rt.process([{"text": t, "task": TASKS[0]} for t in texts])
    rt.records.extend(first * 1500)  # a long log to iterate while it grows
    errors, done = [], threading.Event()

    def serve():
        try:
            for _ in range(12):
                rt.process([{"text": texts[0], "task": TASKS[0]}])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            done.set()

    worker = threading.Thread(target=serve)
    worker.start()
    summaries = 0
    while not done.is_set() or summaries < 5:
        try:
            rt.summary()
        except RuntimeError as exc:
            errors.append(exc)
            break
        summaries += 1
    worker.join()
    assert not errors, errors
    assert rt.summary()["requests"] == 2 + 12


def test_router_files_from_two_saves_are_refused(setup, tmp_path):
    _, _, _, _, router = setup
    a = router.save_pretrained(tmp_path / "a")
    flipped = TaskRouter(list(reversed(router.tasks)), router.weight.flip(0), router.bias.flip(0))
    b = flipped.save_pretrained(tmp_path / "b")
    (a / "router_config.json").write_bytes((b / "router_config.json").read_bytes())  # a save cut between renames
    with pytest.raises(ValueError, match=r"was saved for tasks .* lists .* \(the files come from two saves\)"):
        TaskRouter.from_pretrained(a)
