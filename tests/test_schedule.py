"""The static schedules of the persistent Hopper kernels
(`pallas_kernels.schedule`): pure Python, no GPU."""
import numpy as np
import pytest

from pallas_kernels import schedule


def makespan(lists, costs) -> int:
  """The busiest CTA's summed costs."""
  return max(sum(costs[i] for i in items) for items in lists)


def test_snake():
  """Position c of each wave, reversed on odd waves."""
  assert schedule.snake(7, 3) == [[0, 5, 6], [1, 4], [2, 3]]


def _window(num_tiles, heads):
  """A 1k window's query tiles, heaviest first per head (9 key blocks, the
  first 8 tiles fewer), as `Tiles.item_costs` lists them."""
  return [min(num_tiles - i, 9) for _ in range(heads)
          for i in range(num_tiles)]


def _causal(num_tiles, heads):
  return [num_tiles - i for _ in range(heads) for i in range(num_tiles)]


@pytest.mark.parametrize("costs,ctas,snake,busiest", [
    # 16k, head_dim 128: the mean is 166.3.
    (_window(128, 16), 132, 176, 168),
    (_window(128, 32), 132, 343, 333),  # head_dim 64: mean 332.6
    (_causal(8, 256), 132, 104, 101),  # 1k causal: mean 100.8
    (_causal(32, 64), 132, 296, 288),  # 4k causal: mean 287.0
    ([8] * 2048, 132, 160, 160),  # equal items: 16 of 10 on the busiest
])
def test_balanced_near_the_mean(costs, ctas, snake, busiest):
  fixed = [c + schedule.TILE_FIXED_COST for c in costs]
  assert makespan(schedule.snake(len(costs), ctas), fixed) == snake
  assert makespan(schedule.balanced(costs, ctas), fixed) == busiest


@pytest.mark.parametrize("seed", range(5))
def test_balanced_lists(seed):
  """Random costs: every item in exactly one list, each list in the given
  order and as long as in the snake order, the busiest CTA no busier."""
  rng = np.random.default_rng(seed)
  costs = [int(c) for c in rng.integers(0, 40, size=int(rng.integers(1, 600)))]
  ctas = int(rng.integers(1, 140))
  lists = schedule.balanced(costs, ctas)
  snake = schedule.snake(len(costs), ctas)
  assert sorted(i for items in lists for i in items) == list(range(len(costs)))
  assert all(list(items) == sorted(items) for items in lists)
  assert list(map(len, lists)) == list(map(len, snake))
  fixed = [c + schedule.TILE_FIXED_COST for c in costs]
  assert makespan(lists, fixed) <= makespan(snake, fixed)


@pytest.mark.parametrize("items,ctas,tail", [(600, 132, 30), (140, 132, 8),
                                             (50, 7, 0), (20, 3, 17)])
def test_with_tail(items, ctas, tail):
  """The first items balanced over ctas lists, then each tail item alone,
  in order: every item exactly once."""
  costs = [(7 * i) % 10 for i in range(items)]
  lists = schedule.with_tail(costs, ctas, tail)
  assert lists[:ctas] == schedule.balanced(costs[:items - tail], ctas)
  assert lists[ctas:] == tuple((i,) for i in range(items - tail, items))
  assert sorted(i for items_ in lists for i in items_) == list(range(items))


def test_with_tail_leaves_every_cta_an_item():
  with pytest.raises(ValueError, match=r"tail must be in \[0, 8\].*got 9"):
    schedule.with_tail([1] * 140, 132, 9)
