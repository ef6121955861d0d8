"""Scale-out on the visible GPUs (issue 7): ring attention's weak scaling and
batch/head-sharded flash_attention, in one run.

    python benchmarks/scaling.py --output scaling.json

1. Ring attention: for each T_local tokens per GPU, plain flash_attention at
   T_local on one GPU against `ring_attention` at D x T_local over the D GPUs
   (bf16, batch 1, 16 heads of 128: hidden 2048), fwd and fwd+bwd, causal
   (zig-zag and contiguous layouts) and not. Attention is quadratic: the ring
   does D^2 times the work on D times the GPUs, so its efficiency is per-GPU
   TFLOP/s (FA2 FLOP count) on D GPUs over TFLOP/s on one (= D t_one / t_ring
   here); 100% is perfect weak scaling.
2. Sharded flash_attention on real GPUs: q, k, v sharded over batch and heads
   (GQA) give the one-device result, and the compiled program holds no
   collective.
"""
import argparse
import functools
import json
import sys

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

import fa2_jax
from fa2_jax.bench import timing

HEADS, HEAD_DIM = 16, 128


def ring_fn(mesh, *, is_causal, layout):
  return jax.shard_map(
      functools.partial(fa2_jax.ring_attention, axis_name="sp",
                        is_causal=is_causal, layout=layout,
                        implementation="triton"),
      mesh=mesh, in_specs=P(None, "sp"), out_specs=P(None, "sp"),
      check_vma=False)


def time_fn(fn, pass_, seq_len, sharding, calls, trials):
  arg_sets, step = [], None
  for seed in range(timing.ROTATIONS):
    q, k, v, do = timing.inputs(1, seq_len, HEADS, HEAD_DIM, jnp.bfloat16,
                                seed=seed)
    q, k, v, do = (jax.device_put(x, sharding) for x in (q, k, v, do))
    step, args = timing.step_and_args(fn, pass_, q, k, v, do)
    arg_sets.append(args)
  return timing.time_calls(step, arg_sets, calls=calls, trials=trials)


def ring_rows(local_lens, calls, trials):
  devices = jax.device_count()
  mesh = jax.make_mesh((devices,), ("sp",),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  one = NamedSharding(jax.make_mesh((1,), ("sp",), devices=jax.devices()[:1]),
                      P())
  rows = []
  for t_local in local_lens:
    for is_causal, layout in ((False, "contiguous"), (True, "zigzag"),
                              (True, "contiguous")):
      for pass_ in ("fwd", "fwd+bwd"):
        single = functools.partial(fa2_jax.flash_attention,
                                   is_causal=is_causal,
                                   implementation="triton")
        t_one = time_fn(single, pass_, t_local, one, calls, trials)
        t_ring = time_fn(ring_fn(mesh, is_causal=is_causal, layout=layout),
                         pass_, devices * t_local,
                         NamedSharding(mesh, P(None, "sp")), calls, trials)
        flops = lambda t: timing.flops(1, t, HEADS, HEAD_DIM,
                                       is_causal=is_causal, pass_=pass_)
        row = dict(kind="ring", tokens_per_gpu=t_local, devices=devices,
                   causal=is_causal, layout=layout, pass_=pass_,
                   one_gpu_ms=t_one * 1e3, ring_ms=t_ring * 1e3,
                   one_gpu_tflops=flops(t_local) / t_one / 1e12,
                   ring_tflops_per_gpu=flops(devices * t_local) / t_ring
                   / devices / 1e12)
        row["efficiency"] = row["ring_tflops_per_gpu"] / row["one_gpu_tflops"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
  return rows


def sharded_rows():
  """Batch x heads over the GPUs (GQA 16 q / 4 kv heads), causal, fwd+bwd:
  equal to one device, and no collective in the compiled program."""
  devices = jax.device_count()
  mesh = jax.make_mesh((devices,), ("dp",))
  rows = []
  for name, spec in (("batch", P("dp")), ("heads", P(None, None, "dp"))):
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (2 * devices, 4096, 16, 128), jnp.bfloat16)
    k, v = (jax.random.normal(x, (2 * devices, 4096, 4, 128), jnp.bfloat16)
            for x in ks[1:3])
    do = jax.random.normal(ks[3], q.shape, jnp.bfloat16)

    def step(q, k, v, do):
      out, pullback = jax.vjp(functools.partial(
          fa2_jax.flash_attention, is_causal=True, implementation="triton"),
          q, k, v)
      return out, *pullback(do)
    placed = [jax.device_put(x, NamedSharding(mesh, spec))
              for x in (q, k, v, do)]
    sharded = jax.jit(step)
    got = sharded(*placed)
    want = jax.jit(step)(q, k, v, do)
    hlo = sharded.lower(*placed).compile().as_text()
    rows.append(dict(
        kind="sharded", split=name, devices=devices,
        max_abs_diff=[float(jnp.max(jnp.abs(a.astype(jnp.float32)
                                            - b.astype(jnp.float32))))
                      for a, b in zip(got, want)],
        out_spec=str(got[0].sharding.spec),
        collectives={c: hlo.count(c) for c in (
            "all-gather", "all-to-all", "collective-permute", "all-reduce")}))
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  return rows


def table(rows):
  lines = ["| tokens/GPU | causal | layout | pass | 1 GPU ms | ring ms | "
           "1 GPU TFLOP/s | ring TFLOP/s/GPU | efficiency |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r["kind"] == "ring":
      lines.append(
          f"| {r['tokens_per_gpu'] // 1024}k | {r['causal']} | {r['layout']} "
          f"| {r['pass_']} | {r['one_gpu_ms']:.1f} | {r['ring_ms']:.1f} | "
          f"{r['one_gpu_tflops']:.0f} | {r['ring_tflops_per_gpu']:.0f} | "
          f"{100 * r['efficiency']:.0f}% |")
  return "\n".join(lines)


def figure(rows, path, title=""):
  """Weak-scaling efficiency bars per case (scaling.png)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  ring = [r for r in rows if r["kind"] == "ring"]
  labels = [f"{r['tokens_per_gpu'] // 1024}k/GPU\n"
            f"{('causal ' + {'zigzag': 'zig-zag', 'contiguous': 'in order'}[r['layout']]) if r['causal'] else 'non-causal'}\n"
            f"{r['pass_']}" for r in ring]
  fig, ax = plt.subplots(figsize=(max(6, 0.95 * len(ring)), 3.8))
  colors = ["tab:gray" if r["causal"] and r["layout"] == "contiguous"
            else "tab:orange" for r in ring]
  ax.bar(range(len(ring)), [100 * r["efficiency"] for r in ring],
         color=colors)
  ax.axhline(90, color="black", lw=0.8, ls="--")
  ax.set_xticks(range(len(ring)))
  ax.set_xticklabels(labels, fontsize=6)
  ax.set_ylabel("ring efficiency (% of 1-GPU TFLOP/s)")
  ax.set_ylim(0, 105)
  ax.set_title(f"ring attention weak scaling {title}".strip(), fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", default="scaling.json")
  parser.add_argument("--tokens-per-gpu", default="32768,65536")
  parser.add_argument("--calls", type=int, default=3)
  parser.add_argument("--trials", type=int, default=3)
  parser.add_argument("--plot", metavar="RESULTS_JSON", default=None,
                      help="only redraw scaling.png next to RESULTS_JSON")
  args = parser.parse_args()
  if args.plot:
    with open(args.plot) as f:
      results = json.load(f)
    env = results["environment"]
    print(figure(results["rows"], args.plot.replace(".json", ".png"),
                 f"({env['devices']}x {env['device']})"))
    print(table(results["rows"]))
    return results["rows"]
  if jax.device_count() < 2:
    sys.exit(f"needs 2+ devices, found {jax.device_count()}")
  rows = sharded_rows()
  rows += ring_rows([int(t) for t in args.tokens_per_gpu.split(",")],
                    args.calls, args.trials)
  env = dict(device=jax.devices()[0].device_kind, devices=jax.device_count(),
             jax=jax.__version__, fa2_jax=fa2_jax.__version__)
  with open(args.output, "w") as f:
    json.dump(dict(environment=env, rows=rows), f, indent=1)
  figure(rows, args.output.replace(".json", "") + ".png",
         f"({env['devices']}x {env['device']})")
  print(table(rows))
  return rows


if __name__ == "__main__":
  main()
