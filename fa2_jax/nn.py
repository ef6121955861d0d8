"""Flax integration: a drop-in `attention_fn` and an nnx attention module.

    import functools
    from flax import nnx
    import fa2_jax.nn

    mha = nnx.MultiHeadAttention(num_heads=8, in_features=512, decode=False,
                                 attention_fn=fa2_jax.nn.flash_attention_fn,
                                 rngs=nnx.Rngs(0))
    # or, with fa2-jax's own options (e.g. interpret mode on a CPU):
    fn = functools.partial(fa2_jax.nn.flash_attention_fn, interpret=True)

    layer = fa2_jax.nn.MultiHeadAttention(num_heads=8, in_features=512,
                                          num_kv_heads=2, is_causal=True,
                                          rngs=nnx.Rngs(0))
    y = layer(x, segment_ids=ids)            # x [B, T, 512], ids [B, T]

`LinenMultiHeadAttention` is the same layer for linen.
"""
import functools
import math
import typing

import jax.numpy as jnp
from flax import linen, nnx

from fa2_jax.attention import flash_attention


def _flatten_batch(x, batch_shape):
  """[*batch, ...] -> [prod(batch), ...], broadcasting size-1 batch axes."""
  if x is None:
    return None
  rest = x.shape[len(batch_shape):]
  x = jnp.broadcast_to(x, (*batch_shape, *rest))
  return x.reshape(math.prod(batch_shape), *rest)


def flash_attention_fn(query, key, value, bias=None, mask=None,
                       broadcast_dropout=True, dropout_rng=None,
                       dropout_rate=0.0, deterministic=False, dtype=None,
                       precision=None, module=None, is_causal=False,
                       **flash_kwargs):
  """`flax.nnx.dot_product_attention`'s contract on fa2-jax's kernels.

  A drop-in `attention_fn` for `flax.nnx.MultiHeadAttention` and
  `flax.linen.MultiHeadDotProductAttention`.

  Args:
    query: [batch..., T, N, H]; key, value: [batch..., S, K, H] (K divides N).
    bias: float, broadcastable to [batch..., N, T, S]; added to the logits.
    mask: broadcastable to [batch..., N, T, S]; nonzero / True = attend
      (Flax's float masks from `make_attention_mask` work as they are).
    broadcast_dropout: one keep mask for every batch element and head (Flax's
      default), else one per (batch, head).
    dropout_rng: a PRNG key; needed when dropping out.
    dropout_rate: dropout of the attention probabilities, applied when not
      `deterministic` (inside the kernels, never materialized).
    deterministic: no dropout.
    dtype: the computation dtype; q, k, v are promoted to it as in Flax.
    precision: accepted for the contract: the kernels always multiply at the
      full precision of the input dtype (float32 inputs: no TF32), which is at
      least what any `precision` asks.
    module: Flax passes the module when `sow_weights=True`; flash attention
      never forms the attention weights, so a module raises
      NotImplementedError.
    is_causal: causal masking (skips the blocks above the diagonal).
    **flash_kwargs: any other keyword of `fa2_jax.flash_attention`
      (implementation, interpret, block_sizes, segment ids, windows, ...).
  Returns:
    [batch..., T, N, H].
  """
  del precision  # see the docstring: the kernels' precision is the highest.
  if module is not None:
    raise NotImplementedError(
        "flash_attention_fn cannot sow attention weights (sow_weights=True "
        "passes `module`): flash attention never materializes them; call the "
        "module with sow_weights=False")
  query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
  if dtype is None:
    dtype = jnp.result_type(query, key, value)
  query, key, value = (x.astype(dtype) for x in (query, key, value))
  if mask is not None and jnp.asarray(mask).dtype != jnp.bool_:
    mask = jnp.asarray(mask) != 0
  use_dropout = not deterministic and dropout_rate > 0.0
  if use_dropout and dropout_rng is None:
    raise ValueError(f"dropout_rate={dropout_rate} with deterministic=False "
                     f"needs dropout_rng, got None")
  if query.ndim < 4:
    raise ValueError(f"query must be [batch..., T, N, H] with at least one "
                     f"batch axis, got shape {query.shape}")
  batch_shape = query.shape[:-3]
  if len(batch_shape) > 1:  # the kernels take one batch axis
    query, key, value = (_flatten_batch(x, batch_shape)
                         for x in (query, key, value))
    bias, mask = (None if x is None else _flatten_batch(
        jnp.reshape(x, (1,) * (len(batch_shape) + 3 - x.ndim) + x.shape),
        batch_shape) for x in (bias, mask))
  out = flash_attention(
      query, key, value, bias=bias, mask=mask, is_causal=is_causal,
      dropout_rate=dropout_rate if use_dropout else 0.0,
      dropout_rng=dropout_rng if use_dropout else None,
      broadcast_dropout=bool(broadcast_dropout), **flash_kwargs)
  return out.reshape(*batch_shape, *out.shape[1:])


def _head_shapes(num_heads, num_kv_heads, qkv_features, in_features):
  """(num_kv_heads, head_dim) of the attention modules, validated."""
  qkv_features = in_features if qkv_features is None else qkv_features
  num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
  if qkv_features % num_heads:
    raise ValueError(f"qkv_features ({qkv_features}) must be a multiple of "
                     f"num_heads ({num_heads})")
  if num_heads % num_kv_heads:
    raise ValueError(f"num_heads ({num_heads}) must be a multiple of "
                     f"num_kv_heads ({num_kv_heads})")
  return num_kv_heads, qkv_features // num_heads


def _attend(layer, query, key, value, mask, segment_ids, dropout_rng):
  """flash_attention with a module's settings (is_causal, dropout_rate,
  implementation, interpret, block_sizes); dropout iff a key is given."""
  dropout = ({} if dropout_rng is None else
             dict(dropout_rate=layer.dropout_rate, dropout_rng=dropout_rng))
  return flash_attention(
      query, key, value, mask=mask, is_causal=layer.is_causal,
      q_segment_ids=segment_ids, implementation=layer.implementation,
      interpret=layer.interpret, block_sizes=layer.block_sizes, **dropout)


class MultiHeadAttention(nnx.Module):
  """Multi-head attention (GQA/MQA-capable) on fa2-jax's kernels.

  x [B, T, in_features] -> [B, T, out_features]: Q from `num_heads`, K and V
  from `num_kv_heads` heads of size qkv_features / num_heads, attention by
  `fa2_jax.flash_attention`, then an output projection.

  Args:
    num_heads: query heads N.
    in_features: the input's last axis.
    num_kv_heads: key/value heads K (divides N); default N (no grouping).
    qkv_features: N * head_dim; default in_features.
    out_features: default in_features.
    is_causal: causal self-attention.
    dropout_rate: attention-probability dropout when not deterministic.
    deterministic: the default for calls (nnx's `eval()` / `train()` set it).
    use_bias: biases in the projections.
    dtype: computation dtype (None: that of the inputs and parameters).
    param_dtype: parameter dtype.
    implementation, interpret, block_sizes: passed to `flash_attention`.
    attention_fn: instead of fa2-jax, call
      `attention_fn(q, k, v, mask=..., is_causal=...)`, e.g.
      `functools.partial(jax.nn.dot_product_attention, implementation="cudnn")`
      to compare the same model against another attention (no segment ids,
      no dropout then).
    rngs: parameter initialization and the dropout stream.
  """

  def __init__(self, num_heads: int, in_features: int, *,
               num_kv_heads: int | None = None,
               qkv_features: int | None = None,
               out_features: int | None = None, is_causal: bool = False,
               dropout_rate: float = 0.0, deterministic: bool = False,
               use_bias: bool = False, dtype=None, param_dtype=jnp.float32,
               implementation=None, interpret=None, block_sizes=None,
               attention_fn=None, rngs: nnx.Rngs):
    out_features = in_features if out_features is None else out_features
    num_kv_heads, head_dim = _head_shapes(num_heads, num_kv_heads,
                                          qkv_features, in_features)
    linear = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                  rngs=rngs)
    self.query = nnx.LinearGeneral(in_features, (num_heads, head_dim),
                                   **linear)
    self.key = nnx.LinearGeneral(in_features, (num_kv_heads, head_dim),
                                 **linear)
    self.value = nnx.LinearGeneral(in_features, (num_kv_heads, head_dim),
                                   **linear)
    self.out = nnx.LinearGeneral((num_heads, head_dim), out_features,
                                 axis=(-2, -1), **linear)
    self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
    self.is_causal, self.dropout_rate = is_causal, dropout_rate
    self.deterministic = deterministic
    self.implementation, self.interpret = implementation, interpret
    self.block_sizes = block_sizes
    self.attention_fn = attention_fn
    if attention_fn is not None and dropout_rate > 0.0:
      raise NotImplementedError("dropout_rate > 0 needs fa2-jax's attention, "
                                "not a custom attention_fn")
    self.rngs = rngs["dropout"].fork() if dropout_rate > 0.0 else None

  def __call__(self, x, *, segment_ids=None, mask=None,
               deterministic: bool | None = None):
    """x [B, T, in_features]; segment_ids [B, T] int (packed documents);
    mask bool broadcastable to [B, N, T, T]. Returns [B, T, out_features]."""
    deterministic = self.deterministic if deterministic is None else (
        deterministic)
    query, key, value = self.query(x), self.key(x), self.value(x)
    if self.attention_fn is not None:
      if segment_ids is not None:
        raise NotImplementedError("segment_ids need fa2-jax's attention, not "
                                  "a custom attention_fn")
      return self.out(self.attention_fn(query, key, value, mask=mask,
                                        is_causal=self.is_causal))
    rng = (self.rngs() if self.dropout_rate > 0.0 and not deterministic
           else None)
    return self.out(_attend(self, query, key, value, mask, segment_ids, rng))


class LinenMultiHeadAttention(linen.Module):
  """The linen twin of `MultiHeadAttention` (same arguments, minus rngs:
  dropout draws from the "dropout" rng collection).

  x [B, T, in_features] -> [B, T, out_features]; call as
  `module.apply(params, x, segment_ids=None, mask=None, deterministic=True,
  rngs={"dropout": key})`.
  """
  num_heads: int
  num_kv_heads: int | None = None
  qkv_features: int | None = None
  out_features: int | None = None
  is_causal: bool = False
  dropout_rate: float = 0.0
  use_bias: bool = False
  dtype: typing.Any = None
  param_dtype: typing.Any = jnp.float32
  implementation: str | None = None
  interpret: bool | None = None
  block_sizes: typing.Any = None

  @linen.compact
  def __call__(self, x, *, segment_ids=None, mask=None,
               deterministic: bool = True):
    in_features = x.shape[-1]
    num_kv_heads, head_dim = _head_shapes(self.num_heads, self.num_kv_heads,
                                          self.qkv_features, in_features)
    dense = functools.partial(linen.DenseGeneral, use_bias=self.use_bias,
                              dtype=self.dtype, param_dtype=self.param_dtype)
    query = dense((self.num_heads, head_dim), name="query")(x)
    key = dense((num_kv_heads, head_dim), name="key")(x)
    value = dense((num_kv_heads, head_dim), name="value")(x)
    rng = (self.make_rng("dropout")
           if self.dropout_rate > 0.0 and not deterministic else None)
    out = _attend(self, query, key, value, mask, segment_ids, rng)
    return dense(self.out_features or in_features, axis=(-2, -1),
                 name="out")(out)
