"""Find experts for two tasks, save them, and serve mixed requests from one model."""
import doe
from doe.models import load_minilm
from doe.tasks import load_task

tok, model = load_minilm()                                       # or any supported HF model
config = doe.ExpertSearchConfig(prompt=doe.PromptTuningConfig(epochs=3), retune_epochs=1)
data = {t: load_task(t, max_train=160) for t in ("offline_sentiment", "offline_question")}
for task, d in data.items():
    result = doe.find_expert(model, tok, d, config)              # tune a prompt, score neurons, keep 35%
    result.expert.save_pretrained(f"experts/{task}")             # JSON config + safetensors, a few KB

batch = tok(["Is it raining?"], return_tensors="pt")
with doe.unplugged(model, result.expert):                        # gathered FFNs, nothing copied
    hidden = model(**batch).last_hidden_state                    # the original modules back after

router = doe.TaskRouter.fit(model, tok, {t: [e.text for e in d.train] for t, d in data.items()})
rt = doe.UnplugAndPlay(model, tok, router=router)                # compact=True: faster on CPU, costs memory
for task in data:
    rt.add_expert(f"experts/{task}")
for r in rt.process([{"text": "What a wonderful film."}, {"text": "Is it raining?", "task": "offline_question"}]):
    print(r.id, r.task, r.expert, r.label, f"{r.probability:.2f}")
