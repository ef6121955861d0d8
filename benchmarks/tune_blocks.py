"""Sweeps BlockSizes candidates for the Triton kernels on the GPU.

    python benchmarks/tune_blocks.py --output tune.json

Forward candidates are timed on the forward pass, backward candidates on
forward+backward with the default forward tiles. Prints the best per case.
"""
import argparse
import dataclasses
import json
import sys

import jax.numpy as jnp

import fa2_jax
from fa2_jax import benchmark

FWD = [  # block_q, block_k, num_warps, num_stages
    (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 4, 2),
    (64, 64, 4, 3), (128, 32, 4, 4), (64, 128, 4, 3),
    # two CTAs per SM at head_dim 128 (<= ~110 KiB shared memory each)
    (128, 64, 8, 2), (64, 64, 4, 4), (64, 64, 4, 2), (64, 32, 4, 4),
    (64, 128, 4, 2), (64, 64, 8, 3),
]
BWD = [  # block_q_dkv, block_k_dkv, block_q_dq, block_k_dq, warps, stages
    (64, 128, 128, 64, 8, 2), (32, 128, 128, 32, 4, 3), (64, 64, 64, 64, 4, 3),
    (32, 64, 64, 32, 4, 2), (64, 128, 128, 64, 4, 2), (128, 128, 128, 128, 8, 2),
    (32, 128, 128, 32, 8, 2), (64, 128, 128, 64, 8, 3),
    (64, 64, 64, 64, 4, 2), (32, 64, 64, 32, 4, 3), (64, 64, 64, 64, 8, 2),
    (64, 128, 128, 64, 4, 3),
]

# head_dim 256: a [64, 256] bf16 tile is 32 KiB, and the dK/dV accumulators
# [block_k_dkv, 256] f32 live in registers.
FWD_256 = [
    (64, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (64, 32, 4, 3),
    (128, 32, 8, 2), (128, 64, 8, 2), (32, 64, 4, 2), (64, 64, 8, 1),
    (128, 32, 8, 3),
]
BWD_256 = [
    (32, 64, 64, 32, 8, 1), (32, 64, 64, 32, 8, 2), (32, 64, 64, 32, 4, 1),
    (32, 32, 32, 32, 4, 2), (16, 64, 64, 16, 4, 2), (32, 64, 64, 32, 4, 2),
    (64, 64, 64, 64, 8, 1), (32, 128, 128, 32, 8, 1), (16, 32, 32, 16, 4, 2),
]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--output", default="tune.json")
  parser.add_argument("--seq-len", type=int, default=4096)
  parser.add_argument("--head-dims", default="64,128")
  parser.add_argument("--variant", default=None,
                      help="a mask variant of fa2_jax.benchmark.VARIANTS "
                      "(causal only), e.g. window-1k")
  args = parser.parse_args()
  rows = []
  for head_dim in map(int, args.head_dims.split(",")):
    base = fa2_jax.default_block_sizes(head_dim, jnp.bfloat16)
    for is_causal in (True,) if args.variant else (False, True):
      wide = head_dim > 128
      for pass_, cands in (("fwd", FWD_256 if wide else FWD),
                           ("fwd+bwd", BWD_256 if wide else BWD)):
        for cand in cands:
          if pass_ == "fwd":
            bs = dataclasses.replace(base, block_q=cand[0], block_k=cand[1],
                                     num_warps=cand[2], num_stages=cand[3])
          else:
            bs = dataclasses.replace(
                base, block_q_dkv=cand[0], block_k_dkv=cand[1],
                block_q_dq=cand[2], block_k_dq=cand[3], num_warps_bwd=cand[4],
                num_stages_bwd=cand[5])
          row = benchmark.run_case("fa2-triton", seq_len=args.seq_len,
                                   head_dim=head_dim, is_causal=is_causal,
                                   pass_=pass_, block_sizes=bs,
                                   variant=args.variant)
          row["candidate"] = cand
          rows.append(row)
          print(json.dumps(row), file=sys.stderr, flush=True)
  with open(args.output, "w") as f:
    json.dump(rows, f, indent=1)
  best = {}
  for r in rows:
    key = (r["head_dim"], r["causal"], r["pass_"])
    if "tflops" in r and r["tflops"] > best.get(key, (0,))[0]:
      best[key] = (r["tflops"], r["candidate"])
  for key, (tf, cand) in sorted(best.items()):
    print(key, f"{tf:.1f}", cand)


if __name__ == "__main__":
  main()
