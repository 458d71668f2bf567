"""Instruction budget of the one-read Gumbel kernels, from their SASS, on a machine without a GPU.

The H100 runs of the fused Gumbel-softmax forward were bound by issuing instructions, not by
memory: the two-sweep kernel measured 2.795 ms at (32, 8192, 32, 32) fp32
(benchmarks/results/gumbel_cuda_20261127-075818.json, commit fc0eb7c), and its SASS issues 296.5
instructions per entry (its two sweeps' loop bodies, 593 + 593 per quad of 4 entries), so
268.4M entries ran at 28.5e12 thread instructions per second, 85% of the H100 SXM's issue peak.
This script counts what the one-read kernels (csrc/gumbel/cuda/gumbel_*_resident.cu) issue per
entry, so a change can be judged before a GPU is lent: at the same rate the forward takes
268.4M * n / 28.5e12 s, and the target (1.1 ms) needs n <= 116 with some margin for the cluster
barriers.

It compiles each kernel file for sm_90a with nvcc -cubin twice, with the tile path forced to the
full one (every position present, whole quads: the dVAE's V = 8192) and to the general one (once
as is for kernels older than that choice), and disassembles it with nvdisasm. The kernels' tile
loop is unrolled, so the static count of a kernel over the entries a thread handles per tile is
the instructions it issues per entry, plus the per-tile share of the setup and the cluster
combination. It also counts the Gumbel noise
alone (philox::gumbel_bits + gumbel_from_bits of one quad) per value.

nvdisasm is not in the CUDA toolkit's minimal install; `pip download nvidia-cuda-nvdisasm` has
it (bin/nvdisasm inside the wheel). Pass --nvdisasm or put it on PATH.

    python benchmarks/sass_budget.py --json benchmarks/results/sass_budget.json
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"

# (file, the line choosing the tile path, entries per thread per tile for each kernel suffix)
KERNELS = {
    "forward": ("gumbel/cuda/gumbel_fwd_resident.cu", {"Lb0": 64, "Lb1": 64}),
    "backward": ("gumbel/cuda/gumbel_bwd_resident.cu", {"Lb0": 64, "Lb1": 32}),
}
PATH_LINE = "const bool full = whole && full_tile(tile, p);"
DTYPES = {"If": "float32", "I13__nv_bfloat16": "bfloat16", "I6__half": "float16"}

NOISE_KERNEL = r"""
#include "gumbel/cuda/gumbel_cuda.h"
__global__ void noise_quad(uint64_t seed, uint64_t offset, float* out) {
  float g[4];
  dalle_fast::cuda::gumbel_detail::gumbel4(seed, offset, threadIdx.x, blockIdx.x, g);
  out[threadIdx.x] = g[0] + g[1] + g[2] + g[3];
}
__global__ void empty_kernel(uint64_t seed, uint64_t offset, float* out) {
  out[threadIdx.x] = float(seed) + float(offset);
}
"""


def find_nvcc() -> str:
    for cand in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).exists():
            return cand
    sys.exit("nvcc not found")


def compile_cubin(nvcc: str, source: Path, out: Path) -> str:
    cmd = [nvcc, "-O3", "--expt-relaxed-constexpr", "-std=c++17", "-gencode", "arch=compute_90a,code=sm_90a",
           "-Xptxas", "-v", "-cubin", "-o", str(out), str(source), f"-I{CSRC}", f"-I{source.parent}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"nvcc failed on {source}:\n{res.stderr}")
    return res.stderr


def ptxas_stats(log: str) -> dict[str, dict]:
    """Registers and spill bytes per kernel from ptxas -v."""
    stats, name = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            name = m.group(1)
            stats[name] = {}
        elif name:
            m = re.search(r"(\d+) bytes spill stores", line)
            if m:
                stats[name]["spill_store_bytes"] = int(m.group(1))
            m = re.search(r"Used (\d+) registers", line)
            if m:
                stats[name]["registers"] = int(m.group(1))
    return stats


def count_sass(nvdisasm: str, cubin: Path) -> dict[str, collections.Counter]:
    return parse_sass(subprocess.run([nvdisasm, "-c", str(cubin)], capture_output=True, text=True, check=True).stdout)


def parse_sass(text: str) -> dict[str, collections.Counter]:
    """Opcodes (without modifiers; NOPs left out) of each function in nvdisasm's output."""
    parts = re.split(r"\n\.text\.(\S+):\n", text)
    out = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        ops = collections.Counter()
        for line in body.splitlines():
            m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
            if m and m.group(1) != "NOP":
                ops[m.group(1)] += 1
        out[name] = ops
    return out


def kernel_variant(name: str) -> tuple[str, str] | None:
    for prefix, dtype in DTYPES.items():
        for suffix in ("Lb0", "Lb1"):
            if f"kernel{prefix}{suffix}E" in name:
                return dtype, suffix
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nvdisasm", default=shutil.which("nvdisasm"), help="path to nvdisasm")
    ap.add_argument("--json", type=Path, help="write the counts here")
    args = ap.parse_args()
    if not args.nvdisasm or not Path(args.nvdisasm).exists():
        sys.exit("nvdisasm not found: pass --nvdisasm (pip download nvidia-cuda-nvdisasm has it)")
    nvcc = find_nvcc()
    nvcc_version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        noise_src = tmp / "noise.cu"
        noise_src.write_text(NOISE_KERNEL)
        compile_cubin(nvcc, noise_src, tmp / "noise.cubin")
        counts = count_sass(args.nvdisasm, tmp / "noise.cubin")
        quad = sum(next(v for k, v in counts.items() if "noise_quad" in k).values())
        empty = sum(next(v for k, v in counts.items() if "empty_kernel" in k).values())
        noise_per_value = (quad - empty) / 4
        print(f"noise: {noise_per_value:.1f} instructions per value (one quad's kernel minus an empty one, / 4)")

        for kind, (rel, entries) in KERNELS.items():
            source = (CSRC / rel).read_text()
            # Kernels before the full path (commit 72ecd3f and older) have one path: counted as is.
            paths = [("full", "true"), ("general", "false")] if PATH_LINE in source else [("single", None)]
            for path, forced in paths:
                src = tmp / f"{kind}_{path}.cu"
                src.write_text(source if forced is None else source.replace(PATH_LINE, f"const bool full = {forced};"))
                # The copy includes its neighbours by relative paths: point them at csrc.
                text = src.read_text().replace('#include "../', f'#include "{CSRC / "gumbel"}/')
                text = text.replace('#include "gumbel_', f'#include "{CSRC / "gumbel" / "cuda"}/gumbel_')
                src.write_text(text)
                log = compile_cubin(nvcc, src, tmp / f"{kind}_{path}.cubin")
                stats = ptxas_stats(log)
                for name, ops in count_sass(args.nvdisasm, tmp / f"{kind}_{path}.cubin").items():
                    variant = kernel_variant(name)
                    if variant is None:
                        continue
                    dtype, suffix = variant
                    total = sum(ops.values())
                    row = {
                        "kernel": kind, "kl": suffix == "Lb1", "dtype": dtype, "path": path,
                        "instructions": total, "entries_per_thread_tile": entries[suffix],
                        "per_entry": round(total / entries[suffix], 1),
                        **stats.get(name, {}),
                        "top_ops": dict(ops.most_common(8)),
                    }
                    rows.append(row)
                    print(f"{kind:8s} kl={row['kl']!s:5s} {dtype:8s} {path:7s} {row['per_entry']:6.1f} per entry "
                          f"({total} / {entries[suffix]}), {row.get('registers')} registers, "
                          f"{row.get('spill_store_bytes')} B spilled")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "csrc"],
                                    capture_output=True, text=True).stdout.strip())
        args.json.write_text(json.dumps({
            "benchmark": "sass_budget",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git": {"commit": git, "csrc_dirty": dirty},
            "nvcc": nvcc_version, "arch": "sm_90a",
            "calibration": {"two_sweep_forward_ms": 2.795, "two_sweep_per_entry": 296.5, "entries": 268435456,
                            "thread_instructions_per_s": 28.5e12,
                            "source": "benchmarks/results/gumbel_cuda_20261127-075818.json at fc0eb7c"},
            "noise_per_value": noise_per_value,
            "kernels": rows,
        }, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
