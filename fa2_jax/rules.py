"""User arguments -> the kernels' rules and extra inputs, validated.

One function, `build_rules`, serves the API and the reference, so both mask
and score the same way.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fa2_jax import validation
from pallas_kernels.dropout import DropoutRule, seeds_from_key
from pallas_kernels.mask import MaskRule, lengths_to_segments
from pallas_kernels.scores import ScoreRule

CAUSAL_ALIGNMENTS = ("top_left", "bottom_right")


def _check_int_array(name, x, shape):
  validation.check_array(name, x, kind=jnp.integer, shapes=(shape,))


def _window(local_window_size):
  """(left, right) from an int or a pair of ints (or None)."""
  if local_window_size is None:
    return None, None
  if isinstance(local_window_size, int) and not isinstance(
      local_window_size, bool):
    pair = (local_window_size, local_window_size)
  elif (isinstance(local_window_size, (tuple, list))
        and len(local_window_size) == 2):
    pair = tuple(local_window_size)
  else:
    raise TypeError(f"local_window_size must be an int or a (left, right) "
                    f"pair of ints, got {local_window_size!r}")
  for side, w in zip(("left", "right"), pair):
    if isinstance(w, bool) or not isinstance(w, int) or w < 0:
      raise ValueError(f"local_window_size {side} must be an int >= 0, got "
                       f"{w!r}")
  return pair


def _pair_array(name, x, dims, *, boolean: bool):
  """`x` as [Bm, Nm, Tm, Sm], each axis full or 1, or None.

  boolean: a mask (bool, True = attend); else a bias (floating).
  """
  if x is None:
    return None
  full = (dims["B"], dims["N"], dims["T"], dims["S"])
  what = "a bool array" if boolean else "a float array"
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name} must be {what} broadcastable to [B, N, T, S]"
                    f" = {full}, got {type(x).__name__}")
  if boolean and x.dtype != jnp.bool_:
    raise TypeError(f"{name} must be bool (True = attend), got "
                    f"{jnp.dtype(x.dtype).name}")
  if not boolean and not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must be floating (it is added to the logits), "
                    f"got {jnp.dtype(x.dtype).name}")
  shape = (1,) * (4 - x.ndim) + tuple(x.shape)
  if x.ndim > 4 or any(m not in (1, f) for m, f in zip(shape, full)):
    raise ValueError(f"{name} shape {tuple(x.shape)} is not broadcastable to "
                     f"[B, N, T, S] = {full}")
  return x.reshape(shape)


def _dropout(rate, rng, num_heads: int, broadcast):
  """(DropoutRule, [2] int32 seeds or None), validated."""
  if isinstance(rate, bool) or not isinstance(rate, (int, float)):
    raise TypeError(f"dropout_rate must be a Python float, got "
                    f"{type(rate).__name__}")
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1), got {rate}")
  broadcast = validation.check_bool("broadcast_dropout", broadcast)
  rule = DropoutRule(rate=float(rate), num_heads=num_heads,
                     broadcast=broadcast)
  if rate == 0.0:
    return rule, None
  if rng is None:
    raise ValueError(f"dropout_rate={rate} needs dropout_rng, a JAX PRNG "
                     f"key; got None")
  is_typed = hasattr(rng, "dtype") and jnp.issubdtype(rng.dtype,
                                                      jax.dtypes.prng_key)
  is_raw = (hasattr(rng, "dtype") and rng.dtype == jnp.uint32
            and tuple(rng.shape) == (2,))
  if not (is_typed and rng.shape == ()) and not is_raw:
    raise TypeError(f"dropout_rng must be one JAX PRNG key (jax.random.key "
                    f"or jax.random.PRNGKey), got "
                    f"{getattr(rng, 'dtype', type(rng).__name__)} "
                    f"{tuple(getattr(rng, 'shape', ()))}")
  return rule, seeds_from_key(rng)


class Rules(NamedTuple):
  """What one call's arguments amount to.

  mask, score, dropout: the static rules (hashable). arrays: the kernels'
  optional inputs, by keyword: segments (None or (q_segments [B, T],
  kv_segments [B, S]) int32), alibi_slopes (None or [B, N] float32, gradient
  stopped), bias (None or [Bm, Nm, Tm, Sm] float) and mask_array (None or
  [Bm, Nm, Tm, Sm] bool), each axis full or 1, and seeds (None or [2] int32).
  """
  mask: MaskRule
  score: ScoreRule
  dropout: DropoutRule
  arrays: dict


def build_rules(dims, *, scale=None, is_causal=False,
                causal_alignment="top_left", local_window_size=None,
                query_seq_lengths=None, key_value_seq_lengths=None,
                q_segment_ids=None, kv_segment_ids=None, bias=None,
                mask=None, logits_soft_cap=None, alibi_slopes=None,
                dropout_rate=0.0, dropout_rng=None,
                broadcast_dropout=False) -> Rules:
  """Validates the arguments of `fa2_jax.flash_attention` beyond q, k, v.

  Args:
    dims: shape numbers from `validation.check_qkv` (B, T, S, N, H, ...).
    Others as in `fa2_jax.flash_attention`.
  """
  is_causal = validation.check_bool("is_causal", is_causal)
  bias = _pair_array("bias", bias, dims, boolean=False)
  mask_array = _pair_array("mask", mask, dims, boolean=True)
  dropout, seeds = _dropout(dropout_rate, dropout_rng, dims["N"],
                            broadcast_dropout)
  batch, t, s = dims["B"], dims["T"], dims["S"]
  if causal_alignment not in CAUSAL_ALIGNMENTS:
    raise ValueError(f"causal_alignment must be one of {CAUSAL_ALIGNMENTS}, "
                     f"got {causal_alignment!r}")
  left, right = _window(local_window_size)
  if query_seq_lengths is not None:
    _check_int_array("query_seq_lengths", query_seq_lengths, (batch,))
  if key_value_seq_lengths is not None:
    _check_int_array("key_value_seq_lengths", key_value_seq_lengths, (batch,))
  if q_segment_ids is None and kv_segment_ids is not None:
    raise ValueError("kv_segment_ids was given without q_segment_ids")
  if q_segment_ids is not None:
    _check_int_array("q_segment_ids", q_segment_ids, (batch, t))
    if kv_segment_ids is None:
      if t != s:
        raise ValueError(
            f"kv_segment_ids [B, S] is required when T != S (T={t}, S={s}); "
            f"q_segment_ids alone serves self-attention")
      kv_segment_ids = q_segment_ids
    _check_int_array("kv_segment_ids", kv_segment_ids, (batch, s))
  segments = lengths_to_segments(
      q_segment_ids, kv_segment_ids,
      None if query_seq_lengths is None else query_seq_lengths.astype(
          jnp.int32),
      None if key_value_seq_lengths is None else key_value_seq_lengths.astype(
          jnp.int32),
      batch=batch, seq_len_q=t, seq_len_k=s)
  offset = s - t if causal_alignment == "bottom_right" else 0
  rule = MaskRule(seq_len_q=t, seq_len_k=s, is_causal=is_causal, offset=offset,
                  window_left=left, window_right=right,
                  has_segments=segments is not None,
                  has_mask_array=mask_array is not None)
  slopes = validation.check_alibi_slopes(alibi_slopes, batch, dims["N"])
  if slopes is not None:  # constants, as in FlashAttention: no gradient.
    slopes = jax.lax.stop_gradient(slopes)
  score = ScoreRule(scale=validation.check_scale(scale, dims["H"]),
                    soft_cap=validation.check_soft_cap(logits_soft_cap),
                    alibi=slopes is not None, offset=offset,
                    has_bias=bias is not None)
  return Rules(mask=rule, score=score, dropout=dropout, arrays=dict(
      segments=segments, alibi_slopes=slopes, bias=bias,
      mask_array=mask_array, seeds=seeds))
