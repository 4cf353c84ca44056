"""Ablations behind docs/results.md "causes": why recur's attention LM learned MQAR slower than a plain GPT at lr 1e-3.

    python scripts/ablate_attention_mqar.py VARIANT LR [STEPS] [PATTERN]   # VARIANT: default, plain, untied, gpt_init, resid, layernorm, embscale, emb1, norope, heads4
"""
import sys, math, json, time, torch, torch.nn as nn, torch.nn.functional as F
torch.set_num_threads(1)
import recur.training.trainer as T
from recur.config import RunConfig
from recur.models.base import Architecture, ModelOutput, masked_cross_entropy
from recur.models.causal_lm import CausalLM

class Plain(Architecture):
    autoregressive = True
    def __init__(self, V, d=64, L=2, T=256, heads=1, rope=False):
        super().__init__(); self.vocab_size = V; self.h = heads
        self.emb = nn.Embedding(V, d); self.pos = nn.Embedding(T, d)
        self.ln = nn.ModuleList(nn.LayerNorm(d) for _ in range(L)); self.qkv = nn.ModuleList(nn.Linear(d, 3*d) for _ in range(L))
        self.o = nn.ModuleList(nn.Linear(d, d) for _ in range(L)); self.lnf = nn.LayerNorm(d); self.head = nn.Linear(d, V, bias=False)
    def forward(self, x, state=None, resets=None):
        B, Tn = x.shape; h = self.emb(x) + self.pos(torch.arange(Tn))
        for ln, qkv, o in zip(self.ln, self.qkv, self.o):
            q, k, v = qkv(ln(h)).view(B, Tn, 3, self.h, -1).permute(2, 0, 3, 1, 4)
            h = h + o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, Tn, -1))
        return ModelOutput(self.head(self.lnf(h)), None)
    def init_state(self, *a, **k): return None
    def state_size(self, n): return 0

PATTERN = "attention"
def variant(name, V):
    if name == "plain": return Plain(V)
    if name == "plain4": return Plain(V, heads=4)
    kw = dict(vocab_size=V, d_model=64, n_layers=2, pattern=PATTERN, mlp=None, tie_embeddings=True)  # tied: the old default
    if name == "untied": kw["tie_embeddings"] = False
    if name == "layernorm": kw["norm"] = "layernorm"
    if name == "heads4": kw["mixer_config"] = {"n_heads": 4}
    m = CausalLM(**kw)
    if name in ("gpt_init", "gpt_init_untied"):
        for mod in m.modules():
            if isinstance(mod, nn.Linear): nn.init.normal_(mod.weight, std=0.02)
    if name == "embscale":
        f = m.backbone.forward
        m.backbone.forward = lambda x, *a, **k: f(x * 8.0, *a, **k)
    if name == "resid":  # GPT-2 residual scaling: output projections std 0.02/sqrt(2L), rest as is
        for blk in m.backbone.blocks: nn.init.normal_(blk.mixer.o_proj.weight, std=0.02 / 2)
    if name == "emb1":
        nn.init.normal_(m.embed.weight, std=1.0)
    if name == "norope":
        import recur.layers.attention as A; A.rotary = lambda x, pos, base: x
    return m

name, lr = sys.argv[1], float(sys.argv[2]); steps = int(sys.argv[3]) if len(sys.argv) > 3 else 3000
if len(sys.argv) > 4: PATTERN = sys.argv[4]
cfg = RunConfig.model_validate({"task": {"name": "mqar", "args": {"vocab_size": 256, "num_kv_pairs": 8}, "seq_len": 64},
    "model": {"mixer": "attention", "d_model": 64, "n_layers": 2, "block": {"mlp": None}},
    "optim": {"steps": steps, "batch_size": 64, "lr": lr}, "eval": {"lengths": [64], "batches": 4}})
orig = T.build
def build(c):
    task, _ = orig(c); torch.manual_seed(0); return task, variant(name, task.vocab_size)
T.build = build
t = time.time(); r = T.train(cfg, progress=False)
print(json.dumps({"pattern": PATTERN, "variant": name, "lr": lr, "acc": r.metrics["64"]["accuracy"], "steps": r.steps, "s": round(time.time()-t), "train_loss": round(r.train_loss, 4)}), flush=True)
