import pytest
import torch


@pytest.fixture
def restore_threads():
    """Lets a test set torch's thread count: puts it back afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
