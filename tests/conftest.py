"""Shared test options: interpret mode on CPU (default) or compiled on a GPU.

    pytest tests/                     # Pallas kernels in interpret mode (CPU)
    pytest tests/ --compiled -n 8     # the same suite compiled on the GPU,
                                      # 8 workers sharing it (pytest-xdist)
"""
import os

import pytest


def pytest_addoption(parser):
  parser.addoption(
      "--compiled", action="store_true",
      default=os.environ.get("FA2_JAX_TEST_COMPILED") == "1",
      help="compile the Pallas kernels for the GPU instead of interpreting")


def pytest_configure(config):
  if config.getoption("--compiled"):
    # Workers share one GPU: allocate on demand, not 75% each up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


@pytest.fixture(scope="session")
def interpret(request):
  """`interpret=` for the Pallas implementations under test."""
  compiled = request.config.getoption("--compiled")
  if compiled:
    import jax
    if jax.default_backend() != "gpu":
      pytest.exit("--compiled needs a GPU backend", returncode=2)
  return not compiled
