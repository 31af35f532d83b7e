"""Load test of ``doe serve``: start it on 127.0.0.1, send a bounded mix of requests from
concurrent clients, check every answer against the offline runtime, stop it with SIGTERM.

    python -m benchmarks.serve_load --experts experts/* --router router/ --requests 2000 --clients 16 --out DIR

The mix: held-out texts of the experts' tasks, named (or, with a router, some left to route),
one item or small lists; bad requests of every documented kind, each with the status the API
promises; clients that disconnect mid-request. Each answer is compared with
``UnplugAndPlay.process`` run offline in this process on the same text (label, task, expert,
routing; probabilities within 1e-4). Then a shutdown phase: a burst of requests, SIGTERM in
the middle of it; every request must be answered correctly, refused (503 or no connection),
and the server must exit 0 having answered every item it admitted.

Writes ``serve_load.json`` and ``serve_load.md`` to ``--out``; exits 1 when a request was
lost or answered wrongly, a bad request got another status, or the shutdown was not clean.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from benchmarks.serve_report import machine, parse_metrics, to_markdown

PROB_TOL = 1e-4


@dataclass
class Planned:
    kind: str  # "good", a bad-request kind, or "disconnect"
    body: bytes
    expected: int  # HTTP status the API documents for it (0: no answer expected)
    items: list[tuple[str, Optional[str]]] = field(default_factory=list)  # (text, task) of good items
    content_type: str = "application/json"
    path: str = "/v1/classify"
    single: bool = True  # body is one object (else a list)


def _bad_requests(tasks: list[str], max_length: int, max_items: int, encoder: bool) -> list[Planned]:
    """One request of each bad kind, with the status the API documents."""
    t = tasks[0]

    def js(obj):
        return json.dumps(obj).encode()

    bad = [
        Planned("malformed_json", b'{"text": "unclosed', 400),
        Planned("missing_text", js({"task": t}), 422),
        Planned("extra_field", js({"text": "fine", "task": t, "colour": "red"}), 422),
        Planned("wrong_type", js({"text": 42, "task": t}), 422),
        Planned("empty_text", js({"text": "", "task": t}), 422),
        Planned("blank_text", js({"text": "   ", "task": t}), 422),
        Planned("too_long", js({"text": "word " * (max_length + 8), "task": t}), 413),
        Planned("unknown_task", js({"text": "fine", "task": "no_such_task"}), 404),
        Planned("empty_list", b"[]", 422),
        Planned("too_many_items", js([{"text": "fine", "task": t}] * (max_items + 1)), 413),
        Planned("not_json_content", js({"text": "fine", "task": t}), 415, content_type="text/plain"),
        Planned("body_too_large", js({"text": "x" * (1 << 20), "task": t}), 413),  # the server's default limit
    ]
    if encoder:
        bad.append(Planned("generate_on_encoder", js({"prompt": "hello"}), 404, path="/v1/generate"))
    return bad


def build_plan(texts: dict[str, list[str]], n: int, *, routed: float, bad_every: int, disconnect_every: int,
               list_every: int, max_length: int, max_items: int, encoder: bool, seed: int) -> list[Planned]:
    """``n`` requests: good ones (one item, or a list of 2-4 every ``list_every``), a bad one every
    ``bad_every``, a disconnecting one every ``disconnect_every``."""
    rng = random.Random(seed)
    tasks = sorted(texts)
    bad = _bad_requests(tasks, max_length, max_items, encoder)
    plan: list[Planned] = []

    def item():
        task = rng.choice(tasks)
        return rng.choice(texts[task]), (None if rng.random() < routed else task)

    def body(items, single):
        objs = [{"text": x, **({"task": k} if k else {})} for x, k in items]
        return json.dumps(objs[0] if single else objs).encode()

    for i in range(1, n + 1):
        if bad_every and i % bad_every == 0:
            plan.append(bad[(i // bad_every - 1) % len(bad)])
        elif disconnect_every and i % disconnect_every == 0:
            items = [item()]
            plan.append(Planned("disconnect", body(items, True), 0, items))
        else:
            single = not (list_every and i % list_every == 0)
            items = [item()] if single else [item() for _ in range(rng.randint(2, 4))]
            plan.append(Planned("good", body(items, single), 200, items, single=single))
    return plan


def offline_runtime(args):
    """The runtime as the server sets it up, in this process."""
    from doe.cli import _load_model
    from doe.expert import TaskExpert
    from doe.router import TaskRouter
    from doe.runtime import UnplugAndPlay

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    tok, model = _load_model(args.model, args.device)
    rt = UnplugAndPlay(model, tok, router=TaskRouter.from_pretrained(args.router) if args.router else None,
                       threshold=args.threshold, max_batch=args.max_batch, max_length=args.max_length,
                       compact=args.compact_weights)
    for folder in args.experts:
        rt.add_expert(TaskExpert.from_pretrained(folder))
    return rt


def offline_answers(rt, plan: list[Planned]) -> dict[tuple[str, Optional[str]], dict]:
    """Every good item of ``plan`` through ``UnplugAndPlay.process``."""
    keys = sorted({it for p in plan for it in p.items}, key=lambda k: (k[1] or "", k[0]))
    results = rt.process([{"text": text, "task": task} for text, task in keys])
    return {k: r.to_dict() for k, r in zip(keys, results)}


def _mismatch(got: dict, want: dict) -> Optional[str]:
    for key in ("task", "label", "label_id", "expert", "routed"):
        if got.get(key) != want.get(key):
            return f"{key}: got {got.get(key)!r}, offline {want.get(key)!r}"
    if abs(got["probability"] - want["probability"]) > PROB_TOL:
        return f"probability: got {got['probability']}, offline {want['probability']}"
    if want["route_confidence"] is not None and abs(got["route_confidence"] - want["route_confidence"]) > PROB_TOL:
        return f"route_confidence: got {got['route_confidence']}, offline {want['route_confidence']}"
    return None


def check_answer(p: Planned, status: int, payload: Any, expected: dict, tasks: list[str]) -> Optional[str]:
    """None when the response is what the API promises for ``p``, else why not."""
    if p.kind != "good":
        if status != p.expected:
            return f"{p.kind}: status {status}, documented {p.expected}"
        if not isinstance(payload, dict) or "kind" not in payload or "detail" not in payload:
            return f"{p.kind}: error body without kind/detail: {payload!r}"
        if p.kind == "unknown_task" and payload.get("tasks") != sorted(tasks):
            return f"unknown_task: body lists {payload.get('tasks')}, server serves {tasks}"
        return None
    answers = [payload] if p.single else payload
    if not isinstance(answers, list) or len(answers) != len(p.items):
        return f"expected {len(p.items)} answers, got {payload!r}"
    for it, got in zip(p.items, answers):
        why = _mismatch(got, expected[it])
        if why:
            return f"{it[0]!r} ({it[1] or 'routed'}): {why}"
    return None


# ------------------------------------------------------------------------------ the server


def start_server(args, log_path: Path) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "doe.cli", "serve", "--model", args.model, "--experts", *args.experts,
           "--port", "0", "--threshold", str(args.threshold), "--max-batch", str(args.max_batch),
           "--max-wait-ms", str(args.max_wait_ms), "--max-length", str(args.max_length),
           "--max-items", str(args.max_items)]
    cmd += ["--router", args.router] if args.router else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--compact-weights"] if args.compact_weights else []
    cmd += ["--mixed"] if args.mixed else []
    cmd += ["--device", args.device] if args.device else []
    cmd += ["--ray", "--replicas", str(args.ray_replicas)] if args.ray_replicas else []
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = re.search(r"ready on http://[^:]+:(\d+)", line)
        if m:
            return proc, int(m.group(1))
    proc.kill()
    proc.wait()
    raise RuntimeError(f"doe serve did not start; see {log_path}:\n{log_path.read_text()[-3000:]}")


def _server_counts(log_text: str) -> Optional[dict]:
    """The counts the server printed as it stopped, summed over its replicas (on Ray, one line each)."""
    found = re.findall(r"(\d+) items admitted, (\d+) answered, (\d+) dropped", log_text)
    return dict(zip(("admitted", "answered", "dropped"), (sum(int(f[i]) for f in found) for i in range(3)))) \
        if found else None


async def _disconnect(port: int, p: Planned, early: bool) -> None:
    """Send the request (``early``: half of its body) and go away without reading the answer."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(p.body)}\r\n\r\n").encode()
    try:
        writer.write(head + (p.body[: len(p.body) // 2] if early else p.body))
        await writer.drain()
        await asyncio.sleep(0.001 if early else 0.005)
    finally:
        writer.close()


async def _send(client, port: int, p: Planned, max_retries: int = 30):
    """(status, payload, seconds, 503s waited out) of one planned request."""
    url = f"http://127.0.0.1:{port}{p.path}"
    rejected = 0
    t0 = time.perf_counter()
    while True:
        r = await client.post(url, content=p.body, headers={"content-type": p.content_type})
        if r.status_code == 503 and r.json().get("kind") == "queue_full" and rejected < max_retries:
            rejected += 1
            await asyncio.sleep(float(r.headers.get("retry-after", "1")))
            continue
        try:
            payload = r.json()
        except ValueError:
            payload = r.text
        return r.status_code, payload, time.perf_counter() - t0, rejected


async def main_phase(args, port: int, plan: list[Planned], expected: dict, tasks: list[str]) -> dict:
    import httpx

    queue = list(enumerate(plan))
    latencies: list[float] = []
    failures: list[str] = []
    lost = wrong = bad_mismatch = rejected = 0
    disconnects = 0

    async def client_loop(client):
        nonlocal lost, wrong, bad_mismatch, rejected, disconnects
        while queue:
            i, p = queue.pop(0)
            if p.kind == "disconnect":
                await _disconnect(port, p, early=i % 2 == 0)
                disconnects += 1
                continue
            try:
                status, payload, seconds, waited = await _send(client, port, p)
            except Exception as exc:  # no answer at all
                lost += p.kind == "good"
                bad_mismatch += p.kind != "good"
                failures.append(f"#{i} {p.kind}: {type(exc).__name__}: {exc}")
                continue
            rejected += waited
            why = None if p.kind != "good" or status == 200 else f"status {status}: {payload}"
            if why:
                lost += 1
            else:
                why = check_answer(p, status, payload, expected, tasks)
                if why:
                    wrong += p.kind == "good"
                    bad_mismatch += p.kind != "good"
            if why:
                failures.append(f"#{i} {p.kind}: {why}")
            elif p.kind == "good":
                latencies.append(seconds)

    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(limits=limits, timeout=args.request_timeout) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(args.clients)))
        wall = time.perf_counter() - t0
        health = (await client.get(f"http://127.0.0.1:{port}/health")).status_code
        metrics = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    good = [p for p in plan if p.kind == "good"]
    ms = sorted(1000 * s for s in latencies)

    def pct(q):
        return ms[min(len(ms) - 1, int(round(q / 100 * (len(ms) - 1))))] if ms else None

    return {
        "requests": len(plan), "good_requests": len(good), "good_items": sum(len(p.items) for p in good),
        "bad_requests": sum(p.kind not in ("good", "disconnect") for p in plan), "disconnects": disconnects,
        "wall_s": wall, "throughput_rps": len(latencies) / wall, "items_per_s": sum(
            len(p.items) for p in good) / wall,
        "latency_ms": {"p50": pct(50), "p95": pct(95), "p99": pct(99), "mean": statistics.fmean(ms) if ms else None},
        "lost": lost, "wrong": wrong, "bad_status_mismatch": bad_mismatch, "rejected_503": rejected,
        "health_after": health, "failures": failures[:50], "server_metrics": parse_metrics(metrics),
    }


async def shutdown_phase(args, proc: subprocess.Popen, port: int, plan: list[Planned], expected: dict,
                         tasks: list[str]) -> dict:
    """Send ``plan`` on fresh connections from all clients; SIGTERM after a quarter is answered."""
    import httpx

    outcome = {"answered": 0, "wrong": 0, "unavailable_503": 0, "refused": 0, "closed_unanswered": 0, "other": 0}
    failures: list[str] = []
    queue = list(plan)
    done = 0
    signalled = asyncio.Event()

    async def client_loop(client):
        nonlocal done
        while queue:
            p = queue.pop(0)
            try:
                r = await client.post(f"http://127.0.0.1:{port}{p.path}", content=p.body,
                                      headers={"content-type": p.content_type})
            except httpx.ConnectError:
                outcome["refused"] += 1
                continue
            except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
                outcome["closed_unanswered"] += 1  # connection closed before the request was read
                failures.append(f"closed: {type(exc).__name__}: {exc}")
                continue
            finally:
                done += 1
                if done >= len(plan) // 4 and not signalled.is_set():
                    signalled.set()
                    proc.send_signal(signal.SIGTERM)
            if r.status_code == 200:
                why = check_answer(p, 200, r.json(), expected, tasks)
                outcome["wrong" if why else "answered"] += 1
                if why:
                    failures.append(why)
            elif r.status_code == 503:
                outcome["unavailable_503"] += 1
            else:
                outcome["other"] += 1
                failures.append(f"status {r.status_code}: {r.text[:200]}")

    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=args.request_timeout) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(args.clients)))
    try:
        code = proc.wait(timeout=args.start_timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
        failures.append("the server did not exit after SIGTERM")
    return {"requests": len(plan), **outcome, "exit_code": code, "failures": failures[:20]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--device", default=None)
    p.add_argument("--experts", nargs="+", required=True)
    p.add_argument("--router", default=None)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--routed", type=float, default=0.25, help="fraction of good items without a task (with --router)")
    p.add_argument("--bad-every", type=int, default=20, help="every N-th request is a bad one (0: none)")
    p.add_argument("--disconnect-every", type=int, default=50, help="every N-th request disconnects (0: none)")
    p.add_argument("--list-every", type=int, default=10, help="every N-th good request carries 2-4 items")
    p.add_argument("--shutdown-requests", type=int, default=200, help="burst for the SIGTERM phase (0: skip it)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-items", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads of the server and the offline run")
    p.add_argument("--compact-weights", action="store_true", help="serve (and run offline) with compacted experts")
    p.add_argument("--mixed", action="store_true", help="serve mixed-task batches (the offline reference runs one "
                   "task at a time)")
    p.add_argument("--ray-replicas", type=int, default=0,
                   help="serve on Ray Serve (doe serve --ray) with this many replicas on a local cluster (0: no Ray)")
    p.add_argument("--request-timeout", type=float, default=60.0)
    p.add_argument("--start-timeout", type=float, default=180.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.requests < 1 or args.clients < 1:
        p.error(f"--requests and --clients: expected >= 1, got {args.requests} and {args.clients}")
    return args


def run(args) -> dict:
    from doe.expert import TaskExpert
    from doe.tasks import load_task

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    experts = sorted((TaskExpert.from_pretrained(f) for f in args.experts), key=lambda e: e.task)
    tasks = [e.task for e in experts]
    rt = offline_runtime(args)
    texts = {}
    for t, expert in zip(tasks, experts):  # the held-out texts the server accepts (a longer one is a bad request)
        pool = [e.text for e in load_task(expert.spec()).eval]
        texts[t] = [x for x, ids in zip(pool, rt.tokenizer(pool)["input_ids"]) if len(ids) <= args.max_length]
    encoder = args.model == "minilm" or json.loads((Path(args.model) / "config.json").read_text()).get(
        "model_type") in ("bert", "roberta", "distilbert", "xlm-roberta", "electra")
    plan = build_plan(texts, args.requests, routed=args.routed if args.router else 0.0, bad_every=args.bad_every,
                      disconnect_every=args.disconnect_every, list_every=args.list_every,
                      max_length=args.max_length, max_items=args.max_items, encoder=encoder, seed=args.seed)
    burst = [p for p in build_plan(texts, args.shutdown_requests, routed=args.routed if args.router else 0.0,
                                   bad_every=0, disconnect_every=0, list_every=0, max_length=args.max_length,
                                   max_items=args.max_items, encoder=encoder, seed=args.seed + 1)]
    t0 = time.perf_counter()
    expected = offline_answers(rt, plan + burst)
    print(f"offline answers for {len(expected)} distinct items in {time.perf_counter() - t0:.1f}s", flush=True)
    log_path = out / "server.log"
    proc, port = start_server(args, log_path)
    try:
        main = asyncio.run(main_phase(args, port, plan, expected, tasks))
        print(f"main phase: {main['throughput_rps']:.1f} req/s, p50 {main['latency_ms']['p50']:.1f} ms, "
              f"lost {main['lost']}, wrong {main['wrong']}, bad mismatches {main['bad_status_mismatch']}", flush=True)
        shutdown = None
        if burst:
            shutdown = asyncio.run(shutdown_phase(args, proc, port, burst, expected, tasks))
        else:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=args.start_timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    counts = _server_counts(log_path.read_text())
    if shutdown is not None:
        shutdown["server_counts"] = counts
    report = {"machine": machine(), "config": {k: v for k, v in vars(args).items() if k != "out"},
              "tasks": tasks, "main": main, "shutdown": shutdown, "server_exit_code": proc.returncode,
              "server_counts": counts}
    ok = (main["lost"] == 0 and main["wrong"] == 0 and main["bad_status_mismatch"] == 0 and main["health_after"] == 200
          and proc.returncode == 0 and counts is not None
          and counts["admitted"] == counts["answered"] + counts["dropped"]
          and (shutdown is None or (shutdown["wrong"] == 0 and shutdown["other"] == 0 and shutdown["answered"] > 0)))
    report["ok"] = ok
    (out / "serve_load.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "serve_load.md").write_text(to_markdown(report))
    return report


def main(argv=None) -> int:
    report = run(parse_args(argv))
    print(to_markdown(report))
    if not report["ok"]:
        print("FAILED: see serve_load.json (failures)", file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
