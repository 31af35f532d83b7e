"""The OpenAI API of `doe serve` under a real uvicorn server on 127.0.0.1, driven by the real
``openai`` client: models, completions and chat (plain and streamed), continuous batching across
experts, errors as the client's exception types, experts loaded and unloaded at run time,
back-pressure and cancellation. Every answer is compared with the same request run alone by
transformers' ``generate`` on a hand-sliced copy of the model (or the dense model)."""

import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from doe.generation import GenerateParams, generate  # noqa: E402
from doe.prompt import TaskModel  # noqa: E402
from doe.serve import ServeConfig, create_app  # noqa: E402
from doe.testing import sliced_copy  # noqa: E402
from test_engine import WORDS, make_experts  # noqa: E402
from test_serve import make_expert  # noqa: E402
from test_serve_hardening import live  # noqa: E402
from tiny_models import make_tiny, tiny_tokenizer  # noqa: E402

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture()
def served(tmp_path):
    tok = tiny_tokenizer([" ".join(WORDS) + " system user assistant"], extra_words=[f"w{i}" for i in range(110)])
    tok.chat_template = TEMPLATE
    model = make_tiny("llama")
    experts = make_experts(model, tmp_path)
    classifier = make_expert(model, "offline_sentiment", 7)
    spare = make_experts(model, tmp_path, names=("c",))[0]
    (tmp_path / "allowed").mkdir()
    spare.save_pretrained(tmp_path / "allowed" / "c")
    return model, tok, {e.task: e for e in experts + [spare]}, [*experts, classifier], tmp_path


def alone(model, tok, experts, prompt, task, params, chat=False):
    """The request run alone by transformers' generate (hand-sliced copy for an expert)."""
    if task is None:
        ids = tok(prompt, add_special_tokens=not chat)["input_ids"]
        return generate(model, tok, params, prompt_ids=ids)
    e = experts[task]
    ids = TaskModel(model, tok, e.spec(), prompt=e.prompt, max_length=32).prompt_ids(prompt)  # as the task lays it out
    return generate(sliced_copy(model, e.indices), tok, params, soft_prompt=e.prompt, prompt_ids=ids)


def client(port):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)


def test_models_completions_and_chat_equal_requests_run_alone(served):
    model, tok, experts, serving, folder = served
    app = create_app(model, tok, serving, config=ServeConfig(max_new_tokens=12, max_length=32), model_id="tiny")
    with live(app) as port:
        c = client(port)
        models = c.models.list().data
        done = c.completions.create(model="a", prompt="copy red green", max_tokens=6, temperature=0)
        two = c.completions.create(model="tiny", prompt=["copy cat", "copy dog sun"], max_tokens=5, temperature=0,
                                   n=2)
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "copy moon tree"}]
        chat = c.chat.completions.create(model="tiny", messages=messages, max_tokens=7, temperature=0)
        chunks = list(c.chat.completions.create(model="b", messages=messages, max_tokens=7, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        text_chunks = list(c.completions.create(model="a", prompt="copy fish", max_tokens=5, temperature=0,
                                                stream=True, stop=["zzz"]))
        label = c.chat.completions.create(model="offline_sentiment", messages=[{"role": "user",
                                                                                "content": "great movie"}])
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert [m.id for m in models] == ["tiny", "a", "b", "offline_sentiment"]
    assert all(m.parent == "tiny" for m in models[1:]) and models[0].parent is None
    want = alone(model, tok, experts, "copy red green", "a", GenerateParams("copy red green", 6))
    assert done.choices[0].text == want.text and done.usage.completion_tokens == len(want.token_ids)
    assert done.choices[0].finish_reason == ("stop" if want.finish_reason == "stop" else "length")
    for i, p in enumerate(["copy cat", "copy cat", "copy dog sun", "copy dog sun"]):
        assert two.choices[i].index == i and two.choices[i].text == alone(model, tok, experts, p, None,
                                                                          GenerateParams(p, 5)).text
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.choices[0].message.content == alone(model, tok, experts, rendered, None, GenerateParams(rendered, 7),
                                                    chat=True).text
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    want_b = alone(model, tok, experts, "copy moon tree", "b", GenerateParams("copy moon tree", 7))
    assert streamed == want_b.text and all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want_b.token_ids)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
    assert "".join(ch.choices[0].text for ch in text_chunks) == alone(model, tok, experts, "copy fish", "a",
                                                                      GenerateParams("copy fish", 5)).text
    assert label.choices[0].message.content in ("negative", "positive")
    assert 'doe_time_to_first_token_seconds_count{expert="a"} 2.0' in metrics
    assert 'doe_generation_requests_total{expert="tiny"} 5.0' in metrics
    assert 'doe_prompt_tokens_total{expert="b"}' in metrics and "doe_decode_batch_rows_count" in metrics


def test_errors_come_in_openai_shape_as_the_clients_exceptions(served):
    model, tok, experts, serving, folder = served
    app = create_app(model, tok, serving, config=ServeConfig(max_new_tokens=12, max_length=32), model_id="tiny")
    with live(app) as port:
        c = client(port)
        with pytest.raises(openai.NotFoundError) as missing:
            c.completions.create(model="nope", prompt="copy", max_tokens=2)
        with pytest.raises(openai.BadRequestError) as penalty:
            c.chat.completions.create(model="a", messages=[{"role": "user", "content": "copy"}], presence_penalty=0.5)
        with pytest.raises(openai.BadRequestError) as too_many:
            c.completions.create(model="a", prompt="copy", max_tokens=13)
        with pytest.raises(openai.BadRequestError) as unknown_field:
            c.completions.create(model="a", prompt="copy", max_tokens=2, extra_body={"beam_width": 3})
        with pytest.raises(openai.BadRequestError) as bad_type:
            c.completions.create(model="a", prompt="copy", max_tokens="2")
        with pytest.raises(openai.BadRequestError) as logprobs:
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "copy"}], logprobs=True)
        raw = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={"model": "zzz", "messages": []})
    assert missing.value.status_code == 404 and missing.value.body["code"] == "model_not_found"
    assert "The model `nope` does not exist" in missing.value.body["message"]
    assert penalty.value.body["param"] == "presence_penalty" and penalty.value.body["code"] == "unsupported_parameter"
    assert too_many.value.body["param"] == "max_tokens" and "at most 12" in too_many.value.body["message"]
    assert unknown_field.value.body["message"] == "Unrecognized request argument supplied: beam_width"
    assert bad_type.value.body["param"] == "max_tokens"
    assert logprobs.value.body["param"] == "logprobs"
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}
    assert raw.json()["error"]["type"] == "invalid_request_error"


def test_concurrent_streams_on_different_experts_equal_each_request_alone(served):
    """Requests join the running decode batch at different steps; each stream equals its solo run."""
    model, tok, experts, serving, folder = served
    app = create_app(model, tok, serving, config=ServeConfig(max_new_tokens=12, max_length=32, max_batch=3),
                     model_id="tiny")
    jobs = [(("a", "b", "tiny")[i % 3], f"copy {WORDS[1 + i % 9]} {WORDS[1 + (3 * i) % 9]}", 4 + i % 8)
            for i in range(9)]
    got, errors = {}, []
    with live(app) as port:
        def run(i, model_id, prompt, n):
            try:
                stream = client(port).completions.create(model=model_id, prompt=prompt, max_tokens=n, temperature=0,
                                                         stream=True)
                got[i] = "".join(ch.choices[0].text for ch in stream)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
        for t in threads:
            t.start()
            time.sleep(0.02)
        for t in threads:
            t.join(60)
        steps = app.state.doe.engine.steps
    assert not errors, errors
    for i, (model_id, prompt, n) in enumerate(jobs):
        task = None if model_id == "tiny" else model_id
        assert got[i] == alone(model, tok, experts, prompt, task, GenerateParams(prompt, n)).text, (i, model_id)
    assert steps < sum(n for _, _, n in jobs)  # rows shared decode steps


def test_experts_load_and_unload_without_a_restart(served):
    model, tok, experts, serving, folder = served
    app = create_app(model, tok, serving, config=ServeConfig(max_new_tokens=12, max_length=32), model_id="tiny",
                     expert_dir=folder / "allowed")
    base = None
    with live(app) as port:
        base = f"http://127.0.0.1:{port}"
        c = client(port)
        outside = httpx.post(f"{base}/v1/experts", json={"path": "../"})
        absolute = httpx.post(f"{base}/v1/experts", json={"path": str(folder / "allowed" / "c")})
        loaded = httpx.post(f"{base}/v1/experts", json={"path": "c"})
        twice = httpx.post(f"{base}/v1/experts", json={"path": "c"})
        listed = [m.id for m in c.models.list().data]
        on_c = c.completions.create(model="c", prompt="copy sun", max_tokens=5, temperature=0).choices[0].text

        # DELETE waits for the stream in flight on "a", which finishes whole
        stream = c.completions.create(model="a", prompt="copy red green", max_tokens=12, temperature=0, stream=True)
        first = next(iter(stream))
        deleted = {}
        remover = threading.Thread(target=lambda: deleted.update(r=httpx.delete(f"{base}/v1/experts/a", timeout=60)))
        remover.start()
        time.sleep(0.2)
        rest = "".join(ch.choices[0].text for ch in stream)
        remover.join(60)
        after = [m.id for m in c.models.list().data]
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model="a", prompt="copy", max_tokens=2)
        gone = httpx.delete(f"{base}/v1/experts/a")
    assert outside.status_code == 400 and "outside --expert-dir" in outside.json()["detail"]
    assert absolute.status_code == 400
    assert loaded.status_code == 201 and loaded.json()["parent"] == "tiny"
    assert twice.status_code == 409
    assert listed == ["tiny", "a", "b", "c", "offline_sentiment"]
    assert on_c == alone(model, tok, experts, "copy sun", "c", GenerateParams("copy sun", 5)).text
    assert first.choices[0].text + rest == alone(model, tok, experts, "copy red green", "a",
                                                 GenerateParams("copy red green", 12)).text
    assert deleted["r"].status_code == 200 and after == ["tiny", "b", "c", "offline_sentiment"]
    assert gone.status_code == 404


def test_loading_is_off_without_an_expert_dir(served):
    model, tok, experts, serving, folder = served
    app = create_app(model, tok, serving, config=ServeConfig(max_new_tokens=12, max_length=32))
    with live(app) as port:
        refused = httpx.post(f"http://127.0.0.1:{port}/v1/experts", json={"path": "c"})
    assert refused.status_code == 403 and "--expert-dir" in refused.json()["detail"]


def test_a_full_queue_answers_503_and_a_client_that_leaves_stops_its_generation(served):
    model, tok, experts, serving, folder = served
    app = create_app(model, tok, serving, config=ServeConfig(max_new_tokens=40, max_length=16, max_queue=1,
                                                            max_items=1, max_batch=1), model_id="tiny")
    engine = app.state.doe.engine
    gate, hold = threading.Event(), threading.Event()
    handle = doe_hook = None
    with live(app) as port:
        from doe.architectures import find_ffn_blocks

        def slow(module, args, out):
            gate.set()
            hold.wait(10)

        doe_hook = find_ffn_blocks(model)[0].up.register_forward_hook(slow)
        try:
            c = client(port)
            stream = c.completions.create(model="a", prompt="copy red", max_tokens=40, temperature=0, stream=True)
            assert gate.wait(10)  # the worker is inside the first row's forward
            queued = threading.Thread(target=lambda: client(port).completions.create(model="b", prompt="copy",
                                                                                      max_tokens=2))
            queued.start()
            deadline = time.monotonic() + 10
            while engine.queued < 1 and time.monotonic() < deadline:
                time.sleep(0.005)
            with pytest.raises(openai.InternalServerError) as full:
                c.completions.create(model="a", prompt="copy", max_tokens=2)
            doe_hook.remove()
            hold.set()
            next(iter(stream))
            stream.close()  # the client leaves after its first chunk
            queued.join(30)
            deadline = time.monotonic() + 10
            while (engine.running or engine.queued) and time.monotonic() < deadline:
                time.sleep(0.01)
            handle = engine.running
        finally:
            hold.set()
            doe_hook.remove()
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert full.value.status_code == 503 and full.value.response.headers["retry-after"] == "1"
    assert handle == 0  # the generation stopped when its client left, well before 40 tokens
    tokens = [line for line in metrics.splitlines() if line.startswith('doe_generated_tokens_total{task="a"}')]
    assert tokens and float(tokens[0].split()[-1]) < 40


def test_serve_refuses_bad_generation_flags_before_loading_a_model(tmp_path, capsys, monkeypatch):
    from doe.cli import main

    monkeypatch.setattr("doe.cli._load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    for argv, message in [
        (["--kv-budget", "0"], "kv_budget (--kv-budget): expected None or an integer >= 1, got 0"),
        (["--expert-dir", str(tmp_path / "missing")], "--expert-dir: expected a folder of expert folders"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(["serve", "--port", "0", *argv])
        assert exc.value.code == 2 and message in capsys.readouterr().err
