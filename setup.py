"""Build of cspkv._C: CPU kernels always, CUDA kernels when possible.

Switches (environment):
  CSPKV_CUDA=auto|0|1   auto (default): CUDA kernels when torch is a CUDA build
                        and a CUDA toolkit with nvcc is found; 1: required, fail
                        loudly otherwise; 0: CPU only. Never asks for a GPU.
  TORCH_CUDA_ARCH_LIST  architectures to compile for; when unset and no GPU is
                        visible, DEFAULT_ARCHS below (sm_80 and sm_90 + PTX).
  CUDA_HOME             toolkit root; found from nvcc when unset (see
                        find_cuda_home: the nvcc on PATH may be a wrapper script).
  CSPKV_DEBUG=1         -O0 -g host code, -G device code.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

DEFAULT_ARCHS = "8.0;9.0+PTX"  # A100 (sm_80 runs on sm_86/89 too), H100/H200, PTX for newer GPUs
CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")


def log(msg: str) -> None:
    print(f"cspkv build: {msg}", file=sys.stderr, flush=True)


def is_toolkit_root(path: str) -> bool:
    return (
        os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))
        and any(os.path.exists(os.path.join(path, lib, "libcudart.so")) for lib in ("lib64", "lib"))
        and os.path.isfile(os.path.join(path, "bin", "nvcc"))
    )


def find_cuda_home():
    """The CUDA toolkit root, or None.

    torch guesses CUDA_HOME from the nvcc on PATH by stripping two path parts,
    which is wrong when that nvcc is a wrapper script living elsewhere. nvcc
    itself knows where it lives: `nvcc --dryrun` prints `_HERE_=<root>/bin`.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            out = subprocess.run(
                [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                capture_output=True, text=True, timeout=60,
            )
            match = re.search(r"_HERE_=(\S+)", out.stdout + out.stderr)
            if match:
                candidates.append(os.path.dirname(match.group(1).rstrip("/")))
        except (OSError, subprocess.SubprocessError):
            pass
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for path in candidates:
        if path and is_toolkit_root(path):
            return os.path.realpath(path)
    return None


def decide_cuda():
    """(with_cuda, cuda_home); CSPKV_CUDA=1 fails loudly when impossible."""
    mode = os.environ.get("CSPKV_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"cspkv build: CSPKV_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        log("CSPKV_CUDA=0: building the CPU kernels only")
        return False, None
    import torch

    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is not a CUDA build")
    cuda_home = find_cuda_home()
    if cuda_home is None:
        reasons.append("no CUDA toolkit found (no nvcc with include/cuda_runtime.h and lib64/libcudart.so; set CUDA_HOME)")
    if reasons:
        if mode == "1":
            raise SystemExit("cspkv build: CSPKV_CUDA=1 but CUDA kernels cannot be built: " + "; ".join(reasons))
        log("building the CPU kernels only: " + "; ".join(reasons))
        return False, None
    return True, cuda_home


def cuda_arch_list() -> str:
    import torch

    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if archs:
        return archs
    if torch.cuda.is_available():  # a build on the machine that will run it: its own GPUs
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    log(f"no GPU visible and TORCH_CUDA_ARCH_LIST unset: compiling for {DEFAULT_ARCHS}")
    return DEFAULT_ARCHS


def openmp_flags() -> list:
    """-fopenmp for the host code when torch parallelises with OpenMP (GCC on Linux).

    at::parallel_for is a header template: its threads exist only in code
    compiled with OpenMP, and without the flag every CPU kernel runs on one
    thread. No libgomp is linked here: the GOMP symbols bind at load time to the
    OpenMP runtime torch has already loaded, so there is one thread pool and
    torch.set_num_threads governs the kernels too.
    """
    import torch

    if not sys.platform.startswith("linux") or not torch.backends.openmp.is_available():
        log("torch does not parallelise with OpenMP here: the CPU kernels run on one thread")
        return []
    return ["-fopenmp"]


def extensions():
    with_cuda, cuda_home = decide_cuda()
    if with_cuda:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    debug = os.environ.get("CSPKV_DEBUG", "0") == "1"
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/cache_store/*.cpp"))
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    # -fno-trapping-math, as torch itself builds: GCC sinks a product used by one arm of a
    # select into that arm and then, lest a floating-point trap fire where the scalar code
    # would not, leaves the whole loop scalar ("control flow in loop"). Without AVX-512 (whose
    # masked stores need no such care) the CPU kernels' exp and accumulate loops ran scalar:
    # window_scores 1.3-3.6x slower (benchmarks/results/ab-avx2-vectorisation-cpu-2core.md).
    # Nothing here enables FP traps. Sums now add in vector lanes, so results may differ
    # from a scalar build's in the last bit.
    cxx += ["-std=c++20", "-fopenmp-simd", "-fno-trapping-math", *openmp_flags(), f'-DCSPKV_TORCH_VERSION="{torch.__version__}"']
    if not with_cuda:
        return [CppExtension("cspkv._C", sources, include_dirs=[CSRC], extra_compile_args={"cxx": cxx})]

    archs = cuda_arch_list()
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    log(f"building CUDA kernels with {cuda_home} (CUDA {torch.version.cuda}) for archs {archs}")
    sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cache_store/*.cu"))
    defines = ["-DCSPKV_WITH_CUDA", f'-DCSPKV_CUDA_ARCHS="{archs}"', f'-DCSPKV_CUDA_VERSION="{torch.version.cuda}"']
    nvcc = ["-O3", "-lineinfo", "-std=c++20", "--expt-relaxed-constexpr", *defines]
    if debug:
        nvcc += ["-G"]
    return [
        CUDAExtension(
            "cspkv._C",
            sources,
            include_dirs=[CSRC],
            extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc},
        )
    ]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    # Ninja builds the sources in parallel; MAX_JOBS bounds it on small machines.
    return BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)


setup(ext_modules=extensions(), cmdclass={"build_ext": build_ext_class()})
