"""Static schedules: which work items each CTA of a persistent kernel runs.

A persistent Hopper kernel runs one CTA per SM, each looping over a list of
work items fixed when the kernel is traced. (CTAs that claim the next item
with an atomic add as they finish, through inline PTX, were measured slower
in 6 of 8 forward shapes and no steadier: benchmarks/NOTES.md item 41.)
`balanced` builds those lists from the items' costs:

1. the snake order: CTA c takes position c of every wave of `num_ctas`
   items, reversed on odd waves, so that waves of heavy and light items
   even out, and items that read the same K and V run together;
2. then, while it shortens the busiest CTA, an item of the busiest CTA
   swaps with a cheaper one of another CTA (a local search). Every CTA keeps
   its number of items, so a wrong guess of a tile's fixed cost
   (`TILE_FIXED_COST`) cannot pile short tiles onto a few CTAs.

Where the item count does not divide evenly, step 2 gives the CTAs with one
more item the cheapest ones: a 1k window at 16k tokens (2048 query tiles of
at most 9 key blocks, 132 CTAs) had its busiest CTA 6% past the mean in the
snake order and 1% with the swaps.

Each CTA runs its items in the given order. Costs are Python ints (blocks a
tile visits); every item also pays `TILE_FIXED_COST`.

A static schedule balances the cost model, not the SMs: on an H100 the
window's dK/dV kernel ran 6% longer on its slowest SMs than on average, the
same SMs from run to run (benchmarks/NOTES.md item 61). `with_tail` leaves
the last items to single-item CTAs launched after the persistent ones, so
that the SMs that finish first take them.
"""
import bisect
import functools

# What a tile costs beside its blocks, in blocks: its start (the ping-pong's
# ramp, the first loads) and end (the output's rescale and store). Measured
# at head_dim 128: 1.56 us per key block plus about 3.1 us per query tile
# (benchmarks/NOTES.md item 36).
TILE_FIXED_COST = 2


def snake(num_items: int, num_ctas: int) -> list:
  """CTA c takes position c of every wave of num_ctas items, reversed on
  odd waves: [num_ctas] lists of item indices, ascending."""
  lists = [[] for _ in range(num_ctas)]
  for item in range(num_items):
    wave, position = divmod(item, num_ctas)
    lists[position if wave % 2 == 0 else num_ctas - 1 - position].append(item)
  return lists


def _rebalance(lists, costs):
  """The local search of step 2, in place."""
  loads = [sum(costs[i] for i in items) for items in lists]
  # Per CTA, its items' distinct costs (sorted) and cost -> those items.
  by_cost = [{} for _ in lists]
  for cta, items in enumerate(lists):
    for i in items:
      by_cost[cta].setdefault(costs[i], []).append(i)
  sorted_costs = [sorted(c) for c in by_cost]

  def move(item, src, dst):
    cost = costs[item]
    lists[src].remove(item)
    bisect.insort(lists[dst], item)
    loads[src] -= cost
    loads[dst] += cost
    by_cost[src][cost].remove(item)
    if not by_cost[src][cost]:
      del by_cost[src][cost]
      sorted_costs[src].remove(cost)
    if cost not in by_cost[dst]:
      bisect.insort(sorted_costs[dst], cost)
    by_cost[dst].setdefault(cost, []).append(item)

  while True:
    busiest = max(range(len(lists)), key=loads.__getitem__)
    top = loads[busiest]
    best = None  # (the pair's new max, other CTA, cost out, cost in)
    for other, load in enumerate(loads):
      gap = top - load  # a swap moving d = out - in, 0 < d < gap, helps
      theirs = sorted_costs[other]
      for out_cost in sorted_costs[busiest]:
        # Best: d nearest gap / 2, i.e. in_cost nearest out_cost - gap / 2.
        at = bisect.bisect_left(theirs, out_cost - gap / 2)
        for in_cost in theirs[max(at - 1, 0):at + 1]:
          if 0 < out_cost - in_cost < gap:
            pair = max(top - out_cost + in_cost, load + out_cost - in_cost)
            if best is None or pair < best[0]:
              best = (pair, other, out_cost, in_cost)
    if best is None:
      return lists
    _, other, out_cost, in_cost = best
    move(by_cost[other][in_cost][-1], other, busiest)
    move(by_cost[busiest][out_cost][-1], busiest, other)


def balanced(costs, num_ctas: int) -> tuple:
  """Each CTA's items (indices into costs, in order): a tuple of num_ctas
  tuples, every item in exactly one, costed with `TILE_FIXED_COST`.
  Planned once per (costs, num_ctas): a model's layers of one shape trace
  the same kernels, and a 16k causal plan takes ~0.8 s."""
  return _balanced(tuple(costs), num_ctas)


@functools.lru_cache(maxsize=64)
def _balanced(costs: tuple, num_ctas: int) -> tuple:
  costs = [c + TILE_FIXED_COST for c in costs]
  lists = _rebalance(snake(len(costs), num_ctas), costs)
  return tuple(tuple(items) for items in lists)


def with_tail(costs, num_ctas: int, tail: int) -> tuple:
  """`balanced` lists of the first len(costs) - tail items for num_ctas
  CTAs, then one single-item list per remaining item (in order): CTAs
  num_ctas and on, which the hardware starts on the SMs that free first."""
  if not 0 <= tail <= len(costs) - num_ctas:
    raise ValueError(f"tail must be in [0, {len(costs) - num_ctas}] (items "
                     f"past one per CTA), got {tail}")
  head = balanced(costs[:len(costs) - tail], num_ctas)
  return head + tuple((i,) for i in range(len(costs) - tail, len(costs)))
