"""Attention dropout's keep mask, in one place for the kernels and the reference.

The mask is never stored: entry (b, n, i, j) is kept when a counter-based hash
of (seed, b, n, i, j) clears a threshold, so each kernel (forward, dK/dV, dQ)
regenerates exactly the same bits for any tile, in any orientation, and the
reference reproduces them over the whole [B, N, T, S] grid.

The hash is the "lowbias32" integer finalizer (a bijection of 32-bit words with
full avalanche) applied to int32 arithmetic, which wraps the same way in
Triton, in XLA and in interpret mode; its top 24 bits are compared with
round(rate * 2^24).

    base(b, n) = mix(seed0 ^ mix(seed1 + b * N + n))       scalar per head
                 (mix(seed0 ^ mix(seed1)) for all when broadcast)
    row(i)     = mix(base ^ mix(i))                        per query row
    col(j)     = mix(j * 0x9E3779B1)                       per key column
    keep(i, j) = top24(mix(row(i) + col(j))) >= threshold
"""
import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

_BITS = 24


def _i32(x: int) -> int:
  """A 32-bit constant as the int32 with the same bits."""
  return x - (1 << 32) if x >= 1 << 31 else x


_M1, _M2, _GOLDEN = _i32(0x7FEB352D), _i32(0x846CA68B), _i32(0x9E3779B1)


def mix(x):
  """lowbias32 on int32 words (wrapping multiply, logical shifts)."""
  x = x ^ lax.shift_right_logical(x, jnp.int32(16))
  x = x * jnp.int32(_M1)
  x = x ^ lax.shift_right_logical(x, jnp.int32(15))
  x = x * jnp.int32(_M2)
  return x ^ lax.shift_right_logical(x, jnp.int32(16))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DropoutRule:
  """Dropout of the attention probabilities; hashable, so usable as a static.

  Attributes:
    rate: probability of dropping an entry, 0 <= rate < 1 (0: no dropout).
    num_heads: N, to give each (batch, head) its own stream.
    broadcast: one stream for every (batch, head): the same keep mask for
      all of them (Flax's `broadcast_dropout`).
  """
  rate: float = 0.0
  num_heads: int = 1
  broadcast: bool = False

  @property
  def active(self) -> bool:
    return self.rate > 0.0

  @property
  def keep_scale(self) -> float:
    """1 / (1 - rate): what kept entries are multiplied by."""
    return 1.0 / (1.0 - self.rate)

  def head_base(self, seed0, seed1, batch, head):
    """int32 stream base of one (batch, head); all arguments int32 scalars
    (or arrays that broadcast)."""
    if self.broadcast:
      return mix(seed0 ^ mix(seed1))
    return mix(seed0 ^ mix(seed1 + batch * self.num_heads + head))

  def keep(self, base, q_idx, k_idx):
    """bool keep mask; `q_idx` and `k_idx` int32 broadcast against each other
    (e.g. [T, 1] and [1, S], or transposed), `base` from `head_base`."""
    row = mix(base ^ mix(q_idx))
    col = mix(k_idx * jnp.int32(_GOLDEN))
    bits = lax.shift_right_logical(mix(row + col), jnp.int32(32 - _BITS))
    return bits >= jnp.int32(round(self.rate * (1 << _BITS)))


def seeds_from_key(rng):
  """[2] int32 seed words from a JAX PRNG key (typed or raw uint32)."""
  if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)
  bits = jax.random.bits(rng, (2,), jnp.uint32)
  return lax.bitcast_convert_type(bits, jnp.int32)


def keep_mask(rule: DropoutRule, seeds, batch: int, seq_len_q: int,
              seq_len_k: int):
  """[B, N, T, S] bool: the whole keep mask (for the reference and tests)."""
  b = jnp.arange(batch, dtype=jnp.int32)[:, None, None, None]
  n = jnp.arange(rule.num_heads, dtype=jnp.int32)[None, :, None, None]
  base = rule.head_base(seeds[0], seeds[1], b, n)
  i = jnp.arange(seq_len_q, dtype=jnp.int32)[:, None]
  j = jnp.arange(seq_len_k, dtype=jnp.int32)[None, :]
  return jnp.broadcast_to(rule.keep(base, i, j),
                          (batch, rule.num_heads, seq_len_q, seq_len_k))
