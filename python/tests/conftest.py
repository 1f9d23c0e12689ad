"""pytest configuration for fp8flow's PyTorch front-end.

Every test module starts with pytest.importorskip("torch") and ("fp8flow"), so the suite skips
cleanly where torch or the built extension is missing. Tests that need a GPU carry the `cuda`
marker and skip (with the reason) where fp8flow has no usable CUDA device; the CPU tests run the
C++ library's reference backend. Run: python -m pytest python/tests -q  (-m "not cuda" for CPU only)
"""

import os
import sys

import pytest

# Allow running against an in-place build (python setup.py build_ext --inplace) without install.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))


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
