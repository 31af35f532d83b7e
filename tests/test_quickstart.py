"""The README's Python quick start is examples/quickstart.py, and it runs as written.

The script runs whole, with the packaged MiniLM swapped for a tiny BERT so that it takes
seconds; every call in it is the real one.
"""

import re
import runpy
from pathlib import Path

import doe.models
from doe.tasks import load_task
from tiny_models import make_tiny, tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "quickstart.py"
TASKS = ("offline_sentiment", "offline_question")


def test_readme_quick_start_is_the_example_script():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start (Python)", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = SCRIPT.read_text().split('"""', 2)[2].lstrip("\n")  # the script without its docstring
    assert block == code


def test_quick_start_runs_as_written(tmp_path, monkeypatch, capsys):
    data = {t: load_task(t) for t in TASKS}
    tok = tiny_tokenizer([e.text for d in data.values() for e in d.train + d.eval],
                         [w for d in data.values() for w in d.spec.label_words])
    model = make_tiny("bert", head=False)
    monkeypatch.setattr(doe.models, "load_minilm", lambda **kw: (tok, model))
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(SCRIPT), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    routed, named = (line.split() for line in lines)
    assert routed[0] == "0" and routed[1] in TASKS and routed[2] in (*TASKS, "dense")
    assert named[:3] == ["1", "offline_question", "offline_question"]
    assert named[3] in data["offline_question"].spec.labels and 0.0 <= float(named[4]) <= 1.0
    for t in TASKS:
        assert doe.TaskExpert.from_pretrained(tmp_path / "experts" / t).task == t
    assert not doe.is_unplugged(model)
