"""Helpers shared by the benchmark scripts: timing, device and version info, tables, JSON.

Every script times its op and its baselines in the same process with `time_fn`, excludes
warm-up (and so compilation) from the figures, and saves `environment(device)` beside them,
so a number is never read without knowing which machine, build and versions produced it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


# --------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Milliseconds per call: median (the figure we report), min, and every sample."""

    median_ms: float
    min_ms: float
    samples_ms: list[float] = field(default_factory=list)
    warmup: int = 0
    method: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


_L2_FLUSH: dict[int, torch.Tensor] = {}


def _flush_l2(device_index: int) -> None:
    # Like triton's do_bench: overwrite a buffer larger than L2 so no repeat starts with its inputs cached.
    buf = _L2_FLUSH.get(device_index)
    if buf is None:
        buf = _L2_FLUSH[device_index] = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32,
                                                     device=f"cuda:{device_index}")
    buf.zero_()


def time_fn(fn: Callable[[], Any], device: str | torch.device, repeats: int = 5, warmup: int = 2,
            flush_l2: bool = True) -> Timing:
    """Median wall time of `fn()` in ms over `repeats` calls, after `warmup` untimed calls.

    CPU: time.perf_counter around each call. CUDA: CUDA events around each call (the L2 cache
    flushed before each, outside the events), so only device time between the events counts.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples: list[float] = []
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for start, end in zip(starts, ends):
            if flush_l2:
                _flush_l2(index)
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        samples = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        method = "cuda events" + (", L2 flushed" if flush_l2 else "")
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        method = "time.perf_counter"
    return Timing(statistics.median(samples), min(samples), samples, warmup, method)


def time_interleaved(fns: dict[str, Callable[[], Any]], device: str | torch.device, repeats: int = 5,
                     warmup: int = 2, flush_l2: bool = True) -> dict[str, Timing]:
    """`time_fn` for several competitors at once, in rounds: each repeat runs every fn once.

    On a shared machine whose speed drifts (other tenants, clocks), drift then hits every
    competitor alike, so the ratios between them stay fair even where absolute times wobble.
    """
    samples: dict[str, list[float]] = {name: [] for name in fns}
    method = ""
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time_fn(fn, device, repeats=1, warmup=0, flush_l2=flush_l2)
            samples[name].append(t.median_ms)
            method = t.method
    return {name: Timing(statistics.median(s), min(s), s, warmup, method + ", interleaved rounds")
            for name, s in samples.items()}


# --------------------------------------------------------------------------- machine load


def _busy_ticks() -> int | None:
    """Non-idle jiffies of all CPUs since boot (None where /proc/stat is missing)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal


class LoadMonitor:
    """How much CPU other processes took while a benchmark ran: shared machines lie otherwise.

    with LoadMonitor() as load: ...;  load.result() -> dict. `others_avg_cpus` is the average
    number of CPUs kept busy by anything but this process (builds, tests of other sessions);
    much above 0 means CPU figures of the run are contended and their ratios are suspect.
    """

    def __enter__(self) -> "LoadMonitor":
        self._t0, self._self0, self._busy0 = time.perf_counter(), os.times(), _busy_ticks()
        self._load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
        return self

    def __exit__(self, *exc) -> None:
        self._t1, self._self1, self._busy1 = time.perf_counter(), os.times(), _busy_ticks()

    def result(self) -> dict:
        wall = self._t1 - self._t0
        # this process's and its waited-for children's (torch.compile's compiler runs): not other processes'
        own = sum(getattr(self._self1, f) - getattr(self._self0, f)
                  for f in ("user", "system", "children_user", "children_system"))
        out: dict[str, Any] = {"wall_s": wall, "self_cpu_s": own,
                               "loadavg_1m_start": self._load0[0] if self._load0 else None}
        if self._busy0 is not None and self._busy1 is not None:
            busy = (self._busy1 - self._busy0) / os.sysconf("SC_CLK_TCK")
            out["all_cpu_busy_s"] = busy
            out["others_avg_cpus"] = max(0.0, busy - own) / wall if wall > 0 else None
        return out


def load_warning(load: dict, threshold_cpus: float = 0.25) -> str | None:
    others = load.get("others_avg_cpus")
    if others is not None and others > threshold_cpus:
        return (f"other processes kept {others:.2f} CPUs busy on average during this run "
                f"({os.cpu_count()} CPUs): CPU timings are contended, rerun on a quiet machine")
    return None


# --------------------------------------------------------------------------- environment


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _physical_cores() -> int | None:
    """Distinct (physical id, core id) pairs in /proc/cpuinfo; None when it can't tell."""
    try:
        cores, phys = set(), None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":", 1)[1].strip()
                elif line.startswith("core id"):
                    cores.add((phys, line.split(":", 1)[1].strip()))
        return len(cores) or None
    except OSError:
        return None


def _git_state() -> dict:
    def run(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = run("rev-parse", "HEAD")
    status = run("status", "--porcelain")
    return {"commit": commit, "dirty": bool(status) if status is not None else None, "source_sha256": source_digest()}


SOURCE_GLOBS = ("csrc/**/*.h", "csrc/**/*.cpp", "csrc/**/*.cu", "dalle_fast/**/*.py", "benchmarks/*.py")


def source_digest(root: Path = REPO_ROOT) -> str:
    """SHA-256 (16 hex digits) of the source files' paths and contents: which code produced a
    figure even where the checkout's git state is stale or absent (a copied working tree, as on
    a lent GPU machine). `python -c "import benchmarks.common as c; print(c.source_digest())"`
    in a checkout of a candidate commit gives the digest to compare."""
    h = hashlib.sha256()
    for path in sorted({p for pattern in SOURCE_GLOBS for p in root.glob(pattern) if p.is_file()}):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _library_identity(module: Any) -> dict | None:
    """Path, mtime and hash of the compiled extension: which build produced a figure."""
    path = getattr(module, "__file__", None)
    if not path:
        return None
    try:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
        mtime = _dt.datetime.fromtimestamp(os.path.getmtime(path)).astimezone().isoformat(timespec="seconds")
    except OSError:
        return {"path": path}
    return {"path": path, "mtime": mtime, "sha256_16": digest}


# Read by setup.py / scripts/dev.sh when building, not by the ops: the build info records what they did.
BUILD_VARIABLES = ("DALLE_FAST_CUDA",)


def dalle_fast_switches() -> dict[str, str]:
    """The DALLE_FAST_* variables of this process's environment that our ops read (e.g.
    DALLE_FAST_GUMBEL_RESIDENT=0), not the build's: a run with a kernel switched off must not
    read as one of the full kernels. Empty: all defaults."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("DALLE_FAST_") and k not in BUILD_VARIABLES}


def _nvidia_driver() -> dict:
    """The NVIDIA driver's version (nvidia-smi) and the CUDA version it supports
    (cuDriverGetVersion of libcuda); None where unavailable. torch exposes neither."""
    out: dict[str, Any] = {"driver_version": None, "driver_cuda_version": None}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.split()
        out["driver_version"] = smi[0] if smi else None
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import ctypes

        version = ctypes.c_int(0)
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            out["driver_cuda_version"] = f"{version.value // 1000}.{version.value % 1000 // 10}"
    except (OSError, AttributeError):
        pass
    return out


def environment(device: str | torch.device) -> dict:
    """Machine, versions and dalle_fast build: what a result must carry to be comparable."""
    device = torch.device(device)
    env: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "platform": platform.platform(),
        "cpu": {
            "model": _cpu_model(),
            "logical_cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "physical_cores": _physical_cores(),
            "torch_threads": torch.get_num_threads(),
        },
        "git": _git_state(),
        "dalle_fast_switches": dalle_fast_switches(),
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        env["device_name"] = torch.cuda.get_device_name(index)
        env["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            # the CUDA runtime torch was built with (env["torch_cuda"]) is not the driver's:
            # runs before 2026-11-29 recorded it here as "driver_cuda"
            "torch_cuda_runtime": torch.version.cuda,
            **_nvidia_driver(),
            "cudnn": torch.backends.cudnn.version(),
        }
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
    else:
        env["device_name"] = env["cpu"]["model"]
    try:
        import dalle_fast
        from dalle_fast.ops import _backend

        env["dalle_fast"] = {"version": dalle_fast.__version__, "build_info": dict(_backend.BUILD_INFO),
                             "backend_info": dalle_fast.backend_info(), "library": _library_identity(_backend._C)}
    except Exception as exc:  # a benchmark of a baseline alone should still record why
        env["dalle_fast"] = {"error": repr(exc)}
    return env


def describe(env: dict) -> str:
    """One line for the top of a printed table."""
    cpu = env["cpu"]
    build = env.get("dalle_fast", {}).get("build_info", {})
    switches = " ".join(f"{k}={v}" for k, v in (env.get("dalle_fast_switches") or {}).items())
    return (f"device: {env['device_name']} | cpu: {cpu['model']} ({cpu['physical_cores']} cores, "
            f"{cpu['torch_threads']} torch threads) | torch {env['torch']} | python {env['python']} | "
            f"dalle_fast build: {build or 'not built'} | git {str(env['git'].get('commit'))[:10]}"
            f"{' (dirty)' if env['git'].get('dirty') else ''}, sources {env['git'].get('source_sha256')}"
            f"{' | switches: ' + switches if switches else ''}")


# --------------------------------------------------------------------------- output


def default_result_path(name: str, device: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return RESULTS_DIR / f"{name}_{device}_{stamp}.json"


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else str(obj)  # keep the file strict JSON
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    return obj


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(_jsonable(payload), f, indent=2, allow_nan=False)
        f.write("\n")
    return path


def fmt_ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain right-aligned text table (first column left-aligned)."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
