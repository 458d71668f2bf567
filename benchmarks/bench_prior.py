"""Training throughput of the transformer prior with our sparse attention against dense baselines.

One full training step (forward, loss, backward, AdamW step, zero_grad) of `dalle_fast.prior.Prior`
on one fixed batch, timed per attention implementation, all on the same weights:
  ours          the prior's default attention: dalle_fast.ops.sparse_attention under
                ops.backend("auto") (our kernel; fp32 on CPU)
  sdpa_causal   F.scaled_dot_product_attention(is_causal=True): what a dense GPT does, ignoring
                the sparse masks (another model of attention: its loss is reported, not checked)
  sdpa_mask     F.scaled_dot_product_attention with the exact dense bool [N, N] mask of each
                layer's kind (built once per kind, outside timing)
  flex          torch.compile(flex_attention) with create_block_mask and an arithmetic mask_mod
                of the exact mask (mask_mods and dynamo limits from bench_attention.py)

Before anything is timed, every method runs forward+backward once from the same weights on the
same batch (this also compiles FlexAttention), and ours, sdpa_mask and flex must match the loss
and gradients of the same step under ops.backend("reference") (dense PyTorch attention, float32)
within tolerance, or they are not timed (in bfloat16 the tolerance grows by twice the
reference's own error under the same autocast); a mismatch of ours or of an exact baseline makes
the exit code 1, and the message names the method that is off. A method that cannot run here
(FlexAttention has no CPU backward in some torch versions) is recorded as skipped with the
error, and the rest go on (the reference's dense attention keeps N x N scores per layer for its
backward: a device without room for them checks nothing and times nothing). Timing:
`common.time_interleaved` (untimed warm-up calls, then rounds that call every method once;
medians), one model whose attention fn is swapped per call.

Reported per method: ms/step, training tokens/s (B * N / step time), ours' speed-up over it, and
on CUDA the peak memory of one step (torch.cuda.max_memory_allocated; not measured on CPU,
where the process RSS high-water mark cannot be reset per method).

    PYTHONPATH=. python benchmarks/bench_prior.py --device cpu      # small preset, B 16, fp32
    PYTHONPATH=. python benchmarks/bench_prior.py --device cuda     # 12 x d512, 8 heads, N 1280, B 16, bf16
    PYTHONPATH=. python benchmarks/bench_prior.py --device cpu --quick --methods ours,sdpa_mask
    PYTHONPATH=. python benchmarks/bench_prior.py --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from bench_attention import _set_dynamo_limits, flex_mask_mod  # noqa: E402
from common import (LoadMonitor, default_result_path, describe, environment, fmt_ms,  # noqa: E402
                    format_table, load_warning, log, time_interleaved, write_json)

from dalle_fast import ops  # noqa: E402
from dalle_fast.prior import Prior, PriorConfig  # noqa: E402

METHODS = ("ours", "sdpa_causal", "sdpa_mask", "flex")
BASELINES = METHODS[1:]
# Methods that compute the exact masks, so must reproduce the reference (sdpa_causal is another model).
EXACT = ("sdpa_mask", "flex")
CHECKED = ("ours", *EXACT)

# Per-device defaults. CUDA: the paper preset's vocabularies, T=256, S=32 (N=1280), cut to 12 x d512.
DEFAULTS = {
    "cpu": dict(preset="small", overrides={}, batch=16, dtype="float32", repeats=7, warmup=2),
    "cuda": dict(preset="paper", overrides=dict(layers=12, d_model=512, heads=8), batch=16, dtype="bfloat16",
                 repeats=20, warmup=5),
}
QUICK = dict(preset="tiny", overrides={}, batch=2, repeats=2, warmup=1)

# The yardstick of every method, ours included: one forward+backward of the same model under
# ops.backend("reference") (dense PyTorch attention, none of our kernels) in float32.
# Loss: |loss - ref| <= LOSS_TOL * max(1, |ref|); gradients: max|g - g_ref| <= GRAD_TOL * max|g_ref|.
# In bfloat16 (autocast) each tolerance grows by twice the reference's own error under the same
# autocast (rounding along the layers is no fault of a method's attention).
LOSS_TOL = 1e-4
GRAD_TOL = 1e-3

FALLBACK_TEXT = "falls back to the dense PyTorch reference"


@dataclass
class Config:
    device: str
    preset: str
    model: dict
    batch: int
    dtype: str  # float32: plain fp32; bfloat16: torch.autocast(bfloat16)
    methods: tuple[str, ...]
    repeats: int
    warmup: int
    seed: int
    lr: float
    quick: bool
    threads: int

    def prior_config(self) -> PriorConfig:
        return PriorConfig.preset(self.preset, **self.model)


def parse_args(argv: list[str] | None = None) -> tuple[Config, Path | None]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
    p.add_argument("--json", type=Path, default=None,
                   help="result file (default: benchmarks/results/prior_<device>_<YYYYmmdd-HHMMSS>.json)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (ours is always run: it is the yardstick)")
    p.add_argument("--batch", type=int, help="B (default: 16; --quick: 2)")
    p.add_argument("--layers", type=int, help="transformer layers (default: 8 cpu, 12 cuda)")
    p.add_argument("--d-model", type=int, help="width (default: 256 cpu, 512 cuda)")
    p.add_argument("--heads", type=int, help="attention heads (default: 4 cpu, 8 cuda)")
    p.add_argument("--text-len", type=int, help="T (default: 32 cpu, 256 cuda)")
    p.add_argument("--grid", type=int, help="S; N = T + S*S (default: 16 cpu, 32 cuda)")
    p.add_argument("--kernel", type=int, help="conv mask kernel, odd (default: the preset's, 11)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="float32, or bfloat16 autocast (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--repeats", type=int, help="timed steps per method, median reported (default: 7 cpu, 20 cuda)")
    p.add_argument("--warmup", type=int, help="untimed steps per method before timing (default: 2 cpu, 5 cuda)")
    p.add_argument("--seed", type=int, default=0, help="weights and batch seed")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for the CPU run (default: leave torch's default)")
    p.add_argument("--quick", action="store_true",
                   help="the tiny preset, batch 2, 2 rounds: a smoke test (explicit flags still win)")
    a = p.parse_args(argv)

    values = dict(DEFAULTS[a.device])
    if a.quick:
        values.update(QUICK)
    model = dict(values.pop("overrides"))
    for name in ("layers", "d_model", "heads", "text_len", "grid", "kernel"):
        if getattr(a, name) is not None:
            model[name] = getattr(a, name)
    for name in ("batch", "dtype", "repeats", "warmup"):
        if getattr(a, name) is not None:
            values[name] = getattr(a, name)
    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    for m in methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; expected some of {', '.join(METHODS)}")
    methods = tuple(m for m in METHODS if m == "ours" or m in methods)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device")
    for name in ("batch", "repeats"):
        if values[name] < 1:
            p.error(f"--{name} must be >= 1, got {values[name]}")
    if values["warmup"] < 0:
        p.error("--warmup must be >= 0")
    try:
        PriorConfig.preset(values["preset"], **model)
    except (TypeError, ValueError) as exc:
        p.error(str(exc))
    if a.threads is not None:
        if a.threads < 1:
            p.error("--threads must be >= 1")
        torch.set_num_threads(a.threads)
    cfg = Config(device=a.device, model=model, methods=methods, seed=a.seed, lr=a.lr, quick=a.quick,
                 threads=torch.get_num_threads(), **values)
    return cfg, a.json


# --------------------------------------------------------------------------- attention fns


def build_attention(cfg: Config, pcfg: PriorConfig) -> dict[str, Callable | str]:
    """name -> fn(q, k, v, kind, text_len, grid, kernel) -> out, or name -> why it is skipped."""
    dev = cfg.device
    fns: dict[str, Callable | str] = {}

    def ours(q, k, v, kind, text_len, grid, kernel):
        return ops.sparse_attention(q, k, v, kind, text_len, grid, kernel)  # the prior's default

    def sdpa_causal(q, k, v, kind, text_len, grid, kernel):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    masks: dict[tuple, torch.Tensor] = {}
    for kind in sorted(set(pcfg.layer_kinds())):  # built once per kind, outside the timed steps
        masks[(kind, pcfg.text_len, pcfg.grid, pcfg.kernel)] = ops.attention_mask(
            kind, pcfg.text_len, pcfg.grid, pcfg.kernel, device=dev)

    def sdpa_mask(q, k, v, kind, text_len, grid, kernel):
        key = (kind, text_len, grid, kernel)
        mask = masks.get(key)
        if mask is None:
            mask = masks[key] = ops.attention_mask(kind, text_len, grid, kernel, device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    fns["ours"] = ours
    if "sdpa_causal" in cfg.methods:
        fns["sdpa_causal"] = sdpa_causal
    if "sdpa_mask" in cfg.methods:
        fns["sdpa_mask"] = sdpa_mask
    if "flex" in cfg.methods:
        fns["flex"] = _build_flex(pcfg, dev)
    return fns


def _build_flex(pcfg: PriorConfig, dev: str) -> Callable | str:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        return f"FlexAttention unavailable in torch {torch.__version__}: {exc}"
    try:
        torch._dynamo.reset()
        _set_dynamo_limits()  # one compile per kind; dynamo's default limit would drop to eager
        n = pcfg.seq_len
        block_masks = {kind: create_block_mask(flex_mask_mod(kind, pcfg.text_len, pcfg.grid, pcfg.kernel),
                                               B=None, H=None, Q_LEN=n, KV_LEN=n, device=dev)
                       for kind in sorted(set(pcfg.layer_kinds()))}
        compiled = torch.compile(flex_attention, dynamic=False)
    except Exception as exc:  # noqa: BLE001 - a missing baseline is a note, not a crash
        return f"FlexAttention setup failed: {type(exc).__name__}: {exc}".splitlines()[0]

    def flex(q, k, v, kind, text_len, grid, kernel):
        return compiled(q, k, v, block_mask=block_masks[kind])

    return flex


def set_attention(model: Prior, fn: Callable) -> None:
    for block in model.blocks:
        block.attn.attention = fn


# --------------------------------------------------------------------------- model, batch, step


def make_optimizer(model: Prior, lr: float, device: str) -> torch.optim.AdamW:
    # As dalle_fast.train.prior: decay matrices only, betas (0.9, 0.96); fused on CUDA.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 4.5e-2}, {"params": rest, "weight_decay": 0.0}]
    extra = {"fused": True} if device == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.96), eps=1e-8, **extra)


def make_batch(pcfg: PriorConfig, batch: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    text = torch.randint(0, pcfg.text_vocab_total, (batch, pcfg.text_len), generator=g)
    image = torch.randint(0, pcfg.image_vocab, (batch, pcfg.image_len), generator=g)
    return text.to(device), image.to(device)


def autocast_ctx(cfg: Config):
    if cfg.dtype == "bfloat16":
        return torch.autocast(cfg.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _error_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_method(cfg: Config, model: Prior, fn: Callable, text, image,
                 autocast: bool = True) -> tuple[float, torch.Tensor, float, list[str]]:
    """Loss and flat fp32 gradient of one forward+backward from the current weights (no step),
    the seconds it took (compilation included) and any kernel-fallback warnings; in float32
    when not `autocast`."""
    set_attention(model, fn)
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        with autocast_ctx(cfg) if autocast else contextlib.nullcontext():
            loss = model.loss(text, image)["loss"]
        loss.backward()
        if cfg.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten()
                       for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    fallbacks = [str(w.message) for w in caught if FALLBACK_TEXT in str(w.message)]
    return loss.item(), grads, seconds, fallbacks


def make_step(cfg: Config, model: Prior, opt: torch.optim.Optimizer, fn: Callable, text, image) -> Callable[[], None]:
    def step() -> None:
        set_attention(model, fn)
        with autocast_ctx(cfg):
            loss = model.loss(text, image)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def peak_memory(cfg: Config, step: Callable[[], None]) -> dict:
    """One extra untimed step under torch.cuda.max_memory_allocated (CUDA only)."""
    if cfg.device != "cuda":
        return {"measured": False, "why": "CPU: not measured (the process RSS high-water mark cannot be reset "
                                          "per method; CUDA uses torch.cuda.max_memory_allocated)"}
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"measured": True, "how": "torch.cuda.max_memory_allocated over one step",
            "peak_mib": peak / 2**20, "before_step_mib": before / 2**20, "step_extra_mib": (peak - before) / 2**20}


def reference_check(cfg: Config, model: Prior, ours: Callable, text, image) -> dict:
    """The yardstick: loss and gradients of one forward+backward under ops.backend("reference")
    in float32, and (in bfloat16) the reference's own error under the benchmark's autocast."""
    with ops.backend("reference"):
        loss, grads, seconds, _ = check_method(cfg, model, ours, text, image, autocast=False)
        out = {"loss": loss, "grads": grads, "first_call_s": seconds, "own_loss_err": 0.0, "own_grad_rel_err": 0.0}
        if cfg.dtype != "float32":
            own_loss, own_grads, _, _ = check_method(cfg, model, ours, text, image)
            out["own_loss_err"] = abs(own_loss - loss)
            out["own_grad_rel_err"] = (own_grads - grads).abs().max().item() / max(grads.abs().max().item(), 1e-30)
    return out


# --------------------------------------------------------------------------- benchmark


def run(cfg: Config, notes: list[str]) -> tuple[dict, dict]:
    pcfg = cfg.prior_config()
    torch.manual_seed(cfg.seed)
    model = Prior(pcfg).to(cfg.device).train()  # one set of weights; the attention fn is swapped per method
    text, image = make_batch(pcfg, cfg.batch, cfg.seed, cfg.device)
    n_params = sum(p.numel() for p in model.parameters())
    model_info = {"preset": cfg.preset, "overrides": cfg.model, "T": pcfg.text_len, "S": pcfg.grid, "N": pcfg.seq_len,
                  "layers": pcfg.layers, "d_model": pcfg.d_model, "heads": pcfg.heads, "head_dim": pcfg.head_dim,
                  "kernel": pcfg.kernel, "kinds": pcfg.layer_kinds(), "text_vocab_total": pcfg.text_vocab_total,
                  "image_vocab": pcfg.image_vocab, "params": n_params}
    log(f"prior: {pcfg.layers} layers, d {pcfg.d_model}, {pcfg.heads} heads, N {pcfg.seq_len}, "
        f"{n_params / 1e6:.1f}M params, batch {cfg.batch}, {cfg.dtype} on {cfg.device}")

    fns = build_attention(cfg, pcfg)
    results: dict[str, dict] = {}
    for name in METHODS:
        if name not in cfg.methods:
            results[name] = {"status": "skipped", "why": "not selected (--methods)"}

    # ---- pre-timing check: same weights, same batch, forward+backward once each (compiles flex),
    # every method against the reference backend's (LOSS_TOL / GRAD_TOL above)
    try:
        ref = reference_check(cfg, model, fns["ours"], text, image)
    except Exception as exc:  # noqa: BLE001 - nothing can be checked, so nothing is timed
        why = f"not checked: the reference run failed ({_error_line(exc)})"
        log(traceback.format_exc())
        notes.append(why)
        for name in fns:
            results[name] = {"status": "skipped", "why": why}
        return model_info, {"methods": results, "speedup_of_ours": {}, "tokens_per_step": cfg.batch * pcfg.seq_len}
    log(f"  reference    loss {ref['loss']:.6f} (float32, ops.backend('reference'))"
        + (f"; its own bfloat16 error: loss {ref['own_loss_err']:.1e}, grad rel {ref['own_grad_rel_err']:.1e}"
           if cfg.dtype != "float32" else ""))
    ref_grads = ref.pop("grads")
    scale_g = max(ref_grads.abs().max().item(), 1e-30)
    loss_tol = LOSS_TOL * max(1.0, abs(ref["loss"])) + 2 * ref["own_loss_err"]
    grad_tol = GRAD_TOL + 2 * ref["own_grad_rel_err"]
    for name, fn in fns.items():
        if isinstance(fn, str):
            results[name] = {"status": "skipped", "why": fn}
            notes.append(f"{name}: skipped, {fn}")
            continue
        log(f"  {name:12s} checking (forward+backward once{', compiles' if name == 'flex' else ''}) ...")
        try:
            with ops.backend("auto"):
                loss, grads, seconds, fallbacks = check_method(cfg, model, fn, text, image)
        except Exception as exc:  # noqa: BLE001 - an unavailable method is a note, not a crash
            why = _error_line(exc)
            results[name] = {"status": "skipped", "why": why}
            notes.append(f"{name}: skipped, {why}")
            if name == "ours":
                log(traceback.format_exc())
            continue
        diff = abs(loss - ref["loss"])  # NaN when loss is
        grad_err = (grads - ref_grads).abs().max().item() / scale_g
        check: dict = {"loss": loss, "first_call_s": seconds, "loss_diff_vs_reference": diff,
                       "grad_rel_err_vs_reference": grad_err}
        if name == "ours":
            check["kernel_fallback"] = fallbacks
            if fallbacks:
                notes.append(f"ours: the op fell back to the dense reference ({fallbacks[0]}); "
                             "its figures are not our kernel's")
        if name in CHECKED:
            check.update(loss_tol=loss_tol, grad_rel_tol=grad_tol)
            ok = diff <= loss_tol and grad_err <= grad_tol  # False for NaN
        else:
            check["compared"] = "reported only: dense causal is another model of attention than the sparse masks"
            ok = loss == loss  # not NaN
        check["ok"] = bool(ok)
        del grads
        if not ok:
            why = (f"{name} is off the reference (float32, ops.backend('reference')): loss {loss:.6g} vs "
                   f"{ref['loss']:.6g}, |diff| {diff:.3g} (tol {loss_tol:.3g}), grad rel err {grad_err:.3g} "
                   f"(tol {grad_tol:.3g})" if name in CHECKED else f"{name}: loss {loss}")
            results[name] = {"status": "mismatch", "why": why, "check": check}
            notes.append(f"{name}: MISMATCH, not timed ({why})")
            continue
        log(f"  {name:12s} ok: loss {loss:.6f}, |loss - ref| {diff:.1e}, grad rel err {grad_err:.1e} ({seconds:.1f} s)")
        results[name] = {"status": "ok", "check": check}
    del ref_grads

    # ---- timing: full training steps, interleaved rounds, warm-up excluded
    timed = [n for n in fns if results.get(n, {}).get("status") == "ok"]
    opt = make_optimizer(model, cfg.lr, cfg.device)
    steps = {n: make_step(cfg, model, opt, fns[n], text, image) for n in timed}
    log(f"  timing {', '.join(timed)}: {cfg.warmup} warm-up steps each, then {cfg.repeats} interleaved rounds ...")
    with ops.backend("auto"):
        try:
            timings = time_interleaved(steps, cfg.device, cfg.repeats, cfg.warmup)
        except Exception:  # noqa: BLE001 - find the method that fails (OOM, ...) and time the rest alone
            timings = {}
            for n, step in steps.items():
                try:
                    timings[n] = time_interleaved({n: step}, cfg.device, cfg.repeats, cfg.warmup)[n]
                except Exception as exc:  # noqa: BLE001
                    why = _error_line(exc)
                    results[n].update(status="skipped", why=f"timing failed: {why}")
                    notes.append(f"{n}: timing failed, {why}")
                    opt.zero_grad(set_to_none=True)
                    if cfg.device == "cuda":
                        torch.cuda.empty_cache()
        tokens = cfg.batch * pcfg.seq_len
        for n, t in timings.items():
            results[n].update(step=t.to_dict(), ms_per_step=t.median_ms, tokens_per_s=tokens / (t.median_ms / 1e3))
        for n in timings:
            try:
                results[n]["memory"] = peak_memory(cfg, steps[n])
            except Exception as exc:  # noqa: BLE001
                results[n]["memory"] = {"measured": False, "why": _error_line(exc)}

    speedup = {}
    ours = results.get("ours", {})
    if "ms_per_step" in ours:
        for base in BASELINES:
            b = results.get(base, {})
            if "ms_per_step" in b:
                speedup[base] = b["ms_per_step"] / ours["ms_per_step"]
    return model_info, {"methods": results, "speedup_of_ours": speedup, "tokens_per_step": tokens,
                        "reference": {**ref, "loss_tol": loss_tol, "grad_rel_tol": grad_tol}}


# --------------------------------------------------------------------------- report


def print_table(cfg: Config, env: dict, model_info: dict, res: dict) -> None:
    rows = []
    for name in METHODS:
        r = res["methods"].get(name, {})
        check = r.get("check", {})
        if "ms_per_step" in r:
            status = "ok"
        else:
            status = {"mismatch": "MISMATCH"}.get(r.get("status"), "skipped")
        mem = r.get("memory", {})
        rows.append([name, status,
                     f"{check['loss']:.5f}" if "loss" in check else "-",
                     f"{check['loss_diff_vs_reference']:.1e}" if "loss_diff_vs_reference" in check else "-",
                     fmt_ms(r.get("ms_per_step")),
                     f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-",
                     "1.00x" if name == "ours" and "ms_per_step" in r else
                     (f"{res['speedup_of_ours'][name]:.2f}x" if name in res["speedup_of_ours"] else "-"),
                     f"{mem['peak_mib']:.0f}" if mem.get("measured") else "-"])
    print(describe(env))
    print(f"prior {model_info['layers']} layers x d {model_info['d_model']} ({model_info['heads']} heads), "
          f"T={model_info['T']} S={model_info['S']} N={model_info['N']} kernel={model_info['kernel']}, "
          f"{model_info['params'] / 1e6:.1f}M params; batch {cfg.batch}, {cfg.dtype}"
          f"{' autocast' if cfg.dtype == 'bfloat16' else ''}; one step = fwd + bwd + AdamW + zero_grad; "
          f"medians of {cfg.repeats} interleaved rounds after {cfg.warmup} warm-up steps")
    print(format_table(["method", "status", "check loss", "|d loss| vs ref", "ms/step", "tokens/s",
                        "ours faster by", "peak MiB" + (" (cuda)" if cfg.device == "cuda" else " (n/a cpu)")], rows))
    for name in METHODS:
        r = res["methods"].get(name, {})
        if "ms_per_step" not in r and r.get("why"):
            print(f"{name}: {r['status']}: {r['why']}")


def main(argv: list[str] | None = None) -> int:
    cfg, json_path = parse_args(argv)
    env = environment(cfg.device)
    notes: list[str] = []
    with LoadMonitor() as monitor:
        model_info, res = run(cfg, notes)
    load = monitor.result()
    contended = load_warning(load) if cfg.device == "cpu" else None

    problems = []
    ours = res["methods"]["ours"]
    if "ms_per_step" not in ours:
        problems.append(f"ours is {ours.get('status')}: {ours.get('why', '?')}")
    if ours.get("check", {}).get("kernel_fallback"):
        problems.append("ours ran the dense reference, not our kernel (see notes)")
    for name in EXACT:
        if res["methods"].get(name, {}).get("status") == "mismatch":
            problems.append(f"{name} does not reproduce the reference: {res['methods'][name]['why']}")
    if contended:
        problems.append(contended)

    print_table(cfg, env, model_info, res)
    for line in notes:
        print(f"note: {line}")
    for line in problems:
        print(f"PROBLEM: {line}")

    payload = {
        "benchmark": "prior_training",
        "argv": sys.argv[1:] if argv is None else list(argv),
        "config": asdict(cfg),
        "model": model_info,
        "batch": cfg.batch,
        "dtype": cfg.dtype,
        "precision": "bf16 autocast" if cfg.dtype == "bfloat16" else "fp32",
        "environment": env,
        "method_descriptions": {
            "ours": "Prior's default attention: dalle_fast.ops.sparse_attention under ops.backend('auto')",
            "sdpa_causal": "F.scaled_dot_product_attention(is_causal=True): dense causal, ignores the sparse masks",
            "sdpa_mask": "F.scaled_dot_product_attention with the exact dense bool [N, N] mask per kind "
                         "(ops.attention_mask, built once per kind)",
            "flex": "torch.compile(flex_attention) + create_block_mask with bench_attention.flex_mask_mod",
        },
        "timing": {"unit": "one training step: forward + loss + backward + AdamW.step + zero_grad(set_to_none)",
                   "repeats": cfg.repeats, "warmup": cfg.warmup, "statistic": "median",
                   "order": "interleaved rounds: each repeat calls every method once; same model, attention fn "
                            "swapped per call",
                   "excluded": "the pre-timing check step (compilation) and warm-up steps",
                   "tokens_per_s": "batch * N / median step time"},
        "check_rule": {"reference": "one forward+backward of the same model under ops.backend('reference') "
                                    "(dense PyTorch attention) in float32; ours, sdpa_mask and flex against it",
                       "loss": f"|loss - ref| <= {LOSS_TOL:g} * max(1, |ref loss|) + 2 * the reference's own "
                               "error under the benchmark's autocast (0 in float32)",
                       "grads": f"max|g - g_ref| / max|g_ref| over all parameters <= {GRAD_TOL:g} + 2 * the "
                                "reference's own relative error under the benchmark's autocast",
                       "reference_run": res.get("reference"),
                       "sdpa_causal": "loss reported only (dense causal is another model of attention)"},
        "memory": "CUDA: torch.cuda.max_memory_allocated over one extra step per method (peak includes weights "
                  "and optimizer state, shared by all methods); CPU: not measured",
        "machine_load": load,
        "results": res,
        "notes": notes,
        "problems": problems,
    }
    path = write_json(json_path or default_result_path("prior", cfg.device), payload)
    print(f"wrote {path}")
    ok = "ms_per_step" in ours and not any(res["methods"].get(n, {}).get("status") == "mismatch" for n in EXACT)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
