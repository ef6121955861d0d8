"""Ring attention (context parallelism) over a `shard_map` axis.

Each device holds a contiguous chunk of the sequence: chunk i of q, k, v on
the device at index i of `axis_name`. Key/value chunks travel around the ring
with `ppermute` (a collective-permute; the send of the next chunk is issued
before the current chunk is computed, so they can overlap). Each step's
partial output merges exactly through its log-sum-exp:

    lse = logaddexp(lse_a, lse_b),  o = o_a e^(lse_a - lse) + o_b e^(lse_b - lse)

Under `is_causal`, chunk j > i is wholly in the future and is skipped, chunk
i attends causally, chunks j < i attend in full. The backward is a ring too:
with the final LSE and delta = rowsum(dO * O), each (i, j) pair gives its dQ,
dK, dV exactly (FA2 Algorithm 2 with the global LSE); dK/dV accumulators travel
with their chunk and arrive home after a full turn.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

from fa2_jax import validation
from fa2_jax.attention import _resolve_implementation
from fa2_jax.autodiff import KernelConfig, run_backward, run_forward
from fa2_jax.config import default_block_sizes
from fa2_jax.reference import reference_attention
from pallas_kernels.dropout import DropoutRule
from pallas_kernels.mask import MaskRule
from pallas_kernels.scores import ScoreRule

# How query chunk i relates to key chunk j under is_causal.
FULL, DIAGONAL, FUTURE = "full", "diagonal", "future"


def _config(q, k, scale, causal: bool, interpret: bool) -> KernelConfig:
  """The kernels' rules for one chunk pair (no variants: plain or causal)."""
  return KernelConfig(
      mask=MaskRule(seq_len_q=q.shape[1], seq_len_k=k.shape[1],
                    is_causal=causal),
      score=ScoreRule(scale=scale), dropout=DropoutRule(),
      block_sizes=default_block_sizes(q.shape[-1], q.dtype),
      interpret=interpret)


def _pair_forward(q, k, v, *, scale, causal, implementation, interpret):
  """(out [B,T,N,H], lse [B,N,T] f32) of q's chunk against one kv chunk."""
  config = _config(q, k, scale, causal, interpret)
  if implementation == "xla":
    out, lse = reference_attention(q, k, v, mask=config.mask,
                                   score=config.score)
    return out, lse.astype(jnp.float32)
  return run_forward(q, k, v, {}, config)


def _pair_backward_xla(q, k, v, do, lse, delta, *, mask: MaskRule, scale):
  """dq, dk, dv of one chunk pair from the global lse and delta (jnp)."""
  batch, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  f32 = jnp.promote_types(q.dtype, jnp.float32)
  qg = q.reshape(batch, t, kh, g, h).astype(f32)
  dog = do.reshape(batch, t, kh, g, h).astype(f32)
  logits = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(f32)) * scale
  lse = lse.reshape(batch, kh, g, t)[..., None]
  visible = mask.visible(jnp.arange(t)[:, None], jnp.arange(s)[None, :])
  p = jnp.where(visible & ~jnp.isneginf(lse), jnp.exp(logits - lse), 0.0)
  dv = jnp.einsum("bkgts,btkgh->bskh", p, dog)
  dp = jnp.einsum("btkgh,bskh->bkgts", dog, v.astype(f32))
  ds = p * (dp - delta.reshape(batch, kh, g, t)[..., None])
  dq = jnp.einsum("bkgts,bskh->btkgh", ds, k.astype(f32)) * scale
  dk = jnp.einsum("bkgts,btkgh->bskh", ds, qg) * scale
  return (dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype),
          dv.astype(v.dtype))


def _pair_backward(q, k, v, do, lse, delta, *, scale, causal, implementation,
                   interpret):
  config = _config(q, k, scale, causal, interpret)
  if implementation == "xla":
    return _pair_backward_xla(q, k, v, do, lse, delta, mask=config.mask,
                              scale=scale)
  return run_backward(q, k, v, do, lse, delta, {}, config)


def _relation(step: int, is_causal: bool, index):
  """Which of FULL / DIAGONAL / FUTURE the kv chunk at ring `step` is, for
  the device at `index` (a traced scalar); a Python str when static."""
  if not is_causal:
    return FULL
  if step == 0:
    return DIAGONAL
  return index >= step  # traced: True = FULL (j = i - step >= 0), else FUTURE


def _merge(out, lse, out_s, lse_s):
  """Exact merge of two partial attentions over disjoint key sets."""
  new = jnp.logaddexp(lse, lse_s)
  safe = jnp.where(jnp.isneginf(new), 0.0, new)
  w_a = jnp.exp(lse - safe).transpose(0, 2, 1)[..., None]
  w_b = jnp.exp(lse_s - safe).transpose(0, 2, 1)[..., None]
  merged = out.astype(jnp.float32) * w_a + out_s.astype(jnp.float32) * w_b
  return merged, new


def _varying(axis_name, *xs):
  """Constants typed as varying over the ring axis (as the kernels' outputs
  are), so that both branches of a `lax.cond` agree under shard_map."""
  return tuple(lax.pcast(x, axis_name, to="varying") for x in xs)


def _shift(x, axis_name, n):
  """Sends x to the next device of the ring (i -> i + 1)."""
  return lax.ppermute(x, axis_name, [(d, (d + 1) % n) for d in range(n)])


def _ring_forward(q, k, v, *, axis_name, is_causal, scale, implementation,
                  interpret):
  n = lax.axis_size(axis_name)
  index = lax.axis_index(axis_name)
  pair = functools.partial(_pair_forward, scale=scale,
                           implementation=implementation, interpret=interpret)
  out = jnp.zeros(q.shape, jnp.float32)
  lse = jnp.full((q.shape[0], q.shape[2], q.shape[1]), -jnp.inf, jnp.float32)
  for step in range(n):
    next_kv = _shift((k, v), axis_name, n) if step < n - 1 else None
    relation = _relation(step, is_causal, index)
    if isinstance(relation, str):
      out_s, lse_s = pair(q, k, v, causal=relation == DIAGONAL)
    else:
      out_s, lse_s = lax.cond(
          relation, lambda q, k, v: pair(q, k, v, causal=False),
          lambda q, k, v: _varying(axis_name, jnp.zeros(q.shape, q.dtype),
                                   jnp.full(lse.shape, -jnp.inf,
                                            jnp.float32)),
          q, k, v)
    out, lse = _merge(out, lse, out_s, lse_s)
    if next_kv is not None:
      k, v = next_kv
  return out.astype(q.dtype), lse


def _ring_backward(q, k, v, out, lse, do, *, axis_name, is_causal, scale,
                   implementation, interpret):
  n = lax.axis_size(axis_name)
  index = lax.axis_index(axis_name)
  pair = functools.partial(_pair_backward, scale=scale,
                           implementation=implementation, interpret=interpret)
  delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  delta = delta.transpose(0, 2, 1)
  do = do.astype(q.dtype)
  dq = jnp.zeros(q.shape, jnp.float32)
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  for step in range(n):
    relation = _relation(step, is_causal, index)
    args = (q, k, v, do, lse, delta)
    if isinstance(relation, str):
      grads = pair(*args, causal=relation == DIAGONAL)
    else:
      grads = lax.cond(relation, lambda *a: pair(*a, causal=False),
                       lambda q, k, v, *_: _varying(
                           axis_name, jnp.zeros(q.shape, q.dtype),
                           jnp.zeros(k.shape, k.dtype),
                           jnp.zeros(v.shape, v.dtype)),
                       *args)
    dq = dq + grads[0].astype(jnp.float32)
    dk = dk + grads[1].astype(jnp.float32)
    dv = dv + grads[2].astype(jnp.float32)
    # The accumulators travel with their chunk; after n shifts they are home.
    if step < n - 1:
      k, v, dk, dv = _shift((k, v, dk, dv), axis_name, n)
    else:
      dk, dv = _shift((dk, dv), axis_name, n)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _ring(q, k, v, axis_name, is_causal, scale, implementation, interpret):
  return _ring_forward(q, k, v, axis_name=axis_name, is_causal=is_causal,
                       scale=scale, implementation=implementation,
                       interpret=interpret)[0]


def _ring_fwd(q, k, v, axis_name, is_causal, scale, implementation,
              interpret):
  out, lse = _ring_forward(q, k, v, axis_name=axis_name, is_causal=is_causal,
                           scale=scale, implementation=implementation,
                           interpret=interpret)
  return out, (q, k, v, out, lse)


def _ring_bwd(axis_name, is_causal, scale, implementation, interpret,
              residuals, do):
  q, k, v, out, lse = residuals
  return _ring_backward(q, k, v, out, lse, do, axis_name=axis_name,
                        is_causal=is_causal, scale=scale,
                        implementation=implementation, interpret=interpret)


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(query, key, value, *, axis_name, is_causal=False,
                   scale=None, implementation=None, interpret=None):
  """Exact attention over a sequence sharded along `axis_name`.

  Call inside `jax.shard_map` with q, k, v sharded along the sequence axis in
  contiguous chunks, in the axis order (device i holds tokens
  [i T_local, (i + 1) T_local)).

  Args:
    query: [B, T_local, N, H]; key, value: [B, S_local, K, H] (K divides N);
      causal attention needs T_local == S_local.
    axis_name: the mesh axis the sequence is sharded over.
    is_causal: causal over the global positions; chunks in the future are
      skipped.
    scale: default 1 / sqrt(H).
    implementation, interpret: as in `fa2_jax.flash_attention` ("triton" or
      "xla").
  Returns:
    [B, T_local, N, H]: this device's chunk of the output. Differentiable
    (the backward is a ring as well).
  """
  dims = validation.check_qkv(query, key, value)
  is_causal = validation.check_bool("is_causal", is_causal)
  if is_causal and dims["T"] != dims["S"]:
    raise ValueError(f"causal ring attention needs equal query and key chunk "
                     f"lengths, got T_local={dims['T']}, S_local={dims['S']}")
  scale = validation.check_scale(scale, dims["H"])
  implementation, interpret = _resolve_implementation(implementation,
                                                      interpret)
  return _ring(query, key, value, axis_name, is_causal, scale,
               implementation, interpret)
