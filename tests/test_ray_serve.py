"""``doe serve`` on Ray Serve (``doe.serve.ray``), on a local Ray cluster started here: answers
through Ray's proxy on 127.0.0.1 equal to the runtime run in this process, experts changed on
every replica through ``user_config``, a replica killed under load, autoscaling up and down."""

from __future__ import annotations

import concurrent.futures
import os
import socket
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from doe.serve import ray as doe_ray  # noqa: E402
from test_serve import MAX_TOKENS, TASKS, offline, same, tiny  # noqa: E402,F401

ROOT = Path(__file__).resolve().parent.parent
FAST_AUTOSCALING = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
                    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def folders(tiny, tmp_path_factory):
    """The tiny model, its tokenizer and one expert per task, saved as folders."""
    model, tok, experts, router, texts = tiny
    root = tmp_path_factory.mktemp("ray")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    paths = {e.task: str(e.save_pretrained(root / "experts" / e.task)) for e in experts}
    return root, paths


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs with Serve's proxy on a free port of 127.0.0.1."""
    os.environ.update(FAST_AUTOSCALING)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": dict(FAST_AUTOSCALING)})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def args_for(folders, experts, **more) -> dict:
    root, paths = folders
    return {"model": str(root / "model"), "experts": [paths[t] for t in experts], "max_length": MAX_TOKENS,
            "threads": 1, "num_cpus": 0.5, "device": "cpu", **more}


def deploy(folders, experts, **more) -> None:
    doe_ray.deploy(doe_ray.serve_config(args_for(folders, experts, **more)))


def running(state: str = "RUNNING") -> int:
    status = serve.status().applications[doe_ray.DEPLOYMENT].deployments[doe_ray.DEPLOYMENT]
    return status.replica_states.get(state, 0)


def replica_names() -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{doe_ray.DEPLOYMENT}#"))


def replica_actors() -> list:
    return [ray.get_actor(n, namespace="serve") for n in replica_names()]


def classify(url: str, requests: list, timeout: float = 60.0) -> list:
    """(status, body) per request, 8 at a time."""
    def one(req):
        r = httpx.post(f"{url}/v1/classify", json=req, timeout=timeout)
        return r.status_code, r.json()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, requests))


def requests_for(tiny, tasks, n: int) -> list:
    texts = tiny[4]
    return [{"text": texts[tasks[i % len(tasks)]][i % 24], "task": tasks[i % len(tasks)]} for i in range(n)]


def test_two_replicas_answer_like_the_runtime_and_experts_change_on_every_replica(tiny, folders, cluster):
    deploy(folders, TASKS, replicas=2)
    assert running() == 2
    reqs = requests_for(tiny, TASKS, 48)
    want = offline(tiny, reqs, router=False)
    got = classify(cluster, reqs)
    assert [s for s, _ in got] == [200] * len(reqs)
    assert all(same(g, w) for (_, g), w in zip(got, want))
    pids = {a: ray.get(a.__ray_call__.remote(lambda self: os.getpid())) for a in replica_actors()}
    assert len(pids) == 2
    # one expert fewer: every replica agrees, none restarts
    deploy(folders, TASKS[:1], replicas=2)
    for _ in range(12):
        models = httpx.get(f"{cluster}/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"][1:]] == [TASKS[0]]
        r = httpx.post(f"{cluster}/v1/classify", json={"text": "fine", "task": TASKS[1]}, timeout=10)
        assert r.status_code == 404 and r.json()["kind"] == "unknown_task"
    assert {a: ray.get(a.__ray_call__.remote(lambda self: os.getpid())) for a in replica_actors()} == pids
    r = httpx.post(f"{cluster}/v1/experts", json={"path": TASKS[1]}, timeout=10)
    assert r.status_code == 409 and "user_config" in r.json()["detail"]
    # a list that does not load is refused whole: the replicas keep serving what they had
    config = doe_ray.serve_config(args_for(folders, TASKS[:1], replicas=2))
    config["applications"][0]["deployments"][0]["user_config"]["experts"].append(str(folders[0]))
    with pytest.raises(RuntimeError, match="not an expert folder"):
        doe_ray.deploy(config, timeout_s=120)
    models = httpx.get(f"{cluster}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"][1:]] == [TASKS[0]]
    deploy(folders, TASKS, replicas=2)
    got = classify(cluster, reqs)
    assert all(s == 200 and same(g, w) for (s, g), w in zip(got, want))
    serve.delete(doe_ray.DEPLOYMENT)


RETRYABLE = (502, 503, 504)
RAY_REPLICA_DIED = (500, "Internal Server Error")  # Ray's proxy, for a request whose replica died under it


def test_a_killed_replica_fails_retryably_and_the_deployment_heals(tiny, folders, cluster):
    """ray.kill of a replica in the middle of the load: the requests it held fail (Ray's proxy
    answers 500 for a request whose replica died, a status clients such as openai's retry) or
    find no connection, none hangs, none is wrong, each failed one retried is answered right,
    and the deployment is back to 2 healthy replicas within 60 s."""
    deploy(folders, TASKS, replicas=2)
    reqs = requests_for(tiny, TASKS, 240)
    want = offline(tiny, reqs, router=False)

    def one(req):
        try:
            r = httpx.post(f"{cluster}/v1/classify", json=req, timeout=60)
        except httpx.TransportError as exc:
            return 0, repr(exc)
        return r.status_code, r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, r) for r in reqs]
        while sum(f.done() for f in futures) < 40:
            time.sleep(0.005)
        victim = replica_names()[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        killed = time.monotonic()
        got = [f.result(timeout=90) for f in futures]  # none hangs
    answered = [i for i, (s, _) in enumerate(got) if s == 200]
    failed = [i for i, (s, b) in enumerate(got) if s in RETRYABLE or s == 0 or (s, b) == RAY_REPLICA_DIED]
    assert len(answered) + len(failed) == len(reqs), [got[i] for i in set(range(len(reqs))) - set(answered + failed)]
    assert all(same(got[i][1], want[i]) for i in answered) and len(answered) >= 40
    while victim in replica_names() or running() != 2:  # a new replica in its place, and both up
        assert time.monotonic() < killed + 60, serve.status().applications[doe_ray.DEPLOYMENT]
        time.sleep(0.25)
    healed = time.monotonic() - killed
    retried = classify(cluster, [reqs[i] for i in failed])
    assert all(s == 200 and same(g, want[i]) for (s, g), i in zip(retried, failed))
    print(f"replica killed under load: {len(answered)} answered, {len(failed)} failed and answered right when "
          f"retried, 0 wrong, 2 healthy replicas again {healed:.0f} s later")


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(tiny, folders, cluster):
    deploy(folders, TASKS, autoscale="1:2", target_ongoing_requests=1, upscale_delay_s=0.5, downscale_delay_s=2,
           autoscaling_config={"look_back_period_s": 1})
    deadline = time.monotonic() + 60
    while running() != 1:
        assert time.monotonic() < deadline, serve.status().applications[doe_ray.DEPLOYMENT]
        time.sleep(0.2)
    reqs = requests_for(tiny, TASKS, 48)
    want = offline(tiny, reqs, router=False)
    stop, wrong = threading.Event(), []

    def client(k):
        i = k
        while not stop.is_set():
            r = httpx.post(f"{cluster}/v1/classify", json=reqs[i % len(reqs)], timeout=60)
            if r.status_code != 200 or not same(r.json(), want[i % len(reqs)]):
                wrong.append((r.status_code, r.text))
            i += 8

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 90
        while running() < 2:
            assert time.monotonic() < deadline, "no second replica under load"
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not wrong, wrong[:3]
    deadline = time.monotonic() + 90
    while running() != 1:
        assert time.monotonic() < deadline, "the second replica stayed after the load"
        time.sleep(0.5)
