"""Load test of the OpenAI API of ``doe serve`` with the real ``openai`` client: continuous
batching across experts against one request at a time and against a single-expert batch.

    python -m benchmarks.openai_load [--model smollm2] [--experts 4] [--keep 0.35] [--clients 16]
                                     [--requests 32] [--prompt 16,256] [--new 32,128] [--stagger 0.25]
                                     [--out FILE.md]

The server runs in this process under uvicorn on 127.0.0.1, on ``--model`` with ``--experts``
generation experts (random kept neurons and soft prompts: speed does not depend on which
neurons are kept; answers are checked against the same server run one request at a time).
Requests are spread over the experts and the base model; prompts are words of the offline
suite's texts, ``--prompt`` tokens long (min,max), asking ``--new`` new tokens (greedy). Phases:

1. one at a time: each request alone through the server (its answer is the reference);
2. mixed: ``--clients`` concurrent streaming chat clients over the mix;
3. single expert: the same requests all sent to one expert, same clients;
4. half load: ``--clients // 2`` clients, for the time-to-first-token spread.

Prints (and writes to ``--out``) tokens/s of each phase, their ratios, time to first token
p50/p99, and how many answers differ from the one-at-a-time run (0 expected; exit 1 otherwise).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from pathlib import Path


def _experts(model, n: int, keep: float, folder: Path) -> list:
    import torch

    from benchmarks.models import make_expert
    from doe.tasks import generation_task, spec_to_dict

    path = folder / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "hello", "completion": "hi"}) + "\n")
    hidden = model.get_input_embeddings().weight.shape[1]
    out = []
    for i in range(n):
        e = make_expert(model, keep, seed=i)
        e.task = f"expert-{i}"
        e.prompt = torch.randn(8, hidden, generator=torch.Generator().manual_seed(i)) * 0.02
        e.metadata = {**e.metadata, "task_spec": spec_to_dict(generation_task(e.task, path))}
        out.append(e)
    return out


def _plan(tok, models: list[str], n: int, prompt: tuple, new: tuple, seed: int) -> list[dict]:
    from doe.tasks import OFFLINE_TASKS, load_task

    words = " ".join(e.text for t in OFFLINE_TASKS for e in load_task(t).train).split()
    rng = random.Random(seed)
    plan = []
    for i in range(n):
        length = rng.randint(*prompt)
        start = rng.randrange(len(words) - 400)
        text = " ".join(words[start: start + length])
        ids = tok(text, add_special_tokens=False)["input_ids"][:length]
        plan.append({"model": models[i % len(models)], "text": tok.decode(ids), "new": rng.randint(*new)})
    return plan


def _drive(port: int, plan: list[dict], clients: int, model_override: str = None, stagger: float = 0.0) -> dict:
    """Send ``plan`` from ``clients`` concurrent streaming chat clients (client i starts after
    ``i * stagger`` seconds: arrivals, not one burst); answers, tokens, TTFTs."""
    import openai

    todo = list(range(len(plan)))
    lock = threading.Lock()
    answers, ttft, tokens, errors = {}, [], [0], []

    def client():
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            p = plan[i]
            t0 = time.perf_counter()
            first, text, used = None, "", 0
            try:
                for ch in c.chat.completions.create(model=model_override or p["model"], temperature=0,
                                                    max_tokens=p["new"], stream=True,
                                                    stream_options={"include_usage": True},
                                                    messages=[{"role": "user", "content": p["text"]}]):
                    if ch.choices and ch.choices[0].delta.content:
                        first = first or time.perf_counter()
                        text += ch.choices[0].delta.content
                    if ch.usage is not None:
                        used = ch.usage.completion_tokens
            except Exception as exc:  # noqa: BLE001 - counted as an error
                errors.append(f"{i}: {type(exc).__name__}: {exc}")
                continue
            with lock:
                answers[i] = text
                tokens[0] += used
                if first is not None:
                    ttft.append(first - t0)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
        time.sleep(stagger)
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"answers": answers, "tokens": tokens[0], "wall": wall, "tok_s": tokens[0] / wall, "ttft": sorted(ttft),
            "errors": errors}


def _pct(values: list, q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def run(args) -> tuple[str, int]:
    import tempfile

    import torch
    import uvicorn

    from doe.models import load_model
    from doe.serve import ServeConfig, bind, create_app
    from doe.serve.server import uvicorn_config

    torch.manual_seed(0)
    tok, model = load_model(args.model)
    experts = _experts(model, args.experts, args.keep, Path(tempfile.mkdtemp()))
    config = ServeConfig(max_batch=args.clients, max_new_tokens=max(args.new), max_length=max(args.prompt) + 64,
                         token_budget=max(2048, max(args.prompt) + 64), max_queue=max(64, 4 * args.clients))
    app = create_app(model, tok, experts, config=config, model_id="base")
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn_config(app, shutdown_timeout_s=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = sock.getsockname()[1]
    plan = _plan(tok, [e.task for e in experts] + ["base"], args.requests, args.prompt, args.new, args.seed)
    try:
        alone = _drive(port, plan, 1)
        mixed = _drive(port, plan, args.clients, stagger=args.stagger)
        single = _drive(port, plan, args.clients, model_override=experts[0].task, stagger=args.stagger)
        half = _drive(port, plan, max(1, args.clients // 2), stagger=args.stagger)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
    wrong = [i for i in range(len(plan)) if mixed["answers"].get(i) != alone["answers"].get(i)]
    lost = len(plan) - len(mixed["answers"])
    lines = [
        f"# OpenAI API load: {args.model}, {args.experts} experts at keep {args.keep} + the base model",
        "",
        f"{args.requests} greedy chat requests, prompts {args.prompt[0]}-{args.prompt[1]} tokens, "
        f"{args.new[0]}-{args.new[1]} new tokens, {args.clients} streaming clients starting "
        f"{args.stagger} s apart; torch threads {torch.get_num_threads()}.",
        "",
        "| phase | clients | tokens | wall s | tokens/s | TTFT p50 s | TTFT p99 s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r, c in (("one at a time", alone, 1), ("mixed experts", mixed, args.clients),
                       ("single expert", single, args.clients), ("mixed, half load", half, max(1, args.clients // 2))):
        lines.append(f"| {name} | {c} | {r['tokens']} | {r['wall']:.1f} | {r['tok_s']:.1f} | "
                     f"{_pct(r['ttft'], 0.5):.3f} | {_pct(r['ttft'], 0.99):.3f} |")
    lines += [
        "",
        f"- mixed / one at a time: {mixed['tok_s'] / alone['tok_s']:.2f}x (goal >= 4x)",
        f"- mixed / single expert: {mixed['tok_s'] / single['tok_s']:.2f}x (goal >= 0.9x)",
        f"- half load TTFT p99 / p50: {_pct(half['ttft'], 0.99) / _pct(half['ttft'], 0.5):.2f} (goal <= 3)",
        f"- answers that differ from the one-at-a-time run: {len(wrong)} of {len(plan)}; lost: {lost}; errors: "
        f"{sum(len(r['errors']) for r in (alone, mixed, single, half))}",
    ]
    return "\n".join(lines), int(bool(wrong or lost or mixed["errors"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--keep", type=float, default=0.35)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt", default="16,256", help="min,max prompt tokens")
    ap.add_argument("--new", default="32,128", help="min,max new tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stagger", type=float, default=0.25, help="seconds between two clients' first requests")
    ap.add_argument("--out", help="write the markdown table here too")
    args = ap.parse_args(argv)
    args.prompt = tuple(int(x) for x in args.prompt.split(","))
    args.new = tuple(int(x) for x in args.new.split(","))
    text, status = run(args)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
