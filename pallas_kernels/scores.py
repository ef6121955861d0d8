"""How raw scores q.k become logits, in one place for the kernels and the
reference: logits = scale * q.k, then the soft cap (Gemma 2)
cap * tanh(logits / cap) when one is set."""
import dataclasses
import math

import jax.numpy as jnp

LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScoreRule:
  """Logits from raw scores; hashable, so usable as a static.

  Attributes:
    scale: multiplies q.k.
    soft_cap: None, or cap > 0 for logits = cap * tanh(scale q.k / cap).
  """
  scale: float
  soft_cap: float | None = None

  def logits(self, qk):
    """Natural-log logits from raw float32 scores (the reference's form)."""
    x = qk * self.scale
    if self.soft_cap is not None:
      x = self.soft_cap * jnp.tanh(x / self.soft_cap)
    return x

  def logits_log2(self, qk):
    """(logits * log2 e, tanh term or None): the kernels' base-2 form.

    Without a cap the scale folds into one multiply. The tanh term is what
    `through_cap` needs in the backward.
    """
    if self.soft_cap is None:
      return qk * (self.scale * LOG2E), None
    t = jnp.tanh(qk * (self.scale / self.soft_cap))
    return t * (self.soft_cap * LOG2E), t

  def through_cap(self, ds, t):
    """dL/d(scale q.k) from dL/d(logits): d cap tanh(x / cap)/dx = 1 - t^2."""
    return ds if t is None else ds * (1.0 - t * t)
