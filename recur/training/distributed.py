"""Data-parallel training over several processes (DDP), launched by torchrun.

    torchrun --standalone --nproc-per-node 2 -m recur run --task mqar --model gla --batch-size 64
    with distributed.session(cfg.device) as dist:       # None unless launched with WORLD_SIZE > 1
        result = train(cfg, dist=dist)

The run equals the one-process run of the same config (same global batch), to float32 tolerance:

* ``optim.batch_size`` is the global batch B; each of the W ranks trains on b = B / W rows (B must
  be a multiple of W). Every rank draws the same global batch from the run's data stream (seeded from
  the run's seed, in the same state on every rank) and keeps rows [r b, (r + 1) b): the ranks' streams
  are disjoint, derived from the run's seed, and together they are the one-process run's batches.
  Initial states (``state_noise``, a carried state) are those of the global batch, sliced the same
  way; a state a method carries to the next step (``state_passing``) is gathered from every rank, so
  each rank holds the global one, as one process would. Drawing the global batch costs every rank
  the data generation of B rows (cheap next to the model for recur's tasks) and buys exactness.
* The loss is the global mean over supervised positions, also when masks differ between rows. The
  model's loss is a mean over the rank's n_r supervised positions; the rank backpropagates
  ``loss * n_r * W / N`` (N: the global count, which every rank knows from the global batch) and
  DDP averages the gradients over the W ranks: sum_r (n_r / N) grad(mean_r) = grad(global mean).
  Auxiliary terms (a model's ``*_loss`` entries, a method's regulariser) get the same weights, i.e.
  their supervised-count-weighted mean over ranks, which equals one process's value for terms that
  are means over supervised positions and approximates others.
* ``DistributedDataParallel`` all-reduces the gradients during the backward (gloo on CPU, NCCL on
  GPUs with device cuda:LOCAL_RANK; nothing else changes between the two). ``find_unused_parameters``
  is off: every parameter of recur's architectures takes part in the loss (checked after the first
  step, with an error that names the parameters), so DDP need not walk the autograd graph each step.
  A training method that owns the forward and backward passes (``tbptt``) runs them on the unwrapped
  model, where DDP's hooks do nothing, and the trainer then all-reduces those gradients with the
  same weights.
* Everything after the gradient reduction is the same on every rank: gradient noise is drawn from the
  run's own stream (same state everywhere), clipping sees the same gradients, AdamW holds the same
  state. The training loss and accuracy are reduced (weighted by supervised counts), so the loss
  curve, the early-stop window and its decision are the global ones, identical on every rank.
* Evaluation is shared: every rank draws every eval batch (the streams stay one process's) and scores
  the batches i with i mod W == r; the scores are gathered and averaged in batch order, so every rank
  holds the metrics one process would (to float tolerance of the parameters) and no rank idles at a
  barrier while another evaluates.
* Rank 0 alone prints progress, writes checkpoints (the others wait at a barrier until it is on
  disk), tracks (``recur.tracking``) and, in ``recur run``, writes the results store. Every rank reads
  a checkpoint to resume. As data, initial states and carried states are those of the global batch,
  a checkpoint written at one world size resumes at any other (one process included).

The config hash does not change: a DDP run with global batch B is the run of its config (the same
data, the same gradients in exact arithmetic, results equal to float32 tolerance from the order of the
reductions, the same kind of difference as device "auto" resolving to a CPU or a GPU, which the hash
does not tell apart either). The world size is recorded beside the run, in ``RunResult.info``
(``{"world_size": W}``, the store's run_info table).

Not covered: random draws from torch's global stream inside a forward (dropout; recur's models have
none) would be drawn per rank, not as one process draws them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist

from recur.state import State


def _config_error(message: str) -> Exception:
    from recur.training.trainer import ConfigError

    return ConfigError(message)


@dataclass(frozen=True)
class Distributed:
    """This process's place in a data-parallel run: its rank among ``world_size`` processes, its
    device and the process group's backend."""

    rank: int
    world_size: int
    local_rank: int
    backend: str  # "gloo" or "nccl"
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, checkpoints, tracks and writes the store."""
        return self.rank == 0

    # -------------------------------------------------------------- data
    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of ``batch_size`` sequences."""
        if batch_size % self.world_size:
            raise _config_error(f"optim.batch_size={batch_size} is the global batch and must be a multiple of the "
                                f"number of processes ({self.world_size}); e.g. "
                                f"{self.world_size * max(1, round(batch_size / self.world_size))}")
        b = batch_size // self.world_size
        return slice(self.rank * b, (self.rank + 1) * b)

    def shard(self, batch):
        """This rank's rows of a global ``Batch`` (every tensor field sliced along the batch)."""
        rows = self.rows(batch.inputs.shape[0])
        return dataclasses.replace(batch, **{f.name: getattr(batch, f.name)[rows] for f in dataclasses.fields(batch)
                                             if isinstance(getattr(batch, f.name), torch.Tensor)})

    def shard_state(self, state: State) -> State:
        """This rank's rows of a global-batch ``State``."""
        return state.select(self.rows(state.batch_size))

    def gather_state(self, state: State) -> State:
        """The global-batch State from every rank's rows (rank order: rows as one process has them)."""
        def gather(t: torch.Tensor) -> torch.Tensor:
            t = t.detach().contiguous()
            flat = t.view(torch.uint8) if t.dtype == torch.bool else t
            flat = torch.view_as_real(flat) if flat.is_complex() else flat
            parts = [torch.empty_like(flat) for _ in range(self.world_size)]
            torch_dist.all_gather(parts, flat)
            out = torch.cat(parts, dim=0)
            out = torch.view_as_complex(out) if t.is_complex() else out
            return out.view(torch.bool) if t.dtype == torch.bool else out

        return state.map(gather)

    # -------------------------------------------------------------- reductions
    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks of a few floats (float64, on this rank's device)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(t)
        return t.tolist()

    def sum_gradients(self, params: list[torch.nn.Parameter], weight: float) -> None:
        """``grad <- sum over ranks of weight_r * grad_r`` for every parameter with a gradient, in one
        all-reduce. Which parameters have one is the same on every rank (the same model and passes); a
        parameter without one keeps None, so AdamW skips it as one process would."""
        params = [p for p in params if p.grad is not None]
        if not params:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params]) * weight
        torch_dist.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if "nccl" in self.backend:
            torch_dist.barrier(device_ids=[self.device.index])
        else:
            torch_dist.barrier()

    # -------------------------------------------------------------- the model
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model in ``DistributedDataParallel`` (parameters broadcast from rank 0: they are the
        same anyway, every rank built the model from the run's seed)."""
        if not torch_dist.is_available() or not torch_dist.is_initialized():
            raise _config_error("a distributed run needs a process group: launch with torchrun and open "
                                "recur.training.distributed.session() (recur run does)")
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)


# ------------------------------------------------------------------ launching
def launched() -> dict[str, int] | None:
    """torchrun's RANK, WORLD_SIZE and LOCAL_RANK (and LOCAL_WORLD_SIZE) when this process is one of
    several; None for a single process (no torchrun, or one process)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise _config_error(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None
    if world <= 1:
        return None
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise _config_error(f"WORLD_SIZE={world} but {', '.join(missing)} unset: launch with torchrun "
                            "(e.g. torchrun --standalone --nproc-per-node 2 -m recur run ...)")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return {"rank": int(os.environ["RANK"]), "world_size": world, "local_rank": int(os.environ["LOCAL_RANK"]),
            "local_world_size": local_world}


def resolve_rank_device(device: str, local_rank: int) -> torch.device:
    """The device of the rank with ``local_rank``: its own GPU, cuda:LOCAL_RANK, for "auto" (when CUDA
    is available) and "cuda"; the CPU for "cpu"."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise _config_error(f"distributed runs use cpu (gloo) or cuda (NCCL) devices, got {device!r}")
    if not torch.cuda.is_available():
        raise _config_error(f"device {device!r} asked for, but CUDA is not available")
    if dev.index is not None:
        raise _config_error(f"under torchrun every rank uses its own GPU, cuda:LOCAL_RANK; give device 'cuda' or "
                            f"'auto', not {device!r} (choose GPUs with CUDA_VISIBLE_DEVICES)")
    if local_rank >= torch.cuda.device_count():
        raise _config_error(f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible; start at most "
                            "that many processes per node")
    return torch.device("cuda", local_rank)


def current(device: str = "auto") -> Distributed | None:
    """The Distributed of a process group someone already started (None: none, or one process)."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()) or torch_dist.get_world_size() == 1:
        return None
    local = int(os.environ.get("LOCAL_RANK", torch_dist.get_rank()))
    backend = str(torch_dist.get_backend())
    dev = resolve_rank_device("cuda" if "nccl" in backend else device, local)
    return Distributed(torch_dist.get_rank(), torch_dist.get_world_size(), local, backend, dev)


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[Distributed | None]:
    """The process group of a torchrun launch, open for the block and destroyed after it (on errors too).

    Yields None when this process is alone (no torchrun, or ``--nproc-per-node 1``), so callers
    run the same code either way. Backend: NCCL when the ranks' device is a GPU, gloo on the CPU.
    On the CPU each rank gets ``cores / processes per node`` torch threads unless OMP_NUM_THREADS
    says otherwise (torchrun sets 1 when it starts several processes). A group already started
    (by the caller) is used and left open.
    """
    if torch_dist.is_available() and torch_dist.is_initialized():
        yield current(device)
        return
    env = launched()
    if env is None:
        yield None
        return
    if not torch_dist.is_available():
        raise _config_error("this torch build has no torch.distributed")
    dev = resolve_rank_device(device, env["local_rank"])
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env["local_world_size"]))
    torch_dist.init_process_group(backend=backend, rank=env["rank"], world_size=env["world_size"],
                                  **({"device_id": dev} if dev.type == "cuda" else {}))
    try:
        yield Distributed(env["rank"], env["world_size"], env["local_rank"], backend, dev)
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
