"""A/B: forward with 2 vs 3 consumer warpgroups at head_dim 64 (experiment;
branch three-consumers only). One process per variant:

  python3 exp_consumers.py 3 check out.json      # numerics, bitwise
  python3 exp_consumers.py {2,2k128,3,3s3} time out.json
  (env FA2_RING=pv / FA2_RING2=1: the ring's variants; PASSES, CASES; HD=128:
  head_dim 128, where "3" has 64-key blocks)
"""
import dataclasses, json, os, sys
import jax, jax.numpy as jnp, numpy as np
import fa2_jax
from fa2_jax.bench import timing, implementations
from pallas_kernels import mosaic_tiles as mt

variant = sys.argv[1]          # "2" (defaults), "2k128", "3", "3s3"
what = sys.argv[2]             # "check" or "time"
out_path = sys.argv[3]
HD = int(os.environ.get("HD", "64"))

def blocks_for(case_kw):
  masked = "local_window_size" in case_kw
  if variant == "2":
    return None  # defaults
  base = dataclasses.replace(mt.default_mosaic_blocks(HD, masked=True),
                             block_k=128 if HD == 64 else 64)
  if variant == "2k128":
    return base
  return dataclasses.replace(base, consumers=3,
                             stages=3 if variant == "3s3" else 2)

def check():
  rows = []
  cases = [
    dict(T=1000, S=1000, N=4, K=4, causal=True),
    dict(T=777, S=777, N=4, K=2, causal=True, local_window_size=(100, 0)),
    dict(T=1000, S=600, N=8, K=2, causal=True, causal_alignment="bottom_right"),
    dict(T=300, S=1300, N=2, K=1, causal=False),
    dict(T=2048, S=2048, N=4, K=4, causal=True, local_window_size=(1024, 0)),
    dict(T=1000, S=1000, N=2, K=2, causal=True, segments=True),
    dict(T=640, S=640, N=2, K=2, causal=False, logits_soft_cap=20.0),
  ]
  for c in cases:
    for dtype in (jnp.bfloat16, jnp.float16):
      ks = jax.random.split(jax.random.key(1), 3)
      q = jax.random.normal(ks[0], (2, c["T"], c["N"], HD), dtype)
      k = jax.random.normal(ks[1], (2, c["S"], c["K"], HD), dtype)
      v = jax.random.normal(ks[2], (2, c["S"], c["K"], HD), dtype)
      kw = dict(is_causal=c["causal"])
      for name in ("local_window_size", "causal_alignment", "logits_soft_cap"):
        if name in c: kw[name] = c[name]
      if c.get("segments"):
        seg = jnp.broadcast_to(jnp.arange(c["T"]) // 300, (2, c["T"])).astype(jnp.int32)
        kw["q_segment_ids"] = seg
      b = blocks_for(kw)
      out, lse = fa2_jax.flash_attention(q, k, v, implementation="mosaic", block_sizes=b, return_residual=True, **kw)
      ref32, lse32 = fa2_jax.flash_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), implementation="xla", return_residual=True, **kw)
      refd = fa2_jax.flash_attention(q, k, v, implementation="xla", **kw)
      err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref32)))
      base = float(jnp.max(jnp.abs(refd.astype(jnp.float32) - ref32)))
      fin = jnp.isfinite(lse32)
      lerr = float(jnp.max(jnp.where(fin, jnp.abs(lse - lse32), 0)))
      lse_inf_ok = bool(jnp.all(jnp.where(fin, True, lse == -jnp.inf)))
      rows.append(dict(case=str(c), dtype=str(jnp.dtype(dtype)), err=err, base=base, ok=err <= 2 * base + 1e-6, lse_err=lerr, lse_inf_ok=lse_inf_ok, mean_abs=float(jnp.mean(jnp.abs(ref32)))))
      print(rows[-1], flush=True)
  # bitwise repeatable
  q = jax.random.normal(jax.random.key(3), (1, 4096, 2048 // HD, HD), jnp.bfloat16)
  f = jax.jit(lambda q: fa2_jax.flash_attention(q, q, q, implementation="mosaic", is_causal=True, block_sizes=blocks_for({})))
  a, b2 = f(q), f(q)
  rows.append(dict(case="bitwise", ok=bool(jnp.all(a == b2))))
  print(rows[-1])
  return rows

CASES = {
  "window16k": (16384, True, dict(local_window_size=(1024, 0))),
  "causal16k": (16384, True, {}),
  "full16k": (16384, False, {}),
  "causal4k": (4096, True, {}),
  "full4k": (4096, False, {}),
  "causal1k": (1024, True, {}),
  "full1k": (1024, False, {}),
}

def time_all():
  rows = []
  passes = os.environ.get("PASSES", "fwd").split(",")
  names = os.environ.get("CASES", ",".join(CASES)).split(",")
  for name in names:
    T, causal, kw = CASES[name]
    for pass_ in passes:
      if pass_ == "fwd+bwd" and name != "window16k" and name != "causal16k":
        continue
      b = blocks_for(kw)
      fn = implementations.attention_fn("fa2-mosaic", is_causal=causal, block_sizes=b, **kw)
      batch, heads = 16384 // T, 2048 // HD
      s = timing.time_case(fn, pass_, batch=batch, seq_len=T, heads=heads, head_dim=HD, dtype=jnp.bfloat16)
      tf = timing.flops(batch, T, heads, HD, is_causal=causal, pass_=pass_) / s / 1e12
      rows.append(dict(variant=variant, head_dim=HD, ring=os.environ.get("FA2_RING", "pvqk"), ring2=os.environ.get("FA2_RING2"), case=name, pass_=pass_, ms=s * 1e3, tflops=tf))
      print(rows[-1], flush=True)
      json.dump(rows, open(out_path, "w"), indent=1)  # kept if cut short
  return rows

rows = check() if what == "check" else time_all()
json.dump(rows, open(out_path, "w"), indent=1)
