"""Time sampling every image token of a batch of captions: our KV-cached sparse decoding against
the two ways it is usually done.

  ours        dalle_fast.sampler: KV cache, each step reads only the keys its layer's mask allows
              (CUDA: the step is captured once in a CUDA graph and replayed)
  ours_torch_linear  the same with the step's linear layers as F.linear (cuBLAS on CUDA, MKL on
              the CPU) and their layer norms, GELUs and residual adds as separate ops, instead of
              ops.skinny_linear (DALLE_FAST_SKINNY_LINEAR=0; earlier runs, CUDA only, call it
              ours_cublas)
  ours_index_copy  the same with each layer's cache write as index_copy_ kernels before the
              decode kernel, instead of inside it (DALLE_FAST_DECODE_APPEND=0; CUDA only)
  ours_generic_decode  the same with every layer's attention in the general decode kernel
              instead of the fast one (DALLE_FAST_DECODE_FAST=0; CUDA only)
  ours_compiled  the same with SamplingConfig(compile_step=True): the model step compiled by
              torch.compile (its small kernels fused), then graph-captured (default on CUDA
              only: it compiles for seconds to a minute)
  dense_kv    the same KV cache, but each step attends over every cached position with the
              layer's mask row applied (what a cache without sparse decoding does); on CUDA
              captured and replayed like ours, so the two differ in the attention alone
  recompute   no cache: a full forward pass over the sequence for every new token, its logits
              read at the position being sampled (how several public DALL-E ports sample).
              Every step costs the same full pass, so on CUDA it is timed over its first
              --recompute-steps steps and the per-image figures are that rate times S*S.

Before anything is timed, every method is checked against yardsticks that use none of our
kernels: (1) its step logits (ours and its variants, dense_kv) against a full forward pass of the
float32 model under ops.backend("reference") on the same random image tokens, at the first and
last --check-rows rows of the grid: at most 2x the reference's own error in the benchmark dtype
plus 1e-4 of the largest logit (ours also on a float32 copy, where that floor alone is the
tolerance); (2) the tokens ours, dense_kv and recompute draw from one seed, eagerly in float32,
against those of recompute with its forward under the reference backend: the first two image
rows must agree (rounding may flip a near-tied draw later). The timed (graphed) runs of ours
are checked for valid tokens. A method that fails is reported and not timed, and a failing
method of ours makes the exit code 1.
Figures: ms per image token step, images per second, peak memory (CUDA: max_memory_allocated;
CPU: not measured).

    PYTHONPATH=. python benchmarks/bench_sampling.py --device cpu
    PYTHONPATH=. python benchmarks/bench_sampling.py --device cuda
    PYTHONPATH=. python benchmarks/bench_sampling.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

from dalle_fast import ops  # noqa: E402
from dalle_fast.ops.decode import fast_kernel, fused_cache_write  # noqa: E402
from dalle_fast.ops.linear import skinny_linear_kernel  # noqa: E402
from dalle_fast.prior import Prior, PriorConfig  # noqa: E402
from dalle_fast.sampler import IncrementalPrior, SamplingConfig, _Loop, _run_graph, sample_image_tokens, sample_logits  # noqa: E402

# cpu: the small preset (16x16 grid, 8 layers, d 256); cuda: issue 7's 12-layer d 512 1280-token prior
CONFIGS = {
    "cpu": dict(preset="small", overrides={}, batch=8, dtype="float32", repeats=3),
    "cuda": dict(preset="paper", overrides=dict(layers=12, d_model=512, heads=8, text_vocab=16384, image_vocab=8192),
                 batch=16, dtype="bfloat16", repeats=5),
}
# Our sampler and its variants with one kernel switched off; as timed (in a CUDA graph on CUDA)
# checked for valid tokens only, as a graph draws from other noise offsets (their step logits
# are checked eagerly, see main).
OURS_GRAPHED = ("ours", "ours_torch_linear", "ours_index_copy", "ours_generic_decode")
QUICK = dict(preset="tiny", overrides=dict(layers=2, d_model=64, heads=2), batch=2, dtype="float32", repeats=1)


class DenseKV(IncrementalPrior):
    """The KV cache without sparse decoding: every step scores all N cached positions and masks."""

    def __init__(self, prior: Prior, batch: int):
        super().__init__(prior, batch)
        cfg = self.cfg
        kinds = {b.attn.kind for b in prior.blocks}
        masks = {k: ops.attention_mask(k, cfg.text_len, cfg.grid, cfg.kernel, device=self.device) for k in kinds}
        self.mask_of = [masks[b.attn.kind] for b in prior.blocks]

    def attend(self, layer, q, k, v, g, direct=False):  # direct: whether ours calls its kernel itself; unused
        position = self.cfg.text_len + g.view(1)
        self.keys[layer].index_copy_(2, position, k)
        self.values[layer].index_copy_(2, position, v)
        row = self.mask_of[layer].index_select(0, position)  # (1, N)
        return torch.nn.functional.scaled_dot_product_attention(q, self.keys[layer], self.values[layer],
                                                                attn_mask=row)


# The variants of ours with one kernel switched off: a new context of ours per use.
SWITCHES = {"ours_torch_linear": lambda: skinny_linear_kernel(False),
            "ours_index_copy": lambda: fused_cache_write(False),
            "ours_generic_decode": lambda: fast_kernel(False)}


def switched(name: str):
    """The context method `name` runs in: its kernel switched off, or nothing."""
    return SWITCHES[name]() if name in SWITCHES else contextlib.nullcontext()


def sample_switched(name: str, prior: Prior, text: torch.Tensor, config: SamplingConfig, generator) -> torch.Tensor:
    """ours as method `name` runs it (one of SWITCHES: a kernel switched off)."""
    with switched(name):
        return sample_image_tokens(prior, text, config=config, generator=generator)


@torch.no_grad()
def sample_dense_kv(prior: Prior, text: torch.Tensor, config: SamplingConfig, generator, steps: int = 0) -> torch.Tensor:
    """The first `steps` image tokens (0: all) with the dense KV cache; replayed from a CUDA graph
    when `config.cuda_graph` and on CUDA, as ours is."""
    steps = steps or prior.config.image_len
    inc = DenseKV(prior, text.shape[0])
    logits = inc.prefill(text)
    tokens = torch.zeros(text.shape[0], prior.config.image_len, dtype=torch.long, device=text.device)
    tokens[:, 0] = sample_logits(logits, config, generator)
    loop = _Loop(inc, tokens, 0, config, generator)
    if config.cuda_graph and tokens.is_cuda and steps > 1:
        _run_graph(loop, steps - 1)
    else:
        for _ in range(steps - 1):
            loop.advance()
    return tokens


@torch.no_grad()
def sample_recompute(prior: Prior, text: torch.Tensor, config: SamplingConfig, generator, steps: int = 0,
                     forward_backend: str | None = None) -> torch.Tensor:
    """The first `steps` image tokens (0: all), a full forward pass for each (under
    ops.backend(forward_backend) when given; the draws always as the sampler's)."""
    tokens = torch.zeros(text.shape[0], prior.config.image_len, dtype=torch.long, device=text.device)
    for g in range(steps or prior.config.image_len):
        with ops.backend(forward_backend) if forward_backend else contextlib.nullcontext():
            _, image_logits = prior(text, tokens)  # positions after g see garbage, but nothing before g does
        tokens[:, g] = sample_logits(image_logits[:, g], config, generator)
    return tokens


# The step check's yardstick: a full forward pass of the float32 model under
# ops.backend("reference") (dense PyTorch attention: none of our kernels) on the same tokens. A
# method's step logits may be off it by STEP_FACTOR times the reference's own error in the
# benchmark dtype (the same forward, the benchmark model, in that dtype) plus STEP_FLOOR of the
# largest logit (float32: the reference's own error is 0, so the floor alone).
STEP_FACTOR, STEP_FLOOR = 2.0, 1e-4


@dataclass
class FullPass:
    """Random image tokens, the yardstick's logits for them (float32, [B, S*S, V]) and its scale."""

    tokens: torch.Tensor
    logits: torch.Tensor
    scale: float


@torch.no_grad()
def full_pass(model32: Prior, text: torch.Tensor, seed: int = 2) -> FullPass:
    cfg = model32.config
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.image_vocab, (text.shape[0], cfg.image_len), generator=g).to(text.device)
    with ops.backend("reference"):
        logits = model32(text, tokens)[1].float()
    return FullPass(tokens, logits, logits.abs().max().item())


@torch.no_grad()
def reference_error(model: Prior, text: torch.Tensor, ref: FullPass) -> float:
    """The reference's own error in `model`'s dtype: its forward there against the float32 one."""
    with ops.backend("reference"):
        logits = model(text, ref.tokens)[1]
    return (logits.float() - ref.logits).abs().max().item()


def checked_positions(grid: int, rows: int) -> list[tuple[int, int]]:
    """Spans [start, end) of image positions the step check covers: the first and the last `rows`
    rows of the grid (the rows where masks meet the grid's edges, and the longest key lists),
    or every position (rows 0, or rows covering the grid)."""
    n = grid * grid
    if rows <= 0 or 2 * rows >= grid:
        return [(0, n)]
    return [(0, rows * grid), (n - rows * grid, n)]


@torch.no_grad()
def step_logits_error(make_inc, text: torch.Tensor, ref: FullPass, spans: list[tuple[int, int]]) -> float:
    """Max abs difference between the logits of an incremental decoder (`make_inc()`, an
    IncrementalPrior or one like it) fed ref.tokens and the yardstick's at the same positions.
    A span that starts past 0 is primed: the prefill runs its earlier tokens (as image priming
    does; it rewrites the cache below them, and nothing reads the cache above), then steps feed
    the span's. One decoder for all spans (a compiled step compiles once). NaN when a logit is NaN."""
    err, inc = None, make_inc()
    for start, end in spans:
        logits = inc.prefill(text, ref.tokens[:, :start] if start else None)  # image position `start`
        for g in range(start, end):
            if g > start:  # feed token g - 1: logits of position g
                logits = inc.step(ref.tokens[:, g - 1], torch.tensor(g - 1, device=text.device))
            diff = (logits.float() - ref.logits[:, g]).abs().amax()
            err = diff if err is None else torch.maximum(err, diff)
    return err.item()


def check_steps(make_inc, text: torch.Tensor, ref: FullPass, spans, own_err: float, dtype: str) -> dict:
    """step_logits_error against its tolerance, as recorded in the JSON."""
    err = step_logits_error(make_inc, text, ref, spans)
    tol = STEP_FACTOR * own_err + STEP_FLOOR * ref.scale
    return {"dtype": dtype, "max_abs_err": err, "tol": tol, "reference_own_err": own_err, "logit_scale": ref.scale,
            "positions": sum(end - start for start, end in spans), "ok": bool(err <= tol)}


def build(args):
    spec = QUICK if args.quick else CONFIGS[args.device]
    cfg = PriorConfig.preset(spec["preset"], **spec["overrides"])
    torch.manual_seed(0)
    dtype = common.DTYPES[spec["dtype"]]
    prior = Prior(cfg).to(device=args.device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(1)
    text = torch.randint(0, cfg.text_vocab_total, (args.batch or spec["batch"], cfg.text_len), generator=g)
    return prior, text.to(args.device), spec


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=0, help="images sampled together (0: the config's)")
    parser.add_argument("--repeats", type=int, default=0, help="timed rounds (0: the config's)")
    parser.add_argument("--methods", default="", help="comma-separated subset of the methods above "
                        "(default: all on cuda; ours, ours_torch_linear, dense_kv and recompute on cpu)")
    parser.add_argument("--recompute-steps", type=int, default=-1,
                        help="token steps recompute is timed over (0: all; default: 64 on cuda, all on cpu)")
    parser.add_argument("--check-rows", type=int, default=None,
                        help="the step check covers the first and the last this many grid rows (0: every "
                             "position; default: 2, every position with --quick)")
    parser.add_argument("--quick", action="store_true", help="a tiny model, one round (for tests)")
    parser.add_argument("--json", default=None, help="result path (default: benchmarks/results/sampling_<device>_<time>.json)")
    args = parser.parse_args(argv)
    prior, text, spec = build(args)
    cfg = prior.config
    if args.recompute_steps < 0:
        args.recompute_steps = 64 if args.device == "cuda" else 0
    recompute_steps = min(args.recompute_steps, cfg.image_len) or cfg.image_len
    steps_of = {**{name: cfg.image_len for name in (*OURS_GRAPHED, "ours_compiled", "dense_kv")},
                "recompute": recompute_steps}
    config = SamplingConfig(top_k=0)
    compiled = SamplingConfig(top_k=0, compile_step=True)
    methods = {  # fn(model, config, generator, steps) -> tokens
        "ours": lambda m, c, gen, n: sample_image_tokens(m, text, config=c, generator=gen),
        "ours_torch_linear": lambda m, c, gen, n: sample_switched("ours_torch_linear", m, text, c, gen),
        "ours_index_copy": lambda m, c, gen, n: sample_switched("ours_index_copy", m, text, c, gen),
        "ours_generic_decode": lambda m, c, gen, n: sample_switched("ours_generic_decode", m, text, c, gen),
        "ours_compiled": lambda m, c, gen, n: sample_image_tokens(m, text, config=compiled, generator=gen),
        "dense_kv": lambda m, c, gen, n: sample_dense_kv(m, text, c, gen, n),
        "recompute": lambda m, c, gen, n: sample_recompute(m, text, c, gen, n),
    }
    default = (",".join((*OURS_GRAPHED, "ours_compiled", "dense_kv", "recompute")) if args.device == "cuda"
               else "ours,ours_torch_linear,dense_kv,recompute")
    chosen = [m.strip() for m in (args.methods or default).split(",") if m.strip()]
    unknown = set(chosen) - set(methods)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(methods)}")
    device = args.device
    env = common.environment(device)
    common.log(common.describe(env))
    common.log(f"prior: {cfg.layers} layers, d {cfg.d_model}, N = {cfg.text_len} + {cfg.grid}^2 = {cfg.seq_len}, "
               f"{cfg.num_params() / 1e6:.1f}M parameters, {spec['dtype']}, batch {text.shape[0]}")

    def generator():
        return torch.Generator(device=device).manual_seed(7)

    # Checks, before anything is timed (the module docstring): every method's step logits against
    # a full forward pass of the float32 model under the reference backend on the same tokens
    # (ours also on the float32 copy, where the tolerance is tight), and the tokens it draws
    # against recompute's under that backend, from the same seed in float32. A method that fails
    # is not timed; a failing method of ours (the graphed ones: valid tokens too) makes rc 1.
    results, skipped = {name: {"timed_steps": steps_of[name]} for name in chosen}, {}
    check_model = prior if spec["dtype"] == "float32" else copy.deepcopy(prior).float()
    eager = SamplingConfig(top_k=config.top_k, cuda_graph=False)
    rows_checked = min(cfg.grid, 2) * cfg.grid
    spans = checked_positions(cfg.grid, args.check_rows if args.check_rows is not None else 0 if args.quick else 2)
    ref = full_pass(check_model, text)
    own_err = 0.0 if check_model is prior else reference_error(prior, text, ref)
    yardstick = sample_recompute(check_model, text, eager, generator(), rows_checked, forward_backend="reference")
    common.log(f"step check: positions {spans} against the reference forward in float32 (largest logit "
               f"{ref.scale:.3g}; the reference's own {spec['dtype']} error {own_err:.3g})")

    def incremental(name, model):
        if name == "dense_kv":
            return lambda: DenseKV(model, text.shape[0])
        return lambda: IncrementalPrior(model, text.shape[0], compile_step=name == "ours_compiled")

    for name in chosen:
        r, problems = results[name], []
        with switched(name):
            if name != "recompute":  # recompute's logits are the forward pass itself
                checks = [check_steps(incremental(name, prior), text, ref, spans, own_err, spec["dtype"])]
                if name == "ours" and check_model is not prior:
                    checks.append(check_steps(incremental(name, check_model), text, ref, spans, 0.0, "float32"))
                r["step_logits"] = {"ok": all(c["ok"] for c in checks), "checks": checks}
                problems += [f"step logits ({c['dtype']}) off a full forward pass on the same tokens by "
                             f"{c['max_abs_err']:.3g} > {c['tol']:.3g}" for c in checks if not c["ok"]]
                common.log(f"{name}: step logits vs the full forward: " + ", ".join(
                    f"{c['dtype']} max abs err {c['max_abs_err']:.3g} (tol {c['tol']:.3g})" for c in checks))
            if name in (*OURS_GRAPHED, "ours_compiled"):  # as timed (CUDA: graphed, other noise offsets)
                tokens = methods[name](prior, config, generator(), 0)
                r["valid_tokens"] = bool(tokens.min() >= 0 and tokens.max() < cfg.image_vocab)
                if not r["valid_tokens"]:
                    problems.append("drew invalid tokens")
            if name in ("ours", "dense_kv", "recompute"):  # eager, float32: the same draws as the yardstick's
                tokens = methods[name](check_model, eager, generator(), rows_checked)
                r["same_tokens_first_rows"] = bool(torch.equal(tokens[:, :rows_checked], yardstick[:, :rows_checked]))
                if not r["same_tokens_first_rows"]:
                    problems.append("drew other tokens than recompute under the reference backend from the same "
                                    "seed (float32, first rows)")
        r["checked_ok"] = not problems
        if problems:
            skipped[name] = "; ".join(problems)
            common.log(f"{name}: NOT TIMED: {skipped[name]}")
    del check_model, ref
    timed = {name: (lambda fn=methods[name], n=steps_of[name]: fn(prior, config, generator(), n))
             for name in chosen if name not in skipped}
    repeats = args.repeats or spec["repeats"]
    with common.LoadMonitor() as load:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        timings = common.time_interleaved(timed, device, repeats=repeats, warmup=1, flush_l2=False)
        for name in timed:
            peak = None
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                timed[name]()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() / 2**20
            t = timings[name]
            per_token = t.median_ms / steps_of[name]
            results[name].update(timing=t, ms_per_token=per_token, ms_per_batch=per_token * cfg.image_len,
                                 images_per_s=text.shape[0] / (per_token * cfg.image_len / 1e3), peak_mib=peak)
    warning = common.load_warning(load.result())
    base = timings.get("ours")
    rows = []
    for name in chosen:
        r = results[name]
        if name in skipped:
            rows.append([name, "skipped: " + skipped[name], "", "", "", ""])
            continue
        speed = f"{r['ms_per_batch'] / results['ours']['ms_per_batch']:.1f}x" if base and name != "ours" else ""
        label = name if steps_of[name] == cfg.image_len else f"{name} (timed on {steps_of[name]} steps)"
        rows.append([label, common.fmt_ms(r["ms_per_batch"]), f"{r['ms_per_token']:.3f}",
                     f"{r['images_per_s']:.2f}", f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a", speed])
    print(common.format_table(["method", "ms / batch", "ms / token step", "images / s", "peak MiB",
                               "ours is faster by"], rows))
    if warning:
        print("WARNING:", warning)
    path = common.write_json(args.json or common.default_result_path("sampling", device), {
        "benchmark": "sampling", "argv": sys.argv[1:] if argv is None else list(argv), "environment": env,
        "load": load.result(), "load_warning": warning,
        "model": {"config": cfg, "dtype": spec["dtype"], "batch": text.shape[0],
                  "params": cfg.num_params()},
        "sampling": config, "results": results, "skipped": skipped,
        "step_check": {"yardstick": "a full forward pass of the float32 model under ops.backend('reference') on "
                                    "random image tokens; each method's incremental logits at the same positions",
                       "positions": spans, "rule": f"max abs err <= {STEP_FACTOR:g} x the reference's own error in "
                                                   f"the benchmark dtype + {STEP_FLOOR:g} x the largest logit",
                       "reference_own_err": own_err, "tokens": "the first rows, eager in float32, against "
                                                                 "recompute under ops.backend('reference')"},
    })
    common.log(f"wrote {path}")
    wrong = [name for name in skipped if name.startswith("ours")]
    for name in wrong:
        print(f"PROBLEM: {name} failed its check, not timed: {skipped[name]}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
