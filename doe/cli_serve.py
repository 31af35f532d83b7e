"""`doe serve`: the command that checks its options, loads the model and runs the HTTP app."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from doe import cli
from doe.cli import UsageError, _user_input

__all__ = ["serve"]


def serve(args) -> int:
    """`doe serve`: check every option, bind, load the model and experts, run the app."""
    missing = [name for name, module in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"),
                                         ("prometheus-client", "prometheus_client"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise UsageError(f"`doe serve` needs {', '.join(missing)}: pip install -e \".[serve]\"")
    from doe.router import TaskRouter
    from doe.runtime import check_experts
    from doe.serve import ServeConfig, bind, check_positions, create_app, run_server

    with _user_input("option"):  # ServeConfig validates every value
        config = ServeConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, token_budget=args.token_budget,
                             max_length=cli._max_length(args), max_queue=args.max_queue, max_items=args.max_items,
                             max_new_tokens=args.max_new_tokens, max_body_bytes=args.max_body_bytes,
                             retry_after_s=args.retry_after, shutdown_timeout_s=args.shutdown_timeout,
                             header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                             keep_alive_timeout_s=args.keep_alive_timeout, kv_budget=args.kv_budget)
    if not 0.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold: expected a confidence in [0, 1], got {args.threshold}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port: expected 0 (any free port) to 65535, got {args.port}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads: expected >= 1, got {args.threads}")
    ray_flags = [f for f, given in (("--replicas", args.replicas is not None), ("--autoscale", args.autoscale),
                                    ("--ray-address", args.ray_address)) if given]
    if ray_flags and not args.ray:
        raise UsageError(f"{', '.join(ray_flags)}: only with --ray")
    cli._check_compact_mixed(args)
    cli._check_device(args.device)
    if args.expert_dir is not None and not Path(args.expert_dir).is_dir():
        raise UsageError(f"--expert-dir: expected a folder of expert folders, got {args.expert_dir!r}")
    if args.ray:
        return _serve_ray(args, config)
    experts = cli._load_experts(args.experts) if args.experts or args.expert_dir is None else []
    if experts or args.expert_dir is None:  # with --expert-dir a decoder may start with none
        with _user_input("--experts"):
            check_experts(experts)
    with _user_input("--router", (ValueError, FileNotFoundError)):
        router = TaskRouter.from_pretrained(args.router) if args.router else None
        if router is not None:
            check_experts(experts, router)
    try:  # bound before the model loads: a busy port fails now, and port 0 picks a free one
        sock = bind(args.host, args.port)
    except OSError as exc:
        raise UsageError(f"--host/--port: cannot listen on {args.host}:{args.port} ({exc.strerror or exc})") from exc
    try:
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        tok, model = cli._load_model(args.model, args.device, experts)
        with _user_input("--max-length"):
            check_positions(model, experts, config)
        with _user_input("--experts"):
            app = create_app(model, tok, experts, router=router, threshold=args.threshold, config=config,
                             runtime_options={"compact": args.compact_weights, "mixed": args.mixed},
                             model_id=args.model_id or args.model, expert_dir=args.expert_dir)
        from doe.models import model_source

        banner = (f"model {model_source(model) or args.model}, tasks {', '.join(e.task for e in experts) or 'none'}"
                  f"{', router' if router else ''}")
        return run_server(app, sock=sock, log_level=args.log_level, shutdown_timeout_s=args.shutdown_timeout,
                          banner=banner, config=config)
    finally:
        sock.close()


def _serve_ray(args, config) -> int:
    """`doe serve --ray`: deploy ``doe.serve.ray``'s application on the cluster at --ray-address
    (else a local one started here), with Ray's proxy on --host/--port, until SIGTERM or SIGINT;
    then delete it (replicas finish their requests) and stop what was started here."""
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        raise UsageError("`doe serve --ray` needs Ray Serve: pip install -e \".[ray]\"")
    import copy
    import signal
    import threading

    from doe.serve import ray as doe_ray
    from doe.serve.server import bind

    given = {"model": args.model, "experts": args.experts, "router": args.router, "threshold": args.threshold,
             "expert_dir": args.expert_dir, "model_id": args.model_id or args.model, "device": args.device,
             "threads": args.threads, "compact": args.compact_weights, "mixed": args.mixed,
             "replicas": args.replicas, "autoscale": args.autoscale, **config.to_dict()}
    given = {k: v for k, v in given.items() if v is not None}
    with _user_input("option"):
        deployment = doe_ray.serve_config(given)  # reads the experts and the router: fails before any start
    try:  # Ray's proxy binds the port itself: check it is free now, and pick one for --port 0
        probe = bind(args.host, args.port)
    except OSError as exc:
        raise UsageError(f"--host/--port: cannot listen on {args.host}:{args.port} ({exc.strerror or exc})") from exc
    port = probe.getsockname()[1]
    probe.close()
    import ray
    from ray import serve

    stop = threading.Event()
    previous = {}
    ours = not ray.is_initialized() and args.ray_address is None
    try:
        if not ray.is_initialized():
            import logging

            ray.init(address=args.ray_address, include_dashboard=False, logging_level=logging.WARNING)
        # after ray.init, which installs handlers of its own
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
        serve.start(http_options={"host": args.host, "port": port})
        doe_ray.deploy(deployment)  # as `serve deploy` would: later configs change the experts in place
        shape = f"autoscaling {args.autoscale}" if args.autoscale else f"{args.replicas or 1} replica(s)"
        print(f"doe serve: ready on http://{args.host}:{port} (Ray Serve, {shape}, experts "
              f"{', '.join(Path(e).name for e in args.experts) or 'none'})", flush=True)
        while not stop.wait(0.2):
            pass
        drain = copy.deepcopy(deployment)
        drain["applications"][0]["deployments"][0]["user_config"]["draining"] = True
        doe_ray.deploy(drain)  # every replica answers what it holds; new requests get 503
        if not ours:
            serve.delete(doe_ray.DEPLOYMENT)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if ours and ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
