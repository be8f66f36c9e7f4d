"""Shared test settings."""

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread for the in-process tests: their models are tiny and run no faster on two,
    and on a busy 2-core machine two OpenMP threads that wait on each other made a training step up
    to 20x slower. (Notebook kernels and torchrun workers are separate processes with their own.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
