"""Output types of the kernel launches, and the backward's delta, shared by
the Triton and Mosaic GPU wrappers."""
import jax
import jax.numpy as jnp


def out_struct(shape, dtype, like):
  """A kernel output's ShapeDtypeStruct, varying over the same `shard_map`
  axes as `like` (an input), so the kernels run inside shard_map."""
  return jax.ShapeDtypeStruct(shape, dtype,
                              manual_axis_type=jax.typeof(like).mat)


def row_delta(out, d_out):
  """delta = rowsum(dO * O) (FA2 Algorithm 2, line 4) in float32, one XLA
  fusion: out, d_out [B, T, N, H] -> [B, N, T]."""
  delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32),
                  axis=-1)
  return jnp.transpose(delta, (0, 2, 1))
