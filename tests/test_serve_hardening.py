"""`doe serve` against hostile clients: bad Unicode, extreme or loosely typed values, bodies
that are not JSON, one bad item in a list, and connections that stall. Connection-level cases
run the app under a real uvicorn server on 127.0.0.1 and talk to it over raw sockets."""

import contextlib
import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from doe.cli import main  # noqa: E402
from doe.serve import ServeConfig, create_app  # noqa: E402
from doe.serve.schemas import MIN_TEMPERATURE  # noqa: E402
from doe.serve.server import bind, uvicorn_config  # noqa: E402
from doe.tasks import load_task  # noqa: E402
from test_serve import MAX_TOKENS, app_for, make_expert, tiny  # noqa: E402,F401
from tiny_models import make_tiny, tiny_tokenizer  # noqa: E402

TOPIC = "offline_topic"


@pytest.fixture(scope="module")
def decoder():
    """A new app on one tiny decoder LM and its expert for each call (an app starts once)."""
    data = load_task("offline_sentiment", max_train=40)
    tok = tiny_tokenizer([e.text for e in data.train], data.spec.label_words)
    model = make_tiny("llama")
    expert = make_expert(model, "offline_sentiment", 3)
    return lambda: create_app(model, tok, [expert], config=ServeConfig(max_length=16, max_new_tokens=8))


def post_raw(client, path, body: bytes, content_type="application/json"):
    return client.post(path, content=body, headers={} if content_type is None else {"content-type": content_type})


def assert_invalid(r, loc, *words):
    """A 422 in the app's error shape whose one error is at ``loc`` and says each of ``words``."""
    assert r.status_code == 422, (loc, r.status_code, r.text)
    assert r.headers["content-type"] == "application/json" and r.json()["kind"] == "invalid_request", r.text
    errors = r.json()["detail"]
    assert [e["loc"] for e in errors] == [loc], errors
    assert all(w in errors[0]["msg"] for w in words), (words, errors)


def test_lone_surrogates_in_any_text_or_id_field_are_a_422_json_error(tiny, decoder):
    classify = {"text": "a fine film", "text_pair": "yes", "task": TOPIC, "id": "x"}
    generate = {"prompt": "the movie was", "task": "offline_sentiment", "max_new_tokens": 2}
    with TestClient(app_for(tiny), raise_server_exceptions=False) as client:
        for field in classify:
            body = json.dumps(dict(classify, **{field: "ok \ud800"})).encode()  # the escape "\ud800"
            assert_invalid(post_raw(client, "/v1/classify", body), ["body", field], "surrogate", "\\ud800")
            listed = json.dumps([classify, dict(classify, **{field: "\udfff"})]).encode()
            assert_invalid(post_raw(client, "/v1/classify", listed), ["body", 1, field], "surrogate")
        raw = b'{"text": "ok \xed\xa0\x80", "task": "offline_topic"}'  # a surrogate encoded as UTF-8 bytes
        assert_invalid(post_raw(client, "/v1/classify", raw), ["body", "text"], "surrogate")
        key = post_raw(client, "/v1/classify", b'{"text": "ok", "task": "offline_topic", "\\ud800": 1}')
        assert_invalid(key, ["body"], "unicode", "\\ud800")  # a field name with one
        fine = client.post("/v1/classify", json=dict(classify, text="caf\u00e9 \U0001f600"))
    assert fine.status_code == 200 and fine.json()["id"] == "x"
    with TestClient(decoder(), raise_server_exceptions=False) as client:
        for field in ("prompt", "task"):
            body = json.dumps(dict(generate, **{field: "\ud800"})).encode()
            assert_invalid(post_raw(client, "/v1/generate", body), ["body", field], "surrogate")


def test_temperatures_too_small_to_divide_by_are_a_422_and_zero_stays_greedy(decoder):
    base = {"prompt": "the movie was", "task": "offline_sentiment", "max_new_tokens": 4}
    with TestClient(decoder(), raise_server_exceptions=False) as client:
        tiny_t = client.post("/v1/generate", json=dict(base, temperature=1e-300))
        below = client.post("/v1/generate", json=dict(base, temperature=MIN_TEMPERATURE / 2))
        default = client.post("/v1/generate", json=base)
        zero = client.post("/v1/generate", json=dict(base, temperature=0))
        at_bound = client.post("/v1/generate", json=dict(base, temperature=MIN_TEMPERATURE, seed=1))
    assert_invalid(tiny_t, ["body", "temperature"], "1e-300", "0 (greedy)", str(MIN_TEMPERATURE))
    assert_invalid(below, ["body", "temperature"], str(MIN_TEMPERATURE / 2))
    assert default.status_code == zero.status_code == at_bound.status_code == 200, at_bound.text
    assert zero.json()["token_ids"] == default.json()["token_ids"]
    # at the bound sampling is as good as greedy: the largest logit takes all the probability
    assert at_bound.json()["token_ids"] == default.json()["token_ids"]


@pytest.mark.parametrize("body, says", [
    (b'{"text": "caf\xe9", "task": "offline_topic"}', ["UTF-8", "0xe9"]),
    (b"[" * 100_000 + b"]" * 100_000, ["nested"]),
    (b'{"text": ' * 5_000 + b'"x"' + b"}" * 5_000, ["nested"]),
], ids=["invalid-utf8", "deep-arrays", "deep-objects"])
def test_undecodable_or_too_deeply_nested_bodies_are_malformed_json(tiny, decoder, body, says):
    with TestClient(app_for(tiny)) as client:
        classify = post_raw(client, "/v1/classify", body)
        unclosed = post_raw(client, "/v1/classify", b'{"text": "x"')
    with TestClient(decoder()) as client:
        generate = post_raw(client, "/v1/generate", body)
    for r in (classify, generate):
        assert (r.status_code, r.json()["kind"]) == (unclosed.status_code, "malformed_json") == (400, "malformed_json")
        assert all(w in r.json()["detail"] for w in says), r.json()


def test_every_body_that_is_not_json_gets_415_empty_or_not(tiny, decoder):
    item = json.dumps({"text": "fine", "task": TOPIC}).encode()
    with TestClient(app_for(tiny)) as client:
        answers = {(ct, bool(body)): post_raw(client, "/v1/classify", body, ct)
                   for ct in ("text/plain", "application/x-www-form-urlencoded", None) for body in (b"", item)}
        ok = post_raw(client, "/v1/classify", item, "application/json; charset=utf-8")
        empty_json = post_raw(client, "/v1/classify", b"")
    with TestClient(decoder()) as client:
        generate = post_raw(client, "/v1/generate", b"", "text/plain")
    for (ct, nonempty), r in {**answers, ("text/plain", "generate"): generate}.items():
        assert (r.status_code, r.json()["kind"]) == (415, "unsupported_media_type"), (ct, nonempty, r.text)
        assert f"got {ct or 'none'}" in r.json()["detail"] and "application/json" in r.json()["detail"]
    assert ok.status_code == 200
    assert empty_json.status_code == 422 and empty_json.json()["kind"] == "invalid_request"


def test_ids_must_be_strings_or_integers_and_integers_json_integers(tiny, decoder):
    item = {"text": "a fine film", "task": TOPIC}
    with TestClient(app_for(tiny)) as client:
        assert_invalid(client.post("/v1/classify", json=dict(item, id=True)), ["body", "id"],
                       "string or an integer", "boolean true")
        assert_invalid(client.post("/v1/classify", json=dict(item, id=1.5)), ["body", "id"], "number 1.5")
        assert_invalid(client.post("/v1/classify", json=[item, dict(item, id=False)]), ["body", 1, "id"], "false")
        kept = client.post("/v1/classify", json=[dict(item, id=7), dict(item, id="7"), item])
    assert kept.status_code == 200 and [r["id"] for r in kept.json()] == [7, "7", None]
    generate = {"prompt": "the movie was", "max_new_tokens": 2}
    with TestClient(decoder()) as client:
        loose = {"max_new_tokens": ("5", 'string "5"'), "top_k": (2.0, "number 2.0"), "seed": (True, "boolean true"),
                 "temperature": ("0.5", 'string "0.5"'), "stream": ("yes", 'string "yes"')}
        answers = {k: client.post("/v1/generate", json=dict(generate, **{k: v})) for k, (v, _) in loose.items()}
        strict = client.post("/v1/generate", json=dict(generate, temperature=1, top_k=3, seed=4))
    for field, (_, got) in loose.items():
        assert_invalid(answers[field], ["body", field], "Input should be", f"got a {got}")
    assert strict.status_code == 200 and len(strict.json()["token_ids"]) <= 2


def test_one_bad_item_fails_the_whole_list_and_the_error_names_its_index(tiny):
    good = {"text": "a fine film", "task": TOPIC}
    app = app_for(tiny)
    with TestClient(app) as client:
        empty = client.post("/v1/classify", json=[good, good, dict(good, text=" ")])
        unknown = client.post("/v1/classify", json=[good, dict(good, task="offline_weather"), good])
        too_long = client.post("/v1/classify", json=[dict(good, text="word " * (MAX_TOKENS + 1)), good])
        admitted = app.state.doe.batcher.admitted
        fine = client.post("/v1/classify", json=[good, good])
    assert_invalid(empty, ["body", 2, "text"], "non-empty")
    assert unknown.status_code == 404 and unknown.json()["detail"].startswith("item 1: unknown task 'offline_weather'")
    assert too_long.status_code == 413 and too_long.json()["detail"].startswith("item 0: ")
    assert admitted == 0  # nothing of a refused list reaches the model
    assert fine.status_code == 200 and len(fine.json()) == 2


@contextlib.contextmanager
def live(app):
    """``app`` (whose config sets the timeouts) under uvicorn on a free port of 127.0.0.1, as
    ``doe serve`` runs it; yields the port."""
    import uvicorn

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn_config(app, shutdown_timeout_s=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def connect(port: int, data: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(data)
    return s


def read_until_closed(s: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed."""
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out, time.monotonic()


def http(target: str, body: bytes = b"", *, length=None, close=False, chunked=False) -> bytes:
    """A JSON request to ``target`` ("POST /path"); ``length``: the Content-Length to claim."""
    head = [f"{target} HTTP/1.1", "Host: test", "Content-Type: application/json"]
    length = len(body) if length is None else length
    head += ["Transfer-Encoding: chunked"] if chunked else [f"Content-Length: {length}"]
    head += ["Connection: close"] if close else []
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def read_response(s: socket.socket) -> bytes:
    """One whole response (head and Content-Length bytes of body) from a kept-alive connection."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        raw += s.recv(65536)
    head, _, body = raw.partition(b"\r\n\r\n")
    length = int(next(h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")))
    while len(body) < length:
        body += s.recv(65536)
    return head + b"\r\n\r\n" + body


def status_and_body(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_stalled_connections_are_closed_at_their_timeouts_while_others_are_served(tiny):
    timeout = 0.5
    app = app_for(tiny, header_timeout_s=timeout, body_timeout_s=timeout, keep_alive_timeout_s=5)
    item = json.dumps({"text": "a fine film", "task": TOPIC}).encode()
    with live(app) as port:
        t0 = time.monotonic()
        stalled = {
            "idle": connect(port),
            "part-head": connect(port, b"POST /v1/classify HTTP/1.1\r\nHost: test\r\nContent-Le"),
            "part-body": connect(port, http("POST /v1/classify", item[:10], length=len(item))),
            "part-chunked": connect(port, http("POST /v1/classify", b"a\r\n" + item[:10] + b"\r\n", chunked=True)),
        }
        # a second request started on a kept-alive connection, then stalled in its head
        kept = connect(port, http("POST /v1/classify", item))
        first = read_response(kept)
        kept.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: te")
        stalled["part-second-head"] = kept
        served = []
        while time.monotonic() - t0 < 2 * timeout:  # a normal client, served meanwhile
            with connect(port, http("POST /v1/classify", item, close=True)) as s:
                served.append(status_and_body(read_until_closed(s)[0])[0])
        got = {name: read_until_closed(s) for name, s in stalled.items()}
        for s in stalled.values():
            s.close()
        health = connect(port, b"GET /health HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        after = status_and_body(read_until_closed(health)[0])
        metrics = connect(port, b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        counted = read_until_closed(metrics)[0].decode()
    assert status_and_body(first)[0] == 200
    assert len(served) >= 2 and set(served) == {200}
    assert got["idle"][0] == b""  # nothing was asked: closed without an answer
    for name in ("part-head", "part-second-head", "part-body", "part-chunked"):
        status, body = status_and_body(got[name][0])
        assert (status, body["kind"]) == (408, "request_timeout"), (name, got[name][0])
        assert str(timeout) in body["detail"] and "got" in body["detail"], body
    assert "--header-timeout" in status_and_body(got["part-head"][0])[1]["detail"]
    assert "--body-timeout" in status_and_body(got["part-body"][0])[1]["detail"]
    for name, (_, closed) in got.items():
        assert timeout * 0.8 <= closed - t0 < timeout + 2.5, (name, closed - t0)
    assert after[0] == 200 and after[1]["status"] == "ok"
    assert 'doe_errors_total{kind="request_timeout"} 4.0' in counted


def test_timeout_flags_reach_the_config_and_bad_values_are_refused(tiny, tmp_path, monkeypatch, capsys):
    folder = tiny[2][0].save_pretrained(tmp_path / "expert")
    for flag in ("--header-timeout", "--body-timeout", "--keep-alive-timeout"):
        with pytest.raises(SystemExit) as exc:
            main(["serve", "--experts", str(folder), "--port", "0", flag, "0"])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and f"({flag}): expected a number > 0, got 0.0" in err, err
    seen = []

    class Stop(Exception):
        pass

    def no_model(*a, **k):
        raise Stop

    real = ServeConfig

    def recording(**kwargs):
        seen.append(real(**kwargs))
        return seen[-1]

    monkeypatch.setattr("doe.cli._load_model", no_model)
    monkeypatch.setattr("doe.serve.ServeConfig", recording)
    with pytest.raises(Stop):
        main(["serve", "--experts", str(folder), "--port", "0", "--header-timeout", "2.5", "--body-timeout", "7",
              "--keep-alive-timeout", "3"])
    with pytest.raises(Stop):
        main(["serve", "--experts", str(folder), "--port", "0"])
    assert [(c.header_timeout_s, c.body_timeout_s, c.keep_alive_timeout_s) for c in seen] == [(2.5, 7, 3),
                                                                                             (30, 30, 5)]
