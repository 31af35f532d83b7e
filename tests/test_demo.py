"""`doe demo` on a decoder: the four offline tasks and the generative one (offline_topic_words),
on a tiny LLaMA standing in for SmolLM2, every call the real one."""

import doe.models
from doe.demo import DemoConfig, run_demo
from doe.tasks import OFFLINE_TASKS, load_task
from doe.testing import assert_same_as, snapshot
from tiny_models import make_tiny, tiny_tokenizer


def test_demo_on_a_decoder_serves_a_generation_task_next_to_the_routed_ones(tmp_path, monkeypatch, capsys):
    data = {t: load_task(t) for t in OFFLINE_TASKS}
    tok = tiny_tokenizer([e.text for d in data.values() for e in d.train + d.eval],
                         [w for d in data.values() for w in d.spec.label_words] + ["name", "topic", "one", "word"])
    model = make_tiny("llama")
    snap = snapshot(model)
    monkeypatch.setattr(doe.models, "load_model", lambda name, **kw: (tok, model))
    result = run_demo(DemoConfig(cache=tmp_path, requests=40, max_train=24, epochs=1, retune_epochs=1,
                                 show_progress=False, model="smollm2"))
    out = capsys.readouterr().out
    tasks = [row[0] for row in result["rows"]]
    assert tasks == [*OFFLINE_TASKS, "offline_topic_words"]
    words = result["rows"][-1]
    assert words[1] > 0 and 0.0 <= words[2] <= 1.0 and 0.0 <= words[3] <= 1.0
    assert "offline_topic_words" in out and "restored model bit-identical to the original: yes" in out
    assert result["identical"]
    assert_same_as(model, snap)
    again = run_demo(DemoConfig(cache=tmp_path, requests=40, max_train=24, epochs=1, retune_epochs=1,
                                show_progress=False, model="smollm2"))
    assert "cached expert" in capsys.readouterr().out and again["rows"][-1][0] == "offline_topic_words"
