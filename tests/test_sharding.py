"""flash_attention under jit on batch/head-sharded inputs (4 forced CPU
devices, explicit and auto mesh axes) equals one device, keeps the input
sharding, and moves no q, k, v between devices."""
import pytest

from tests.workers import run_worker

CASES = ["batch+heads gqa causal", "batch+heads variants",
         "batch only, shared bias", "heads mqa", "sequence sharded"]


@pytest.fixture(scope="module")
def sharded_cases():
  rows = run_worker("tests/sharding_worker.py", 2 * len(CASES))
  return {(r["name"], r["axis_type"]): r for r in rows}


def _spec(text):
  """'P('dp', None, 'tp')' and "P('dp', None, 'tp', None)" alike."""
  parts = [p.strip() for p in text[2:-1].split(",") if p.strip()]
  while parts and parts[-1] == "None":
    parts.pop()
  return parts


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
@pytest.mark.parametrize("name", CASES)
def test_sharded_equals_one_device(sharded_cases, name, axis_type):
  row = sharded_cases[(name, axis_type)]
  # The same kernels, the same dropout bits: equal up to summation order.
  assert max(row["vs_one_device"]) < 1e-5, row
  assert max(row["vs_reference"]) < 1e-4, row
  assert min(row["scale"]) > 0.1  # outputs and gradients are not zeros
  coll = row["collectives"]
  if name == "sequence sharded":  # not split by these kernels: gathered
    assert coll["all-gather"] > 0
    return
  assert _spec(row["out_spec"]) == _spec(row["q_spec"])
  assert _spec(row["dq_spec"]) == _spec(row["q_spec"])
  assert _spec(row["dk_spec"]) == _spec(row["kv_spec"])
  assert coll["all-gather"] == coll["all-to-all"] == 0, coll
  assert coll["collective-permute"] == coll["reduce-scatter"] == 0, coll
  # Only a gradient shared across shards is summed: a bias broadcast over
  # the sharded batch, or MQA's kv head shared by the head shards.
  shared = name in ("batch only, shared bias", "heads mqa")
  assert (coll["all-reduce"] > 0) == shared, coll
