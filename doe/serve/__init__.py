"""``doe serve``: the unplug-and-play runtime behind an HTTP API (FastAPI + uvicorn).

One worker thread owns the model and runs batches through ``UnplugAndPlay.process``; the event
loop only queues requests and awaits their answers. Needs ``pip install -e ".[serve]"``.

    app = doe.serve.create_app(model, tokenizer, experts, router=router)
    doe.serve.run_server(app, host="127.0.0.1", port=8000)
"""

from doe.serve.app import create_app
from doe.serve.config import ServeConfig, check_positions
from doe.serve.server import bind, run_server

__all__ = ["ServeConfig", "bind", "check_positions", "create_app", "run_server"]


def __getattr__(name: str):
    if name == "check_experts":  # its earlier home
        import warnings

        from doe.runtime import check_experts

        warnings.warn("doe.serve.check_experts is now doe.runtime.check_experts; the old path goes in the next "
                      "release", DeprecationWarning, stacklevel=2)
        return check_experts
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
