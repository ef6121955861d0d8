"""Batch and head sharding of the kernel launches under `jax.jit`.

A Pallas kernel is an opaque custom call to XLA's SPMD partitioner, which
would gather q, k and v onto every device before it. Each launch (forward,
backward, dS for the bias gradient) is therefore a `custom_partitioning`:

* its Shardy rule says which axes are batch (`b`) and heads, with a query
  head `n = kv * G + g` written as the compound factor `(k g)`, so a head
  sharding propagates between q, k/v, O, LSE and the gradients; sequence and
  head_dim axes must stay replicated (sequence sharding is `ring_attention`);
* its `partition` callback runs the kernel on each device's shard. Heads are
  sharded over D devices when N % D == 0: k/v along with q when K % D == 0
  (the usual GQA case); otherwise, when each shard's query heads share one
  kv head (G % (N / D) == 0, e.g. MQA), k/v stay replicated and every shard
  slices its kv head; the dK/dV of a shared kv head are then summed over the
  head axes (a gradient all-reduce, as for any replicated parameter). Any
  other layout is gathered to what the kernels can run.

Dropout hashes (batch, head) into its stream: a shard offsets its seed by its
first global batch and head, so every shard draws the bits it draws
unsharded. A launch is also a `custom_vmap` (custom_partitioning has no
batching rule): a vmapped axis folds into the batch axis, or, when it cannot
(a batched seed, per-head dropout), runs as a `lax.map`.
"""
import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

# Axis roles: batch, query heads, kv heads, the dropout seeds, anything else.
BATCH, HEADS, KV_HEADS, SEEDS = "b", "n", "kv", "seeds"

# Roles of every named array the launches take or return, from its shape.
_LIKE_Q = (BATCH, None, HEADS, None)     # q, do, out, dq  [B, T, N, H]
_LIKE_K = (BATCH, None, KV_HEADS, None)  # k, v, dk, dv    [B, S, K, H]
_ROLES = dict(q=_LIKE_Q, do=_LIKE_Q, out=_LIKE_Q, dq=_LIKE_Q,
              k=_LIKE_K, v=_LIKE_K, dk=_LIKE_K, dv=_LIKE_K,
              lse=(BATCH, HEADS, None), delta=(BATCH, HEADS, None),
              scores=(BATCH, HEADS, None, None),
              q_segments=(BATCH, None), kv_segments=(BATCH, None),
              alibi_slopes=(BATCH, HEADS), seeds=(SEEDS,),
              bias=(BATCH, HEADS, None, None),
              mask_array=(BATCH, HEADS, None, None))


def _roles(name, shape, batch, heads):
  """The roles of one array; an axis broadcast (size 1) has none."""
  full = {BATCH: batch, HEADS: heads}
  return tuple(None if role in full and size != full[role] else role
               for role, size in zip(_ROLES[name], shape))


@dataclasses.dataclass(frozen=True)
class Launch:
  """One kernel launch, all static (hashable).

  fn(arrays: dict name -> array, config) returns a tuple of arrays named by
  `outputs`; `names` are the present inputs, in order, with their `roles`.
  """
  fn: Callable
  config: object
  names: tuple
  roles: tuple
  outputs: tuple
  out_roles: tuple
  kv_heads: int  # K
  groups: int  # G = N // K


def launch(fn, config, arrays: dict, outputs: tuple):
  """fn(arrays, config), sharded over batch and heads under jit.

  Args:
    fn: the kernel launch (module-level, so hashable).
    config: its static configuration (`autodiff.KernelConfig`).
    arrays: name -> array or None (absent), names as in `_ROLES`; q and k
      are required.
    outputs: the names of fn's outputs, e.g. ("out", "lse").
  """
  names = tuple(n for n, x in arrays.items() if x is not None)
  batch, _, heads, _ = arrays["q"].shape
  kv_heads = arrays["k"].shape[2]
  static = Launch(
      fn=fn, config=config, names=names,
      roles=tuple(_roles(n, arrays[n].shape, batch, heads) for n in names),
      outputs=outputs,
      out_roles=tuple(_ROLES[n] for n in outputs),  # never broadcast
      kv_heads=kv_heads, groups=heads // kv_heads)
  return _entry(static)(*(arrays[n] for n in names))


def _run(static: Launch, *arrays):
  return tuple(static.fn(dict(zip(static.names, arrays)), static.config))


class _Traced:
  """A launch traced at its global shapes: its jaxpr, whose constants (the
  arrays the kernels build while tracing, e.g. a persistent kernel's
  schedule) come after the launch's arrays as operands, since
  custom_partitioning takes no function that closes over arrays. Hashed by
  identity (a static argument)."""

  def __init__(self, static: Launch, arrays):
    self.static = static
    closed = jax.make_jaxpr(functools.partial(_run, static))(*arrays)
    self.jaxpr, self.consts = closed.jaxpr, closed.consts


def _run_traced(traced: _Traced, *operands):
  """The launch on one device (no partitioning): its traced jaxpr."""
  arrays = operands[:len(traced.static.names)]
  consts = operands[len(traced.static.names):]
  return tuple(jax.core.eval_jaxpr(traced.jaxpr, consts, *arrays))


def _roles_of_operands(static: Launch, shapes) -> tuple:
  """The roles of every operand: the launch's arrays', then its hoisted
  constants' (replicated)."""
  extra = shapes[len(static.names):]
  return static.roles + tuple((None,) * len(x.shape) for x in extra)


@functools.lru_cache(maxsize=None)
def _entry(static: Launch):
  """The launch as custom_vmap(custom_partitioning(fn))."""
  partitioned = custom_partitioning(_run_traced, static_argnums=(0,))
  partitioned.def_partition(
      partition=_partition, infer_sharding_from_operands=_infer,
      sharding_rule=_sharding_rule)

  @custom_vmap
  def call(*arrays):
    mesh = _explicit_mesh(arrays)
    if mesh is not None:
      return _explicit(static, mesh, arrays)
    traced = _Traced(static, arrays)
    return partitioned(traced, *arrays, *traced.consts)

  @call.def_vmap
  def _vmap(axis_size, in_batched, *arrays):
    return _batched(static, call, axis_size, in_batched, arrays)

  return call


def _explicit_mesh(arrays):
  """The mesh of arrays typed with explicit shardings (`jax.make_mesh`'s
  default axis type), or None (auto axes, one device)."""
  for x in arrays:
    sharding = jax.typeof(x).sharding
    mesh = getattr(sharding, "mesh", None)
    if mesh is not None and not mesh.empty and any(
        t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
      return mesh
  return None


def _explicit(static: Launch, mesh, arrays):
  """Explicit shardings are in the types: the plan is known while tracing,
  and the launch is a shard_map over it. Arrays laid out otherwise (e.g.
  sharded along the sequence) are resharded to the plan first."""
  plan = _plan(static, mesh, [jax.typeof(x) for x in arrays])
  in_specs = tuple(plan.spec(r) for r in static.roles)
  named = dict(zip(static.names, arrays))
  q_axes, k_axes = _axes_of(named["q"]), _axes_of(named["k"])
  body = functools.partial(_local, static, plan)
  outs = jax.shard_map(
      body, mesh=mesh, in_specs=in_specs,
      out_specs=tuple(plan.spec(r) for r in static.out_roles),
      # Pallas kernels (interpret mode included) are not typed for vma.
      check_vma=False)(*(_reshard(x, mesh, s)
                         for x, s in zip(arrays, in_specs)))
  # Outputs are typed like the inputs they follow, as jax.nn's would be.
  b, t, n, _ = q_axes
  like = dict(out=q_axes, dq=q_axes, dk=k_axes, dv=k_axes, lse=(b, n, t),
              scores=(b, n, t, k_axes[1]))
  return tuple(_reshard(y, mesh, P(*(a or None for a in like[name])))
               for name, y in zip(static.outputs, outs))


def _axes_of(x) -> tuple:
  """Mesh axes of each dimension of x's (explicit) sharding."""
  spec = tuple(jax.typeof(x).sharding.spec)
  return tuple(_mesh_axes(e) for e in spec) + ((),) * (x.ndim - len(spec))


def gather_axis(x, axis: int):
  """x with its `axis` replicated: an explicit sharding along it gathered,
  the other axes kept (any other x is returned as it is)."""
  axes = _axes_of(x)
  if not axes[axis]:
    return x
  mesh = getattr(x, "sharding", jax.typeof(x).sharding).mesh
  return _reshard(x, mesh, P(*[None if i == axis else (a or None)
                              for i, a in enumerate(axes)]))


def _reshard(x, mesh, spec: P):
  want = tuple(_mesh_axes(e) for e in spec) + ((),) * (x.ndim - len(spec))
  if _axes_of(x) == want:
    return x
  return jax.sharding.reshard(x, NamedSharding(mesh, spec))


def _sharding_rule(traced: _Traced, mesh, operand_types, result_types):
  """The Shardy rule: b and (k g) pass through, every other axis stays
  replicated."""
  del mesh, result_types
  static = traced.static
  kv_heads = static.kv_heads
  other = []

  def factor(role, where):
    if role == BATCH:
      return "b"
    if role == KV_HEADS:
      return "k"
    if role == HEADS:  # n = k * G + g; Shardy takes no size-1 factor in one
      return "k" if static.groups == 1 else "n" if kv_heads == 1 else "(k g)"
    other.append(f"x{len(other)}_{where}")
    return other[-1]

  def mapping(roles, prefix):
    return ", ".join(
        " ".join(factor(r, f"{prefix}{i}") for r in roles_)
        for i, roles_ in enumerate(roles))

  rule = (f"{mapping(_roles_of_operands(static, operand_types), 'i')} -> "
          f"{mapping(static.out_roles, 'o')}")
  sizes = dict(g=static.groups) if static.groups > 1 and kv_heads > 1 else {}
  return rule, dict(need_replication_factors=tuple(other), **sizes)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """How a launch is split: mesh axes over batch and heads, and whether
  each shard slices its kv head from replicated k/v."""
  batch_axes: tuple = ()
  head_axes: tuple = ()
  kv_sliced: bool = False

  def spec(self, roles) -> P:
    def axes(role):
      got = {BATCH: self.batch_axes, HEADS: self.head_axes,
             KV_HEADS: () if self.kv_sliced else self.head_axes}.get(role, ())
      return got or None
    return P(*(axes(r) for r in roles))


def _mesh_axes(entry) -> tuple:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _plan(static: Launch, mesh, arg_shapes) -> _Plan:
  """The split the kernels can run, read off q's sharding."""
  q = arg_shapes[static.names.index("q")]
  sharding = q.sharding
  if not isinstance(sharding, NamedSharding):
    return _Plan()
  spec = tuple(sharding.spec) + (None,) * (4 - len(sharding.spec))
  size = lambda axes: math.prod(mesh.shape[a] for a in axes)
  batch, _, heads, _ = q.shape
  batch_axes = _mesh_axes(spec[0])
  if batch % size(batch_axes):
    batch_axes = ()
  head_axes = _mesh_axes(spec[2])
  devices = size(head_axes)
  if devices == 1 or heads % devices:
    return _Plan(batch_axes=batch_axes)
  if static.kv_heads % devices == 0:
    return _Plan(batch_axes, head_axes)
  if static.groups % (heads // devices) == 0:
    return _Plan(batch_axes, head_axes, kv_sliced=True)
  return _Plan(batch_axes=batch_axes)


def _partition(traced: _Traced, mesh, arg_shapes, result_shape):
  """Each device runs the launch traced anew at its shard's shapes (with
  its own constants: the hoisted ones are for the global shapes)."""
  del result_shape
  static = traced.static
  plan = _plan(static, mesh, arg_shapes)
  arg_shardings = tuple(NamedSharding(mesh, plan.spec(r))
                        for r in _roles_of_operands(static, arg_shapes))
  out_shardings = tuple(NamedSharding(mesh, plan.spec(r))
                        for r in static.out_roles)
  lower = functools.partial(_local, static, plan)
  return mesh, lower, out_shardings, arg_shardings


def _infer(traced: _Traced, mesh, arg_shapes, result_shape):
  """Output shardings for the GSPMD partitioner (Shardy uses the rule)."""
  del result_shape
  static = traced.static
  plan = _plan(static, mesh, arg_shapes)
  return tuple(NamedSharding(mesh, plan.spec(r)) for r in static.out_roles)


def _local(static: Launch, plan: _Plan, *arrays):
  """The launch on one device's shard (traced with the mesh axes bound;
  operands past the launch's arrays, hoisted constants, are not used)."""
  named = dict(zip(static.names, arrays))
  local_batch, _, local_heads, _ = named["q"].shape
  dropout = static.config.dropout
  if "seeds" in named and not dropout.broadcast:
    # Global (batch, head) of this shard's first: the stream of
    # (b, n) is seed1 + b * N + n (pallas_kernels/dropout.py).
    offset = jnp.int32(0)
    if plan.batch_axes:
      offset += (lax.axis_index(plan.batch_axes) * local_batch
                 * dropout.num_heads)
    if plan.head_axes:
      offset += lax.axis_index(plan.head_axes) * local_heads
    named["seeds"] = named["seeds"].at[1].add(offset.astype(jnp.int32))
  kv_index = None
  if plan.kv_sliced:
    kv_index = lax.axis_index(plan.head_axes) * local_heads // static.groups
    for name in ("k", "v"):
      named[name] = lax.dynamic_slice_in_dim(named[name], kv_index, 1, axis=2)
  outs = static.fn(named, static.config)
  if kv_index is None:
    return tuple(outs)
  placed = []
  for name, out in zip(static.outputs, outs):
    if name in ("dk", "dv"):  # shared kv head: sum over the sharing shards
      full = jnp.zeros(out.shape[:2] + (static.kv_heads,) + out.shape[3:],
                       jnp.float32)
      full = lax.dynamic_update_slice_in_dim(full, out.astype(jnp.float32),
                                             kv_index, axis=2)
      out = lax.psum(full, plan.head_axes).astype(out.dtype)
    placed.append(out)
  return tuple(placed)


def _batched(static: Launch, call, axis_size, in_batched, arrays):
  """vmap of a launch: fold the vmapped axis into the batch axis when that
  is the same computation, else a sequential map."""
  per_head_dropout = ("seeds" in static.names
                      and not static.config.dropout.broadcast)
  foldable = not per_head_dropout and all(
      roles[0] == BATCH for roles, b in zip(static.roles, in_batched) if b)
  if foldable:
    folded = []
    for x, roles, b in zip(arrays, static.roles, in_batched):
      if roles[0] == BATCH:
        x = x if b else jnp.broadcast_to(x, (axis_size, *x.shape))
        x = x.reshape(axis_size * x.shape[1], *x.shape[2:])
      folded.append(x)
    outs = call(*folded)
    outs = tuple(y.reshape(axis_size, y.shape[0] // axis_size, *y.shape[1:])
                 for y in outs)
  else:
    def one(sliced):
      it = iter(sliced)
      return call(*(next(it) if b else x for x, b in zip(arrays, in_batched)))
    outs = lax.map(one, [x for x, b in zip(arrays, in_batched) if b])
  return outs, tuple(True for _ in outs)
