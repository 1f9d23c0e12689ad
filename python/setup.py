"""Builds fp8flow's PyTorch extension (fp8flow._C) against a prebuilt libfp8flow.a.

The extension is one C++ file (csrc/fp8flow_torch.cpp) compiled against the torch of the running
Python; all CUDA code lives in the static library, which CMake builds (and may have built on
another machine: only the archive and the headers are needed here):

    cmake --preset default && cmake --build --preset default     # -> build/libfp8flow.a
    pip install --no-build-isolation ./python                      # or, in place:
    (cd python && python setup.py build_ext --inplace)            # then PYTHONPATH=python

Environment:
    FP8FLOW_ROOT       the repository root (default: the parent of this file's directory)
    FP8FLOW_BUILD_DIR  the CMake build directory holding libfp8flow.a (default: $FP8FLOW_ROOT/build)
    CUDA_HOME          the CUDA toolkit (default: torch's guess, else /usr/local/cuda)

What is linked is read from the archive itself: CUDA runtime + cuBLASLt when it holds the CUDA
backend, NCCL / MPI when it references them (the communicators of branch `comm`); their paths
from the build's CMakeCache.txt when they exist here, else searched. The CUDA-stream code of the
binding is compiled only when both the library and this torch have CUDA.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as e:  # pragma: no cover
    sys.exit(f"fp8flow setup.py: PyTorch is required to build the extension ({e})")

HERE = Path(__file__).resolve().parent
ROOT = Path(os.environ.get("FP8FLOW_ROOT", HERE.parent)).resolve()
BUILD = Path(os.environ.get("FP8FLOW_BUILD_DIR", ROOT / "build")).resolve()
ARCHIVE = BUILD / "libfp8flow.a"
INCLUDE = ROOT / "include"
os.chdir(HERE)  # setuptools wants paths relative to setup.py


def log(msg):
    print(f"fp8flow setup.py: {msg}", file=sys.stderr)


def cmake_cache():
    """Entries of $BUILD/CMakeCache.txt (name -> value); empty when absent."""
    out = {}
    f = BUILD / "CMakeCache.txt"
    if f.exists():
        for line in f.read_text(errors="replace").splitlines():
            m = re.match(r"^([A-Za-z0-9_]+):[A-Z]+=(.*)$", line)
            if m:
                out[m.group(1)] = m.group(2)
    return out


def archive_symbols(defined):
    """Symbol names of the archive (defined or undefined ones); None when nm is unavailable."""
    nm = shutil.which("nm")
    if nm is None:
        return None
    args = [nm, "-C", "--defined-only" if defined else "--undefined-only", str(ARCHIVE)]
    try:
        text = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        log(f"nm failed ({e}); assuming no optional dependencies")
        return None
    syms = set()
    for line in text.splitlines():
        parts = line.split(maxsplit=2)
        if len(parts) >= 2 and len(parts[-2]) == 1:
            syms.add(parts[-1])
    return syms


def find_cuda_home():
    from torch.utils import cpp_extension

    for c in (os.environ.get("CUDA_HOME"), getattr(cpp_extension, "CUDA_HOME", None), "/usr/local/cuda"):
        if c and Path(c, "include", "cuda_runtime_api.h").exists():
            return Path(c)
    return None


def find_shared_lib(name, cache_path=None):
    """(directory, link flag) for lib<name>.so: the CMake cache's path when it exists here, then
    the CUDA toolkit, the nvidia pip packages next to torch, the system directories."""
    if cache_path and Path(cache_path).exists():
        p = Path(cache_path)
        return p.parent, str(p)
    dirs = []
    cuda = find_cuda_home()
    if cuda:
        dirs += [cuda / "lib64", cuda / "lib", cuda / "targets/x86_64-linux/lib"]
    site = Path(torch.__file__).resolve().parent.parent
    dirs += sorted(site.glob(f"nvidia/*/lib")) + [Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib64"), Path("/usr/lib")]
    for d in dirs:
        if not d.is_dir():
            continue
        for f in [f"lib{name}.so"] + sorted(x.name for x in d.glob(f"lib{name}.so.*")):
            if (d / f).exists():
                return d, f"-l:{f}"
    return None, None


if not ARCHIVE.exists():
    sys.exit(
        f"fp8flow setup.py: {ARCHIVE} not found. Build the library first "
        "(cmake --preset default && cmake --build --preset default), or point FP8FLOW_BUILD_DIR "
        "at the build directory that holds libfp8flow.a."
    )

# The compiler that links the extension. On the GPU machine's image, `c++`/`g++` on PATH is
# /opt/gcc/bin/g++ (what torch's BuildExtension picks when CXX is unset), and every extension built
# with it crashed inside libstdc++'s stream code at the first std::ostringstream (cuda-gdb: the
# faulting frames are libstdc++ code inside our _C.so, i.e. a second, static copy of libstdc++ next
# to the system one torch uses; locale facets then do not match). Prefer the system compiler, whose
# libstdc++ is the shared one Python loads; FP8FLOW_CXX or CXX override.
if "FP8FLOW_CXX" in os.environ:
    os.environ["CXX"] = os.environ["FP8FLOW_CXX"]
elif "CXX" not in os.environ and Path("/usr/bin/g++").exists():
    os.environ["CXX"] = "/usr/bin/g++"

cache = cmake_cache()
undefined = archive_symbols(defined=False) or set()
defined = archive_symbols(defined=True) or set()
if "FP8FLOW_WITH_CUDA" in cache:
    lib_cuda = cache["FP8FLOW_WITH_CUDA"].upper() in ("ON", "1", "TRUE", "YES")
else:
    lib_cuda = any(s.startswith("cudaLaunchKernel") or s.startswith("cublasLt") for s in undefined)
torch_cuda = torch.version.cuda is not None
cuda_home = find_cuda_home() if lib_cuda else None
if lib_cuda and cuda_home is None:
    sys.exit("fp8flow setup.py: the library has the CUDA backend but no CUDA toolkit was found (set CUDA_HOME)")
py_cuda = lib_cuda and torch_cuda
have_comm = any(s.startswith("fp8flow::nccl_unique_id(") for s in defined)
need_nccl = any(s.startswith("nccl") for s in undefined)
need_mpi = any(s.startswith("MPI_") or s.startswith("ompi_") for s in undefined)

define_macros = []
include_dirs = [str(INCLUDE)]
library_dirs = []
libraries = []
extra_link_args = []
if lib_cuda:
    include_dirs.append(str(cuda_home / "include"))
    libdir = cuda_home / "lib64"
    library_dirs.append(str(libdir))
    libraries += ["cudart", "cublasLt"]
    extra_link_args.append(f"-Wl,-rpath,{libdir}")
if py_cuda:
    define_macros.append(("FP8FLOW_PY_CUDA", "1"))
    libraries.append("c10_cuda")
if have_comm:
    define_macros.append(("FP8FLOW_PY_HAVE_COMM", "1"))
for need, name, key in ((need_nccl, "nccl", "FP8FLOW_NCCL_LIBRARY"), (need_mpi, "mpi", "MPI_mpi_LIBRARY")):
    if not need:
        continue
    d, flag = find_shared_lib(name, cache.get(key))
    if flag is None:
        sys.exit(f"fp8flow setup.py: libfp8flow.a needs lib{name} but it was not found")
    library_dirs.append(str(d))
    extra_link_args += [flag, f"-Wl,-rpath,{d}"]



def cxx_accepts(flag):
    """Whether the extension's C++ driver links a shared object with `flag` (e.g. -nostdlib++,
    GCC >= 13 and clang)."""
    import tempfile

    cxx = os.environ.get("CXX", "c++").split()
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp, "probe.cpp"), Path(tmp, "probe.so")
        src.write_text("int fp8flow_probe() { return 0; }\n")
        try:
            r = subprocess.run(cxx + ["-shared", "-fPIC", flag, str(src), "-o", str(out)], capture_output=True)
        except OSError:
            return False
        return r.returncode == 0


# Link the shared libstdc++ explicitly, before the driver's own (possibly static) one, so that the
# extension and torch share one libstdc++ (see the CXX note above); where the driver knows
# -nostdlib++, it adds no libstdc++ of its own at all.
for d in (Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib64"), Path("/lib/x86_64-linux-gnu")):
    if (d / "libstdc++.so.6").exists():
        extra_link_args = [f"-L{d}", "-l:libstdc++.so.6"] + extra_link_args
        if cxx_accepts("-nostdlib++"):
            extra_link_args = ["-nostdlib++"] + extra_link_args
        break

log(
    f"archive {ARCHIVE} (CUDA backend: {lib_cuda}), torch {torch.__version__} (CUDA {torch.version.cuda}); "
    f"CUDA streams in the binding: {py_cuda}; communicator: {have_comm}; NCCL: {need_nccl}; MPI: {need_mpi}; "
    f"CXX {os.environ.get('CXX', 'c++ (unset)')}; libstdc++ link flags {[a for a in extra_link_args if 'stdc' in a or 'stdlib' in a]}"
)

ext = CppExtension(
    name="fp8flow._C",
    sources=["csrc/fp8flow_torch.cpp"],
    # Rebuild when the archive or the headers change (setuptools otherwise only looks at sources).
    depends=[str(ARCHIVE)] + sorted(str(p) for p in (INCLUDE / "fp8flow").glob("*.h")),
    include_dirs=include_dirs,
    define_macros=define_macros,
    library_dirs=library_dirs,
    libraries=libraries,
    extra_objects=[str(ARCHIVE)],
    extra_compile_args=["-std=c++20", "-O2", "-Wno-unused-parameter"],
    extra_link_args=extra_link_args,
)

setup(
    name="fp8flow",
    version="0.1.0",
    description="fp8flow: FP8-centric MoE training ops (PyTorch front-end)",
    packages=["fp8flow"],
    package_data={"fp8flow": ["BUILT_FROM"]},  # written by python/run_gpu.sh (its --reuse-ext)
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False, use_ninja=False)},
    python_requires=">=3.9",
    zip_safe=False,
)
