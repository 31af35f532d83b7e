"""The ``doe`` command.

    doe demo                                   the whole story, offline, on the packaged MiniLM
    doe localize --task offline_sentiment --out experts/sentiment
    doe eval --experts experts/sentiment
    doe router fit --experts experts/* --out router/
    doe run --experts experts/* --router router/ --requests in.jsonl --out out.jsonl
    doe serve --experts experts/* --router router/ --port 8000
    doe bench --suite kernels --out results/
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from doe.cli_parser import build_parser

__all__ = ["main"]



class UsageError(ValueError):
    """Bad arguments, files or values that the command validates: exit code 2 with the message.

    Raised only where the command checks what the user gave; any other exception is a bug or
    an environment problem and keeps its traceback."""


@contextlib.contextmanager
def _user_input(what: str, errors: tuple = (ValueError, TypeError, FileNotFoundError)):
    """Turn ``errors`` raised while reading what the user gave as ``what`` into a UsageError."""
    try:
        yield
    except UsageError:
        raise
    except errors as exc:
        raise UsageError(f"{what}: {exc}") from exc


def _check_device(device: Optional[str]) -> None:
    """Reject a device this build of torch cannot use, before any work."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--device: expected cpu, cuda or cuda:N, got {device!r}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device: {device!r} was asked for but this torch build sees no CUDA device "
                             f"(torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device: {device!r} was asked for but only {torch.cuda.device_count()} CUDA "
                             "device(s) exist")
    elif dev.type != "cpu":
        raise UsageError(f"--device: expected cpu, cuda or cuda:N, got {device!r}")


def _check_writable_dir(path: Path, what: str) -> None:
    """``path`` is or can become a folder we can write into (probed in its nearest existing ancestor)."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what}: expected a folder, got the existing file {path}")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{what}: cannot create {path}: {probe} is a file")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".doe-probe-", dir=probe))
    except OSError as exc:
        raise UsageError(f"{what}: expected a writable folder, but cannot write into {probe} ({exc.strerror})") from exc


def _check_writable_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise UsageError(f"{what}: expected a file path, got the folder {path}")
    _check_writable_dir(path.parent, what)


def _check_compact_mixed(args) -> None:
    if args.compact_weights and args.mixed:
        raise UsageError("--compact-weights runs one expert at a time on its compacted copy; --mixed runs every "
                         "expert at once on the original weights: give one of them")


def _load_model(name: Optional[str], device: Optional[str], experts: Sequence = ()):
    """(tokenizer, model) for ``--model``; without it, the model the experts record (else MiniLM)."""
    import torch

    from doe.models import load_model_for
    from doe.progress import quiet_libraries

    quiet_libraries()
    what = "--model" if name is not None or not experts else "--experts (give --model to choose the model)"
    with _user_input(what, (OSError, ValueError, ImportError)):
        return load_model_for(experts, name, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))


_GENERIC_FOLDERS = {"", ".", "..", "data", "datasets", "dataset", "raw", "tmp", "train", "splits"}


def _default_task_name(train: str) -> str:
    """The training file's folder name (data/reviews/train.csv -> reviews), or 'custom' where
    that folder name says nothing (data, tmp, ...)."""
    parent = Path(train).expanduser().resolve().parent.name
    return "custom" if parent.lower() in _GENERIC_FOLDERS else parent


def _task(args):
    from doe.tasks import get_task, local_task

    if args.train:
        generation = args.task_type == "generation"
        if generation and args.labels:
            raise UsageError("--labels: a generation task has none (it reads --prompt-field and --completion-field)")
        if not generation and not args.labels:
            raise UsageError("--train needs --labels (comma-separated label names in id order)")
        files = {"train": args.train, **({"validation": args.eval_file} if args.eval_file else {})}
        name = getattr(args, "task_name", None) or args.task or _default_task_name(args.train)
        if not args.eval_file and not 0 < args.holdout < 1:
            raise UsageError(f"--holdout: expected a fraction in (0, 1) of --train to evaluate on, got {args.holdout}")
        fields = (dict(text_fields=(args.prompt_field,), label_field=args.completion_field, task_type="generation")
                  if generation else dict(labels=args.labels.split(","), text_fields=tuple(args.text_fields.split(",")),
                                          label_field=args.label_field))
        with _user_input("--train"):
            return local_task(name, files, holdout=0.0 if args.eval_file else args.holdout,
                              instruction=args.instruction or "", **fields)
    if not args.task:
        raise UsageError("give --task NAME (see `doe tasks`) or --train FILE --labels a,b")
    with _user_input("--task"):
        spec = get_task(args.task)
    return spec if args.instruction is None else dataclasses.replace(spec, instruction=args.instruction)


def _load_data(spec, **limits):
    """``load_task`` with the data problems a user can fix (missing or malformed files, no hub
    access for a hub task) reported as usage errors."""
    from doe.progress import quiet_libraries
    from doe.tasks import load_task

    quiet_libraries()
    with _user_input("data", (ValueError, FileNotFoundError, ConnectionError)):
        return load_task(spec, **limits)


def _cmd_localize(args) -> int:
    from doe import progress
    from doe.attribution import AttributionConfig
    from doe.localize import ExpertSearchConfig, LocalizationConfig, find_expert
    from doe.prompt import PromptTuningConfig

    keeps = args.keep or [0.35]
    if len(set(keeps)) != len(keeps):
        raise UsageError(f"--keep: expected distinct keep ratios, got {keeps}")
    for name in ("epochs", "prompt_tokens"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    # an explicit --retune-epochs re-tunes after a re-probe too
    retune = {} if args.retune_epochs is None else {"retune_epochs": args.retune_epochs, "retune_after_reprobe": True}
    layer = args.readout_layer
    if layer not in ("auto", "last") and not layer.isdigit():
        raise UsageError(f"--readout-layer: expected auto, last or a layer number, got {layer!r}")
    layer = None if layer == "last" else layer if layer == "auto" else int(layer)
    dense = args.dense_blocks
    if dense not in ("auto", "none") and not all(b.strip().isdigit() for b in dense.split(",")):
        raise UsageError(f"--dense-blocks: expected auto, none or block numbers such as 0,1; got {dense!r}")
    dense = () if dense == "none" else dense if dense == "auto" else tuple(int(b) for b in dense.split(","))
    if args.retune_offsets is not None:
        retune["retune_offsets"] = args.retune_offsets
    compensate = "auto" if args.bias_compensation is None else args.bias_compensation
    with _user_input("localize options"):  # the config classes validate every value
        configs = [ExpertSearchConfig(
            prompt=PromptTuningConfig(num_tokens=args.prompt_tokens, epochs=args.epochs, seed=args.seed,
                                      show_progress=not args.quiet, readout=args.readout, readout_layer=layer,
                                      readout_first="auto" if args.readout_first is None else args.readout_first),
            attribution=AttributionConfig(method=args.method, target=args.target, max_examples=args.max_examples,
                                          seed=args.seed, show_progress=not args.quiet),
            localization=LocalizationConfig(keep_ratio=keep, scope=args.scope, multiple_of=args.multiple_of,
                                            bias_compensation=compensate, dense_blocks=dense),
            reprobe=not args.no_reprobe, **retune,
        ) for keep in keeps]
    spec = _task(args)
    _check_writable_dir(Path(args.out), "--out")
    _check_device(args.device)
    tok, model = _load_model(args.model, args.device)
    data = _load_data(spec, max_train=args.max_train, max_eval=args.max_eval)
    result = None
    from doe.models import model_kind

    retunes = configs[0].retunes(model_kind(model)) or (data.spec.is_generation and configs[0].retune_epochs > 0)
    phases = 1 + (args.method != "random") + len(keeps) * retunes
    with progress.steps(phases):
        for keep, config in zip(keeps, configs):
            result = find_expert(model, tok, data, config,
                                 task_model=result.task_model if result else None,
                                 scores=result.scores if result else None)
            out = Path(args.out) if len(keeps) == 1 else Path(args.out) / f"keep{keep}"
            result.expert.save_pretrained(out)
            expert = result.expert
            depth = expert.metadata.get("readout_depth")
            reads = "" if depth is None else (f"; {sum(expert.kept[:depth]) / sum(expert.num_neurons[:depth]):.1%} of "
                                              f"the {depth} layers its head reads, the only ones it runs")
            print(f"{data.spec.name}: kept {sum(expert.kept)}/{sum(expert.num_neurons)} FFN neurons "
                  f"({expert.keep_ratio:.1%}, {args.method}{reads}) -> {out}")
    return 0


def _load_experts(paths: Sequence[str]):
    from doe.expert import TaskExpert

    if not paths:
        raise UsageError("--experts: give at least one expert folder")
    with _user_input("--experts", (ValueError, FileNotFoundError)):
        return [TaskExpert.from_pretrained(p) for p in paths]


def _row_names(paths: Sequence[str], experts) -> list[str]:
    """One table row name per expert: its folder name and method, with parent folders added
    until the names are distinct (experts/a/keep0.35 vs experts/b/keep0.35)."""
    parts = [Path(p).expanduser().resolve().parts for p in paths]
    for depth in range(1, max(len(x) for x in parts) + 1):
        names = ["/".join(x[-depth:]) for x in parts]
        if len(set(names)) == len(names):
            break
    return [f"{n} ({e.metadata.get('method') or 'unknown method'})" for n, e in zip(names, experts)]


def _cmd_eval(args) -> int:
    from doe.evaluate import evaluate
    from doe.prompt import TaskModel
    from doe.tasks import get_task, local_task

    if args.batch_size < 1:
        raise UsageError(f"--batch-size: expected >= 1, got {args.batch_size}")
    if args.eval_file and not Path(args.eval_file).is_file():
        raise UsageError(f"--eval-file: expected a data file, {args.eval_file} does not exist")
    _check_device(args.device)
    experts = _load_experts(args.experts)
    if args.train:
        spec = _task(args)
    else:
        with _user_input("--task" if args.task else
                         f"the task of expert {args.experts[0]} (give --task, or --train and --labels)"):
            own = [e.spec() for e in experts if e.task == args.task] if args.task else [experts[0].spec()]
            spec = own[0] if own else get_task(args.task)  # a local task is known by the experts that carry it
        if args.eval_file:  # score this file with the task's labels, fields and metric
            with _user_input("--eval-file"):
                spec = local_task(spec.name, {"train": args.eval_file, "validation": args.eval_file},
                                  labels=spec.labels, text_fields=spec.text_fields, label_field=spec.label_field,
                                  metric=spec.metric, verbalizer=spec.verbalizer, description=spec.description,
                                  instruction=spec.instruction, task_type=spec.task_type)
        if args.instruction is not None:
            spec = dataclasses.replace(spec, instruction=args.instruction)
    tok, model = _load_model(args.model, args.device, experts)
    data = _load_data(spec, max_train=1, max_eval=args.max_eval)
    own = [e for e in experts if e.task == spec.name and e.dense_prompt is not None]
    if not own:
        raise UsageError(f"--experts: none is an expert of task {spec.name!r} with a dense prompt, which the "
                         "dense baseline needs")
    dense = TaskModel(model, tok, spec, prompt=own[0].dense_prompt, head=own[0].dense_head)
    report = evaluate(model, tok, data, dense, experts, batch_size=args.batch_size,
                      names=_row_names(args.experts, experts), zero_shot=True)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_markdown())
    return 0


def _max_length(args) -> int:
    """``--max-length``, or the deprecated ``--max-tokens`` (with a warning on stderr)."""
    if args.max_tokens is not None:
        if args.max_length is not None:
            raise UsageError(f"--max-tokens is the earlier name of --max-length: give one, got --max-length "
                             f"{args.max_length} and --max-tokens {args.max_tokens}")
        print("doe serve: --max-tokens is now --max-length; the old name goes in the next release", file=sys.stderr)
        return args.max_tokens
    return 128 if args.max_length is None else args.max_length


def _cmd_run(args) -> int:
    from doe.router import TaskRouter
    from doe.runtime import Request, UnplugAndPlay, check_experts

    # Files first, so that a typo fails before a model is loaded.
    path = Path(args.requests)
    if not path.is_file():
        raise UsageError(f"--requests: {path} does not exist")
    requests = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path}:{n}: not a JSON line ({exc.msg})") from exc
            with _user_input(f"{path}:{n}"):
                requests.append(Request.coerce(item, len(requests)))
    if not 0.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold: expected a confidence in [0, 1], got {args.threshold}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size: expected >= 1, got {args.batch_size}")
    _check_compact_mixed(args)
    out = Path(args.out)
    _check_writable_file(out, "--out")
    _check_device(args.device)
    experts = _load_experts(args.experts)
    with _user_input("--router", (ValueError, FileNotFoundError)):
        router = TaskRouter.from_pretrained(args.router) if args.router else None
    with _user_input("--experts"):
        check_experts(experts)
    with _user_input("--router"):
        check_experts(experts, router)
    if not requests:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("")
        print(f"doe run: {path} holds no requests; wrote an empty {out}", file=sys.stderr)
        return 0
    tok, model = _load_model(args.model, args.device, experts)
    rt = UnplugAndPlay(model, tok, router=router, threshold=args.threshold, max_batch=args.batch_size,
                       compact=args.compact_weights, mixed=args.mixed)
    for expert in experts:
        rt.add_expert(expert)
    results = rt.process(requests)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in results))
    os.replace(tmp, out)  # whole or not at all
    summary = rt.summary()
    print(json.dumps(summary, indent=2))
    print(f"wrote {len(results)} results to {out}")
    return 1 if summary["errors"] else 0


def _cmd_serve(args) -> int:
    from doe.cli_serve import serve

    return serve(args)


def _cmd_router_fit(args) -> int:
    from doe.router import TaskRouter
    from doe.tasks import local_task

    if args.max_per_task < 1:
        raise UsageError(f"--max-per-task: expected >= 1, got {args.max_per_task}")
    out = Path(args.out)
    _check_writable_dir(out, "--out")
    _check_device(args.device)
    files = {}
    for item in args.train or []:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise UsageError(f"--train: expected TASK=FILE, got {item!r}")
        if not Path(file).is_file():
            raise UsageError(f"--train: expected a data file for task {name!r}, {file} does not exist")
        files[name] = file
    experts = _load_experts(args.experts)
    specs = {}
    for path, expert in zip(args.experts, experts):
        with _user_input(f"the task of expert {path}"):
            spec = expert.spec()
        if spec.name in files:
            with _user_input(f"--train {spec.name}={files[spec.name]}"):
                spec = local_task(spec.name, {"train": files[spec.name], "validation": files[spec.name]},
                                  labels=spec.labels, text_fields=spec.text_fields, label_field=spec.label_field)
        specs[spec.name] = spec
    extra = sorted(set(files) - set(specs))
    if extra:
        raise UsageError(f"--train: tasks {extra} are not the task of any --experts folder ({sorted(specs)})")
    if len(specs) < 2:
        raise UsageError(f"--experts: a router chooses between tasks; expected experts of at least 2 tasks, "
                         f"got {sorted(specs)}")
    texts = {name: [e.text for e in _load_data(spec, max_train=args.max_per_task, max_eval=1).train]
             for name, spec in specs.items()}
    tok, model = _load_model(args.model, args.device, experts)
    router = TaskRouter.fit(model, tok, texts, seed=args.seed, show_progress=not args.quiet)
    router.save_pretrained(out)
    acc = router.accuracy(model, tok, texts)
    print(f"router over {len(texts)} tasks ({', '.join(texts)}), {sum(map(len, texts.values()))} texts, "
          f"training accuracy {acc:.1%} -> {out}")
    return 0


def _cmd_bench(args) -> int:
    root = Path(__file__).resolve().parent.parent / "benchmarks"
    if not (root / "report" / "__main__.py").is_file():
        raise UsageError("`doe bench` runs the suites of a source checkout (pip install -e .); "
                         f"no benchmarks/ folder next to the package at {root.parent}")
    missing = [name for name, module in (("pytest", "pytest"), ("pytest-benchmark", "pytest_benchmark"),
                                         ("matplotlib", "matplotlib"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise UsageError(f"`doe bench` needs {', '.join(missing)}: pip install -e \".[bench]\"")
    out = Path(args.out)
    _check_writable_dir(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    files = {"kernels": ["test_kernels.py"], "models": ["test_models.py"], "mixed": ["test_mixed.py"],
             "generate": ["test_generate.py"],
             "all": ["test_kernels.py", "test_models.py", "test_generate.py", "test_mixed.py"]}[args.suite]
    jsons = []
    for f in files:
        js = out / f"{Path(f).stem.removeprefix('test_')}.json"
        cmd = [sys.executable, "-m", "pytest", str(root / f), "-q", f"--benchmark-json={js}", *args.pytest_args]
        print("+", " ".join(cmd), flush=True)
        if subprocess.call(cmd, cwd=root.parent) != 0:
            return 1
        jsons.append(str(js))
    return subprocess.call([sys.executable, "-m", "benchmarks.report", *jsons, "--out", str(out)], cwd=root.parent)


def _cmd_demo(args) -> int:
    from doe.demo import DemoConfig, run_demo
    from doe.localize import LocalizationConfig

    with _user_input("--keep"):
        LocalizationConfig(keep_ratio=args.keep)
    if args.requests < 1:
        raise UsageError(f"--requests: expected >= 1, got {args.requests}")
    cache = Path(args.cache).expanduser()
    _check_writable_dir(cache, "--cache")
    _check_device(args.device)
    result = run_demo(DemoConfig(cache=cache if args.model == "minilm" else cache / args.model, keep_ratio=args.keep,
                                 requests=args.requests, fresh=args.fresh, seed=args.seed, device=args.device,
                                 show_progress=not args.quiet, model=args.model))
    return 0 if result["identical"] else 1


def _cmd_tasks(args) -> int:
    from doe.tasks import OFFLINE_TASKS, TASKS

    for name, spec in TASKS.items():
        where = "offline" if name in OFFLINE_TASKS else f"hub: {spec.dataset}" + (f"/{spec.config}" if spec.config else "")
        print(f"{name:<18} {len(spec.labels)} labels ({', '.join(spec.labels)}) · {spec.metric} · {where}")
    return 0


COMMANDS = {
    "demo": _cmd_demo,
    "localize": _cmd_localize,
    "eval": _cmd_eval,
    "run": _cmd_run,
    "serve": _cmd_serve,
    "router_fit": _cmd_router_fit,
    "bench": _cmd_bench,
    "tasks": _cmd_tasks,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``doe`` with ``argv``; usage errors exit 2 with a one-line message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.handler](args)
    except UsageError as exc:
        parser.exit(2, f"doe {args.command}: error: {exc}\n")
    except KeyboardInterrupt:
        parser.exit(130, "interrupted\n")


if __name__ == "__main__":
    sys.exit(main())
