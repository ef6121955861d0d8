"""Tile configuration: the validated `BlockSizes` and the default heuristic."""
import dataclasses

import jax.numpy as jnp

from pallas_kernels.mask import check_token_count

_POW2_TILES = (16, 32, 64, 128, 256)
_NUM_WARPS = (1, 2, 4, 8, 16)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
  """Tiles and launch parameters of the Triton-lowered kernels.

  Every tile is a power of two in [16, 256]; a tile larger than its sequence is
  shrunk to fit. Hashable, so it can be a static argument.

  Attributes:
    block_q, block_k: forward tiles of queries (Br) and keys (Bc).
    block_q_dkv, block_k_dkv: dK/dV kernel tiles; the kernel keeps a
      [block_k_dkv, H] tile of K, V and streams [block_q_dkv, H] tiles of Q.
    block_q_dq, block_k_dq: dQ kernel tiles; keeps Q, streams K and V.
    num_warps, num_stages: forward launch (warps per program, pipeline depth).
    num_warps_bwd, num_stages_bwd: the same for both backward kernels.
  """
  block_q: int = 128
  block_k: int = 64
  block_q_dkv: int = 64
  block_k_dkv: int = 128
  block_q_dq: int = 128
  block_k_dq: int = 64
  num_warps: int = 4
  num_stages: int = 3
  num_warps_bwd: int = 8
  num_stages_bwd: int = 2

  def __post_init__(self):
    for field in ("block_q", "block_k", "block_q_dkv", "block_k_dkv",
                  "block_q_dq", "block_k_dq"):
      value = getattr(self, field)
      if not isinstance(value, int) or value not in _POW2_TILES:
        raise ValueError(
            f"BlockSizes.{field} must be one of {_POW2_TILES}, got {value!r}")
    for field in ("num_warps", "num_warps_bwd"):
      value = getattr(self, field)
      if not isinstance(value, int) or value not in _NUM_WARPS:
        raise ValueError(
            f"BlockSizes.{field} must be one of {_NUM_WARPS}, got {value!r}")
    for field in ("num_stages", "num_stages_bwd"):
      value = getattr(self, field)
      if not isinstance(value, int) or not 1 <= value <= 8:
        raise ValueError(
            f"BlockSizes.{field} must be an int in [1, 8], got {value!r}")


# A local window at most this wide gives every program a loop of at most 16
# key blocks of 128; there the per-program cost dominates (NOTES item 8).
NARROW_BAND_KEYS = 2048


def default_block_sizes(head_dim: int, dtype, device_kind: str | None = None,
                        *, key_span: int | None = None) -> BlockSizes:
  """The tiles fa2-jax uses when `block_sizes=None`.

  Args:
    head_dim: H of the inputs (1..256).
    dtype: the inputs' dtype; float32 tiles hold half as many keys.
    device_kind: `jax.Device.device_kind`; None reads the default device.
      Tuned on H100; other GPUs take the same tiles.
    key_span: the most keys a query row can see (a local window's width,
      `MaskRule.key_span`); None when unbounded. Narrow bands take 64x64
      tiles: two programs per SM, so one's Q load and O store overlap the
      other's loop.
  """
  check_token_count(key_span)
  wide = jnp.dtype(dtype).itemsize >= 4
  del device_kind  # One table for now, measured on an H100 at seqlen 4096
  # (benchmarks/tune_blocks.py, results in benchmarks/results/).
  if head_dim <= 64:
    sizes = BlockSizes(block_q=128, block_k=64, num_warps=8, num_stages=3,
                       block_q_dkv=64, block_k_dkv=64, block_q_dq=64,
                       block_k_dq=64, num_warps_bwd=4, num_stages_bwd=3)
  elif head_dim <= 128:
    sizes = BlockSizes(block_q=128, block_k=128, num_warps=8, num_stages=3,
                       block_q_dkv=64, block_k_dkv=128, block_q_dq=128,
                       block_k_dq=64, num_warps_bwd=8, num_stages_bwd=3)
  else:  # swept at 4k (NOTES item 9)
    sizes = BlockSizes(block_q=128, block_k=64, num_warps=8, num_stages=2,
                       block_q_dkv=32, block_k_dkv=32, block_q_dq=32,
                       block_k_dq=32, num_warps_bwd=4, num_stages_bwd=2)
  if key_span is not None and key_span <= NARROW_BAND_KEYS and head_dim <= 128:
    sizes = dataclasses.replace(
        sizes, block_q=64, block_k=64, num_warps=4, num_stages=3,
        block_q_dkv=64, block_k_dkv=64, block_q_dq=64, block_k_dq=64,
        num_warps_bwd=4, num_stages_bwd=3 if head_dim <= 64 else 2)
  if wide:  # float32 tiles take twice the shared memory: halve, 2 stages
    # (and at head_dim 256 the query tile too: a [128, 256] f32 Q is 128 KiB).
    sizes = dataclasses.replace(
        sizes, block_k=max(16, sizes.block_k // 2),
        block_q=sizes.block_q // 2 if head_dim > 128 else sizes.block_q,
        block_q_dkv=max(16, sizes.block_q_dkv // 2),
        block_k_dq=max(16, sizes.block_k_dq // 2),
        num_stages=min(2, sizes.num_stages),
        num_stages_bwd=min(2, sizes.num_stages_bwd))
  return sizes

