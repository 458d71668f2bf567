"""Benchmark dalle_fast.ops.gumbel_softmax against F.gumbel_softmax and torch.compile of the same formula.

    python benchmarks/bench_gumbel.py --device cpu|cuda [--shape 8,512,32,32] [--dtypes float32,bfloat16] [--json FILE]

Forward and forward+backward times (medians, warm-up and compilation excluded) and the
effective bandwidth of the forward: bytes of one read of the logits plus one write of the
sample, over the time. Before timing, our sample is checked against the formula applied to the
same Philox noise in float64 and its gradient against the formula's (y * (dy - sum(y * dy)) / tau)
on its sample, both as timed (the public op and its autograd backward), so a broken kernel
cannot post a number: each error may be at most twice the formula's own error in the benchmark
dtype plus a small floor.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from dalle_fast import ops  # noqa: E402
from dalle_fast.ops import _backend, reference  # noqa: E402
from dalle_fast.ops.gumbel import cuda_one_read_kernel  # noqa: E402

DEFAULTS = {"cpu": dict(shape=(8, 512, 32, 32), dtypes=("float32",), repeats=9, warmup=2),
            "cuda": dict(shape=(32, 8192, 32, 32), dtypes=("float32", "bfloat16"), repeats=50, warmup=10)}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run")
    ap.add_argument("--shape", help="logits shape, comma-separated; softmax over dim 1 "
                                    "(default: 8,512,32,32 on cpu, 32,8192,32,32 on cuda)")
    ap.add_argument("--dtypes", help="comma-separated (default: float32 on cpu, float32,bfloat16 on cuda)")
    ap.add_argument("--tau", type=float, default=1.0, help="temperature")
    ap.add_argument("--repeats", type=int, help="timed calls per figure, median reported")
    ap.add_argument("--warmup", type=int, help="untimed calls before each figure")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--quick", action="store_true", help="tiny shape, few repeats: a smoke test")
    ap.add_argument("--json", type=Path, help="result file (default: benchmarks/results/gumbel_<device>_<time>.json)")
    args = ap.parse_args(argv)
    d = DEFAULTS[args.device]
    args.shape = tuple(int(s) for s in args.shape.split(",")) if args.shape else ((2, 64, 8, 8) if args.quick else d["shape"])
    args.dtypes = tuple(args.dtypes.split(",")) if args.dtypes else d["dtypes"]
    args.repeats = args.repeats or (3 if args.quick else d["repeats"])
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else d["warmup"])
    if len(args.shape) < 2:
        ap.error("--shape needs at least two dims (softmax runs over dim 1)")
    return args


def formula(x: torch.Tensor, tau: float) -> torch.Tensor:
    """What F.gumbel_softmax computes (soft), written out so torch.compile can fuse it."""
    g = -torch.empty_like(x, memory_format=torch.legacy_contiguous_format).exponential_().log()
    return ((x + g) / tau).softmax(1)


# Floor of the accuracy rule per dtype, on top of twice the formula's own error in that dtype:
# forward absolute (the sample is at most 1); gradient relative to its largest entry (the
# tolerances of tests/ops/test_gumbel.py halved: the kernels' exp and sums round otherwise than
# PyTorch's, while a broken backward is off by the gradient's whole size).
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}
GRAD_FLOOR = {torch.float32: 1e-5, torch.bfloat16: 5e-3, torch.float16: 1e-3}


def _worst(got: torch.Tensor, exact: torch.Tensor) -> tuple[float, dict]:
    """Max abs difference of got from exact (float64) and where it is."""
    diff = (got.double() - exact).abs().flatten()  # once: 2 GiB in float64 at the CUDA shape
    worst = int(diff.argmax())
    err = diff[worst].item()
    del diff
    return err, {"index": worst, "ours": got.flatten()[worst].item(), "exact": exact.flatten()[worst].item()}


def check_ours(x: torch.Tensor, dy: torch.Tensor, tau: float, seed: int = 0) -> dict:
    """Ours as it is timed (ops.gumbel_softmax and its autograd backward, under the backend the
    caller selects) from a seeded generator, against the formula on the same Philox noise (the
    raw op from the same generator state tells which). The forward: against the formula in
    float64; the yardstick is the formula's own error in x's dtype (PyTorch ops, fp32 math), and
    ours may err by twice that plus a small floor, the rule the attention benchmark uses too.
    The backward for the cotangent dy: against the formula's gradient y * (dy - sum(y * dy)) / tau
    in float64 on ours' own y (which the backward reads as stored; y is checked by the forward
    rule), by the same rule: twice that formula's error in float32 math rounded to x's dtype,
    plus GRAD_FLOOR of the largest gradient entry."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    start = gen.get_state()
    xg = x.detach().clone().requires_grad_()
    y = ops.gumbel_softmax(xg, tau, dim=1, generator=gen)
    (grad,) = torch.autograd.grad(y, xg, dy)
    y = y.detach()
    del xg
    gen.set_state(start)  # the same generator state: the same noise
    _, _, state = torch.ops.dalle_fast.gumbel_softmax_fwd(x, tau, 1, False, False, gen)
    noise = torch.ops.dalle_fast.gumbel_noise(x, state, 1)
    exact = reference.gumbel_softmax(x.double(), tau, 1, noise=noise.double())
    err, worst = _worst(y, exact)
    formula_err = common.max_abs_diff(reference.gumbel_softmax(x, tau, 1, noise=noise), exact)
    del exact, noise
    tol = 2 * formula_err + FLOOR[x.dtype]

    y64, dy64 = y.double(), dy.double()
    grad_exact = y64 * (dy64 - (y64 * dy64).sum(1, keepdim=True)) / tau
    del y64, dy64
    grad_err, grad_worst = _worst(grad, grad_exact)
    y32, dy32 = y.float(), dy.float()
    grad_formula = (y32 * (dy32 - (y32 * dy32).sum(1, keepdim=True)) / tau).to(x.dtype)
    del y32, dy32
    grad_formula_err = common.max_abs_diff(grad_formula, grad_exact)
    grad_scale = grad_exact.abs().max().item()
    del grad_formula, grad_exact
    grad_tol = 2 * grad_formula_err + GRAD_FLOOR[x.dtype] * grad_scale
    backward = {"max_abs_err": grad_err, "formula_max_abs_err": grad_formula_err, "grad_scale": grad_scale,
                "tol": grad_tol, "ok": bool(grad_err <= grad_tol), "worst": grad_worst,
                "against": "y * (dy - sum(y * dy)) / tau in float64 on ours' y, dy ~ N(0, 1)"}
    return {"max_abs_err": err, "formula_max_abs_err": formula_err, "tol": tol, "ok": bool(err <= tol),
            "worst": worst, "backward": backward}


def one_read_kernel_runs(x: torch.Tensor, tau: float) -> bool:
    """Whether ours takes the one-read cluster kernel for x here (it falls back to the two-sweep
    kernel where the device cannot run it): one forward under DALLE_FAST_GUMBEL_RESIDENT=require."""
    with cuda_one_read_kernel("require"):
        try:
            torch.ops.dalle_fast.gumbel_softmax_fwd(x, tau, 1, False, False, None)
        except RuntimeError as exc:
            if "DALLE_FAST_GUMBEL_RESIDENT=require" not in str(exc):
                raise  # a kernel fault, not a refusal
            return False
    return True


# Ours on the two-sweep CUDA kernels, forward and backward: the same-run baseline of the one-read
# cluster kernels (the environment switch is held over both timings of the method).
TWO_SWEEP = "ours (two-sweep kernels)"


def kernel_path(name: str):
    """The one-read switch held over a method: off for TWO_SWEEP, on for the others; left alone
    where the environment turned it off (DALLE_FAST_GUMBEL_RESIDENT=0: everything two-sweep)."""
    if not _backend.switch_on("DALLE_FAST_GUMBEL_RESIDENT"):
        return contextlib.nullcontext()
    return cuda_one_read_kernel(name != TWO_SWEEP)


def bench_dtype(args, dtype_name: str) -> dict:
    device, tau = args.device, args.tau
    dtype = common.DTYPES[dtype_name]
    x = torch.randn(args.shape, device=device, dtype=dtype) * 2
    xg = x.clone().requires_grad_()
    dy = torch.randn_like(x)
    ours = {"ours": lambda t: ops.gumbel_softmax(t, tau, dim=1)}
    one_read = None
    if device == "cuda" and not _backend.switch_on("DALLE_FAST_GUMBEL_RESIDENT"):
        common.log(f"{dtype_name}: DALLE_FAST_GUMBEL_RESIDENT=0: ours runs the two-sweep kernels only")
    elif device == "cuda":
        ours[TWO_SWEEP] = ours["ours"]
        one_read = one_read_kernel_runs(x, tau)
        common.log(f"{dtype_name}: ours {'takes' if one_read else 'does NOT take'} the one-read kernel at this shape")
    checks = {}
    for name in ours:
        with kernel_path(name), ops.backend(device):  # as timed below
            acc = checks[name] = check_ours(x, dy, tau)
        bwd = acc["backward"]
        common.log(f"{dtype_name}: {name} vs the float64 formula on its own noise: max abs err "
                   f"{acc['max_abs_err']:.3g} (the formula in {dtype_name}: {acc['formula_max_abs_err']:.3g}; "
                   f"tolerance {acc['tol']:.3g}); gradient max abs err {bwd['max_abs_err']:.3g} (the formula in "
                   f"{dtype_name}: {bwd['formula_max_abs_err']:.3g}; tolerance {bwd['tol']:.3g})")
        if not acc["ok"]:
            raise SystemExit(f"{name} is off the float64 formula on its own noise by {acc['max_abs_err']:.3g} > "
                             f"{acc['tol']:.3g} ({dtype_name}; worst element {acc['worst']}): not timing it")
        if not bwd["ok"]:
            raise SystemExit(f"{name}: its gradient is off the formula's on its own sample by "
                             f"{bwd['max_abs_err']:.3g} > {bwd['tol']:.3g} ({dtype_name}; worst element "
                             f"{bwd['worst']}): not timing it")
    acc = checks["ours"]

    methods = {**ours, "F.gumbel_softmax": lambda t: F.gumbel_softmax(t, tau, dim=1)}
    notes = []
    if not args.no_compile:
        torch._dynamo.reset()
        compiled = torch.compile(formula)
        methods["torch.compile(formula)"] = lambda t: compiled(t, tau)

    def under(name, call):  # `call` on the kernel path of method `name`
        def run():
            with kernel_path(name):
                return call()
        return run

    fwds, boths = {}, {}
    for name, fn in methods.items():
        fwds[name] = under(name, lambda fn=fn: fn(x))
        boths[name] = under(name, lambda fn=fn: torch.autograd.grad(fn(xg), xg, dy)[0])
    results = {}
    with ops.backend(device):
        for name in list(methods):
            try:  # a baseline that cannot run here is reported, not fatal
                fwds[name]()
                boths[name]()
            except Exception as exc:
                notes.append(f"{name}: {type(exc).__name__}: {exc}")
                del fwds[name], boths[name]
        # in rounds, every method once per round: drift on a shared machine hits them alike
        fwd_times = common.time_interleaved(fwds, device, args.repeats, args.warmup)
        both_times = common.time_interleaved(boths, device, args.repeats, args.warmup)
    nbytes = 2 * x.numel() * x.element_size()
    for name, fwd in fwd_times.items():
        results[name] = {"fwd": fwd, "fwd_bwd": both_times[name], "fwd_gbps": nbytes / (fwd.median_ms * 1e-3) / 1e9}
    ours = results.get("ours")
    for name, r in results.items():
        if ours and name != "ours":
            r["ours_speedup_fwd"] = r["fwd"].median_ms / ours["fwd"].median_ms
            r["ours_speedup_fwd_bwd"] = r["fwd_bwd"].median_ms / ours["fwd_bwd"].median_ms
    return {"dtype": dtype_name, "accuracy": acc, "accuracy_by_method": checks, "one_read_kernel": one_read,
            "methods": results, "notes": notes}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    env = common.environment(args.device)
    with common.LoadMonitor() as load:
        per_dtype = [bench_dtype(args, d) for d in args.dtypes]
    rows = []
    for res in per_dtype:
        for name, r in res["methods"].items():
            rows.append([f"{res['dtype']} {name}", common.fmt_ms(r["fwd"].median_ms), common.fmt_ms(r["fwd_bwd"].median_ms),
                         f"{r['fwd_gbps']:.1f}", f"{r.get('ours_speedup_fwd', 1.0):.2f}x / {r.get('ours_speedup_fwd_bwd', 1.0):.2f}x"])
    print(common.describe(env))
    print(f"logits {args.shape}, softmax over dim 1, tau {args.tau}; medians of {args.repeats} after {args.warmup} warm-up")
    print(common.format_table(["method", "fwd ms", "fwd+bwd ms", "fwd GB/s", "ours faster by fwd / f+b"], rows))
    for res in per_dtype:
        for note in res["notes"]:
            print("note:", note)
    warning = common.load_warning(load.result())
    if warning:
        print("PROBLEM:", warning)
    path = common.write_json(args.json or common.default_result_path("gumbel", args.device), {
        "benchmark": "gumbel_softmax", "argv": sys.argv[1:], "shape": args.shape, "tau": args.tau,
        "environment": env, "machine_load": load.result(), "results": per_dtype,
        "bandwidth_rule": "fwd GB/s = (one read of the logits + one write of the sample) / fwd time"})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
