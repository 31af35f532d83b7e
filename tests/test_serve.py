"""`doe serve`: the HTTP API on tiny models, its errors, batching, faults and shutdown.

Every answer is compared with ``UnplugAndPlay.process`` (or, for generation, a greedy loop by
hand) run offline on the same input, never with another answer of the server. The last test
starts the real command in a subprocess through the load test (``benchmarks.serve_load``).
"""

import asyncio
import contextlib
import copy
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import doe  # noqa: E402
from doe.cli import main  # noqa: E402
from doe.router import TaskRouter  # noqa: E402
from doe.runtime import UnplugAndPlay  # noqa: E402
from doe.serve import ServeConfig, create_app  # noqa: E402
from doe.tasks import load_task  # noqa: E402
from doe.testing import assert_same_as, snapshot  # noqa: E402
from doe.unplug import compact_memory  # noqa: E402
from tiny_models import INTERMEDIATE, make_tiny, tiny_tokenizer  # noqa: E402

TASKS = ("offline_sentiment", "offline_topic")
MAX_TOKENS = 40  # the tiny models have 64 positions: 4 prompt tokens + 40 (+ generated) fit
ROOT = Path(__file__).resolve().parent.parent


def make_expert(model, task, seed, prompt_tokens=4):
    """An expert built by hand: random kept neurons, prompt and (for encoders) head."""
    g = torch.Generator().manual_seed(seed)
    blocks = len(doe.find_ffn_blocks(model))
    expert = doe.TaskExpert.from_indices(model, [torch.randperm(INTERMEDIATE, generator=g)[:30] for _ in range(blocks)],
                                         task=task)
    hidden = model.get_input_embeddings().weight.shape[1]
    labels = len(doe.get_task(task).labels)
    expert.prompt = torch.randn(prompt_tokens, hidden, generator=g)
    expert.head = {"weight": torch.randn(labels, hidden, generator=g), "bias": torch.randn(labels, generator=g)}
    return expert


@pytest.fixture(scope="module")
def tiny():
    data = {t: load_task(t, max_train=40, max_eval=24) for t in TASKS}
    words = [w for d in data.values() for w in d.spec.label_words]
    tok = tiny_tokenizer([e.text for d in data.values() for e in d.train + d.eval], words)
    model = make_tiny("bert", head=False)
    experts = [make_expert(model, t, seed) for seed, t in enumerate(TASKS)]
    router = TaskRouter.fit(model, tok, {t: [e.text for e in data[t].train] for t in TASKS}, steps=100)
    texts = {t: [e.text for e in data[t].eval] for t in TASKS}
    return model, tok, experts, router, texts


def offline(tiny, requests, router=True, compact=False):
    """The same requests through the runtime, in this thread, as the server sets it up."""
    model, tok, experts, rt_router, _ = tiny
    rt = UnplugAndPlay(model, tok, router=rt_router if router else None, max_length=MAX_TOKENS, compact=compact)
    for e in experts:
        rt.add_expert(e)
    return [r.to_dict() for r in rt.process(requests)]


def same(got: dict, want: dict) -> bool:
    return (all(got[k] == want[k] for k in ("task", "label", "label_id", "expert", "routed"))
            and abs(got["probability"] - want["probability"]) < 1e-4)


def app_for(tiny, router=True, compact=False, mixed=False, **config):
    model, tok, experts, rt_router, _ = tiny
    cfg = ServeConfig(**{"max_length": MAX_TOKENS, "token_budget": 2048, **config})
    return create_app(model, tok, experts, router=rt_router if router else None, config=cfg,
                      runtime_options={"compact": compact, "mixed": mixed})


class Gate:
    """A forward hook on the first FFN block: raises while ``fail`` is set, waits while ``hold`` is."""

    def __init__(self, model):
        self.fail, self.hold, self.entered = False, threading.Event(), threading.Event()
        self.hold.set()
        block = doe.find_ffn_blocks(model)[0]
        self.handle = block.up.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.entered.set()
        self.hold.wait(30)
        if self.fail:
            raise RuntimeError("expert on fire")


@pytest.mark.parametrize("compact", [False, True], ids=["gathered", "compact"])
def test_classify_one_many_and_routed_match_the_offline_runtime(tiny, compact):
    _, _, _, _, texts = tiny
    items = [{"text": texts["offline_sentiment"][0], "task": "offline_sentiment", "id": "a"},
             {"text": texts["offline_topic"][1], "task": "offline_topic"},
             {"text": texts["offline_topic"][2]}]
    want = offline(tiny, [{k: v for k, v in i.items() if k != "id"} for i in items], compact=compact)
    with TestClient(app_for(tiny, compact=compact)) as client:
        one = client.post("/v1/classify", json=items[0])
        many = client.post("/v1/classify", json=items)
    assert one.status_code == 200 and many.status_code == 200
    assert one.json()["id"] == "a" and same(one.json(), want[0])
    got = many.json()
    assert [g["id"] for g in got] == ["a", None, None]
    assert all(same(g, w) for g, w in zip(got, want)), (got, want)
    assert got[2]["routed"] and abs(got[2]["route_confidence"] - want[2]["route_confidence"]) < 1e-4
    assert all(g["latency_ms"] >= g["forward_ms"] > 0 and g["batch_size"] >= 1 for g in got)


def post_concurrently(app, items):
    """Each item from its own client thread, all at once; returns the responses and the metrics."""
    with TestClient(app) as client:
        answers = [None] * len(items)

        def post(i):
            answers[i] = client.post("/v1/classify", json=items[i])

        threads = [threading.Thread(target=post, args=(i,)) for i in range(len(items))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return answers, client.get("/metrics").text


def test_concurrent_clients_are_batched_by_task(tiny):
    _, _, _, _, texts = tiny
    items = [{"text": texts[t][i], "task": t} for i in range(8) for t in TASKS]
    want = offline(tiny, items)
    answers, metrics = post_concurrently(app_for(tiny, max_wait_ms=200, max_batch=16), items)
    assert all(a.status_code == 200 for a in answers)
    assert all(same(a.json(), w) for a, w in zip(answers, want))
    assert max(a.json()["batch_size"] for a in answers) > 1
    batches = re.search(r"^doe_batch_size_count (\S+)$", metrics, re.M).group(1)
    at_most_8 = re.search(r'^doe_batch_size_bucket\{le="8.0"\} (\S+)$', metrics, re.M).group(1)
    assert batches == at_most_8  # 16 fit a batch, but each task has only 8
    assert 'doe_request_latency_seconds_bucket{le="0.001",task="offline_topic"}' in metrics


def test_mixed_batches_hold_several_tasks_and_answer_as_one_task_at_a_time(tiny):
    _, _, _, _, texts = tiny
    items = [{"text": texts[t][i], **({"task": t} if i % 3 else {})} for i in range(8) for t in TASKS]
    want = offline(tiny, items)  # one task at a time
    answers, metrics = post_concurrently(app_for(tiny, max_wait_ms=200, max_batch=16, mixed=True), items)
    assert all(a.status_code == 200 for a in answers)
    assert all(same(a.json(), w) for a, w in zip(answers, want)), [a.json() for a in answers]
    assert max(a.json()["batch_size"] for a in answers) > 8  # more than one task's worth in a forward
    assert 'doe_forward_seconds_count{task="mixed"}' in metrics



def test_a_mixed_server_restores_the_dense_model_between_batches_and_for_generation():
    """--mixed keeps every expert resident only while a mixed batch runs: the dense model
    serves /v1/generate without a task, and comes back when the worker idles."""
    data = {t: load_task(t, max_train=40, max_eval=4) for t in TASKS}
    words = [w for d in data.values() for w in d.spec.label_words]
    tok = tiny_tokenizer([e.text for d in data.values() for e in d.train], words)
    model = make_tiny("gpt2")
    experts = [make_expert(model, t, seed) for seed, t in enumerate(TASKS)]
    items = [{"text": data[t].eval[0].text, "task": t} for t in TASKS]
    rt = UnplugAndPlay(model, tok, max_length=MAX_TOKENS)
    for e in experts:
        rt.add_expert(e)
    want = [r.to_dict() for r in rt.process(items)]
    dense_want = greedy_by_hand(model, tok, None, "the movie was", 3)
    app = create_app(model, tok, experts, config=ServeConfig(max_length=MAX_TOKENS, max_new_tokens=4, max_wait_ms=0),
                     runtime_options={"mixed": True})
    gate = Gate(model)
    answers = {}
    try:
        with TestClient(app) as client:
            gate.entered.clear()
            gate.hold.clear()

            def post(name, path, body):
                answers[name] = client.post(path, json=body)

            classify = threading.Thread(target=post, args=("mixed", "/v1/classify", items))
            classify.start()
            assert gate.entered.wait(10)  # the worker is inside the mixed forward, every expert resident
            listed = client.get("/v1/experts").json()
            generate = threading.Thread(target=post, args=("dense", "/v1/generate",
                                                           {"prompt": "the movie was", "max_new_tokens": 3}))
            generate.start()
            deadline = time.monotonic() + 10
            while app.state.doe.batcher.depth < 1 and time.monotonic() < deadline:
                time.sleep(0.005)
            gate.hold.set()
            classify.join()
            generate.join()
            again = client.post("/v1/classify", json=items)
            deadline = time.monotonic() + 10
            while doe.is_unplugged(model) and time.monotonic() < deadline:  # the worker idles
                time.sleep(0.005)
            idle = doe.is_unplugged(model)
    finally:
        gate.hold.set()
        gate.handle.remove()
    assert listed["installed"] == list(TASKS)
    mixed, dense = answers["mixed"], answers["dense"]
    assert mixed.status_code == 200 and all(same(g, w) and g["batch_size"] == 2 for g, w in zip(mixed.json(), want))
    assert dense.status_code == 200, dense.text
    assert dense.json()["token_ids"] == dense_want and dense.json()["expert"] == "dense"
    assert again.status_code == 200 and all(same(g, w) for g, w in zip(again.json(), want))
    assert not idle and not doe.is_unplugged(model)


def test_forward_metrics_count_each_forward_once_around_a_failed_route(tiny, monkeypatch):
    """A routed item whose route fails sits between two rows of one forward: that forward is
    observed once."""
    _, _, _, router, texts = tiny
    texts = [texts["offline_topic"][i] for i in range(3)]
    chosen = dict(zip(texts, ["offline_topic", "offline_weather", "offline_topic"]))
    monkeypatch.setattr(router, "route", lambda model, tok, xs: ([chosen[x] for x in xs], [0.9] * len(xs)))
    with TestClient(app_for(tiny)) as client:
        r = client.post("/v1/classify", json=[{"text": x} for x in texts])
        metrics = client.get("/metrics").text
    assert r.status_code == 500 and "offline_weather" in r.json()["detail"]
    assert re.findall(r"^doe_forward_seconds_count.*$", metrics, re.M) == [
        'doe_forward_seconds_count{task="offline_topic"} 1.0']


def test_items_without_a_pair_count_their_tokens_as_the_runtime_encodes_them(tiny):
    """In a list where another item has a text_pair, an item without one counts no pair tokens:
    one at exactly max_length is served, not refused."""
    from tokenizers.processors import TemplateProcessing

    model, tok, experts, _, texts = tiny
    tok = copy.deepcopy(tok)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.cls_token_id), ("[SEP]", tok.sep_token_id)])
    longest = " ".join(["good"] * (MAX_TOKENS - 2))
    assert len(tok(longest)["input_ids"]) == MAX_TOKENS
    items = [{"text": "a fine film", "text_pair": "yes", "task": "offline_topic"},
             {"text": longest, "task": "offline_topic"}]
    rt = UnplugAndPlay(model, tok, max_length=MAX_TOKENS)
    for e in experts:
        rt.add_expert(e)
    want = [r.to_dict() for r in rt.process(items)]
    with TestClient(app_for((model, tok, experts, None, texts), router=False)) as client:
        r = client.post("/v1/classify", json=items)
        over = client.post("/v1/classify", json=[items[0], dict(items[1], text=longest + " good")])
    assert r.status_code == 200, r.text
    assert all(same(g, w) for g, w in zip(r.json(), want))
    assert over.status_code == 413 and f"item 1: {MAX_TOKENS + 1} tokens" in over.json()["detail"]


BAD = [
    ("malformed-json", dict(content=b'{"text": "x"'), 400, "malformed_json"),
    ("missing-text", dict(json={"task": "offline_topic"}), 422, "invalid_request"),
    ("extra-field", dict(json={"text": "x", "task": "offline_topic", "colour": 1}), 422, "invalid_request"),
    ("text-not-a-string", dict(json={"text": 5, "task": "offline_topic"}), 422, "invalid_request"),
    ("empty-text", dict(json={"text": "", "task": "offline_topic"}), 422, "invalid_request"),
    ("blank-text", dict(json={"text": " \n", "task": "offline_topic"}), 422, "invalid_request"),
    ("empty-list", dict(json=[]), 422, "invalid_request"),
    ("body-a-string", dict(json="hello"), 422, "invalid_request"),
    ("too-many-tokens", dict(json={"text": "word " * (MAX_TOKENS + 1), "task": "offline_topic"}), 413, "too_large"),
    ("too-many-chars", dict(json={"text": "x" * 100_000, "task": "offline_topic"}), 413, "too_large"),
    ("too-many-items", dict(json=[{"text": "x", "task": "offline_topic"}] * 5), 413, "too_large"),
    ("body-too-large", dict(json={"text": "x" * (1 << 20), "task": "offline_topic"}), 413, "too_large"),
    ("chunked-body-too-large", dict(content=iter([b'{"text": "', b"x" * (1 << 20), b'"}'])), 413, "too_large"),
    ("unknown-task", dict(json={"text": "x", "task": "offline_weather"}), 404, "unknown_task"),
    ("not-json", dict(content=b'{"text": "x"}', headers={"content-type": "text/plain"}), 415,
     "unsupported_media_type"),
]


def test_bad_requests_get_their_documented_status(tiny):
    model = tiny[0]
    snap = snapshot(model)
    with TestClient(app_for(tiny, max_items=4, max_queue=16)) as client:
        for name, kwargs, status, kind in BAD:
            if "content" in kwargs and "headers" not in kwargs:
                kwargs = dict(kwargs, headers={"content-type": "application/json"})
            r = client.post("/v1/classify", **kwargs)
            assert (r.status_code, r.json()["kind"]) == (status, kind), (name, r.text)
            assert r.json()["detail"], name
        unknown = client.post("/v1/classify", json={"text": "x", "task": "offline_weather"}).json()
        assert unknown["tasks"] == sorted(TASKS) and "offline_weather" in unknown["detail"]
        chunked = client.post("/v1/classify", content=iter([b'{"text": "', b"x" * (1 << 20), b'"}']),
                              headers={"content-type": "application/json"})
        assert "--max-body-bytes" in chunked.json()["detail"] and "content-length" not in chunked.request.headers
        missing = client.post("/v1/classify", json={"task": "offline_topic"}).json()["detail"]
        assert missing == [{"loc": ["body", "text"], "msg": "Field required", "type": "missing"}]
        assert client.post("/v1/generate", json={"prompt": "hi"}).status_code == 404  # an encoder
        assert client.get("/v1/classify").status_code == 405
        assert client.get("/v1/nothing").status_code == 404
        ok = client.post("/v1/classify", json={"text": "fine", "task": "offline_topic"})
        metrics = client.get("/metrics").text
    assert ok.status_code == 200
    assert 'doe_errors_total{kind="too_large"} 6.0' in metrics
    assert 'doe_errors_total{kind="unknown_task"} 2.0' in metrics
    assert_same_as(model, snap)
    with TestClient(app_for(tiny, router=False)) as client:
        r = client.post("/v1/classify", json={"text": "no task and no router"})
    assert r.status_code == 422 and "no router" in r.json()["detail"] and r.json()["tasks"] == sorted(TASKS)


def test_a_failing_expert_fails_its_batch_only_and_the_model_is_restored(tiny):
    model, _, _, _, texts = tiny
    snap = snapshot(model)
    gate = Gate(model)
    item = {"text": texts["offline_sentiment"][3], "task": "offline_sentiment"}
    try:
        with TestClient(app_for(tiny)) as client:
            gate.fail = True
            bad = client.post("/v1/classify", json=item)
            assert not doe.is_unplugged(model)
            gate.fail = False
            good = client.post("/v1/classify", json=item)
            metrics = client.get("/metrics").text
    finally:
        gate.handle.remove()
    assert bad.status_code == 500 and bad.json()["kind"] == "inference_error"
    assert "expert on fire" in bad.json()["detail"]
    assert good.status_code == 200 and same(good.json(), offline(tiny, [item])[0])
    assert 'doe_errors_total{kind="inference_error"} 1.0' in metrics
    assert not doe.is_unplugged(model)
    assert_same_as(model, snap)


def test_a_full_queue_answers_503_with_retry_after_and_the_queue_drains(tiny):
    model, _, _, _, texts = tiny
    gate = Gate(model)
    items = [{"text": texts["offline_topic"][i], "task": "offline_topic"} for i in range(4)]
    want = offline(tiny, items)
    answers = {}
    try:
        with TestClient(app_for(tiny, max_queue=2, max_items=1, max_wait_ms=0, retry_after_s=3)) as client:
            gate.entered.clear()
            gate.hold.clear()

            def post(i):
                answers[i] = client.post("/v1/classify", json=items[i])

            first = threading.Thread(target=post, args=(0,))
            first.start()
            assert gate.entered.wait(10)  # the worker is inside item 0's forward
            queued = [threading.Thread(target=post, args=(i,)) for i in (1, 2)]
            for th in queued:
                th.start()
            deadline = time.monotonic() + 10
            while client.get("/health").json()["queue_depth"] < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            post(3)
            gate.hold.set()
            for th in [first, *queued]:
                th.join()
    finally:
        gate.hold.set()
        gate.handle.remove()
    assert answers[3].status_code == 503 and answers[3].headers["retry-after"] == "3"
    assert answers[3].json()["kind"] == "queue_full"
    assert all(answers[i].status_code == 200 and same(answers[i].json(), want[i]) for i in range(3))


async def asgi_then_leave(app, path, body, wait):
    """POST ``body`` to ``app`` over raw ASGI; the client goes away once ``await wait(sent)``
    returns (``sent``: the messages the app sent so far). Returns what the app sent."""
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]
    sent = []

    async def receive():
        if messages:
            return messages.pop()
        await wait(sent)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80), "state": {}}
    await app(scope, receive, send)
    return sent


def test_a_client_that_goes_away_loses_only_its_own_item(tiny):
    model, _, _, _, texts = tiny
    gate = Gate(model)
    item = {"text": texts["offline_topic"][5], "task": "offline_topic"}
    app = app_for(tiny, max_wait_ms=0)
    batcher = app.state.doe.batcher
    try:
        with TestClient(app) as client:
            gate.entered.clear()
            gate.hold.clear()
            blocker = threading.Thread(target=client.post, args=("/v1/classify",), kwargs={"json": item})
            blocker.start()
            assert gate.entered.wait(10)

            async def queued(sent):
                while batcher.depth == 0:
                    await asyncio.sleep(0.01)

            sent = client.portal.call(asgi_then_leave, app, "/v1/classify", item, queued)
            gate.hold.set()
            blocker.join()
            after = client.post("/v1/classify", json=item)
            metrics = client.get("/metrics").text
    finally:
        gate.hold.set()
        gate.handle.remove()
    assert sent[0]["status"] == 499  # logged only: nobody reads it
    assert batcher.dropped == 1 and batcher.admitted == batcher.answered + batcher.dropped
    assert 'doe_errors_total{kind="disconnected"} 1.0' in metrics
    assert after.status_code == 200 and same(after.json(), offline(tiny, [item])[0])


def test_experts_health_metrics_and_openapi(tiny):
    model, _, experts, _, _ = tiny
    app = app_for(tiny)
    with TestClient(app) as client:
        client.post("/v1/classify", json={"text": "hello", "task": "offline_topic"})
        listed = client.get("/v1/experts").json()
        health = client.get("/health")
        metrics = client.get("/metrics")
        schema = client.get("/openapi.json").json()
        app.state.draining = True  # what SIGTERM sets under uvicorn
        draining = client.get("/health")
    assert listed["model"] == {"type": "bert", "kind": "encoder", "fingerprint": doe.model_fingerprint(model),
                               "generate": False, "compact_weight_bytes": compact_memory(model)}
    assert [(e["task"], e["keep_ratio"], e["fingerprint"]) for e in listed["experts"]] == \
        [(e.task, e.keep_ratio, e.fingerprint) for e in experts]
    assert listed["router"]["tasks"] == list(TASKS)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert draining.status_code == 503 and draining.json()["status"] == "shutting_down"
    text = metrics.text
    for name in ("doe_requests_total", "doe_errors_total", "doe_batch_size_bucket", "doe_queue_depth",
                 "doe_switches_total", "doe_switch_seconds_bucket", "doe_request_latency_seconds_bucket"):
        assert name in text, name
    assert metrics.headers["content-type"].startswith("text/plain")
    assert {"/v1/classify", "/v1/generate", "/v1/experts", "/health", "/metrics"} <= set(schema["paths"])


def greedy_by_hand(model, tok, expert, prompt, n):
    """``n`` greedy tokens after ``prompt`` on ``expert`` with its soft prompt (None: dense, no prompt)."""
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = []
    soft = [] if expert is None else [expert.prompt.unsqueeze(0)]
    with doe.unplugged(model, expert) if expert is not None else contextlib.nullcontext(), torch.no_grad():
        for _ in range(n):
            embeds = torch.cat([*soft, model.get_input_embeddings()(ids)], dim=1)
            nxt = int(model(inputs_embeds=embeds).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == model.generation_config.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_generate_greedy_sampled_and_streamed_on_a_decoder():
    data = load_task("offline_sentiment", max_train=40)
    tok = tiny_tokenizer([e.text for e in data.train], data.spec.label_words)
    model = make_tiny("llama")
    expert = make_expert(model, "offline_sentiment", 3)
    want = greedy_by_hand(model, tok, expert, "the movie was", 6)
    app = create_app(model, tok, [expert], config=ServeConfig(max_length=16, max_new_tokens=8))
    with TestClient(app) as client:
        greedy = client.post("/v1/generate", json={"prompt": "the movie was", "task": "offline_sentiment",
                                                   "max_new_tokens": 6})
        sampled = [client.post("/v1/generate", json={"prompt": "the movie was", "task": "offline_sentiment",
                                                     "max_new_tokens": 6, "temperature": 1.5, "top_k": 20,
                                                     "seed": 7}).json()["token_ids"] for _ in range(2)]
        with client.stream("POST", "/v1/generate", json={"prompt": "the movie was", "task": "offline_sentiment",
                                                          "max_new_tokens": 6, "stream": True}) as stream:
            events = [json.loads(line[len("data: "):]) for line in stream.iter_lines() if line.startswith("data: ")]
        too_many = client.post("/v1/generate", json={"prompt": "x", "max_new_tokens": 9})
        unknown = client.post("/v1/generate", json={"prompt": "x", "task": "offline_topic"})
        bad_top_p = client.post("/v1/generate", json={"prompt": "x", "top_p": 1.5})
        dense = client.post("/v1/generate", json={"prompt": "the movie was", "max_new_tokens": 2})

        # A streaming client leaves after its first token while the worker is held in the next
        # step: generation stops there instead of running to max_new_tokens.
        steps, resume = [], threading.Event()

        def count_and_hold(module, inputs, output):
            steps.append(1)
            if len(steps) >= 2:
                resume.wait(10)

        hook = doe.find_ffn_blocks(model)[0].up.register_forward_hook(count_and_hold)

        async def first_token(sent):
            while not any(m.get("body", b"").startswith(b"data: ") for m in sent):
                await asyncio.sleep(0.005)

        answered = app.state.doe.batcher.answered
        try:
            left = client.portal.call(asgi_then_leave, app, "/v1/generate",
                                      {"prompt": "the movie was", "task": "offline_sentiment", "max_new_tokens": 8,
                                       "stream": True}, first_token)
            resume.set()
            deadline = time.monotonic() + 10
            while app.state.doe.batcher.answered == answered and time.monotonic() < deadline:
                time.sleep(0.005)
        finally:
            resume.set()
            hook.remove()
        after = client.post("/v1/generate", json={"prompt": "the movie was", "task": "offline_sentiment",
                                                  "max_new_tokens": 6})
        metrics = client.get("/metrics").text
    assert greedy.status_code == 200, greedy.text
    body = greedy.json()
    assert body["token_ids"] == want and body["expert"] == "offline_sentiment"
    assert body["finish_reason"] == ("stop" if want[-1] == model.generation_config.eos_token_id else "length")
    assert sampled[0] == sampled[1] and len(sampled[0]) <= 6
    assert [e["token_id"] for e in events[:-1]] == want and events[-1]["done"] and events[-1]["token_ids"] == want
    assert (too_many.status_code, unknown.status_code, bad_top_p.status_code) == (422, 404, 422)
    assert dense.status_code == 200 and dense.json()["expert"] == "dense"
    assert left[0]["status"] == 200 and not any(b'"done"' in m.get("body", b"") for m in left)
    assert len(steps) <= 3  # the prompt's forward, the held step, at most one more
    assert 'doe_errors_total{kind="disconnected"} 1.0' in metrics
    assert after.status_code == 200 and after.json()["token_ids"] == want
    assert not doe.is_unplugged(model)


def test_serve_config_and_cli_check_everything_before_loading_a_model(tiny, tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match=r"max_batch \(--max-batch\): expected an integer >= 1, got 0"):
        ServeConfig(max_batch=0)
    with pytest.raises(ValueError, match="token_budget"):
        ServeConfig(max_length=512, token_budget=256)
    model, _, experts, _, _ = tiny
    folder = experts[0].save_pretrained(tmp_path / "expert")
    twin = experts[0].save_pretrained(tmp_path / "twin")

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("doe.cli._load_model", no_model)
    sock = __import__("socket").socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    busy = str(sock.getsockname()[1])
    cases = [
        (["--experts", str(folder), "--max-batch", "0"], "--max-batch"),
        (["--experts", str(folder), "--threshold", "2"], "--threshold"),
        (["--experts", str(folder), "--port", "70000"], "--port"),
        (["--experts", str(folder), "--device", "tpu"], "--device"),
        (["--experts", str(tmp_path / "nowhere")], "not an expert folder"),
        (["--experts", str(folder), str(twin)], "several for ['offline_sentiment']"),
        (["--experts", str(folder), "--router", str(tmp_path / "nowhere")], "--router"),
        (["--experts", str(folder), "--port", busy], "cannot listen on 127.0.0.1:" + busy),
    ]
    try:
        for argv, message in cases:
            with pytest.raises(SystemExit) as exc:
                main(["serve", *argv])
            err = capsys.readouterr().err
            assert exc.value.code == 2 and message in err, (argv, err)
    finally:
        sock.close()
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--experts", str(folder)])
    assert exc.value.code == 2 and 'pip install -e ".[serve]"' in capsys.readouterr().err


def test_doe_serve_under_load_then_sigterm(tiny, tmp_path):
    """The real command on a free port: a few hundred requests (bad ones and disconnects mixed
    in) checked against the offline runtime, then SIGTERM in the middle of a burst."""
    model, tok, experts, router, _ = tiny
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    folders = [str(e.save_pretrained(tmp_path / e.task)) for e in experts]
    router.save_pretrained(tmp_path / "router")
    out = tmp_path / "load"
    cmd = [sys.executable, "-m", "benchmarks.serve_load", "--model", str(tmp_path / "model"), "--device", "cpu",
           "--experts", *folders, "--router", str(tmp_path / "router"), "--requests", "200", "--clients", "8",
           "--shutdown-requests", "80", "--max-length", str(MAX_TOKENS), "--max-items", "4", "--bad-every", "10",
           "--disconnect-every", "25", "--list-every", "7", "--threads", "1", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=170)
    report = json.loads((out / "serve_load.json").read_text())
    main_phase, shutdown = report["main"], report["shutdown"]
    assert done.returncode == 0 and report["ok"], done.stdout[-3000:] + done.stderr[-3000:]
    assert main_phase["lost"] == 0 and main_phase["wrong"] == 0 and main_phase["bad_status_mismatch"] == 0
    assert main_phase["bad_requests"] == 20 and main_phase["disconnects"] > 0
    assert main_phase["good_items"] > main_phase["good_requests"]  # lists were sent too
    assert shutdown["exit_code"] == 0 and shutdown["wrong"] == 0 and shutdown["other"] == 0
    assert shutdown["answered"] >= shutdown["requests"] // 4
    counts = report["server_counts"]
    assert counts["admitted"] == counts["answered"] + counts["dropped"]
    assert (out / "serve_load.md").read_text().startswith("# `doe serve` load test")


def test_the_earlier_names_of_the_length_limits_still_work_for_one_release(tiny):
    with pytest.warns(DeprecationWarning, match=r"max_tokens=\.\.\.\) is now max_length"):
        cfg = ServeConfig(max_tokens=48)
    assert cfg.max_length == 48 and cfg == ServeConfig(max_length=48) and "max_tokens" not in cfg.to_dict()
    with pytest.raises(ValueError, match="max_tokens is the earlier name of max_length: give one"):
        ServeConfig(max_length=64, max_tokens=48)
    model, tok, _, _, _ = tiny
    with pytest.warns(DeprecationWarning, match=r"max_tokens=\.\.\.\) is now token_budget"):
        rt = UnplugAndPlay(model, tok, mixed=True, max_tokens=300)
    assert rt.token_budget == 300
    with pytest.raises(ValueError, match="max_tokens: expected None or >= 1 with mixed=True"):
        with pytest.warns(DeprecationWarning):
            UnplugAndPlay(model, tok, max_tokens=64)
