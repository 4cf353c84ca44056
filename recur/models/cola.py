"""Chain-of-layers (CoLa): a trained CausalLM's layers recombined per input -- skipped, looped or
reordered -- into a chain found by Monte Carlo tree search against the task metric (Li, Li & Zhou,
"Skip a Layer or Loop it? Test-Time Depth Adaptation of Pretrained LLMs", 2025).

    out = run_chain(lm, tokens, (0, 0, 2))          # embed, layer 0 twice, layer 2 (1 skipped), norm, head
    found = search_chain(lm, task, row, budget=200)  # found.chain, found.score, found.depth, found.stats
    report = cola_report(lm, task, batches)          # per-row CoLa against the static model

    python -m recur.models.cola --checkpoint recur-checkpoints/<run> --rows 64 --budget 200

A chain c = (c_1, ..., c_m) of layer indices (repeats and any order allowed) is the model

    h_0 = E x;   h_k = Block_{c_k}(h_{k-1});   logits = W_head norm(h_m)

with each application a fresh causal pass (its own zero mixer state): a chain is a new model, so
layer 0 looped twice keeps two memories. The identity chain (0, ..., L-1) is the CausalLM itself.

The search (UCT; Kocsis & Szepesvari 2006). Each simulation: *selection* from the root by
UCB1, Q/N + c sqrt(ln N_parent / N), over fully expanded nodes; *expansion* of one untried action
(drawn by the seeded generator); *simulation*: the new node's chain (``actions="edit"``) or a
uniformly random completion of its prefix (``actions="append"``) scored on the sample; *backup*
of the reward  score - length_penalty * len(chain) / L  to the root. The best chain is the highest
score seen, the shorter at equal score (then the first found): the length penalty steers the tree
towards short chains, the tie-break makes "a shorter chain exists" exact for what was evaluated.

Action sets (the choice, and why):
* ``"edit"`` (default; the paper's operators): a node is a whole chain and the root is the
  original model (0..L-1). Actions: ``skip(i, k)`` removes the k consecutive entries at i, and
  ``repeat(i, k, r)`` repeats the block of k entries at i r more times, for k <= ``max_block`` and
  r <= ``max_repeat``, keeping 1 <= len <= ``max_depth``. Every node is evaluated when expanded
  (the root first), so the static model is always a candidate. Chosen by us where the paper was
  not available to read here: the block and repeat limits and their defaults (4 and 3), the UCB
  constant and the reward's length term (the abstract states skip/repeat and a preference for
  shallower chains, not the numbers). Edits reorder nothing: a reordering needs ``"append"``.
* ``"append"``: the chain is built left to right: a node is a prefix, its actions append a layer
  index (while len < ``max_depth``) or stop (once len >= 1); a rollout appends uniformly random
  actions until it stops. It spans every chain up to ``max_depth``, reorderings included, but
  starts from nothing rather than from the trained model.

``budget`` is the number of simulations; each scores one chain, and scores are cached per chain,
so the model runs at most ``budget`` times (``stats["evaluations"]``). Deterministic given ``seed``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from recur.models.base import ModelOutput, check_positions, check_tokens
from recur.models.causal_lm import CausalLM
from recur.state import State

ACTION_SETS = ("edit", "append")
Chain = tuple[int, ...]


def _check_lm(lm) -> int:
    """The number of layers of ``lm``, a plain CausalLM (a subclass with its own forward, a looped
    LM say, is not the chain of its Backbone's layers)."""
    if not isinstance(lm, CausalLM) or type(lm).forward is not CausalLM.forward:
        raise ValueError(f"CoLa recombines the layers of a causal_lm (embed -> Backbone -> norm -> head); "
                         f"got {type(lm).__name__}, whose forward is not that chain")
    return lm.backbone.n_layers


def check_chain(chain, n_layers: int) -> Chain:
    """``chain`` as a tuple of ints in [0, n_layers), at least one."""
    if isinstance(chain, (str, bytes)) or not isinstance(chain, Iterable):
        raise ValueError(f"chain must be a sequence of layer indices, got {chain!r}")
    chain = tuple(chain)
    bad = [c for c in chain if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < n_layers]
    if not chain or bad:
        raise ValueError(f"chain must hold at least one layer index in [0, {n_layers}), got {chain!r}")
    return chain


def run_chain(lm: CausalLM, tokens: torch.Tensor, chain: Sequence[int], resets: torch.Tensor | None = None,
              positions: torch.Tensor | None = None) -> ModelOutput:
    """The CausalLM ``lm`` with its Backbone's layers applied in the order ``chain``, each a fresh pass
    (zero mixer state). The state holds one entry per application, ``step{k}`` (and ``channel{k}``
    for a stateful channel mixer); ``resets`` and ``positions`` as in ``CausalLM.forward``."""
    chain = check_chain(chain, _check_lm(lm))
    check_tokens(tokens, lm.vocab_size)
    if positions is not None:
        check_positions(positions, tokens)
    layers = lm.backbone.layers
    x, new = lm.embed(tokens), {}
    for k, i in enumerate(chain):
        # The Backbone's own block call, with no carried state: what Backbone.forward does per layer.
        x, new[f"step{k}"], ch = layers[i](x, None, None, resets=resets)
        if ch is not None:
            new[f"channel{k}"] = ch
    return lm.output(x, State(new), positions)


def chain_scorer(lm: CausalLM, task, batch, metric: str = "exact_match") -> Callable[[Chain], float]:
    """``chain -> task metric`` of ``lm`` run as that chain on ``batch`` (its argmax predictions at the
    supervised positions, ``task.score_predictions``), without gradients."""
    def score(chain: Chain) -> float:
        with torch.no_grad():
            out = run_chain(lm, batch.inputs, chain, resets=batch.resets, positions=batch.mask)
            scores = task.score_predictions(lm.predictions(out, batch), batch)
        if metric not in scores:
            raise ValueError(f"metric must be one of {sorted(scores)} (task {task.name!r}), got {metric!r}")
        return float(scores[metric])
    return score


# ------------------------------------------------------------------ the tree
class _Node:
    __slots__ = ("chain", "terminal", "parent", "children", "untried", "visits", "value")

    def __init__(self, chain: Chain, terminal: bool, parent, actions: list):
        self.chain, self.terminal, self.parent = chain, terminal, parent
        self.children: list[_Node] = []
        self.untried = actions
        self.visits, self.value = 0, 0.0


def _edit_actions(chain: Chain, max_depth: int, max_block: int, max_repeat: int) -> list[tuple]:
    acts = []
    n = len(chain)
    for i in range(n):
        for k in range(1, min(max_block, n - i) + 1):
            if n - k >= 1:
                acts.append(("skip", i, k))
            for r in range(1, max_repeat + 1):
                if n + r * k <= max_depth:
                    acts.append(("repeat", i, k, r))
    return acts


def _apply_edit(chain: Chain, action: tuple) -> Chain:
    if action[0] == "skip":
        _, i, k = action
        return chain[:i] + chain[i + k:]
    _, i, k, r = action
    return chain[:i + k] + chain[i:i + k] * r + chain[i + k:]


def _append_actions(chain: Chain, n_layers: int, max_depth: int) -> list[tuple]:
    acts = [("append", j) for j in range(n_layers)] if len(chain) < max_depth else []
    return acts + ([("stop",)] if chain else [])


@dataclass
class ChainSearch:
    """What ``search_chain`` found: the best chain, its score and depth (len), and the statistics."""

    chain: Chain
    score: float
    depth: int
    stats: dict[str, Any] = field(default_factory=dict)


def search_chain(lm: CausalLM | None = None, task=None, batch=None, budget: int = 200, max_depth: int | None = None,
                 seed: int = 0, actions: str = "edit", exploration: float = math.sqrt(2), length_penalty: float = 0.05,
                 max_block: int = 4, max_repeat: int = 3, metric: str = "exact_match",
                 scorer: Callable[[Chain], float] | None = None, n_layers: int | None = None) -> ChainSearch:
    """MCTS over chains of ``lm``'s layers on ``batch`` (one sample: a one-row Batch), scored by
    ``task``'s ``metric``; or over chains of ``n_layers`` layers scored by ``scorer`` (chain -> float,
    higher is better), which replaces the model. ``max_depth`` (default 2 L) bounds a chain's length.
    See the module docstring for the action sets, the reward and the budget."""
    if scorer is None:
        if lm is None or task is None or batch is None:
            raise ValueError("search_chain needs lm, task and batch, or a scorer and n_layers")
        n_layers = _check_lm(lm)
        scorer = chain_scorer(lm, task, batch, metric)
    elif lm is not None:
        n_layers = _check_lm(lm)
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be an int >= 1 (or give lm), got {n_layers!r}")
    if actions not in ACTION_SETS:
        raise ValueError(f"actions must be one of {ACTION_SETS}, got {actions!r}")
    max_depth = 2 * n_layers if max_depth is None else max_depth
    for name, value, low in (("budget", budget, 1), ("max_depth", max_depth, 1), ("max_block", max_block, 1),
                             ("max_repeat", max_repeat, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if actions == "edit" and max_depth < n_layers:
        raise ValueError(f"max_depth must be >= n_layers={n_layers} with actions='edit' (the root is the whole "
                         f"model), got {max_depth}")
    for name, value in (("exploration", exploration), ("length_penalty", length_penalty)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    rng = random.Random(seed)
    cache: dict[Chain, float] = {}
    order: list[Chain] = []  # chains in the order first scored (the tie-break after length)

    def evaluate(chain: Chain) -> float:
        if chain not in cache:
            cache[chain] = float(scorer(chain))
            order.append(chain)
        return cache[chain] - length_penalty * len(chain) / n_layers

    if actions == "edit":
        def expand_actions(chain, terminal):
            return [] if terminal else _edit_actions(chain, max_depth, max_block, max_repeat)

        def step(chain, action):
            return _apply_edit(chain, action), False

        def rollout(chain, terminal):
            return chain
        root_chain: Chain = tuple(range(n_layers))
    else:
        def expand_actions(chain, terminal):
            return [] if terminal else _append_actions(chain, n_layers, max_depth)

        def step(chain, action):
            return (chain, True) if action[0] == "stop" else (chain + (action[1],), False)

        def rollout(chain, terminal):
            while not terminal:
                chain, terminal = step(chain, rng.choice(_append_actions(chain, n_layers, max_depth)))
            return chain
        root_chain = ()

    root = _Node(root_chain, False, None, expand_actions(root_chain, False))
    n_nodes, deepest = 1, 0
    for sim in range(budget):
        node, depth = root, 0
        if not (sim == 0 and actions == "edit"):  # the first edit simulation scores the original model
            while not node.untried and node.children:
                log_n = math.log(node.visits)
                node = max(node.children, key=lambda ch: ch.value / ch.visits
                           + exploration * math.sqrt(log_n / ch.visits))
                depth += 1
            if node.untried:
                action = node.untried.pop(rng.randrange(len(node.untried)))
                chain, terminal = step(node.chain, action)
                child = _Node(chain, terminal, node, expand_actions(chain, terminal))
                node.children.append(child)
                node, depth, n_nodes = child, depth + 1, n_nodes + 1
        deepest = max(deepest, depth)
        reward = evaluate(rollout(node.chain, node.terminal))
        while node is not None:
            node.visits += 1
            node.value += reward
            node = node.parent

    best = min(enumerate(order), key=lambda p: (-cache[p[1]], len(p[1]), p[0]))[1]
    stats = {"simulations": budget, "evaluations": len(cache), "nodes": n_nodes, "tree_depth": deepest,
             "actions": actions, "root_value": root.value / max(root.visits, 1)}
    if actions == "edit":
        stats["static_score"] = cache[root_chain]
    return ChainSearch(best, cache[best], len(best), stats)


# ------------------------------------------------------------------ the report
def row(batch, r: int):
    """Row ``r`` of ``batch`` as a one-row Batch (a sample)."""
    pick = lambda t: None if t is None else t[r:r + 1]
    return dataclasses.replace(batch, inputs=batch.inputs[r:r + 1], targets=batch.targets[r:r + 1],
                               mask=batch.mask[r:r + 1], valid=pick(batch.valid), resets=pick(batch.resets))


def cola_report(lm: CausalLM, task, batches: Iterable, budget: int = 200, metric: str = "exact_match",
                print_table: bool = False, **search) -> dict[str, Any]:
    """Per-row CoLa search on every row of ``batches`` against the static model (the identity chain).

    A row is correct under a chain when its ``metric`` is 1 (exact match: every supervised position
    right). Returns the static and CoLa accuracy (mean metric) and mean depth, and the paper's two
    findings: ``shorter_when_correct`` (of the rows the static model gets right, the share where a
    strictly shorter correct chain was found) and ``fixed_when_wrong`` (of the rows it gets wrong, the
    share where some chain is correct). ``search``: keyword arguments of ``search_chain``.

    The search reads each row's targets (the paper's oracle protocol): these are upper bounds of what
    a per-sample depth could give, not the accuracy of a deployable policy. With ``actions="append"``
    the static chain is a candidate only if the search happens to build it."""
    n_layers = _check_lm(lm)
    identity = tuple(range(n_layers))
    static, cola, depths, chains = [], [], [], []
    for batch in batches:
        for r in range(batch.inputs.shape[0]):
            sample = row(batch, r)
            static.append(chain_scorer(lm, task, sample, metric)(identity))
            found = search_chain(lm, task, sample, budget=budget, metric=metric, **search)
            cola.append(found.score)
            depths.append(found.depth)
            chains.append(found.chain)
    if not static:
        raise ValueError("cola_report needs at least one row in batches")
    right = [s >= 1.0 for s in static]
    n_right = sum(right)
    shorter = sum(1 for ok, c, d in zip(right, cola, depths) if ok and c >= 1.0 and d < n_layers)
    fixed = sum(1 for ok, c in zip(right, cola) if not ok and c >= 1.0)
    report = {
        "rows": len(static), "metric": metric, "budget": budget,
        "static_accuracy": sum(static) / len(static), "static_depth": float(n_layers),
        "cola_accuracy": sum(cola) / len(cola), "cola_depth": sum(depths) / len(depths),
        "static_correct": n_right, "static_wrong": len(static) - n_right,
        "shorter_when_correct": shorter / n_right if n_right else float("nan"),
        "fixed_when_wrong": fixed / (len(static) - n_right) if n_right < len(static) else float("nan"),
        "chains": chains,
    }
    if print_table:
        _print_table(report)
    return report


def _print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"CoLa vs static ({report['rows']} rows, {report['metric']}, budget {report['budget']})")
    for col in ("model", report["metric"], "mean depth"):
        table.add_column(col)
    table.add_row("static", f"{report['static_accuracy']:.3f}", f"{report['static_depth']:.2f}")
    table.add_row("CoLa (per row)", f"{report['cola_accuracy']:.3f}", f"{report['cola_depth']:.2f}")
    console = Console()
    console.print(table)
    console.print(f"shorter chain found for {report['shorter_when_correct']:.1%} of the {report['static_correct']} "
                  f"rows the static model gets right; a correct chain for {report['fixed_when_wrong']:.1%} of the "
                  f"{report['static_wrong']} it gets wrong", highlight=False)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m recur.models.cola --checkpoint PATH``: CoLa on a run saved by
    ``recur run ... --checkpoint-every N`` (the model and task rebuilt from its config)."""
    parser = argparse.ArgumentParser(prog="python -m recur.models.cola", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a run's checkpoint folder (as `recur generate` takes)")
    parser.add_argument("--rows", type=int, default=64, help="samples searched (default 64)")
    parser.add_argument("--seq-len", type=int, default=None, help="sample length (default: the run's)")
    parser.add_argument("--split", default=None, help="data split (default: the task's last, test)")
    parser.add_argument("--budget", type=int, default=200, help="MCTS simulations per sample (default 200)")
    parser.add_argument("--max-depth", type=int, default=None, help="longest chain (default 2 x n_layers)")
    parser.add_argument("--actions", choices=ACTION_SETS, default="edit")
    parser.add_argument("--metric", default="exact_match")
    parser.add_argument("--length-penalty", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0, help="seeds the samples and the search")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    from recur.generate import load_checkpoint  # the loader `recur generate` uses
    lm, task, cfg = load_checkpoint(args.checkpoint, args.device)
    split = args.split or task.splits[-1]
    gen = torch.Generator().manual_seed(args.seed)
    batch = task.batch(args.rows, args.seq_len or cfg.task.seq_len, gen, split=split).to(next(lm.parameters()).device)
    report = cola_report(lm, task, [batch], budget=args.budget, metric=args.metric, print_table=not args.json,
                         max_depth=args.max_depth, actions=args.actions, length_penalty=args.length_penalty,
                         seed=args.seed)
    if args.json:
        import json
        print(json.dumps({k: v for k, v in report.items() if k != "chains"}))
    return report


if __name__ == "__main__":
    main()


__all__ = ["ChainSearch", "chain_scorer", "check_chain", "cola_report", "row", "run_chain", "search_chain"]
