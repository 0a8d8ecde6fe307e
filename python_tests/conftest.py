import pytest
import torch

_no_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=_no_gpu)])
def device(request) -> str:
    """Runs a test on the CPU and, when a GPU is present, on CUDA with the same references."""
    return request.param


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
