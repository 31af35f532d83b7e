"""Method ablation of expert localization: accuracy of experts against the dense model, one step
changed at a time.

    python -m benchmarks.ablation [--model smollm2] [--task offline_topic] [--keeps 0.35,0.2]
                                      [--scopes layer,global] [--targets logit,log_prob]
                                      [--max-train 200] [--max-eval 200] [--retune-epochs 2] [--seeds 0]
                                      [--readout auto|head|mean|verbalizer] [--random-at 0.2]
                                      [--retune-compensated-only] [--readout-layer auto|last|N]
                                      [--reprobe] [--dense-blocks 0] [--readout-first auto|on|off]

--task takes a registered task or a published data set (benchmarks.published: reuters_r8).
--retune-epochs takes a comma list; the first value re-tunes every variant, each further value
re-tunes the compensated one again from the dense prompt. --random-at adds, at those keep
ratios, randomly chosen neurons put through the same steps (compensated, re-tuned). --reprobe
adds, per expert, the head fitted again as a probe of the expert's states, then re-tuned from
there (what ``find_expert`` does by default for a head that started as a probe); the random rows
then take that path too. --readout-layer: the layer the head reads (default auto: chosen by
cross-validated probes on the training texts); --readout-first: whether the head also reads the
first layer's states (PromptTuningConfig.readout_first; default auto).

Per seed, one prompt tuning on the dense model; per attribution target one scoring pass; per
keep ratio and allocation scope one localization, evaluated four ways: as localized or with the
prompt re-tuned on the expert, each without and with bias compensation. Rows are named
``scope/target``, then the steps applied. Prints a markdown table (accuracy, points below dense).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time

import torch


def resolve_task(task: str):
    """A registered task's spec, or a published data set's (benchmarks.published)."""
    from benchmarks.published import PUBLISHED, published_task
    from doe.tasks import get_task

    return published_task(task) if task in PUBLISHED else get_task(task)


def run(model_name: str, task: str, keeps: list, max_train: int, max_eval: int, retune_epochs, seeds: list,
        scopes: tuple = ("layer",), targets: tuple = ("logit",), readout: str = "auto", random_at=(),
        retune_compensated_only: bool = False, readout_layer="auto", reprobe: bool = False,
        dense_blocks: tuple = (), readout_first="auto") -> list:
    from doe.attribution import AttributionConfig, mean_down_inputs, score_neurons
    from doe.localize import ExpertSearchConfig, LocalizationConfig, choose_dense_blocks, compensation_offsets, localize
    from doe.models import load_model
    from doe.probe import probe_head
    from doe.prompt import PromptTuningConfig, TaskModel, prompt_tune
    from doe.tasks import load_task
    from doe.unplug import unplugged

    retunes = [retune_epochs] if isinstance(retune_epochs, int) else list(retune_epochs)
    retunes = [e for e in retunes if e]
    tok, model = load_model(model_name)
    data = load_task(resolve_task(task), max_train=max_train, max_eval=max_eval)
    gold = [e.label for e in data.eval]

    def acc(tm):
        pred = tm.predict(data.eval)
        return sum(p == g for p, g in zip(pred, gold)) / len(gold)

    rows = []
    for seed in seeds:
        t0 = time.time()
        cfg = PromptTuningConfig(seed=seed, show_progress=False, readout=readout, readout_layer=readout_layer,
                                 readout_first=readout_first)
        tm = TaskModel(model, tok, data.spec, num_tokens=cfg.num_tokens, max_length=cfg.max_length, seed=seed,
                       readout=readout)
        prompt_tune(tm, data, cfg)
        dense = acc(tm)
        rows.append(dict(seed=seed, keep=1.0, variant="dense", acc=dense))
        means = mean_down_inputs(tm, data.train)
        layers = ", ".join(str(k or "last") for k in tm.readout_layers)
        print(f"seed {seed}: dense {dense:.3f}, head reads layer(s) {layers} "
              f"({time.time() - t0:.0f} s)", flush=True)

        def reprobed(expert, epochs):
            rt = TaskModel(model, tok, data.spec, prompt=tm.prompt.detach().clone(), head=tm.head_state(),
                           max_length=cfg.max_length, readout=tm.readout)
            with unplugged(model, expert):
                probe_head(rt, data.train)
                fitted = acc(rt)
                if epochs:
                    prompt_tune(rt, data, PromptTuningConfig(seed=seed, epochs=epochs, head_lr=cfg.probe_head_lr,
                                                             show_progress=False))
                return fitted, acc(rt) if epochs else None

        def retuned(expert, epochs):
            rt = TaskModel(model, tok, data.spec, prompt=tm.prompt.detach().clone(), head=tm.head_state(),
                           max_length=cfg.max_length, readout=tm.readout)
            with unplugged(model, expert):
                prompt_tune(rt, data, PromptTuningConfig(seed=seed, epochs=epochs, head_lr=1e-2, show_progress=False))
                return acc(rt)

        def variants(expert, prefix, extra_retunes, full_only=False):
            comp = expert.with_offsets(compensation_offsets(model, expert, means))
            for name, e in ((" + compensated", comp),) if full_only else (("", expert), (" + compensated", comp)):
                if not full_only:
                    with unplugged(model, e):
                        yield f"{prefix}{name}", acc(tm)
                if retune_compensated_only and not name:
                    continue
                if reprobe:
                    fitted, tuned = reprobed(e, retunes[0] if retunes else 0)
                    yield f"{prefix}{name} + re-probed", fitted
                    if tuned is not None:
                        yield f"{prefix}{name} + re-probed + re-tuned", tuned
                    if full_only:
                        continue
                for i, epochs in enumerate(retunes[:1] + (extra_retunes if name else [])):
                    label = " + re-tuned" if i == 0 else f" + re-tuned {epochs} epochs"
                    yield f"{prefix}{name}{label}", retuned(e, epochs)

        def record(keep, pairs):
            for variant, a in pairs:
                rows.append(dict(seed=seed, keep=keep, variant=variant, acc=a))
                print(f"  keep {keep} {variant}: {a:.3f}", flush=True)

        chosen = {}
        sensitivity_examples = ExpertSearchConfig().sensitivity_examples  # as find_expert measures blocks
        for target in targets:
            scores = score_neurons(tm, data, AttributionConfig(seed=seed, target=target, show_progress=False))
            for keep, scope in itertools.product(keeps, scopes):
                local = LocalizationConfig(keep_ratio=keep, scope=scope, dense_blocks=dense_blocks)
                if dense_blocks == "auto":
                    local, rises = choose_dense_blocks(tm, scores, local, data.train[:sensitivity_examples])
                    print(f"  keep {keep}: dense blocks {list(local.dense_blocks)} (largest rises "
                          f"{sorted(rises, reverse=True)[:3]})", flush=True)
                chosen[keep] = local.dense_blocks
                expert = localize(model, scores, local, task=data.spec.name)
                record(keep, variants(expert, f"{scope}/{target}", retunes[1:]))
        for keep in random_at:  # the blocks the attribution expert at that keep kept whole
            random_dense = chosen.get(keep, ())
            scores = score_neurons(tm, data, AttributionConfig(method="random", seed=seed, show_progress=False))
            local = LocalizationConfig(keep_ratio=keep, scope="layer", dense_blocks=random_dense)
            expert = localize(model, scores, local, task=data.spec.name)
            record(keep, variants(expert, "random", retunes[1:], full_only=True))
    return rows


def table(rows: list, model_name: str, task: str) -> str:
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    keeps = list(dict.fromkeys(r["keep"] for r in rows))
    dense = statistics.median(r["acc"] for r in rows if r["variant"] == "dense")
    seeds = sorted({r["seed"] for r in rows})
    out = [f"{model_name} on {task}: accuracy, median over seeds {seeds} (points below dense)", "",
           "| keep | variant | accuracy | vs dense |", "|---:|---|---:|---:|"]
    for keep in keeps:
        for v in variants:
            vals = [r["acc"] for r in rows if r["keep"] == keep and r["variant"] == v]
            if vals:
                a = statistics.median(vals)
                out.append(f"| {keep} | {v} | {a:.3f} | {100 * (a - dense):+.1f} |")
    return "\n".join(out)


def _layer_arg(value: str):
    return {"auto": "auto", "last": None}[value] if value in ("auto", "last") else int(value)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--task", default="offline_topic")
    ap.add_argument("--keeps", default="0.35,0.2")
    ap.add_argument("--max-train", type=int, default=200)
    ap.add_argument("--max-eval", type=int, default=200)
    ap.add_argument("--retune-epochs", default="2", help="comma list (see above); 0 skips re-tuning")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--scopes", default="layer", help="comma list of layer, global")
    ap.add_argument("--targets", default="logit", help="comma list of logit, log_prob")
    ap.add_argument("--readout", default="auto", choices=["auto", "head", "mean", "verbalizer"])
    ap.add_argument("--random-at", default="", help="comma list of keep ratios for the random-neuron rows")
    ap.add_argument("--readout-layer", default="auto", help="auto, last, or a layer number")
    ap.add_argument("--reprobe", action="store_true", help="add the re-probed rows (see above)")
    ap.add_argument("--readout-first", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--dense-blocks", default="", help="auto, or a comma list of FFN blocks every expert keeps whole")
    ap.add_argument("--retune-compensated-only", action="store_true",
                    help="re-tune only the compensated experts (the other rows as localized)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = run(args.model, args.task, [float(k) for k in args.keeps.split(",")], args.max_train, args.max_eval,
               [int(e) for e in args.retune_epochs.split(",")], [int(s) for s in args.seeds.split(",")],
               tuple(args.scopes.split(",")), tuple(args.targets.split(",")), args.readout,
               [float(k) for k in args.random_at.split(",") if k], args.retune_compensated_only,
               _layer_arg(args.readout_layer), args.reprobe,
               "auto" if args.dense_blocks == "auto" else tuple(int(b) for b in args.dense_blocks.split(",") if b),
               {"auto": "auto", "on": True, "off": False}[args.readout_first])
    print(table(rows, f"{args.model} (readout {args.readout})", args.task))
    return 0


if __name__ == "__main__":
    sys.exit(main())
