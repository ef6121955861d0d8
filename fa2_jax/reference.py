"""The plain-`jnp` attention that every kernel is tested against.

Same semantics as the kernels: the mask rule of `pallas_kernels.mask`, float32
(or wider) logits and softmax, probabilities cast to the input dtype before the
P V product (as the kernels and `jax.nn.dot_product_attention` do), rows that
see no key give output 0 and LSE -inf. It materializes the [B, N, T, S] logits:
O(T S) memory, for testing and as `implementation="xla"`.
"""
import jax
import jax.numpy as jnp

from fa2_jax import rules, validation
from pallas_kernels import dropout as dropout_lib
from pallas_kernels.dropout import DropoutRule
from pallas_kernels.mask import MaskRule
from pallas_kernels.scores import ScoreRule


def reference_attention(query, key, value, *, mask: MaskRule,
                        score: ScoreRule, dropout: DropoutRule = DropoutRule(),
                        segments=None, alibi_slopes=None, bias=None,
                        mask_array=None, seeds=None):
  """Reference attention under the kernels' rules (their interface).

  Args:
    query: [B, T, N, H]; key, value: [B, S, K, H], N a multiple of K
      (query head n reads kv head n // (N // K)).
    mask: the visibility rule; score: scale, bias, soft cap and ALiBi of the
      logits; dropout: the rate (the keep mask is `dropout.keep_mask`'s).
    segments: None or (q_segments [B, T], kv_segments [B, S]) int32.
    alibi_slopes: None or [B, N] float32 (iff `score.alibi`).
    bias: None or [Bm, Nm, Tm, Sm] float (iff `score.has_bias`).
    mask_array: None or [Bm, Nm, Tm, Sm] bool, each axis full or 1.
    seeds: None or [2] int32 dropout seeds (iff `dropout.active`).
  Returns:
    out [B, T, N, H] in the input dtype; lse [B, N, T] float32 (float64 for
    float64 inputs), natural log of the (undropped) softmax denominator.
  """
  batch, seq_len_q, num_heads, head_dim = query.shape
  _, seq_len_k, num_kv_heads, _ = key.shape
  group = num_heads // num_kv_heads
  acc = jnp.promote_types(query.dtype, jnp.float32)
  # [B, T, K, G, H]: query head n = kv_head * G + g.
  q = query.reshape(batch, seq_len_q, num_kv_heads, group, head_dim)
  alibi = None
  if score.alibi:
    slope = alibi_slopes.reshape(batch, num_kv_heads, group, 1, 1)
    alibi = score.alibi_bias(slope, jnp.arange(seq_len_q)[:, None],
                             jnp.arange(seq_len_k)[None, :])
  per_head = lambda x: x.reshape(  # [Bx, Nx, ...] -> [Bx, K | 1, G | 1, ...]
      (x.shape[0], num_kv_heads, group, *x.shape[2:]) if x.shape[1] > 1
      else (x.shape[0], 1, 1, *x.shape[2:]))
  logits = score.logits(
      jnp.einsum("btkgh,bskh->bkgts", q, key, preferred_element_type=acc),
      alibi, None if bias is None else per_head(bias.astype(acc)))
  segs = (None, None)
  if mask.has_segments:
    q_seg, kv_seg = segments
    segs = (q_seg[:, None, None, :, None], kv_seg[:, None, None, None, :])
  mask_tile = per_head(mask_array) if mask.has_mask_array else None
  visible = mask.visible(jnp.arange(seq_len_q)[:, None],
                         jnp.arange(seq_len_k)[None, :], *segs,
                         mask_tile=mask_tile)
  logits = jnp.where(visible, logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  p = jnp.exp(logits - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  probs = p / jnp.where(l == 0.0, 1.0, l)
  if dropout.active:
    keep = dropout_lib.keep_mask(dropout, seeds, batch, seq_len_q, seq_len_k)
    probs = jnp.where(per_head(keep), probs * dropout.keep_scale, 0.0)
  out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(query.dtype), value,
                   preferred_element_type=acc)
  out = out.reshape(batch, seq_len_q, num_heads, head_dim).astype(query.dtype)
  lse = (jnp.log(l) + m)[..., 0].reshape(batch, num_heads, seq_len_q)
  return out, lse


def attention_reference(query, key, value, *, scale=None, **kwargs):
  """Reference attention with `fa2_jax.flash_attention`'s arguments.

  Returns (out [B, T, N, H], lse [B, N, T]); `kwargs` are the mask and logit
  arguments of `flash_attention` (is_causal, causal_alignment,
  local_window_size, query_seq_lengths, key_value_seq_lengths,
  q_segment_ids, kv_segment_ids, bias, mask, logits_soft_cap, alibi_slopes,
  dropout_rate, dropout_rng). With dropout it drops exactly the entries the
  kernels drop.
  """
  dims = validation.check_qkv(query, key, value)
  r = rules.build_rules(dims, scale=scale, **kwargs)
  return reference_attention(query, key, value, mask=r.mask, score=r.score,
                             dropout=r.dropout, **r.arrays)
