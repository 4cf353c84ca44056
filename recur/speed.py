"""``recur speed``: our fast modes against our sequential references, against peers, and
against the machine's measured limits, side by side in one process on identical inputs.

Every case builds its inputs once, checks that ours and the baseline compute the same thing
(max relative difference, reported), then times forward and forward+backward separately:
one warm-up run, then the median of repeated runs (fewer repeats for slow baselines, within
a time budget). The machine's limits are measured at start-up: peak float32 matmul GFLOP/s
(2048^3 matmul) and memory bandwidth GB/s (a large copy, bytes read + written). Each result
carries its fraction of the relevant limit (work done per second over the limit).

Results are rows ``{"name", "shape", "pass", "ours_s", "baseline", "baseline_s", "speedup",
"fraction_of_limit"}`` (speedup = baseline_s / ours_s) plus ``target``/``met`` for the rows
that carry one of issue 6's targets and ``extra`` (e.g. peak memory, a fitted slope).
"""

from __future__ import annotations

import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from recur.registry import SPEED_CASES

DTYPE = torch.float32
QUICK_REPEATS = 9


# ------------------------------------------------------------------------------ measuring
def measure(fn: Callable[[], Any], repeats: int = 5, budget_s: float = 20.0) -> float:
    """Median wall time of ``fn()`` over up to ``repeats`` runs after warm-up.

    Warm-up is one run, or two when a run is quick (under a tenth of the budget): glibc's
    allocator raises its mmap threshold only after the first large tensors are freed, so the
    first runs of a function pay page faults on fresh memory that later runs do not (measured:
    the same GLA forward at 0.10 s as the first function timed, 0.04 s later in the process).
    A slow ``fn`` (a reference loop) gets fewer runs: no more than fit in ``budget_s``,
    and at least one timed run after the warm-up. A quick one (under 1% of the budget) gets
    at least ``QUICK_REPEATS``: the same kernel varied by up to 1.6x between runs here.
    """
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    if first < budget_s / 10:
        start = time.perf_counter()
        fn()
        first = time.perf_counter() - start
    if first < budget_s / 100:  # cheap to repeat: more samples against this machine's noise
        repeats = max(repeats, QUICK_REPEATS)
    n = max(1, min(repeats, int(budget_s / max(first, 1e-9))))
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rss_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"{field_name}:\s+(\d+) kB", f.read())
        return int(m.group(1)) if m else None
    except OSError:
        return None


def peak_extra_memory_mb(fn: Callable[[], Any]) -> float | None:
    """Peak resident memory above the current level while ``fn()`` runs, in MB (Linux only:
    the kernel's high-water mark VmHWM, reset through /proc/self/clear_refs); None elsewhere."""
    before = _rss_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    fn()
    peak = _rss_kib("VmHWM")
    if before is None or peak is None:
        return None
    return max(0.0, (peak - before) / 1024)


@dataclass
class Machine:
    threads: int
    matmul_gflops: float
    bandwidth_gbs: float


def measure_machine(quick: bool = False) -> Machine:
    """Peak float32 matmul GFLOP/s and copy bandwidth (bytes read + written) on this machine."""
    n = 1024 if quick else 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = measure(lambda: a @ b, repeats=5 if quick else 9)
    gflops = 2 * n**3 / t / 1e9
    numel = (16 if quick else 64) * 2**20  # 64 Mi floats = 256 MB, far beyond the caches
    x, y = torch.randn(numel), torch.empty(numel)
    t = measure(lambda: y.copy_(x), repeats=5 if quick else 9)
    bandwidth = 2 * numel * 4 / t / 1e9
    return Machine(threads=torch.get_num_threads(), matmul_gflops=round(gflops, 1), bandwidth_gbs=round(bandwidth, 2))


@dataclass
class Result:
    name: str
    shape: str
    pass_: str  # "fwd" | "fwd+bwd"
    ours_s: float
    baseline: str
    baseline_s: float
    speedup: float
    fraction_of_limit: float | None = None
    target: str | None = None
    met: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["pass"] = d.pop("pass_")
        return d


# ------------------------------------------------------------------------------ helpers
def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=_g(seed), dtype=DTYPE) * scale


def _fwd_bwd(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], None]:
    """A closure running fn(*inputs) and a backward pass to every input that needs a gradient.

    The loss is a fixed random projection of the output, so the backward starts from a dense
    gradient as it does in training. (``out.sum()`` would start it from a stride-0 tensor,
    which batched matmuls copy matrix by matrix: 4096 copies per DeltaNet backward here.)
    """
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    weight: list[torch.Tensor] = []

    def run():
        for t in leaves:
            t.grad = None
        out = fn(*leaves)
        out = out[0] if isinstance(out, tuple) else out
        if not weight:
            weight.append(torch.randn(out.shape, generator=_g(99), dtype=torch.float32).to(out.device))
        (out.float() * weight[0]).sum().backward()

    return run


def _fwd(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], None]:
    def run():
        with torch.no_grad():
            fn(*inputs)

    return run


def _max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _pair(name, shape, ours, base, base_name, inputs, *, work=None, limit=None, machine=None,
          targets=None, repeats=5, passes=("fwd", "fwd+bwd"), extra=None) -> list[Result]:
    """Time ``ours`` and ``base`` (functions of ``inputs``) for each pass; one Result per pass.

    ``work(pass)`` is the work done (flops or bytes) and ``limit`` "matmul" or "bandwidth";
    ``targets[pass] = (text, predicate(result))``.
    """
    rows = []
    for p in passes:
        make = _fwd if p == "fwd" else _fwd_bwd
        ours_s = measure(make(ours, inputs), repeats)
        base_s = measure(make(base, inputs), repeats)
        frac = None
        if work is not None and machine is not None:
            per_s = work(p) / ours_s
            frac = per_s / (machine.matmul_gflops * 1e9 if limit == "matmul" else machine.bandwidth_gbs * 1e9)
        r = Result(name, shape, p, ours_s, base_name, base_s, base_s / ours_s,
                   None if frac is None else round(frac, 4), extra=dict(extra or {}))
        if targets and p in targets:
            r.target, check = targets[p]
            r.met = bool(check(r))
        rows.append(r)
    return rows


# ------------------------------------------------------------------------------ the cases
def case(name: str):
    """Register a speed case, ``fn(machine, quick) -> list[Result]``; cases run in registration order."""
    return SPEED_CASES.register(name)


@case("scan")
def scan_case(machine: Machine, quick: bool) -> list[Result]:
    """Target 1: the diagonal scan's fast mode >= 10x the reference and >= 25% of bandwidth."""
    from recur.ops.scan import diagonal_scan

    B, T, D = (2, 1024, 256) if quick else (8, 4096, 1024)
    log_a = -torch.rand(B, T, D, generator=_g(0), dtype=DTYPE) * 0.1
    b = _randn(B, T, D, seed=1)
    ours = lambda la, bb: diagonal_scan(la, bb, mode="chunk")[0]  # noqa: E731
    ref = lambda la, bb: diagonal_scan(la, bb, mode="reference")[0]  # noqa: E731
    diff = _max_rel_diff(ours(log_a, b), ref(log_a, b))
    n = B * T * D * 4
    # fwd reads log_a and b, writes h; backward also reads dh, a and h and writes two gradients
    work = lambda p: 3 * n if p == "fwd" else 8 * n  # noqa: E731
    targets = {"fwd": (">= 10x reference and >= 0.25 of bandwidth", lambda r: r.speedup >= 10 and r.fraction_of_limit >= 0.25)}
    return _pair("diagonal_scan", f"B={B} T={T} D={D}", ours, ref, "recur reference loop", [log_a, b],
                 work=work, limit="bandwidth", machine=machine, targets=targets, extra={"max_rel_diff": diff})


def _gla_inputs(quick: bool):
    B, H, T, K = (2, 2, 512, 32) if quick else (4, 4, 4096, 64)
    q = _randn(B, H, T, K, seed=2, scale=K**-0.5)
    k = _randn(B, H, T, K, seed=3)
    v = _randn(B, H, T, K, seed=4)
    log_alpha = torch.nn.functional.logsigmoid(_randn(B, H, T, K, seed=5) + 3.0) / 16  # GLA's gate
    return (B, H, T, K), [q, k, v, log_alpha]


@case("gla")
def gla_case(machine: Machine, quick: bool) -> list[Result]:
    """Target 2: GLA chunkwise >= 20x our recurrent reference and >= 10x fla's naive recurrent
    GLA, fwd+bwd; forward >= 30% of the matmul peak."""
    from recur.ops.gated import gated_matrix
    from recur.peers import fla_naive

    (B, H, T, K), inputs = _gla_inputs(quick)
    C = 64
    ours = lambda q, k, v, g: gated_matrix(q, k, v, g, mode="chunk", chunk_size=C)[0]  # noqa: E731
    ref = lambda q, k, v, g: gated_matrix(q, k, v, g, mode="reference")[0]  # noqa: E731
    # the chunk form's matmuls per token and head: q k^T, A v, q S, k^T v
    work = lambda p: B * H * T * 2 * (C * K + C * K + 2 * K * K)  # noqa: E731
    shape = f"B={B} H={H} T={T} dk=dv={K}"
    rows = _pair("gla_chunk", shape, ours, ref, "recur reference loop", inputs, work=work, limit="matmul",
                 machine=machine, extra={"max_rel_diff": _max_rel_diff(ours(*inputs), ref(*inputs))},
                 targets={"fwd+bwd": (">= 20x reference", lambda r: r.speedup >= 20),
                          "fwd": (">= 0.30 of matmul peak", lambda r: r.fraction_of_limit >= 0.30)})
    naive = fla_naive("fla_naive_recurrent_gla")
    if naive is not None:
        # fla's layout is [B, T, H, K] and it scales q by K^-0.5 itself
        peer = lambda q, k, v, g: naive(*(t.transpose(1, 2) for t in (q * K**0.5, k, v, g)))[0].transpose(1, 2)  # noqa: E731
        rows += _pair("gla_chunk", shape, ours, peer, "fla naive_recurrent_gla", inputs, work=work, limit="matmul",
                      machine=machine, extra={"max_rel_diff": _max_rel_diff(ours(*inputs), peer(*inputs))},
                      targets={"fwd+bwd": (">= 10x fla naive", lambda r: r.speedup >= 10)})
    return rows


def _delta_inputs(quick: bool, gated: bool):
    B, H, T, K = (2, 2, 512, 32) if quick else (4, 4, 4096, 64)
    q = _randn(B, H, T, K, seed=6)
    k = torch.nn.functional.normalize(_randn(B, H, T, K, seed=7), dim=-1)
    v = _randn(B, H, T, K, seed=8)
    beta = torch.sigmoid(_randn(B, H, T, seed=9))
    inputs = [q * K**-0.5, k, v, beta]
    if gated:
        inputs.append(torch.nn.functional.logsigmoid(_randn(B, H, T, seed=10) + 4.0))
    return (B, H, T, K), inputs


@case("deltanet")
def delta_case(machine: Machine, quick: bool) -> list[Result]:
    """Target 3: DeltaNet / gated DeltaNet chunkwise >= 10x the recurrent reference and fla's naive form."""
    from recur.ops.delta import delta_rule
    from recur.peers import fla_naive

    rows = []
    for gated in (False, True):
        (B, H, T, K), inputs = _delta_inputs(quick, gated)
        name = "gated_deltanet_chunk" if gated else "deltanet_chunk"
        shape = f"B={B} H={H} T={T} dk=dv={K}"
        ours = lambda *a: delta_rule(*a, mode="chunk", chunk_size=64)[0]  # noqa: E731
        ref = lambda *a: delta_rule(*a, mode="reference")[0]  # noqa: E731
        tgt = {p: (">= 10x reference", lambda r: r.speedup >= 10) for p in ("fwd", "fwd+bwd")}
        C = 64
        # the WY form's matmuls per chunk: k k^T, the triangular solve (C^3/3), w = T k, u = T v,
        # u - w S, q k^T, A u, q S, k^T u; counted per token
        work = lambda p, B=B, H=H, T=T, K=K: B * H * T * (2 * (4 * C * K + 2 * C * K + 3 * K * K) + C * C / 3)  # noqa: E731
        rows += _pair(name, shape, ours, ref, "recur reference loop", inputs, targets=tgt, work=work,
                      limit="matmul", machine=machine,
                      extra={"max_rel_diff": _max_rel_diff(ours(*inputs), ref(*inputs))})
        if gated:
            naive = fla_naive("fla_naive_recurrent_gated_delta_rule")
            peer = None if naive is None else (lambda q, k, v, b, g: naive(  # noqa: E731
                *(t.transpose(1, 2) for t in (q, k, v, b, g)), scale=1.0)[0].transpose(1, 2))
        else:
            naive = fla_naive("fla_delta_rule_recurrence")
            peer = None if naive is None else (lambda q, k, v, b: naive(q * K**0.5, k, v, b)[0])  # noqa: E731
        if peer is not None:
            tgt = {p: (">= 10x fla naive", lambda r: r.speedup >= 10) for p in ("fwd", "fwd+bwd")}
            rows += _pair(name, shape, ours, peer, "fla naive recurrent", inputs, targets=tgt, work=work,
                          limit="matmul", machine=machine, extra={"max_rel_diff": _max_rel_diff(ours(*inputs), peer(*inputs))})
    return rows


def _mixer_fn(mixer):
    return lambda x: mixer(x)[0]


@case("mingru")
def mingru_case(machine: Machine, quick: bool) -> list[Result]:
    """Target 4: minGRU's parallel scan >= 30x its sequential loop at T=4096.

    The scans run on the same coefficients (log(1 - z_t), log(z_t g(h~_t))) of a minGRU layer:
    the projections around them are the same matmuls in every mode, so a whole-layer ratio
    would measure those. Two parallel forms: Heinsen's log-space scan (the layer's "parallel"
    mode) and the diagonal scan's "chunk" mode (the compiled kernel on CPU)."""
    import recur
    from recur.ops.scan import diagonal_scan, log_space_scan

    B, T, D = (2, 1024, 128) if quick else (8, 4096, 256)
    torch.manual_seed(0)
    layer = recur.build("mingru", d_model=D)
    with torch.no_grad():
        u = layer.in_proj(_randn(B, T, D, seed=11))
        log_a, log_b = layer.log_coefficients(u[..., :-layer.d_hidden], u[..., -layer.d_hidden:])
    seq = lambda la, lb: diagonal_scan(la, lb.exp(), mode="reference")[0]  # noqa: E731
    logspace = lambda la, lb: log_space_scan(la, lb)[0]  # noqa: E731
    chunk = lambda la, lb: diagonal_scan(la, lb.exp(), mode="chunk")[0]  # noqa: E731
    shape = f"B={B} T={T} d={D}"
    tgt = {p: (">= 30x sequential loop", lambda r: r.speedup >= 30) for p in ("fwd", "fwd+bwd")}
    rows = []
    for name, fast in (("mingru_scan_logspace", logspace), ("mingru_scan_chunk", chunk)):
        diff = _max_rel_diff(fast(log_a, log_b), seq(log_a, log_b))
        rows += _pair(name, shape, fast, seq, "recur sequential loop", [log_a, log_b], targets=tgt,
                      extra={"max_rel_diff": diff})
    return rows


@case("mamba")
def mamba_case(machine: Machine, quick: bool) -> list[Result]:
    """Target 5: Mamba's selective scan (d_inner=1024, N=16, T=4096) >= 10x the sequential
    reference, reporting peak memory (a full B x T x D x N tensor would be 268 MB at B=1).

    The scan runs on the (u, dt, A, B, C) a Mamba layer computes for a random input. The whole
    layer is timed too, for context: its projections (four matmuls, ~0.1 s here) are the same
    in both modes, so the layer's ratio is bounded by them."""
    import recur
    from recur.ops.selective import selective_scan

    B, T, d_model = (1, 1024, 128) if quick else (1, 4096, 512)
    torch.manual_seed(0)
    fast = recur.build("mamba", d_model=d_model, mode="chunk")
    slow = recur.build("mamba", d_model=d_model, mode="recurrent")
    slow.load_state_dict(fast.state_dict())
    x = _randn(B, T, d_model, seed=12)
    with torch.no_grad():
        scan_in = list(fast.scan_inputs(x))
    ours = lambda *a: selective_scan(*a, mode="chunk")[0]  # noqa: E731
    ref = lambda *a: selective_scan(*a, mode="reference")[0]  # noqa: E731
    full_mb = B * T * fast.d_inner * fast.d_state * 4 / 2**20
    extra = {"max_rel_diff": _max_rel_diff(ours(*scan_in), ref(*scan_in)), "full_BTDN_tensor_mb": round(full_mb, 1)}
    for label, fn in (("ours", ours), ("reference", ref)):
        for p, make in (("fwd", _fwd), ("fwd+bwd", _fwd_bwd)):
            mb = peak_extra_memory_mb(make(fn, scan_in))
            extra[f"peak_mb_{label}_{p}"] = None if mb is None else round(mb, 1)
    tgt = {p: (">= 10x reference", lambda r: r.speedup >= 10) for p in ("fwd", "fwd+bwd")}
    shape = f"B={B} T={T} D={fast.d_inner} N={fast.d_state}"
    rows = _pair("mamba_selective_scan", shape, ours, ref, "recur recurrent loop", scan_in, targets=tgt, extra=extra,
                 repeats=3)
    layer_diff = _max_rel_diff(fast(x)[0].detach(), slow(x)[0].detach())
    return rows + _pair("mamba_layer", f"{shape} d_model={d_model}", _mixer_fn(fast), _mixer_fn(slow),
                        "same layer, recurrent mode", [x], extra={"max_rel_diff": layer_diff}, repeats=3)


@case("rnn")
def rnn_case(machine: Machine, quick: bool) -> list[Result]:
    """Target 6: lstm and gru fwd+bwd at least as fast as torch.nn.LSTM / torch.nn.GRU (oneDNN)."""
    import recur

    B, T, D = (4, 256, 64) if quick else (16, 1024, 256)
    x = _randn(B, T, D, seed=13)
    rows = []
    for name, cls in (("lstm", torch.nn.LSTM), ("gru", torch.nn.GRU)):
        torch.manual_seed(0)
        module = cls(D, D, batch_first=True)
        ours = recur.model_info(name).cls.from_torch(module)
        diff = _max_rel_diff(ours(x)[0].detach(), module(x)[0].detach())
        rows += _pair(name, f"B={B} T={T} d={D}", _mixer_fn(ours), lambda x, m=module: m(x)[0],
                      f"torch.nn.{cls.__name__}", [x], extra={"max_rel_diff": diff},
                      targets={"fwd+bwd": (">= 1.0x torch", lambda r: r.speedup >= 1.0)})
    return rows


@case("stream")
def stream_case(machine: Machine, quick: bool) -> list[Result]:
    """Target 7: per-token latency of a recurrent CausalLM at 32k tokens of context within 1.1x
    of that at 1k, memory flat; attention's growing latency and KV cache for contrast."""
    from recur import CausalLM, State

    short, long = (256, 4096) if quick else (1024, 32768)
    d_model, layers, vocab, steps = (64, 2, 256, 16) if quick else (256, 2, 256, 32)
    rows = []
    for pattern in ("gla", "attention"):
        torch.manual_seed(0)
        lm = CausalLM(vocab, d_model, layers, pattern=pattern).eval()
        per_token, floats = {}, {}
        for ctx in (short, long):
            if pattern == "attention":
                # A KV cache of ctx tokens: decode cost depends on its length, not its values,
                # so it is filled with random keys and values instead of a ctx^2 prefill.
                state = State({f"layer{i}": State(pos=torch.full((1,), ctx), k=torch.randn(1, m.n_heads, ctx, m.head_dim),
                                                  v=torch.randn(1, m.n_heads, ctx, m.head_dim))
                               for i, m in enumerate(lm.backbone.mixers)})
            else:
                with torch.no_grad():
                    _, state = lm(torch.randint(0, vocab, (1, ctx), generator=_g(14)))
            token = torch.randint(0, vocab, (1, 1), generator=_g(15))

            def decode(state=state, token=token):
                s = state
                with torch.no_grad():
                    for _ in range(steps):
                        _, s = lm(token, s)

            per_token[ctx] = measure(decode, repeats=3) / steps
            floats[ctx] = state.num_floats()
            mem = peak_extra_memory_mb(decode)
            floats[f"peak_mb_{ctx}"] = None if mem is None else round(mem, 2)
        r = Result(f"stream_{pattern}", f"d={d_model} L={layers} context {short} vs {long}", "fwd",
                   per_token[long], f"same model at {short} context", per_token[short],
                   per_token[short] / per_token[long],
                   extra={"latency_ratio_long_over_short": round(per_token[long] / per_token[short], 3),
                          f"state_floats_{short}": floats[short], f"state_floats_{long}": floats[long],
                          f"decode_peak_mb_{short}": floats[f"peak_mb_{short}"],
                          f"decode_peak_mb_{long}": floats[f"peak_mb_{long}"]})
        if pattern != "attention":
            r.target = "latency at long context <= 1.1x short, state flat"
            r.met = per_token[long] <= 1.1 * per_token[short] and floats[short] == floats[long]
        rows.append(r)
    return rows


def packed_resets(B: int, T: int, mean_length: int, seed: int) -> torch.Tensor:
    """Document starts of a packed batch: documents of geometric length (mean ``mean_length``)."""
    return torch.rand(B, T, generator=_g(seed)) < 1.0 / mean_length


@case("packing")
def packing_case(machine: Machine, quick: bool) -> list[Result]:
    """Packed documents (``resets``) against the same batch unpacked, fwd and fwd+bwd, per layer.

    The packed forms (a decay of zero at a reset, attention's block-diagonal mask) should cost
    little over the plain chunk form (target: <= 1.5x, i.e. speedup >= 0.67); the generic
    segmented form (one call per distinct boundary position) is reported beside it for gla."""
    import recur

    B, T, d_model, mean = (4, 1024, 64, 128) if quick else (8, 4096, 256, 512)
    resets = packed_resets(B, T, mean, seed=41)
    x = _randn(B, T, d_model, seed=42)
    shape = f"B={B} T={T} d={d_model} docs~{mean}"
    rows = []
    for name in ("gla", "mamba2", "gated_deltanet", "attention"):
        torch.manual_seed(0)
        m = recur.build(name, d_model=d_model)
        packed = lambda xx, m=m: m(xx, resets=resets)[0]  # noqa: E731
        plain = lambda xx, m=m: m(xx)[0]  # noqa: E731
        tgt = {p: ("packed <= 1.5x unpacked", lambda r: r.speedup >= 1 / 1.5) for p in ("fwd", "fwd+bwd")}
        rows += _pair(f"packed_{name}", shape, packed, plain, "the same batch unpacked", [x], targets=tgt,
                      repeats=3, extra={"documents": int(resets.sum()) + B})
    torch.manual_seed(0)
    m = recur.build("gla", d_model=d_model)
    generic = lambda xx: m._forward_packed(xx, m.init_state(B), resets)[0]  # noqa: E731
    rows += _pair("packed_gla_generic", shape, generic, lambda xx: m(xx)[0], "the same batch unpacked", [x],
                  repeats=3, passes=("fwd",), extra={"segments": len(recur.layers.packing.boundaries(resets)) + 1})
    return rows


@case("scaling")
def scaling_case(machine: Machine, quick: bool) -> list[Result]:
    """Target 8: forward time of gla, mamba and deltanet over T = 1k..64k has log-log slope <= 1.1."""
    import recur

    lengths = [256, 512, 1024, 2048] if quick else [1024, 2048, 4096, 8192, 16384, 32768, 65536]
    d_model = 64 if quick else 256
    rows = []
    for name in ("gla", "mamba", "deltanet"):
        torch.manual_seed(0)
        m = recur.build(name, d_model=d_model).eval()
        times = []
        for T in lengths:
            x = _randn(1, T, d_model, seed=16)
            times.append(measure(_fwd(_mixer_fn(m), [x]), repeats=3))
        lx, ly = [math.log(t) for t in lengths], [math.log(t) for t in times]
        mx, my = statistics.fmean(lx), statistics.fmean(ly)
        slope = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)
        linear = times[0] * lengths[-1] / lengths[0]  # the first length's time, scaled linearly
        rows.append(Result(f"scaling_{name}", f"d={d_model} T={lengths[0]}..{lengths[-1]}", "fwd", times[-1],
                           f"linear extrapolation from T={lengths[0]}", linear, linear / times[-1],
                           target="log-log slope <= 1.1", met=slope <= 1.1,
                           extra={"slope": round(slope, 3), "times_s": {str(T): round(t, 5) for T, t in zip(lengths, times)}}))
    return rows


def measure_interleaved(fns: list[Callable[[], Any]], repeats: int) -> list[float]:
    """Median wall time of each of ``fns``, run in turn (a, b, a, b, ...) after two warm-up rounds.

    For ratios on a shared machine: a burst of load from another process slows both sides of a
    round alike instead of whichever side happened to be running alone."""
    for _ in range(2):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


# (recur pattern, baseline, target ratio, CausalLM options): the slowest recur may be against its
# plain model. The LSTM LM of torch has no MLP, recur's default block has a SwiGLU one (about
# half its parameters and time at this size): "lstm_no_mlp" is the like-for-like comparison.
LAB_FAMILIES: tuple[tuple[str, str, float, dict[str, Any]], ...] = (
    ("attention", "gpt", 1.1, {}), ("lstm", "lstm", 1.1, {}), ("lstm", "lstm", 1.1, {"mlp": None}),
    ("mingru", "gpt", 1.5, {}), ("lru", "gpt", 1.5, {}), ("gla", "gpt", 1.5, {}), ("deltanet", "gpt", 1.5, {}),
    ("mamba", "gpt", 1.5, {}),
)
LAB_BASELINES = {"gpt": "plain SDPA GPT (nanoGPT)", "lstm": "torch.nn.LSTM LM"}


def lab_training_step(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                      logits: Callable[[torch.Tensor], torch.Tensor], losses: list[float]) -> Callable[[], None]:
    """One training step per call, as recur's Trainer takes it: forward, cross-entropy over every
    position, backward, clip_grad_norm_(1.0), AdamW (betas (0.9, 0.95), weight decay 0.1 on
    matrices only, lr 3e-3 as the bench suite). Cycles through ``batches``; appends each loss."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    keep = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": keep, "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95))
    step = [0]

    def run():
        inputs, targets = batches[step[0] % len(batches)]
        step[0] += 1
        out = logits(inputs)
        loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), targets.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())

    return run


def lab_step_rows(B: int, T: int, d_model: int, n_layers: int, vocab: int, repeats: int,
                  families: Iterable[tuple[str, str, float, dict[str, Any]]] = LAB_FAMILIES) -> list[Result]:
    """One Result per family: the median training step of recur's CausalLM(pattern=family) against
    its plain PyTorch model (recur.baselines) of the same d_model and layers, interleaved step by
    step on the same batches; ``extra`` holds both sides' parameter counts and first/last losses."""
    from recur import CausalLM
    from recur.baselines import SDPAGPT, TorchLSTMLM, n_params

    tokens = torch.randint(0, vocab, (4, B, T + 1), generator=_g(51))
    batches = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]
    shape = f"B={B} T={T} d={d_model} L={n_layers} V={vocab}"
    rows = []
    for pattern, base_name, ratio, options in families:
        torch.manual_seed(0)
        ours = CausalLM(vocab, d_model, n_layers, pattern=pattern, **options)
        torch.manual_seed(0)
        if base_name == "lstm":
            base = TorchLSTMLM(vocab, d_model, n_layers)
        else:
            heads = getattr(ours.mixers[0], "n_heads", None) if pattern == "attention" else None
            base = SDPAGPT(vocab, d_model, n_layers, n_heads=heads or max(1, d_model // 32), max_len=T)
        ours_losses: list[float] = []
        base_losses: list[float] = []
        ours_s, base_s = measure_interleaved(
            [lab_training_step(ours, batches, lambda x, m=ours: m(x).logits, ours_losses),
             lab_training_step(base, batches, base, base_losses)], repeats)
        r = Result(lab_step_name(pattern, options), shape, "train step", ours_s, LAB_BASELINES[base_name], base_s,
                   base_s / ours_s, target=f"step within {ratio}x of {LAB_BASELINES[base_name]}",
                   extra={"params_ours": n_params(ours), "params_baseline": n_params(base),
                          "modes": sorted({m.mode for m in ours.mixers}),
                          "loss_ours": [round(ours_losses[0], 4), round(ours_losses[-1], 4)],
                          "loss_baseline": [round(base_losses[0], 4), round(base_losses[-1], 4)]})
        r.met = r.speedup >= 1 / ratio
        rows.append(r)
    return rows


def lab_step_name(pattern: str, options: dict[str, Any]) -> str:
    return f"lab_step_{pattern}" + ("_no_mlp" if options.get("mlp", "swiglu") is None else "")


@case("lab_step")
def lab_step_case(machine: Machine, quick: bool) -> list[Result]:
    """Issue 13: the training step at lab sizes (batch 32, length 64, d_model 64, 2 layers, vocab
    256; full runs add d_model 128 at length 256) of recur's CausalLM per family against plain
    PyTorch: nanoGPT's SDPA transformer for attention (target within 1.1x) and for every other
    family of the bench suite and mamba (within 1.5x), a torch.nn.LSTM LM for lstm (within 1.1x)."""
    rows = lab_step_rows(32, 64, 64, 2, 256, repeats=5 if quick else 20)
    if not quick:
        rows += lab_step_rows(32, 256, 128, 2, 256, repeats=7)
    return rows


def sparse_head_rows(vocab: int, B: int, T: int, d_model: int, n_layers: int, repeats: int) -> Result:
    """One training step of a ``pattern="attention"`` CausalLM (no MLP) on MQAR batches as the
    Trainer takes it, with the head and the loss at the supervised positions only
    (``positions=batch.mask``) against the same model computing them at every position; the
    losses of the two must agree (they are the same function), which ``extra`` records."""
    from recur import CausalLM
    from recur.tasks import get_task

    task = get_task("mqar", vocab_size=vocab)
    gen = torch.Generator().manual_seed(52)
    batches = [task.batch(B, T, gen) for _ in range(4)]
    torch.manual_seed(0)
    model = CausalLM(vocab, d_model, n_layers, pattern="attention", mlp=None)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    keep = [p for p in model.parameters() if p.ndim < 2]
    losses: dict[bool, list[float]] = {True: [], False: []}

    def step(sparse: bool) -> Callable[[], None]:
        opt = torch.optim.SGD([{"params": decay}, {"params": keep}], lr=0.0)  # lr 0: both sides see one model
        calls = [0]

        def run():
            batch = batches[calls[0] % len(batches)]
            calls[0] += 1
            out = model(batch.inputs, positions=batch.mask) if sparse else model(batch.inputs)
            loss = model.loss(out, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses[sparse].append(loss.item())
        return run

    sparse_s, full_s = measure_interleaved([step(True), step(False)], repeats)
    gap = max(abs(a - b) for a, b in zip(losses[True], losses[False]))
    supervised = sum(int(b.mask.sum()) for b in batches) / (len(batches) * B * T)
    return Result(f"sparse_head_v{vocab}", f"B={B} T={T} d={d_model} L={n_layers} V={vocab}", "train step",
                  sparse_s, "the head at every position", full_s, full_s / sparse_s,
                  target="faster than the full head, same loss", met=full_s > sparse_s and gap < 1e-4,
                  extra={"supervised_fraction": round(supervised, 4), "max_loss_gap": gap})


@case("sparse_head")
def sparse_head_case(machine: Machine, quick: bool) -> list[Result]:
    """Issue 13: MQAR at Zoology's vocabulary (8192; batch 64, length 96, 2-layer attention at d
    64), where the head and loss over every position cost about 4x the rest of the step; and at
    the lab's vocabulary 256, where they cost little. The Trainer computes them only where the
    task supervises."""
    repeats = 3 if quick else 10
    return [sparse_head_rows(8192, 64, 96, 64, 2, repeats), sparse_head_rows(256, 64, 96, 64, 2, repeats)]


HF_GENERATE_PATTERNS = ("gla", "lstm", "attention")
HF_GENERATE_TARGET = 1.2  # transformers' generate at most this many times slower than recur's own


def hf_generate_rows(d_model: int, n_layers: int, prompt_len: int, new_tokens: int, repeats: int,
                     patterns: Iterable[str] = HF_GENERATE_PATTERNS, vocab: int = 257) -> list[Result]:
    """One Result per pattern: greedy ``generate`` of ``new_tokens`` after a prompt of ``prompt_len``
    (batch 1) through transformers (``RecurForCausalLM``, use_cache) against recur's own
    ``CausalLM.generate`` on the same model, interleaved call by call. Both generate the same
    tokens (``extra.same_tokens``); what differs is transformers' loop around the same forward
    calls (logits processors, stopping criteria, input preparation, output objects per step).
    Without transformers: no rows, and a message on stderr naming the extra to install."""
    try:
        from recur.hf import RecurForCausalLM
    except ImportError as e:
        print(f"recur speed: hf_generate skipped: {e}", file=sys.stderr)
        return []
    from recur import CausalLM
    from recur.config import ModelConfig

    prompt = torch.randint(0, vocab, (1, prompt_len), generator=_g(61))
    shape = f"B=1 prompt={prompt_len} new={new_tokens} d={d_model} L={n_layers} V={vocab}"
    rows = []
    for pattern in patterns:
        config = ModelConfig(mixer=pattern, d_model=d_model, n_layers=n_layers)
        torch.manual_seed(0)
        lm = CausalLM.from_config(config, vocab_size=vocab).eval()
        hf = RecurForCausalLM.from_recur(lm, config, vocab).eval()

        def with_hf(hf=hf):
            return hf.generate(prompt, max_new_tokens=new_tokens, do_sample=False, use_cache=True)

        def native(lm=lm):
            return lm.generate(prompt, new_tokens)

        same = bool(torch.equal(with_hf(), native()))
        hf_s, native_s = measure_interleaved([with_hf, native], repeats)
        target = f"transformers generate within {HF_GENERATE_TARGET}x of recur's, same tokens"
        r = Result(f"hf_generate_{pattern}", shape, "generate", hf_s, "recur CausalLM.generate", native_s,
                   native_s / hf_s, target=target,
                   extra={"tokens_per_s_hf": round(new_tokens / hf_s, 1),
                          "tokens_per_s_native": round(new_tokens / native_s, 1),
                          "hf_over_native": round(hf_s / native_s, 3), "same_tokens": same})
        r.met = same and hf_s <= HF_GENERATE_TARGET * native_s
        rows.append(r)
    return rows


@case("hf_generate")
def hf_generate_case(machine: Machine, quick: bool) -> list[Result]:
    """Hugging Face ``generate`` (greedy, with the state cache) of gla, lstm and attention
    CausalLMs (d_model 128, 2 layers, vocab 257; a prompt of 16 tokens, then 128 new tokens, 32
    with --quick) within 1.2x of recur's own generate on the same model. transformers' loop adds
    a fixed cost per token (about 0.2 ms on a 2-core CPU), so the ratio falls as the model grows."""
    if quick:
        return hf_generate_rows(128, 2, 16, 32, repeats=3)
    return hf_generate_rows(128, 2, 16, 128, repeats=7)


# ------------------------------------------------------------------------------ running
def run(only: Iterable[str] | None = None, quick: bool = False, threads: int | None = None,
        on_case: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure the machine, then every case (or those in ``only``); return the JSON document."""
    cases = SPEED_CASES.in_order()
    names = cases if not only else list(only)
    unknown = [n for n in names if n not in SPEED_CASES]
    if unknown:
        import difflib

        hints = {n: difflib.get_close_matches(n, cases, n=1) for n in unknown}
        shown = ", ".join(f"{n!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for n, h in hints.items())
        raise ValueError(f"unknown speed case {shown}; cases are: {', '.join(cases)}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        machine = measure_machine(quick)
        results = []
        for n in names:
            if on_case:
                on_case(n)
            results += SPEED_CASES.get(n).obj(machine, quick)
    finally:  # a library call must not leave the process's thread count changed
        torch.set_num_threads(previous)
    return {"machine": asdict(machine), "quick": quick, "torch": torch.__version__,
            "python": sys.version.split()[0], "results": [r.as_json() for r in results]}


def markdown(doc: dict[str, Any], command: str) -> str:
    """The benchmarks/RESULTS.md table for a ``run`` document."""
    m = doc["machine"]
    lines = [
        "# Speed results",
        "",
        f"Produced by `{command}` (torch {doc['torch']}, Python {doc['python']}, "
        f"{m['threads']} threads{', quick shapes' if doc['quick'] else ''}).",
        "",
        f"Machine limits measured at start-up: **{m['matmul_gflops']} GFLOP/s** float32 matmul, "
        f"**{m['bandwidth_gbs']} GB/s** memory bandwidth (copy, read + write).",
        "",
        "speedup = baseline time / our time; fraction = our work rate over the relevant machine limit.",
        "",
        "| case | shape | pass | ours (s) | baseline | baseline (s) | speedup | fraction of limit | target | met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        frac = "" if r["fraction_of_limit"] is None else f"{r['fraction_of_limit']:.3f}"
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['name']} | {r['shape']} | {r['pass']} | {r['ours_s']:.4g} | {r['baseline']} | "
                     f"{r['baseline_s']:.4g} | {r['speedup']:.2f}x | {frac} | {r['target'] or ''} | {met} |")
    extras = [(r["name"], r["pass"], r["extra"]) for r in doc["results"] if r["extra"]]
    if extras:
        lines += ["", "## Details", ""]
        for name, p, extra in extras:
            shown = ", ".join(f"{k}={v}" for k, v in extra.items())
            lines.append(f"- {name} ({p}): {shown}")
    return "\n".join(lines) + "\n"
