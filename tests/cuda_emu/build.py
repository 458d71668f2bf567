"""Builds the CPU emulation of the CUDA kernels: emu_checks, the checks of checks.cpp.

    python tests/cuda_emu/build.py OUT_DIR [--sanitize address|thread|traffic|none]

translate.py rewrites csrc into OUT_DIR/csrc; the kernels' .cu files are compiled as host C++
against the stand-in CUDA headers of include/, with
  - address (the default): AddressSanitizer and UBSan (out-of-bounds global and shared memory,
    misaligned vector accesses);
  - thread: ThreadSanitizer, the CUDA threads as its fibers ordered only by the barriers CUDA
    guarantees (a race check, as compute-sanitizer's racecheck on a GPU);
  - traffic: every load and store of the kernels counted (include/emu_traffic.h: how often each
    byte of a buffer is read and written, and how much of each 32-byte sector a warp uses);
  - none: plain, the fastest to build.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
KERNELS = [  # the .cu files the checks run
    "gumbel/cuda/gumbel_fwd.cu",
    "gumbel/cuda/gumbel_bwd.cu",
    "gumbel/cuda/gumbel_fwd_resident.cu",
    "gumbel/cuda/gumbel_bwd_resident.cu",
    "attention/cuda/decode.cu",
    "linear/cuda/skinny_linear.cu",
    "attention/cuda/attention_fwd.cu",
    "attention/cuda/attention_bwd.cu",
    "attention/cuda/flash_fwd.cu",
    "attention/cuda/flash_bwd.cu",
]
HOST = ["attention/tile_plan.cpp", "attention/cuda/device_plan.cpp"]  # host code the kernels' callers need


def check_names() -> list[str]:
    """The names emu_checks takes, read from the table of main() in checks.cpp (their one list)."""
    table = re.search(r"checks = \{\n(.*?)\n  \};", (HERE / "checks.cpp").read_text(), re.S)
    if table is None:
        raise RuntimeError("checks.cpp: no table of checks in main()")
    return re.findall(r'\{"(\w+)", \w+\}', table.group(1))


CHECKS = check_names()


# The kernels' flags. traffic: every load and store a call to emu_traffic.cpp's hooks (the
# kernel-address instrumentation has no runtime library of its own), and no scalar replacement
# of aggregates, so that a 16-byte vector load stays one access as on the GPU.
SANITIZERS = {
    "address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"],
    "thread": ["-fsanitize=thread"],
    "traffic": ["-fsanitize=kernel-address", "--param=asan-instrumentation-with-call-threshold=0",
                "--param=asan-stack=0", "--param=asan-globals=0", "-fno-tree-sra"],
    "none": [],
}
# Where they differ from the kernels', the flags of the scheduler and the traffic counter (under
# ThreadSanitizer the scheduler only annotates; in the traffic build the counter defines the
# hooks), and of the checks and the link (the traffic build counts the kernels' accesses alone).
RUNTIME = {"thread": ["-DEMU_TSAN", "-fno-tree-loop-distribute-patterns"], "traffic": ["-DEMU_TRAFFIC"]}
HOST_SIDE = {"traffic": []}


def build(out: Path, sanitize: str = "address", cxx: str = "g++", patch=None) -> Path:
    """Translates and compiles; returns the path of emu_checks. Raises CalledProcessError.

    patch: called with the translated tree (OUT/csrc) before compiling, to break a kernel on
    purpose (a test that the checks can fail).
    """
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(HERE / "translate.py"), str(REPO / "csrc"), str(out / "csrc")], check=True)
    if patch is not None:
        patch(out / "csrc")
    flags = ["-std=c++17", "-O1", "-g", "-ffp-contract=off", f"-I{HERE / 'include'}"]
    sanitizer = SANITIZERS[sanitize]
    device = ["-x", "c++", "-D__CUDACC__", "-D__CUDA_ARCH__=900", "-include", "emu_device.h", *sanitizer]
    runtime = RUNTIME.get(sanitize, sanitizer)
    host_side = HOST_SIDE.get(sanitize, sanitizer)
    jobs = [(out / "csrc" / cu, device, out / (Path(cu).stem + ".o")) for cu in KERNELS]
    jobs += [(out / "csrc" / cpp, sanitizer, out / (Path(cpp).stem + ".o")) for cpp in HOST]
    jobs += [(HERE / f"{name}.cpp", runtime, out / f"{name}.o") for name in ("emu_runtime", "emu_traffic")]
    jobs.append((HERE / "checks.cpp", [f"-I{REPO / 'csrc'}", *host_side], out / "checks.o"))

    def compile_one(job):
        src, extra, obj = job
        subprocess.run([cxx, *flags, *extra, "-c", str(src), "-o", str(obj)], check=True)
        return obj

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        objs = list(pool.map(compile_one, jobs))
    exe = out / "emu_checks"
    subprocess.run([cxx, *flags, *host_side, *map(str, objs), "-o", str(exe)], check=True)
    return exe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--sanitize", choices=sorted(SANITIZERS), default="address")
    args = parser.parse_args()
    print(build(args.out, sanitize=args.sanitize))


if __name__ == "__main__":
    main()
