"""Nothing lost, nothing half-done: unplug/restore under saving, tampering, threads, interrupts.

References are the dense model's own state (state_dict values, storage pointers, outputs) taken
before anything ran, and hand-sliced copies (doe.testing.sliced_copy); never the code under test.
"""

import gc
import json
import linecache
import os
import random
import signal
import sys
import threading
import time

import pytest
import torch
import torch.nn as nn

import doe
from doe.runtime import UnplugAndPlay
from doe.tasks import get_task
from doe.testing import assert_same_as, gathered_wrappers, random_expert_indices, sliced_copy, snapshot
from tiny_models import make_tiny, model_logits, sample_inputs, tiny_tokenizer

FUZZ_SECONDS = float(os.environ.get("DOE_FUZZ_SECONDS", "8"))


def expert_for(model, seed, keep=0.35, task=None):
    return doe.TaskExpert.from_indices(model, random_expert_indices(model, keep, seed=seed), task=task)


def assert_original(model, snap, dense, inputs):
    """The exact original: no wrappers, no state, same keys/values/storage, same outputs."""
    assert not doe.is_unplugged(model) and not gathered_wrappers(model)
    assert_same_as(model, snap)
    assert torch.equal(model_logits(model, inputs), dense)


# ---------------------------------------------------------------------------- 1. state_dict


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "t5-gated"])
def test_unplugged_model_has_the_original_state_dict_and_parameters(family):
    model = make_tiny(family)
    keys = list(model.state_dict())
    params = list(model.named_parameters())
    with doe.unplugged(model, expert_for(model, 1)):
        assert gathered_wrappers(model)
        assert list(model.state_dict()) == keys
        got = list(model.named_parameters())
        assert [n for n, _ in got] == [n for n, _ in params]
        assert all(a is b for (_, a), (_, b) in zip(got, params))


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_load_state_dict_while_unplugged_reaches_the_original_layers(family):
    model = make_tiny(family)
    inputs = sample_inputs(model)
    other = make_tiny(family, seed=7)
    want = model_logits(other, inputs)
    expert = expert_for(model, 1)
    with doe.unplugged(model, expert):
        model.load_state_dict(other.state_dict())  # strict: original keys
        torch.testing.assert_close(model_logits(model, inputs),
                                   model_logits(sliced_copy(other, expert.indices), inputs), atol=1e-5, rtol=1e-5)
    assert torch.equal(model_logits(model, inputs), want)
    # assign=True swaps Parameter objects: the restored original must hold the assigned ones.
    fresh = make_tiny(family, seed=11)
    with doe.unplugged(model, expert):
        model.load_state_dict(fresh.state_dict(), assign=True)
    assert not gathered_wrappers(model)
    assert torch.equal(model_logits(model, inputs), model_logits(fresh, inputs))


def test_save_pretrained_while_unplugged_loads_back_complete(tmp_path):
    model = make_tiny("llama")
    want = model.state_dict()
    with doe.unplugged(model, expert_for(model, 1)):
        model.save_pretrained(tmp_path)
    loaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    got = loaded.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


# ---------------------------------------------------------------------------- 2. indices


def test_expert_indices_are_copied_and_read_only():
    model = make_tiny("llama")
    inputs = sample_inputs(model)
    indices = random_expert_indices(model, 0.35, seed=1)
    t = indices[0].to(torch.int32)
    indices[0] = t
    expert = doe.TaskExpert.from_indices(model, [x.clone() for x in indices])
    direct = doe.TaskExpert(indices, expert.num_neurons)
    want = model_logits(sliced_copy(model, [x.clone() for x in indices]), inputs)
    doe.unplug_(model, direct)
    first = int(t[0])
    t[0] = t[-1]  # the caller's tensor: must not reach the expert or the live model
    assert int(direct.indices[0][0]) == first
    torch.testing.assert_close(model_logits(model, inputs), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError):
        direct.indices[0] = torch.tensor([5, 3, 3, 10**6])
    with pytest.raises(AttributeError, match="read-only"):
        direct.indices = [torch.tensor([1])] * 2
    direct.indices[0][0] = 5  # a copy: changes nothing
    assert torch.equal(direct.indices[0], expert.indices[0])
    doe.restore_(model)


def test_tampered_expert_is_refused_and_tampered_staging_is_redone():
    model = make_tiny("llama")
    inputs = sample_inputs(model)
    a, b, c = expert_for(model, 1), expert_for(model, 2), expert_for(model, 3)
    want_c = model_logits(sliced_copy(model, c.indices), inputs)
    doe.unplug_(model, a)
    before = model_logits(model, inputs)
    b._indices[0][:3] = torch.tensor([5, 3, 3], dtype=torch.int32)  # reaching past the public API
    with pytest.raises(RuntimeError, match="modified in place"):
        doe.unplug_(model, b)
    assert doe.current_expert(model) is a and torch.equal(model_logits(model, inputs), before)
    c.stage("cpu")[0][0] = c.num_neurons[0] - 1  # a staged copy changed in place: staged again
    doe.unplug_(model, c)
    torch.testing.assert_close(model_logits(model, inputs), want_c, atol=1e-5, rtol=1e-5)
    doe.restore_(model)


def test_switch_reads_no_index_values(monkeypatch):
    import doe_kernels.modules as modules

    model = make_tiny("bert")
    inputs = sample_inputs(model)
    a, b = expert_for(model, 1), expert_for(model, 2)
    want = model_logits(sliced_copy(model, b.indices), inputs)
    doe.unplug_(model, a)
    calls = []
    monkeypatch.setattr(modules, "validate_indices", lambda *a, **k: calls.append(1))
    set_calls = []
    original_set = modules._Wrapper.set_indices
    monkeypatch.setattr(modules._Wrapper, "set_indices",
                        lambda self, idx, **kw: (set_calls.append(kw), original_set(self, idx, **kw))[1])
    doe.unplug_(model, b)
    assert calls == [] and len(set_calls) == 2 * b.num_blocks and all(kw == {"validated": True} for kw in set_calls)
    torch.testing.assert_close(model_logits(model, inputs), want, atol=1e-5, rtol=1e-5)
    doe.restore_(model)


# ---------------------------------------------------------------------------- 3. threads


def test_structure_readers_see_through_wrappers_and_race_nothing():
    model = make_tiny("bert")
    originals = [(b.up, b.down) for b in doe.find_ffn_blocks(model)]
    fingerprint = doe.model_fingerprint(model)
    a = expert_for(model, 1)
    doe.unplug_(model, a)
    assert [(b.up, b.down) for b in doe.find_ffn_blocks(model)] == originals
    assert doe.model_fingerprint(model) == fingerprint
    rebuilt = doe.TaskExpert.from_indices(model, a.indices)
    assert rebuilt == a and rebuilt.fingerprint == fingerprint
    doe.restore_(model)

    stop, errors = threading.Event(), []

    def swapper():
        while not stop.is_set():
            with doe.unplugged(model, a):
                pass
            time.sleep(0)

    def reader():
        for _ in range(60):
            try:
                doe.check_expert(model, a)
                assert doe.model_fingerprint(model) == fingerprint
                assert [(b.up, b.down) for b in doe.find_ffn_blocks(model)] == originals
                doe.TaskExpert.from_indices(model, a.indices)
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(repr(exc))

    threads = [threading.Thread(target=swapper)] + [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join()
    stop.set()
    threads[0].join()
    assert errors == []


def _runtime_expert(model, task, seed):
    spec = get_task(task)
    g = torch.Generator().manual_seed(seed)
    expert = expert_for(model, seed, task=task)
    hidden = model.config.hidden_size
    expert.prompt = torch.randn(3, hidden, generator=g)
    expert.head = {"weight": torch.randn(len(spec.labels), hidden, generator=g), "bias": torch.zeros(len(spec.labels))}
    return expert


@pytest.fixture(scope="module")
def runtime_setup():
    model = make_tiny("bert", head=False)
    tok = tiny_tokenizer(["a good film", "a bad film", "is it raining", "sports news today"])
    experts = [_runtime_expert(model, t, s) for t, s in (("offline_sentiment", 1), ("offline_topic", 2))]
    return model, tok, experts


def test_add_expert_is_safe_while_serving(runtime_setup):
    model, tok, (sentiment, topic) = runtime_setup
    rt = UnplugAndPlay(model, tok)
    rt.add_expert(sentiment)
    want = [r.label for r in rt.process([{"text": "a good film", "task": "offline_sentiment"}])]
    errors, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            got = rt.process([{"text": "a good film", "task": "offline_sentiment"}])
            if got[0].error is not None or got[0].label != want[0]:
                errors.append(got[0])

    servers = [threading.Thread(target=serve) for _ in range(3)]
    for t in servers:
        t.start()
    try:
        for _ in range(20):
            rt.add_expert(topic)
            rt.add_expert(sentiment)
    finally:
        stop.set()
        for t in servers:
            t.join()
    assert errors == [] and set(rt.tasks) == {"offline_sentiment", "offline_topic"}
    assert not doe.is_unplugged(model)


# ---------------------------------------------------------------------------- 4. interrupts


class _Interrupter:
    """A trace function that raises KeyboardInterrupt at the ``at``-th line run by the
    functions that change a model or an expert (or with probability ``p`` per line)."""

    FUNCTIONS = {"unplug_", "_install", "_switch", "_apply", "restore_", "unplugged", "_put_back",
                 "_record_conversions", "set_indices", "to_neuron_major_", "to_row_major_", "stage", "verify",
                 "model_lock"}

    def __init__(self, at=None, p=0.0, rng=None):
        self.at, self.p, self.rng, self.lines, self.fired = at, p, rng or random.Random(0), 0, 0

    def __call__(self, frame, event, arg):
        code = frame.f_code
        if code.co_name in self.FUNCTIONS and "/doe" in code.co_filename.replace(os.sep, "/"):
            return self._line
        return None

    # Not on these lines. `with`: CPython itself cannot make an interrupt between a context
    # manager's __enter__ / __exit__ and its block safe, so no code can. `try:` / `finally:`:
    # no-op instructions where a real signal is never handled (CPython handles signals at calls
    # and jumps), but an exception raised there by a tracer escapes the enclosing `with`.
    SKIP = ("with ", "try:", "finally:")

    def _line(self, frame, event, arg):
        if event == "line" and not linecache.getline(frame.f_code.co_filename, frame.f_lineno).lstrip().startswith(self.SKIP):
            self.lines += 1
            if self.lines == self.at or (self.p and self.rng.random() < self.p):
                self.fired += 1
                raise KeyboardInterrupt(f"injected at line {self.lines}")
        return self._line


def _interrupted(fn, tracer):
    sys.settrace(tracer)
    try:
        fn()
        return False
    except KeyboardInterrupt:
        return True
    finally:
        sys.settrace(None)


def _restore_fully(model, **kwargs):
    doe.restore_(model, **kwargs)
    assert not doe.is_unplugged(model)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_interrupt_at_every_line_of_unplug_switch_restore_is_recoverable(family):
    model = make_tiny(family)
    inputs = sample_inputs(model)
    dense, snap = model_logits(model, inputs), snapshot(model)
    a, b = expert_for(model, 1), expert_for(model, 2)
    want_b = model_logits(sliced_copy(model, b.indices), inputs)

    def context():
        with doe.unplugged(model, b):
            pass

    ops = {
        "install": (lambda: None, lambda: doe.unplug_(model, a)),
        "switch": (lambda: doe.unplug_(model, a), lambda: doe.unplug_(model, b)),
        "restore": (lambda: doe.unplug_(model, a), lambda: doe.restore_(model)),
        "context": (lambda: doe.unplug_(model, a), context),
    }
    for name, (prepare, op) in ops.items():
        for tracer in (None, total := _Interrupter(at=-1)):  # a warm-up run, then count the lines
            prepare()
            assert not _interrupted(op, tracer)
            _restore_fully(model)
        for at in range(1, total.lines + 1):
            prepare()
            hit = _interrupted(op, _Interrupter(at=at))
            assert hit, (name, at)
            # Whatever was interrupted, the next unplug_ completes it...
            doe.unplug_(model, b)
            torch.testing.assert_close(model_logits(model, inputs), want_b, atol=1e-5, rtol=1e-5)
            # ... and restore_ gives back the exact original.
            _restore_fully(model)
            assert_original(model, snap, dense, inputs)
            # An interrupted restore_ is finished by the next one.
            doe.unplug_(model, a)
            _interrupted(lambda: doe.restore_(model), _Interrupter(at=1 + at % 12))
            _restore_fully(model)
            assert_original(model, snap, dense, inputs)


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs POSIX interval timers")
# A SIGINT that lands in one of torch's weakref callbacks is printed and dropped by Python (that
# round then runs uninterrupted); pytest reports it as a warning, which says nothing about doe.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_real_sigint_during_swap_loops_is_recoverable():
    model = make_tiny("llama")
    inputs = sample_inputs(model)
    dense, snap = model_logits(model, inputs), snapshot(model)
    experts = [expert_for(model, s) for s in (1, 2, 3)]
    rng = random.Random(0)
    interrupts = 0

    armed = [False]

    def on_sigint(signum, frame):
        if armed[0]:  # one interrupt per round, and only while the loop below runs
            armed[0] = False
            raise KeyboardInterrupt

    gc.collect()  # no finalizer of earlier tests' objects may run, and swallow an interrupt, in the loop
    gc.disable()
    previous = signal.signal(signal.SIGINT, on_sigint)
    signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    deadline = time.monotonic() + 3.0
    try:
        while time.monotonic() < deadline:
            try:  # armed inside the try, so that wherever the one interrupt lands it is caught here
                armed[0] = True
                signal.setitimer(signal.ITIMER_REAL, rng.uniform(2e-5, 2e-3))
                for _ in range(2000):
                    doe.unplug_(model, rng.choice(experts))
                    if rng.random() < 0.5:
                        doe.restore_(model)
                armed[0] = False
            except KeyboardInterrupt:
                interrupts += 1
            _restore_fully(model)
            assert_original(model, snap, dense, inputs)
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        gc.enable()
    print(f"real SIGINT: {interrupts} interrupts, each restored to the exact original")
    assert interrupts > 0


# ---------------------------------------------------------------------------- 5. layout


def test_original_layout_restore_undoes_every_earlier_re_store():
    model = make_tiny("bert")
    inputs = sample_inputs(model)
    dense = model_logits(model, inputs)
    downs = [b.down.weight for b in doe.find_ffn_blocks(model)]
    expert = expert_for(model, 1)
    doe.unplug_(model, expert, layout="neuron_major")
    doe.restore_(model)
    doe.unplug_(model, expert, layout="neuron_major")
    doe.restore_(model, original_layout=True)
    assert all(w.is_contiguous() for w in downs)
    assert torch.equal(model_logits(model, inputs), dense)


# ---------------------------------------------------------------------------- 6. arguments


@pytest.mark.parametrize("kwargs, message", [
    (dict(backend="bogus"), "backend: expected one of"),
    (dict(layout="bogus"), "layout: expected one of"),
])
def test_bad_arguments_are_refused_before_anything_changes(kwargs, message):
    model = make_tiny("llama")
    inputs = sample_inputs(model)
    dense, snap = model_logits(model, inputs), snapshot(model)
    a = expert_for(model, 1)
    with pytest.raises(ValueError, match=message):
        doe.unplug_(model, a, **kwargs)
    assert_original(model, snap, dense, inputs)
    doe.unplug_(model, a, backend="torch")
    before = model_logits(model, inputs)
    with pytest.raises(ValueError, match=message):
        doe.unplug_(model, expert_for(model, 2), **kwargs)
    assert doe.current_expert(model) is a and torch.equal(model_logits(model, inputs), before)
    doe.restore_(model)


def test_switch_applies_backend_and_layout_and_checks_spec():
    model = make_tiny("gpt2")
    inputs = sample_inputs(model)
    a, b = expert_for(model, 1), expert_for(model, 2)
    want_b = model_logits(sliced_copy(model, b.indices), inputs)
    doe.unplug_(model, a, backend="torch")
    doe.unplug_(model, b)  # no backend named: keeps the installed one
    assert {w.backend for w in gathered_wrappers(model)} == {"torch"}
    doe.unplug_(model, a, backend="auto", layout="neuron_major")
    assert {w.backend for w in gathered_wrappers(model)} == {"auto"}
    ups = [blk.up.weight for blk in doe.find_ffn_blocks(model)]  # Conv1D up: neuron axis 1
    assert all(w.t().is_contiguous() for w in ups)
    doe.unplug_(model, b)
    torch.testing.assert_close(model_logits(model, inputs), want_b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="spec finds FFN blocks"):
        doe.unplug_(model, a, spec=doe.FFNSpec(block_pattern=r"h\.0\.mlp", up="c_fc", down="c_proj"))
    doe.restore_(model, original_layout=True)
    assert all(w.is_contiguous() for w in ups)


# ---------------------------------------------------------------------------- 7. runtime


def test_runtime_puts_back_the_users_expert(runtime_setup):
    model, tok, (sentiment, topic) = runtime_setup
    rt = UnplugAndPlay(model, tok)
    rt.add_expert(sentiment)
    rt.add_expert(topic)
    mine = expert_for(model, 9)
    with doe.unplugged(model, mine, backend="torch"):
        results = rt.process([{"text": "a good film", "task": "offline_sentiment"},
                              {"text": "sports news", "task": "offline_topic"}])
        assert all(r.error is None for r in results)
        assert doe.current_expert(model) is mine
        assert {w.backend for w in gathered_wrappers(model)} == {"torch"}
    assert not doe.is_unplugged(model)


# ---------------------------------------------------------------------------- 8. hooks


def test_forward_hooks_on_original_modules_fire_while_unplugged():
    model = make_tiny("llama")
    inputs = sample_inputs(model)
    expert = expert_for(model, 1)
    block = doe.find_ffn_blocks(model)[0]
    want = model_logits(sliced_copy(model, expert.indices), inputs)  # before hooks: a copy would carry them
    calls = {}

    def record(name):
        def hook(module, args, out):
            calls.setdefault(name, []).append((module, tuple(out.shape)))
        return hook

    handles = [block.container.register_forward_hook(record("mlp")),
               block.gate.register_forward_hook(record("gate")),
               block.down.register_forward_pre_hook(lambda m, args: calls.setdefault("down-pre", []).append(m))]
    with doe.unplugged(model, expert):
        got = model_logits(model, inputs)
    for h in handles:
        h.remove()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert [m for m, _ in calls["mlp"]] == [block.container]
    assert calls["gate"] == [(block.gate, (*inputs["input_ids"].shape, expert.kept[0]))]
    assert calls["down-pre"] == [block.down]


def test_a_forward_hook_that_changes_the_output_is_honoured():
    model = make_tiny("bert")
    inputs = sample_inputs(model)
    expert = expert_for(model, 1)
    ref = sliced_copy(model, expert.indices)
    for m in (model, ref):
        doe.find_ffn_blocks(m)[1].up.register_forward_hook(lambda mod, args, out: out * 0.5)
    with doe.unplugged(model, expert):
        got = model_logits(model, inputs)
    torch.testing.assert_close(got, model_logits(ref, inputs), atol=1e-5, rtol=1e-5)


def test_hooked_activation_module_fires_and_the_original_block_is_untouched():
    model = make_tiny("llama")
    inputs = sample_inputs(model)
    expert = expert_for(model, 1)
    block = doe.find_ffn_blocks(model)[0]
    want = model_logits(sliced_copy(model, expert.indices), inputs)
    children = dict(block.container._modules)
    seen = []
    handle = block.act_module.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
    with doe.unplugged(model, expert):
        got = model_logits(model, inputs)
    handle.remove()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert seen == [(*inputs["input_ids"].shape, expert.kept[0])]
    assert dict(block.container._modules) == children


def test_backward_hooks_are_refused_by_name():
    model = make_tiny("bert")
    inputs = sample_inputs(model)
    dense, snap = model_logits(model, inputs), snapshot(model)
    down = doe.find_ffn_blocks(model)[1].down
    down.register_full_backward_hook(lambda *a: None)
    with pytest.raises(ValueError, match=r"layer\.1\.output\.dense.*backward_hooks"):
        doe.unplug_(model, expert_for(model, 1))
    assert_original(model, snap, dense, inputs)


# ---------------------------------------------------------------------------- 9. smaller ones


def test_experts_compare_by_value_and_hash():
    model = make_tiny("bert")
    a, a2, b = expert_for(model, 1), expert_for(model, 1), expert_for(model, 2)
    assert a == a2 and a != b and hash(a) == hash(a2)
    assert a2 in [b, a] and b not in [a]
    assert len({a, a2, b}) == 2
    a2.task = "other"
    assert a != a2


def test_bad_expert_config_values_are_clear_errors(tmp_path):
    model = make_tiny("bert")
    expert = expert_for(model, 1)
    folder = expert.save_pretrained(tmp_path / "e")
    config = json.loads((folder / "expert_config.json").read_text())

    (folder / "expert_config.json").write_text(json.dumps(dict(config, num_neurons=[88.9, 88])))
    with pytest.raises(ValueError, match=r"num_neurons\[0\]: expected an integer neuron count, got 88.9"):
        doe.TaskExpert.from_pretrained(folder)
    (folder / "expert_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="corrupted expert config"):
        doe.TaskExpert.from_pretrained(folder)


def test_save_with_shared_head_tensors_and_a_failed_save_keeps_the_old_folder(tmp_path, monkeypatch):
    import safetensors.torch

    model = make_tiny("bert")
    expert = expert_for(model, 1)
    head = {"weight": torch.randn(3, 32), "bias": torch.zeros(3)}
    expert.head, expert.dense_head = head, head  # no re-tuning: the dense head serves the expert
    expert.prompt = expert.dense_prompt = torch.randn(4, 32)
    folder = expert.save_pretrained(tmp_path / "e")
    loaded = doe.TaskExpert.from_pretrained(folder)
    assert loaded == expert
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        expert_for(model, 2).save_pretrained(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]  # no temporary folder left behind


def test_saved_expert_folder_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        folder = expert_for(make_tiny("bert"), 1).save_pretrained(tmp_path / "e")
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o750


def test_layers_with_buffers_are_refused_before_anything_changes():
    model = make_tiny("bert")
    inputs = sample_inputs(model)
    dense, snap = model_logits(model, inputs), snapshot(model)
    doe.find_ffn_blocks(model)[1].down.register_buffer("scale", torch.ones(1))
    snap = snapshot(model)
    with pytest.raises(TypeError, match=r"holds buffers \['scale'\]"):
        doe.unplug_(model, expert_for(model, 1))
    assert_original(model, snap, dense, inputs)


def test_doe_run_with_a_corrupted_expert_is_a_usage_error(tmp_path, capsys):
    from doe.cli import main

    folder = expert_for(make_tiny("bert"), 1).save_pretrained(tmp_path / "e")
    (folder / "expert_config.json").write_text("[" * 100_000 + "]" * 100_000)
    requests = tmp_path / "r.jsonl"
    requests.write_text('{"text": "fine"}\n')
    with pytest.raises(SystemExit) as exc:
        main(["run", "--experts", str(folder), "--requests", str(requests), "--out", str(tmp_path / "o.jsonl")])
    assert exc.value.code == 2 and "corrupted expert config" in capsys.readouterr().err


def test_restore_of_the_outer_model_finds_an_inner_unplug():
    model = make_tiny("bert")
    inputs = sample_inputs(model)
    dense, snap = model_logits(model, inputs), snapshot(model)
    expert = expert_for(model.bert, 1)
    doe.unplug_(model.bert, expert)
    assert doe.is_unplugged(model) and doe.current_expert(model) is expert
    with pytest.raises(ValueError, match="submodule 'bert' of this model is unplugged"):
        doe.unplug_(model, expert)
    assert doe.restore_(model) is True
    assert_original(model, snap, dense, inputs)


def test_raw_unplug_and_forward_under_model_lock_never_mix_experts():
    model = make_tiny("llama")
    inputs = sample_inputs(model)
    experts = [expert_for(model, s) for s in range(4)]
    refs = [model_logits(sliced_copy(model, e.indices), inputs) for e in experts]
    wrong = []

    def worker(i):
        for _ in range(6):
            with doe.model_lock(model):
                doe.unplug_(model, experts[i % 4])
                out = model_logits(model, inputs)
            if not torch.allclose(out, refs[i % 4], atol=1e-5, rtol=1e-5):
                wrong.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    doe.restore_(model)
    assert wrong == []


# ---------------------------------------------------------------------------- fuzz


def test_fuzz_threads_and_interrupts_end_byte_identical(runtime_setup, tmp_path):
    """Random unplug/switch/restore/save/load/add_expert/serve from 4 threads, with
    KeyboardInterrupts injected at random lines; after each round restore_ gives back the
    exact original. DOE_FUZZ_SECONDS sets the duration (default 8)."""
    model, tok, (sentiment, topic) = runtime_setup
    inputs = sample_inputs(model)
    dense, snap = model_logits(model, inputs), snapshot(model)
    original_sd = {k: v.clone() for k, v in model.state_dict().items()}
    keys = list(original_sd)
    experts = [sentiment, topic] + [expert_for(model, s) for s in (5, 6)]
    refs = {id(e): model_logits(sliced_copy(model, e.indices), inputs) for e in experts}
    rt = UnplugAndPlay(model, tok)
    stats = {"ops": 0, "interrupts": 0, "rounds": 0}
    failures = []
    lock = threading.Lock()

    def op(rng):
        kind = rng.choice(["unplug", "restore", "context", "save", "load", "add", "serve"])
        e = rng.choice(experts)
        if kind == "unplug":
            doe.unplug_(model, e)
        elif kind == "restore":
            doe.restore_(model)
        elif kind == "context":
            with doe.unplugged(model, e):
                out = model_logits(model, inputs)
            if not torch.allclose(out, refs[id(e)], atol=1e-5, rtol=1e-5):
                failures.append(("context output", id(e)))
        elif kind == "save":
            with doe.model_lock(model):
                if list(model.state_dict()) != keys:
                    failures.append("state_dict keys changed")
        elif kind == "load":
            model.load_state_dict(original_sd)
        elif kind == "add":
            rt.add_expert(rng.choice([sentiment, topic]))
        else:
            if rt.tasks:
                res = rt.process([{"text": "a good film", "task": rng.choice(rt.tasks)}])
                if res[0].error is not None and "KeyboardInterrupt" not in res[0].error:
                    failures.append(res[0].error)

    def worker(seed, deadline):
        rng = random.Random(seed)
        tracer = _Interrupter(p=0.01, rng=random.Random(seed + 1000))
        while time.monotonic() < deadline:
            sys.settrace(tracer)
            try:
                op(rng)
            except KeyboardInterrupt:
                pass
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                failures.append(repr(exc))
            finally:
                sys.settrace(None)
            with lock:
                stats["ops"] += 1
        with lock:
            stats["interrupts"] += tracer.fired

    end = time.monotonic() + FUZZ_SECONDS
    while time.monotonic() < end:
        deadline = min(end, time.monotonic() + 1.0)
        threads = [threading.Thread(target=worker, args=(stats["rounds"] * 10 + i, deadline)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats["rounds"] += 1
        _restore_fully(model)
        assert_original(model, snap, dense, inputs)
    print(f"fuzz: {stats['ops']} operations, {stats['interrupts']} interrupts injected, "
          f"{stats['rounds']} rounds, {len(failures)} failures")
    assert failures == []
    assert stats["interrupts"] > 0 and stats["ops"] > 50
