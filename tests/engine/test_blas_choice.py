"""HPCINFER_BLAS_LIBRARY (hpcinfer/engine/blas.py): a bad name is one error that lists the
valid ones; unset or on the CPU nothing changes."""
import pytest
import torch

from hpcinfer.engine.blas import choose_blas


def test_unset_and_cpu_change_nothing(monkeypatch):
    monkeypatch.delenv("HPCINFER_BLAS_LIBRARY", raising=False)
    assert choose_blas(torch.device("cpu")) is None
    monkeypatch.setenv("HPCINFER_BLAS_LIBRARY", "cublaslt")
    assert choose_blas(torch.device("cpu")) is None


def test_a_bad_name_says_which_are_valid(monkeypatch):
    monkeypatch.setenv("HPCINFER_BLAS_LIBRARY", "rocblas")
    with pytest.raises(ValueError, match="cublas, cublaslt"):
        choose_blas(torch.device("cpu"))
