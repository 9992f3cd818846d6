"""Builds the native extension ``l2p_fast._C``: CPU kernels always, CUDA kernels when torch has CUDA
and nvcc is found. Install with ``pip install --no-build-isolation -e .`` (torch must already be in
the environment). ``L2P_FAST_NO_EXTENSION=1`` installs the pure-Python package only.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE_DIR = {"l2p_fast": "l2p_fast", "l2p_fast.kernels": "kernels"}


def _subpackages() -> list[str]:
    """Every package under l2p_fast/ (the top-level kernels/ folder maps to l2p_fast.kernels)."""
    found = []
    for root, _dirs, files in os.walk(os.path.join(HERE, "l2p_fast")):
        if "__init__.py" in files and "__pycache__" not in root:
            found.append(os.path.relpath(root, HERE).replace(os.sep, "."))
    return sorted(set(found) | {"l2p_fast.kernels"})


def _find_cuda_home() -> str | None:
    """CUDA_HOME if set, else the conventional toolkit root, else the real folder above nvcc.

    torch's own guess takes the folder above the first ``nvcc`` on PATH, which is wrong when that
    nvcc is a wrapper script in a generic bin folder.
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    if os.path.exists(os.path.join("/usr/local/cuda", "bin", "nvcc")):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    with open(nvcc, "rb") as handle:  # a wrapper script `exec /path/to/bin/nvcc "$@"`
        head = handle.read(512)
    for token in head.split():
        if token.endswith(b"/bin/nvcc") and os.path.exists(token):
            return os.path.dirname(os.path.dirname(token.decode()))
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _nvidia_pip_includes() -> list[str]:
    """Include folders of the ``nvidia-*`` pip packages torch depends on (cuBLAS/cuSPARSE headers)."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    found = []
    for root in spec.submodule_search_locations:
        found += sorted(glob.glob(os.path.join(root, "*", "include")))
    return found


def _extensions() -> tuple[list, dict]:
    if os.environ.get("L2P_FAST_NO_EXTENSION") == "1":
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home and "CUDA_HOME" not in os.environ:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        sys.exit(
            "l2p_fast: building the native extension needs PyTorch installed first. Run\n"
            "    pip install -r requirements-dev.txt && pip install --no-build-isolation -e .\n"
            "(or `make install`), or set L2P_FAST_NO_EXTENSION=1 for the pure-Python package."
        )
    os.environ.setdefault("MAX_JOBS", "2")
    sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    if os.environ.get("L2P_FAST_NATIVE_ARCH", "1") == "1":
        cxx_flags.append("-march=native")
    include_dirs = [os.path.join(HERE, "csrc")]
    with_cuda = (
        torch.version.cuda is not None
        and cuda_home is not None
        and os.environ.get("L2P_FAST_NO_CUDA") != "1"
        and bool(glob.glob("csrc/cuda/*.cu"))
    )
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        extension = CUDAExtension(
            "l2p_fast._C",
            sources + sorted(glob.glob("csrc/cuda/*.cu")),
            include_dirs=include_dirs + _nvidia_pip_includes(),
            define_macros=[("L2P_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        extension = CppExtension(
            "l2p_fast._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    print(f"l2p_fast: building l2p_fast._C ({'CPU + CUDA' if with_cuda else 'CPU only'})")
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(
    packages=_subpackages(),
    package_dir=PACKAGE_DIR,
    package_data={"l2p_fast": ["continual/data/*.gz", "continual/data/*.txt"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
