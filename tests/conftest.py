import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--fuzz-minutes", type=float, default=0,
                     help="fuzz against native for this many minutes with fresh seeds (default: the short seeded slice)")
    parser.addoption("--fuzz-log", metavar="FILE", help="append every fuzz case and both outcomes to FILE (JSON lines)")


def pytest_configure(config):
    # References in float32 must not use TF32 on GPUs.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU visible")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen():
    """A seeded generator, so every test draws its own reproducible random inputs."""
    return torch.Generator().manual_seed(0)
