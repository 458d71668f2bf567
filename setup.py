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

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402


def want_cuda() -> bool:
    flag = os.environ.get("DALLE_FAST_CUDA", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU-only build")
    if cpp_extension.CUDA_HOME is None:
        problems.append("no CUDA toolkit (nvcc) found; set CUDA_HOME")
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
    cxx = ["-O3", "-fvisibility=hidden", "-fopenmp"]
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
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["dalle-fast = dalle_fast.cli:main"]},
    zip_safe=False,
)
