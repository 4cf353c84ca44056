"""``recat``: recursive composition of spans into a tree, the tree's nodes joined to the tokens in a
transformer (Hu et al., "Augmenting Transformers with Recursively Composed Multi-grained
Representations", ICLR 2024: ReCAT).

    model = ReCAT(vocab_size=17, d_model=64, n_layers=2, pattern="attention", topk=2)
    out = model(tokens)          # out.logits: [batch, n_classes], one label per sequence

Contextual inside-outside (CIO) layer, over the n leaves x_1..x_n of the sequence (span (i, j)
holds tokens i..j; a split k composes (i, k) and (k+1, j)):

    inside (bottom-up, CKY order):   e_ii = x_i,  a_ii = 0
        s_ijk = <phi_l(e_ik), phi_r(e_k+1,j)> / sqrt(c) + a_ik + a_k+1,j        (the span scorer)
        K = the topk splits of (i, j) by s_ijk (the pruned chart; topk=None keeps every split)
        w_k = softmax_{k in K} s_ijk
        e_ij = sum_k w_k Compose_in(q ; [q, e_ik, e_k+1,j]),   a_ij = sum_k w_k s_ijk
    tree: the best binary tree under the pair scores (Viterbi over <phi_l, phi_r>, every split)
    outside (top-down, over the tree):   o_root = e_root
        o_child = Compose_out(e_child + role ; [e_left, e_right, o_parent])   (for both children)

``Compose`` is the reference code's composition: the query (with a role embedding: parent 0 /
left 1 / right 2 in the inside pass, left 0 / right 1 / parent 2 in the outside pass) attends
over the role-tagged context, then an MLP, each with a residual and a LayerNorm after it. The
first layer's parent query q is a learned vector; layer l + 1 composes the leaves' outside
vectors o_ii of layer l (the "contextual" part: each inside pass sees what the previous layer's
outside pass told every token). The tokens' and the tree's internal nodes' outside vectors of
the last CIO layer, tokens first then the internal nodes in post-order (the root last), are the
input of the Backbone (any registered mixer; causal attention by default: every node comes after
the tokens and each node after its descendants, so the root reads the whole tree), and the head
reads the root (``pool="root"``) or the mean over all positions (``pool="mean"``).

Time contract: the inside pass over the whole expression is not causal, so ReCAT is a
sequence-level model (like ``encoder`` with its pooled head): the logits summarise everything
read so far, and the state is the segment itself, ``State(segment=[batch, t, d_model] (the token
embeddings read so far), start=int64 [batch] (where the current document starts in it))``; a call
recomputes the chart over the whole current document, so carrying the state across calls equals
one call on the concatenation (state_size grows as t * d_model: a chart needs its whole input).
``resets`` start a new document (its rows run in groups of equal document length).

Deviations from the paper and its reference code:
* pruning: the paper prunes the chart to O(n) cells with a separately trained top-down parser
  (Fast-R2D2's); here every span is kept and each composes only its ``topk`` best splits by the
  span scorer: O(n^2 topk) compositions and O(n^3) cheap dot products. No parser, so no parser
  loss; the scorer learns from the task loss through the soft weights w_k.
* the outside pass runs over the induced best tree only (O(n) compositions), not the whole
  pruned chart with softmax-weighted parents: the Transformer reads only the tree's nodes, and
  the tree is what the next layer's leaves are contextualised by.
* the span representations of every node join the tokens in the Backbone's ordinary attention
  (the paper adds span-level positions / relative positions in its Transformer); here the
  nodes' order (post-order after the tokens) and RoPE carry the structure.
* no masked-LM pretraining: trained on the task alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recur.layers.norms import build_norm
from recur.models.base import Architecture, ModelOutput, check_count, check_sizes, check_tokens
from recur.models.blocks import Backbone
from recur.registry import ARCHITECTURES
from recur.state import State

POOLS = ("root", "mean")
INSIDE_ROLES = (0, 1, 2)  # parent query, left child, right child
LEFT, RIGHT, PARENT = 0, 1, 2  # outside roles


class Compose(nn.Module):
    """A query attends over role-tagged context vectors, then an MLP (post-norm residuals):

        z = LN(q + r_q + MHA(q + r_q, C + r_C));   out = LN(z + W_2 gelu(W_1 z))
    """

    def __init__(self, d_model: int, n_heads: int = 2, ratio: float = 2.0, n_roles: int = 3):
        super().__init__()
        if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1 or d_model % n_heads:
            raise ValueError(f"compose_heads must be an int >= 1 dividing d_model={d_model}, got {n_heads!r}")
        self.n_heads = n_heads
        self.roles = nn.Embedding(n_roles, d_model)
        nn.init.normal_(self.roles.weight, std=0.02)
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.k = nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_model, bias=False)
        self.o = nn.Linear(d_model, d_model, bias=False)
        hidden = max(1, int(ratio * d_model))
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)

    def forward(self, query: torch.Tensor, query_role: torch.Tensor, context: torch.Tensor,
                context_roles: torch.Tensor) -> torch.Tensor:
        """query [..., d]; query_role int64 broadcastable to query's leading dims; context [..., m, d];
        context_roles int64 [m]. Returns [..., d]."""
        q = query + self.roles(query_role)
        c = context + self.roles(context_roles)
        *lead, d = q.shape
        hd = d // self.n_heads
        qh = self.q(q).reshape(*lead, self.n_heads, hd)  # [..., heads, hd]
        kh = self.k(c).reshape(*lead, c.shape[-2], self.n_heads, hd)  # [..., m, heads, hd]
        vh = self.v(c).reshape(*lead, c.shape[-2], self.n_heads, hd)
        att = torch.einsum("...hd,...mhd->...hm", qh, kh).div(math.sqrt(hd)).softmax(-1)
        z = self.norm1(q + self.o(torch.einsum("...hm,...mhd->...hd", att, vh).reshape(*lead, d)))
        return self.norm2(z + self.mlp(z))


class SpanScorer(nn.Module):
    """The pair score of adjacent spans: <phi_l(left), phi_r(right)> / sqrt(c), phi two-layer MLPs."""

    def __init__(self, d_model: int, score_dim: int):
        super().__init__()
        self.score_dim = score_dim
        self.left = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, score_dim))
        self.right = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, score_dim))


def inside(leaves: torch.Tensor, compose: Compose, scorer: SpanScorer, query: torch.Tensor, topk: int | None):
    """The pruned inside pass over leaves [b, n, d]. Returns (e, best): e[L] [b, n - L + 1, d] the
    span representations of length L (index 1..n; e[L][:, i] is span (i, i + L - 1)) and best[L]
    int64 [b, n - L + 1], the best tree's split of each span (its left part's length; 0 at L=1)."""
    b, n, d = leaves.shape
    e, a, viterbi, best = {1: leaves}, {1: leaves.new_zeros(b, n)}, {1: leaves.new_zeros(b, n)}, {}
    best[1] = torch.zeros(b, n, dtype=torch.int64, device=leaves.device)
    pl, pr = {1: scorer.left(leaves)}, {1: scorer.right(leaves)}
    roles = torch.tensor(INSIDE_ROLES, device=leaves.device)
    for L in range(2, n + 1):
        s = n - L + 1  # spans of length L: i = 0 .. n - L
        # split m: left (i, i + m - 1) of length m, right (i + m, i + L - 1) of length L - m
        pair = torch.stack([(pl[m][:, :s] * pr[L - m][:, m:m + s]).sum(-1) for m in range(1, L)], dim=2)
        pair = pair / math.sqrt(scorer.score_dim)  # [b, s, L - 1]
        total = pair + torch.stack([a[m][:, :s] + a[L - m][:, m:m + s] for m in range(1, L)], dim=2)
        tree = pair.detach() + torch.stack([viterbi[m][:, :s] + viterbi[L - m][:, m:m + s] for m in range(1, L)], 2)
        viterbi[L], arg = tree.max(dim=-1)
        best[L] = arg + 1
        if topk is not None and topk < L - 1:
            total, keep = total.topk(topk, dim=-1)  # [b, s, topk]
        else:
            keep = torch.arange(L - 1, device=leaves.device).expand(b, s, L - 1)
        # gather only the kept children (O(n^2 topk) vectors, not every split's)
        m = keep + 1
        i = torch.arange(s, device=leaves.device)[None, :, None]
        shorter = torch.cat([e[k] for k in range(1, L)], dim=1)  # every span of length < L
        rows = torch.arange(b, device=leaves.device)[:, None, None]
        left = shorter[rows, flat_index(n, i, m)]  # [b, s, K, d]
        right = shorter[rows, flat_index(n, i + m, L - m)]
        q = query.expand(*left.shape)
        composed = compose(q, roles[0], torch.stack([q, left, right], dim=-2), roles)  # [b, s, K, d]
        w = total.softmax(-1)
        e[L] = (w.unsqueeze(-1) * composed).sum(2)
        a[L] = (w * total).sum(-1)
        pl[L], pr[L] = scorer.left(e[L]), scorer.right(e[L])
    return e, best


def best_tree(best: dict[int, torch.Tensor], n: int) -> list[list[tuple[int, int, int, int]]]:
    """Each row's best tree in pre-order: (start, length, parent slot, role) per node, 2 n - 1 of
    them (the root's parent is -1)."""
    splits = {L: best[L].tolist() for L in best}
    rows = []
    for r in range(best[1].shape[0]):
        nodes, stack = [], [(0, n, -1, LEFT)]
        while stack:
            i, L, parent, role = stack.pop()
            slot = len(nodes)
            nodes.append((i, L, parent, role))
            if L > 1:
                m = splits[L][r][i]
                stack.append((i + m, L - m, slot, RIGHT))  # popped after the whole left subtree
                stack.append((i, m, slot, LEFT))
        rows.append(nodes)
    return rows


def flat_index(n: int, i: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Index of span (i, length L) in the lengths' concatenation cat(e[1], .., e[n])."""
    # lengths 1 .. L - 1 hold n + (n - 1) + .. + (n - L + 2) spans
    return (L - 1) * n - (L - 1) * (L - 2) // 2 + i


def internal_post_order(node: torch.Tensor) -> torch.Tensor:
    """The pre-order slots of each tree's internal nodes in post-order (children before parents, the
    root last): node int64 [b, 2 n - 1, 4] as ``CIOLayer`` returns it -> [b, n - 1]. Post-order of
    a binary tree's spans is the order by (end, length): a span ends after every span to its left
    and, among spans ending at the same token, contains the shorter ones."""
    n = (node.shape[1] + 1) // 2
    length = node[..., 1]
    end = node[..., 0] + length
    key = torch.where(length == 1, -1, end * (n + 1) + length)  # the n leaves sort first (dropped)
    return key.argsort(dim=1, stable=True)[:, n:]


class CIOLayer(nn.Module):
    """One contextual inside-outside layer: the pruned inside pass, the best tree, the outside pass."""

    def __init__(self, d_model: int, topk: int | None, score_dim: int, heads: int, ratio: float):
        super().__init__()
        self.topk = topk
        self.query = nn.Parameter(torch.randn(d_model) * 0.02)
        self.scorer = SpanScorer(d_model, score_dim)
        self.inside = Compose(d_model, heads, ratio)
        self.outside = Compose(d_model, heads, ratio)

    def forward(self, leaves: torch.Tensor):
        """leaves [b, n, d] -> (outside vectors [b, 2 n - 1, d] of the tree's nodes in pre-order,
        the tree's nodes per row as ``best_tree`` gives them)."""
        b, n, d = leaves.shape
        e, best = inside(leaves, self.inside, self.scorer, self.query, self.topk)
        flat = torch.cat([e[L] for L in range(1, n + 1)], dim=1)  # [b, n (n + 1) / 2, d]
        trees = best_tree(best, n)
        node = torch.tensor([[(i, L, p, role) for i, L, p, role in t] for t in trees], device=leaves.device)
        rows = torch.arange(b, device=leaves.device)
        inner = flat[rows[:, None], flat_index(n, node[..., 0], node[..., 1])]  # [b, 2n - 1, d]
        outs = [inner[:, 0]]  # o_root = e_root
        roles = torch.tensor((LEFT, RIGHT, PARENT), device=leaves.device)
        for t in range(1, 2 * n - 1):
            parent, role = node[:, t, 2], node[:, t, 3]
            # the parent's children: this node and its sibling, in left-right order
            sib_i = torch.where(role == LEFT, node[:, t, 0] + node[:, t, 1], node[rows, parent, 0])
            sib_L = node[rows, parent, 1] - node[:, t, 1]
            sibling = flat[rows, flat_index(n, sib_i, sib_L)]
            me = inner[:, t]
            is_left = (role == LEFT)[:, None]
            lr = torch.stack([torch.where(is_left, me, sibling), torch.where(is_left, sibling, me)], dim=1)
            o_parent = torch.stack(outs, dim=1)[rows, parent]
            outs.append(self.outside(me, role, torch.cat([lr, o_parent[:, None]], dim=1), roles))
        return torch.stack(outs, dim=1), node


@ARCHITECTURES.register("recat", family="structured output",
                        paper="Hu et al., Augmenting Transformers with Recursively Composed Multi-grained "
                              "Representations (ICLR 2024)")
class ReCAT(Architecture):
    """CIO layers compose spans over a pruned chart; the tokens and the best tree's nodes run through a Backbone.

    Embedding -> CIO layers -> [tokens; internal nodes in post-order] -> Backbone -> norm -> the
    sequence-level head at the root (or the mean).
    """

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, pattern="attention",
                 mixer_config: Mapping[str, Any] | None = None, mlp: str | None = "swiglu",
                 mlp_ratio: float = 4.0, norm: str = "rmsnorm", channel_options: Mapping[str, Any] | None = None,
                 cio_layers: int = 1, topk: int | None = 2, score_dim: int | None = None, compose_heads: int = 2,
                 compose_ratio: float = 2.0, pool: str = "root", n_classes: int | None = None):
        super().__init__()
        check_count("vocab_size", vocab_size, 2)
        check_sizes(d_model, mlp_ratio)
        check_count("cio_layers", cio_layers, 1)
        if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
            raise ValueError(f"topk (splits composed per span) must be an int >= 1 or None (all), got {topk!r}")
        score_dim = d_model if score_dim is None else score_dim
        if isinstance(score_dim, bool) or not isinstance(score_dim, int) or score_dim < 1:
            raise ValueError(f"score_dim must be an int >= 1 or None (d_model), got {score_dim!r}")
        if (isinstance(compose_ratio, bool) or not isinstance(compose_ratio, (int, float))
                or not math.isfinite(compose_ratio) or compose_ratio <= 0):
            raise ValueError(f"compose_ratio must be a finite number > 0, got {compose_ratio!r}")
        if pool not in POOLS:
            raise ValueError(f"recat pool must be one of {POOLS}, got {pool!r}")
        n_classes = vocab_size if n_classes is None else n_classes
        check_count("n_classes", n_classes, 2)
        self.vocab_size, self.n_classes, self.pool, self.d_model = vocab_size, n_classes, pool, d_model
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.cio = nn.ModuleList(CIOLayer(d_model, topk, score_dim, compose_heads, compose_ratio)
                                 for _ in range(cio_layers))
        self.backbone = Backbone(d_model, n_layers, pattern, mixer_config, mlp=mlp, mlp_ratio=mlp_ratio, norm=norm,
                                 channel_options=channel_options, causal=False)
        self.norm = build_norm(norm, d_model)
        self.head = nn.Linear(d_model, n_classes, bias=False)

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        dtype = dtype or self.embed.weight.dtype
        return State(segment=torch.zeros(batch_size, 0, self.d_model, device=device, dtype=dtype),
                     start=torch.zeros(batch_size, dtype=torch.int64, device=device))

    def state_size(self, seq_len: int) -> int:
        return seq_len * self.d_model

    def set_mode(self, mode: str) -> None:
        self.backbone.set_mode(mode)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Sequence-level logits [b, n_classes] of one document's embeddings x [b, n, d]."""
        b, n, _ = x.shape
        leaves = x
        for layer in self.cio:
            outside, node = layer(leaves)
            is_leaf = node[..., 1] == 1  # pre-order visits the leaves left to right
            leaves = outside[is_leaf].reshape(b, n, -1)
        order = internal_post_order(node)
        rows = torch.arange(b, device=x.device)[:, None]
        seq = torch.cat([leaves, outside[rows, order]], dim=1)  # [b, 2n - 1, d], the root last
        h, _ = self.backbone(seq, self.backbone.init_state(b, device=x.device, dtype=x.dtype))
        pooled = h[:, -1] if self.pool == "root" else h.mean(dim=1)
        return self.head(self.norm(pooled))

    def forward(self, tokens: torch.Tensor, state: State | None = None,
                resets: torch.Tensor | None = None) -> ModelOutput:
        """``resets`` bool [batch, time]: True where a packed document starts; the logits are those
        of each row's last document."""
        check_tokens(tokens, self.vocab_size)
        b, t = tokens.shape
        if state is None:
            state = self.init_state(b, device=tokens.device)
        elif (not isinstance(state, State) or set(state) != {"segment", "start"}
              or state["segment"].shape[0] != b or state["segment"].shape[2:] != (self.d_model,)):
            got = sorted(state) if isinstance(state, State) else type(state).__name__
            raise ValueError(f"recat state must be a State with entries ['segment' [batch, time, {self.d_model}], "
                             f"'start'] for {b} rows, got {got}")
        held = state["segment"].shape[1]
        segment = torch.cat([state["segment"], self.embed(tokens)], dim=1)
        start = state["start"]
        if resets is not None:
            pos = torch.arange(t, device=tokens.device)
            last = torch.where(resets, pos, -1).max(dim=1).values  # -1: no reset in this row
            start = torch.where(last >= 0, held + last, start)
        logits = segment.new_zeros(b, self.n_classes)
        for s in start.unique().tolist():  # rows whose current document starts at s run together
            rows = (start == s).nonzero(as_tuple=True)[0]
            logits = logits.index_put((rows,), self.encode(segment[rows, s:]))
        return ModelOutput(logits, State(segment=segment, start=start))

    def position_logits(self, out: ModelOutput, batch) -> torch.Tensor:
        # one label per sequence: the prediction stands at every position; the task scores it
        # where it supervises (its one position per row)
        return out.logits[:, None, :].expand(-1, batch.mask.shape[1], -1)

    def loss(self, out: ModelOutput, batch) -> torch.Tensor:
        per_row = batch.mask.sum(dim=1)
        if not bool((per_row == 1).all()):
            raise ValueError(f"recat predicts one label per sequence, but the task supervises "
                             f"{sorted(set(per_row.tolist()))} positions per row; use a task with one answer per "
                             f"row (nested_expressions, or e.g. parity with final_only=true)")
        return F.cross_entropy(out.logits.float() if out.logits.dtype not in (torch.float32, torch.float64)
                               else out.logits, batch.targets[batch.mask])

    @classmethod
    def example(cls, vocab_size: int, d_model: int) -> ReCAT:
        # attention's parallel mode is the fast path the suite compares with its recurrent reference;
        # topk=2 prunes (spans of length >= 4 have more splits) and keeps a gradient into the scorer
        return cls(vocab_size=vocab_size, d_model=d_model, n_layers=1, pattern="attention", topk=2)
