"""Time dalle_fast.ops.sparse_attention against the baselines it has to beat.

For each mask kind (row, column, conv, causal) and the same inputs, forward and forward+backward
medians of:
  ours          ops.sparse_attention under backend("cpu"|"cuda")
  reference     the same call under backend("reference"): dense masked PyTorch
  sdpa_mask     F.scaled_dot_product_attention with the dense boolean [N, N] mask
  sdpa_causal   F.scaled_dot_product_attention(is_causal=True), dense causal   (CUDA only)
  flex          compiled FlexAttention with an arithmetic mask_mod of the exact mask (CUDA only)

Before anything is timed, every method is run once forward+backward and compared with an fp32
reference; a method whose output or gradients miss the tolerance is reported and not timed,
so a broken kernel cannot post a fast number. That run also does the compilation (FlexAttention),
and `time_interleaved` adds further untimed warm-up calls, then times the methods in rounds
(each round calls every method once, so drifting machine speed hits all alike).

Useful FLOPs count only the score entries the mask allows: forward 4*B*H*N*N*D*density,
backward 2.5x that (forward+backward = 3.5x).

    PYTHONPATH=. python benchmarks/bench_attention.py --device cpu
    PYTHONPATH=. python benchmarks/bench_attention.py --device cuda --json out.json
    PYTHONPATH=. python benchmarks/bench_attention.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import math
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from common import (DTYPES, LoadMonitor, default_result_path, describe, environment, fmt_ms,  # noqa: E402
                    format_table, load_warning, log, max_abs_diff, time_interleaved, write_json)

from dalle_fast import ops  # noqa: E402

# Per-device defaults: the shapes of GPU.md's baselines (N = 256 + 32*32 = 1280).
DEFAULTS = {
    "cpu": dict(batch=1, heads=8, text_len=256, grid=32, dim=64, dtype="float32", repeats=9, warmup=2, kernel=11),
    "cuda": dict(batch=8, heads=16, text_len=256, grid=32, dim=64, dtype="bfloat16", repeats=50, warmup=10, kernel=11),
}
QUICK = dict(batch=1, heads=2, text_len=16, grid=8, dim=32, repeats=3, warmup=1, kernel=5)

# Absolute tolerance per dtype, relative to max|reference|; on top of it a method may err by up
# to 2x what the dense reference itself errs in that dtype (flash-attention's test rule).
ATOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# Kinds where ours must beat SDPA-with-mask by this factor on forward+backward (the sparse ones).
TARGET_SPEEDUP = 2.0
SPARSE_KINDS = ("row", "column", "conv")

# Methods that compute another mask than the kind being benchmarked (checked against that one).
METHOD_MASK = {"sdpa_causal": "causal"}


@dataclass
class Config:
    device: str
    batch: int
    heads: int
    text_len: int
    grid: int
    dim: int
    dtype: str
    kinds: tuple[str, ...]
    repeats: int
    warmup: int
    kernel: int
    quick: bool
    threads: int

    @property
    def n(self) -> int:
        return self.text_len + self.grid * self.grid


def parse_args(argv: list[str] | None = None) -> tuple[Config, Path | None]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to run; ours runs under backend(<device>)")
    p.add_argument("--json", type=Path, default=None,
                   help="result file (default: benchmarks/results/attention_<device>_<YYYYmmdd-HHMMSS>.json)")
    p.add_argument("--batch", type=int, help="B (default: 1 on cpu, 8 on cuda)")
    p.add_argument("--heads", type=int, help="H (default: 8 on cpu, 16 on cuda)")
    p.add_argument("--text-len", type=int, help="T, text positions (default: 256)")
    p.add_argument("--grid", type=int, help="S, image side; N = T + S*S (default: 32)")
    p.add_argument("--dim", type=int, help="D, head dim (default: 64)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--kinds", default=",".join(ops.KINDS), help="comma-separated mask kinds")
    p.add_argument("--repeats", type=int, help="timed calls per figure, median reported (default: 9 cpu, 50 cuda)")
    p.add_argument("--warmup", type=int, help="untimed calls before each figure (default: 2 cpu, 10 cuda)")
    p.add_argument("--kernel", type=int, help="conv kernel size, odd (default: 11)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for the CPU run (default: leave torch's default)")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes and few repeats: a smoke test that takes seconds (explicit flags still win)")
    a = p.parse_args(argv)

    values = dict(DEFAULTS[a.device])
    if a.quick:
        values.update(QUICK)
    for name in ("batch", "heads", "text_len", "grid", "dim", "dtype", "repeats", "warmup", "kernel"):
        if getattr(a, name) is not None:
            values[name] = getattr(a, name)
    kinds = tuple(k.strip() for k in a.kinds.split(",") if k.strip())
    for kind in kinds:
        if kind not in ops.KINDS:
            p.error(f"unknown kind {kind!r}; expected some of {', '.join(ops.KINDS)}")
    if not kinds:
        p.error("--kinds is empty")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device")
    for name in ("batch", "heads", "text_len", "grid", "dim", "repeats"):
        if values[name] < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {values[name]}")
    if values["warmup"] < 0:
        p.error("--warmup must be >= 0")
    if a.threads is not None:
        if a.threads < 1:
            p.error("--threads must be >= 1")
        torch.set_num_threads(a.threads)
    return Config(device=a.device, kinds=kinds, quick=a.quick, threads=torch.get_num_threads(), **values), a.json


# --------------------------------------------------------------------------- methods


def flex_mask_mod(kind: str, text_len: int, grid: int, kernel: int):
    """SPEC.md's mask as index arithmetic (no tensor lookups), as FlexAttention wants it."""
    half = kernel // 2

    def mask_mod(b, h, q_idx, kv_idx):
        d = q_idx - kv_idx  # >= 0 where causal; for two image positions, the raster offset
        causal = kv_idx <= q_idx
        if kind == "causal":
            return causal
        if kind == "row":
            image_ok = d <= grid
        elif kind == "column":
            image_ok = (d % grid) == 0
        elif kind == "conv":
            image_ok = (d - 0).abs() <= half
            for a in range(1, half + 1):
                image_ok = image_ok | ((d - grid * a).abs() <= half)
        else:
            raise ValueError(kind)
        # Text keys are always visible to image queries; text queries only reach text keys anyway.
        return causal & ((kv_idx < text_len) | image_ok)

    return mask_mod


def _set_dynamo_limits() -> None:
    # Each (kind, shape) compiles once; dynamo's default limit of 8 would silently drop to eager.
    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 64))


def build_methods(cfg: Config, kind: str, scale: float, notes: list[str]) -> dict[str, Callable | str]:
    """name -> fn(q, k, v) -> out, or name -> str saying why the method is skipped."""
    dev, T, S, K = cfg.device, cfg.text_len, cfg.grid, cfg.kernel
    methods: dict[str, Callable | str] = {}

    def ours(q, k, v):
        with ops.backend(dev):
            return ops.sparse_attention(q, k, v, kind, T, S, K, scale)

    def reference(q, k, v):
        with ops.backend("reference"):
            return ops.sparse_attention(q, k, v, kind, T, S, K, scale)

    mask = ops.attention_mask(kind, T, S, K, device=dev)  # built once, outside the timed calls

    def sdpa_mask(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    methods["ours"] = ours
    methods["reference"] = reference
    methods["sdpa_mask"] = sdpa_mask

    if dev != "cuda":
        methods["sdpa_causal"] = "CUDA-only column"
        methods["flex"] = "CUDA-only column"
        return methods

    def sdpa_causal(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

    methods["sdpa_causal"] = sdpa_causal

    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        methods["flex"] = f"FlexAttention unavailable in torch {torch.__version__}: {exc}"
        return methods
    try:
        torch._dynamo.reset()  # a fresh cache per kind: no recompiles piling up across kinds
        _set_dynamo_limits()
        block_mask = create_block_mask(flex_mask_mod(kind, T, S, K), B=None, H=None,
                                       Q_LEN=cfg.n, KV_LEN=cfg.n, device=dev)
        compiled = torch.compile(flex_attention, dynamic=False)

        def flex(q, k, v):
            return compiled(q, k, v, block_mask=block_mask, scale=scale)

        methods["flex"] = flex
    except Exception as exc:  # noqa: BLE001 - a missing baseline is a note, not a crash
        methods["flex"] = f"FlexAttention setup failed: {exc!r}"
    return methods


# --------------------------------------------------------------------------- checks and timing


def make_inputs(cfg: Config, dtype: torch.dtype, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape = (cfg.batch, cfg.heads, cfg.n, cfg.dim)
    q, k, v, grad_out = (torch.randn(shape, generator=g).to(cfg.device, dtype) for _ in range(4))
    return [t.requires_grad_() for t in (q, k, v)], grad_out


def fwd_bwd(fn, qkv, grad_out):
    out = fn(*qkv)
    grads = torch.autograd.grad(out, qkv, grad_out)
    return out, grads


def check_accuracy(fn, qkv, grad_out, ref32, ref_lowp_err, dtype) -> dict:
    """Max abs error of out, dq, dk, dv against the fp32 reference, and whether each passes."""
    out, grads = fwd_bwd(fn, qkv, grad_out)
    result, ok = {}, True
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), ref32):
        err = max_abs_diff(got, want)
        if not math.isfinite(err):
            err = float("inf")
        tol = 2 * ref_lowp_err[name] + ATOL[dtype] * max(1.0, want.abs().max().item())
        result[name] = {"max_abs_err": err, "tol": tol}
        ok = ok and err <= tol
    result["ok"] = ok
    return result


def reference_targets(cfg: Config, mask_kind: str, qkv, grad_out, scale: float, dtype: torch.dtype):
    """fp32 reference (out, dq, dk, dv) for `mask_kind`, and the reference's own error in `dtype`."""
    names = ("out", "dq", "dk", "dv")

    def ref_fn(q, k, v):
        with ops.backend("reference"):
            return ops.sparse_attention(q, k, v, mask_kind, cfg.text_len, cfg.grid, cfg.kernel, scale)

    qkv32 = [t.detach().float().requires_grad_() for t in qkv]
    out32, grads32 = fwd_bwd(ref_fn, qkv32, grad_out.float())
    ref32 = [t.detach() for t in (out32, *grads32)]
    if dtype == torch.float32:
        return ref32, dict.fromkeys(names, 0.0)
    out_lp, grads_lp = fwd_bwd(ref_fn, qkv, grad_out)
    return ref32, {n: max_abs_diff(a, b) for n, a, b in zip(names, (out_lp, *grads_lp), ref32)}


def bench_kind(cfg: Config, kind: str, notes: list[str]) -> dict:
    dtype = DTYPES[cfg.dtype]
    scale = 1.0 / math.sqrt(cfg.dim)
    density = ops.mask_density(kind, cfg.text_len, cfg.grid, cfg.kernel)
    flops_fwd = 4 * cfg.batch * cfg.heads * cfg.n * cfg.n * cfg.dim * density
    flops_fwdbwd = flops_fwd * 3.5
    qkv, grad_out = make_inputs(cfg, dtype, seed=0)

    # The yardstick per mask: the dense reference in fp32 on the same (rounded) inputs, and how
    # far the reference itself drifts from it in the benchmark dtype. Every method is held to
    # the mask it computes: the kind's, or dense causal for sdpa_causal.
    yardsticks: dict[str, tuple[list[torch.Tensor], dict[str, float]]] = {}

    def yardstick(mask_kind: str):
        if mask_kind not in yardsticks:
            yardsticks[mask_kind] = reference_targets(cfg, mask_kind, qkv, grad_out, scale, dtype)
        return yardsticks[mask_kind]

    methods = build_methods(cfg, kind, scale, notes)
    results: dict[str, dict] = {}
    timed: dict[str, Callable] = {}
    for name, fn in methods.items():
        if isinstance(fn, str):
            results[name] = {"status": "skipped", "why": fn}
            continue
        try:
            ref32, ref_lowp_err = yardstick(METHOD_MASK.get(name, kind))
            acc = check_accuracy(fn, qkv, grad_out, ref32, ref_lowp_err, dtype)
        except Exception as exc:  # noqa: BLE001 - an unavailable method is a note, not a crash
            why = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
            results[name] = {"status": "skipped", "why": why}
            notes.append(f"{kind}/{name}: skipped, {why}")
            if name == "ours":
                log(traceback.format_exc())
            continue
        if not acc["ok"]:
            results[name] = {"status": "mismatch", "accuracy": acc}
            bad = ", ".join(f"{t} err {v['max_abs_err']:.3g} > tol {v['tol']:.3g}" for t, v in acc.items()
                            if isinstance(v, dict) and not v["max_abs_err"] <= v["tol"])
            results[name]["why"] = f"mismatch vs the fp32 reference: {bad}"
            notes.append(f"{kind}/{name}: MISMATCH vs the fp32 reference ({bad}); not timed")
            continue
        log(f"  {kind:7s} {name:12s} accuracy ok (max err out {acc['out']['max_abs_err']:.1e}, "
            f"dq {acc['dq']['max_abs_err']:.1e}, dk {acc['dk']['max_abs_err']:.1e}, dv {acc['dv']['max_abs_err']:.1e})")
        results[name] = {"status": "ok", "accuracy": acc}
        timed[name] = fn

    log(f"  {kind:7s} timing {', '.join(timed)} (interleaved, {cfg.repeats} rounds) ...")
    for phase, call in (("fwd", lambda fn: fn(*qkv)), ("fwdbwd", lambda fn: fwd_bwd(fn, qkv, grad_out))):
        fns = {n: (lambda fn=fn: call(fn)) for n, fn in timed.items()}
        try:
            timings = time_interleaved(fns, cfg.device, cfg.repeats, cfg.warmup)
        except Exception:  # noqa: BLE001 - find the method that fails (OOM, ...) and time the rest alone
            timings = {}
            for n, fn in fns.items():
                try:
                    timings[n] = time_interleaved({n: fn}, cfg.device, cfg.repeats, cfg.warmup)[n]
                except Exception as exc:  # noqa: BLE001
                    why = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
                    results[n] = {**results[n], "status": "skipped", "why": f"{phase} timing failed: {why}"}
                    notes.append(f"{kind}/{n}: {phase} timing failed, {why}")
        for n, t in timings.items():
            results[n][phase] = t.to_dict()
        # One line per phase as soon as it is timed: a run cut off later still leaves these figures.
        log(f"  {kind:7s} {phase:6s} medians: " + ", ".join(f"{n} {fmt_ms(t.median_ms)}" for n, t in timings.items()))
    for n in timed:  # a method is only "ok" with both figures
        if results[n]["status"] == "ok" and not ("fwd" in results[n] and "fwdbwd" in results[n]):
            results[n]["status"] = "skipped"
            results[n].setdefault("why", "timing failed")
    if cfg.device == "cuda":
        torch.cuda.empty_cache()

    speedup = {}
    ours = results.get("ours", {})
    if ours.get("status") == "ok":
        for base in ("reference", "sdpa_mask", "sdpa_causal", "flex"):
            b = results.get(base, {})
            if b.get("status") == "ok":
                speedup[base] = {p: b[p]["median_ms"] / ours[p]["median_ms"] for p in ("fwd", "fwdbwd")}
        ours_gflops = {"fwd": flops_fwd / ours["fwd"]["median_ms"] / 1e6,
                       "fwdbwd": flops_fwdbwd / ours["fwdbwd"]["median_ms"] / 1e6}
    else:
        ours_gflops = None

    # FlexAttention that silently fell back to eager (recompile limit) runs ~100x slower: flag it.
    flex, sdpa = results.get("flex", {}), results.get("sdpa_mask", {})
    if flex.get("status") == "ok" and sdpa.get("status") == "ok":
        ratio = flex["fwdbwd"]["median_ms"] / sdpa["fwdbwd"]["median_ms"]
        if ratio > 5:
            notes.append(f"{kind}/flex: {ratio:.0f}x slower than SDPA-with-mask on fwd+bwd; suspect an eager "
                         "fallback (dynamo recompile limit) rather than a real figure")

    return {"density": density, "flops_fwd": flops_fwd, "flops_fwdbwd": flops_fwdbwd,
            "reference_lowp_err": {m: y[1] for m, y in yardsticks.items()}, "methods": results, "speedup_of_ours": speedup,
            "ours_gflops": ours_gflops}


# --------------------------------------------------------------------------- report


def _pair(res: dict) -> str:
    if res.get("status") == "ok":
        return f"{fmt_ms(res['fwd']['median_ms'])} / {fmt_ms(res['fwdbwd']['median_ms'])}"
    return {"mismatch": "MISMATCH", "skipped": "n/a"}.get(res.get("status"), "?")


def print_table(cfg: Config, env: dict, per_kind: dict) -> None:
    names = ["ours", "reference", "sdpa_mask"] + (["sdpa_causal", "flex"] if cfg.device == "cuda" else [])
    headers = ["kind", "density", "ours err"] + [f"{n} ms fwd / f+b" for n in names]
    headers += ["ours vs sdpa_mask fwd / f+b"]
    if cfg.device == "cuda":
        headers += ["ours vs flex fwd / f+b"]
    headers += ["ours GFLOP/s fwd / f+b"]
    rows = []
    for kind, r in per_kind.items():
        m = r["methods"]
        acc = m["ours"].get("accuracy")
        err = max(v["max_abs_err"] for v in acc.values() if isinstance(v, dict)) if acc else None
        row = [kind, f"{r['density']:.3f}", "-" if err is None else f"{err:.1e}"]
        row += [_pair(m[n]) for n in names]
        for base in ["sdpa_mask"] + (["flex"] if cfg.device == "cuda" else []):
            s = r["speedup_of_ours"].get(base)
            row.append(f"{s['fwd']:.2f}x / {s['fwdbwd']:.2f}x" if s else "-")
        g = r["ours_gflops"]
        row.append(f"{g['fwd']:.1f} / {g['fwdbwd']:.1f}" if g else "-")
        rows.append(row)
    print(describe(env))
    print(f"shape B={cfg.batch} H={cfg.heads} T={cfg.text_len} S={cfg.grid} N={cfg.n} D={cfg.dim} "
          f"kernel={cfg.kernel} dtype={cfg.dtype}; medians of {cfg.repeats} interleaved rounds after {cfg.warmup} "
          f"warm-up calls; "
          f"ours err = max abs error of out/dq/dk/dv vs the fp32 reference")
    print(format_table(headers, rows))


def main(argv: list[str] | None = None) -> int:
    cfg, json_path = parse_args(argv)
    env = environment(cfg.device)
    notes: list[str] = []
    if cfg.device == "cuda":
        try:
            torch.backends.cuda.matmul.allow_tf32 = False  # keep fp32 references exact
        except AttributeError:
            pass
    per_kind = {}
    with LoadMonitor() as monitor:
        for kind in cfg.kinds:
            log(f"{kind}: checking and timing ...")
            per_kind[kind] = bench_kind(cfg, kind, notes)
    load = monitor.result()
    contended = load_warning(load) if cfg.device == "cpu" else None

    problems = []
    for kind, r in per_kind.items():
        ours = r["methods"]["ours"]
        if ours.get("status") != "ok":
            problems.append(f"{kind}: ours is {ours.get('status')}: {ours.get('why', '?')}")
            continue
        s = r["speedup_of_ours"].get("sdpa_mask")
        # --quick shapes are too small for speed to mean anything; only check real shapes.
        if not cfg.quick and kind in SPARSE_KINDS and s and s["fwdbwd"] < TARGET_SPEEDUP:
            problems.append(f"{kind}: ours is only {s['fwdbwd']:.2f}x SDPA-with-mask on fwd+bwd "
                            f"(target >= {TARGET_SPEEDUP:.0f}x)")

    if contended:
        problems.append(contended)
    print_table(cfg, env, per_kind)
    for line in notes:
        print(f"note: {line}")
    for line in problems:
        print(f"PROBLEM: {line}")

    payload = {
        "benchmark": "attention",
        "argv": sys.argv[1:] if argv is None else list(argv),
        "config": asdict(cfg),
        "shape": {"B": cfg.batch, "H": cfg.heads, "T": cfg.text_len, "S": cfg.grid, "N": cfg.n,
                  "D": cfg.dim, "kernel": cfg.kernel},
        "dtype": cfg.dtype,
        "environment": env,
        "method_descriptions": {
            "ours": f"dalle_fast.ops.sparse_attention under backend({cfg.device!r})",
            "reference": "dalle_fast.ops.sparse_attention under backend('reference') (dense masked PyTorch)",
            "sdpa_mask": "F.scaled_dot_product_attention with the dense bool [N, N] mask (built outside timing)",
            "sdpa_causal": "F.scaled_dot_product_attention(is_causal=True): dense causal, CUDA only",
            "flex": "torch.compile(flex_attention) with an arithmetic mask_mod and create_block_mask, CUDA only",
        },
        "timing": {"repeats": cfg.repeats, "warmup": cfg.warmup, "statistic": "median",
                   "order": "interleaved rounds: each repeat calls every method once",
                   "forward": "grad-enabled forward call", "fwdbwd": "forward + torch.autograd.grad(out, (q,k,v), g)"},
        "flops": "useful FLOPs: fwd 4*B*H*N*N*D*density, bwd 2.5x fwd, fwdbwd 3.5x fwd",
        "accuracy_rule": "max abs err vs fp32 reference <= 2*(reference-in-dtype err) + atol[dtype]*max(1, max|ref|)",
        "machine_load": load,
        "results": per_kind,
        "notes": notes,
        "problems": problems,
    }
    path = write_json(json_path or default_result_path("attention", cfg.device), payload)
    print(f"wrote {path}")
    # ours wrong, or not run at all (it raised, or cannot take the dtype): not a clean run (gpu_check reads rc)
    return 1 if any(r["methods"]["ours"].get("status") != "ok" for r in per_kind.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
