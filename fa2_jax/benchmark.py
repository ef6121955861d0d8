"""Attention throughput on the GPU: fa2-jax against jax.nn.dot_product_attention.

    python -m fa2_jax.benchmark --output results.json

Shapes as in the FlashAttention-2 paper: 16k tokens (batch x seqlen) at hidden
size 2048 (heads = 2048 / head_dim), bf16, q/k/v [B, T, N, H]. FLOPs as in the
paper: forward 4 B N T S H, halved when causal; forward+backward 3.5x that.
Each case is timed as the median over trials of `calls` back-to-back calls
after a warm-up. A case that fails (e.g. XLA out of memory) is recorded with
its error, not raised.
"""
import argparse
import dataclasses
import functools
import json
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import fa2_jax

TOKENS = 16384
HIDDEN = 2048


def attention_fn(name, *, is_causal, block_sizes=None, **mask_kwargs):
  """(q, k, v) -> out for an implementation name."""
  if name == "fa2-triton":
    return functools.partial(fa2_jax.flash_attention, is_causal=is_causal,
                             implementation="triton", block_sizes=block_sizes,
                             **mask_kwargs)
  if name == "fa2-mosaic":
    return functools.partial(fa2_jax.flash_attention, is_causal=is_causal,
                             implementation="mosaic")
  if name in ("cudnn", "xla"):
    if set(mask_kwargs) - {"local_window_size"}:
      raise NotImplementedError(f"{name} has no {sorted(mask_kwargs)}")
    return functools.partial(jax.nn.dot_product_attention, is_causal=is_causal,
                             implementation=name, **mask_kwargs)
  raise ValueError(f"unknown implementation {name!r}")


def flops(batch, seq_len, heads, head_dim, *, is_causal, pass_):
  """FLOPs of the FA2 paper: fwd 4 B N T^2 H (/2 causal); fwd+bwd 3.5x."""
  f = 4 * batch * heads * seq_len * seq_len * head_dim
  f = f / 2 if is_causal else f
  return f * (3.5 if pass_ == "fwd+bwd" else 1.0)


def make_step(fn, pass_):
  """A jitted step running the forward, or the forward and its pullback."""
  if pass_ == "fwd":
    return jax.jit(fn)
  def fwd_bwd(q, k, v, dout):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(dout)
  return jax.jit(fwd_bwd)


def time_step(step, args, *, calls=10, trials=5):
  """Median seconds per call over `trials` runs of `calls` back-to-back calls."""
  jax.block_until_ready(step(*args))  # compile and warm up
  jax.block_until_ready(step(*args))
  per_call = []
  for _ in range(trials):
    start = time.perf_counter()
    for _ in range(calls):
      result = step(*args)
    jax.block_until_ready(result)
    per_call.append((time.perf_counter() - start) / calls)
  return statistics.median(per_call)


def inputs(batch, seq_len, heads, head_dim, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  shape = (batch, seq_len, heads, head_dim)
  return [jax.random.normal(kk, shape, dtype) for kk in ks]


def run_case(impl, *, seq_len, head_dim, is_causal, pass_, dtype=jnp.bfloat16,
             block_sizes=None, tokens=TOKENS, hidden=HIDDEN, variant=None):
  """Times one case; returns a result row (with "error" if it failed).

  `variant` names an entry of VARIANTS (mask arguments); its TFLOP/s use the
  dense (or causal) FLOP count, so a skipped block shows up as speed.
  """
  batch, heads = max(1, tokens // seq_len), hidden // head_dim
  row = dict(impl=impl, seq_len=seq_len, head_dim=head_dim, batch=batch,
             heads=heads, causal=is_causal, pass_=pass_,
             dtype=jnp.dtype(dtype).name)
  mask_kwargs = {}
  if variant is not None:
    row["variant"] = variant
    mask_kwargs = VARIANTS[variant](batch, seq_len)
  if block_sizes is not None:
    row["block_sizes"] = dataclasses.asdict(block_sizes)
  try:
    q, k, v, dout = inputs(batch, seq_len, heads, head_dim, dtype)
    fn = attention_fn(impl, is_causal=is_causal, block_sizes=block_sizes,
                      **mask_kwargs)
    args = (q, k, v) if pass_ == "fwd" else (q, k, v, dout)
    seconds = time_step(make_step(fn, pass_), args)
    row["ms"] = seconds * 1e3
    row["tflops"] = flops(batch, seq_len, heads, head_dim, is_causal=is_causal,
                          pass_=pass_) / seconds / 1e12
  except Exception as e:  # recorded, not raised: OOM, unsupported, ...
    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
  return row


def _packed_segments(batch, seq_len, num_docs=8):
  """[B, T] ids of `num_docs` equal documents per row."""
  doc = jnp.arange(seq_len, dtype=jnp.int32) * num_docs // seq_len
  return jnp.broadcast_to(doc, (batch, seq_len))


# Mask variants for `--variants`: name -> (batch, seq_len) -> mask kwargs.
VARIANTS = {
    "window-1k": lambda b, t: dict(local_window_size=(1024, 0)),
    "packed-8docs": lambda b, t: dict(q_segment_ids=_packed_segments(b, t)),
}


def environment():
  device = jax.devices()[0]
  return dict(device=device.device_kind, platform=device.platform,
              jax=jax.__version__, fa2_jax=fa2_jax.__version__,
              python=platform.python_version())


def ratio_table(rows, baseline="cudnn"):
  """Markdown: TFLOP/s per implementation and the ratio to `baseline`."""
  impls = sorted({r["impl"] for r in rows}, key=lambda n: (n != "fa2-triton", n))
  keys = sorted({(r["seq_len"], r["head_dim"], r["causal"], r["pass_"])
                 for r in rows})
  by = {(r["impl"], r["seq_len"], r["head_dim"], r["causal"], r["pass_"]): r
        for r in rows}
  cell = lambda r: "-" if r is None or "tflops" not in r else f"{r['tflops']:.1f}"
  lines = ["| seq | head_dim | causal | pass | " + " | ".join(impls) +
           f" | fa2-triton / {baseline} |", "|---" * (len(impls) + 5) + "|"]
  for key in keys:
    cells = [cell(by.get((i, *key))) for i in impls]
    ours, base = by.get(("fa2-triton", *key)), by.get((baseline, *key))
    ratio = "-"
    if ours and base and "tflops" in ours and "tflops" in base:
      ratio = f"{ours['tflops'] / base['tflops']:.2f}"
    lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | " +
                 " | ".join(cells) + f" | {ratio} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", default="benchmark.json")
  parser.add_argument("--impls", default="fa2-triton,cudnn,xla")
  parser.add_argument("--seq-lens", default="1024,4096,16384")
  parser.add_argument("--head-dims", default="64,128")
  parser.add_argument("--passes", default="fwd,fwd+bwd")
  parser.add_argument("--variants", action="store_true",
                      help="time causal mask variants (window, packed) "
                      "against plain causal instead of the dense sweep")
  args = parser.parse_args(argv)
  rows = []
  if args.variants:
    return variant_sweep(args)
  for seq_len in map(int, args.seq_lens.split(",")):
    for head_dim in map(int, args.head_dims.split(",")):
      for is_causal in (False, True):
        for pass_ in args.passes.split(","):
          for impl in args.impls.split(","):
            row = run_case(impl, seq_len=seq_len, head_dim=head_dim,
                           is_causal=is_causal, pass_=pass_)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
  with open(args.output, "w") as f:
    json.dump(dict(environment=environment(), rows=rows), f, indent=1)
  print(ratio_table(rows))


def variant_sweep(args):
  """Causal attention with a window or packed documents vs plain causal."""
  rows = []
  for seq_len in map(int, args.seq_lens.split(",")):
    for head_dim in map(int, args.head_dims.split(",")):
      for pass_ in args.passes.split(","):
        for variant in (None, *VARIANTS):
          impls = ["fa2-triton"] + (["cudnn"] if variant in (
              None, "window-1k") else [])
          for impl in impls:
            row = run_case(impl, seq_len=seq_len, head_dim=head_dim,
                           is_causal=True, pass_=pass_, variant=variant)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
  with open(args.output, "w") as f:
    json.dump(dict(environment=environment(), rows=rows), f, indent=1)
  print("| seq | head_dim | pass | impl | variant | ms | speed-up vs causal |")
  print("|---|---|---|---|---|---|---|")
  base = {(r["impl"], r["seq_len"], r["head_dim"], r["pass_"]): r
          for r in rows if "variant" not in r and "ms" in r}
  for r in rows:
    ref = base.get((r["impl"], r["seq_len"], r["head_dim"], r["pass_"]))
    speedup = (f"{ref['ms'] / r['ms']:.1f}x" if ref and "ms" in r else "-")
    ms = f"{r['ms']:.2f}" if "ms" in r else r.get("error", "-")[:40]
    print(f"| {r['seq_len']} | {r['head_dim']} | {r['pass_']} | {r['impl']} "
          f"| {r.get('variant', 'causal')} | {ms} | {speedup} |")


if __name__ == "__main__":
  main()
