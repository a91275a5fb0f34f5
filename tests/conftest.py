import pytest
import torch

from elite_tutorial import load_components


@pytest.fixture(scope="session")
def tiny():
    """The seeded random tiny components, on CPU in fp32 (shared: tests must not modify them)."""
    return load_components("tiny-random", device="cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
