"""Ring attention over 4 (forced CPU) devices equals one-device attention,
forward and backward, and moves K/V only by collective-permute."""
import pytest

import fa2_jax
from tests.workers import run_worker


@pytest.fixture(scope="module")
def ring_cases():
  return run_worker("tests/ring_worker.py", 6)


@pytest.mark.parametrize("impl", ["xla", "triton"])
@pytest.mark.parametrize("causal, layout", [
    (False, "contiguous"), (True, "contiguous"), (True, "zigzag")],
    ids=["full", "causal", "causal-zigzag"])
def test_ring_matches_one_device(ring_cases, impl, causal, layout):
  row = next(r for r in ring_cases if r["impl"] == impl
             and r["causal"] == causal and r["layout"] == layout)
  assert row["scale"] > 1e-2
  for name, err in zip(("out", "dq", "dk", "dv"), row["errors"]):
    assert err < 1e-5, f"{name}: {err}"
  assert row["unpermuted_error"] < 1e-5
  assert row["out_sharding"] == "P(None, 'sp', None, None)"
  assert row["collective_permute"]
  assert not row["all_gather"] and not row["all_to_all"]


def test_zigzag_gives_device_i_chunks_i_and_mirror():
  import numpy as np
  idx = fa2_jax.zigzag_indices(16, 2)  # 4 chunks of 4: devices get 0,3 / 1,2
  np.testing.assert_array_equal(
      idx, [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11])
  x = np.arange(2 * 24 * 3).reshape(2, 24, 3)
  np.testing.assert_array_equal(
      fa2_jax.from_zigzag(fa2_jax.to_zigzag(x, 3), 3), x)
  with pytest.raises(ValueError, match="divisible by 2 \\* num_shards = 8"):
    fa2_jax.zigzag_indices(20, 4)


def test_ring_rejects_unequal_causal_chunks():
  import jax.numpy as jnp
  q = jnp.ones((1, 8, 2, 16))
  k = jnp.ones((1, 12, 2, 16))
  with pytest.raises(ValueError, match="causal ring attention needs equal"):
    fa2_jax.ring_attention(q, k, k, axis_name="sp", is_causal=True,
                           implementation="xla")


def test_ring_rejects_bad_layouts():
  import jax.numpy as jnp
  q = jnp.ones((1, 8, 2, 16))
  with pytest.raises(ValueError, match="layout must be one of"):
    fa2_jax.ring_attention(q, q, q, axis_name="sp", layout="striped",
                           implementation="xla")
  odd = jnp.ones((1, 7, 2, 16))
  with pytest.raises(ValueError, match="T_local must be even, got 7"):
    fa2_jax.ring_attention(odd, odd, odd, axis_name="sp", layout="zigzag",
                           implementation="xla")


def test_ring_attention_fn_names_what_it_cannot_take():
  import jax
  import jax.numpy as jnp
  fn = fa2_jax.ring_attention_fn(jax.make_mesh((1,), ("sp",)), "sp")
  q = jnp.ones((1, 8, 2, 16))
  with pytest.raises(NotImplementedError, match="no mask, bias"):
    fn(q, q, q, mask=jnp.ones((8, 8), bool), bias=jnp.zeros((8, 8)))
