"""flash_attention under jit on batch/head-sharded inputs, 4 forced CPU
devices, checked against one device.

Run by tests/test_sharding.py in a subprocess (XLA_FLAGS must be set before
JAX starts). Prints one JSON line per case.
"""
import json
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import fa2_jax  # noqa: E402

B, T, N, H = 4, 40, 4, 32
COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "all-reduce",
               "reduce-scatter")


def _case(name, mesh_shape, axes, q_spec, kv_spec, kv_heads, **kwargs):
  return dict(name=name, mesh_shape=mesh_shape, axes=axes, q_spec=q_spec,
              kv_spec=kv_spec, kv_heads=kv_heads, kwargs=kwargs)


CASES = [
    # GQA, batch over dp and heads over tp: k/v heads split with q's.
    _case("batch+heads gqa causal", (2, 2), ("dp", "tp"),
          P("dp", None, "tp"), P("dp", None, "tp"), 2, is_causal=True),
    # Every variant that indexes batch or heads: segments, ALiBi, a
    # per-(batch, head) bias, and dropout, whose stream hashes both.
    _case("batch+heads variants", (2, 2), ("dp", "tp"),
          P("dp", None, "tp"), P("dp", None, "tp"), 2, is_causal=True,
          segments=True, alibi=True, bias=(B, N), dropout_rate=0.2),
    # Batch only, 4 ways; a bias broadcast over batch (its grad sums over dp).
    _case("batch only, shared bias", (4,), ("dp",), P("dp"), P("dp"), 4,
          bias=(1, N)),
    # MQA: one kv head for all; heads over tp leave k/v replicated.
    _case("heads mqa", (2, 2), ("dp", "tp"), P("dp", None, "tp"),
          P("dp", None, None), 1, is_causal=True, dropout_rate=0.1),
    # Sharded along the sequence: not what the kernels split (that is
    # ring_attention), so it is gathered, and still right.
    _case("sequence sharded", (4,), ("sp",), P(None, "sp"), P(None, "sp"), 2,
          is_causal=True),
]


def _inputs(kv_heads, case_kwargs):
  ks = jax.random.split(jax.random.key(0), 6)
  q = jax.random.normal(ks[0], (B, T, N, H))
  k = jax.random.normal(ks[1], (B, T, kv_heads, H))
  v = jax.random.normal(ks[2], (B, T, kv_heads, H))
  do = jax.random.normal(ks[3], q.shape)
  bias = None
  if case_kwargs.get("bias"):
    bias = jax.random.normal(ks[4], (*case_kwargs["bias"], T, T))
  return q, k, v, do, bias


def _attention_kwargs(case_kwargs):
  kw = dict(is_causal=case_kwargs.get("is_causal", False))
  if case_kwargs.get("segments"):
    ids = jnp.repeat(jnp.arange(4, dtype=jnp.int32), T // 4)
    kw.update(q_segment_ids=jnp.tile(ids, (B, 1)),
              kv_segment_ids=jnp.tile(ids, (B, 1)))
  if case_kwargs.get("alibi"):
    kw.update(alibi_slopes=jnp.linspace(0.1, 0.4, B * N).reshape(B, N))
  if case_kwargs.get("dropout_rate"):
    kw.update(dropout_rate=case_kwargs["dropout_rate"],
              dropout_rng=jax.random.key(7))
  return kw


def run(case, axis_type):
  mesh = jax.make_mesh(case["mesh_shape"], case["axes"],
                       axis_types=(axis_type,) * len(case["axes"]))
  q, k, v, do, bias = _inputs(case["kv_heads"], case["kwargs"])
  kw = _attention_kwargs(case["kwargs"])

  def step(q, k, v, do, bias, implementation, interpret=None):
    def attend(q, k, v, bias):
      return fa2_jax.flash_attention(q, k, v, bias=bias,
                                     implementation=implementation,
                                     interpret=interpret, **kw)
    out, pullback = jax.vjp(attend, q, k, v, bias)
    return out, pullback(do)

  q_sh = NamedSharding(mesh, case["q_spec"])
  kv_sh = NamedSharding(mesh, case["kv_spec"])
  bias_spec = P()
  if bias is not None and bias.shape[0] == B:
    bias_spec = P("dp", "tp") if "tp" in case["axes"] else P("dp")
  args = (jax.device_put(q, q_sh), jax.device_put(k, kv_sh),
          jax.device_put(v, kv_sh), jax.device_put(do, q_sh),
          None if bias is None
          else jax.device_put(bias, NamedSharding(mesh, bias_spec)))
  sharded = jax.jit(lambda *a: step(*a, "triton", True))
  out, grads = sharded(*args)
  hlo = sharded.lower(*args).compile().as_text()
  # The same kernels on one device (same dropout bits), and the reference.
  one = jax.jit(lambda *a: step(*a, "triton", True))(q, k, v, do, bias)
  with jax.default_matmul_precision("highest"):
    ref = jax.jit(lambda *a: step(*a, "xla"))(q, k, v, do, bias)
  flat = lambda o, g: [o, *(x for x in g if x is not None)]
  got, one, ref = flat(out, grads), flat(*one), flat(*ref)
  err = lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
  return dict(
      name=case["name"], axis_type=axis_type.name,
      vs_one_device=[err(a, b) for a, b in zip(got, one)],
      vs_reference=[err(a, b) for a, b in zip(got, ref)],
      scale=[float(np.max(np.abs(np.asarray(x)))) for x in ref],
      out_spec=str(out.sharding.spec), q_spec=str(q_sh.spec),
      dq_spec=str(grads[0].sharding.spec), dk_spec=str(grads[1].sharding.spec),
      kv_spec=str(kv_sh.spec),
      collectives={c: hlo.count(c + "(") + hlo.count(c + "-start(")
                   for c in COLLECTIVES})


def main():
  for axis_type in (jax.sharding.AxisType.Explicit,
                    jax.sharding.AxisType.Auto):
    for case in CASES:
      print(json.dumps(run(case, axis_type)), flush=True)


if __name__ == "__main__":
  main()
