"""Judge saved benchmark results against the open issues' performance targets.

Reads JSON written by bench_gumbel.py and bench_sampling.py and prints, for each target that a
file's device and shape can decide, the figure, the same-run baseline it is held to and PASS or
FAIL; a file at another shape, or a sampling run of another model, decides nothing. Exit code 0
when every target decided passed (and at least one was decided), 1 otherwise.

  issue 4 (Gumbel-softmax)   H100, (32, 8192, 32, 32) float32: forward <= 1.1 ms and >= 2 TB/s
                             effective, forward+backward <= 3 ms, ours faster than
                             torch.compile of the formula (forward and forward+backward) in the
                             same run; CPU, (8, 512, 32, 32) float32: forward+backward at least
                             3x faster than F.gumbel_softmax
  issue 7 (sampling)         H100, 12 layers, d 512, 1280 tokens, batch 16: ours samples the
                             1024 image tokens in under 500 ms; CPU, a 16x16 grid: ours at least
                             10x faster than recompute

    python benchmarks/check_targets.py gpu_check_out/gumbel.json gpu_check_out/sampling.json
    python benchmarks/check_targets.py benchmarks/results/*.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterator, NamedTuple, Optional


CONTENDED_CPUS = 0.25  # as benchmarks/common.py's load_warning


class Verdict(NamedTuple):
    issue: int
    target: str
    figure: str
    baseline: str
    ok: bool


def _ms(method: dict, key: str) -> Optional[float]:
    timing = method.get(key)
    return timing.get("median_ms") if isinstance(timing, dict) else None


def _f(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.4g}" if abs(x) < 1e4 else f"{x:.0f}"


def _on_h100(env: dict) -> bool:
    return "H100" in str(env.get("device_name", ""))


def _contended(load: Optional[dict]) -> str:
    """A CPU run's figures decide nothing while other processes competed for the CPUs (the
    benchmark's own load warning): a note for the figure, or ''."""
    others = (load or {}).get("others_avg_cpus")
    if others is not None and others > CONTENDED_CPUS:
        return f" (other processes kept {others:.2f} CPUs busy: contended, rerun on a quiet machine)"
    return ""


def gumbel_verdicts(data: dict) -> Iterator[Verdict]:
    env = data.get("environment", {})
    shape = list(data.get("shape", []))
    for result in data.get("results", []):
        if result.get("dtype") != "float32":
            continue
        methods = result.get("methods", {})
        ours = methods.get("ours", {})
        accurate = (result.get("accuracy") or {}).get("ok") is True  # unrecorded (runs before 2026-11-27): unverified
        unverified = "" if result.get("accuracy") else " (accuracy not recorded: unverified)"
        if shape == [32, 8192, 32, 32] and _on_h100(env):
            fwd, both = _ms(ours, "fwd"), _ms(ours, "fwd_bwd")
            gbps = ours.get("fwd_gbps")
            yield Verdict(4, "H100 forward <= 1.1 ms", f"{_f(fwd)} ms{unverified}", "",
                          accurate and fwd is not None and fwd <= 1.1)
            yield Verdict(4, "H100 forward >= 2 TB/s effective", f"{_f(gbps)} GB/s{unverified}", "",
                          accurate and gbps is not None and gbps >= 2000)
            yield Verdict(4, "H100 forward+backward <= 3 ms", f"{_f(both)} ms{unverified}", "",
                          accurate and both is not None and both <= 3.0)
            compiled = methods.get("torch.compile(formula)")
            for key, label in (("fwd", "forward"), ("fwd_bwd", "forward+backward")):
                mine, theirs = _ms(ours, key), _ms(compiled or {}, key)
                yield Verdict(4, f"H100 {label} faster than torch.compile(formula)", f"{_f(mine)} ms{unverified}",
                              f"torch.compile {_f(theirs)} ms",
                              accurate and None not in (mine, theirs) and mine < theirs)
        elif shape == [8, 512, 32, 32] and not env.get("gpu"):
            mine, theirs = _ms(ours, "fwd_bwd"), _ms(methods.get("F.gumbel_softmax", {}), "fwd_bwd")
            contended = _contended(data.get("machine_load"))
            yield Verdict(4, "CPU forward+backward >= 3x F.gumbel_softmax", f"{_f(mine)} ms{unverified}{contended}",
                          f"F.gumbel_softmax {_f(theirs)} ms",
                          accurate and not contended and None not in (mine, theirs) and theirs >= 3 * mine)


def sampling_verdicts(data: dict) -> Iterator[Verdict]:
    env = data.get("environment", {})
    model = data.get("model", {})
    cfg = model.get("config", {})
    results, skipped = data.get("results", {}), data.get("skipped", {})
    image_len = cfg.get("grid", 0) ** 2

    def per_batch_of(name: str) -> Optional[float]:  # runs before 2026-11-27 recorded ms per token only
        r = results.get(name, {}) if name not in skipped else {}
        if r.get("ms_per_batch") is not None:
            return r["ms_per_batch"]
        return r["ms_per_token"] * image_len if r.get("ms_per_token") is not None else None

    per_batch = per_batch_of("ours")
    if _on_h100(env) and (cfg.get("layers"), cfg.get("d_model"), cfg.get("text_len", 0) + cfg.get("grid", 0) ** 2,
                          model.get("batch")) == (12, 512, 1280, 16):
        yield Verdict(7, "H100 1024 tokens x batch 16 in < 500 ms", f"{_f(per_batch)} ms", "",
                      per_batch is not None and per_batch < 500)
    elif not env.get("gpu") and cfg.get("grid") == 16:
        recompute = per_batch_of("recompute")
        contended = _contended(data.get("load"))
        yield Verdict(7, "CPU ours >= 10x faster than recompute", f"{_f(per_batch)} ms{contended}",
                      f"recompute {_f(recompute)} ms",
                      not contended and None not in (per_batch, recompute) and recompute >= 10 * per_batch)


JUDGES = {"gumbel_softmax": gumbel_verdicts, "sampling": sampling_verdicts}


def verdicts(path: Path) -> list[Verdict]:
    data = json.loads(path.read_text())
    judge = JUDGES.get(data.get("benchmark")) if isinstance(data, dict) else None
    env = data.get("environment", {}) if judge else {}
    if env.get("gpu") and not _on_h100(env):  # e.g. the device tool's H200 fallback
        print(f"{path}: run on {env.get('device_name')}; the GPU targets are for an H100", file=sys.stderr)
    return list(judge(data)) if judge else []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="JSON files of bench_gumbel.py / bench_sampling.py")
    args = parser.parse_args(argv)
    decided, all_ok = 0, True
    for path in args.results:
        try:
            found = verdicts(path)
        except (OSError, ValueError) as err:
            print(f"{path}: unreadable ({err})", file=sys.stderr)
            all_ok = False
            continue
        for v in found:
            decided += 1
            all_ok &= v.ok
            against = f" (against {v.baseline})" if v.baseline else ""
            print(f"{'PASS' if v.ok else 'FAIL'}  issue {v.issue}: {v.target}: {v.figure}{against}  [{path.name}]")
    if decided == 0:
        print("no target decided by these files", file=sys.stderr)
    return 0 if decided and all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
