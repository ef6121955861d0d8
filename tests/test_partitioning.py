"""`fa2_jax.partitioning.launch` with a kernel that builds constant arrays
while tracing (the persistent Hopper kernels' schedule): custom_partitioning
takes no function that closes over arrays, so they are hoisted to operands;
each shard builds its own for its shapes."""
import collections

import jax
import jax.numpy as jnp
import numpy as np

from fa2_jax import partitioning
from tests.workers import run_worker


def _kernel(arrays, config):
  """out = q + a constant built from q's (local) shape: its batch index
  times its batch size, an array (not a scalar literal) in the jaxpr."""
  del config
  q = arrays["q"]
  batch = np.arange(q.shape[0], dtype=np.float32) * q.shape[0]
  return (q + jnp.asarray(batch)[:, None, None, None],)


# What the launch reads of a config (`autodiff.KernelConfig`): no dropout.
_CONFIG = collections.namedtuple("Config", "dropout")(None)


def launch_with_constant(q):
  return partitioning.launch(_kernel, _CONFIG, dict(q=q, k=q), ("out",))[0]


def expected(q, *, shard_batch):
  batch = (np.arange(q.shape[0]) % shard_batch) * shard_batch
  return q + batch[:, None, None, None].astype(np.float32)


def test_constants_one_device():
  q = jnp.ones((3, 4, 2, 8), jnp.float32)
  np.testing.assert_array_equal(jax.jit(launch_with_constant)(q),
                                expected(q, shard_batch=3))
  # vmapped: the vmapped axis folds into the batch (6 rows, one launch).
  stacked = jnp.stack([q, 2 * q])
  out = jax.jit(jax.vmap(launch_with_constant))(stacked)
  folded = expected(stacked.reshape(6, 4, 2, 8), shard_batch=6)
  np.testing.assert_array_equal(out, folded.reshape(stacked.shape))


def test_constants_per_shard():
  (row,) = run_worker("tests/partitioning_worker.py", 1)
  assert row["error"] == 0.0, row
  assert "dp" in row["spec"], row
