import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # test helpers (hf_tiny, ...) import by name


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture()
def one_thread():
    """Tiny models run fastest on one thread; with the cores shared, more threads only wait on each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
