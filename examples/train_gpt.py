"""The main job: train a small GPT whose attention is fa2-jax, end to end.

    python examples/train_gpt.py                      # GPU: GPT-2 small shape
    python examples/train_gpt.py --config tiny        # CPU: interpret mode, <2 min
    python examples/train_gpt.py --attention cudnn    # same model, jax.nn cuDNN
    python examples/train_gpt.py --attention xla      # same model, jax.nn XLA
    python examples/train_gpt.py --parallel data      # batch over all devices
    python examples/train_gpt.py --parallel context   # sequence over all
                                                      # devices: ring attention

A decoder-only transformer (pre-LayerNorm blocks of causal
`fa2_jax.nn.MultiHeadAttention` and a GELU MLP, learned positions, tied
embeddings) learns byte-level language modelling on a real corpus that ships
with Python itself: the source of its standard library. Training is one
`nnx.jit`-compiled step with optax AdamW; batches are random crops drawn from
a fixed seed, so every `--attention` sees the same data in the same order and
their loss curves can be compared. A progress bar shows loss, tokens/s and
model TFLOP/s; the last line printed is one JSON object with the results.

`--parallel data` shards the batch over every visible device (parameters
replicated, gradients all-reduced; fa2-jax runs each device's shard of the
batch locally, fa2_jax.partitioning). `--parallel context` shards the sequence
instead: attention is `fa2_jax.ring_attention` in the zig-zag layout (tokens,
targets and positions permuted once per batch), everything else is per token.

Model FLOPs per token (fwd+bwd): 6 x parameters + 6 x layers x T x d_model
(causal attention's two matmuls, halved by the mask), as in PaLM's MFU count.
"""
import argparse
import dataclasses
import functools
import json
import os
import sys
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import fa2_jax
import fa2_jax.nn


@dataclasses.dataclass(frozen=True)
class Config:
  layers: int
  d_model: int
  heads: int
  kv_heads: int
  seq_len: int
  batch: int
  steps: int
  lr: float
  dtype: str
  corpus_bytes: int


CONFIGS = {
    # CPU, kernels in interpret mode: finishes in well under 2 minutes.
    "tiny": Config(layers=2, d_model=64, heads=4, kv_heads=2, seq_len=64,
                   batch=8, steps=150, lr=3e-3, dtype="float32",
                   corpus_bytes=1 << 20),
    # GPU: GPT-2 small's shape (124M parameters) at 2k context, bf16.
    "gpt2-small": Config(layers=12, d_model=768, heads=12, kv_heads=12,
                         seq_len=2048, batch=8, steps=300, lr=6e-4,
                         dtype="bfloat16", corpus_bytes=32 << 20),
}


def load_corpus(num_bytes: int) -> np.ndarray:
  """uint8 bytes of the standard library's .py files, in sorted path order."""
  root = sysconfig.get_paths()["stdlib"]
  chunks, total = [], 0
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames
                         if d not in ("site-packages", "test", "tests",
                                      "idlelib", "__pycache__"))
    for name in sorted(filenames):
      if name.endswith(".py"):
        with open(os.path.join(dirpath, name), "rb") as f:
          chunks.append(f.read())
        total += len(chunks[-1])
        if total >= num_bytes:
          return np.frombuffer(b"".join(chunks)[:num_bytes], np.uint8)
  return np.frombuffer(b"".join(chunks), np.uint8)


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

  def __init__(self, cfg: Config, attention: dict, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    self.ln1 = nnx.LayerNorm(cfg.d_model, dtype=dtype, rngs=rngs)
    self.attn = fa2_jax.nn.MultiHeadAttention(
        num_heads=cfg.heads, in_features=cfg.d_model,
        num_kv_heads=cfg.kv_heads, is_causal=True, dtype=dtype, rngs=rngs,
        **attention)
    self.ln2 = nnx.LayerNorm(cfg.d_model, dtype=dtype, rngs=rngs)
    self.fc = nnx.Linear(cfg.d_model, 4 * cfg.d_model, dtype=dtype, rngs=rngs)
    self.proj = nnx.Linear(4 * cfg.d_model, cfg.d_model, dtype=dtype,
                           rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.proj(jax.nn.gelu(self.fc(self.ln2(x))))


class GPT(nnx.Module):
  """Byte-level decoder: tokens [B, T] int -> logits [B, T, 256] float32."""

  def __init__(self, cfg: Config, attention: dict, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    self.embed = nnx.Embed(256, cfg.d_model, dtype=dtype, rngs=rngs)
    self.pos = nnx.Embed(cfg.seq_len, cfg.d_model, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([Block(cfg, attention, rngs)
                            for _ in range(cfg.layers)])
    self.ln_f = nnx.LayerNorm(cfg.d_model, dtype=dtype, rngs=rngs)

  def __call__(self, tokens, positions=None):
    """positions [T] int: each token's position (default 0..T-1)."""
    if positions is None:
      positions = jnp.arange(tokens.shape[1])
    x = self.embed(tokens) + self.pos(positions)
    for block in self.blocks:
      x = block(x)
    return self.embed.attend(self.ln_f(x)).astype(jnp.float32)


def attention_options(name: str, interpret: bool, mesh=None) -> dict:
  """MultiHeadAttention keywords for --attention (with a "seq" mesh: ring
  attention over it)."""
  if mesh is not None and "seq" in mesh.axis_names:
    if name != "fa2":
      raise NotImplementedError("--parallel context runs fa2-jax's ring "
                                "attention; --attention must be fa2")
    return dict(attention_fn=fa2_jax.ring_attention_fn(
        mesh, "seq", layout="zigzag",
        implementation="triton" if jax.default_backend() == "gpu"
        or interpret else "xla", interpret=interpret or None))
  if name == "fa2":
    return dict(implementation="triton" if jax.default_backend() == "gpu"
                or interpret else "xla", interpret=interpret or None)
  return dict(attention_fn=functools.partial(jax.nn.dot_product_attention,
                                             implementation=name))


def loss_fn(model, inputs, targets, positions):
  """Mean next-byte cross-entropy (nats): inputs, targets [B, T] int,
  positions [T] int."""
  logits = model(inputs, positions)
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, targets).mean()


@nnx.jit
def train_step(model, optimizer, inputs, targets, positions):
  loss, grads = nnx.value_and_grad(loss_fn)(model, inputs, targets,
                                            positions)
  optimizer.update(model, grads)
  return loss


PARALLEL = ("none", "data", "context")


def make_mesh(parallel: str):
  """None, or a 1-D mesh over every device: "data" or "seq" (auto axes)."""
  if parallel == "none":
    return None
  name = {"data": "data", "context": "seq"}[parallel]
  return jax.make_mesh((jax.device_count(),), (name,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def placed(batch, cfg: Config, mesh):
  """(inputs, targets, positions) of a [B, T + 1] batch, laid out for the
  mesh: batch-sharded ("data"), or zig-zag permuted and sequence-sharded
  ("seq")."""
  inputs, targets = batch[:, :-1], batch[:, 1:]
  positions = np.arange(cfg.seq_len, dtype=np.int32)
  if mesh is None:
    return inputs, targets, positions
  P = jax.sharding.PartitionSpec
  if "seq" in mesh.axis_names:
    shards = mesh.shape["seq"]
    inputs, targets = (fa2_jax.to_zigzag(x, shards) for x in (inputs,
                                                               targets))
    positions = fa2_jax.zigzag_indices(cfg.seq_len, shards).astype(np.int32)
    spec, pos_spec = P(None, "seq"), P("seq")
  else:
    spec, pos_spec = P("data"), P()
  put = lambda x, s: jax.device_put(x, jax.sharding.NamedSharding(mesh, s))
  return put(inputs, spec), put(targets, spec), put(positions, pos_spec)


def batches(corpus, cfg: Config, seed: int):
  """Endless [B, T + 1] random crops, the same sequence for a given seed."""
  rng = np.random.default_rng(seed)
  while True:
    starts = rng.integers(0, len(corpus) - cfg.seq_len - 1, size=cfg.batch)
    yield np.stack([corpus[s:s + cfg.seq_len + 1] for s in starts]).astype(
        np.int32)


def model_flops_per_token(cfg: Config, num_params: int) -> float:
  return 6.0 * num_params + 6.0 * cfg.layers * cfg.seq_len * cfg.d_model


class Progress:
  """tqdm when installed, else a line per logged step."""

  def __init__(self, total: int):
    try:
      from tqdm import tqdm
      self.bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True)
    except ImportError:
      self.bar = None
    self.total, self.count = total, 0

  def update(self, **stats):
    self.count += 1
    text = " ".join(f"{k}={v}" for k, v in stats.items())
    if self.bar is not None:
      self.bar.set_postfix_str(text, refresh=False)
      self.bar.update(1)
    elif stats:
      print(f"step {self.count}/{self.total} {text}", file=sys.stderr,
            flush=True)

  def close(self):
    if self.bar is not None:
      self.bar.close()


def train(cfg: Config, *, attention: str = "fa2", interpret: bool = False,
          seed: int = 0, log_every: int = 10, parallel: str = "none"):
  """Trains; returns the results dict (also the losses every `log_every`)."""
  mesh = make_mesh(parallel)
  if parallel == "data" and cfg.batch % jax.device_count():
    raise ValueError(f"--parallel data needs the batch ({cfg.batch}) "
                     f"divisible by the {jax.device_count()} devices")
  if parallel == "context" and cfg.seq_len % (2 * jax.device_count()):
    raise ValueError(f"--parallel context needs seq_len ({cfg.seq_len}) "
                     f"divisible by 2 x {jax.device_count()} devices")
  corpus = load_corpus(cfg.corpus_bytes)
  split = int(len(corpus) * 0.95)
  train_data, val_data = corpus[:split], corpus[split:]
  model = GPT(cfg, attention_options(attention, interpret, mesh),
              nnx.Rngs(params=seed))
  num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model,
                                                             nnx.Param)))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg.lr, warmup_steps=max(1, cfg.steps // 10),
      decay_steps=cfg.steps, end_value=cfg.lr / 10)
  optimizer = nnx.Optimizer(
      model, optax.chain(optax.clip_by_global_norm(1.0),
                         optax.adamw(schedule, weight_decay=0.1)),
      wrt=nnx.Param)
  if mesh is not None:  # parameters and optimizer state on every device
    state = nnx.state((model, optimizer))
    nnx.update((model, optimizer), jax.device_put(
        state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())))
  data = (placed(b, cfg, mesh) for b in batches(train_data, cfg, seed))
  tokens_per_step = cfg.batch * cfg.seq_len
  flops_per_step = model_flops_per_token(cfg, num_params) * tokens_per_step

  start = time.perf_counter()
  initial_loss = float(train_step(model, optimizer, *next(data)))  # compiles
  losses = [(0, initial_loss)]
  losses.append((1, float(train_step(model, optimizer, *next(data)))))
  compile_s = time.perf_counter() - start  # the first two steps: warm-up
  progress = Progress(cfg.steps - 2)
  timed_start, loss = time.perf_counter(), None
  for step in range(2, cfg.steps):
    loss = train_step(model, optimizer, *next(data))
    if step % log_every == 0 or step == cfg.steps - 1:
      loss = float(loss)  # waits for the step
      losses.append((step, loss))
      timed = (step - 1) / (time.perf_counter() - timed_start)  # steps/s
      progress.update(loss=f"{loss:.3f}",
                      tok_s=f"{timed * tokens_per_step:.3g}",
                      tflops=f"{timed * flops_per_step / 1e12:.3g}")
    else:
      progress.update()
  final_loss = float(loss)
  elapsed = time.perf_counter() - timed_start
  progress.close()
  val = (placed(b, cfg, mesh) for b in batches(val_data, cfg, seed + 1))
  eval_loss = nnx.jit(loss_fn)
  val_loss = float(np.mean([float(eval_loss(model, *next(val)))
                            for _ in range(4)]))
  steps_timed = cfg.steps - 2
  return dict(
      attention=attention, config=dataclasses.asdict(cfg),
      device=jax.devices()[0].device_kind, interpret=interpret,
      parallel=parallel, devices=jax.device_count() if mesh else 1,
      parameters=int(num_params), initial_loss=initial_loss,
      final_loss=final_loss, val_loss=val_loss,
      tokens_per_s=steps_timed * tokens_per_step / elapsed,
      model_tflops=steps_timed * flops_per_step / elapsed / 1e12,
      compile_s=compile_s, losses=losses)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", choices=sorted(CONFIGS), default=None,
                      help="default: gpt2-small on a GPU, tiny elsewhere")
  parser.add_argument("--attention", choices=("fa2", "cudnn", "xla"),
                      default="fa2")
  parser.add_argument("--parallel", choices=PARALLEL, default="none",
                      help="data: batch over all devices; context: sequence "
                      "over all devices (ring attention, zig-zag layout)")
  parser.add_argument("--batch", type=int, default=None,
                      help="global batch (default: the config's)")
  parser.add_argument("--seq-len", type=int, default=None)
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--output", default=None, help="also write the JSON")
  args = parser.parse_args(argv)
  on_gpu = jax.default_backend() == "gpu"
  cfg = CONFIGS[args.config or ("gpt2-small" if on_gpu else "tiny")]
  if args.steps is not None:
    if args.steps < 3:
      parser.error(f"--steps must be >= 3 (two warm-up steps), got "
                   f"{args.steps}")
    cfg = dataclasses.replace(cfg, steps=args.steps)
  for field in ("batch", "seq_len"):
    if getattr(args, field) is not None:
      cfg = dataclasses.replace(cfg, **{field: getattr(args, field)})
  result = train(cfg, attention=args.attention,
                 interpret=not on_gpu and args.attention == "fa2",
                 seed=args.seed, parallel=args.parallel)
  if not result["final_loss"] < result["initial_loss"]:
    print(f"loss did not fall: {result['initial_loss']:.3f} -> "
          f"{result['final_loss']:.3f}", file=sys.stderr)
  if args.output:
    with open(args.output, "w") as f:
      json.dump(result, f, indent=1)
  summary = {k: v for k, v in result.items() if k != "losses"}
  print(json.dumps(summary))
  return result


if __name__ == "__main__":
  main()
