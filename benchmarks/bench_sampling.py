"""Time sampling every image token of a batch of captions: our KV-cached sparse decoding against
the two ways it is usually done.

  ours        dalle_fast.sampler: KV cache, each step reads only the keys its layer's mask allows
              (CUDA: the step is captured once in a CUDA graph and replayed)
  ours_cublas the same with the step's linear layers as F.linear (cuBLAS) and their layer norms,
              GELUs and residual adds as separate kernels, instead of ops.skinny_linear (CUDA
              only)
  ours_index_copy  the same with each layer's cache write as index_copy_ kernels before the
              decode kernel, instead of inside it (DALLE_FAST_DECODE_APPEND=0; CUDA only)
  ours_generic_decode  the same with every layer's attention in the general decode kernel
              instead of the fast one (DALLE_FAST_DECODE_FAST=0; CUDA only)
  ours_compiled  the same with SamplingConfig(compile_step=True): the model step compiled by
              torch.compile (its small kernels fused), then graph-captured; checked by its
              logits against the eager step on the same tokens (default on CUDA only: it
              compiles for seconds to a minute)
  dense_kv    the same KV cache, but each step attends over every cached position with the
              layer's mask row applied (what a cache without sparse decoding does); on CUDA
              captured and replayed like ours, so the two differ in the attention alone
  recompute   no cache: a full forward pass over the sequence for every new token, its logits
              read at the position being sampled (how several public DALL-E ports sample).
              Every step costs the same full pass, so on CUDA it is timed over its first
              --recompute-steps steps and the per-image figures are that rate times S*S.

All three sample with the same seed and draw the same tokens (checked in float32, on a float32
copy of the model when the benchmark runs in lower precision, where rounding flips near-tied
draws: the first two image rows must agree, else the method is reported and not timed).
Figures: ms per image token step, images per second, peak memory (CUDA: max_memory_allocated;
CPU: not measured).

    PYTHONPATH=. python benchmarks/bench_sampling.py --device cpu
    PYTHONPATH=. python benchmarks/bench_sampling.py --device cuda
    PYTHONPATH=. python benchmarks/bench_sampling.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

from dalle_fast import ops  # noqa: E402
from dalle_fast.ops.decode import fast_kernel, fused_cache_write  # noqa: E402
from dalle_fast.ops.linear import cuda_skinny_linear  # noqa: E402
from dalle_fast.prior import Prior, PriorConfig  # noqa: E402
from dalle_fast.sampler import IncrementalPrior, SamplingConfig, _Loop, _run_graph, sample_image_tokens, sample_logits  # noqa: E402

# cpu: the small preset (16x16 grid, 8 layers, d 256); cuda: issue 7's 12-layer d 512 1280-token prior
CONFIGS = {
    "cpu": dict(preset="small", overrides={}, batch=8, dtype="float32", repeats=3),
    "cuda": dict(preset="paper", overrides=dict(layers=12, d_model=512, heads=8, text_vocab=16384, image_vocab=8192),
                 batch=16, dtype="bfloat16", repeats=5),
}
# Our sampler and its variants with one kernel switched off, run as timed (in a CUDA graph on
# CUDA): checked for valid tokens, as a graph draws from other noise offsets (see the check below).
OURS_GRAPHED = ("ours", "ours_cublas", "ours_index_copy", "ours_generic_decode")
QUICK = dict(preset="tiny", overrides=dict(layers=2, d_model=64, heads=2), batch=2, dtype="float32", repeats=1)


class DenseKV(IncrementalPrior):
    """The KV cache without sparse decoding: every step scores all N cached positions and masks."""

    def __init__(self, prior: Prior, batch: int):
        super().__init__(prior, batch)
        cfg = self.cfg
        kinds = {b.attn.kind for b in prior.blocks}
        masks = {k: ops.attention_mask(k, cfg.text_len, cfg.grid, cfg.kernel, device=self.device) for k in kinds}
        self.mask_of = [masks[b.attn.kind] for b in prior.blocks]

    def attend(self, layer, q, k, v, g):
        position = self.cfg.text_len + g.view(1)
        self.keys[layer].index_copy_(2, position, k)
        self.values[layer].index_copy_(2, position, v)
        row = self.mask_of[layer].index_select(0, position)  # (1, N)
        return torch.nn.functional.scaled_dot_product_attention(q, self.keys[layer], self.values[layer],
                                                                attn_mask=row)


def sample_switched(switch, prior: Prior, text: torch.Tensor, config: SamplingConfig, generator) -> torch.Tensor:
    """ours with one kernel switched off: `switch` a context of ours (cuda_skinny_linear(False),
    fused_cache_write(False), fast_kernel(False))."""
    with switch:
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
def sample_recompute(prior: Prior, text: torch.Tensor, config: SamplingConfig, generator, steps: int = 0) -> torch.Tensor:
    """The first `steps` image tokens (0: all), a full forward pass for each."""
    tokens = torch.zeros(text.shape[0], prior.config.image_len, dtype=torch.long, device=text.device)
    for g in range(steps or prior.config.image_len):
        _, image_logits = prior(text, tokens)  # positions after g see garbage, but nothing before g does
        tokens[:, g] = sample_logits(image_logits[:, g], config, generator)
    return tokens


def compiled_step_error(prior: Prior, text: torch.Tensor, steps: int = 4) -> tuple[float, float]:
    """Max abs difference between the compiled and the eager step's logits over the first `steps`
    image tokens (fed the eager argmax), and the tolerance: 1e-4 of the largest logit in float32,
    5e-2 in lower precision (rounding compounds over the layers)."""
    eager, compiled = IncrementalPrior(prior, text.shape[0]), IncrementalPrior(prior, text.shape[0], compile_step=True)
    logits = eager.prefill(text)
    compiled.prefill(text)
    err, scale = 0.0, 1.0
    for g in range(steps):
        token, position = logits.argmax(-1), torch.tensor(g, device=text.device)
        logits, got = eager.step(token, position), compiled.step(token, position)
        err = max(err, (got.float() - logits.float()).abs().max().item())
        scale = max(scale, logits.float().abs().max().item())
    return err, (1e-4 if logits.dtype == torch.float32 else 5e-2) * scale


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
                        "(default: all on cuda, ours, dense_kv and recompute on cpu)")
    parser.add_argument("--recompute-steps", type=int, default=-1,
                        help="token steps recompute is timed over (0: all; default: 64 on cuda, all on cpu)")
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
        "ours_cublas": lambda m, c, gen, n: sample_switched(cuda_skinny_linear(False), m, text, c, gen),
        "ours_index_copy": lambda m, c, gen, n: sample_switched(fused_cache_write(False), m, text, c, gen),
        "ours_generic_decode": lambda m, c, gen, n: sample_switched(fast_kernel(False), m, text, c, gen),
        "ours_compiled": lambda m, c, gen, n: sample_image_tokens(m, text, config=compiled, generator=gen),
        "dense_kv": lambda m, c, gen, n: sample_dense_kv(m, text, c, gen, n),
        "recompute": lambda m, c, gen, n: sample_recompute(m, text, c, gen, n),
    }
    default = (",".join((*OURS_GRAPHED, "ours_compiled", "dense_kv", "recompute")) if args.device == "cuda"
               else "ours,dense_kv,recompute")
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

    # Check: with one seed every method must draw the same tokens (identical sampling code; the
    # logits agree to rounding, so a rare near-tie may flip a draw: compare the first rows only,
    # in float32). The reference is ours without a CUDA graph (a graph draws its noise from
    # other offsets of the same generator), the others run eagerly too; the timed graph run of
    # ours is checked for valid tokens.
    results, skipped = {}, {}
    check_model = prior if spec["dtype"] == "float32" else copy.deepcopy(prior).float()
    eager = SamplingConfig(top_k=config.top_k, cuda_graph=False)
    rows_checked = min(cfg.grid, 2) * cfg.grid
    reference = sample_image_tokens(check_model, text, config=eager, generator=generator())
    for name in chosen:
        if name == "ours_compiled":  # compiles here, outside the timing
            err, tol = compiled_step_error(prior, text)
            tokens = methods[name](prior, config, generator(), 0)
            same = bool(err <= tol and tokens.min() >= 0 and tokens.max() < cfg.image_vocab)
            results[name] = {"step_logits_max_abs_err": err, "tol": tol}
            if err > tol:
                skipped[name] = f"compiled step logits off the eager step's by {err:.3g} > {tol:.3g}"
        elif name in OURS_GRAPHED:
            tokens = methods[name](prior, config, generator(), 0)
            same = bool(tokens.min() >= 0 and tokens.max() < cfg.image_vocab)
        else:
            tokens = methods[name](check_model, eager, generator(), rows_checked)
            same = bool(torch.equal(tokens[:, :rows_checked], reference[:, :rows_checked]))
        results.setdefault(name, {}).update(same_tokens_first_rows=same, timed_steps=steps_of[name])
        if not same and name not in skipped:
            skipped[name] = ("drew invalid tokens" if name in (*OURS_GRAPHED, "ours_compiled") else
                             "drew other tokens than ours from the same seed (float32)")
    del check_model
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
        "benchmark": "sampling", "argv": sys.argv[1:], "environment": env, "load": load.result(),
        "load_warning": warning,
        "model": {"config": cfg, "dtype": spec["dtype"], "batch": text.shape[0],
                  "params": cfg.num_params()},
        "sampling": config, "results": results, "skipped": skipped,
    })
    common.log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
