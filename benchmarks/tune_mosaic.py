"""Times MosaicBlocks candidates of the Hopper kernels on the GPU.

    python benchmarks/tune_mosaic.py --seq-lens 4096,16384 --output t.json

Forward candidates on the forward pass, backward candidates on
forward+backward (the forward at its default tiles is the same in each).
TFLOP/s as in the FA2 paper; the ANCHORS shape (batch x seqlen = 16k tokens,
hidden 2048), bfloat16.
"""
import argparse
import dataclasses
import functools
import json

import jax.numpy as jnp

import fa2_jax
from fa2_jax.bench import timing

FWD = [  # block_q, block_k, stages, persistent
    (64, 128, 2, True), (64, 128, 2, False), (64, 128, 3, True),
    (64, 64, 2, True), (64, 64, 4, True), (64, 192, 2, True),
    (64, 256, 2, True)]
BWD = [  # block_q_dkv, block_k_dkv, dq block_k, stages, fused_dq
    (64, 64, 128, 2, False), (64, 64, 64, 2, False), (64, 64, 128, 3, False),
    (128, 64, 128, 2, False), (64, 64, 128, 2, True), (128, 64, 128, 2, True)]


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--seq-lens", default="4096,16384")
  parser.add_argument("--head-dims", default="64,128")
  parser.add_argument("--output", default=None)
  parser.add_argument("--bwd-only", action="store_true",
                      help="only the backward candidates")
  parser.add_argument("--fwd-only", action="store_true",
                      help="only the forward candidates")
  args = parser.parse_args()
  rows = []
  for seq in map(int, args.seq_lens.split(",")):
    for hd in map(int, args.head_dims.split(",")):
      batch, heads = max(1, 16384 // seq), 2048 // hd
      base = fa2_jax.default_mosaic_blocks(hd)
      cands = [] if args.bwd_only else [
          ("fwd", dataclasses.replace(base, block_q=a, block_k=b, stages=c,
                                      persistent=d))
          for a, b, c, d in FWD]
      cands += [] if args.fwd_only else [("fwd+bwd", dataclasses.replace(
          base, block_q_dkv=a, block_k_dkv=b, block_k_dq=c, stages=d,
          fused_dq=e)) for a, b, c, d, e in BWD]
      for causal in (False, True):
        for pass_, blocks in cands:
          fn = functools.partial(fa2_jax.flash_attention, is_causal=causal,
                                 implementation="mosaic", block_sizes=blocks)
          row = dict(seq=seq, head_dim=hd, causal=causal, pass_=pass_,
                     blocks=dataclasses.asdict(blocks))
          try:
            sec = timing.time_case(fn, pass_, batch=batch, seq_len=seq,
                                   heads=heads, head_dim=hd,
                                   dtype=jnp.bfloat16)
            row["tflops"] = timing.flops(batch, seq, heads, hd,
                                         is_causal=causal,
                                         pass_=pass_) / sec / 1e12
          except Exception as e:  # pylint: disable=broad-except
            row["error"] = timing.describe(e)
          rows.append(row)
          b = row["blocks"]
          print(f"{seq:6d} h{hd} {'causal' if causal else 'full  '} "
                f"{pass_:8s} q{b['block_q']} k{b['block_k']} "
                f"dq-k{b['block_k_dq']} dkv{b['block_q_dkv']}x{b['block_k_dkv']} s{b['stages']}"
                f"{' fused' if b['fused_dq'] else ''}"
                f"{'' if b['persistent'] else ' per-tile'}: "
                f"{row.get('tflops', 0):6.1f} {row.get('error', '')}",
                flush=True)
  if args.output:
    with open(args.output, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
