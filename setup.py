"""Optional install-time build of the linear-scan extensions (trainer/scan/csrc).

The project's metadata lives in pyproject.toml; this file only adds compiled extensions,
and only when asked, so a plain `pip install -e .` builds nothing and needs no torch:

    BIRDIE_BUILD_EXT=1 pip install --no-build-isolation -e .

builds trainer.scan._scan_cpu (C++) and, when torch is a CUDA build and nvcc is found,
trainer.scan._scan_cuda. `--no-build-isolation` compiles against the torch that will import
them. Without an install-time build, trainer.scan builds the same sources just in time
on first use (cached under ~/.cache/birdie/ext or $TORCH_EXTENSIONS_DIR).
"""

import os

from setuptools import setup


def scan_extensions():
    if os.environ.get("BIRDIE_BUILD_EXT") != "1":
        return {}, []
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    csrc = os.path.join("trainer", "scan", "csrc")
    include = [os.path.abspath(csrc)]
    # flags as in trainer/scan/extension.py (keep the two in step)
    modules = [
        CppExtension(
            "trainer.scan._scan_cpu",
            [os.path.join(csrc, "scan_cpu.cpp")],
            include_dirs=include,
            extra_compile_args=["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    ]
    if torch.version.cuda is not None and CUDA_HOME is not None:
        modules.append(
            CUDAExtension(
                "trainer.scan._scan_cuda",
                [os.path.join(csrc, "scan_cuda_bindings.cpp"), os.path.join(csrc, "scan_cuda.cu")],
                include_dirs=include,
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
            )
        )
    return {"build_ext": BuildExtension}, modules


cmdclass, ext_modules = scan_extensions()
setup(cmdclass=cmdclass, ext_modules=ext_modules)
