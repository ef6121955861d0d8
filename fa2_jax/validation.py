"""Input checks with messages that name the argument, expected and received."""
import math

import jax.numpy as jnp

_FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


def _shape(x):
  return tuple(getattr(x, "shape", ()))


def check_qkv(query, key, value):
  """Checks q [B, T, N, H], k and v [B, S, K, H]; returns the shape numbers.

  Returns:
    dict with B, T, S, N, K, H.
  Raises:
    TypeError: a non-floating dtype.
    ValueError: wrong rank, mismatched sizes or dtypes.
  """
  for name, x, layout in (("query", query, "[B, T, N, H]"),
                          ("key", key, "[B, S, K, H]"),
                          ("value", value, "[B, S, K, H]")):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if x.ndim != 4:
      raise ValueError(
          f"{name} must have rank 4 {layout}, got shape {_shape(x)}")
    if not any(jnp.dtype(x.dtype) == d for d in _FLOAT_DTYPES):
      raise TypeError(
          f"{name} must be float16, bfloat16, float32 or float64, got "
          f"{jnp.dtype(x.dtype).name}")
  for name, x in (("key", key), ("value", value)):
    if x.dtype != query.dtype:
      raise ValueError(
          f"{name} dtype must match query dtype {jnp.dtype(query.dtype).name},"
          f" got {jnp.dtype(x.dtype).name}")
  batch, seq_len_q, num_heads, head_dim = query.shape
  _, seq_len_k, num_kv_heads, _ = key.shape
  if key.shape[0] != batch:
    raise ValueError(f"key batch size must match query's {batch} "
                     f"(query {_shape(query)}), got key {_shape(key)}")
  if key.shape[3] != head_dim:
    raise ValueError(f"key head_dim must match query's {head_dim} "
                     f"(query {_shape(query)}), got key {_shape(key)}")
  if value.shape != key.shape:
    raise ValueError(f"value shape must equal key shape {_shape(key)}, "
                     f"got {_shape(value)}")
  if num_heads % num_kv_heads:
    raise ValueError(
        f"query heads N={num_heads} must be a multiple of key/value heads "
        f"K={num_kv_heads} (query {_shape(query)}, key {_shape(key)})")
  for name, size in (("query length T", seq_len_q), ("key length S", seq_len_k),
                     ("head_dim H", head_dim), ("batch B", batch),
                     ("heads N", num_heads), ("kv heads K", num_kv_heads)):
    if size < 1:
      raise ValueError(f"{name} must be >= 1, got {size} "
                       f"(query {_shape(query)}, key {_shape(key)})")
  return dict(B=batch, T=seq_len_q, S=seq_len_k, N=num_heads, K=num_kv_heads,
              H=head_dim)


def check_scale(scale, head_dim: int) -> float:
  """Returns the softmax scale: `scale`, or 1/sqrt(head_dim) when None."""
  if scale is None:
    return 1.0 / math.sqrt(head_dim)
  if isinstance(scale, bool) or not isinstance(scale, (int, float)):
    raise TypeError(f"scale must be a Python float or None, got "
                    f"{type(scale).__name__}")
  if not math.isfinite(scale):
    raise ValueError(f"scale must be finite, got {scale}")
  return float(scale)


def check_bool(name: str, value) -> bool:
  if not isinstance(value, bool):
    raise TypeError(f"{name} must be a bool, got {value!r}")
  return value


def check_soft_cap(soft_cap) -> float | None:
  """Returns the logits soft cap: None, or a finite float > 0."""
  if soft_cap is None:
    return None
  if isinstance(soft_cap, bool) or not isinstance(soft_cap, (int, float)):
    raise TypeError(f"logits_soft_cap must be a Python float or None, got "
                    f"{type(soft_cap).__name__}")
  if not (math.isfinite(soft_cap) and soft_cap > 0):
    raise ValueError(f"logits_soft_cap must be finite and > 0, got "
                     f"{soft_cap}")
  return float(soft_cap)


def check_array(name: str, x, *, kind, shapes):
  """Checks an auxiliary array: `kind` jnp.integer or jnp.floating, and a
  shape among `shapes` (tuples); the message names the argument."""
  expected = " or ".join(str(sh) for sh in shapes)
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name} must be an array of shape {expected}, got "
                    f"{type(x).__name__}")
  if not jnp.issubdtype(x.dtype, kind):
    word = "have an integer dtype" if kind is jnp.integer else "be floating"
    raise TypeError(f"{name} must {word}, got {jnp.dtype(x.dtype).name}")
  if tuple(x.shape) not in shapes:
    raise ValueError(f"{name} must have shape {expected}, got "
                     f"{tuple(x.shape)}")


def check_alibi_slopes(slopes, batch: int, num_heads: int):
  """Returns ALiBi slopes as [B, N] float32 (or None); accepts [N] or [B, N]."""
  if slopes is None:
    return None
  check_array("alibi_slopes", slopes, kind=jnp.floating,
              shapes=((num_heads,), (batch, num_heads)))
  return jnp.broadcast_to(slopes.astype(jnp.float32), (batch, num_heads))
