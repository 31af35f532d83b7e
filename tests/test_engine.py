"""The continuous-batching engine (doe.engine) on tiny decoders: rows joining mid-generation, on
different experts, each equal to the same request run alone through transformers' ``generate``
on a hand-sliced copy of the model (or a hand sampling loop); stop strings, cancellation,
fairness, budgets, failures and the worker thread."""

import json
import threading

import pytest
import torch

from doe.architectures import find_ffn_blocks
from doe.engine import EngineFull, EngineStopped, GenerationEngine, generate_all
from doe.expert import TaskExpert, model_fingerprint
from doe.generation import GenerateParams, generate
from doe.runtime import UnplugAndPlay
from doe.tasks import generation_task, spec_to_dict
from doe.testing import assert_same_as, random_expert_indices, sliced_copy, snapshot
from tiny_models import make_tiny, tiny_tokenizer

WORDS = "copy red green blue cat dog sun moon tree rock fish".split()
PROMPTS = ["copy red green", "copy cat", "copy dog sun moon tree", "copy fish rock", "copy blue", "copy sun sun",
           "copy tree"]
TASKS = ["a", None, "b", "a", None, "b", "a"]
NEW = [7, 12, 5, 9, 3, 11, 6]


def make_experts(model, tmp_path, names=("a", "b")):
    """Random experts with random soft prompts for generation tasks (speed and batching do not
    depend on which neurons are kept)."""
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "copy red", "completion": "red"}) + "\n")
    hidden = model.config.hidden_size
    sizes = [b.num_neurons for b in find_ffn_blocks(model)]
    out = []
    for i, name in enumerate(names):
        g = torch.Generator().manual_seed(i)
        out.append(TaskExpert(random_expert_indices(model, 0.35, seed=i), sizes, model_type=model.config.model_type, task=name,
                              fingerprint=model_fingerprint(model), prompt=torch.randn(4, hidden, generator=g) * 0.1,
                              metadata={"task_spec": spec_to_dict(generation_task(name, path))}))
    return out


@pytest.fixture(params=["llama"])
def setup(request, tmp_path):
    tok = tiny_tokenizer([" ".join(WORDS)], extra_words=[f"w{i}" for i in range(120)])  # every id a word
    model = make_tiny(request.param)
    experts = make_experts(model, tmp_path)
    rt = UnplugAndPlay(model, tok)
    for e in experts:
        rt.add_expert(e)
    return model, tok, {e.task: e for e in experts}, rt


def alone(model, tok, rt, experts, prompt, task, params):
    """The request run alone by transformers' generate: on a hand-sliced copy with the expert's
    soft prompt, or on the dense model."""
    rt.switch(None)  # an engine stepped by hand leaves its experts resident
    if task is None:
        return generate(model, tok, params)
    e = experts[task]
    ids = rt._entries[task].on_expert.prompt_ids(prompt)
    return generate(sliced_copy(model, e.indices), tok, params, soft_prompt=e.prompt, prompt_ids=ids)


@pytest.mark.parametrize("setup", ["llama", "gpt2", "opt"], indirect=True)
def test_rows_joining_mid_generation_equal_each_request_alone(setup):
    model, tok, experts, rt = setup
    snap = snapshot(model)
    engine = GenerationEngine(rt, max_batch=3)
    handles = [engine.submit(GenerateParams(p, n), task=t) for p, t, n in zip(PROMPTS, TASKS, NEW)]
    engine.run(handles)
    for h, p, t, n in zip(handles, PROMPTS, TASKS, NEW):
        want = alone(model, tok, rt, experts, p, t, GenerateParams(p, n))
        assert h.result().token_ids == want.token_ids, (p, t)
        assert h.result().text == want.text and h.finish_reason == want.finish_reason
    # later requests joined a batch that was already decoding
    assert any(h.started > handles[0].first_token for h in handles[3:])
    rt.switch(None)
    assert_same_as(model, snap)


def test_sampled_rows_use_their_own_seeded_generator(setup):
    model, tok, experts, rt = setup
    params = GenerateParams("copy dog sun", 8, temperature=0.9, seed=123)
    engine = GenerationEngine(rt, max_batch=4)
    noise = [engine.submit(GenerateParams(p, 6, temperature=1.3, seed=i), task=t)
             for i, (p, t) in enumerate(zip(PROMPTS, TASKS))]
    h = engine.submit(params, task="a")
    engine.run(noise + [h])
    # by hand: the sliced model, one forward per token, torch.multinomial from a generator seeded alike
    e = experts["a"]
    sliced = sliced_copy(model, e.indices)
    ids = rt._entries["a"].on_expert.prompt_ids(params.prompt)
    g = torch.Generator().manual_seed(123)
    tokens = []
    with torch.no_grad():
        for _ in range(8):
            embeds = torch.cat([e.prompt[None], sliced.get_input_embeddings()(torch.tensor([ids + tokens]))], 1)
            logits = sliced(inputs_embeds=embeds).logits[0, -1].float() / 0.9
            tokens.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g)))
            if tokens[-1] == model.generation_config.eos_token_id:
                break
    assert h.token_ids == tokens


def test_stop_strings_cut_the_text_and_never_stream_it(setup):
    model, tok, experts, rt = setup
    texts = [(p, t, alone(model, tok, rt, experts, p, t, GenerateParams(p, 8)).text) for p in PROMPTS for t in "ab"]
    prompt, task, full = next(x for x in texts if len(x[2].split()) >= 3)
    stop = " ".join(full.split()[1:3])
    pieces = []
    g = rt.generate(GenerateParams(prompt, 8, stop=("zzz", stop)), task=task, on_text=pieces.append)
    assert g.finish_reason == "stop" and g.text == full[: full.index(stop)]
    assert "".join(pieces) == g.text


def test_cancel_ends_one_row_and_leaves_the_others_exact(setup):
    model, tok, experts, rt = setup
    engine = GenerationEngine(rt, max_batch=4)
    handles = [engine.submit(GenerateParams(p, 10), task=t) for p, t in zip(PROMPTS[:4], TASKS[:4])]
    engine.step()
    engine.step()
    handles[1].cancel()
    engine.run(handles)
    assert handles[1].finish_reason == "cancelled" and len(handles[1].token_ids) < 10
    for h, p, t in zip(handles, PROMPTS, TASKS):
        if h is not handles[1]:
            assert h.token_ids == alone(model, tok, rt, experts, p, t, GenerateParams(p, 10)).token_ids


def test_admission_is_first_in_first_out_and_bounded(setup):
    model, tok, experts, rt = setup
    order = []
    engine = GenerationEngine(rt, max_batch=2, kv_budget=60, max_queue=5)
    tasks = ["a", "a", "a", "b", "a"]
    handles = [engine.submit(GenerateParams("copy red", 4 if i != 2 else 20), task=t,
                             on_token=lambda _, i=i: order.append(i)) for i, t in enumerate(tasks)]
    with pytest.raises(EngineFull, match="the queue holds 5 of 5 requests"):
        engine.submit(GenerateParams("copy red", 2))
    engine.run(handles)
    starts = [h.started for h in handles]
    assert starts == sorted(starts)  # admitted in arrival order: b (index 3) waits its turn, not longer
    peak = []
    engine.on_step = lambda rows, slots: peak.append(slots)
    engine.run([engine.submit(GenerateParams("copy red", 4 if i != 2 else 20), task=t) for i, t in enumerate(tasks)])
    assert max(peak) <= 60


def test_a_failing_step_fails_its_rows_and_the_engine_goes_on(setup, monkeypatch):
    model, tok, experts, rt = setup
    engine = GenerationEngine(rt, max_batch=4)
    handles = [engine.submit(GenerateParams(p, 6), task=t) for p, t in zip(PROMPTS[:3], TASKS[:3])]
    engine.step()  # prefilled, one token each
    live = [h for h in handles if not h.done.is_set()]
    assert live
    real = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    engine.step()
    monkeypatch.setattr(type(model), "forward", real)
    assert all(h.done.is_set() and "RuntimeError: boom" in h.error for h in live)
    with pytest.raises(RuntimeError, match="boom"):
        live[0].result()
    again = engine.run([engine.submit(GenerateParams(PROMPTS[0], 6), task=TASKS[0])])[0]
    assert again.token_ids == alone(model, tok, rt, experts, PROMPTS[0], TASKS[0], GenerateParams(PROMPTS[0], 6)
                                    ).token_ids


def test_worker_thread_serves_many_threads_and_drains_on_stop(setup):
    model, tok, experts, rt = setup
    engine = GenerationEngine(rt, max_batch=4)
    engine.start()
    got = {}

    def client(i):
        got[i] = engine.submit(GenerateParams(PROMPTS[i], NEW[i]), task=TASKS[i]).result(timeout=60).token_ids

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    late = engine.submit(GenerateParams(PROMPTS[0], 4), task="a")
    assert engine.stop(timeout=60) and late.done.is_set()
    with pytest.raises(EngineStopped):
        engine.submit(GenerateParams("copy", 2))
    for i in range(len(PROMPTS)):
        assert got[i] == alone(model, tok, rt, experts, PROMPTS[i], TASKS[i],
                               GenerateParams(PROMPTS[i], NEW[i])).token_ids


def test_bad_requests_are_refused_before_anything_runs(setup):
    model, tok, experts, rt = setup
    engine = GenerationEngine(rt)
    with pytest.raises(ValueError, match="unknown task 'zzz'; this runtime serves"):
        engine.submit(GenerateParams("copy"), task="zzz")
    with pytest.raises(ValueError, match="max_new_tokens: expected an int >= 1, got 0"):
        GenerateParams("copy", 0)
    with pytest.raises(ValueError, match="top_p: expected a number in"):
        GenerateParams("copy", top_p=0)
    with pytest.raises(ValueError, match="stop: expected non-empty strings"):
        GenerateParams("copy", stop=("",))
    assert engine.queued == 0
    with pytest.raises(ValueError, match="max_batch: expected a positive int, got 0"):
        GenerationEngine(rt, max_batch=0)


def test_generate_all_and_process_batch_generation_requests(setup):
    model, tok, experts, rt = setup
    pairs = [(GenerateParams(p, n), t) for p, t, n in zip(PROMPTS, TASKS, NEW)]
    got = generate_all(rt, pairs, max_batch=3)
    for g, (params, t) in zip(got, pairs):
        assert g.token_ids == alone(model, tok, rt, experts, params.prompt, t, params).token_ids
    results = rt.process([{"text": p, "task": t, "max_new_tokens": n}
                          for p, t, n in zip(PROMPTS, TASKS, NEW) if t is not None])
    want = [g.text for g, (_, t) in zip(got, pairs) if t is not None]
    assert [r.text for r in results] == want and all(r.error is None for r in results)


def test_a_step_that_fails_while_admitting_finishes_every_admitted_request(setup, monkeypatch):
    model, tok, experts, rt = setup
    engine = GenerationEngine(rt, max_batch=4)
    first = engine.submit(GenerateParams(PROMPTS[0], 1), task="a")  # done in its prefill
    engine.step()
    joining = [engine.submit(GenerateParams(p, 6), task=t) for p, t in zip(PROMPTS[1:3], TASKS[1:3])]
    seen = []

    def admitted_then_fail(*args, **kwargs):
        seen.append(engine.busy("b"))
        raise RuntimeError("sampling broke")

    monkeypatch.setattr("doe.engine.choose_tokens", admitted_then_fail)
    engine.step()
    assert seen == [1]  # a request being prefilled counts as busy
    assert all(h.done.is_set() and "sampling broke" in h.error for h in joining)
    assert first.error is None and first.finish_reason in ("stop", "length")  # an earlier result stays
    assert engine.queued == engine.running == 0


def test_an_expert_with_bias_compensation_runs_alone_and_mixed_with_its_offsets(setup):
    model, tok, experts, rt = setup
    import doe

    hidden = model.config.hidden_size
    g = torch.Generator().manual_seed(5)
    comp = experts["a"].with_offsets([torch.randn(hidden, generator=g) * 0.5 for _ in experts["a"].indices])
    comp.task = "a"
    rt2 = UnplugAndPlay(model, tok)
    rt2.add_expert(comp)
    rt2.add_expert(experts["b"])
    engine = GenerationEngine(rt2, max_batch=4)
    alone_a = engine.run([engine.submit(GenerateParams(PROMPTS[0], 6), task="a")])[0]
    ids = rt2._entries["a"].on_expert.prompt_ids(PROMPTS[0])
    with doe.unplugged(model, comp):  # the single-expert install applies the offsets
        want = generate(model, tok, GenerateParams(PROMPTS[0], 6), soft_prompt=comp.prompt, prompt_ids=ids)
    assert alone_a.result().token_ids == want.token_ids
    alone_b = engine.run([engine.submit(GenerateParams(PROMPTS[1], 6), task="b")])[0]
    both = engine.run([engine.submit(GenerateParams(PROMPTS[0], 6), task="a"),
                       engine.submit(GenerateParams(PROMPTS[1], 6), task="b")])
    assert [h.error for h in both] == [None, None]
    assert [h.result().token_ids for h in both] == [want.token_ids, alone_b.result().token_ids]
