import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "tests"))


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def demo_data():
    """(--data-path blend, --tokenizer-model) of the real demo corpus (books + stdlib code)."""
    from dev import assets
    from dev.demo_data import prepare_demo_data

    return assets.require(prepare_demo_data)


@pytest.fixture(scope="session")
def books_data(demo_data):
    """Just the Austen dataset prefix (single dataset, no blend)."""
    data_path, tokenizer_model = demo_data
    tokens = data_path.split()
    return tokens[tokens.index("0.5") + 1], tokenizer_model
