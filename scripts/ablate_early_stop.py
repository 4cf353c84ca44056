"""Ablation behind docs/results.md "causes": early-stop rules for a 1-layer LSTM on parity, length generalisation.

    python scripts/ablate_early_stop.py RULE MODEL D_MODEL LR STEPS SEED [TASK]   # RULE: acc, none, strict, lossX, afterF
"""
import sys, json, time, torch
torch.set_num_threads(1)
import recur.training.trainer as T
from recur.config import RunConfig
rule, model, d, lr, steps, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
task = sys.argv[7] if len(sys.argv) > 7 else "parity"
cfg = {"task": {"name": task, "seq_len": 32}, "model": {"mixer": model, "d_model": d, "n_layers": 1, "tie_embeddings": False},
       "optim": {"steps": steps, "batch_size": 64, "lr": lr, "early_stop_patience": 0}, "eval": {"lengths": [32, 128, 512], "batches": 4}, "seed": seed}
if task == "word_problem": cfg["task"]["args"] = {"group": "Z5"}
state = {}
orig = T.Trainer._saturated
def sat(self):
    w = self.window
    if len(w) < w.maxlen: return False
    acc = sum(a for _, a in w) / len(w); loss = sum(l for l, _ in w) / len(w)
    if rule == "acc": return acc >= 0.99
    if rule == "none": return False
    if rule == "strict": return acc >= 0.999
    if rule.startswith("loss"): return loss <= float(rule[4:])
    if rule.startswith("after"):  # acc >= .99, then keep training a fraction of the budget
        if "hit" not in state and acc >= 0.99: state["hit"] = self.step
        return "hit" in state and self.step >= state["hit"] + float(rule[5:]) * self.cfg.optim.steps
T.Trainer._saturated = sat
t = time.time(); r = T.train(RunConfig.model_validate(cfg), progress=False)
print(json.dumps({"rule": rule, "model": model, "d": d, "lr": lr, "steps_budget": steps, "seed": seed, "task": task,
  "steps": r.steps, "hit": state.get("hit"), "loss": round(r.train_loss, 5),
  **{k: round(v["accuracy"], 3) for k, v in r.metrics.items()}, "s": round(time.time() - t)}), flush=True)
