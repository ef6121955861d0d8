"""Tile helpers shared by the Triton-lowered kernels: masked loads and stores.

The Triton lowering turns refs into raw pointers and does not mask blocks that
run past an array's edge, so every load and store of a tile that may cross the
sequence end (rows) or the true head_dim (columns, padded to a power of two)
carries an explicit mask. In interpret mode Pallas pads such blocks with NaN,
so a missing mask shows up as NaN in the tests.
"""
import math

import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def padded_head_dim(head_dim: int) -> int:
  """The head_dim the kernels compute with: a power of two, at least 16."""
  return max(16, 1 << (head_dim - 1).bit_length())


def tile_block(block: int, seq_len: int) -> int:
  """A block size no larger than needed for `seq_len` (power of two, >= 16)."""
  return min(block, padded_head_dim(seq_len))


def heavy_first(program, num_programs):
  """The query block a program along the grid's first axis works on.

  Under a causal mask the last query blocks see the most keys; launching them
  first (blocks are dispatched in grid order) shortens the tail of the launch.
  Used both in the kernels (on `pl.program_id(0)`) and in the BlockSpec index
  maps, so that the two agree.
  """
  return num_programs - 1 - program


def indices(start, size: int):
  """[size] int32: start, start+1, ..., start+size-1."""
  return start + lax.broadcasted_iota(jnp.int32, (size,), 0)


def tile_mask(rows, seq_len: int | None, head_dim: int, head_dim_padded: int):
  """[rows, head_dim_padded] bool for rows < seq_len and columns < head_dim.

  `seq_len=None` means every row is in bounds. Returns None when nothing
  needs masking, so that loads of full tiles carry no predicate.
  """
  mask = None
  if seq_len is not None:
    mask = (rows < seq_len)[:, None]
  if head_dim != head_dim_padded:
    cols = (lax.broadcasted_iota(jnp.int32, (head_dim_padded,), 0) < head_dim)
    mask = cols[None, :] if mask is None else jnp.logical_and(mask, cols[None, :])
  if mask is not None:
    mask = jnp.broadcast_to(mask, (rows.shape[0], head_dim_padded))
  return mask


def load_tile(ref, rows, seq_len, head_dim: int):
  """Loads a [len(rows), head_dim_padded] tile, zero outside the array."""
  mask = tile_mask(rows, seq_len, head_dim, ref.shape[-1])
  if mask is None:
    return plgpu.load(ref)
  return plgpu.load(ref, mask=mask, other=0.0)


def store_tile(ref, value, rows, seq_len, head_dim: int):
  """Stores a [len(rows), head_dim_padded] tile, skipping what is outside."""
  mask = tile_mask(rows, seq_len, head_dim, ref.shape[-1])
  plgpu.store(ref, value.astype(ref.dtype), mask=mask)


def load_row_stats(ref, rows, seq_len: int, other: float):
  """Loads a [len(rows)] float32 vector (lse or delta), `other` past seq_len."""
  return plgpu.load(ref, mask=rows < seq_len, other=other)


def dot_precision(dtype):
  """Full float32 matmuls for float32 inputs (no TF32); the default otherwise."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
