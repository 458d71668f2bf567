"""The CUDA kernels run on the CPU emulation of tests/cuda_emu, against scalar references.

The CUDA tests beside this file need a GPU; these run the same .cu sources on any machine with
g++: the one-read Gumbel cluster kernels, the two-sweep Gumbel kernels and gumbel_argmax, the
decode kernels (fast and general, with the cache write), skinny_linear's tensor-core path, and
the sparse-attention kernels (one-warp and flash, forward and backward).
Once under AddressSanitizer and UBSan (values, out-of-bounds and misaligned accesses, unwritten
shared memory), once under ThreadSanitizer (races: accesses of two threads with no barrier
between), once with every global load and store counted (how often each byte is read and written,
how much of each 32-byte sector a warp's request uses). They catch indexing, predicate, barrier,
cluster-exchange and memory-traffic bugs before a GPU session; speed still needs the GPU.
"""

import os
import re
import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.cuda_emu.build import CHECKS, build

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the emulation is built with g++")


@pytest.fixture(scope="module")
def emu_checks(tmp_path_factory):
    return build(tmp_path_factory.mktemp("cuda_emu"))


@pytest.fixture(scope="module")
def emu_race_checks(tmp_path_factory):
    return build(tmp_path_factory.mktemp("cuda_emu_tsan"), sanitize="thread")


@pytest.fixture(scope="module")
def emu_traffic_checks(tmp_path_factory):
    return build(tmp_path_factory.mktemp("cuda_emu_traffic"), sanitize="traffic")


def run(exe, *args, sms=4, schedule=None):
    env = {**os.environ, "EMU_SMS": str(sms)}
    for name in ("DALLE_FAST_GUMBEL_RESIDENT", "DALLE_FAST_DECODE_FAST", "EMU_SCHEDULE", "EMU_MAX_CLUSTERS"):
        env.pop(name, None)
    if schedule is not None:
        env["EMU_SCHEDULE"] = str(schedule)
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=600, env=env)


# A device of 4 SMs makes the kernels' grid-stride and tile loops take several turns on small
# shapes; one of 132 (the H100's) gives the one-read kernels the H100's cluster counts. The
# kernels not yet run on a GPU run in a random order of their threads (EMU_SCHEDULE: blocks and
# warps run ahead of each other), and the cluster kernels once more in order. "attention" (the
# sparse-attention kernels, which have passed their tests on an H100) is the emulation's control.
NEW_KERNELS = ["gumbel_fwd", "gumbel_bwd", "gumbel_argmax", "gumbel_nan", "decode", "skinny_linear"]
RUNS = ([(name, 4, 1) for name in NEW_KERNELS] + [("gumbel_fwd", 132, None), ("gumbel_bwd", 132, None)] +
        [(name, 4, None) for name in CHECKS if name not in NEW_KERNELS])


@pytest.mark.parametrize("name,sms,schedule", RUNS)
def test_kernel_matches_reference_on_emulation(emu_checks, name, sms, schedule):
    result = run(emu_checks, name, sms=sms, schedule=schedule)
    assert result.returncode == 0, f"{name} failed on the emulation:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    assert "PASS" in result.stdout and "FAIL" not in result.stdout


# "traffic" repeats gumbel_fwd and gumbel_bwd's kernels at larger shapes, whose many clusters of
# 4096 threads would pass ThreadSanitizer's thread limit.
@pytest.mark.parametrize("name", [name for name in CHECKS if name != "traffic"])
def test_kernel_has_no_race_on_emulation(emu_race_checks, name):
    result = run(emu_race_checks, name)
    assert "ThreadSanitizer" not in result.stderr, result.stderr[-8000:]
    assert result.returncode == 0, f"{name} failed on the emulation:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"


# Random shapes, dtypes and options of every kernel (`emu_checks fuzz COUNT SEED`: see checks.cpp);
# a failing case's line names its shape.
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_random_shapes_on_emulation(emu_checks, seed):
    result = run(emu_checks, "fuzz", 3, seed, schedule=seed)
    assert result.returncode == 0, f"seed {seed}:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_random_shapes_have_no_race_on_emulation(emu_race_checks, seed):
    result = run(emu_race_checks, "fuzz", 2, seed)
    assert "ThreadSanitizer" not in result.stderr, f"seed {seed}:\n{result.stderr[-8000:]}"
    assert result.returncode == 0, f"seed {seed}:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"


def replace_once(path, old, new):
    """A deliberate bug: `old`, which must occur once in the translated file (comments blank), becomes `new`."""
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} in {path}"
    path.write_text(text.replace(old, new))


def one_parity(src):
    """One buffer of block statistics instead of two alternating ones: a block may overwrite its
    statistics of the next tile while another block of the cluster still reads this tile's."""
    replace_once(src / "gumbel" / "cuda" / "gumbel_fwd_resident.cu", "tile += pl.clusters, parity ^= 1",
                 "tile += pl.clusters")


def reuse_scratch_early(src):
    """decode's block reduction without its second barrier: the next reduction may overwrite the
    scratch while a slower warp still reads it (write after read)."""
    path = src / "attention" / "cuda" / "decode.cu"  # translated: comments are blank
    text, n = re.subn(r"(x = op\(x, scratch\[w\]\);\n)\s*__syncthreads\(\);", r"\1", path.read_text())
    assert n == 1
    path.write_text(text)


@pytest.mark.parametrize("patch,check,where", [(one_parity, "gumbel_fwd", "gumbel_cluster.h"),
                                               (reuse_scratch_early, "decode", "decode.cu")])
def test_a_race_is_reported(tmp_path, patch, check, where):
    """The race check is not vacuous: these races give right values in the emulator's order, and
    ThreadSanitizer reports them."""
    exe = build(tmp_path, sanitize="thread", patch=patch)
    result = run(exe, check)
    assert "WARNING: ThreadSanitizer: data race" in result.stderr
    assert where in result.stderr
    assert result.returncode != 0


def skip_cluster_barrier(path, after):
    """A deliberate bug: the first cluster barrier after `after` in the translated file never runs."""
    text = path.read_text()
    at = text.index("cluster.sync_at(", text.index(after))
    path.write_text(text[:at] + "if (false) " + text[at:])


def drop_combine_barrier(src):
    """combine() reads the other blocks' statistics without waiting for them to be written."""
    skip_cluster_barrier(src / "gumbel" / "cuda" / "gumbel_cluster.h", "Part combine(")


def drop_final_cluster_barrier(src):
    """A block leaves while another block of its cluster may still read its statistics."""
    skip_cluster_barrier(src / "gumbel" / "cuda" / "gumbel_fwd_resident.cu", "resident_kernel(")


def tighten_launch_bounds(src):
    """decode's fast kernel declared for half the threads it is launched with (a launch error)."""
    replace_once(src / "attention" / "cuda" / "decode.cu", "::emu::launch_bounds(kFastThreads);",
                 "::emu::launch_bounds(kFastThreads / 2);")


@pytest.mark.parametrize("patch,check,expect", [
    (drop_combine_barrier, "gumbel_fwd", "another block's shared memory before any cluster.sync"),
    (drop_final_cluster_barrier, "gumbel_fwd", "that block of the cluster has exited"),
    (tighten_launch_bounds, "decode", "more threads than the kernel's __launch_bounds__"),
])
def test_a_broken_kernel_fails(tmp_path, patch, check, expect):
    """The checks are not vacuous: each of these bugs (races or launch errors on a GPU) is reported."""
    exe = build(tmp_path, sanitize="none", patch=patch)
    result = run(exe, check, schedule=1)
    assert result.returncode != 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert expect in result.stdout + result.stderr


# The memory traffic of the kernels the issues' targets rest on (include/emu_traffic.h): the
# one-read Gumbel kernels read each logit once (the two-sweep ones twice) and write once, in whole
# 32-byte sectors at the dVAE's layout; decode reads exactly the cache rows its mask allows;
# skinny_linear reads the weights once, in whole sectors.
TRAFFIC_CHECKS = ["gumbel_fwd", "gumbel_bwd", "gumbel_argmax", "decode", "skinny_linear", "traffic"]


@pytest.mark.parametrize("name", TRAFFIC_CHECKS)
def test_kernel_memory_traffic_on_emulation(emu_traffic_checks, name):
    result = run(emu_traffic_checks, name)
    assert result.returncode == 0, f"{name}:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    assert "PASS traffic" in result.stdout


def reread_row_zero(src):
    """decode's idle slots and masked keys load row 0's K chunks instead of nothing: the same
    values (their scores are -inf), row 0 read many times."""
    replace_once(src / "attention" / "cuda" / "decode.cu",
                 "row[r] >= 0 ? reinterpret_cast<const uint4*>(p.k_row<T>(b, h, row[r], g))[chunk] : uint4{}",
                 "reinterpret_cast<const uint4*>(p.k_row<T>(b, h, row[r] >= 0 ? row[r] : 0, g))[chunk]")


def scatter_key_chunks(src):
    """decode's lanes over keys instead of over a key's chunks: each lane of a request reads 16
    bytes of another row, half of every 32-byte sector unused."""
    replace_once(src / "attention" / "cuda" / "decode.cu",
                 "chunk = static_cast<int>(threadIdx.x) % kChunks, slot = static_cast<int>(threadIdx.x) / kChunks",
                 "chunk = static_cast<int>(threadIdx.x) / kSlots, slot = static_cast<int>(threadIdx.x) % kSlots")


@pytest.mark.parametrize("patch,expect", [
    (reread_row_zero, r"FAIL traffic decode fast [^\n]*: [1-9][0-9]* rows read more than once; 100%"),
    (scatter_key_chunks, r"FAIL traffic decode fast [^\n]*read more than once; [0-9]{1,2}% of sector bytes used"),
])
def test_wasted_traffic_is_reported(tmp_path, patch, expect):
    """The traffic checks are not vacuous: a re-read row and uncoalesced loads are reported."""
    exe = build(tmp_path, sanitize="traffic", patch=patch)
    result = run(exe, "decode")
    assert result.returncode != 0
    assert re.search(expect, result.stdout), result.stdout[-3000:]


def test_translation_of_cuda_syntax():
    from tests.cuda_emu.translate import translate

    src = """
__global__ void k(const P p) {
  extern __shared__ __align__(16) unsigned char raw[];
  __shared__ float part[kWarps][HD];
  static __shared__ alignas(16) float4 q4[8];  // asm( in a comment, not code
  asm volatile("" : "+l"(x));
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x * 2.0f));
  cluster.sync();
}
template <int HD>
__global__ void __launch_bounds__(kThreads, HD == 128 ? 2 : 4)
    k2(const P p, float* __restrict__ out) { body(); }
__global__ void __launch_bounds__(256) k3(int n);
void launch() { k<T, 4><<<grid, 256, smem, stream>>>(p, 3); other<<<1, 32>>>(); }
"""
    out = translate(src, "x.cu")
    assert "unsigned char* raw = ::emu::dynamic_shared<unsigned char>();" in out
    assert re.search(r"auto& part = ::emu::shared_var<float\[kWarps\]\[HD\], \d+, 0>\(\);", out)
    assert re.search(r"auto& q4 = ::emu::shared_var<float4\[8\], \d+, 16>\(\);", out)  # static, alignas kept
    assert "// asm(" not in out and "not code" not in out  # comments are blanked, never rewritten
    assert "(void)0;" in out and "r = ::emu::ex2_approx_ftz(x * 2.0f);" in out
    assert 'cluster.sync_at("x.cu:" EMU_STR(__LINE__))' in out
    assert "::emu::launch_kernel(k<T, 4>, dim3(grid), dim3(256), smem, stream, p, 3);" in out
    assert "::emu::launch_kernel(other, dim3(1), dim3(32), 0, nullptr);" in out
    assert "k2(const P p, float* __restrict__ out) { ::emu::launch_bounds(kThreads); body(); }" in out
    assert "__global__ void  k3(int n);" in out  # a declaration: nothing to check
    assert out.count("\n") == src.count("\n")  # line numbers kept (the sites of barriers)
    assert "asm" not in out and "<<<" not in out and "__shared__" not in out and "__launch_bounds__" not in out
