"""layers/transfer.py: host data to a device as tensors of the asked dtype, through pinned
memory on a GPU (tests/gpu/test_engine_gpu.py checks there that the host does not wait)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcinfer.layers.transfer import copy_to, to_device


@pytest.mark.parametrize("data", [[3, 1, 2], np.array([3, 1, 2]), torch.tensor([3, 1, 2])])
def test_to_device_takes_lists_arrays_and_tensors(data):
    t = to_device(data, "cpu")
    assert t.dtype == torch.int64 and t.tolist() == [3, 1, 2]
    assert to_device(data, torch.device("cpu"), torch.int32).dtype == torch.int32


def test_to_device_keeps_float_lists_float32():
    assert to_device([0.5, 1.0], "cpu").dtype == torch.float32


def test_copy_to_writes_into_the_buffer_in_its_dtype():
    buffer = torch.full((5,), -1, dtype=torch.int32)
    copy_to(buffer[:3], np.array([7, 8, 9], dtype=np.int64))
    assert buffer.tolist() == [7, 8, 9, -1, -1]
