"""The architecture protocol (docs/design.md section 5), shared by every model above the mixer.

    out = model(inputs, state=None)          # ModelOutput(logits, state, aux); unpacks as logits, state
    loss = model.loss(out, batch)            # the head owns its loss (cross-entropy, CTC, pointer, ...)
    state = model.init_state(batch_size)
    model.state_size(seq_len)                # floats of memory per sequence after seq_len tokens
    model.stream(prompt, n) / model.generate(prompt, n)   # autoregressive architectures

``aux`` holds named auxiliary losses (already weighted, part of ``model.loss``) and diagnostics
(floats the Trainer logs). Architectures are registered in ``recur.registry.ARCHITECTURES`` and
built from a ``ModelConfig`` by ``from_config``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recur.layers.base import MODES, Mixer
from recur.state import State


@dataclass
class ModelOutput:
    """What an architecture returns. Unpacks as ``logits, state`` (as ``CausalLM`` always has)."""

    logits: torch.Tensor
    state: State | None
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    # Where the head was computed, when only some positions were asked for (``positions=`` of a
    # CausalLM call): bool [batch, time], and ``logits`` is then [N, classes], the rows of
    # ``full_logits[positions]`` in row-major order. None: ``logits`` covers every position.
    positions: torch.Tensor | None = None

    # The (logits, state) pair that CausalLM returned before ModelOutput: unpacking and indexing work.
    def __iter__(self) -> Iterator[Any]:
        return iter((self.logits, self.state))

    def __getitem__(self, index: int) -> Any:
        return (self.logits, self.state)[index]

    def __len__(self) -> int:
        return 2


def in_pieces(call, tokens: torch.Tensor, state: State | None, piece: int, resets: torch.Tensor | None = None,
              positions: torch.Tensor | None = None) -> ModelOutput:
    """``call(tokens, state, resets=, positions=)`` over consecutive pieces of ``piece`` tokens, the
    state carried from each to the next: by the state contract it equals one call on the whole
    input, while holding one piece's activations (a long evaluation at constant memory). Logits
    are joined as one call returns them (with ``positions``: the picked rows in row-major order)."""
    T = tokens.shape[1]
    logits = []  # only the logits are kept: each piece's state is dropped once the next has read it
    for a in range(0, T, piece):
        b = min(a + piece, T)
        out = call(tokens[:, a:b], state, resets=None if resets is None else resets[:, a:b],
                   positions=None if positions is None else positions[:, a:b])
        if out.aux:
            raise ValueError("in_pieces joins logits and state only; this model returned aux entries "
                             f"{sorted(out.aux)}")
        logits.append(out.logits)
        state = out.state
    if positions is None:
        return ModelOutput(torch.cat(logits, dim=1), state)
    # each piece's rows are row-major within the piece: order them by (row, time) over the whole call
    rows, times = positions.nonzero(as_tuple=True)  # row-major over the call
    piece_of = times // piece
    order = torch.argsort(piece_of * positions.numel() + rows * T + times)  # the pieces' order
    joined = torch.empty_like(torch.cat(logits))
    joined[order] = torch.cat(logits)
    return ModelOutput(joined, state, positions=positions)


def check_mode_name(mode: Any) -> None:
    """``mode`` must be one of the mixer modes (``set_mode`` leaves a mixer without it alone, but an
    unknown name is a typo, not a request)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; the modes are {', '.join(MODES)} (each mixer lists its own in .modes)")


def check_tokens(tokens: Any, vocab_size: int) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"tokens must be an integer tensor of shape [batch, time], got "
                        f"{getattr(tokens, 'dtype', type(tokens).__name__)}")
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape [batch, time], got {tuple(tokens.shape)}")
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got range [{int(tokens.min())}, {int(tokens.max())}]")


def masked_cross_entropy(logits: torch.Tensor, batch, picked: bool = False) -> torch.Tensor:
    """Mean cross-entropy over the supervised positions (``batch.mask``). ``picked``: ``logits``
    holds only those positions already ([N, classes], as ``ModelOutput.positions`` describes)."""
    mask = batch.mask
    if not mask.any():
        raise ValueError("a training batch has no supervised position (mask is all False)")
    picked = logits if picked else logits[mask]
    if picked.dtype not in (torch.float32, torch.float64):
        picked = picked.float()  # 16-bit logits: the loss in float32
    return F.cross_entropy(picked, batch.targets[mask])


def masked_squared_error(outputs: torch.Tensor, batch, picked: bool = False) -> torch.Tensor:
    """The regression head's loss: mean squared error over the supervised positions' real-valued
    targets (``batch.values`` [n, seq_len, k]), averaged over positions and the k outputs.
    ``picked``: ``outputs`` holds only those positions already ([N, k])."""
    mask = batch.mask
    if not mask.any():
        raise ValueError("a training batch has no supervised position (mask is all False)")
    picked = outputs if picked else outputs[mask]
    target = batch.values[mask]
    if picked.shape != target.shape:
        raise ValueError(f"the regression head gives {tuple(picked.shape[1:])} values per position, the task "
                         f"supervises {tuple(target.shape[1:])}")
    dtype = picked.dtype if picked.dtype in (torch.float32, torch.float64) else torch.float32
    return (picked.to(dtype) - target.to(dtype)).pow(2).mean()


def check_features(features: Any, tokens: torch.Tensor, feature_dim: int) -> None:
    """Real-valued inputs ``features`` [batch, time, feature_dim] beside ``tokens`` [batch, time]:
    given exactly when the model was built for them (``feature_dim`` > 0)."""
    if feature_dim == 0:
        if features is not None:
            raise ValueError("this model was built without real-valued inputs (feature_dim=0), but features were "
                             "given; build it for a task with features (task.model_io())")
        return
    if features is None:
        raise ValueError(f"this model reads real-valued inputs (feature_dim={feature_dim}): pass "
                         f"features=[batch, time, {feature_dim}] (batch.model_inputs() does)")
    if not isinstance(features, torch.Tensor) or not features.is_floating_point():
        raise TypeError(f"features must be a float tensor, got {getattr(features, 'dtype', type(features).__name__)}")
    if features.shape != (*tokens.shape, feature_dim):
        raise ValueError(f"features must have shape {(*tokens.shape, feature_dim)} (the tokens' shape and "
                         f"feature_dim), got {tuple(features.shape)}")


def check_positions(positions: Any, tokens: torch.Tensor) -> None:
    """``positions`` (where a head is asked for) is a bool tensor of the tokens' shape."""
    if not isinstance(positions, torch.Tensor) or positions.dtype != torch.bool or positions.shape != tokens.shape:
        raise ValueError(f"positions must be a bool tensor of the tokens' shape {tuple(tokens.shape)} (True where "
                         f"the head is computed), got {getattr(positions, 'dtype', type(positions).__name__)} "
                         f"{tuple(getattr(positions, 'shape', ()))}")


class Architecture(nn.Module, ABC):
    """Base class of the registered architectures."""

    name: str = "architecture"  # set by ARCHITECTURES.register
    autoregressive: bool = False  # True: stream / generate
    # True: forward takes ``positions=`` (bool [batch, time]) and computes the head only there. The
    # Trainer then asks for the supervised positions: tasks such as MQAR supervise a few positions
    # of many, and at a paper's vocabulary (8192) the head and its loss over every position cost
    # more than the rest of the model (measured: 448 against 101 ms per training step).
    sparse_head: bool = False
    # The attribute that sets how many iterations a depth-recurrent model runs at evaluation (settable
    # after training: ``eval.loops`` evaluates at several values); None: a fixed-depth architecture.
    depth_option: str | None = None
    vocab_size: int

    # -- to implement ---------------------------------------------------------
    @abstractmethod
    def forward(self, inputs: torch.Tensor, state: State | None = None,
                resets: torch.Tensor | None = None) -> ModelOutput:
        """The model on ``inputs`` from ``state`` (None: the zero state). ``resets`` (bool [batch,
        time], optional): True where a packed document starts; the output from there on is the
        model's on that document alone (``recur.layers.packing``)."""

    @abstractmethod
    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        """The zero state for ``batch_size`` sequences."""

    @abstractmethod
    def state_size(self, seq_len: int) -> int:
        """Floats of memory per sequence after ``seq_len`` tokens."""

    @property
    def segmentable(self) -> bool:
        """True when the logits are per position and causal, so reading a sequence in segments with
        the carried state gives the same logits (what truncated BPTT needs)."""
        return self.autoregressive

    @property
    def mixers(self) -> list[Mixer]:
        """Every token mixer the model runs, in order (a shared one once per use)."""
        return [m for m in self.modules() if isinstance(m, Mixer)]

    # -- shared ---------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def set_mode(self, mode: str) -> None:
        """Use ``mode`` in every mixer that supports it (others keep theirs)."""
        check_mode_name(mode)
        for m in self.mixers:
            if mode in m.modes:
                m.mode = mode

    def position_logits(self, out: ModelOutput, batch) -> torch.Tensor:
        """Logits per position, [batch, time, classes] (for an output computed at every position)."""
        if out.positions is not None:
            raise ValueError("this output holds logits at some positions only (positions=...); "
                             "use supervised_logits or predictions, or call the model without positions")
        return out.logits

    def supervised_logits(self, out: ModelOutput, batch) -> torch.Tensor:
        """Logits at the supervised positions, [N, classes] in row-major order (``logits[batch.mask]``)."""
        if out.positions is None:
            return self.position_logits(out, batch)[batch.mask]
        if out.positions is not batch.mask and not torch.equal(out.positions, batch.mask):
            raise ValueError("the output's logits were computed at other positions than the batch supervises")
        return out.logits

    def predictions(self, out: ModelOutput, batch) -> torch.Tensor:
        """The predicted class per position, int64 [batch, time], for ``task.score_predictions``; with
        ``out.positions``, positions outside it hold 0 (no task reads them: they are not supervised)."""
        if out.positions is None:
            return self.position_logits(out, batch).argmax(-1)
        pred = torch.zeros(batch.mask.shape, dtype=torch.int64, device=out.logits.device)
        pred[batch.mask] = self.supervised_logits(out, batch).argmax(-1)
        return pred

    def loss(self, out: ModelOutput, batch) -> torch.Tensor:
        """The model's objective: the head's loss plus its weighted auxiliary losses."""
        return self.head_loss(out, batch) + self.aux_loss(out)

    def head_loss(self, out: ModelOutput, batch) -> torch.Tensor:
        """Masked cross-entropy of the head; the squared error of a regression head, on a task with
        real-valued targets (``batch.values``)."""
        loss = masked_cross_entropy if batch.values is None else masked_squared_error
        return loss(self.supervised_logits(out, batch), batch, picked=True)

    @staticmethod
    def aux_loss(out: ModelOutput) -> torch.Tensor | float:
        """The sum of the output's already-weighted auxiliary losses (``aux`` keys ending in ``_loss``)."""
        return sum((value for key, value in out.aux.items() if key.endswith("_loss")), 0.0)

    @classmethod
    def from_config(cls, config, vocab_size: int, **io: int) -> Architecture:
        """Build from a ``recur.config.ModelConfig``: the shared sizes and block parts, plus the
        architecture's own options (``config.args``) as keyword arguments. ``io``: the task's
        ``model_io()`` (``feature_dim``, ``target_dim``: real-valued inputs, a regression head)."""
        config = _model_config(config)
        b = config.block
        return cls(vocab_size=vocab_size, d_model=config.d_model, n_layers=config.n_layers, pattern=config.mixer,
                   mixer_config=config.mixer_args, mlp=b.mlp, mlp_ratio=b.ratio, norm=b.norm,
                   channel_options=b.mlp_args, **{**cls.tie_option(config), **cls.io_options(io), **config.args})

    @classmethod
    def io_options(cls, io: dict[str, int]) -> dict[str, int]:
        """The task's real-valued inputs and outputs (``Task.model_io``) as keywords of this
        architecture; one whose constructor does not take them cannot serve the task."""
        import inspect

        params = inspect.signature(cls.__init__).parameters
        io = {k: v for k, v in io.items() if k != "sep" or "sep" in params}  # only an encoder-decoder splits there
        missing = [k for k, v in io.items() if v and k not in params]
        if missing:
            raise ValueError(f"architecture {cls.name!r} has no {' or '.join(missing)} (real-valued "
                             f"{'inputs' if missing == ['feature_dim'] else 'inputs or outputs'}); the task needs "
                             f"{', '.join(f'{k}={io[k]}' for k in missing)}: use causal_lm or looped_lm")
        return {k: v for k, v in io.items() if v or k == "sep"}

    @classmethod
    def tie_option(cls, config) -> dict[str, Any]:
        """``model.tie_embeddings`` as a keyword of this architecture: passed where the constructor
        takes it; elsewhere (no head shares the embedding) only False is meaningful."""
        import inspect

        if "tie_embeddings" in inspect.signature(cls.__init__).parameters:
            return {"tie_embeddings": config.tie_embeddings}
        if config.tie_embeddings:
            raise ValueError(f"model.tie_embeddings=true, but architecture {cls.name!r} has no output head "
                             "that could share the token embedding")
        return {}

    @classmethod
    def example(cls, vocab_size: int, d_model: int) -> Architecture:
        """A small instance with fast modes, for the architecture conformance tests."""
        return cls(vocab_size=vocab_size, d_model=d_model, n_layers=2, pattern="gla")


def _model_config(config: Any):
    """``config`` as a ``recur.config.ModelConfig`` (a dict is validated into one)."""
    from recur.config import ModelConfig, config_problems
    from pydantic import ValidationError

    if isinstance(config, ModelConfig):
        return config
    if isinstance(config, dict):
        try:
            return ModelConfig.model_validate(config)
        except ValidationError as e:
            raise ValueError(f"bad model config: {config_problems(e)}") from None
    raise TypeError(f"from_config takes a recur.config.ModelConfig (or its dict), got {type(config).__name__}")


class Generator:
    """Streaming generation for autoregressive architectures (mixed into them)."""

    vocab_size: int

    @torch.no_grad()
    def stream(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
               state: State | None = None, generator: torch.Generator | None = None,
               attention_mask: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """Yield new tokens ([batch] each) one at a time.

        The prompt is read in one call (fast mode); each new token is then one step with the
        carried state, so recurrent models generate in constant memory and attention uses its
        KV cache. ``temperature=0`` is greedy; otherwise sample, optionally from the top-k logits.
        ``attention_mask`` [batch, time] (1/True: a token, 0/False: padding) batches prompts of
        different lengths, padded on the left: each row's state is reset at its first token, so
        pad tokens never enter it and every row generates what its prompt alone would.
        """
        if getattr(self, "target_dim", 0):
            raise ValueError(f"this model has a regression head (target_dim={self.target_dim}): it predicts real "
                             "values, not tokens, so it cannot generate")
        check_sampling(max_new_tokens, temperature, top_k, self.vocab_size)
        check_tokens(prompt, self.vocab_size)
        if prompt.shape[1] == 0:
            raise ValueError(f"the prompt must hold at least one token per row, got shape {tuple(prompt.shape)}")
        resets = None if attention_mask is None else left_padding_resets(attention_mask, prompt, state)
        logits, state = self(prompt, state) if resets is None else self(prompt, state, resets=resets)
        last = logits[:, -1]
        for _ in range(max_new_tokens):
            token = _sample(last, temperature, top_k, generator)
            yield token
            logits, state = self(token[:, None], state)
            last = logits[:, -1]

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The prompt followed by ``max_new_tokens`` generated tokens: int64 [batch, time + new].
        ``attention_mask``: left-padded prompts (see ``stream``)."""
        new = list(self.stream(prompt, max_new_tokens, temperature, top_k, generator=generator,
                               attention_mask=attention_mask))
        return torch.cat([prompt, torch.stack(new, dim=1)], dim=1) if new else prompt.clone()


def check_count(name: str, value: Any, low: int) -> int:
    """``value`` if it is an int >= ``low`` (not a bool), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def check_sizes(d_model, mlp_ratio=4.0) -> None:
    """The sizes every architecture shares: d_model an int >= 1, mlp_ratio a finite number > 0."""
    if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
        raise ValueError(f"d_model must be a positive int, got {d_model!r}")
    if (isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not math.isfinite(mlp_ratio)
            or mlp_ratio <= 0):
        raise ValueError(f"mlp_ratio must be a finite number > 0 (the channel mixer's width over d_model), got {mlp_ratio!r}")


def left_padding_resets(attention_mask: torch.Tensor, prompt: torch.Tensor, state: State | None) -> torch.Tensor:
    """The resets that start each row at its first real token of a left-padded prompt."""
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(prompt.shape):
        raise ValueError(f"attention_mask must be a tensor of the prompt's shape {tuple(prompt.shape)} (1: token, "
                         f"0: left padding), got {tuple(getattr(attention_mask, 'shape', ())) or type(attention_mask).__name__}")
    if attention_mask.dtype != torch.bool and (attention_mask.is_floating_point() or attention_mask.is_complex()
                                               or not bool(((attention_mask == 0) | (attention_mask == 1)).all())):
        raise ValueError("attention_mask must hold only 0/1 (or False/True)")
    real = attention_mask.to(device=prompt.device, dtype=torch.bool)
    if not bool(real[:, -1].all()) or bool((real[:, :-1] & ~real[:, 1:]).any()):
        raise ValueError("attention_mask must pad on the left only: each row is 0 ... 0 1 ... 1, ending in a token")
    first = torch.cat([real[:, :1], real[:, 1:] & ~real[:, :-1]], dim=1)
    if state is not None and not bool(real.all()):
        raise ValueError("a left-padded prompt (attention_mask with zeros) starts each row from the initial state: "
                         "it cannot continue a given state")
    return first


def check_sampling(max_new_tokens: Any, temperature: Any, top_k: Any, vocab_size: int) -> None:
    """The generation options: an int max_new_tokens >= 0, a finite temperature >= 0 (0: greedy) and
    top_k None or an int in [1, vocab_size]; anything else is a TypeError / ValueError saying so."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(max_new_tokens):
        raise TypeError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r} ({type(max_new_tokens).__name__})")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if isinstance(temperature, torch.Tensor) and temperature.numel() == 1:
        temperature = temperature.item()
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r} ({type(temperature).__name__})")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if top_k is not None and not is_int(top_k):
        raise TypeError(f"top_k must be None or an int in [1, {vocab_size}], got {top_k!r} ({type(top_k).__name__})")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k must be in [1, {vocab_size}], got {top_k}")


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
