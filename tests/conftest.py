import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests import simpo, train, eval, data, demo


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and two OpenMP threads on two cores shared with another
    busy process spin-wait for ages (10x slower)."""
    torch.set_num_threads(1)


def pytest_configure(config):
    # Backward through a 4-bit op with no autograd kernel gives silently wrong gradients
    # (see train.load_model).
    config.addinivalue_line("filterwarnings",
                            "error:.*an autograd kernel was not registered:UserWarning")
