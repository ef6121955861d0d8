"""Output types of the kernel launches, shared by the Triton and Mosaic GPU
wrappers."""
import jax


def out_struct(shape, dtype, like):
  """A kernel output's ShapeDtypeStruct, varying over the same `shard_map`
  axes as `like` (an input), so the kernels run inside shard_map."""
  return jax.ShapeDtypeStruct(shape, dtype,
                              manual_axis_type=jax.typeof(like).mat)
