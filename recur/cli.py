"""`recur ...`: a thin shell over the library (every command calls what a Python user would).

    recur run --task mqar --model gla [--arch causal_lm] [--d-model 64] [--task-arg num_kv_pairs=8]
              [--set model.block.mlp=gelu] [--train tbptt:k1=16] [--checkpoint-every 100] [--resume] [--json]
              [--track tensorboard,wandb] [--track-dir runs]
    torchrun --standalone --nproc-per-node 2 -m recur run ...    (data-parallel: recur.training.distributed)
    recur export --tensorboard runs [--hash H ...]
    recur sweep grid.yaml [--workers 2] [--executor ray [--address auto]] [--shard 1/4]
    recur store merge part-1.sqlite part-2.sqlite -o all.sqlite
    recur bench [--quick]
    recur report [--out recur-report]
    recur speed [--quick] [--json] [--only scan gla ...] [--markdown benchmarks/RESULTS.md]
    recur tasks | recur models | recur archs | recur methods
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from recur.config import RunConfig, SweepConfig, config_hash, config_problems, to_nested
from recur.results import DEFAULT_PATH, ResultStore, StoreError

DEFAULT_REPORT_DIR = "recur-report"
DEFAULT_CHECKPOINT_DIR = "recur-checkpoints"


class UsageError(ValueError):
    """A bad command line or config: reported in one line, exit code 2."""


# ------------------------------------------------------------------ value parsing
def parse_value(text: str) -> Any:
    """A command-line value: JSON (int, float, bool, null, list, object), Python's True/False/None, else a string."""
    python = {"True": True, "False": False, "None": None}
    if text in python:
        return python[text]
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_assignments(items: list[str] | None, flag: str) -> dict[str, Any]:
    """``["a=1", "swa.window=64"]`` -> ``{"a": 1, "swa": {"window": 64}}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"bad {flag} {item!r}: expected KEY=VALUE, e.g. {flag} num_kv_pairs=8")
        if "." in key:
            outer, inner = key.split(".", 1)
            if not outer or not inner or "." in inner:
                raise UsageError(f"bad {flag} {item!r}: a dotted key is MODEL.OPTION, e.g. {flag} swa.window=64")
            out.setdefault(outer, {})
            if not isinstance(out[outer], dict):
                raise UsageError(f"bad {flag} {item!r}: {outer!r} is both a value and a per-model group")
            out[outer][inner] = parse_value(value)
        else:
            out[key] = parse_value(value)
    return out


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 64,256, got {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"expected positive lengths such as 64,256, got {text!r}")
    return lengths


def parse_token_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids such as 3,0,17, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one token id")
    return ids


def _model_arg(text: str) -> str | list[str]:
    """``gla`` or a pattern ``mamba,mamba,swa``."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a model name, preset, or comma-separated pattern")
    return names[0] if len(names) == 1 else names


# ------------------------------------------------------------------ parser
class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are two short lines, not the whole usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="recur", description="Recurrent sequence models: train, sweep, benchmark, report.")
    p.add_argument("--debug", action="store_true", help="on an error, show the Python traceback too")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="train one model on one task and record it",
                         description="Train one model on one task, evaluate it at every eval length, record it "
                                     "in the store (skipped if this exact config is already there). Under torchrun "
                                     "(torchrun --nproc-per-node N -m recur run ...) the N processes train it "
                                     "data-parallel: --batch-size is the global batch, split evenly over them.")
    run.add_argument("--task", required=True, help="task name (see `recur tasks`)")
    run.add_argument("--model", required=True, type=_model_arg,
                     help="mixer name, preset, or comma-separated pattern such as mamba,mamba,swa (see `recur models`)")
    run.add_argument("--arch", default=argparse.SUPPRESS,
                     help="architecture (see `recur archs`; default causal_lm)")
    # Options left out keep the RunConfig default (SUPPRESS: absent from the namespace).
    fields = run.add_argument_group("run config (default: the RunConfig default)", argument_default=argparse.SUPPRESS)
    fields.add_argument("--d-model", type=int, help="width (64)")
    fields.add_argument("--n-layers", type=int, help="depth (2)")
    fields.add_argument("--seq-len", type=int, help="training length (64)")
    fields.add_argument("--eval-lengths", type=parse_lengths, help="comma-separated (seq_len,4*seq_len)")
    fields.add_argument("--steps", type=int, help="(2000)")
    fields.add_argument("--batch-size", type=int, help="(64)")
    fields.add_argument("--lr", type=float, help="peak learning rate (1e-3)")
    fields.add_argument("--weight-decay", type=float, help="(0.1)")
    fields.add_argument("--warmup", type=float, help="fraction of steps if < 1, else steps (0.1)")
    fields.add_argument("--grad-clip", type=parse_value, help="max gradient norm, or None (1.0)")
    fields.add_argument("--seed", type=int, help="(0)")
    fields.add_argument("--mlp", type=parse_value, help="swiglu, gelu or None (swiglu)")
    fields.add_argument("--device", help="auto, cpu, cuda, ... (auto: cuda if available)")
    fields.add_argument("--eval-batches", type=int, help="test batches per eval length (4)")
    fields.add_argument("--eval-loops", type=parse_lengths, metavar="N,N,...",
                        help="also evaluate a depth-recurrent model at these numbers of iterations (e.g. n_loops "
                             "1,2,4,8,16: test-time compute); drawn by recur report as accuracy against iterations")
    fields.add_argument("--early-stop", type=parse_value, help="training accuracy that stops the run, or None (0.99)")
    fields.add_argument("--state-init", choices=["zeros", "noise"], help="initial training state (zeros)")
    fields.add_argument("--state-noise-std", type=float, help="std of the noise initial state (1.0)")
    fields.add_argument("--state-passing", action="store_true", help="carry the state from batch to batch")
    run.add_argument("--train", dest="methods", action="append", default=[], metavar="METHOD[:KEY=VALUE,...]",
                     help="add a training method (repeatable; see `recur methods`), e.g. --train tbptt:k1=16,k2=32")
    run.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="set any config key (repeatable), e.g. --set model.block.mlp=gelu --set optim.lr=3e-3 "
                          "--set model.args.n_loops=4")
    run.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                     help="write a checkpoint every N steps (and at the end) under --checkpoint-dir")
    run.add_argument("--checkpoint-dir", type=Path, default=Path(DEFAULT_CHECKPOINT_DIR),
                     help=f"checkpoints go to DIR/<run hash>/ (default ./{DEFAULT_CHECKPOINT_DIR})")
    run.add_argument("--resume", action="store_true",
                     help="continue this run from its newest checkpoint (ends as an uninterrupted run would)")
    run.add_argument("--task-arg", action="append", metavar="KEY=VALUE", help="task parameter (repeatable)")
    run.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                     help="mixer option (repeatable); MODEL.KEY=VALUE for one model of a pattern")
    run.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                     help="import a module first (it registers extra tasks or models)")
    _db(run)
    run.add_argument("--force", action="store_true", help="run even if this config is in the store (replaces it)")
    run.add_argument("--json", action="store_true", help="print the result as one JSON line (last line of stdout)")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--track", action="append", default=[], metavar="TRACKER",
                     help="also log the run while it trains: tensorboard, wandb (offline unless WANDB_MODE is set); "
                          "repeatable or comma-separated (see recur.tracking)")
    run.add_argument("--track-dir", type=Path, default=Path("runs"), metavar="DIR",
                     help="where trackers write: DIR/<run name>/ event files, DIR/wandb/ (default ./runs)")

    sweep = sub.add_parser("sweep", help="run a YAML grid of configs, resumably")
    sweep.add_argument("file", type=Path)
    sweep.add_argument("--workers", type=int, default=None,
                       help="worker processes (default 1: in this process); with --executor ray, runs at a time "
                            "(default: the cluster's GPUs, else its CPUs) and the CPUs of a local Ray (default: all)")
    sweep.add_argument("--executor", choices=["local", "ray"], default="local",
                       help="local: this process or --workers processes (default); ray: each run a Ray task, "
                            "this process writing the store (pip install 'recur[ray]')")
    sweep.add_argument("--address", default=None,
                       help="with --executor ray: the cluster (auto, HOST:PORT, ray://HOST:10001; default "
                            "$RAY_ADDRESS, else a local Ray started for this sweep)")
    sweep.add_argument("--retries", type=int, default=None,
                       help="with --executor ray: attempts of a run after its worker dies (default 1)")
    sweep.add_argument("--shard", default=None, metavar="I/N",
                       help="run only shard I of N (1 to N) of the grid, split by run hash; merge the shards' "
                            "stores with `recur store merge`")
    _db(sweep)

    store = sub.add_parser("store", help="work on results stores: merge several into one")
    store_actions = store.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    merge = store_actions.add_parser(
        "merge", help="merge stores into one, one run per hash",
        description="Copy every run of the input stores (read-only) into the output, each whole (its curves, "
                    "evals and info too), one per hash; where copies of a hash differ, the newest is kept and "
                    "reported. An existing output keeps its runs and takes part in the merge.")
    merge.add_argument("inputs", nargs="+", type=Path, metavar="STORE", help="stores to merge (read only)")
    merge.add_argument("-o", "--out", required=True, type=Path, metavar="PATH",
                       help="the merged store (created, or merged into); not one of the inputs")
    merge.add_argument("--json", action="store_true", help="print the summary as one JSON line instead")
    merge.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="on an error, show the Python traceback too")

    report = sub.add_parser("report", help="write the HTML report (and print the leaderboard)")
    _db(report)
    report.add_argument("--out", type=Path, default=Path(DEFAULT_REPORT_DIR), help="report directory")
    report.add_argument("--json", action="store_true", help="print the leaderboard rows as one JSON line instead")

    bench = sub.add_parser("bench", help="run the built-in benchmark suite, print the leaderboard, write the report")
    _db(bench)
    bench.add_argument("--out", type=Path, default=Path(DEFAULT_REPORT_DIR), help="report directory")
    bench.add_argument("--workers", type=int, default=None, help="worker processes (default: CPU cores, at most 4)")
    bench.add_argument("--suite", default="default", metavar="NAME",
                       help="which built-in suite: default (the probes) or lm (bits per byte on text)")
    bench.add_argument("--quick", action="store_true", help="a few steps at a tiny size: a smoke test")
    bench.add_argument("--json", action="store_true", help="print the leaderboard rows as one JSON line instead")

    rep = sub.add_parser("reproduce", help="run one of the field's findings end to end and print its verdicts",
                         description="Run a finding's runs (stored, resumable), draw its figures and print one "
                                     "verdict per claim of its paper: reproduced or not reproduced.")
    rep.add_argument("name", nargs="?", help="the finding (see --list)")
    rep.add_argument("--list", action="store_true", help="list the findings, their papers and budgets")
    rep.add_argument("--quick", action="store_true", help="a few steps at a tiny size: a smoke test (verdicts "
                                                          "at this budget say nothing about the paper)")
    rep.add_argument("--workers", type=int, default=None, help="worker processes (default: CPU cores, at most 4)")
    _db(rep)
    rep.add_argument("--out", type=Path, default=None, help="figures directory (default reproduce/NAME)")
    rep.add_argument("--results", type=Path, default=None, metavar="PATH",
                     help="also write the finding's section into this results page (e.g. docs/results.md)")
    rep.add_argument("--json", action="store_true", help="print the verdicts as one JSON line (last line of stdout)")

    gen = sub.add_parser("generate", help="sample from a trained checkpoint",
                         description="Continue a prompt with a trained model, streaming the output. A text task's "
                                     "prompt is a string; other tasks take token ids.")
    gen.add_argument("--checkpoint", required=True, type=Path, metavar="PATH",
                     help="a run's checkpoint folder (recur run --checkpoint-every N), one of its step-* folders, "
                          "or a --checkpoint-dir that holds one run")
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the text to continue (text tasks)")
    what.add_argument("--tokens", type=parse_token_ids, metavar="IDS", help="the prompt as comma-separated token ids")
    gen.add_argument("--max-new-tokens", type=int, default=200, help="(200)")
    gen.add_argument("--temperature", type=float, default=0.8, help="0: greedy (0.8)")
    gen.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens only")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (auto: cuda if available)")
    gen.add_argument("--json", action="store_true", help="print one JSON object (prompt, output, tokens) instead")

    speed = sub.add_parser("speed", help="time our fast modes against references, peers and the machine's limits")
    speed.add_argument("--quick", action="store_true", help="small shapes: a smoke test of every case")
    speed.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    speed.add_argument("--only", nargs="+", metavar="NAME", help="run only these cases (default: all)")
    speed.add_argument("--threads", type=int, default=None, help="torch threads (default: all CPU cores); recorded")
    speed.add_argument("--markdown", type=Path, default=None, metavar="PATH",
                       help="also write the results table to PATH (e.g. benchmarks/RESULTS.md)")

    tasks = sub.add_parser("tasks", help="list the tasks, their parameters and descriptions")
    tasks.add_argument("--json", action="store_true")
    models = sub.add_parser("models", help="list the registered models and layer patterns")
    fmt = models.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--markdown", action="store_true", help="print the docs/models.md page")
    archs = sub.add_parser("archs", help="list the registered architectures (models above the mixer)")
    archs.add_argument("--json", action="store_true")
    methods = sub.add_parser("methods", help="list the registered training methods and their options")
    methods.add_argument("--json", action="store_true")
    export = sub.add_parser("export", help="write stored runs as TensorBoard event files",
                            description="Replay finished runs from the store (loss curve, eval curve, final metrics, "
                                        "config as hyperparameters) as TensorBoard event files, without training.")
    export.add_argument("--tensorboard", required=True, type=Path, metavar="DIR",
                        help="write DIR/<run name>/ event files (tensorboard --logdir DIR shows them)")
    export.add_argument("--hash", dest="hashes", action="append", default=[], metavar="H",
                        help="only this run (a hash or a unique prefix; repeatable; default: every run)")
    _db(export)
    export.add_argument("--json", action="store_true", help="print the written runs as one JSON line")
    for command in sub.choices.values():  # `recur run ... --debug` as well as `recur --debug run ...`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="on an error, show the Python traceback too")
    return p


def _db(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", type=Path, default=Path(DEFAULT_PATH), help=f"results store (default ./{DEFAULT_PATH})")


# ------------------------------------------------------------------ commands
_RUN_FIELDS = ("d_model", "n_layers", "seq_len", "eval_lengths", "steps", "batch_size", "lr", "weight_decay", "warmup",
               "grad_clip", "seed", "mlp", "device", "eval_batches", "early_stop", "state_init", "state_noise_std",
               "state_passing", "arch")


def parse_method(text: str) -> dict[str, Any]:
    """``tbptt:k1=16,k2=32`` -> ``{"name": "tbptt", "args": {"k1": 16, "k2": 32}}``."""
    name, _, rest = text.partition(":")
    if not name.strip():
        raise UsageError(f"bad --train {text!r}: expected METHOD or METHOD:KEY=VALUE,..., e.g. --train tbptt:k1=16")
    items = [x for x in rest.split(",") if x.strip()]
    args = parse_assignments(items, "--train")
    return {"name": name.strip(), "args": args}


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    # The flat flags (unset: the RunConfig default), then the training methods, then --set in order.
    pairs: list[tuple[str, Any]] = [(k, getattr(args, k)) for k in _RUN_FIELDS if hasattr(args, k)]
    if hasattr(args, "eval_loops"):
        pairs.append(("eval.loops", args.eval_loops))
    pairs += [("task.name", args.task), ("model.mixer", args.model),
              ("task.args", parse_assignments(args.task_arg, "--task-arg")),
              ("model.mixer_args", parse_assignments(args.model_arg, "--model-arg"))]
    fields = to_nested(pairs)
    if args.methods:
        fields["training"] = [*fields.get("training", []), *(parse_method(m) for m in args.methods)]
    for item in args.sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"bad --set {item!r}: expected KEY.PATH=VALUE, e.g. --set model.block.mlp=gelu")
        try:
            fields = to_nested([*fields.items(), (key.strip(), parse_value(value))])
        except ValueError as e:
            raise UsageError(f"bad --set {item!r}: {e}") from None
    try:
        return RunConfig.model_validate(fields)
    except ValidationError as e:
        raise UsageError(f"bad run config: {config_problems(e)}") from None


def cmd_run(args, out: Console, err: Console) -> int:
    """Train one run and record it. Under torchrun (WORLD_SIZE > 1) every process runs this command:
    the ranks train the run data-parallel (``recur.training.distributed``) and rank 0 alone reads and
    writes the store, tracks and prints; its decision (train, or show the stored run) is every rank's."""
    import contextlib

    from recur import tracking
    from recur.sweep import import_modules
    from recur.training import ConfigError, RunResult, distributed, train

    try:
        import_modules(args.imports)
    except ImportError as e:
        raise UsageError(f"--import: {e}") from None
    cfg = run_config_from_args(args)
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise UsageError(f"--checkpoint-every: checkpoint_every must be >= 1 (steps between checkpoints), "
                         f"got {args.checkpoint_every}")
    if args.resume and args.force:
        raise UsageError("--resume continues a run from its checkpoint; --force starts it over: choose one")
    trackers = tracking.parse_names(args.track)
    h = config_hash(cfg)
    with distributed.session(cfg.device) as dist, contextlib.ExitStack() as stack:
        main_rank = dist is None or dist.is_main
        if dist is not None:
            dist.rows(cfg.optim.batch_size)  # the global batch splits evenly over the ranks, or every rank says so
        store, stored, tracker, problem = None, None, None, None
        if main_rank:
            store = stack.enter_context(ResultStore(args.db))
            stored = store.get(h)
            try:  # a tracker that cannot start (its package missing) stops the run before training
                tracker = tracking.make_tracker(trackers, args.track_dir) if stored is None or args.force else None
            except ConfigError as e:
                problem = str(e)
        if dist is not None:
            stored, problem = dist.broadcast_object((stored, problem))
        if problem is not None:
            raise ConfigError(problem)
        if stored is not None and not args.force:
            if not main_rank:
                return 0
            err.print(f"config {h} is already in {args.db} (recorded {stored['created']}): showing it; "
                      "--force runs it again")
            summary = {k: stored[k] for k in ("task", "model", "seed", "params", "state_size", "train_seq_len",
                                              "steps", "seconds", "metrics")}
            depth = store.depth_evals({h}).get(h)
            if depth:
                summary["depth_metrics"] = {str(n): m for n, m in depth.items()}
        else:
            ckpt = args.checkpoint_dir / h if (args.checkpoint_every or args.resume) else None
            if args.resume and (ckpt is None or not (ckpt / "LATEST").exists()):
                raise UsageError(f"--resume: no checkpoint of run {h} in {args.checkpoint_dir} "
                                 "(write them with --checkpoint-every N)")
            check_run(cfg)  # a run that cannot start fails here, in one line, not at its first step
            if dist is not None and main_rank:
                err.print(f"data-parallel over {dist.world_size} processes ({dist.backend}, {dist.device.type}): "
                          f"{cfg.optim.batch_size // max(1, dist.world_size)} sequences each of the global batch "
                          f"of {cfg.optim.batch_size}")
            try:
                result: RunResult = train(cfg, progress=not args.no_progress and not args.json, checkpoint_dir=ckpt,
                                          checkpoint_every=args.checkpoint_every, resume=args.resume, dist=dist,
                                          tracker=tracker)
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001 - nothing is written; say why in one line
                if args.debug:
                    raise
                err.print(f"recur run: the run failed, nothing was recorded: {type(e).__name__}: {e}",
                          markup=False, highlight=False)
                return 1
            if main_rank:
                store.put(result)
                err.print(f"recorded run {h} in {args.db}")
            if dist is not None:
                dist.barrier()  # the job ends once the run is recorded
            if not main_rank:
                return 0
            summary = result.summary()
    if args.json:
        print(json.dumps(summary))
    else:
        _print_run(summary, h, out)
    return 0


def cmd_export(args, out: Console, err: Console) -> int:
    """Replay stored runs as TensorBoard event files (``recur.tracking.export_tensorboard``)."""
    from recur import tracking

    if not args.db.exists():
        raise UsageError(f"--db {args.db}: no such results store")
    with ResultStore(args.db, readonly=True) as store:
        folders = tracking.export_tensorboard(store, args.tensorboard, args.hashes or None)
    if args.json:
        print(json.dumps({"tensorboard": str(args.tensorboard), "runs": [f.name for f in folders]}))
    else:
        err.print(f"wrote {len(folders)} run{'s' if len(folders) != 1 else ''} from {args.db} to {args.tensorboard} "
                  f"(tensorboard --logdir {args.tensorboard})")
    return 0


def _print_run(summary: dict, h: str, out: Console) -> None:
    t = Table(title=f"{summary['model']} on {summary['task']} (seed {summary['seed']}, run {h})", title_justify="left")
    # The task's metrics, in the order it reports them (probes: accuracy, exact match; text: bits per byte, accuracy)
    # (a metric named "name@i" is one point of a curve, e.g. icl_regression's error per example: the curve is
    # in the store and --json, the table keeps the summary metrics)
    names = list(dict.fromkeys(k for m in summary["metrics"].values() for k in m if "@" not in k))
    t.add_column("eval length", justify="right")
    for name in names:
        t.add_column(name.replace("_", " "), justify="right")
    for n, m in summary["metrics"].items():
        t.add_row(n, *(f"{m[k]:.4f}" if k in m else "" for k in names))
    out.print(t)
    depth = summary.get("depth_metrics")
    if depth:  # eval.loops: the headline metric at each number of iterations and eval length
        lengths = list(next(iter(depth.values())))
        key = next((k for k in ("bits_per_byte", "mse", "accuracy") if k in depth[next(iter(depth))][lengths[0]]),
                   names[0])
        d = Table(title=f"{key.replace('_', ' ')} at other numbers of iterations (eval.loops)", title_justify="left")
        d.add_column("iterations", justify="right")
        for n in lengths:
            d.add_column(f"length {n}", justify="right")
        for loops, m in sorted(depth.items(), key=lambda kv: int(kv[0])):
            d.add_row(loops, *(f"{m[n][key]:.4f}" if key in m.get(n, {}) else "" for n in lengths))
        out.print(d)
    out.print(f"params {summary['params']:,}  state size {summary['state_size']:,} floats at T={summary['train_seq_len']}"
              f"  steps {summary['steps']}  time {summary['seconds']:.1f} s")


# ------------------------------------------------------------------ checking runs before training
def _probe_config(cfg: RunConfig) -> RunConfig:
    """The run with at most 2 sequences per batch: what its first step needs, cheaply."""
    return cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"batch_size": min(cfg.optim.batch_size, 2)})})


def check_run(cfg: RunConfig) -> None:
    """Everything a run needs before training: its device, task and model built (names, task
    parameters, mixer and architecture options, sizes that fit together), its training methods set
    up, and one training step on a batch of at most 2 sequences (so an option that only fails in
    the forward pass, such as ``chunk_size=0``, fails here). A ``ConfigError`` says what is wrong;
    nothing of the run is kept and the global random state is left as it was."""
    import torch

    from recur.training import ConfigError, Trainer

    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        try:
            trainer = Trainer(_probe_config(cfg), progress=False)
        except ConfigError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError) as e:
            raise ConfigError(f"model {cfg.model_name!r} on task {cfg.task.name!r} cannot be built: "
                              f"{type(e).__name__}: {e}") from None
        try:
            trainer.train_step()
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever stops the first step stops the run
            raise ConfigError(f"model {cfg.model_name!r} on task {cfg.task.name!r} fails at its first training "
                              f"step: {type(e).__name__}: {e}") from None
        finally:
            del trainer
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()  # the probe's memory goes back before the run (or its workers) start


def check_runs(configs: list[RunConfig], where: str = "") -> None:
    """``check_run`` for every run (each distinct task x model x methods once), then one ConfigError
    listing every run that cannot start, numbered in ``configs`` order and named."""
    from recur.config import list_problems
    from recur.sweep import describe
    from recur.training import ConfigError

    problems, verdicts = [], {}
    for i, cfg in enumerate(configs, 1):
        # seeds and learning rates do not decide whether a run can start
        key = cfg.model_copy(update={"seed": 0, "optim": cfg.optim.model_copy(
            update={"lr": 1e-3, "batch_size": min(cfg.optim.batch_size, 2)})}).canonical_json()
        if key not in verdicts:
            try:
                check_run(cfg)
                verdicts[key] = None
            except ConfigError as e:
                verdicts[key] = str(e)
        if verdicts[key] is not None:
            problems.append(f"run {i} ({describe(cfg)}): {verdicts[key]}")
    if problems:
        raise ConfigError((f"{where}: " if where else "") + list_problems(problems, len(configs), "cannot start",
                                                                          "cannot start"))


def _report_sweep(summary, err: Console) -> int:
    others = (f", {len(summary.by_others)} stored by another sweep" if summary.by_others else "") + \
        (f", {summary.elsewhere} still being trained by another sweep" if summary.elsewhere else "")
    err.print(f"{len(summary.done)} runs done, {summary.skipped} skipped, {len(summary.failed)} failed{others}"
              f" ({summary.seconds:.0f} s)")
    return 1 if summary.failed else 0


def _report_dir(path: Path) -> Path:
    """``--out``: a directory the report can be written in (created if absent), checked before any work."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path}: expected a report directory, got an existing file")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {path}: expected a directory that can be created, got: "
                         f"{(e.strerror or str(e)).lower()}") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"--out {path}: expected a writable directory, got a read-only one")
    return path


def cmd_sweep(args, out: Console, err: Console) -> int:
    from recur.sweep import import_modules, parse_shard, run_sweep, shard

    if not args.file.exists():
        raise UsageError(f"no such sweep file: {args.file}")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    ray = args.executor == "ray"
    for flag, value in (("--address", args.address), ("--retries", args.retries)):
        if value is not None and not ray:
            raise UsageError(f"{flag} is an option of --executor ray (this sweep's executor is {args.executor})")
    if args.retries is not None and args.retries < 0:
        raise UsageError(f"--retries must be >= 0, got {args.retries}")
    try:
        part = parse_shard(args.shard) if args.shard is not None else None
    except ValueError as e:
        raise UsageError(f"--shard: {e}") from None
    if ray:
        from recur.ray_executor import require_ray

        try:
            require_ray()
        except ImportError as e:
            raise UsageError(str(e)) from None
    sweep = SweepConfig.from_yaml(args.file)  # every message names the file
    try:
        import_modules(sweep.imports)
    except ImportError as e:
        raise UsageError(f"{args.file}: imports: {e}") from None
    try:
        configs = sweep.expand()
    except ValueError as e:
        raise UsageError(f"{args.file}: {e}") from None
    if part is not None:
        mine = shard(configs, *part)
        err.print(f"shard {part[0]}/{part[1]}: {len(mine)} of the grid's {len(configs)} runs (split by run hash)")
        configs = mine
    check_runs(configs, where=str(args.file))  # every run, before the first one trains
    with ResultStore(args.db) as store:
        summary = run_sweep(configs, store, workers=args.workers if ray else args.workers or 1,
                            imports=sweep.imports, console=err, executor=args.executor, address=args.address,
                            retries=args.retries)
    return _report_sweep(summary, err)


def cmd_store(args, out: Console, err: Console) -> int:
    from recur.store_merge import merge_stores

    summary = merge_stores(args.inputs, args.out)  # StoreError: one line, exit 2
    for conflict in summary.conflicts:
        err.print(conflict.line(), markup=False, highlight=False)
    if args.json:
        out.print(json.dumps(summary.as_json()), markup=False, highlight=False, soft_wrap=True)
    else:
        out.print(summary.line(), markup=False, highlight=False)
    return 0


def cmd_report(args, out: Console, err: Console) -> int:
    from recur.report import build_report

    if not args.db.exists():
        raise UsageError(f"no results store at {args.db}: run `recur run`, `recur sweep` or `recur bench` first")
    with ResultStore(args.db, readonly=None) as store:  # read-only media: read it, write nothing to it
        _report_dir(args.out)
        _show_leaderboard(store.leaderboard(), args.json, out)
        index = build_report(store, args.out)
    (err if args.json else out).print(f"report written to {index}")
    return 0


def _show_leaderboard(rows: list[dict], as_json: bool, out: Console) -> None:
    from recur.report import print_leaderboard

    if as_json:
        print(json.dumps(rows))
    else:
        print_leaderboard(rows, out)


def cmd_bench(args, out: Console, err: Console) -> int:
    from recur.report import build_report
    from recur.suites import SUITES, missing, quick
    from recur.sweep import run_sweep

    if args.suite not in SUITES:
        raise UsageError(f"unknown suite {args.suite!r}: choose from {', '.join(SUITES)}")
    suite = quick(SUITES[args.suite]) if args.quick else SUITES[args.suite]
    absent = missing(suite)
    if absent["models"] or absent["tasks"]:
        what = "; ".join(f"{kind} {', '.join(names)}" for kind, names in absent.items() if names)
        raise UsageError(f"the {args.suite} bench suite needs {what}, which are not registered in this install "
                         "(see `recur models` and `recur tasks`)")
    configs = suite.expand()
    workers = args.workers if args.workers is not None else max(1, min(os.cpu_count() or 1, 4))
    if workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    _report_dir(args.out)  # before the sweep, not after hours of training
    with ResultStore(args.db) as store:
        summary = run_sweep(configs, store, workers=workers, console=err)
        hashes = {config_hash(c) for c in configs}
        index = build_report(store, args.out, hashes=hashes)
        code = _report_sweep(summary, err)
        _show_leaderboard(store.leaderboard(hashes=hashes), args.json, out)
    (err if args.json else out).print(f"report written to {index}")
    return code


def cmd_reproduce(args, out: Console, err: Console) -> int:
    from recur.findings import FINDINGS, reproduce, write_section

    if args.list:
        if args.json:
            print(json.dumps([{"name": n, "title": FINDINGS.get(n).cls.title, "paper": FINDINGS.get(n).cls.paper,
                               "budget": FINDINGS.get(n).cls.budget} for n in FINDINGS.in_order()]))
            return 0
        t = Table(title="findings (recur reproduce NAME)", title_justify="left")
        for col in ("name", "finding", "paper", "budget"):
            t.add_column(col, overflow="fold")
        for n in FINDINGS.in_order():
            cls = FINDINGS.get(n).cls
            t.add_row(n, cls.title, cls.paper, cls.budget)
        out.print(t)
        return 0
    if not args.name:
        raise UsageError("name a finding (recur reproduce --list shows them)")
    if args.name not in FINDINGS:
        raise UsageError(str(FINDINGS.unknown(args.name)))
    finding = FINDINGS.get(args.name).cls()
    workers = args.workers if args.workers is not None else max(1, min(os.cpu_count() or 1, 4))
    if workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    figures = args.out or Path("reproduce") / args.name
    _report_dir(figures)
    with ResultStore(args.db) as store:
        outcome = reproduce(finding, store, quick=args.quick, workers=workers, console=err, figures_dir=figures)
    t = Table(title=f"{finding.name}: {finding.paper}" + (" (quick: a smoke test, not a verdict)" if args.quick else ""),
              title_justify="left")
    for col in ("claim", "measured", "verdict"):
        t.add_column(col, overflow="fold")
    for v in outcome.verdicts:
        t.add_row(v.claim, v.measured, "[green]reproduced[/green]" if v.reproduced else "[red]not reproduced[/red]")
    (err if args.json else out).print(t)
    (err if args.json else out).print(f"{outcome.runs} runs, {outcome.seconds:.0f} s; figures in {figures}")
    if args.results is not None:
        command = "recur reproduce " + args.name + (" --quick" if args.quick else "")
        write_section(args.results, finding, outcome, command)
        err.print(f"section {finding.name} written to {args.results}")
    if args.json:
        print(json.dumps(outcome.as_json()))
    return 0


def cmd_generate(args, out: Console, err: Console) -> int:
    from recur.generate import generate_text, generate_tokens, is_text_task, load_checkpoint, prompt_tokens
    from recur.models.base import check_sampling

    model, task, cfg = load_checkpoint(args.checkpoint, args.device)
    try:
        check_sampling(args.max_new_tokens, args.temperature, args.top_k, task.vocab_size)
        prompt = prompt_tokens(task, prompt=args.prompt, tokens=args.tokens)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
    err.print(f"{cfg.model_name} on {cfg.task.name}, {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"from {args.checkpoint}", highlight=False)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    if args.prompt is not None and is_text_task(task):
        pieces = []
        if not args.json:
            print(args.prompt, end="", flush=True)
        for piece in generate_text(model, task, args.prompt, args.max_new_tokens, **sampling):
            pieces.append(piece)
            if not args.json:
                print(piece, end="", flush=True)
        if args.json:
            print(json.dumps({"prompt": args.prompt, "output": "".join(pieces)}))
        else:
            print()
        return 0
    new = []
    for t in generate_tokens(model, prompt, args.max_new_tokens, **sampling):
        new.append(t)
        if not args.json:
            print(t, end=" ", flush=True)
    if args.json:
        print(json.dumps({"prompt": prompt, "tokens": new}))
    else:
        print()
    return 0


def cmd_speed(args, out: Console, err: Console) -> int:
    from recur import speed

    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    try:
        doc = speed.run(args.only, quick=args.quick, threads=args.threads,
                        on_case=lambda n: err.print(f"[dim]speed: {n} ...[/dim]"))
    except ValueError as e:
        raise UsageError(str(e)) from None
    command = "recur speed" + (" --quick" if args.quick else "") + (f" --only {' '.join(args.only)}" if args.only else "") \
        + (f" --threads {args.threads}" if args.threads else "")
    table = speed.markdown(doc, command)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
        err.print(f"results table written to {args.markdown}")
    if args.json:
        print(json.dumps(doc))
        return 0
    m = doc["machine"]
    t = Table(title=f"recur speed: {m['threads']} threads, {m['matmul_gflops']} GFLOP/s matmul, "
                    f"{m['bandwidth_gbs']} GB/s bandwidth", title_justify="left")
    for col in ("case", "shape", "pass", "ours (s)", "baseline", "baseline (s)", "speedup", "fraction", "target met"):
        t.add_column(col, overflow="fold")
    for r in doc["results"]:
        met = "" if r["met"] is None else ("[green]yes[/green]" if r["met"] else "[red]no[/red]")
        frac = "" if r["fraction_of_limit"] is None else f"{r['fraction_of_limit']:.3f}"
        t.add_row(r["name"], r["shape"], r["pass"], f"{r['ours_s']:.4g}", r["baseline"], f"{r['baseline_s']:.4g}",
                  f"{r['speedup']:.2f}x", frac, met)
    out.print(t)
    return 0


def cmd_tasks(args, out: Console, err: Console) -> int:
    from recur.tasks.base import describe_params, list_tasks, task_class

    rows = []
    for name in list_tasks():
        cls = task_class(name)
        params = {k: {"type": getattr(f.annotation, "__name__", str(f.annotation)), "default": f.default,
                      "description": f.description or ""} for k, f in cls.Params.model_fields.items()}
        rows.append({"name": name, "params": params, "signature": describe_params(cls.Params),
                     "description": cls.description})
    if args.json:
        print(json.dumps(rows, default=str))
        return 0
    t = Table(title="tasks (recur run --task NAME --task-arg KEY=VALUE)", title_justify="left", show_lines=True)
    t.add_column("task", style="bold")
    t.add_column("parameters")
    t.add_column("description")
    for r in rows:
        params = "\n".join(f"{k}={v['default']!r}" + (f": {v['description']}" if v["description"] else "")
                           for k, v in r["params"].items()) or "(none)"
        t.add_row(r["name"], params, r["description"])
    out.print(t)
    return 0


def cmd_models(args, out: Console, err: Console) -> int:
    import recur
    from recur import catalog

    if args.markdown:
        print(catalog.markdown(), end="")
        return 0
    rows = catalog.catalog()
    patterns = {k: list(v) for k, v in recur.list_patterns().items()}
    if args.json:
        print(json.dumps({"d_model": catalog.WIDTH, "seq_len": catalog.LENGTH, "models": rows, "patterns": patterns}))
        return 0
    # Encoder-only layers (causal=False, e.g. bidirectional) read the future: a causal LM refuses
    # them, so they are listed apart, with how to use them.
    for causal, title in ((True, f"models (recur run --model NAME); state size in floats at d_model={catalog.WIDTH}"),
                          (False, "encoder-only layers (not causal: not usable with the default causal_lm; "
                                  "recur run --arch encoder --model NAME)")):
        chosen = [r for r in rows if r.get("causal", True) == causal]
        if not chosen:
            continue
        t = Table(title=title, title_justify="left")
        for col in ("model", "family", "modes", "state size formula", "floats", "paper"):
            t.add_column(col, style="bold" if col == "model" else None, overflow="fold")
        for r in chosen:
            t.add_row(r["name"], r["family"], ", ".join(r["modes"]), r["state_formula"],
                      catalog.size_text(r, catalog.LENGTH), r["paper"])
        out.print(t)
    if patterns:
        p = Table(title="patterns (repeated to n_layers)", title_justify="left")
        p.add_column("pattern", style="bold")
        p.add_column("layers")
        for k, v in patterns.items():
            p.add_row(k, ", ".join(v))
        out.print(p)
    return 0


def _registry_table(registry, title: str, args, out: Console) -> int:
    rows = [registry.describe(n) for n in registry.names()]
    if args.json:
        print(json.dumps(rows, default=repr))
        return 0
    t = Table(title=title, title_justify="left", show_lines=True)
    for col in ("name", "family", "options", "description", "paper"):
        t.add_column(col, style="bold" if col == "name" else None, overflow="fold")
    for r in rows:
        options = ", ".join(f"{k}={v!r}" for k, v in r["options"].items()) or "(none)"
        t.add_row(r["name"], r["family"], options, r["description"], r["paper"])
    out.print(t)
    return 0


def cmd_archs(args, out: Console, err: Console) -> int:
    from recur.registry import ARCHITECTURES

    return _registry_table(ARCHITECTURES, "architectures (recur run --arch NAME --set model.args.KEY=VALUE)", args, out)


def cmd_methods(args, out: Console, err: Console) -> int:
    from recur.registry import METHODS

    return _registry_table(METHODS, "training methods (recur run --train NAME:KEY=VALUE,...)", args, out)


COMMANDS = {"run": cmd_run, "sweep": cmd_sweep, "store": cmd_store, "report": cmd_report, "bench": cmd_bench,
            "reproduce": cmd_reproduce, "generate": cmd_generate, "speed": cmd_speed, "tasks": cmd_tasks, "models": cmd_models, "archs": cmd_archs, "methods": cmd_methods,
            "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `recur` script; returns the exit code (2: bad usage or config)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed the usage and the error
        return int(e.code or 0)
    args.debug = bool(getattr(args, "debug", False))
    out, err = Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)
    if not out.is_terminal:  # piped: do not squeeze the leaderboard into 80 columns
        out.width = max(out.width, 160)
    from recur.training import ConfigError

    try:
        return COMMANDS[args.command](args, out, err)
    except (UsageError, ConfigError, StoreError) as e:
        if args.debug:
            traceback.print_exc()
        err.print(f"recur {args.command}: error: {e}", markup=False, highlight=False)
        return 2
    except KeyboardInterrupt as e:  # a sweep's SweepInterrupted says what it stored and what it did not run
        try:  # exiting now: another Ctrl-C ends the process at once
            signal.signal(signal.SIGINT, lambda *_: os._exit(130))
        except ValueError:  # not the main thread: signals are not ours to handle
            pass
        if args.debug:
            traceback.print_exc()
        err.print(str(e) or "interrupted", markup=False, highlight=False)
        return 130
    except Exception as e:  # noqa: BLE001 - one line, never a traceback unless --debug
        if args.debug:
            traceback.print_exc()
        known = error_message(e)
        if known is not None:
            err.print(f"recur {args.command}: error: {known}", markup=False, highlight=False)
            return 2
        err.print(f"recur {args.command}: unexpected error: {type(e).__name__}: {e}", markup=False, highlight=False)
        if not args.debug:
            err.print("(an input recur does not check yet, or a bug: rerun with --debug for the traceback)",
                      markup=False, highlight=False)
        return 1


# Exceptions that describe a bad input (a config, a file, a name): `error: <message>`, exit 2.
def error_message(e: BaseException) -> str | None:
    """The one-line message of a known kind of bad-input error, or None for an unexpected one."""
    import sqlite3

    import yaml

    if isinstance(e, ValidationError):
        return config_problems(e)
    if isinstance(e, KeyError):  # a registry or mapping lookup: the key, not its repr in quotes
        return str(e.args[0]) if e.args else "missing key"
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {(e.strerror or str(e)).lower()}"
    if isinstance(e, sqlite3.DatabaseError):
        return f"results store: {e}"
    if isinstance(e, (ValueError, TypeError, OSError, ImportError, yaml.YAMLError)):
        return str(e) or type(e).__name__
    return None


if __name__ == "__main__":
    sys.exit(main())
