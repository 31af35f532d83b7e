"""``doe serve`` on Ray Serve (``doe.serve.ray``), on a local Ray cluster started here: answers
through Ray's proxy on 127.0.0.1 equal to the runtime run in this process, experts changed on
every replica through ``user_config``, a replica killed under load, autoscaling up and down."""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
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
    router.save_pretrained(root / "router")
    return root, paths


def test_the_serve_load_test_passes_on_two_ray_replicas(folders, tmp_path):
    """``benchmarks.serve_load`` as for ``doe serve``, against ``doe serve --ray --replicas 2``
    (a local cluster of its own): every answer equal to the runtime's, bad requests with their
    documented statuses, and SIGTERM mid-burst drains every replica (answered, or 503)."""
    root, paths = folders
    out = tmp_path / "load"
    cmd = [sys.executable, "-m", "benchmarks.serve_load", "--model", str(root / "model"), "--device", "cpu",
           "--experts", *paths.values(), "--router", str(root / "router"), "--requests", "160", "--clients", "8",
           "--shutdown-requests", "60", "--max-length", str(MAX_TOKENS), "--max-items", "4", "--bad-every", "10",
           "--disconnect-every", "25", "--list-every", "7", "--threads", "1", "--ray-replicas", "2",
           "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    report = json.loads((out / "serve_load.json").read_text())
    main_phase, shutdown = report["main"], report["shutdown"]
    assert done.returncode == 0 and report["ok"], done.stdout[-3000:] + done.stderr[-3000:]
    assert main_phase["lost"] == 0 and main_phase["wrong"] == 0 and main_phase["bad_status_mismatch"] == 0
    assert shutdown["exit_code"] == 0 and shutdown["wrong"] == 0 and shutdown["other"] == 0
    counts = report["server_counts"]  # summed over both replicas' stop lines
    assert counts["admitted"] == counts["answered"] + counts["dropped"] and counts["answered"] > 0


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


def test_metrics_reach_rays_metrics_with_the_same_names_and_labels(tiny, folders, cluster):
    """After requests, Ray's metrics export (the node's Prometheus endpoint) carries the
    replicas' counters under the names and labels of GET /metrics, prefixed ray_. First on the
    cluster: Ray's counters add up over every replica it has run."""
    deploy(folders, TASKS, replicas=1)
    reqs = requests_for(tiny, TASKS, 12)
    assert [s for s, _ in classify(cluster, reqs)] == [200] * 12
    node = ray._private.worker.global_worker.node
    url = f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"
    want = {t: sum(r["task"] == t for r in reqs) for t in TASKS}
    deadline = time.monotonic() + 60
    while True:
        text = httpx.get(url, timeout=10).text
        got = {t: sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if line.startswith("ray_doe_items") and f'task="{t}"' in line and f'expert="{t}"' in line)
               for t in TASKS}
        if got == want:
            break
        assert time.monotonic() < deadline, (got, want, [ln for ln in text.splitlines() if "doe_" in ln][:10])
        time.sleep(1)
    local = httpx.get(f"{cluster}/metrics", timeout=10).text  # the replica's own registry, as before
    assert any(line.startswith("doe_items_total{") and f'task="{TASKS[0]}"' in line for line in local.splitlines())


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


# 408: a request whose body Ray's proxy never passed on (its replica killed in between) meets the
# app's --body-timeout; clients such as openai's retry it like 5xx
RETRYABLE = (408, 502, 503, 504)
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


def test_a_replica_checks_a_whole_expert_list_before_changing_anything_and_its_health(tiny, folders, cluster,
                                                                                     monkeypatch):
    """DoEReplica in this process: reconfigure refuses a bad list whole, adds and removes in
    place; check_health runs a forward and fails when the model or the worker fails."""
    import asyncio

    from fastapi.testclient import TestClient

    root, paths = folders
    parsed = doe_ray.parse_args(args_for(folders, []))
    options = {**parsed["options"], "router": str(root / "router")}
    options.pop("experts")
    replica = doe_ray.DoEReplica(options, parsed["config"])
    app = doe_ray._replica_app()
    with TestClient(app) as client:
        asyncio.run(replica.reconfigure({"experts": list(paths.values())}))
        assert sorted(replica.server.experts) == sorted(TASKS)
        before = dict(replica.server.experts)
        bad = [
            ({"experts": [paths[TASKS[0]], paths[TASKS[0]]]}, "already names"),
            ({"experts": [paths[TASKS[0]], str(root)]}, "not an expert folder"),
            ({"experts": [paths[TASKS[0]], "relative/one"]}, "no expert_dir"),
            ({"experts": [paths[TASKS[0]]]}, "routes to tasks"),  # the router still routes to the other
            ({"experts": paths[TASKS[0]], "colour": 1}, "expected {'experts'"),
        ]
        for config, message in bad:
            with pytest.raises(ValueError, match=message):
                asyncio.run(replica.reconfigure(config))
            assert replica.server.experts == before and replica.server.removing == set()
        r = client.post("/v1/classify", json={"text": "fine", "task": TASKS[1]})
        assert r.status_code == 200
        asyncio.run(replica.check_health())
        model = replica.server.runtime.model

        def broken(*a, **k):
            raise RuntimeError("the device fell off")

        monkeypatch.setattr(model, "forward", broken)
        with pytest.raises(RuntimeError, match="fell off"):
            asyncio.run(replica.check_health())
        monkeypatch.undo()
        asyncio.run(replica.check_health())
    with pytest.raises(RuntimeError, match="worker stopped"):  # the lifespan ended: its workers stopped
        asyncio.run(replica.check_health())


def test_arguments_are_checked_and_converted_before_anything_is_deployed(folders):
    root, paths = folders
    parsed = doe_ray.parse_args({"model": "m", "experts": ",".join(paths.values()), "replicas": "2",
                                 "mixed": "true", "max_batch": "8", "max_wait_ms": "2.5", "threshold": "0.7"})
    assert parsed["options"]["experts"] == list(paths.values()) and parsed["options"]["runtime_options"]["mixed"]
    assert parsed["config"]["max_batch"] == 8 and parsed["config"]["max_wait_ms"] == 2.5
    assert parsed["deployment"]["num_replicas"] == 2 and parsed["options"]["threshold"] == 0.7
    auto = doe_ray.parse_args({"autoscale": "1:3", "target_ongoing_requests": 4, "device": "cuda",
                               "autoscaling_config": {"look_back_period_s": 5}})["deployment"]
    assert auto["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "initial_replicas": 1,
                                          "target_ongoing_requests": 4.0, "look_back_period_s": 5}
    assert auto["ray_actor_options"]["num_gpus"] == 1.0 and "num_replicas" not in auto
    for args, message in [({"colour": "red"}, "unknown argument"), ({"replicas": 2, "autoscale": "1:2"}, "give one"),
                          ({"autoscale": "3:1"}, "MIN:MAX"), ({"replicas": "two"}, "replicas: expected int"),
                          ({"mixed": "maybe"}, "mixed: expected bool"), ({"max_batch": 0}, "max_batch"),
                          ({"threshold": 2}, "threshold"), ({"autoscaling_config": {"x": 1}}, "only with autoscale")]:
        with pytest.raises(ValueError, match=message):
            doe_ray.parse_args(args)
    with pytest.raises(ValueError, match="experts/router"):
        doe_ray.app({"experts": [str(root)]})
    config = doe_ray.serve_config({"experts": list(paths.values()), "replicas": 2})
    (application,) = config["applications"]
    assert application["import_path"] == "doe.serve.ray:app" and "experts" not in application["args"]
    assert application["deployments"][0]["user_config"] == {"experts": list(paths.values())}
    assert application["args"]["model"] == "minilm"  # the hand-made experts record no model


def test_the_example_config_is_a_valid_serve_deploy_config():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((ROOT / "examples" / "ray_serve.yaml").read_text())
    schema = ServeDeploySchema(**config)
    (application,) = schema.applications
    assert application.import_path == "doe.serve.ray:app"
    parsed = doe_ray.parse_args(application.args)  # every argument is one the builder takes
    assert parsed["deployment"]["autoscaling_config"]["max_replicas"] >= 2
    assert application.deployments[0].user_config["experts"]


def test_doe_serve_ray_flags_are_checked_before_ray_starts(folders, monkeypatch, capsys):
    from doe.cli import main

    root, paths = folders
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started before the flags were checked"))
    folder = paths[TASKS[0]]
    for argv, message in [(["--experts", folder, "--replicas", "2"], "--replicas: only with --ray"),
                          (["--experts", folder, "--ray", "--autoscale", "2"], "MIN:MAX"),
                          (["--experts", folder, "--ray", "--replicas", "0"], "replicas: expected >= 1"),
                          (["--experts", str(root), "--ray"], "experts/router")]:
        with pytest.raises(SystemExit) as exc:
            main(["serve", "--model", str(root / "model"), *argv])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err, (argv, err)
