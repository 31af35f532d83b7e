"""``doe serve`` on Ray Serve: one deployment whose replicas each load the model and every expert
and serve the FastAPI app of ``doe serve`` (``doe.serve.create_app``: every endpoint, the
OpenAI API included), so any replica answers any request and batches experts together.

    serve run doe.serve.ray:app model=minilm experts=/srv/experts/sentiment,/srv/experts/topic replicas=2
    serve deploy ray_serve.yaml                 # import_path: doe.serve.ray:app, args: as below
    doe serve --ray --experts ... [--replicas N | --autoscale MIN:MAX] [--ray-address ADDR]

Arguments (``app(args)``; strings from ``serve run`` are converted): ``model``, ``experts``
(folders, a list or comma-separated), ``router``, ``threshold``, ``expert_dir``, ``model_id``,
``device``, ``threads``, ``compact``, ``mixed``, any ``ServeConfig`` field (``max_batch``, ...),
and the deployment's: ``replicas`` or ``autoscale`` ("MIN:MAX") with ``target_ongoing_requests``,
``upscale_delay_s``, ``downscale_delay_s`` (and any other field of Ray's ``autoscaling_config``,
given as that dict); ``max_ongoing_requests``; ``num_cpus`` and
``num_gpus`` per replica (default: 1 GPU with ``device=cuda``).

Experts change at run time through the deployment's ``user_config``, ``{"experts": [folder,
...]}`` (absolute, or relative to ``expert_dir``): each replica's ``reconfigure`` checks the new
list whole, then loads what is new and unloads what is gone once its requests end; a restarted
replica gets the latest list. POST and DELETE /v1/experts answer 409 there, since one replica
cannot change the others. Metrics keep their names and labels and also go to Ray's metrics
(``ray_`` prefixed by Ray's exporter); GET /metrics shows the answering replica's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Union

from ray import serve

from doe.serve.config import ServeConfig
from doe.serve.metrics import Metrics

__all__ = ["DEPLOYMENT", "DoEReplica", "RayMetrics", "app", "build", "deploy", "parse_args", "serve_config"]

DEPLOYMENT = "doe"
MANAGED = ("the deployment's user_config {\"experts\": [folder, ...]} (deploy it again with the new list, e.g. "
           "`serve deploy` of the config)")

_SERVE_FIELDS = {f.name: f for f in dataclasses.fields(ServeConfig)}
_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_RAY_KEYS = {"replicas": int, "autoscale": str, "target_ongoing_requests": float, "upscale_delay_s": float,
             "downscale_delay_s": float, "max_ongoing_requests": int, "num_cpus": float, "num_gpus": float,
             "autoscaling_config": dict}
_KEYS = {"model": str, "experts": list, "router": str, "threshold": float, "expert_dir": str, "model_id": str,
         "device": str, "threads": int, "compact": bool, "mixed": bool, **_RAY_KEYS}


def _convert(key: str, value: Any, kind: type) -> Any:
    if value is None:
        return None
    try:
        if kind is bool:
            return value if isinstance(value, bool) else _BOOL[str(value).strip().lower()]
        if kind is list:
            items = value.split(",") if isinstance(value, str) else list(value)
            return [str(v).strip() for v in items if str(v).strip()]
        if kind is dict:
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError
        return kind(value)
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"{key}: expected {kind.__name__}, got {value!r}") from None


def parse_args(args: Optional[dict]) -> dict:
    """The application's arguments checked and converted (ValueError naming the bad one):
    ``{"options": ..., "config": ServeConfig fields, "deployment": Ray's options}``."""
    args = dict(args or {})
    unknown = sorted(set(args) - set(_KEYS) - set(_SERVE_FIELDS))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown}; expected some of {sorted(_KEYS)} or a ServeConfig field "
                         f"({', '.join(_SERVE_FIELDS)})")
    config_args = {}
    for key in set(args) & set(_SERVE_FIELDS):
        default = _SERVE_FIELDS[key].default
        config_args[key] = _convert(key, args.pop(key), float if isinstance(default, float) else int)
    config = ServeConfig(**config_args)  # validates each value
    opts = {key: _convert(key, args.get(key), kind) for key, kind in _KEYS.items()}
    experts = [str(Path(f).expanduser().resolve()) for f in opts["experts"] or []]
    if opts["threshold"] is None:
        opts["threshold"] = 0.5
    if not 0.0 <= opts["threshold"] <= 1.0:
        raise ValueError(f"threshold: expected a confidence in [0, 1], got {opts['threshold']}")
    deployment = _deployment_options(opts, config)
    options = {k: opts[k] for k in ("model", "router", "threshold", "model_id", "device", "threads")}
    options.update(experts=experts, runtime_options={"compact": bool(opts["compact"]), "mixed": bool(opts["mixed"])},
                   expert_dir=None if opts["expert_dir"] is None else str(Path(opts["expert_dir"]).resolve()))
    return {"options": options, "config": config.to_dict(), "deployment": deployment}


def _deployment_options(opts: dict, config: ServeConfig) -> dict:
    if opts["replicas"] is not None and opts["autoscale"] is not None:
        raise ValueError("replicas and autoscale: give one (a fixed count, or MIN:MAX to autoscale)")
    if opts["threads"] is not None and opts["threads"] < 1:
        raise ValueError(f"threads: expected >= 1, got {opts['threads']}")
    gpus = opts["num_gpus"] if opts["num_gpus"] is not None else (1.0 if opts["device"] == "cuda" else 0.0)
    cpus = opts["num_cpus"] if opts["num_cpus"] is not None else 1.0
    if cpus < 0 or gpus < 0:
        raise ValueError(f"num_cpus and num_gpus: expected >= 0, got {cpus} and {gpus}")
    ongoing = opts["max_ongoing_requests"] or 64
    if ongoing < 1:
        raise ValueError(f"max_ongoing_requests: expected >= 1, got {ongoing}")
    out = {"ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus}, "max_ongoing_requests": ongoing,
           "graceful_shutdown_timeout_s": config.shutdown_timeout_s}
    if opts["autoscale"] is None:
        if opts["autoscaling_config"]:
            raise ValueError("autoscaling_config: only with autoscale MIN:MAX")
        replicas = 1 if opts["replicas"] is None else opts["replicas"]
        if replicas < 1:
            raise ValueError(f"replicas: expected >= 1, got {replicas}")
        out["num_replicas"] = replicas
        return out
    low, sep, high = opts["autoscale"].partition(":")
    if not (sep and low.strip().isdigit() and high.strip().isdigit() and 1 <= int(low) <= int(high)):
        raise ValueError(f"autoscale: expected MIN:MAX replicas with 1 <= MIN <= MAX, got {opts['autoscale']!r}")
    target = opts["target_ongoing_requests"] or 8.0
    if target <= 0:
        raise ValueError(f"target_ongoing_requests: expected > 0, got {target}")
    auto = {"min_replicas": int(low), "max_replicas": int(high), "initial_replicas": int(low),
            "target_ongoing_requests": target}
    for key in ("upscale_delay_s", "downscale_delay_s"):
        if opts[key] is not None:
            if opts[key] < 0:
                raise ValueError(f"{key}: expected >= 0, got {opts[key]}")
            auto[key] = opts[key]
    out["autoscaling_config"] = {**auto, **(opts["autoscaling_config"] or {})}  # Ray checks the rest
    return out


def _resolve(entry: str, expert_dir: Optional[str]) -> Path:
    path = Path(entry).expanduser()
    if path.is_absolute():
        return path.resolve()
    if expert_dir is None:
        raise ValueError(f"experts: {entry!r} is relative and this deployment has no expert_dir to resolve it in; "
                         "give an absolute folder or set expert_dir")
    return (Path(expert_dir) / path).resolve()


class _Mirror:
    """A prometheus_client metric (or one of its label children) that also records into a
    ``ray.util.metrics`` twin with the same name, labels (as tags) and buckets."""

    def __init__(self, prom, twin, sampled: list, tags: Optional[dict] = None):
        self.prom, self.twin, self.tags, self._sampled = prom, twin, tags or {}, sampled

    def labels(self, *values, **named) -> "_Mirror":
        tags = dict(zip(self.prom._labelnames, values)) if values else named
        return _Mirror(self.prom.labels(*values, **named), self.twin, self._sampled, {k: str(v) for k, v in tags.items()})

    def inc(self, amount: float = 1) -> None:
        self.prom.inc(amount)
        if self.prom._type == "gauge":
            self.twin.set(self.prom._value.get(), tags=self.tags)
        else:
            self.twin.inc(amount, tags=self.tags)

    def dec(self, amount: float = 1) -> None:
        self.prom.dec(amount)
        self.twin.set(self.prom._value.get(), tags=self.tags)

    def set(self, value: float) -> None:
        self.prom.set(value)
        self.twin.set(value, tags=self.tags)

    def observe(self, value: float) -> None:
        self.prom.observe(value)
        self.twin.observe(value, tags=self.tags)

    def set_function(self, fn: Callable[[], float]) -> None:
        self.prom.set_function(fn)
        self._sampled.append((self, fn))  # Ray's gauge has no callback: RayMetrics.sample sets it

    def __getattr__(self, name: str):
        return getattr(self.prom, name)


def _twin(prom):
    from ray.util import metrics as ray_metrics

    keys = tuple(prom._labelnames)
    if prom._type == "counter":
        return ray_metrics.Counter(prom._name, prom._documentation, tag_keys=keys)
    if prom._type == "gauge":
        return ray_metrics.Gauge(prom._name, prom._documentation, tag_keys=keys)
    bounds = [b for b in prom._upper_bounds if b != float("inf")]
    return ray_metrics.Histogram(prom._name, prom._documentation, boundaries=bounds, tag_keys=keys)


class RayMetrics(Metrics):
    """``Metrics`` whose every metric is mirrored to Ray's metrics; ``sample()`` sets the gauges
    that read a callback (the replica's health check calls it)."""

    def __init__(self):
        super().__init__()
        from prometheus_client.metrics import MetricWrapperBase

        self._sampled: list = []
        for name, value in list(vars(self).items()):
            if isinstance(value, MetricWrapperBase):
                setattr(self, name, _Mirror(value, _twin(value), self._sampled))

    def sample(self) -> None:
        for mirror, fn in self._sampled:
            mirror.twin.set(float(fn()), tags=mirror.tags)


_built = threading.local()  # the app a replica's constructor made, handed to its ingress


def _replica_app():
    app, _built.app = _built.app, None
    return app


class DoEReplica:
    """One replica: loads the model and the router and builds ``doe serve``'s app; its experts
    are the ``user_config``'s (``reconfigure``, which Ray calls before the replica takes requests)."""

    def __init__(self, options: dict, config: dict):
        import torch

        from doe.models import load_model
        from doe.router import TaskRouter
        from doe.serve.app import create_app

        if options.get("threads"):
            torch.set_num_threads(options["threads"])
        router = TaskRouter.from_pretrained(options["router"]) if options.get("router") else None
        device = options.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        tok, model = load_model(options["model"], device=device)
        self.expert_dir = options.get("expert_dir")
        self.sources: dict[str, str] = {}  # task -> the folder its expert came from
        app = create_app(model, tok, [], router=router, threshold=options["threshold"],
                         config=ServeConfig(**config), runtime_options=options.get("runtime_options"),
                         model_id=options.get("model_id") or options["model"], metrics=RayMetrics(),
                         experts_managed_by=MANAGED)
        self.server, self.state = app.state.doe, app.state
        self.lock = asyncio.Lock()
        _built.app = app

    async def reconfigure(self, user_config: dict) -> None:
        """Serve exactly the experts ``user_config["experts"]`` lists. The whole list is checked
        first (ValueError, nothing changed); then experts that are new are added and those no
        longer listed (or listed from another folder) unloaded once their requests end.
        ``"draining": true`` instead stops taking work (new requests get 503) and returns once
        what was taken is answered: a graceful stop of every replica before the deployment goes."""
        from doe.runtime import check_experts
        from doe.serve.experts_api import add_expert, read_expert, remove_experts
        from doe.serve.schemas import ApiError

        if not isinstance(user_config, dict) or set(user_config) - {"experts", "draining"}:
            raise ValueError(f"user_config: expected {{'experts': [folder, ...]}}, got {user_config!r}")
        entries = _convert("experts", user_config.get("experts", []), list)
        server = self.server
        if _convert("draining", user_config.get("draining", False), bool):
            self.state.draining = True
            timeout = server.config.shutdown_timeout_s
            if server.engine is not None:
                await asyncio.to_thread(server.engine.stop, timeout)
            await asyncio.to_thread(server.batcher.stop, timeout)
            return
        async with self.lock:
            wanted = {}
            try:
                for entry in entries:
                    folder = str(_resolve(entry, self.expert_dir))
                    known = next((t for t, f in self.sources.items() if f == folder), None)
                    expert = (server.experts[known] if known in server.experts
                              else await asyncio.to_thread(read_expert, server, Path(folder), entry))
                    if expert.task in wanted or expert.task == server.model_id:
                        raise ValueError(f"experts: {entry!r} serves task {expert.task!r}, which "
                                         f"{'another listed folder' if expert.task in wanted else 'the base model'} "
                                         "already names")
                    wanted[expert.task] = (folder, expert)
                if wanted or server.kind != "decoder" or server.runtime.router is not None:
                    check_experts([e for _, e in wanted.values()], server.runtime.router)
                gone = [t for t in server.experts if t not in wanted or wanted[t][0] != self.sources.get(t)]
                await remove_experts(server, gone)
            except ApiError as exc:
                raise ValueError(f"user_config: {exc.detail}") from None
            for task, (folder, expert) in wanted.items():
                if task not in server.experts:
                    await add_expert(server, expert)
                self.sources[task] = folder
            for task in set(self.sources) - set(wanted):
                del self.sources[task]

    async def check_health(self) -> None:
        """Raise unless the workers run and the model answers a one-token forward."""
        server = self.server
        if self.state.draining:
            return  # its workers stop on purpose
        if not server.batcher.alive or (server.engine is not None and not server.engine.alive):
            raise RuntimeError("the serving worker stopped")
        await asyncio.to_thread(self._one_token)
        server.metrics.sample()

    def _one_token(self) -> None:
        import torch

        from doe.locking import model_lock

        model, tok = self.server.runtime.model, self.server.runtime.tokenizer
        token = next((t for t in (tok.cls_token_id, tok.bos_token_id, tok.eos_token_id, 0) if t is not None))
        with model_lock(model), torch.no_grad():
            ids = torch.tensor([[token]], device=next(model.parameters()).device)
            extra = {"decoder_input_ids": ids} if getattr(model.config, "is_encoder_decoder", False) else {}
            model(input_ids=ids, **extra)


def _deployment():
    return serve.deployment(name=DEPLOYMENT)(serve.ingress(_replica_app)(DoEReplica))


def _read(options: dict) -> tuple[list, Optional[str]]:
    """The experts and router ``options`` name, checked, and the model to load: ``model``, else
    the one the experts record, else MiniLM (ValueError)."""
    from doe.expert import TaskExpert
    from doe.router import TaskRouter
    from doe.runtime import check_experts

    try:
        experts = [TaskExpert.from_pretrained(f) for f in options["experts"]]
        router = TaskRouter.from_pretrained(options["router"]) if options.get("router") else None
    except (OSError, ValueError) as exc:
        raise ValueError(f"experts/router: {exc}") from exc
    if experts:  # without any, they come through user_config, which reconfigure checks
        check_experts(experts, router)
    if options["model"] is not None:
        return experts, options["model"]
    recorded = sorted({e.metadata.get("model_name") for e in experts} - {None})
    if len(recorded) > 1:
        raise ValueError(f"the experts were made on different models ({', '.join(recorded)}): give model")
    return experts, recorded[0] if recorded else "minilm"


def build(parsed: dict):
    """The Ray Serve application for ``parse_args``' result, its experts as the default
    ``user_config``. The experts and the router are read here first, so a bad folder fails before
    anything is deployed (ValueError)."""
    options = dict(parsed["options"])
    options["model"] = _read(options)[1]
    return _deployment().options(user_config={"experts": options.pop("experts")},
                                 **parsed["deployment"]).bind(options, parsed["config"])


def app(args: Optional[dict] = None):
    """The application builder of ``serve run doe.serve.ray:app key=value ...`` and of a config's
    ``import_path: doe.serve.ray:app`` (see the module docstring for the arguments)."""
    return build(parse_args(args))


def serve_config(args: dict, *, name: str = DEPLOYMENT, route_prefix: str = "/") -> dict:
    """The Serve config (what ``serve deploy`` reads) of the application for ``args``, with the
    experts in its deployment's ``user_config``: deploying it again with another list changes
    the experts of the running replicas in place."""
    options = parse_args(args)["options"]  # checks every argument
    model = _read(options)[1]
    return {"applications": [{"name": name, "route_prefix": route_prefix, "import_path": "doe.serve.ray:app",
                              "args": {**{k: v for k, v in args.items() if k != "experts"}, "model": model},
                              "deployments": [{"name": DEPLOYMENT, "user_config": {"experts": options["experts"]}}]}]}


def deploy(config: dict, *, timeout_s: float = 600.0) -> None:
    """Deploy a Serve config (``serve_config``) on the cluster this process is connected to, as
    ``serve deploy`` and ``serve run CONFIG`` do, and wait until its applications run; a change of
    ``user_config`` alone reconfigures the running replicas instead of replacing them.
    RuntimeError naming the application's status message when it does not come up."""
    import time

    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema(**config)
    names = [a.name for a in schema.applications]
    client = _get_global_client()
    before = {n: getattr(serve.status().applications.get(n), "last_deployed_time_s", None) for n in names}
    client.deploy_apps(schema)
    start = time.monotonic()
    deadline = start + timeout_s
    while True:
        statuses = {n: serve.status().applications.get(n) for n in names}
        if time.monotonic() - start < 2 and any(s is not None and s.last_deployed_time_s == before[n]
                                                for n, s in statuses.items()):
            time.sleep(0.1)  # the controller has not taken the new config up yet
            continue
        failed = {n: "; ".join([s.message] + [d.message for d in s.deployments.values() if d.message])
                  for n, s in statuses.items() if s is not None and s.status in ("DEPLOY_FAILED", "UNHEALTHY")}
        if failed:
            raise RuntimeError(f"deploying {sorted(failed)} failed: " + "; ".join(failed.values()))
        if all(s is not None and s.status == "RUNNING" and _settled(s) for s in statuses.values()):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{names} not running after {timeout_s:g} s: "
                               f"{ {n: s and s.status for n, s in statuses.items()} }")
        time.sleep(0.2)


def _settled(status) -> bool:
    return all(d.status == "HEALTHY" for d in status.deployments.values())
