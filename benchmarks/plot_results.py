"""Bar charts of the saved benchmark results, for the README.

For each benchmark (attention, gumbel_softmax, sampling) and each device, the newest JSON under
`--results` (by the date its environment records) at the benchmark's default shapes (runs with
--batch, --dim and the like are left to their JSON) becomes one PNG under `--out`:

    attention_<device>.png   forward and forward+backward ms per mask kind, ours beside every
                             baseline of the same run (log scale)
    gumbel_<device>.png      forward and forward+backward ms per method and dtype
    sampling_<device>.png    ms per image-token step per method (log scale)

Each title names the device, the shape, the dtype and the date of the run, and the flags that
left methods out (--methods, --kinds, --dtypes, --no-compile); only methods that ran and passed
their accuracy check are drawn. Runs that set a DALLE_FAST_* switch to other than on (recorded
in their environment since 2026-11-29) are left out: their "ours" is not our full kernels.

    python benchmarks/plot_results.py                      # benchmarks/results -> benchmarks/results/plots
    python benchmarks/plot_results.py --results DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from check_targets import contended, switched_off  # noqa: E402  (benchmarks/ is this script's folder)

ROOT = Path(__file__).resolve().parent
NAMES = {"attention": "attention", "gumbel_softmax": "gumbel", "sampling": "sampling"}
# flags that time another shape or setting than the issues' (a run with one is not plotted as the default)
OTHER_SHAPES = ("--batch", "--dim", "--heads", "--text-len", "--grid", "--shape", "--quick", "--dtype", "--kernel",
                "--threads", "--tau", "--recompute-steps")
SUBSETS = ("--methods", "--kinds", "--dtypes", "--no-compile")  # fewer bars: said in the title


def subset_flags(data: dict) -> str:
    """The flags that left methods, kinds or dtypes out of a run, as given ('' if none)."""
    argv, out = list(data.get("argv") or []), []
    for i, arg in enumerate(argv):
        name = arg.split("=", 1)[0]
        if name in SUBSETS:
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if name != "--no-compile" and i + 1 < len(argv)
                                                             else "")
            out.append(f"{name} {value}".strip())
    return " ".join(out)


def newest_runs(folder: Path) -> dict[tuple[str, str], dict]:
    """The newest result of each (benchmark, device) among folder/*.json."""
    newest: dict[tuple[str, str], dict] = {}
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(data, dict) or data.get("benchmark") not in NAMES or "environment" not in data:
            continue
        if any(arg.split("=", 1)[0] in OTHER_SHAPES for arg in (data.get("argv") or [])):
            continue  # the plots show each benchmark's default shapes (the issues' targets)
        if switched_off(data):
            print(f"{path}: left out, run with {switched_off(data)} (not our full kernels)", file=sys.stderr)
            continue
        key = (NAMES[data["benchmark"]], device_of(data))
        data["_path"] = str(path)
        if key not in newest or data["environment"]["date"] > newest[key]["environment"]["date"]:
            newest[key] = data
    return newest


def device_of(data: dict) -> str:
    device = (data.get("config") or {}).get("device") or data.get("device")
    if device is None:
        name = data["environment"].get("device_name", "")
        device = "cuda" if any(s in name for s in ("NVIDIA", "H100", "H200", "A100")) else "cpu"
    return device


def subtitle(data: dict, what: str) -> str:
    env = data["environment"]
    note = " (timings contended: other processes were busy)" if contended(data) else ""
    subset = subset_flags(data)
    note += f"\n(only {subset})" if subset else ""
    return f"{env.get('device_name', '?')}, {what}, torch {env.get('torch', '?')}, {env['date'][:10]}{note}"


def _bars(ax, groups: list[str], series: dict[str, list[Optional[float]]], log: bool, unit: str) -> None:
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        kept = [(x, v) for x, v in zip(xs, values) if v is not None]
        if not kept:
            continue
        bars = ax.bar([x for x, _ in kept], [v for _, v in kept], width, label=name)
        ax.bar_label(bars, labels=[f"{v:.3g}" for _, v in kept], fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(unit)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)


def plot_attention(data: dict, path: Path) -> None:
    kinds = list(data["results"])
    methods: list[str] = []
    for kind in kinds:
        for name, result in data["results"][kind]["methods"].items():
            if result.get("status") == "ok" and name not in methods:
                methods.append(name)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, phase, label in ((axes[0], "fwd", "forward"), (axes[1], "fwdbwd", "forward + backward")):
        series = {}
        for name in methods:
            values = []
            for kind in kinds:
                result = data["results"][kind]["methods"].get(name, {})
                ok = result.get("status") == "ok" and result.get("accuracy", {}).get("ok", True)
                values.append(result[phase]["median_ms"] if ok and phase in result else None)
            series[name] = values
        _bars(ax, kinds, series, log=True, unit="ms (median, log scale)")
        ax.set_title(label)
    s = data["shape"]
    fig.suptitle("sparse attention: " + subtitle(
        data, f"B={s['B']} H={s['H']} N={s['N']} D={s['D']} {data['dtype']}"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gumbel(data: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    groups = [r["dtype"] for r in data["results"]]
    names: list[str] = []
    for r in data["results"]:
        names += [m for m, v in r["methods"].items() if isinstance(v, dict) and "fwd" in v and m not in names]
    for ax, phase, label in ((axes[0], "fwd", "forward"), (axes[1], "fwd_bwd", "forward + backward")):
        series = {m: [r["methods"].get(m, {}).get(phase, {}).get("median_ms") if isinstance(r["methods"].get(m), dict)
                      else None for r in data["results"]] for m in names}
        _bars(ax, groups, series, log=False, unit="ms (median)")
        ax.set_title(label)
    shape = "x".join(str(n) for n in data["shape"])
    fig.suptitle("Gumbel-softmax: " + subtitle(data, f"logits {shape}, softmax over dim 1"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sampling(data: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    names = [n for n in data["results"] if n not in data.get("skipped", {}) and "ms_per_token" in data["results"][n]]
    _bars(ax, ["ms per token step"], {n: [data["results"][n]["ms_per_token"]] for n in names}, log=True,
          unit="ms (log scale)")
    m = data["model"]
    cfg = m["config"]
    what = (f"{cfg['layers']} layers d{cfg['d_model']}, {cfg['grid']}x{cfg['grid']} tokens, batch {m['batch']}, "
            f"{m['dtype']}")
    ax.set_title("sampling\n" + subtitle(data, what), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOTS = {"attention": plot_attention, "gumbel": plot_gumbel, "sampling": plot_sampling}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=ROOT / "results", help="folder of benchmark JSON files")
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: RESULTS/plots)")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        parser.error(f"--results {args.results} is not a folder")
    out = args.out or args.results / "plots"
    out.mkdir(parents=True, exist_ok=True)
    runs = newest_runs(args.results)
    if not runs:
        print(f"no benchmark results in {args.results}", file=sys.stderr)
        return 1
    for (name, device), data in sorted(runs.items()):
        path = out / f"{name}_{device}.png"
        PLOTS[name](data, path)
        print(f"{path}  <- {data['_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
