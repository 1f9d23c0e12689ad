"""pytest configuration for fp8flow's PyTorch front-end.

Every test module starts with pytest.importorskip("torch") and ("fp8flow"), so the suite skips
cleanly where torch or the built extension is missing. Tests that need a GPU carry the `cuda`
marker and skip (with the reason) where fp8flow has no usable CUDA device; the CPU tests run the
C++ library's reference backend. Run: python -m pytest python/tests -q  (-m "not cuda" for CPU only)
"""

import glob
import os
import sys

import pytest

# Use an in-place build (python setup.py build_ext --inplace) when there is one; otherwise the
# installed package (pip install ./python), which the source directory must not shadow.
_PKG_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if glob.glob(os.path.join(_PKG_ROOT, "fp8flow", "_C*.so")):
    sys.path.insert(0, _PKG_ROOT)
elif _PKG_ROOT in sys.path:
    sys.path.remove(_PKG_ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs fp8flow's CUDA backend and a Hopper GPU")
    config.addinivalue_line("markers", "multigpu: needs two or more GPUs")


def pytest_collection_modifyitems(config, items):
    try:
        import fp8flow  # noqa: F401

        has_cuda = fp8flow.cuda_available()
        reason = "fp8flow reports no usable CUDA device (or was built without CUDA)"
    except Exception as e:  # torch or the extension missing: the modules skip themselves
        has_cuda, reason = False, f"fp8flow not importable: {e}"
    if has_cuda:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
