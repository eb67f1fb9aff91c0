import importlib.util
import os
import sys
from pathlib import Path

import torch

# Without a GPU, Triton kernels run on CPU tensors under Triton's interpreter. TRITON_INTERPRET is read when a
# kernel is decorated (and by dsv3's kernel modules when they are imported), so it is set here, before any test
# module imports them. `triton`-marked tests compare those kernels with their PyTorch references; they are
# skipped when triton is not installed, or when TRITON_INTERPRET=0 was set by hand on a machine without a GPU.
HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()
if HAS_TRITON and not CUDA:
    if "triton" in sys.modules and "TRITON_INTERPRET" not in os.environ:
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # tests/hf_models.py
# tiny models are dominated by per-op overhead: one thread is faster, and steadier on a shared 2-core machine
torch.set_num_threads(1)
# GPU tests: Triton autotunes over 2 configs per kernel family, not all (see dsv3/kernels/fp8_triton.py)
os.environ.setdefault("DSV3_AUTOTUNE", "quick")


def pytest_collection_modifyitems(config, items):
    if not HAS_TRITON:
        skip_triton = pytest.mark.skip(reason="needs triton (pip install -e '.[test]')")
    elif not (CUDA or INTERPRET):
        skip_triton = pytest.mark.skip(reason="no GPU and TRITON_INTERPRET=0")
    else:
        skip_triton = None
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "triton" in item.keywords and skip_triton is not None:
            item.add_marker(skip_triton)
        elif "gpu" in item.keywords and not CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def triton_device() -> str:
    """Where `triton`-marked tests put their tensors: the GPU, else the CPU under Triton's interpreter."""
    if CUDA:
        return "cuda"
    assert INTERPRET, "tests/conftest.py sets TRITON_INTERPRET=1 without a GPU"
    return "cpu"
