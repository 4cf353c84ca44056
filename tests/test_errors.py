"""Every bad input gets a short, clear error: what was expected and what was received, a non-zero exit,
no traceback (``recur --debug`` shows it). Three tables of bad inputs, each with the phrases its
message must contain:

* ``CLI``: ``recur run ...`` (and the other commands) with bad flags, options and values;
* ``YAML``: ``recur sweep FILE`` with bad files (syntax, duplicate keys, types, runs that cannot start);
* ``API``: bad calls into the Python API (``recur.build``, mixers, ``State``, generation, tasks, configs).

Run as a script to count the outcomes (clear / traceback / silently accepted / vague)::

    .venv/bin/python tests/test_errors.py        # one line per case, then the counts
"""

from __future__ import annotations

import contextlib
import io
import math
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # as a script: the harness task below
    sys.path.insert(0, str(HERE))

import harness_tasks  # noqa: E402,F401 - registers harness_shift

import recur  # noqa: E402
from recur import CausalLM, State, build  # noqa: E402
from recur.cli import main  # noqa: E402
from recur.config import RunConfig, SweepConfig  # noqa: E402
from recur.tasks.base import get_task  # noqa: E402

# A run that trains in well under a second (a bad input that is accepted costs no more than this).
TINY = ["--task", "harness_shift", "--d-model", "16", "--n-layers", "1", "--seq-len", "8", "--steps", "2",
        "--batch-size", "4", "--eval-batches", "1", "--mlp", "None", "--device", "cpu", "--no-progress"]


def run(*extra: str, model: str = "elman") -> list[str]:
    return ["run", *TINY, "--model", model, *extra]


# (id, argv, phrases the error must contain); the --db of each case is added by the runner.
CLI: list[tuple[str, list[str], tuple[str, ...]]] = [
    ("model-arg-not-a-number", run("--model-arg", "n_heads=abc", model="gla"), ("n_heads", "an int", "'abc'")),
    ("model-arg-bool-for-int", run("--model-arg", "n_heads=true", model="gla"), ("n_heads", "an int", "True")),
    ("model-arg-str-for-float", run("--model-arg", "expand_k=abc", model="gla"), ("expand_k", "a number", "'abc'")),
    ("model-arg-chunk-str", run("--model-arg", "chunk_size=abc", model="gla"), ("chunk_size", "an int", "'abc'")),
    ("model-arg-chunk-zero", run("--model-arg", "chunk_size=0", model="gla"), ("chunk_size", "got 0")),
    ("model-arg-absent-mixer", run("--model-arg", "swa.window=8", model="gla"), ("'swa'", "not in this model", "gla")),
    ("model-arg-unknown-group", run("--model-arg", "nope.window=8"), ("nope",)),
    ("model-arg-unknown-option", run("--model-arg", "window=8"), ("window", "elman")),
    ("model-arg-bad-mode", run("--model-arg", "mode=fast", model="gla"), ("fast", "chunk")),
    ("heads-do-not-divide", run("--d-model", "30", "--model-arg", "n_heads=4", model="gla"), ("n_heads=4", "must divide")),
    ("set-d_model-not-a-number", run("--set", "model.d_model=abc"), ("model.d_model", "integer", "'abc'")),
    ("set-n_layers-fraction", run("--set", "model.n_layers=2.5"), ("model.n_layers", "integer", "2.5")),
    ("set-seed-bool", run("--set", "seed=true"), ("seed", "integer", "True")),
    ("set-steps-bool", run("--set", "optim.steps=true"), ("optim.steps", "integer", "True")),
    ("set-lr-bool", run("--set", "optim.lr=true"), ("optim.lr", "number", "True")),
    ("set-lengths-bool", run("--set", "eval.lengths=[true]"), ("eval.lengths", "integer", "True")),
    ("set-lengths-zero", run("--set", "eval.lengths=[0]"), ("eval lengths", "0")),
    ("set-ratio-zero", run("--set", "model.block.ratio=0"), ("model.block.ratio", "greater than 0")),
    ("set-ratio-nan", run("--set", "model.block.ratio=nan"), ("model.block.ratio", "finite", "nan")),
    ("set-section-not-a-dict", run("--set", "optim=3"), ("optim", "dictionary")),
    ("set-mixer-args-not-a-dict", run("--set", "model.mixer_args=3"), ("model.mixer_args", "dictionary")),
    ("set-unknown-key", run("--set", "optim.lrr=1"), ("optim.lrr", "Extra inputs")),
    ("set-empty-pattern", run("--set", "model.mixer=[]"), ("model.mixer", "at least one")),
    ("lr-inf", run("--lr", "inf"), ("optim.lr", "finite", "inf")),
    ("lr-huge", run("--lr", "1e400"), ("optim.lr", "finite", "inf")),
    ("lr-nan", run("--lr", "nan"), ("optim.lr", "nan")),
    ("lr-negative", run("--lr", "-1"), ("optim.lr", "greater than 0", "-1")),
    ("weight-decay-inf", run("--weight-decay", "inf"), ("optim.weight_decay", "finite")),
    ("warmup-nan", run("--warmup", "nan"), ("optim.warmup", "nan")),
    ("grad-clip-inf", run("--grad-clip", "inf"), ("optim.grad_clip", "finite")),
    ("grad-clip-nan", run("--grad-clip", "nan"), ("optim.grad_clip", "nan")),
    ("early-stop-above-1", run("--early-stop", "2"), ("optim.early_stop", "less than or equal to 1")),
    ("steps-zero", run("--steps", "0"), ("optim.steps", "greater than or equal to 1", "0")),
    ("batch-size-negative", run("--batch-size", "-4"), ("optim.batch_size", "greater than or equal to 1", "-4")),
    ("batch-size-zero", run("--batch-size", "0"), ("optim.batch_size", "greater than or equal to 1")),
    ("seq-len-zero", run("--seq-len", "0"), ("task.seq_len", "greater than or equal to 1")),
    ("seq-len-too-short", run("--seq-len", "3"), ("needs seq_len >= 5", "got 3")),
    ("eval-batches-zero", run("--eval-batches", "0"), ("eval.batches", "greater than or equal to 1")),
    ("eval-lengths-zero", run("--eval-lengths", "0"), ("expected positive lengths", "'0'")),
    ("state-noise-std-negative", run("--state-noise-std", "-1", "--state-init", "noise"), ("std", "greater than or equal to 0")),
    ("state-noise-std-nan", run("--state-noise-std", "nan", "--state-init", "noise"), ("std", "nan")),
    ("seed-too-large", run("--seed", str(2**70)), ("seed", "less than", str(2**70))),
    ("device-unknown", run("--device", "tpu"), ("bad device 'tpu'",)),
    ("mlp-unknown", run("--mlp", "glu"), ("unknown channel mixer 'glu'",)),
    ("task-arg-bool-for-int", run("--task-arg", "lag=true"), ("lag", "integer", "True")),
    ("task-arg-not-a-number", run("--task-arg", "lag=zero"), ("lag", "integer", "zero")),
    ("task-arg-fraction", run("--task-arg", "lag=1.5"), ("lag", "integer", "1.5")),
    ("task-arg-unknown", run("--task-arg", "colour=1"), ("colour", "Extra inputs")),
    ("task-unknown", ["run", "--task", "harness_shiftt", "--model", "elman"], ("unknown task 'harness_shiftt'",)),
    ("model-unknown", run(model="elmann"), ("unknown model or pattern 'elmann'",)),
    ("model-not-causal", run(model="bidirectional"), ("not causal",)),
    ("train-k1-bool", run("--train", "tbptt:k1=true"), ("k1", "integer", "True")),
    ("train-k1-missing", run("--train", "tbptt"), ("tbptt", "k1", "Field required")),
    ("train-std-not-a-number", run("--train", "state_noise:std=abc"), ("std", "number", "abc")),
    ("train-unknown", run("--train", "tbtt"), ("unknown training method 'tbtt'",)),
    ("arch-unknown", run("--arch", "looped"), ("unknown architecture 'looped'",)),
    ("arch-arg-not-a-number", run("--arch", "looped_lm", "--set", "model.args.n_loops=abc"), ("n_loops", "'abc'")),
    ("arch-arg-unknown", run("--set", "model.args.n_loops=2"), ("n_loops",)),
    ("arch-arg-bad-choice", run("--arch", "encoder", "--set", "model.args.head=nope"), ("head", "'nope'")),
    ("checkpoint-every-zero", run("--checkpoint-every", "0"), ("--checkpoint-every", "got 0")),
    ("resume-and-force", run("--resume", "--force"), ("choose one",)),
    ("import-unknown", run("--import", "no_such_module_xyz"), ("no_such_module_xyz",)),
    ("db-under-a-file", run("--db", "{textfile}/runs.sqlite"), ("{textfile}",)),
    ("report-db-not-sqlite", ["report", "--db", "{textfile}"], ("{textfile}",)),
    ("sweep-workers-zero", ["sweep", "{sweepfile}", "--workers", "0"], ("--workers", "got 0")),
    ("sweep-missing-file", ["sweep", "/nonexistent-dir/grid.yaml"], ("/nonexistent-dir/grid.yaml", "no such")),
    ("sweep-directory", ["sweep", "{dir}"], ("{dir}", "directory")),
    ("bench-workers-zero", ["bench", "--quick", "--workers", "0"], ("--workers", "got 0")),
    ("speed-unknown-case", ["speed", "--quick", "--only", "no_such_case"], ("no_such_case",)),
    ("speed-threads-zero", ["speed", "--threads", "0"], ("--threads", "got 0")),
]

_OK_SWEEP = "imports: [harness_tasks]\nmodels: [elman]\ntasks: [harness_shift]\n" \
            "sizes: [{d_model: 16, n_layers: 1}]\nmlp: null\ndevice: cpu\n" \
            "task: {seq_len: 8}\noptim: {steps: 2, batch_size: 4}\neval: {batches: 1}\n"

# (id, file content (str or bytes), phrases); "{file}" in a phrase is the sweep file's path.
YAML: list[tuple[str, str | bytes, tuple[str, ...]]] = [
    ("unclosed-bracket", _OK_SWEEP.replace("models: [elman]", "models: [elman"), ("{file}", "line", "column")),
    ("bad-indentation", _OK_SWEEP + "  extra: 1\n bad: 2\n", ("{file}", "line", "column")),
    ("tab-indentation", _OK_SWEEP + "optim:\n\tsteps: 3\n", ("{file}", "line", "column", "tab")),
    ("binary-content", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\xff\xfe", ("{file}", "not a text file")),
    ("latin-1-text", _OK_SWEEP.encode() + "# caf\xe9\n".encode("latin-1"), ("{file}", "UTF-8")),
    ("python-tag", _OK_SWEEP + "x: !!python/object:os.system {}\n", ("{file}", "line")),
    ("duplicate-key", _OK_SWEEP + "models: [gla]\n", ("{file}", "duplicate key 'models'", "line")),
    ("duplicate-nested-key", _OK_SWEEP.replace("steps: 2,", "steps: 2, steps: 3,"), ("{file}", "duplicate key 'steps'")),
    ("empty-file", "", ("{file}", "empty")),
    ("top-level-list", "- gla\n- lstm\n", ("{file}", "mapping", "list")),
    ("unknown-key", _OK_SWEEP + "epochs: 3\n", ("unknown sweep key 'epochs'",)),
    ("seeds-bool", _OK_SWEEP + "seeds: [true]\n", ("seeds", "integer", "True")),
    ("seeds-yes", _OK_SWEEP + "seeds: [yes]\n", ("seeds", "integer", "True")),
    ("steps-bool", _OK_SWEEP.replace("steps: 2,", "steps: true,"), ("optim.steps", "integer", "True")),
    ("batch-size-bool", _OK_SWEEP.replace("batch_size: 4", "batch_size: false"), ("optim.batch_size", "integer", "False")),
    ("d_model-bool", _OK_SWEEP.replace("d_model: 16", "d_model: true"), ("d_model", "integer", "True")),
    ("n_layers-fraction", _OK_SWEEP.replace("n_layers: 1", "n_layers: 1.5"), ("n_layers", "integer", "1.5")),
    ("seq_len-bool", _OK_SWEEP.replace("seq_len: 8", "seq_len: true"), ("task.seq_len", "integer", "True")),
    ("lengths-bool", _OK_SWEEP.replace("batches: 1", "batches: 1, lengths: [8, true]"), ("eval.lengths", "integer", "True")),
    ("lrs-bool", _OK_SWEEP + "lrs: [true]\n", ("lrs", "number", "True")),
    ("lrs-inf", _OK_SWEEP + "lrs: [.inf]\n", ("lrs", "finite", "inf")),
    ("lr-nan", _OK_SWEEP + "lr: .nan\n", ("optim.lr", "nan")),
    ("axis-lr-inf", _OK_SWEEP + "axes: {optim.lr: [0.001, .inf]}\n", ("optim.lr", "finite", "inf")),
    ("no-models", _OK_SWEEP.replace("models: [elman]", "models: []"), ("models", "at least 1")),
    ("unknown-model", _OK_SWEEP.replace("models: [elman]", "models: [elman, elmann]"), ("unknown model or pattern 'elmann'",)),
    ("unknown-import", _OK_SWEEP.replace("imports: [harness_tasks]", "imports: [harness_tasks, no_such_module_xyz]"),
     ("no_such_module_xyz",)),
    ("bad-task-arg", _OK_SWEEP.replace("tasks: [harness_shift]", "tasks: [{name: harness_shift, args: {lag: zero}}]"),
     ("lag", "zero", "run 1")),
    ("bad-model-arg", _OK_SWEEP.replace("models: [elman]", "models: [{name: elman, args: {nope: 1}}]"),
     ("nope", "elman", "run 1")),
    ("heads-do-not-divide", _OK_SWEEP.replace("models: [elman]", "models: [elman, {name: gla, args: {n_heads: 3}}]"),
     ("n_heads=3", "must divide", "run 2")),
    ("absent-mixer-option", _OK_SWEEP.replace("models: [elman]", "models: [{name: gla, args: {swa: {window: 8}}}]"),
     ("'swa'", "not in this model")),
    ("chunk-size-zero", _OK_SWEEP.replace("models: [elman]", "models: [{name: gla, args: {chunk_size: 0}}]"),
     ("chunk_size", "got 0", "run 1")),
    ("seq-len-too-short", _OK_SWEEP.replace("seq_len: 8", "seq_len: 3"), ("needs seq_len >= 5", "got 3")),
    ("every-problem-listed", _OK_SWEEP.replace("models: [elman]", "models: [elman, {name: gla, args: {n_heads: 3}}, "
                                               "{name: elman, args: {nope: 1}}]"),
     ("2 of 3 runs", "run 2", "n_heads=3", "run 3", "nope")),
]


def _gla():
    torch.manual_seed(0)
    return build("gla", d_model=16)


def _lm():
    torch.manual_seed(0)
    return CausalLM(vocab_size=16, d_model=16, n_layers=1, pattern="gla")


_X = torch.randn(2, 5, 16)
_P = torch.randint(16, (2, 3))


def _junk_state(tmp: Path) -> State:
    path = tmp / "junk.safetensors"
    path.write_bytes(b"this is not a safetensors file")
    return State.load(path)


def _trainer(checkpoint_every=None, **kw):
    from recur.training import Trainer

    fields = {"task": "harness_shift", "model": "gla", "d_model": 16, "n_layers": 1, "seq_len": 8, "device": "cpu", **kw}
    return Trainer(RunConfig(**fields), progress=False, checkpoint_every=checkpoint_every,
                   checkpoint_dir=None if checkpoint_every is None else ".")


# (id, call (given a tmp dir), phrases of the ValueError / TypeError / IndexError / FileNotFoundError it must raise)
API: list[tuple[str, object, tuple[str, ...]]] = [
    ("build-unknown-name", lambda t: build("glaa", d_model=16), ("unknown model 'glaa'", "Did you mean 'gla'")),
    ("build-name-not-a-str", lambda t: build(3, d_model=16), ("unknown model 3",)),
    ("build-unknown-option", lambda t: build("gla", d_model=16, foo=1), ("foo", "gla")),
    ("build-option-str-for-int", lambda t: build("gla", d_model=16, n_heads="abc"), ("n_heads", "an int", "'abc'")),
    ("build-option-bool-for-int", lambda t: build("gla", d_model=16, n_heads=True), ("n_heads", "an int", "True")),
    ("build-option-float-for-int", lambda t: build("gla", d_model=16, n_heads=2.5), ("n_heads", "2.5")),
    ("build-option-str-for-float", lambda t: build("gla", d_model=16, expand_k="abc"), ("expand_k", "a number", "'abc'")),
    ("build-option-nan-float", lambda t: build("gla", d_model=16, gate_temperature=math.nan), ("gate_temperature", "nan")),
    ("build-option-bad-str", lambda t: build("gla", d_model=16, mode=3), ("mode", "3")),
    ("build-heads-do-not-divide", lambda t: build("gla", d_model=16, n_heads=3), ("n_heads=3", "must divide")),
    ("build-d_model-str", lambda t: build("gla", d_model="16"), ("d_model", "'16'")),
    ("build-d_model-float", lambda t: build("gla", d_model=16.0), ("d_model", "16.0")),
    ("build-mode-unknown", lambda t: build("gla", d_model=16, mode="fast"), ("fast", "chunk")),
    ("build-window-zero", lambda t: build("swa", d_model=16, window=0), ("window", "got 0")),
    ("build-inner-unknown", lambda t: build("bidirectional", d_model=16, mixer="nope"), ("unknown model 'nope'",)),
    ("mixer-x-list", lambda t: _gla()([[1.0] * 16]), ("torch.Tensor", "list")),
    ("mixer-x-2d", lambda t: _gla()(torch.randn(5, 16)), ("[batch, time, d_model=16]", "(5, 16)")),
    ("mixer-x-width", lambda t: _gla()(torch.randn(2, 5, 8)), ("[batch, time, d_model=16]", "(2, 5, 8)")),
    ("mixer-x-int", lambda t: _gla()(torch.ones(2, 5, 16, dtype=torch.long)), ("floating-point", "torch.int64")),
    ("mixer-x-complex", lambda t: _gla()(torch.randn(2, 5, 16, dtype=torch.complex64)), ("floating-point", "complex64")),
    ("mixer-x-float16", lambda t: _gla()(torch.randn(2, 5, 16, dtype=torch.float16)), ("float16", "float32")),
    ("mixer-x-empty", lambda t: _gla()(torch.randn(2, 0, 16)), ("time >= 1", "(2, 0, 16)")),
    ("mixer-state-dict", lambda t: _gla()(_X, {"S": 1}), ("recur.State", "dict")),
    ("mixer-state-batch", lambda t: (lambda g: g(_X, g.init_state(3)))(_gla()), ("'S'", "(2, 4, 2, 4)", "(3, 4, 2, 4)")),
    ("mixer-state-dtype", lambda t: (lambda g: g(_X, g.init_state(2, dtype=torch.float64)))(_gla()), ("'S'", "float64")),
    ("mixer-set-mode", lambda t: setattr(_gla(), "mode", "fast"), ("fast", "chunk")),
    ("mixer-chunk-zero-forward", lambda t: build("gla", d_model=16, chunk_size=0)(_X), ("chunk_size", "got 0")),
    ("state-cat-shapes", lambda t: State.cat([State(a=torch.zeros(1, 3)), State(a=torch.zeros(1, 4))]),
     ("'a'", "(1, 3)", "(1, 4)")),
    ("state-cat-keys", lambda t: State.cat([State(a=torch.zeros(1, 3)), State(b=torch.zeros(1, 3))]), ("['a']", "['b']")),
    ("state-cat-empty", lambda t: State.cat([]), ("at least one",)),
    ("state-cat-not-a-state", lambda t: State.cat([State(a=torch.zeros(1, 3)), torch.zeros(1, 3)]), ("State", "Tensor")),
    ("state-cat-nested", lambda t: State.cat([State(l=State(a=torch.zeros(1, 3))), State(l=torch.zeros(1, 3))]),
     ("'l'", "State", "Tensor")),
    ("state-cat-dtypes", lambda t: State.cat([State(a=torch.zeros(1, 3)), State(a=torch.zeros(1, 3, dtype=torch.float64))]),
     ("'a'", "float32", "float64")),
    ("state-bad-key", lambda t: State({"a.b": torch.zeros(1)}), ("'a.b'",)),
    ("state-bad-value", lambda t: State(a=3), ("'a'", "int")),
    ("state-select-out-of-range", lambda t: State(a=torch.zeros(2, 3)).select(5), ("5", "batch of 2")),
    ("state-load-missing", lambda t: State.load(t / "nope.safetensors"), ("nope.safetensors",)),
    ("state-load-junk", lambda t: _junk_state(t), ("junk.safetensors", "safetensors")),
    ("generate-temperature-nan", lambda t: _lm().generate(_P, 3, temperature=math.nan), ("temperature", "nan")),
    ("generate-temperature-inf", lambda t: _lm().generate(_P, 3, temperature=math.inf), ("temperature", "inf")),
    ("generate-temperature-negative", lambda t: _lm().generate(_P, 3, temperature=-1.0), ("temperature", "-1.0")),
    ("generate-temperature-str", lambda t: _lm().generate(_P, 3, temperature="hot"), ("temperature", "'hot'")),
    ("stream-temperature-nan", lambda t: list(_lm().stream(_P, 3, temperature=math.nan)), ("temperature", "nan")),
    ("generate-top-k-zero", lambda t: _lm().generate(_P, 3, temperature=1.0, top_k=0), ("top_k", "got 0")),
    ("generate-top-k-float", lambda t: _lm().generate(_P, 3, temperature=1.0, top_k=2.5), ("top_k", "2.5")),
    ("generate-top-k-too-big", lambda t: _lm().generate(_P, 3, temperature=1.0, top_k=100), ("top_k", "100")),
    ("generate-max-new-negative", lambda t: _lm().generate(_P, -1), ("max_new_tokens", "-1")),
    ("generate-max-new-float", lambda t: _lm().generate(_P, 2.5), ("max_new_tokens", "2.5")),
    ("generate-max-new-str", lambda t: _lm().generate(_P, "3"), ("max_new_tokens", "'3'")),
    ("generate-tokens-out-of-vocab", lambda t: _lm().generate(torch.tensor([[99]]), 3), ("[0, 16)", "99")),
    ("generate-tokens-negative", lambda t: _lm().generate(torch.tensor([[-1]]), 3), ("[0, 16)", "-1")),
    ("generate-tokens-float", lambda t: _lm().generate(torch.zeros(1, 3), 3), ("integer tensor", "float32")),
    ("generate-tokens-list", lambda t: _lm().generate([[1, 2]], 3), ("integer tensor", "list")),
    ("generate-tokens-1d", lambda t: _lm().generate(torch.tensor([1, 2]), 3), ("[batch, time]", "(2,)")),
    ("generate-empty-prompt", lambda t: _lm().generate(torch.zeros(1, 0, dtype=torch.long), 3), ("prompt", "(1, 0)")),
    ("lm-state-bad", lambda t: _lm()(_P, State(a=torch.zeros(1))), ("layer0", "['a']")),
    ("lm-pattern-unknown", lambda t: CausalLM(vocab_size=8, d_model=16, n_layers=1, pattern="nope"),
     ("unknown model or pattern 'nope'",)),
    ("lm-pattern-not-a-name", lambda t: CausalLM(vocab_size=8, d_model=16, n_layers=1, pattern=3), ("pattern", "int")),
    ("lm-mixer-config-absent-mixer", lambda t: CausalLM(vocab_size=8, d_model=16, n_layers=1, pattern="gla",
                                                         mixer_config={"swa": {"window": 8}}), ("'swa'", "gla")),
    ("lm-mixer-config-not-a-dict", lambda t: CausalLM(vocab_size=8, d_model=16, n_layers=1, mixer_config=[1]),
     ("mixer_config", "list")),
    ("lm-vocab-one", lambda t: CausalLM(vocab_size=1, d_model=16, n_layers=1), ("vocab_size", "got 1")),
    ("lm-not-causal", lambda t: CausalLM(vocab_size=8, d_model=16, n_layers=1, pattern="bidirectional"), ("not causal",)),
    ("lm-set-mode-unknown", lambda t: _lm().set_mode("fast"), ("fast", "chunk")),
    ("from-config-none", lambda t: CausalLM.from_config(None, vocab_size=8), ("ModelConfig", "NoneType")),
    ("from-config-bad-dict", lambda t: CausalLM.from_config({"mixer": "gla", "d_model": True}, vocab_size=8),
     ("d_model", "integer", "True")),
    ("looped-n-loops-zero", lambda t: recur.LoopedLM(vocab_size=8, d_model=16, n_layers=1, n_loops=0), ("n_loops", "got 0")),
    ("encoder-head-unknown", lambda t: recur.Encoder(vocab_size=8, d_model=16, n_layers=1, head="nope"), ("head", "'nope'")),
    ("hybrid-ratio-zero", lambda t: recur.hybrid("gla", 0), ("ratio", "got 0")),
    ("task-unknown", lambda t: get_task("mqarr"), ("unknown task 'mqarr'",)),
    ("task-arg-unknown", lambda t: get_task("mqar", foo=1), ("foo", "Extra inputs")),
    ("task-arg-bool-for-int", lambda t: get_task("mqar", num_kv_pairs=True), ("num_kv_pairs", "integer", "True")),
    ("task-arg-str-for-int", lambda t: get_task("mqar", num_kv_pairs="abc"), ("num_kv_pairs", "integer")),
    ("task-arg-nan", lambda t: get_task("mqar", power_a=math.nan), ("power_a", "nan")),
    ("task-seq-len-short", lambda t: get_task("mqar").batch(2, 4, torch.Generator()), ("needs seq_len >= 32", "got 4")),
    ("task-split-unknown", lambda t: get_task("mqar").batch(2, 64, torch.Generator(), split="val"), ("split", "'val'")),
    ("config-missing-model", lambda t: RunConfig.model_validate({"task": "mqar"}), ("model", "Field required")),
    ("config-seed-bool", lambda t: RunConfig(task="mqar", model="gla", seed=True), ("seed", "integer", "True")),
    ("config-steps-bool", lambda t: RunConfig(task="mqar", model="gla", steps=True), ("steps", "integer", "True")),
    ("config-d_model-bool", lambda t: RunConfig(task="mqar", model="gla", d_model=True), ("d_model", "integer", "True")),
    ("config-lengths-bool", lambda t: RunConfig(task="mqar", model="gla", eval_lengths=[True]), ("lengths", "integer")),
    ("config-lr-inf", lambda t: RunConfig(task="mqar", model="gla", lr=math.inf), ("lr", "finite", "inf")),
    ("config-lr-nan", lambda t: RunConfig(task="mqar", model="gla", lr=math.nan), ("lr", "nan")),
    ("config-grad-clip-inf", lambda t: RunConfig(task="mqar", model="gla", grad_clip=math.inf), ("grad_clip", "finite")),
    ("config-weight-decay-inf", lambda t: RunConfig(task="mqar", model="gla", weight_decay=math.inf),
     ("weight_decay", "finite")),
    ("config-method-bool", lambda t: RunConfig(task="mqar", model="gla", training=[{"name": "tbptt", "k1": True}]),
     ("k1", "integer", "True")),
    ("config-method-nan", lambda t: RunConfig(task="mqar", model="gla", training=[{"name": "state_noise", "std": math.nan}]),
     ("std", "nan")),
    ("sweep-seeds-bool", lambda t: SweepConfig(models=["gla"], tasks=["mqar"], seeds=[True]), ("seeds", "integer", "True")),
    ("trainer-option-not-a-number", lambda t: _trainer(model_args={"n_heads": "abc"}), ("n_heads", "an int", "'abc'")),
    ("trainer-option-absent-mixer", lambda t: _trainer(model_args={"swa": {"window": 8}}), ("'swa'", "not in this model")),
    ("trainer-heads-do-not-divide", lambda t: _trainer(model_args={"n_heads": 3}), ("n_heads=3", "must divide")),
    ("trainer-checkpoint-every-zero", lambda t: _trainer(checkpoint_every=0), ("checkpoint_every", "got 0")),
    ("trainer-device-unknown", lambda t: _trainer(device="tpu"), ("bad device 'tpu'",)),
]


# ------------------------------------------------------------------ running the cases
def _fill(text: str, paths: dict[str, str]) -> str:
    for k, v in paths.items():
        text = text.replace("{" + k + "}", v)
    return text


def _paths(tmp: Path) -> dict[str, str]:
    (tmp / "notes.txt").write_text("not a database\n" * 20)
    (tmp / "ok.yaml").write_text(_OK_SWEEP)
    (tmp / "adir").mkdir(exist_ok=True)
    return {"textfile": str(tmp / "notes.txt"), "sweepfile": str(tmp / "ok.yaml"), "dir": str(tmp / "adir")}


def call_cli(argv: list[str]) -> tuple[int | None, str, BaseException | None]:
    """``recur ARGV`` in this process: (exit code, stderr, the exception that escaped main, if any)."""
    err = io.StringIO()
    code, escaped = None, None
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException as e:  # noqa: BLE001 - what a user would see as a traceback
            escaped = e
    return code, err.getvalue(), escaped


def cli_outcome(argv: list[str], phrases: tuple[str, ...]) -> tuple[str, str]:
    code, err, escaped = call_cli(argv)
    if escaped is not None or "Traceback" in err:
        return "traceback", f"{type(escaped).__name__}: {escaped}" if escaped else err.strip().splitlines()[-1]
    if code == 0:
        return "accepted", ""
    last = " | ".join(line for line in err.strip().splitlines() if line.strip())[-300:]
    return ("clear" if all(p in err for p in phrases) and code == 2 else "vague"), f"exit {code}: {last}"


def api_outcome(call, phrases: tuple[str, ...], tmp: Path) -> tuple[str, str]:
    try:
        call(tmp)
    except (ValueError, TypeError, IndexError, FileNotFoundError) as e:
        text = str(e)
        return ("clear" if all(p in text for p in phrases) else "vague"), f"{type(e).__name__}: {text[:300]}"
    except Exception as e:  # noqa: BLE001 - an obscure error
        return "obscure", f"{type(e).__name__}: {str(e)[:300]}"
    return "accepted", ""


def yaml_argv(tmp: Path, name: str, content: str | bytes) -> tuple[list[str], str]:
    path = tmp / f"{name}.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return ["sweep", str(path), "--db", str(tmp / f"{name}.sqlite")], str(path)


# ------------------------------------------------------------------ the tests
@pytest.mark.parametrize("name,argv,phrases", CLI, ids=[c[0] for c in CLI])
def test_cli_bad_input_is_a_clear_error(name, argv, phrases, tmp_path):
    paths = _paths(tmp_path)
    argv = [_fill(a, paths) for a in argv]
    if argv[0] in ("run", "bench") and "--db" not in argv:
        argv += ["--db", str(tmp_path / "runs.sqlite")]
    code, err, escaped = call_cli(argv)
    assert escaped is None, f"{type(escaped).__name__}: {escaped}"
    assert code == 2 and "Traceback" not in err, err
    for p in phrases:
        assert _fill(p, paths) in err, err
    assert len(err.strip().splitlines()) <= 8, err  # short


@pytest.mark.parametrize("name,content,phrases", YAML, ids=[c[0] for c in YAML])
def test_sweep_file_bad_input_is_a_clear_error_before_any_run(name, content, phrases, tmp_path):
    argv, path = yaml_argv(tmp_path, name, content)
    code, err, escaped = call_cli(argv)
    assert escaped is None, f"{type(escaped).__name__}: {escaped}"
    assert code == 2 and "Traceback" not in err, err
    for p in phrases:
        assert p.replace("{file}", path) in err, err
    assert not (tmp_path / f"{name}.sqlite").exists()  # nothing ran


@pytest.mark.parametrize("name,call,phrases", API, ids=[c[0] for c in API])
def test_api_bad_call_is_a_clear_error(name, call, phrases, tmp_path):
    with pytest.raises((ValueError, TypeError, IndexError, FileNotFoundError)) as info:
        call(tmp_path)
    for p in phrases:
        assert p in str(info.value), str(info.value)


# ------------------------------------------------------------------ the error handler itself
BAD_RUN = run("--model-arg", "n_heads=abc", model="gla")


def test_debug_shows_the_traceback_before_the_message(tmp_path):
    for argv in (["--debug", *BAD_RUN], [*BAD_RUN, "--debug"]):
        code, err, escaped = call_cli([*argv, "--db", str(tmp_path / "runs.sqlite")])
        assert escaped is None and code == 2
        assert "Traceback" in err and "n_heads must be an int" in err.strip().splitlines()[-1]


def test_an_unexpected_error_is_one_line_that_points_to_debug(monkeypatch):
    from recur import cli

    def broken(args, out, err):
        raise RuntimeError("something nobody checked")

    monkeypatch.setitem(cli.COMMANDS, "tasks", broken)
    code, err, escaped = call_cli(["tasks"])
    assert escaped is None and code == 1 and "Traceback" not in err
    assert "unexpected error: RuntimeError: something nobody checked" in err and "--debug" in err
    code, err, escaped = call_cli(["tasks", "--debug"])
    assert code == 1 and "Traceback" in err and "something nobody checked" in err


def test_ctrl_c_is_not_swallowed_as_an_error(monkeypatch):
    from recur import cli

    def interrupted(args, out, err):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "tasks", interrupted)
    code, err, escaped = call_cli(["tasks"])
    assert escaped is None and code == 130 and "interrupted" in err and "Traceback" not in err


def test_the_recur_script_exits_2_without_a_traceback(tmp_path):
    import subprocess

    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [gla\ntasks: [mqar]\n")
    exe = Path(sys.executable).with_name("recur")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "recur.cli"]
    proc = subprocess.run([*cmd, "sweep", str(bad), "--db", str(tmp_path / "r.sqlite")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: {bad}, line 2, column 6: bad YAML" in proc.stderr


# ------------------------------------------------------------------ what the fixes made possible
def test_models_lists_encoder_only_layers_apart(capsys):
    assert "bidirectional" in recur.list_models()  # the conformance suite tests every registered mixer
    assert "bidirectional" not in recur.list_models(causal=True) and "gla" in recur.list_models(causal=True)
    assert recur.list_models(causal=False) == [n for n in recur.list_models() if not recur.model_info(n).cls.causal]
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    head, encoders = out.split("encoder-only layers", 1)
    assert "bidirectional" in encoders and "bidirectional" not in head and "--arch encoder" in encoders
    assert main(["models", "--json"]) == 0
    import json

    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["models"]}
    assert rows["bidirectional"]["causal"] is False and rows["gla"]["causal"] is True


@pytest.mark.parametrize("name", ["gla", "lstm", "mamba", "attention", "rwkv7", "s4d"])
def test_float16_is_supported_like_bfloat16(name):
    torch.manual_seed(0)
    ref = build(name, d_model=16)
    half = build(name, d_model=16)
    half.load_state_dict(ref.state_dict())
    half = half.half()
    x = torch.randn(2, 7, 16)
    y, state = half(x.half())
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), ref(x)[0], rtol=0, atol=2e-2)
    first, carried = half(x.half()[:, :3])
    rest, _ = half(x.half()[:, 3:], carried)
    torch.testing.assert_close(torch.cat([first, rest], dim=1).float(), y.float(), rtol=0, atol=1e-2)
    with pytest.raises(TypeError, match="float16.*float32.*dtypes supported: float32, float64, bfloat16, float16"):
        ref(x.half())  # a float16 input to a float32 mixer: convert one of them


def test_yaml_reads_1e_minus_3_as_a_float_and_merge_keys_are_not_duplicates(tmp_path):
    from recur.config import load_yaml

    path = tmp_path / "g.yaml"
    path.write_text("lr: 1e-3\nsteps: 1e3\nbase: &b {x: 1, y: 2}\nover: {<<: *b, x: 3}\nname: 1e-3x\n")
    assert load_yaml(path) == {"lr": 0.001, "steps": 1000.0, "base": {"x": 1, "y": 2}, "over": {"x": 3, "y": 2},
                               "name": "1e-3x"}


def test_checking_a_run_changes_no_random_state_and_keeps_nothing():
    from recur.cli import check_run

    cfg = RunConfig(task="harness_shift", model="gla", d_model=16, n_layers=1, seq_len=8, device="cpu")
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    check_run(cfg)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_a_sweep_lists_every_run_that_cannot_start_at_once(tmp_path):
    content = _OK_SWEEP.replace("models: [elman]", "models: [elman, {name: gla, args: {n_heads: 3}}]") + "seeds: [0, 1]\n"
    argv, path = yaml_argv(tmp_path, "two", content)
    code, err, _ = call_cli(argv)
    assert code == 2 and "2 of 4 runs cannot start" in err and "run 3 (" in err and "run 4 (" in err
    assert not (tmp_path / "two.sqlite").exists()


# ------------------------------------------------------------------ counting (as a script)
def count(tmp: Path) -> dict[str, int]:
    from collections import Counter

    totals: dict[str, Counter] = {}
    paths = _paths(tmp)
    for kind, cases in (("cli", CLI), ("yaml", YAML), ("api", API)):
        c = totals.setdefault(kind, Counter())
        for name, arg, phrases in cases:
            if kind == "cli":
                argv = [_fill(a, paths) for a in arg]
                if argv[0] in ("run", "bench") and "--db" not in argv:
                    argv += ["--db", str(tmp / f"{name}.sqlite")]
                outcome, detail = cli_outcome(argv, tuple(_fill(p, paths) for p in phrases))
            elif kind == "yaml":
                argv, path = yaml_argv(tmp, name, arg)
                outcome, detail = cli_outcome(argv, tuple(p.replace("{file}", path) for p in phrases))
            else:
                outcome, detail = api_outcome(arg, phrases, tmp)
            c[outcome] += 1
            print(f"{kind:4s} {outcome:9s} {name}: {detail}", flush=True)
    for kind, c in totals.items():
        print(f"{kind}: {sum(c.values())} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    return totals


if __name__ == "__main__":
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        count(Path(d))


# ---------------------------------------------------------------- architecture sizes and the Trainer
@pytest.mark.parametrize("kwargs,phrase", [
    (dict(d_model="16"), "d_model must be a positive int, got '16'"),
    (dict(d_model=0), "d_model must be a positive int, got 0"),
    (dict(mlp_ratio=0), "mlp_ratio must be a finite number > 0"),
    (dict(mlp_ratio=float("nan")), "mlp_ratio must be a finite number > 0"),
])
@pytest.mark.parametrize("arch", ["causal_lm", "looped_lm", "encoder"])
def test_bad_architecture_sizes_are_named(arch, kwargs, phrase):
    from recur import ARCHITECTURES

    options = {**dict(vocab_size=8, d_model=16, n_layers=1, pattern="gla"), **kwargs}
    with pytest.raises(ValueError) as info:
        ARCHITECTURES.get(arch).cls(**options)
    assert phrase in str(info.value)


def test_the_trainer_takes_a_config_dict_and_names_anything_else():
    from recur.training import Trainer

    trainer = Trainer(dict(task="harness_shift", model="elman", d_model=8, n_layers=1, seq_len=8, steps=1,
                           batch_size=2, mlp=None, device="cpu"), progress=False)
    assert trainer.cfg.model.mixer == "elman"
    with pytest.raises(TypeError, match="RunConfig"):
        Trainer(["task", "parity"], progress=False)
