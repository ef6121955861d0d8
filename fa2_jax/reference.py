"""The plain-`jnp` attention that every kernel is tested against.

Same semantics as the kernels: the mask rule of `pallas_kernels.mask`, float32
(or wider) logits and softmax, probabilities cast to the input dtype before the
P V product (as the kernels and `jax.nn.dot_product_attention` do), rows that
see no key give output 0 and LSE -inf. It materializes the [B, N, T, S] logits:
O(T S) memory, for testing and as `implementation="xla"`.
"""
import jax
import jax.numpy as jnp

from pallas_kernels.mask import MaskRule


def attention_reference(query, key, value, *, scale: float,
                        is_causal: bool = False):
  """Reference attention.

  Args:
    query: [B, T, N, H]; key, value: [B, S, K, H], N a multiple of K
      (query head n reads kv head n // (N // K)).
    scale: multiplies the logits.
    is_causal: query i sees keys j <= i (top-left alignment).
  Returns:
    out [B, T, N, H] in the input dtype; lse [B, N, T] float32 (float64 for
    float64 inputs), natural log of the softmax denominator.
  """
  batch, seq_len_q, num_heads, head_dim = query.shape
  _, seq_len_k, num_kv_heads, _ = key.shape
  group = num_heads // num_kv_heads
  acc = jnp.promote_types(query.dtype, jnp.float32)
  # [B, T, K, G, H]: query head n = kv_head * G + g.
  q = query.reshape(batch, seq_len_q, num_kv_heads, group, head_dim)
  logits = jnp.einsum("btkgh,bskh->bkgts", q, key,
                      preferred_element_type=acc) * scale
  rule = MaskRule(seq_len_q=seq_len_q, seq_len_k=seq_len_k, is_causal=is_causal)
  visible = rule.visible(jnp.arange(seq_len_q)[:, None],
                         jnp.arange(seq_len_k)[None, :])
  logits = jnp.where(visible, logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  p = jnp.exp(logits - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  probs = p / jnp.where(l == 0.0, 1.0, l)
  out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(query.dtype), value,
                   preferred_element_type=acc)
  out = out.reshape(batch, seq_len_q, num_heads, head_dim).astype(query.dtype)
  lse = (jnp.log(l) + m)[..., 0].reshape(batch, num_heads, seq_len_q)
  return out, lse
