import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/hf_models.py
# tiny models are dominated by per-op overhead: one thread is faster, and steadier on a shared 2-core machine
torch.set_num_threads(1)
# GPU tests: Triton autotunes over 2 configs per kernel family, not all (see dsv3/kernels/fp8_triton.py)
os.environ.setdefault("DSV3_AUTOTUNE", "quick")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
