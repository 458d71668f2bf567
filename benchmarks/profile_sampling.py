"""Where the time of one sampling step goes: the step's kernels by device time (PyTorch profiler).

    PYTHONPATH=. python benchmarks/profile_sampling.py --device cuda [--steps 32] [--json FILE]
    PYTHONPATH=. python benchmarks/profile_sampling.py --device cpu --quick

Builds the prior of bench_sampling.py (on CUDA issue 7's 12-layer, d 512, 1280-token model in
bf16, batch 16), prefills the captions, then runs `--steps` eager steps (feed a token, sample
the next) under torch.profiler and prints the ops and kernels by total device time, per step,
beside the step's wall time. The kernel sum is what a captured CUDA graph replays, so it is the
floor for bench_sampling's graph figure; the wall time minus it is launch overhead.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
from bench_sampling import build  # noqa: E402

from dalle_fast.sampler import IncrementalPrior, SamplingConfig, _Loop, sample_logits  # noqa: E402


def device_time_us(event) -> float:
    """Self device time of a profiler row (the attribute was renamed across torch versions)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=0, help="sequences (0: the benchmark's)")
    parser.add_argument("--steps", type=int, default=0,
                        help="timed steps, then as many profiled ones (after 8 warm-up steps; 0: 32, or as many as "
                             "the model's grid holds)")
    parser.add_argument("--top", type=int, default=30, help="rows printed")
    parser.add_argument("--quick", action="store_true", help="a tiny model (for tests)")
    parser.add_argument("--json", default=None, help="result path (default: benchmarks/results/profile_sampling_<device>_<time>.json)")
    args = parser.parse_args(argv)
    if args.steps < 0:
        parser.error("--steps must be >= 1 (0: the default)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    prior, text, spec = build(args)
    cfg, device = prior.config, args.device
    fit = (cfg.image_len - 1 - 8) // 2  # the steps after the first token: 8 warm-up, timed, profiled
    args.steps = args.steps or min(32, fit)
    if args.steps > fit:
        parser.error(f"--steps must be <= {fit} for this model (8 warm-up steps, then the timed and the profiled "
                     f"ones, in its {cfg.image_len} tokens)")
    env = common.environment(device)
    common.log(common.describe(env))

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        inc = IncrementalPrior(prior, text.shape[0])
        config = SamplingConfig(top_k=0, cuda_graph=False)
        generator = torch.Generator(device=device).manual_seed(0)
        tokens = torch.zeros(text.shape[0], cfg.image_len, dtype=torch.long, device=device)
        tokens[:, 0] = sample_logits(inc.prefill(text), config, generator)
        loop = _Loop(inc, tokens, 0, config, generator)
        for _ in range(8):  # warm-up: lazy initialisation, cuBLAS handles, kernel attributes
            loop.advance()
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            loop.advance()
        sync()
        wall_ms = (time.perf_counter() - start) * 1e3 / args.steps
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                loop.advance()
            sync()

    rows = []
    for event in prof.key_averages():
        us = device_time_us(event) if device == "cuda" else float(event.self_cpu_time_total)
        if us > 0:
            rows.append({"name": event.key, "calls_per_step": event.count / args.steps, "us_per_step": us / args.steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    total_us = sum(r["us_per_step"] for r in rows)
    what = "device" if device == "cuda" else "CPU (self)"
    print(f"prior: {cfg.layers} layers, d {cfg.d_model}, N {cfg.seq_len}, {spec['dtype']}, batch {text.shape[0]}; "
          f"{args.steps} eager steps")
    print(f"wall {wall_ms:.3f} ms per eager step; {what} time of all rows {total_us / 1e3:.3f} ms per step "
          f"(x {cfg.image_len} tokens = {total_us * cfg.image_len / 1e6:.3f} s per batch)")
    table = [[r["name"][:70], f"{r['calls_per_step']:.1f}", f"{r['us_per_step']:.1f}",
              f"{100 * r['us_per_step'] / total_us:.1f}"] for r in rows[:args.top]]
    print(common.format_table(["op / kernel", "calls / step", f"{what} us / step", "%"], table))
    path = common.write_json(args.json or common.default_result_path("profile_sampling", device), {
        "benchmark": "profile_sampling", "environment": env,
        "model": {"config": cfg, "dtype": spec["dtype"], "batch": text.shape[0]},
        "steps": args.steps, "wall_ms_per_eager_step": wall_ms, "time_kind": what,
        "total_us_per_step": total_us, "rows": rows})
    common.log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
