"""Fixtures shared by several test directories' conftest.py files (test modules and conftests
cannot import each other under --import-mode=importlib); a conftest imports the ones it uses."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # The CI box has 2 cores shared with other jobs; torch's intra-op threads then fight
    # over them and tiny ops get ~100x slower. One thread is faster for these sizes.
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def checkpoint():
    """checkpoint(family) -> path of the session's tiny random checkpoint of that family."""
    from hpcinfer.testing.tiny import tiny_checkpoint
    return lambda family: str(tiny_checkpoint(family))
