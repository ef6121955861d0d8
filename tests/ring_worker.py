"""Ring attention on 4 forced CPU devices, checked against one device.

Run by tests/test_ring.py in a subprocess (XLA_FLAGS must be set before JAX
starts). Prints one JSON line per case.
"""
import json
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import fa2_jax  # noqa: E402


def main():
  mesh = jax.make_mesh((4,), ("sp",))
  shard = NamedSharding(mesh, P(None, "sp"))
  b, t, n, k_heads, h = 2, 4 * 24, 4, 2, 32
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (b, t, n, h))
  k = jax.random.normal(ks[1], (b, t, k_heads, h))
  v = jax.random.normal(ks[2], (b, t, k_heads, h))
  do = jax.random.normal(ks[3], q.shape)
  for impl in ("xla", "triton"):
    for causal, layout in ((False, "contiguous"), (True, "contiguous"),
                           (True, "zigzag")):
      kw = dict(interpret=True) if impl == "triton" else {}
      ring = jax.jit(jax.shard_map(
          lambda q, k, v: fa2_jax.ring_attention(
              q, k, v, axis_name="sp", is_causal=causal, layout=layout,
              implementation=impl, **kw),
          mesh=mesh, in_specs=P(None, "sp"), out_specs=P(None, "sp"),
          # Pallas interpret mode is not typed for shard_map's vma checks.
          check_vma=impl == "xla"))
      # The zig-zag ring takes the tokens permuted (before sharding) and
      # returns them permuted: compare with plain attention, permuted.
      perm = ((lambda x: fa2_jax.to_zigzag(x, 4)) if layout == "zigzag"
              else (lambda x: x))
      args = [jax.device_put(perm(x), shard) for x in (q, k, v, do)]
      with jax.default_matmul_precision("highest"):
        out, pullback = jax.vjp(ring, *args[:3])
        grads = pullback(args[3])
        want, want_pullback = jax.vjp(
            lambda q, k, v: fa2_jax.flash_attention(
                q, k, v, is_causal=causal, implementation="xla"), q, k, v)
        plain = want
        want, *want_grads = map(perm, (want, *want_pullback(do)))
      # from_zigzag takes the sequence-sharded output back to token order.
      unpermuted = (fa2_jax.from_zigzag(out, 4) if layout == "zigzag"
                    else out)
      unpermuted_error = float(np.max(np.abs(np.asarray(unpermuted)
                                             - np.asarray(plain))))
      hlo = ring.lower(*args[:3]).compile().as_text()
      errors = [float(np.max(np.abs(np.asarray(a) - np.asarray(w))))
                for a, w in zip((out, *grads), (want, *want_grads))]
      print(json.dumps(dict(
          impl=impl, causal=causal, layout=layout, errors=errors,
          unpermuted_error=unpermuted_error,
          scale=float(np.max(np.abs(np.asarray(want_grads[1])))),
          out_sharding=str(out.sharding.spec),
          collective_permute="collective-permute" in hlo,
          all_gather="all-gather" in hlo, all_to_all="all-to-all" in hlo)),
          flush=True)


if __name__ == "__main__":
  main()
