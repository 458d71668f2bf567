"""Builds dalle_fast and its extension dalle_fast._C from csrc/.

The CPU kernels are always built. The CUDA kernels are built when nvcc and a CUDA-enabled torch
are present; DALLE_FAST_CUDA=0 skips them, DALLE_FAST_CUDA=1 makes their absence an error.
TORCH_CUDA_ARCH_LIST picks the GPU architectures (default 9.0, the H100 we test on); MAX_JOBS
bounds ninja's parallelism. CMakeLists.txt builds the same sources for C++ development.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# PyTorch guesses CUDA_HOME from the nvcc on PATH (/usr/local/bin/nvcc -> /usr/local), which is
# wrong on machines where the toolkit lives in /usr/local/cuda: prefer the real toolkit.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

# The extension links against this torch's C++ ABI, so it must be the torch that will import it.
# pyproject.toml therefore asks for no torch: a build isolated from the installed packages (pip's
# default, `python -m build`, uv) finds none here and stops at once, where it would otherwise have
# compiled against a fresh torch (whatever the newest release is) that the user's cannot load.
# Metadata and the sdist need no torch.
try:
    import torch  # noqa: E402
    from torch.utils import cpp_extension  # noqa: E402
except ImportError:
    if not {"egg_info", "sdist"} & set(sys.argv[1:]):
        sys.exit("dalle_fast: the extension is built against the torch you run it with, and this build sees none "
                 "(a build isolated from the installed packages, pip's default): install torch (and ninja) "
                 "first, then `pip install --no-build-isolation .`")
    torch = None


def _nvcc_cuda_version() -> str | None:
    """The CUDA release of the toolkit at CUDA_HOME ("13.0"), None where nvcc does not say."""
    import re
    import subprocess

    try:
        text = subprocess.run([os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"), "--version"],
                              capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", text)
    return match.group(1) if match else None


def want_cuda() -> bool:
    flag = os.environ.get("DALLE_FAST_CUDA", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU-only build")
    if cpp_extension.CUDA_HOME is None:
        problems.append("no CUDA toolkit (nvcc) found; set CUDA_HOME")
    elif torch.version.cuda is not None:
        nvcc = _nvcc_cuda_version()
        if nvcc is None:  # torch sets CUDA_HOME to /usr/local/cuda where it exists, runtime-only images too
            problems.append(f"no runnable nvcc at {os.path.join(cpp_extension.CUDA_HOME, 'bin', 'nvcc')} "
                            "(set CUDA_HOME to a CUDA toolkit)")
        elif nvcc.split(".")[0] != torch.version.cuda.split(".")[0]:
            problems.append(f"the CUDA toolkit at {cpp_extension.CUDA_HOME} is {nvcc}, torch was built with CUDA "
                            f"{torch.version.cuda} (the major versions must match; set CUDA_HOME)")
    if problems:
        if flag in ("1", "true", "yes", "on"):
            sys.exit("DALLE_FAST_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(problems))
        print("dalle_fast: building without CUDA kernels: " + "; ".join(problems), file=sys.stderr)
        return False
    return True


def sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def extension():
    with_cuda = want_cuda()
    # Host code: everything but the cuda/ folders; device code: the cuda/ folders.
    srcs = [s for s in sources("csrc/**/*.cpp") if "/cuda/" not in s]
    # -fopenmp at compile time only: at::parallel_for is inline and uses OpenMP pragmas; the
    # GOMP symbols resolve to the OpenMP runtime torch already loaded (no second copy).
    # -fno-trapping-math: floating-point operations are taken not to trap (no program enables
    # the traps), which lets GCC vectorise a loop with a clamp (exp_nonpos's max) before other
    # arithmetic; without it the AVX2 clone of every exp loop ran scalar. No result changes:
    # unlike -ffast-math it keeps IEEE values, NaN and infinities.
    cxx = ["-O3", "-fvisibility=hidden", "-fopenmp", "-fno-trapping-math"]
    define = [("DF_TORCH_VERSION", f'"{torch.__version__}"')]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not with_cuda:
        return cpp_extension.CppExtension(
            "dalle_fast._C", srcs, include_dirs=include_dirs, define_macros=define,
            extra_compile_args={"cxx": cxx})

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    srcs += sources("csrc/**/cuda/*.cpp") + sources("csrc/**/cuda/*.cu")
    # The CUDA wheels of torch ship headers (cublas, cusparse, ...) that ATen's CUDA headers
    # include and that a bare toolkit may lack.
    for nv in glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu*", "include")):
        include_dirs.append(os.path.abspath(nv))
    define += [("DF_WITH_CUDA", None), ("DF_CUDA_ARCHS", f'"{archs}"')]
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    return cpp_extension.CUDAExtension(
        "dalle_fast._C", srcs, include_dirs=include_dirs, define_macros=define,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc})


setup(
    name="dalle_fast",
    version="0.1.0",
    description="DALL-E (Zero-Shot Text-to-Image Generation) with hand-written sparse attention kernels",
    packages=find_packages(include=["dalle_fast", "dalle_fast.*"]),
    # The bundled model (scripts/recipe_shapes.sh makes it): `dalle-fast generate` without --model.
    package_data={"dalle_fast": ["assets/model/*.safetensors", "assets/model/*.json"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy", "tokenizers", "pillow", "safetensors", "tqdm"],
    ext_modules=[extension()] if torch is not None else [],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)} if torch is not None else {},
    entry_points={"console_scripts": ["dalle-fast = dalle_fast.cli:main"]},
    zip_safe=False,
)
