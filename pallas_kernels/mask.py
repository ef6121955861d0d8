"""The attention mask rule, in one place for every kernel and the reference.

A query row i (0 <= i < T) sees key column j (0 <= j < S) when j < S and, under
`is_causal`, j <= i (top-left alignment, as `jax.nn.dot_product_attention`):

    is_causal, T=3, S=5        is_causal, T=5, S=3
        j: 0 1 2 3 4               j: 0 1 2
    i=0    x . . . .           i=0    x . .
    i=1    x x . . .           i=1    x x .
    i=2    x x x . .           i=2    x x x
                               i=3    x x x
                               i=4    x x x

The block-range helpers tell a kernel which key blocks a query block must
visit (and the converse for the dK/dV kernel), split into blocks that need the
element-wise mask and blocks that are entirely visible, so that fully masked
blocks are skipped and unmasked ones pay nothing for masking.
All helpers work on Python ints and on traced int32 scalars alike.
"""
import dataclasses

import jax.numpy as jnp
from jax import lax


def _cdiv(a, b):
  return lax.div(a + b - 1, b) if not isinstance(a, int) else -(-a // b)


def _min(a, b):
  if isinstance(a, int) and isinstance(b, int):
    return min(a, b)
  return jnp.minimum(a, b)


def _max(a, b):
  if isinstance(a, int) and isinstance(b, int):
    return max(a, b)
  return jnp.maximum(a, b)


def _floordiv(a, b):
  return a // b if isinstance(a, int) else lax.div(a, b)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MaskRule:
  """Which (query, key) pairs are visible; hashable, so usable as a static.

  Attributes:
    seq_len_q: T, the number of query rows.
    seq_len_k: S, the number of key columns.
    is_causal: query i sees only keys j <= i (top-left alignment).
  """
  seq_len_q: int
  seq_len_k: int
  is_causal: bool = False

  def visible(self, q_idx, k_idx):
    """Element-wise visibility; `q_idx` and `k_idx` broadcast against each other.

    Args:
      q_idx: int32 query row indices, e.g. [block_q, 1] (or [1, block_q]).
      k_idx: int32 key column indices, e.g. [1, block_k] (or [block_k, 1]).
    Returns:
      bool of the broadcast shape, True where the query attends to the key.
    """
    ok = k_idx < self.seq_len_k
    if self.is_causal:
      ok = jnp.logical_and(ok, q_idx >= k_idx)
    return ok

  def key_blocks(self, q_block, block_q: int, block_k: int):
    """Key blocks that query block `q_block` visits: `(start, first_masked, end)`.

    Blocks in [start, first_masked) are entirely visible; blocks in
    [first_masked, end) need `visible`; blocks past `end` are skipped.
    """
    num_k_blocks = _cdiv(self.seq_len_k, block_k)
    num_full = self.seq_len_k // block_k  # blocks with no key past S.
    if not self.is_causal:
      return 0, num_full, num_k_blocks
    first_row = q_block * block_q
    last_row_end = first_row + block_q  # one past the block's last row.
    # Block j is entirely visible iff its last key (j+1)*bk-1 <= first_row.
    first_masked = _min(_floordiv(first_row + 1, block_k), num_full)
    end = _min(_cdiv(last_row_end, block_k), num_k_blocks)
    return 0, first_masked, end

  def query_blocks(self, k_block, block_q: int, block_k: int):
    """Query blocks that key block `k_block` is seen by: `(start, first_full, end)`.

    Blocks in [start, first_full) need `visible`; blocks in [first_full, end)
    see every key of the block (keys past S are never stored, so the dK/dV
    kernel does not mask them); blocks outside are skipped.
    """
    num_q_blocks = _cdiv(self.seq_len_q, block_q)
    if not self.is_causal:
      return 0, 0, num_q_blocks
    first_key = k_block * block_k
    last_key = first_key + block_k - 1
    start = _min(_floordiv(first_key, block_q), num_q_blocks)
    # Query block i sees all of the key block iff its first row >= last_key.
    first_full = _max(_min(_cdiv(last_key, block_q), num_q_blocks), start)
    return start, first_full, num_q_blocks
