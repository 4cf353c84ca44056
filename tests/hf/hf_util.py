"""Small recur models wrapped for transformers, shared by the tests of ``recur.hf``."""

from __future__ import annotations

import torch

import recur
from recur.hf import RecurConfig, RecurForCausalLM

V, D = 32, 16  # tiny: every registered mixer builds and runs in milliseconds
CAUSAL_MIXERS = recur.list_models(causal=True)


def make(mixer="gla", vocab=V, d_model=D, n_layers=1, dtype=torch.float32, seed=0, **model) -> RecurForCausalLM:
    """A freshly initialised RecurForCausalLM (recur's own init, seeded) in eval mode."""
    torch.manual_seed(seed)
    config = RecurConfig(recur_model={"mixer": mixer, "d_model": d_model, "n_layers": n_layers, **model},
                         vocab_size=vocab)
    return RecurForCausalLM(config).to(dtype).eval()


def prompts(batch=2, t=5, vocab=V, seed=1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, t), generator=torch.Generator().manual_seed(seed))


def greedy(model, input_ids, new, **kw) -> torch.Tensor:
    """HF greedy generate of exactly ``new`` tokens (no eos: the model's config has none)."""
    return model.generate(input_ids, max_new_tokens=new, do_sample=False, **kw)


def sequence_logprob(lm, sequences: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Sum over the generated positions of log p(token | everything before it), by recur's own
    full forward pass over each whole sequence: the score beam search maximises."""
    with torch.no_grad():
        logp = lm(sequences).logits.double().log_softmax(-1)
    picked = logp[:, prompt_len - 1:-1].gather(-1, sequences[:, prompt_len:, None]).squeeze(-1)
    return picked.sum(-1)
