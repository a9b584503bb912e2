"""Builds fused_lstm._C: the C++ sources always, the CUDA sources where nvcc and a CUDA build of torch are.

Environment:
  FUSED_LSTM_SKIP_CUDA=1   build the CPU-only extension even where CUDA is available (a fast local loop;
                           CI never sets it).
  CUDA_HOME                the CUDA toolkit; default /usr/local/cuda when it holds bin/nvcc (on this
                           machine /usr/local/bin/nvcc is a wrapper, so torch's own guess, /usr/local, is wrong).
  TORCH_CUDA_ARCH_LIST     GPU architectures; default "7.5;8.0;9.0+PTX" (Turing, Ampere, Hopper, and PTX
                           that newer GPUs compile at load time). Each architecture adds compile time.
  FUSED_LSTM_SANITIZE=1    compile the C++ with AddressSanitizer and UndefinedBehaviorSanitizer (`make sanitize`
                           builds a copy so, CPU only, and runs the op tests under it with libasan preloaded).
"""

import glob
import os
import shutil

from setuptools import setup

DEFAULT_CUDA_HOME = "/usr/local/cuda"
DEFAULT_ARCH_LIST = "7.5;8.0;9.0+PTX"


def find_cuda_home():
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    if os.path.exists(os.path.join(DEFAULT_CUDA_HOME, "bin", "nvcc")):
        return DEFAULT_CUDA_HOME
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def want_cuda():
    if os.environ.get("FUSED_LSTM_SKIP_CUDA", "0") not in ("", "0"):
        return False
    import torch

    return torch.version.cuda is not None and find_cuda_home() is not None


BUILD_CUDA = want_cuda()
if BUILD_CUDA:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = find_cuda_home()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, include_paths  # noqa: E402


def wheel_cuda_includes():
    """ATen's CUDA headers include cuBLAS and friends, which the torch wheel ships under nvidia/*/include."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec else []
    return sorted({os.path.dirname(h) for root in roots for h in glob.glob(os.path.join(root, "*", "include", "cublas_v2.h"))})


CSRC = "csrc"
# The CPU loops built for one instruction set each (csrc/cpu/kernels.h). They need their own compiler flags,
# so they are static libraries (setuptools' build_clib takes per-library flags) that the extension links;
# the baseline build, kernels_default.cpp, is an ordinary source of the extension.
# -O1 and frame pointers give the sanitizers' reports usable stacks; UB stops the process instead of printing.
SANITIZE_FLAGS = (
    ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g", "-O1"]
    if os.environ.get("FUSED_LSTM_SANITIZE", "0") not in ("", "0")
    else []
)
CPU_CAPABILITY_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mavx2", "-mfma", "-mf16c"],
}
cpu_capability_libraries = [
    (
        f"fused_lstm_cpu_{name}",
        {
            "sources": [os.path.join(CSRC, "cpu", f"kernels_{name}.cpp")],
            "include_dirs": include_paths(),
            "cflags": ["-O3", "-std=c++20", "-fPIC", *flags, *SANITIZE_FLAGS],
        },
    )
    for name, flags in CPU_CAPABILITY_FLAGS.items()
]
capability_sources = {lib[1]["sources"][0] for lib in cpu_capability_libraries}
cpp_sources = [os.path.join(CSRC, "layer.cpp"), os.path.join(CSRC, "autograd.cpp")] + sorted(
    src for src in glob.glob(os.path.join(CSRC, "cpu", "*.cpp")) if src not in capability_sources
)
# -fopenmp: at::parallel_for is an inline template whose `#pragma omp parallel` is silently serial without it.
cxx_flags = ["-O3", "-fopenmp", "-DTORCH_ASSERT_ONLY_METHOD_OPERATORS", *SANITIZE_FLAGS]
link_flags = ["-fopenmp", *SANITIZE_FLAGS[:1]]

# -lineinfo: a line table, so that compute-sanitizer and profilers name the kernels' source lines (the code is
# the same).
nvcc_flags = ["-O3", "-lineinfo", "-DTORCH_ASSERT_ONLY_METHOD_OPERATORS"]

if BUILD_CUDA:
    extension = CUDAExtension(
        "fused_lstm._C",
        cpp_sources + sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cpp"))) + sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu"))),
        include_dirs=wheel_cuda_includes(),
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )
else:
    extension = CppExtension(
        "fused_lstm._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
    )

class BuildExtensionAndLibraries(BuildExtension.with_options(use_ninja=True)):
    """`build` runs build_clib before build_ext, but `build_ext --inplace` and editable installs run only
    build_ext: build the capability libraries here so that every route links them."""

    def run(self):
        build_clib = self.get_finalized_command("build_clib")
        # build_clib compares only source timestamps, so objects built before a header changed would be
        # archived again as they are: remove them then.
        if self.force or newest_header() > oldest_library(build_clib):
            for _, info in cpu_capability_libraries:
                for source in info["sources"]:
                    stale = os.path.join(build_clib.build_temp, os.path.splitext(source)[0] + ".o")
                    if os.path.exists(stale):
                        os.remove(stale)
        self.run_command("build_clib")
        super().run()


def newest_header():
    return max(os.path.getmtime(h) for h in glob.glob(os.path.join(CSRC, "**", "*.h"), recursive=True))


def oldest_library(build_clib):
    paths = [os.path.join(build_clib.build_clib, f"lib{name}.a") for name, _ in cpu_capability_libraries]
    return min(os.path.getmtime(p) if os.path.exists(p) else 0.0 for p in paths)


setup(
    libraries=cpu_capability_libraries,
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtensionAndLibraries},
)
