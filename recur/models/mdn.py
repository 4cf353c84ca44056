"""``mdn``: a causal model over a pen-stroke stream with the mixture-density output of Graves (2013),
"Generating Sequences With Recurrent Neural Networks" (section 4; the unconditional handwriting
model), as Sketch-RNN (Ha & Eck 2017) also uses it.

    h_t = Backbone(E tok_t + W_in x_t)                    any registered mixer; an LSTM by default
    y_t = W norm(h_t) + b = (e^, pi^_{1..M}, mu^x, mu^y, sigma^x, sigma^y, rho^)   1 + 6M reals
    e = sigmoid(e^)                                       P(the pen lifts after the next point)
    pi = softmax(pi^ (1 + b)),  mu = mu^,  sigma = exp(sigma^ - b),  rho = tanh(rho^)
    -log p(x_{t+1}) = -log sum_j pi_j N2(dx, dy | mu_j, sigma_j, rho_j) - log(e if pen else 1 - e)
    log N2 = -log(2 pi sx sy sqrt(1 - rho^2)) - Z / (2 (1 - rho^2)),
    Z = ((dx - mx)/sx)^2 + ((dy - my)/sy)^2 - 2 rho (dx - mx)(dy - my) / (sx sy)

computed in log space: log pi by log_softmax, log sigma = sigma^ - b without an exp, the sum over
the components by logsumexp, the pen term as a binary cross-entropy on the logit e^. b is the
sampling bias (0 in training; b = 1-2 gives cleaner, less varied samples). ``sample_strokes``
draws points one at a time with the carried state (constant memory); ``plot_strokes`` draws them.

Inputs: the ``strokes`` task's points x_t = (dx, dy, pen) (``feature_dim = 3``) next to its slot
tokens (START / POINT / PAD), and the next point as the target (``batch.values``, ``target_dim =
3``). The head's width is 1 + 6M whatever ``target_dim``: it parameterises a density over the
3-value point, so ``target_dim`` must be 3 (or 0, below). A token stream without real values
(``feature_dim = 0``, ``target_dim = 0``) is read as a Freeman chain code: token v is the unit step
in direction 45 deg x (v mod 8), the pen lifting after it when v // 8 is odd; the targets' codes are
then the points the loss scores. That is the reading the architecture suite's random-token batches
get, so its loss test exercises this head as it is.

Deviations from the paper: the backbone is recur's pre-norm residual stack (its residual path
stands in for Graves's skip connections from the input to every layer and from every layer to the
output); e = sigmoid(e^) where Graves writes 1 / (1 + exp(e^)) (the sign convention of every
reimplementation, hardmaru's write-rnn-tensorflow and sketch-rnn); rho is clipped to
+-(1 - 1e-5) as those implementations do (1 - rho^2 would underflow); gradients are clipped by norm
by the Trainer (``optim.grad_clip``), not per output (+-100) and per LSTM cell (+-10). The model
generates points, not tokens (``autoregressive = False``: ``generate`` is for token heads), but it
is causal per position, so truncated BPTT may segment it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from recur.layers.common import positive_int
from recur.models.causal_lm import CausalLM, build_lm_layers
from recur.registry import ARCHITECTURES

RHO_CLIP = 1.0 - 1e-5
POINT_DIM = 3  # (dx, dy, pen)
# Freeman's chain code: the unit step of each direction, 45 degrees apart, counter-clockwise from +x
CHAIN_STEPS = ((1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1))


def split_params(params: torch.Tensor, mixtures: int) -> tuple[torch.Tensor, ...]:
    """``params`` [..., 1 + 6M] as (e^ [...], pi^, mu^x, mu^y, sigma^x, sigma^y, rho^ [..., M] each)."""
    if params.shape[-1] != 1 + 6 * mixtures:
        raise ValueError(f"a mixture of {mixtures} needs 1 + 6 x {mixtures} = {1 + 6 * mixtures} parameters per "
                         f"point, got {params.shape[-1]}")
    e_hat = params[..., 0]
    return (e_hat, *params[..., 1:].unflatten(-1, (6, mixtures)).unbind(-2))


def mixture_coefficients(params: torch.Tensor, mixtures: int, bias: float = 0.0) -> dict[str, torch.Tensor]:
    """The head's outputs as distribution parameters: ``pen_logit`` (e = sigmoid of it), ``log_pi``
    (log softmax of pi^ (1 + b)), ``mu`` [..., M, 2], ``log_sigma`` [..., M, 2] (sigma^ - b) and ``rho``
    [..., M] (tanh, clipped)."""
    e_hat, pi_hat, mx, my, sx, sy, rho_hat = split_params(params, mixtures)
    return {"pen_logit": e_hat, "log_pi": torch.log_softmax(pi_hat * (1 + bias), dim=-1),
            "mu": torch.stack([mx, my], dim=-1), "log_sigma": torch.stack([sx, sy], dim=-1) - bias,
            "rho": torch.tanh(rho_hat).clamp(-RHO_CLIP, RHO_CLIP)}


def mixture_nll(params: torch.Tensor, target: torch.Tensor, mixtures: int,
                bias: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-point negative log-likelihoods (nats) of ``target`` [..., 3] = (dx, dy, pen in {0, 1})
    under the head's ``params`` [..., 1 + 6M]: (the offsets' mixture term, the pen term), [...] each."""
    c = mixture_coefficients(params, mixtures, bias)
    z = (target[..., None, :2] - c["mu"]) * torch.exp(-c["log_sigma"])  # standardised, [..., M, 2]
    rho = c["rho"]
    one_minus = 1 - rho * rho
    zz = z[..., 0] ** 2 + z[..., 1] ** 2 - 2 * rho * z[..., 0] * z[..., 1]
    log_n2 = (-math.log(2 * math.pi) - c["log_sigma"].sum(-1) - 0.5 * torch.log(one_minus)
              - zz / (2 * one_minus))
    offset = -torch.logsumexp(c["log_pi"] + log_n2, dim=-1)
    pen = F.binary_cross_entropy_with_logits(c["pen_logit"], target[..., 2].to(params.dtype), reduction="none")
    return offset, pen


def chain_code_points(tokens: torch.Tensor) -> torch.Tensor:
    """The point (dx, dy, pen) of each chain-code token (see the module docstring), float [..., 3]."""
    steps = torch.tensor(CHAIN_STEPS, dtype=torch.float64, device=tokens.device)[tokens % 8]
    return torch.cat([steps, ((tokens // 8) % 2).to(torch.float64)[..., None]], dim=-1)


@ARCHITECTURES.register("mdn", family="structured output",
                        paper="Graves, Generating Sequences With Recurrent Neural Networks (2013)")
class MDN(CausalLM):
    """A causal model over pen points whose head is a bivariate Gaussian mixture plus the pen bit."""

    autoregressive = False  # it generates points (sample_strokes), not tokens
    sparse_head = False  # the head is 1 + 6M wide: cheap at every position

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, pattern="lstm",
                 mixer_config: Mapping[str, Any] | None = None, mlp: str | None = "swiglu",
                 mlp_ratio: float = 4.0, norm: str = "rmsnorm", channel_options: Mapping[str, Any] | None = None,
                 shared_blocks: int | None = None, mixtures: int = 20, feature_dim: int = 0, target_dim: int = 0):
        mixtures = positive_int("mixtures", mixtures)
        if feature_dim not in (0, POINT_DIM) or isinstance(feature_dim, bool):
            raise ValueError(f"feature_dim must be 3 (points (dx, dy, pen) as inputs) or 0 (a chain-code token "
                             f"stream), got {feature_dim!r}")
        if target_dim not in (0, POINT_DIM) or isinstance(target_dim, bool):
            raise ValueError(f"target_dim must be 3 (the next point (dx, dy, pen), scored by the mixture density) or "
                             f"0 (a chain-code token stream), got {target_dim!r}")
        super(CausalLM, self).__init__()
        # the head is linear onto the 1 + 6M mixture parameters (a bias, no tying), not onto target_dim
        build_lm_layers(self, vocab_size, d_model, n_layers, pattern, mixer_config, mlp, mlp_ratio, False, norm,
                        channel_options, shared_blocks, feature_dim=feature_dim, target_dim=1 + 6 * mixtures)
        self.mixtures = mixtures
        self.target_dim = target_dim  # what the task supervises: the point the density is over

    @classmethod
    def example(cls, vocab_size: int, d_model: int) -> MDN:
        """One GLA layer (a chunked fast mode) over a chain-code token stream, a mixture of 3."""
        return cls(vocab_size=vocab_size, d_model=d_model, n_layers=1, pattern="gla", mixtures=3)

    @property
    def segmentable(self) -> bool:
        return True  # causal per position: a stream read in segments with the state gives the same outputs

    def targets_of(self, batch) -> torch.Tensor:
        """The supervised points, [N, 3]: the task's ``values``, or a token stream's chain code."""
        if batch.values is not None:
            target = batch.values[batch.mask]
            if target.shape[-1] != POINT_DIM:
                raise ValueError(f"mdn scores points (dx, dy, pen): the task supervises {target.shape[-1]} values "
                                 "per position, not 3")
            return target
        return chain_code_points(batch.targets[batch.mask])

    def point_nll(self, out, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The NLLs of the supervised points (the offsets' and the pen's), [N] each, in float32 or
        wider."""
        if not batch.mask.any():
            raise ValueError("a training batch has no supervised position (mask is all False)")
        params = self.supervised_logits(out, batch)
        if params.dtype not in (torch.float32, torch.float64):
            params = params.float()  # 16-bit outputs: the density in float32
        return mixture_nll(params, self.targets_of(batch).to(params.dtype), self.mixtures)

    def head_loss(self, out, batch) -> torch.Tensor:
        offset, pen = self.point_nll(out, batch)
        return (offset + pen).mean()

    def predictions(self, out, batch) -> torch.Tensor:
        raise ValueError("mdn predicts a density over the next point, not a token: score it by likelihood "
                         "(point_nll; the strokes task's score_output)")

    def stream(self, *args, **kwargs):
        raise ValueError("mdn generates points, not tokens: use recur.models.mdn.sample_strokes(model, n_points, "
                         "bias=...)")


@torch.no_grad()
def sample_strokes(model: MDN, n_points: int, bias: float = 0.0, n: int = 1,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Unconditional samples: ``n`` sequences of ``n_points`` points (dx, dy, pen), float [n, n_points, 3].

    Each step feeds the last point (the ``strokes`` task's START (0, 0, 1) first) with the carried
    state, so memory stays constant in ``n_points``; the point is drawn from the mixture with bias b
    (a component j ~ pi, then (dx, dy) ~ N2(mu_j, sigma_j, rho_j)) and the pen from Bernoulli(e)."""
    from recur.tasks.strokes import POINT, START, START_POINT

    n_points, n = positive_int("n_points", n_points), positive_int("n", n)
    if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias) or bias < 0:
        raise ValueError(f"bias must be a finite number >= 0 (0: the trained density), got {bias!r}")
    if getattr(model, "feature_dim", 0) != POINT_DIM:
        raise ValueError("sample_strokes feeds points back as inputs: it needs an mdn built for the strokes task "
                         "(feature_dim=3)")
    was_training = model.training
    model.eval()
    device, dtype = model.embed.weight.device, model.dtype
    token = torch.full((n, 1), START, dtype=torch.int64, device=device)
    point = torch.tensor(START_POINT, dtype=dtype, device=device).expand(n, 1, POINT_DIM).clone()
    state, out = None, torch.empty(n, n_points, POINT_DIM, dtype=dtype, device=device)
    for t in range(n_points):
        y, state = model(token, state, features=point)
        c = mixture_coefficients(y[:, -1], model.mixtures, bias)
        j = torch.multinomial(c["log_pi"].exp(), 1, generator=generator)[:, 0]
        rows = torch.arange(n, device=device)
        mu, sigma, rho = c["mu"][rows, j], c["log_sigma"][rows, j].exp(), c["rho"][rows, j]
        z = torch.randn(n, 2, generator=generator, device=device, dtype=dtype)
        dx = mu[:, 0] + sigma[:, 0] * z[:, 0]
        dy = mu[:, 1] + sigma[:, 1] * (rho * z[:, 0] + torch.sqrt(1 - rho * rho) * z[:, 1])
        pen = (torch.rand(n, generator=generator, device=device, dtype=dtype)
               < torch.sigmoid(c["pen_logit"])).to(dtype)
        out[:, t] = torch.stack([dx, dy, pen], dim=1)
        point, token = out[:, t:t + 1], torch.full((n, 1), POINT, dtype=torch.int64, device=device)
    model.train(was_training)
    return out


def stroke_lines(points: torch.Tensor) -> list[torch.Tensor]:
    """The pen-down polylines of one sequence of points (dx, dy, pen) [L, 3]: positions are the running
    sum of the offsets; a polyline ends at a point whose pen bit lifts."""
    xy = points[:, :2].double().cumsum(0)
    ends = (points[:, 2] > 0.5).nonzero().flatten().tolist()
    lines, start = [], 0
    for end in ends + [len(points) - 1]:
        if end >= start:
            lines.append(xy[start:end + 1])
        start = end + 1
    return [line for line in lines if len(line)]


def plot_strokes(strokes: torch.Tensor, path, columns: int = 8, title: str | None = None) -> None:
    """Draw each sequence of ``strokes`` [n, L, 3] (offsets, as ``sample_strokes`` or the ``strokes``
    task's values give them) in its own panel of a grid, and save the figure to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strokes = strokes.detach().cpu()
    n = len(strokes)
    cols = min(positive_int("columns", columns), n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.6 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < n:
            for line in stroke_lines(strokes[i]):
                ax.plot(line[:, 0], line[:, 1], "k-", linewidth=1.2) if len(line) > 1 else \
                    ax.plot(line[:, 0], line[:, 1], "k.", markersize=2)
            ax.set_aspect("equal", adjustable="datalim")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
