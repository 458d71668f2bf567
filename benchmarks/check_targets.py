"""Judge saved benchmark results against the open issues' performance targets.

Reads JSON written by bench_gumbel.py and bench_sampling.py and prints, for each target that a
file's shape can decide, the figure, the same-run baseline it is held to and a verdict; a file
at another shape, or a sampling run of another model, decides nothing. Verdicts:

  PASS        the figure meets the target, and the run's correctness checks passed
  FAIL        it does not, or a correctness check failed (a wrong result has no speed)
  NOT JUDGED  the figure is informational: a GPU run on another device than an H100 (the
              device tool often lends an H200), a CPU run on a contended machine, a run with
              a kernel switched off (a DALLE_FAST_* switch recorded as other than 1), or a run
              whose script did not record a check the target needs (older files: Gumbel's
              gradient check, sampling's step-logits check)

Exit code: 0 when every target was judged and passed, 1 when a target failed (or a file is
unreadable), 2 when none failed but some (or all) could not be judged here.

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
    ok: Optional[bool]  # None: not judged (see why)
    why: str = ""

    @property
    def status(self) -> str:
        return {True: "PASS", False: "FAIL", None: "NOT JUDGED"}[self.ok]


def _ms(method: dict, key: str) -> Optional[float]:
    timing = method.get(key)
    return timing.get("median_ms") if isinstance(timing, dict) else None


def _f(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.4g}" if abs(x) < 1e4 else f"{x:.0f}"


def _on_h100(env: dict) -> bool:
    return "H100" in str(env.get("device_name", ""))


def contended(data: dict) -> str:
    """A CPU run's figures decide nothing while other processes competed for the CPUs (the
    benchmark's own load warning): why, or '' (always for a GPU run, whose figures are the
    GPU's). The benchmarks record the machine's load as 'machine_load' (attention,
    gumbel_softmax, prior_training) or 'load' (sampling)."""
    if (data.get("environment") or {}).get("gpu"):
        return ""
    others = (data.get("machine_load") or data.get("load") or {}).get("others_avg_cpus")
    if others is not None and others > CONTENDED_CPUS:
        return f"other processes kept {others:.2f} CPUs busy: contended, rerun on a quiet machine"
    return ""


def _judge(issue: int, target: str, figure: str, baseline: str, met: bool, checks: dict[str, Optional[bool]],
           undecided: str = "") -> Verdict:
    """The verdict on a figure that meets its target or not (`met`), given the run's correctness
    checks (name -> True, False, or None where the run did not record it): a failed check fails
    the target (a wrong result has no speed); an unrecorded one, or `undecided` (another
    device, a contended machine), leaves it not judged."""
    failed = [name for name, ok in checks.items() if ok is False]
    if failed:
        return Verdict(issue, target, figure, baseline, False, f"{' and '.join(failed)} failed: the result is wrong")
    missing = [name for name, ok in checks.items() if ok is None]
    why = [f"{' and '.join(missing)} not recorded by this run (older script): unverified"] if missing else []
    why += [undecided] if undecided else []
    return Verdict(issue, target, figure, baseline, None, "; ".join(why)) if why else \
        Verdict(issue, target, figure, baseline, met)


def _undecided(*reasons: str) -> str:
    return "; ".join(r for r in reasons if r)


def _without(name: str, figure: Optional[float]) -> str:
    """Why a target held to the baseline `name` is not judged: the run did not time it (left out,
    or it failed), which says nothing about ours."""
    return f"the baseline {name} is not in this run" if figure is None else ""


def _not_h100(env: dict) -> str:
    if _on_h100(env):
        return ""
    return f"device {env.get('device_name')}: the targets are for an H100 (figure informational)"


def gumbel_verdicts(data: dict) -> Iterator[Verdict]:
    env = data.get("environment", {})
    shape = list(data.get("shape", []))
    for result in data.get("results", []):
        if result.get("dtype") != "float32":
            continue
        methods = result.get("methods", {})
        ours = methods.get("ours", {})
        accuracy = result.get("accuracy")  # unrecorded: runs before 2026-11-27
        backward = (accuracy or {}).get("backward")  # unrecorded: runs before 2026-11-29
        forward_checks = {"the forward accuracy check": accuracy.get("ok") if accuracy else None}
        both_checks = {**forward_checks, "the gradient check": backward.get("ok") if backward else None}
        if shape == [32, 8192, 32, 32] and env.get("gpu"):
            device = _not_h100(env)
            fwd, both = _ms(ours, "fwd"), _ms(ours, "fwd_bwd")
            gbps = ours.get("fwd_gbps")
            yield _judge(4, "H100 forward <= 1.1 ms", f"{_f(fwd)} ms", "", fwd is not None and fwd <= 1.1,
                         forward_checks, device)
            yield _judge(4, "H100 forward >= 2 TB/s effective", f"{_f(gbps)} GB/s", "",
                         gbps is not None and gbps >= 2000, forward_checks, device)
            yield _judge(4, "H100 forward+backward <= 3 ms", f"{_f(both)} ms", "", both is not None and both <= 3.0,
                         both_checks, device)
            compiled = methods.get("torch.compile(formula)")
            for key, label, checks in (("fwd", "forward", forward_checks),
                                       ("fwd_bwd", "forward+backward", both_checks)):
                mine, theirs = _ms(ours, key), _ms(compiled or {}, key)
                yield _judge(4, f"H100 {label} faster than torch.compile(formula)", f"{_f(mine)} ms",
                             f"torch.compile {_f(theirs)} ms", None not in (mine, theirs) and mine < theirs,
                             checks, _undecided(device, _without("torch.compile(formula)", theirs)))
        elif shape == [8, 512, 32, 32] and not env.get("gpu"):
            mine, theirs = _ms(ours, "fwd_bwd"), _ms(methods.get("F.gumbel_softmax", {}), "fwd_bwd")
            yield _judge(4, "CPU forward+backward >= 3x F.gumbel_softmax", f"{_f(mine)} ms",
                         f"F.gumbel_softmax {_f(theirs)} ms", None not in (mine, theirs) and theirs >= 3 * mine,
                         both_checks, _undecided(contended(data), _without("F.gumbel_softmax", theirs)))


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

    # ours' step logits against a full forward pass (unrecorded: runs before 2026-11-29)
    step_logits = results.get("ours", {}).get("step_logits")
    checks = {"ours' step-logits check": step_logits.get("ok") if step_logits else None}
    per_batch = per_batch_of("ours")
    if env.get("gpu") and (cfg.get("layers"), cfg.get("d_model"), cfg.get("text_len", 0) + cfg.get("grid", 0) ** 2,
                           model.get("batch")) == (12, 512, 1280, 16):
        yield _judge(7, "H100 1024 tokens x batch 16 in < 500 ms", f"{_f(per_batch)} ms", "",
                     per_batch is not None and per_batch < 500, checks, _not_h100(env))
    elif not env.get("gpu") and cfg.get("grid") == 16:
        recompute = per_batch_of("recompute")
        yield _judge(7, "CPU ours >= 10x faster than recompute", f"{_f(per_batch)} ms", f"recompute {_f(recompute)} ms",
                     None not in (per_batch, recompute) and recompute >= 10 * per_batch, checks,
                     _undecided(contended(data), _without("recompute", recompute)))


JUDGES = {"gumbel_softmax": gumbel_verdicts, "sampling": sampling_verdicts}


def switched_off(data: dict) -> dict[str, str]:
    """The DALLE_FAST_* switches a run set to other than on (runs before 2026-11-29 did not
    record them): such a run's "ours" is not our full kernels."""
    switches = (data.get("environment") or {}).get("dalle_fast_switches") or {}
    return {k: v for k, v in switches.items() if v != "1"}


def verdicts(path: Path) -> list[Verdict]:
    data = json.loads(path.read_text())
    judge = JUDGES.get(data.get("benchmark")) if isinstance(data, dict) else None
    found = list(judge(data)) if judge else []
    off = switched_off(data) if found else {}
    if off:  # a fallback run (gpu_check's sampling_safe, gumbel_two_sweep): not our full kernels
        note = f"run with {' '.join(f'{k}={v}' for k, v in off.items())}: not our full kernels (figure informational)"
        # a failed correctness check (a FAIL with its reason) still fails; anything else is not judged
        found = [v if v.ok is False and v.why else v._replace(ok=None, why="; ".join(filter(None, [v.why, note])))
                 for v in found]
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="JSON files of bench_gumbel.py / bench_sampling.py")
    args = parser.parse_args(argv)
    judged, failed, unjudged = 0, False, 0
    for path in args.results:
        try:
            found = verdicts(path)
        except (OSError, ValueError) as err:
            print(f"{path}: unreadable ({err})", file=sys.stderr)
            failed = True
            continue
        for v in found:
            judged += v.ok is not None
            unjudged += v.ok is None
            failed |= v.ok is False
            against = f" (against {v.baseline})" if v.baseline else ""
            why = f"  -- {v.why}" if v.why else ""
            print(f"{v.status}  issue {v.issue}: {v.target}: {v.figure}{against}  [{path.name}]{why}")
    if failed:
        return 1
    if unjudged or not judged:
        print("no target decided by these files" if not judged else f"{unjudged} target(s) not judged",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
