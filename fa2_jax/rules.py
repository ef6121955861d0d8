"""User arguments -> the kernels' rules and extra inputs, validated.

One function, `build_rules`, serves the API and the reference, so both mask
and score the same way.
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fa2_jax import validation
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


def _mask_array(mask, dims):
  """`mask` as [Bm, Nm, Tm, Sm] bool, each axis full or 1, or None."""
  if mask is None:
    return None
  full = (dims["B"], dims["N"], dims["T"], dims["S"])
  if not hasattr(mask, "shape") or not hasattr(mask, "dtype"):
    raise TypeError(f"mask must be a bool array broadcastable to [B, N, T, S]"
                    f" = {full}, got {type(mask).__name__}")
  if mask.dtype != jnp.bool_:
    raise TypeError(f"mask must be bool (True = attend), got "
                    f"{jnp.dtype(mask.dtype).name}")
  shape = (1,) * (4 - mask.ndim) + tuple(mask.shape)
  if mask.ndim > 4 or any(m not in (1, f) for m, f in zip(shape, full)):
    raise ValueError(f"mask shape {tuple(mask.shape)} is not broadcastable to "
                     f"[B, N, T, S] = {full}")
  return mask.reshape(shape)


class Rules(NamedTuple):
  """What one call's arguments amount to.

  mask, score: the static rules (hashable). segments: None or (q_segments
  [B, T], kv_segments [B, S]) int32. alibi_slopes: None or [B, N] float32,
  gradient stopped. mask_array: None or [Bm, Nm, Tm, Sm] bool, each axis full
  or 1.
  """
  mask: MaskRule
  score: ScoreRule
  segments: Any
  alibi_slopes: Any
  mask_array: Any


def build_rules(dims, *, scale=None, is_causal=False,
                causal_alignment="top_left", local_window_size=None,
                query_seq_lengths=None, key_value_seq_lengths=None,
                q_segment_ids=None, kv_segment_ids=None, mask=None,
                logits_soft_cap=None, alibi_slopes=None) -> Rules:
  """Validates the arguments of `fa2_jax.flash_attention` beyond q, k, v.

  Args:
    dims: shape numbers from `validation.check_qkv` (B, T, S, N, H, ...).
    Others as in `fa2_jax.flash_attention`.
  """
  is_causal = validation.check_bool("is_causal", is_causal)
  mask_array = _mask_array(mask, dims)
  mask_array = _mask_array(mask, dims)
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
                    alibi=slopes is not None, offset=offset)
  return Rules(mask=rule, score=score, segments=segments, alibi_slopes=slopes,
               mask_array=mask_array)
