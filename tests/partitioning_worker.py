"""A launch whose kernel builds a constant array while tracing (as the
persistent Hopper kernels build their schedule), on 2 forced CPU devices:
batch-sharded under jit (auto axes), each shard building its own constant.

Run by tests/test_partitioning.py in a subprocess (XLA_FLAGS must be set
before JAX starts). Prints one JSON line.
"""
import json
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from tests.test_partitioning import expected, launch_with_constant  # noqa: E402


def main():
  mesh = jax.make_mesh((2,), ("dp",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  q = jnp.arange(4 * 3 * 2 * 8, dtype=jnp.float32).reshape(4, 3, 2, 8)
  sharded = jax.device_put(q, NamedSharding(mesh, P("dp")))
  out = jax.jit(launch_with_constant)(sharded)
  # Each shard holds 2 of the 4 batch rows: its constant counts those.
  print(json.dumps(dict(
      error=float(jnp.abs(out - expected(q, shard_batch=2)).max()),
      spec=str(out.sharding.spec))), flush=True)


if __name__ == "__main__":
  main()
