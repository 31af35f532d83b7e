"""The ``doe`` command line's arguments (``doe.cli`` runs the commands)."""

from __future__ import annotations

import argparse

__all__ = ["build_parser"]

EPILOG = "Every subcommand has its own --help. Models: 'minilm' (packaged, offline) or a local folder."


def _add_model_args(p):
    p.add_argument("--model", default=None,
                   help="'minilm' (the packaged all-MiniLM-L6-v2), 'smollm2' (the packaged SmolLM2-135M-Instruct), a "
                        ".gguf file or a local model folder (default: the model the experts were made on, else minilm)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_task_args(p):
    p.add_argument("--task", help="a registered task (offline_sentiment, sst2, ...; `doe tasks` lists them)")
    p.add_argument("--train", help="a local csv/json/jsonl/parquet training file instead of --task")
    p.add_argument("--eval-file", help="the matching held-out file (for `doe eval`: a file to score instead of "
                   "the task's own held-out split)")
    p.add_argument("--holdout", type=float, default=0.2,
                   help="with --train and no --eval-file: the fraction of --train held out to evaluate on "
                   "(stratified, the same rows every time; default 0.2)")
    p.add_argument("--labels", help="label names in id order, comma-separated (with --train)")
    p.add_argument("--task-type", default="classification", choices=["classification", "generation"],
                   help="with --train: classification (texts and labels) or generation (prompt and completion "
                        "pairs; see --prompt-field and --completion-field)")
    p.add_argument("--prompt-field", default="prompt", help="with --task-type generation: the prompt column")
    p.add_argument("--completion-field", default="completion",
                   help="with --task-type generation: the completion column")
    p.add_argument("--text-fields", default="text", help="text column(s), comma-separated (default: text)")
    p.add_argument("--label-field", default="label", help="label column (default: label)")
    p.add_argument("--instruction", default=None,
                   help="what to do with each text, put before it (in the chat template's user turn where the "
                        "model has one), e.g. 'Classify the topic of this news item.'")
    p.add_argument("--max-train", type=int, help="subsample the training split (seeded, stratified)")
    p.add_argument("--max-eval", type=int, help="subsample the held-out split")


def build_parser() -> argparse.ArgumentParser:
    """The ``doe`` parser: one subcommand per command of ``doe.cli`` (``handler`` names it)."""
    parser = argparse.ArgumentParser(
        prog="doe", description="Decomposition of Experts: find per-task FFN experts of a transformer and "
        "serve many tasks from one model by unplugging the rest.", epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="run the whole method offline on the packaged MiniLM (start here)",
                       description="Find experts for the offline tasks (cached), stream held-out requests through "
                       "the unplug-and-play runtime, and compare with the dense model.")
    p.add_argument("--model", default="minilm",
                   help="minilm (default), or smollm2: the packaged SmolLM2-135M-Instruct, with a generation task too")
    p.add_argument("--cache", default="~/.cache/doe/demo", help="where experts and the router are cached "
                   "(one sub-folder per model)")
    p.add_argument("--keep", type=float, default=0.35, help="fraction of FFN neurons an expert keeps (default 0.35)")
    p.add_argument("--requests", type=int, default=240, help="held-out requests to stream (default 240)")
    p.add_argument("--fresh", action="store_true", help="ignore the cache and localize again")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler="demo")

    p = sub.add_parser("localize", help="find a task's expert and save it as a folder",
                       description="Prompt-tune on the frozen model, score FFN neurons, keep the top ones, "
                       "optionally re-tune the prompt on the expert, and save the expert folder.")
    _add_model_args(p)
    _add_task_args(p)
    p.add_argument("--task-name", help="name of a --train task, stored in the expert and used by `doe run` "
                   "requests (default: the training file's folder name, e.g. data/reviews/train.csv -> reviews; "
                   "'custom' for a generic folder such as data/)")
    p.add_argument("--out", required=True, help="expert folder to write (one sub-folder per --keep if several)")
    p.add_argument("--keep", type=float, action="append", help="keep ratio (repeatable; default 0.35)")
    p.add_argument("--method", default="attribution",
                   choices=["attribution", "activation", "gradient", "integrated_gradients", "random", "skill"])
    p.add_argument("--target", default="log_prob", choices=["logit", "log_prob"],
                   help="gradient of the gold label's log-probability (default) or of its logit (the paper)")
    p.add_argument("--scope", default="global", choices=["layer", "global"],
                   help="rank all neurons of the model together (global, default) or keep the ratio in every layer")
    p.add_argument("--multiple-of", type=int, help="round each layer's kept count to a multiple (e.g. 16)")
    p.add_argument("--bias-compensation", action=argparse.BooleanOptionalAction, default=None,
                   help="add back the mean contribution of the neurons each layer leaves out (measured on the "
                        "training texts; one vector per layer in the expert file, free at inference; default: on, "
                        "except for a decoder head fitted again on the expert, see --no-reprobe)")
    p.add_argument("--dense-blocks", default="auto", metavar="auto|none|N,N",
                   help="FFN blocks every expert keeps whole (the others share the rest of --keep): auto (default: "
                        "the blocks whose pruning alone raises the training loss over 5 times the median block's, "
                        "measured on 64 training examples), none, or block numbers")
    p.add_argument("--retune-offsets", action=argparse.BooleanOptionalAction, default=None,
                   help="re-tuning also trains each layer's output offset (default: on for generation tasks)")
    p.add_argument("--epochs", type=int, default=8, help="prompt-tuning epochs (default 8)")
    p.add_argument("--retune-epochs", type=int, default=None,
                   help="re-tuning epochs on the expert (default: ExpertSearchConfig's; 0 skips)")
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--readout", default="auto", choices=["auto", "head", "mean", "verbalizer"],
                   help="how classes are read: a linear head on the mean of the text's states (mean; what encoders "
                        "always do) or on the last text token (head, decoders), or the next-token logits of the "
                        "label words (verbalizer: decoders, seq2seq); auto: mean except on seq2seq models")
    p.add_argument("--readout-layer", default="auto", metavar="auto|last|N",
                   help="the layer a head reads: N (the states after N layers; the forward stops there), last, or "
                        "auto (default: on decoders, the shallowest layer whose probe cross-validates within a point "
                        "of the best; the last layer on encoders)")
    p.add_argument("--readout-first", action=argparse.BooleanOptionalAction, default=None,
                   help="a head reading a layer past the first also reads the first layer's states, side by side "
                        "(default: on for heads that start as a probe, i.e. decoders)")
    p.add_argument("--no-reprobe", action="store_true",
                   help="keep the dense probe head on the expert instead of fitting it again on the expert's states")
    p.add_argument("--max-examples", type=int, help="examples used for scoring (default: all training examples)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler="localize")

    p = sub.add_parser("eval", help="metric and latency: dense prompt-tuned model vs experts",
                       description="Evaluate experts on the held-out split of their task (or of --task). "
                       "An expert folder carries its task (labels, text fields, metric), so "
                       "`doe eval --experts FOLDER --eval-file test.csv` needs nothing more. Rows are named "
                       "by expert folder and localization method.")
    _add_model_args(p)
    _add_task_args(p)
    p.add_argument("--experts", nargs="+", help="expert folders", default=[])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a markdown table")
    p.set_defaults(handler="eval")

    p = sub.add_parser("run", help="serve a JSONL file of requests through the runtime",
                       description='Each line: {"text": ..., "task": optional, "text_pair": optional, "id": optional}. '
                       "Writes one JSON result per line. An input without requests writes an empty output, "
                       "says so on stderr and exits 0.")
    _add_model_args(p)
    p.add_argument("--experts", nargs="+", default=[], help="expert folders")
    p.add_argument("--router", help="router folder (to serve requests without a task name)")
    p.add_argument("--threshold", type=float, default=0.5, help="router confidence below which the dense model serves")
    p.add_argument("--requests", required=True, help="input JSONL")
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--compact-weights", action="store_true",
                   help="run experts on compacted copies of their kept weights, made once per expert: faster on "
                   "CPU, costs memory (reported in the summary); default: zero-copy gathered weights")
    p.add_argument("--mixed", action="store_true",
                   help="batch requests of different tasks together, one forward per batch with every expert "
                   "resident (same answers as the default one-task-at-a-time batching)")
    p.set_defaults(handler="run")

    p = sub.add_parser("serve", help="serve experts over HTTP (needs pip install -e \".[serve]\")",
                       description="The unplug-and-play runtime behind an HTTP API: dynamic batching, "
                       "health and Prometheus metrics, back-pressure and graceful shutdown.")
    _add_model_args(p)
    p.add_argument("--experts", nargs="+", default=[], help="expert folders")
    p.add_argument("--router", help="router folder (to serve requests without a task name)")
    p.add_argument("--threshold", type=float, default=0.5, help="router confidence below which the dense model serves")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one; the ready line names it)")
    p.add_argument("--max-batch", type=int, default=32, help="items per forward (default 32)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long the oldest queued item waits for its batch to fill (default 5)")
    p.add_argument("--token-budget", type=int, default=2048,
                   help="padded text tokens per batch: batch size x its longest text (default 2048)")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per text; longer texts get 413 (default 128; nothing accepted is truncated)")
    p.add_argument("--max-tokens", type=int, default=None, help=argparse.SUPPRESS)  # the earlier --max-length
    p.add_argument("--max-queue", type=int, default=256,
                   help="queued items before new requests get 503 with Retry-After (default 256)")
    p.add_argument("--max-items", type=int, default=64, help="items per request body (default 64)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="request body size; larger bodies get 413 unread (default 1 MiB)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="the largest max_new_tokens (/v1/generate) or max_tokens (OpenAI API) a request may ask (default 256)")
    p.add_argument("--retry-after", type=int, default=1, help="Retry-After seconds of a 503 (default 1)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for in-flight requests (default 30)")
    p.add_argument("--header-timeout", type=float, default=30.0,
                   help="seconds a connection may take to send a request's head, from its opening or the previous "
                   "answer; then it is closed, with 408 if part of a head came (default 30)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request's body may take to arrive after its head; then 408 and the connection "
                   "is closed (default 30)")
    p.add_argument("--keep-alive-timeout", type=float, default=5.0,
                   help="seconds an idle connection is kept open between requests (default 5)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level; info and debug log every request (default warning)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch's CPU threads for the forwards (default: torch's choice)")
    p.add_argument("--compact-weights", action="store_true",
                   help="as for `doe run`: experts run on compacted copies of their kept weights (memory for speed)")
    p.add_argument("--mixed", action="store_true",
                   help="as for `doe run`: requests of different tasks share a batch, one forward with every expert "
                   "resident (default: batches of one task)")
    p.add_argument("--expert-dir", help="a folder whose expert folders POST /v1/experts may load at run time "
                   "(default: no loading at run time)")
    p.add_argument("--kv-budget", type=int, default=None,
                   help="decoders: the most cache positions the decode batch may hold (rows x its longest row's "
                   "prompt and new tokens); generations that do not fit wait their turn (default: no limit)")
    p.add_argument("--model-id", help="the base model's id in the OpenAI API (default: --model)")
    p.add_argument("--ray", action="store_true", help="serve on Ray Serve: replicas of the model, each with every "
                   "expert, behind Ray's proxy on --host/--port (needs pip install -e \".[ray]\")")
    p.add_argument("--replicas", type=int, default=None, help="with --ray: how many replicas (default 1)")
    p.add_argument("--autoscale", metavar="MIN:MAX", help="with --ray: autoscale between MIN and MAX replicas")
    p.add_argument("--ray-address", help="with --ray: the cluster to join (default: start a local one)")
    p.set_defaults(handler="serve")

    p = sub.add_parser("router", help="build a task router (for requests without a task name)",
                       description="`doe router fit`: train a task classifier on the dense model's embeddings.")
    router_sub = p.add_subparsers(dest="router_command", metavar="ACTION", required=True)
    p = router_sub.add_parser("fit", help="fit a router over the tasks of some experts",
                              description="Fit a router over the experts' tasks from each task's training texts "
                              "(the training split of the task each expert folder carries), and save it.")
    _add_model_args(p)
    p.add_argument("--experts", nargs="+", default=[], help="expert folders (experts of at least 2 tasks)")
    p.add_argument("--out", required=True, help="router folder to write")
    p.add_argument("--train", action="append", metavar="TASK=FILE",
                   help="read TASK's texts from FILE instead of its own training split (repeatable)")
    p.add_argument("--max-per-task", type=int, default=200, help="training texts per task (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler="router_fit")

    p = sub.add_parser("bench", help="run the benchmark suites and write the report",
                       description="pytest-benchmark suites (from a source checkout) and their markdown/plot report.")
    p.add_argument("--suite", choices=["kernels", "models", "generate", "mixed", "all"], default="kernels",
                   help="kernels (incl. the segmented GEMMs), models (whole-model forward, switch cost), generate "
                   "(decode tokens/s of a causal LM), mixed (mixed-task batches vs one task at a time), or all")
    p.add_argument("--out", default="bench-results", help="folder for JSON, tables and plots")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments, after --")
    p.set_defaults(handler="bench")

    p = sub.add_parser("tasks", help="list the registered tasks")
    p.set_defaults(handler="tasks")
    return parser
