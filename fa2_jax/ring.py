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

Causal work is unbalanced in the contiguous layout (device i computes i + 1
chunk pairs). The zig-zag layout (`layout="zigzag"`) cuts the sequence into
2D chunks and gives device i chunks i and 2D-1-i (`to_zigzag` permutes the
tokens, `from_zigzag` undoes it). Then step 0 is causal over the local pair,
and every later step costs the same half of a full pair: from an earlier
device, all local queries against its first chunk; from a later one, the
local second chunk against both of its chunks.
"""
import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fa2_jax import partitioning, validation
from fa2_jax import backends
from fa2_jax.attention import kernel_config
from fa2_jax.autodiff import KernelConfig, run_backward, run_forward
from fa2_jax.reference import reference_attention
from pallas_kernels.dropout import DropoutRule
from pallas_kernels.mask import MaskRule
from pallas_kernels.outputs import row_delta
from pallas_kernels.scores import ScoreRule

# How query chunk i relates to key chunk j under is_causal.
FULL, DIAGONAL, FUTURE = "full", "diagonal", "future"
LAYOUTS = ("contiguous", "zigzag")


def zigzag_indices(seq_len: int, num_shards: int) -> np.ndarray:
  """[seq_len] int: the original position of each token in zig-zag order.

  With D = num_shards and the sequence cut into 2D equal chunks, shard i of
  the zig-zag order holds chunks i and 2D-1-i. Use it as the position ids of
  the permuted tokens (RoPE, learned positions).
  """
  if seq_len % (2 * num_shards):
    raise ValueError(f"the zig-zag layout needs seq_len divisible by "
                     f"2 * num_shards = {2 * num_shards}, got {seq_len}")
  chunks = np.arange(seq_len).reshape(2 * num_shards, -1)
  order = [c for i in range(num_shards) for c in (i, 2 * num_shards - 1 - i)]
  return chunks[order].reshape(-1)


def _take(x, indices, axis: int):
  """x[..., indices, ...] along `axis`; numpy stays numpy. A jax array
  sharded along `axis` is gathered along it first (the permutation moves
  tokens between shards)."""
  if isinstance(x, np.ndarray):
    return np.take(x, indices, axis=axis)
  return jnp.take(partitioning.gather_axis(x, axis), indices, axis=axis)


def to_zigzag(x, num_shards: int, axis: int = 1):
  """x with its `axis` (the sequence) in zig-zag order (see zigzag_indices);
  shard it contiguously over num_shards devices for ring_attention. Cheapest
  before sharding, e.g. on the token ids, targets and positions in the input
  pipeline: the model then runs in that order."""
  return _take(x, zigzag_indices(x.shape[axis], num_shards), axis)


def from_zigzag(x, num_shards: int, axis: int = 1):
  """The inverse of `to_zigzag`: the original token order (a sequence-sharded
  x is gathered along the sequence)."""
  return _take(x, np.argsort(zigzag_indices(x.shape[axis], num_shards)), axis)


def _config(q, k, scale, causal: bool, implementation: str,
            interpret: bool) -> KernelConfig:
  """The kernels' rules for one chunk pair (no variants: plain or causal)."""
  return kernel_config(
      MaskRule(seq_len_q=q.shape[1], seq_len_k=k.shape[1], is_causal=causal),
      ScoreRule(scale=scale), DropoutRule(), implementation, interpret,
      q.shape[-1], q.dtype)


def _pair_forward(q, k, v, *, scale, causal, implementation, interpret):
  """(out [B,T,N,H], lse [B,N,T] f32) of q's chunk against one kv chunk."""
  config = _config(q, k, scale, causal, implementation, interpret)
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
  config = _config(q, k, scale, causal, implementation, interpret)
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


def _halves(x, axis=1):
  c = x.shape[axis] // 2
  return lax.slice_in_dim(x, 0, c, axis=axis), lax.slice_in_dim(
      x, c, 2 * c, axis=axis)


def _zigzag_pair_forward(pair, q, k, v, earlier):
  """A zig-zag step past the first: kv from an earlier device (all queries
  against its first chunk) or a later one (the second query chunk against
  both); full-size out and lse, -inf lse for rows not computed."""
  def from_earlier(q, k, v):
    return pair(q, _halves(k)[0], _halves(v)[0], causal=False)

  def from_later(q, k, v):
    q_a, q_b = _halves(q)
    out_b, lse_b = pair(q_b, k, v, causal=False)
    return (jnp.concatenate([jnp.zeros(q_a.shape, out_b.dtype), out_b], 1),
            jnp.concatenate([jnp.full(lse_b.shape, -jnp.inf, lse_b.dtype),
                             lse_b], 2))
  return lax.cond(earlier, from_earlier, from_later, q, k, v)


def _ring_forward(q, k, v, *, axis_name, is_causal, layout, scale,
                  implementation, interpret):
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
    elif layout == "zigzag":
      out_s, lse_s = _zigzag_pair_forward(pair, q, k, v, relation)
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


def _zigzag_pair_backward(pair, args, earlier):
  """dq, dk, dv of a zig-zag step past the first (see the forward)."""
  def from_earlier(q, k, v, do, lse, delta):
    dq, dk_a, dv_a = pair(q, _halves(k)[0], _halves(v)[0], do, lse, delta,
                          causal=False)
    pad = lambda d: jnp.concatenate([d, jnp.zeros(d.shape, d.dtype)], 1)
    return dq, pad(dk_a), pad(dv_a)

  def from_later(q, k, v, do, lse, delta):
    q_b, do_b = _halves(q)[1], _halves(do)[1]
    dq_b, dk, dv = pair(q_b, k, v, do_b, _halves(lse, 2)[1],
                        _halves(delta, 2)[1], causal=False)
    return (jnp.concatenate([jnp.zeros(dq_b.shape, dq_b.dtype), dq_b], 1),
            dk, dv)
  return lax.cond(earlier, from_earlier, from_later, *args)


def _ring_backward(q, k, v, out, lse, do, *, axis_name, is_causal, layout,
                   scale, implementation, interpret):
  n = lax.axis_size(axis_name)
  index = lax.axis_index(axis_name)
  pair = functools.partial(_pair_backward, scale=scale,
                           implementation=implementation, interpret=interpret)
  delta = row_delta(out, do)
  do = do.astype(q.dtype)
  dq = jnp.zeros(q.shape, jnp.float32)
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  for step in range(n):
    relation = _relation(step, is_causal, index)
    args = (q, k, v, do, lse, delta)
    if isinstance(relation, str):
      grads = pair(*args, causal=relation == DIAGONAL)
    elif layout == "zigzag":
      grads = _zigzag_pair_backward(pair, args, relation)
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


# The ring's static options (hashable).
_Options = collections.namedtuple(
    "_Options", "axis_name is_causal layout scale implementation interpret")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ring(q, k, v, options):
  return _ring_forward(q, k, v, **options._asdict())[0]


def _ring_fwd(q, k, v, options):
  out, lse = _ring_forward(q, k, v, **options._asdict())
  return out, (q, k, v, out, lse)


def _ring_bwd(options, residuals, do):
  q, k, v, out, lse = residuals
  return _ring_backward(q, k, v, out, lse, do, **options._asdict())


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(query, key, value, *, axis_name, is_causal=False,
                   layout="contiguous", scale=None, implementation=None,
                   interpret=None):
  """Exact attention over a sequence sharded along `axis_name`.

  Call inside `jax.shard_map` with q, k, v sharded along the sequence axis in
  contiguous chunks, in the axis order (device i holds tokens
  [i T_local, (i + 1) T_local)) of the `layout`'s token order.

  Args:
    query: [B, T_local, N, H]; key, value: [B, S_local, K, H] (K divides N);
      causal attention needs T_local == S_local.
    axis_name: the mesh axis the sequence is sharded over.
    is_causal: causal over the global positions; chunks in the future are
      skipped.
    layout: "contiguous" (the tokens in order) or "zigzag" (the tokens
      permuted by `to_zigzag(x, num_shards)`: causal work is then the same on
      every device; T_local must be even).
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
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  if layout == "zigzag" and dims["T"] % 2:
    raise ValueError(f"the zigzag layout holds two chunks per device: "
                     f"T_local must be even, got {dims['T']}")
  scale = validation.check_scale(scale, dims["H"])
  implementation, interpret = backends.resolve(
      implementation, interpret, dtype=query.dtype, head_dim=dims["H"],
      seq_len_q=dims["T"])
  options = _Options(axis_name, is_causal, layout, scale, implementation,
                     interpret)
  return _ring(query, key, value, options)


def ring_attention_fn(mesh, axis_name: str, *, batch_axes=None,
                      layout: str = "contiguous", implementation=None,
                      interpret=None):
  """An `attention_fn(query, key, value, mask=None, is_causal=False)` that
  runs `ring_attention` over `mesh`'s `axis_name` (e.g. for
  `fa2_jax.nn.MultiHeadAttention(attention_fn=...)` in a context-parallel
  model): q, k, v [B, T, N, H] are split along T over `axis_name` (and along
  B over `batch_axes`, if given) by a `jax.shard_map`.
  """
  spec = jax.sharding.PartitionSpec(batch_axes, axis_name)

  def attention_fn(query, key, value, mask=None, is_causal=False, **kwargs):
    if mask is not None or kwargs:
      unsupported = ["mask"] * (mask is not None) + sorted(kwargs)
      raise NotImplementedError(f"ring_attention_fn supports no "
                                f"{', '.join(unsupported)}")
    ring = functools.partial(ring_attention, axis_name=axis_name,
                             is_causal=is_causal, layout=layout,
                             implementation=implementation,
                             interpret=interpret)
    # Pallas kernels are not typed for shard_map's varying-axes checks.
    return jax.shard_map(ring, mesh=mesh, in_specs=spec, out_specs=spec,
                         check_vma=False)(query, key, value)

  return attention_fn
