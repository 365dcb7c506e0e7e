"""Build script: the Python package, the Triton kernels (installed as fastbert.kernels) and the C++
extension fastbert._C (csrc/). Build with ``pip install --no-build-isolation .`` against the installed torch."""

import glob
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
if sources and os.environ.get("FASTBERT_NO_EXT", "0") in ("", "0"):
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules.append(
        CppExtension(
            "fastbert._C",
            sources,
            # Portable x86-64 baseline: no -march=native. The AVX-512 (F/BW/VL/DQ) kernels live in
            # csrc/kernels_avx512.cpp (target pragma) and are picked at run time with __builtin_cpu_supports;
            # oneDNN (inside libtorch) picks its own ISA. -fopenmp: at::parallel_for is inline OpenMP code.
            # -fno-trapping-math: lets GCC if-convert the clamps/selects in the activation loops so they vectorize
            # (we never read floating-point exception flags); NaN/inf semantics are unchanged.
            extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"],
            extra_link_args=["-fopenmp"],
            depends=sorted(glob.glob(os.path.join("csrc", "*.h"))),
        )
    )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(
    packages=["fastbert", "fastbert.bench", "fastbert.kernels"],
    package_dir={"fastbert": "fastbert", "fastbert.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
