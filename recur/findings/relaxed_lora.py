"""``relaxed-lora``: relaxing a recursive (layer-tied) transformer with per-loop LoRA recovers the
untied model's loss, the more so with the SVD initialisation (Bae et al., "Relaxed Recursive
Transformers: Effective Parameter Sharing with Layer-wise LoRA", 2024), at CPU scale.

A 4-layer causal LM is trained on byte-level text, then converted to 2 shared blocks applied twice
(``cycle``, the shared weights the mean of the tied layers'), and fine-tuned for the same steps on
the same data as (a) plain tying, (b) tying + LoRA of rank 8 initialised at random (B = 0), (c) tying
+ LoRA of rank 8 initialised from the SVD of each layer's residual; (d) the untied model fine-tuned
alike (``relaxed_recursive`` with as many blocks as layers, which is the original exactly).

Claims (test bits per byte after fine-tuning, lower is better): (c) < (b) < (a), and (c) recovers at
least ``RECOVERS`` of the gap between (a) and (d). Rules fixed before the runs.
"""

from __future__ import annotations

import time
from pathlib import Path

from recur.config import RunConfig, config_hash
from recur.findings.base import FINDINGS, Finding, Measured, Outcome, Verdict, fmt

D, L, SEQ = 64, 4, 64
PRE_STEPS, FT_STEPS = 400, 300
RECOVERS = 0.3
VARIANTS = {"tied": {"n_unique": 2, "lora_rank": 0}, "lora_random": {"n_unique": 2, "lora_rank": 8, "lora_init": "random"},
            "lora_svd": {"n_unique": 2, "lora_rank": 8, "lora_init": "svd"}, "untied": {"n_unique": L, "lora_rank": 0}}


def _config(arch: str, steps: int, lr: float, args: dict | None = None) -> RunConfig:
    return RunConfig.model_validate({
        "task": {"name": "text", "seq_len": SEQ},
        "model": {"arch": arch, "mixer": "attention", "d_model": D, "n_layers": L, **({"args": args} if args else {})},
        "optim": {"steps": steps, "batch_size": 16, "lr": lr, "early_stop": None},
        "eval": {"lengths": [SEQ], "batches": 8}, "seed": 0})


@FINDINGS.register("relaxed-lora")
class RelaxedLoRA(Finding):
    title = "Relaxed recursive transformer: plain tying, random LoRA and SVD LoRA against the untied model"
    paper = "Bae et al., Relaxed Recursive Transformers: Effective Parameter Sharing with Layer-wise LoRA (2024)"
    budget = "about 8 min on 2 cores (5 runs)"
    quick_budget = "about 30 s on 2 cores"
    notes = f"""
`text` (the stdlib `code` corpus, windows of {SEQ} bytes): a `causal_lm` of {L} attention blocks (d_model {D}) trained
{PRE_STEPS} steps of batch 16 at lr 3e-3 (checkpointed next to the store), then four `relaxed_recursive` runs converted
from it (`model.args.init_from`), each fine-tuned {FT_STEPS} steps of batch 16 at lr 1e-3 with the same data stream:
tied (2 blocks x 2 loops, `cycle`, average initialisation), + LoRA r = 8 random, + LoRA r = 8 SVD, and the untied
conversion (4 blocks). Test bits per byte at length {SEQ}; one seed.
"""

    def configs(self, quick: bool = False, base: str | None = None) -> list[RunConfig]:
        steps = (4, 4) if quick else (PRE_STEPS, FT_STEPS)
        out = [_config("causal_lm", steps[0], 3e-3)]
        if base is not None:
            out += [_config("relaxed_recursive", steps[1], 1e-3, {"init_from": base, **v}) for v in VARIANTS.values()]
        return out

    def run(self, store, quick: bool = False, workers: int = 1, console=None,
            figures_dir: str | Path | None = None) -> Outcome:
        from recur.sweep import run_sweep
        from recur.training.trainer import Trainer

        start = time.perf_counter()
        base_cfg = self.configs(quick)[0]
        h = config_hash(base_cfg)
        folder = Path(store.path).resolve().parent / "relaxed-lora-base"
        if not (folder / h / "LATEST").exists() or not store.has(h):
            result = Trainer(base_cfg, progress=False, checkpoint_dir=folder / h,
                             checkpoint_every=base_cfg.optim.steps).fit()
            store.put(result)
        configs = self.configs(quick, base=str(folder / h))
        run_sweep(configs[1:], store, workers=workers, console=console)
        hashes = {config_hash(c) for c in configs}
        m = Measured(store.leaderboard(hashes=hashes), store.all_runs(hashes=hashes))
        by_hash = {r["hash"]: r for r in m.runs}
        m.extra = {"bpb": {name: by_hash[config_hash(c)]["metrics"][str(SEQ)]["bits_per_byte"]
                           for name, c in zip(VARIANTS, configs[1:]) if config_hash(c) in by_hash},
                   "base": by_hash[h]["metrics"][str(SEQ)]["bits_per_byte"] if h in by_hash else float("nan")}
        return Outcome(self.name, quick, self.verdicts(m, quick), m, time.perf_counter() - start, len(configs))

    def verdicts(self, m: Measured, quick: bool = False) -> list[Verdict]:
        b = m.extra.get("bpb", {})
        tied, rnd, svd, untied = (b.get(k, float("nan")) for k in VARIANTS)
        gap = tied - untied
        recovered = (tied - svd) / gap if gap > 0 else float("nan")
        return [
            Verdict("SVD-initialised LoRA beats random LoRA, which beats plain tying (bits per byte after fine-tuning)",
                    f"SVD {fmt(svd)} < random {fmt(rnd)} < tied {fmt(tied)}", svd < rnd < tied),
            Verdict(f"SVD LoRA recovers at least {RECOVERS:.0%} of the gap between plain tying and the untied model",
                    f"untied {fmt(untied)}; recovered {fmt(recovered)} of the gap {fmt(gap)}",
                    recovered >= RECOVERS),
        ]

    def table(self, m: Measured) -> list[str]:
        b = m.extra.get("bpb", {})
        lines = ["| model | bits per byte after fine-tuning |", "|---|---|",
                 f"| pretrained causal_lm ({L} blocks), before fine-tuning | {fmt(m.extra.get('base', float('nan')))} |"]
        names = {"tied": "2 blocks x 2, plain tying", "lora_random": "+ LoRA r=8, random init",
                 "lora_svd": "+ LoRA r=8, SVD init", "untied": f"untied ({L} blocks)"}
        lines += [f"| {names[k]} | {fmt(b.get(k, float('nan')))} |" for k in VARIANTS]
        return lines
