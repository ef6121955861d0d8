"""How raw scores q.k become logits, in one place for the kernels and the
reference: logits = scale * q.k + bias (when a bias array is given), then the
soft cap (Gemma 2) cap * tanh(logits / cap) when one is set, then ALiBi's
-slope * |p(i) - j| (p(i) the query's position, as in `mask.MaskRule`) when
slopes are given."""
import dataclasses
import math

import jax.numpy as jnp

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def lse_log2(lse):
  """The backward's base-2 LSE: lse * log2 e, and +inf for rows that see no
  key (lse -inf), so that their P = exp2(s - lse2) is 0 whatever s is."""
  return jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2E)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScoreRule:
  """Logits from raw scores; hashable, so usable as a static.

  Attributes:
    scale: multiplies q.k.
    soft_cap: None, or cap > 0 for logits = cap * tanh(x / cap), where
      x = scale q.k + bias.
    alibi: ALiBi slopes are given; offset: the queries' position offset.
    has_bias: a bias array is added to the scaled scores.
  """
  scale: float
  soft_cap: float | None = None
  alibi: bool = False
  offset: int = 0
  has_bias: bool = False

  def alibi_bias(self, slope, q_idx, k_idx):
    """-slope * |q_idx + offset - k_idx| (natural log); indices broadcast."""
    return -slope * jnp.abs(q_idx + self.offset - k_idx).astype(jnp.float32)

  def logits(self, qk, alibi_bias=None, bias=None):
    """Natural-log logits from raw float32 scores (the reference's form)."""
    x = qk * self.scale
    if bias is not None:
      x = x + bias
    if self.soft_cap is not None:
      x = self.soft_cap * jnp.tanh(x / self.soft_cap)
    if alibi_bias is not None:
      x = x + alibi_bias
    return x

  def logits_log2(self, qk, alibi_bias=None, bias=None):
    """(logits * log2 e, tanh term or None): the kernels' base-2 form.

    Without a cap the scale folds into one multiply. The tanh term is what
    `through_cap` needs in the backward. `bias` is a float32 tile.
    """
    if self.soft_cap is None:
      s, t = qk * (self.scale * LOG2E), None
      if bias is not None:
        s = s + bias * LOG2E
    else:
      if bias is None:
        t = jnp.tanh(qk * (self.scale / self.soft_cap))
      else:
        t = jnp.tanh((qk * self.scale + bias) * (1.0 / self.soft_cap))
      s = t * (self.soft_cap * LOG2E)
    if alibi_bias is not None:
      s = s + alibi_bias * LOG2E
    return s, t

  def deferred_log2(self, qk):
    """(x, c, tanh term) with logits * log2 e = x * c: without a soft cap,
    bias or ALiBi, x is the raw score and c = scale * log2 e, so that a
    kernel can fold the multiply into its exp2 argument (one FMA, x * c - m;
    max commutes with c > 0); otherwise (x, tanh term) is `logits_log2`
    and c is None (nothing left to apply)."""
    if self.soft_cap is None and not self.has_bias and not self.alibi:
      return qk, self.scale * LOG2E, None
    x, t = self.logits_log2(qk)
    return x, None, t

  def through_cap(self, ds, t):
    """dL/dx (x = scale q.k + bias) from dL/d(logits):
    d cap tanh(x / cap)/dx = 1 - t^2."""
    return ds if t is None else ds * (1.0 - t * t)
