"""Test configuration.

Triton kernels run for real on a GPU and under Triton's interpreter on CPU: with no
CUDA device and TRITON_INTERPRET unset, the interpreter is switched on here, before
any kernel module is imported. GPU tests carry the ``gpu`` marker and are skipped
without CUDA; nothing queries CUDA at a test module's import.
"""

import os

import pytest
import torch

# The one CUDA query of the suite, made when pytest loads this file (not in test modules).
HAS_CUDA = torch.cuda.is_available()

if "TRITON_INTERPRET" not in os.environ and not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run slow sweeps")


def pytest_collection_modifyitems(config, items):
    has_cuda = HAS_CUDA
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="slow sweep: pass --runslow")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def backend_devices():
    """(backend, device) pairs to test on this machine, as pytest params with readable ids.

    reference and cpu run on CPU; triton runs on CUDA when present, else interpreted on CPU;
    cuda runs on CUDA only (marked gpu, so skipped elsewhere).
    """
    has_cuda = HAS_CUDA
    params = [
        pytest.param("reference", "cpu", id="reference-cpu"),
        pytest.param("cpu", "cpu", id="cpu"),
        pytest.param("triton", "cuda" if has_cuda else "cpu",
                     id="triton-cuda" if has_cuda else "triton-interp", marks=pytest.mark.triton),
        pytest.param("reference", "cuda", id="reference-cuda", marks=pytest.mark.gpu),
        pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.gpu),
    ]
    return params
