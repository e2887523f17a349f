"""Build script: the C++ CPU extension always, the CUDA extension when it can.

Build without isolation so the installed torch is used:

    pip install torch==2.13.0            # CPU build (or any torch you already have)
    pip install --no-build-isolation -e .

Build flags (environment variables, documented in README.md "Environment variables"):
  FLASHSLOTH_SKIP_CUDA_BUILD=1   never build the CUDA extension
  FLASHSLOTH_FORCE_CUDA=1        build it even when no GPU is visible (needs nvcc and a CUDA torch)
  FLASHSLOTH_SKIP_CPP_BUILD=1    build no extension at all (pure-Python install: reference + Triton)
  TORCH_CUDA_ARCH_LIST           CUDA architectures to build for (torch's own variable)
  MAX_JOBS                       parallel compile jobs (torch's own variable)
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("FLASHSLOTH_SKIP_CPP_BUILD"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    # One CPU extension per op folder: csrc/<op>/*_cpu.cpp -> flashsloth_kernels.<op>._C
    exts = []
    for op_dir in sorted(glob.glob("csrc/*/")):
        op = os.path.basename(os.path.normpath(op_dir))
        sources = sorted(glob.glob(os.path.join(op_dir, "*_cpu.cpp")))
        if not sources:
            continue
        exts.append(
            CppExtension(
                f"flashsloth_kernels.{op}._C",
                sources + ["csrc/init.cpp"],
                include_dirs=[os.path.join(ROOT, "csrc")],
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=["-fopenmp"],
            )
        )
    cuda_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    want_cuda = (
        not _flag("FLASHSLOTH_SKIP_CUDA_BUILD")
        and cuda_sources
        and torch.version.cuda is not None
        and CUDA_HOME is not None
        and (_flag("FLASHSLOTH_FORCE_CUDA") or torch.cuda.is_available())
    )
    if want_cuda:
        exts.append(
            CUDAExtension(
                "flashsloth_kernels._cuda",
                cuda_sources + sorted(glob.glob("csrc/**/*_cuda.cpp", recursive=True)),
                include_dirs=[os.path.join(ROOT, "csrc")],
                extra_compile_args={
                    "cxx": ["-O3", "-std=c++17"],
                    "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"],
                },
            )
        )
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
