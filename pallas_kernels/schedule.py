"""Static schedules: which work items each CTA of a persistent kernel runs.

A persistent Hopper kernel runs one CTA per SM, each looping over a list of
work items fixed when the kernel is traced (Pallas Mosaic GPU has no atomic
fetch-and-add with which CTAs could take the next item as they finish).
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
"""

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


def makespan(lists, costs) -> int:
  """The busiest CTA's summed costs."""
  return max(sum(costs[i] for i in items) for items in lists)


def _rebalance(lists, costs):
  """The local search of step 2, in place."""
  loads = [sum(costs[i] for i in items) for items in lists]
  # Per CTA, cost -> its items of that cost (candidates are one per cost).
  by_cost = [{} for _ in lists]
  for cta, items in enumerate(lists):
    for i in items:
      by_cost[cta].setdefault(costs[i], []).append(i)

  def move(item, src, dst):
    lists[src].remove(item)
    lists[dst].append(item)
    lists[dst].sort()
    loads[src] -= costs[item]
    loads[dst] += costs[item]
    same = by_cost[src][costs[item]]
    same.remove(item)
    if not same:
      del by_cost[src][costs[item]]
    by_cost[dst].setdefault(costs[item], []).append(item)

  while True:
    busiest = max(range(len(lists)), key=loads.__getitem__)
    top = loads[busiest]
    best = None  # (the pair's new max, other CTA, cost out, cost in)
    for other, load in enumerate(loads):
      for out_cost in by_cost[busiest]:
        for in_cost in by_cost[other]:
          if in_cost < out_cost:
            pair = max(top - out_cost + in_cost, load + out_cost - in_cost)
            if pair < top and (best is None or pair < best[0]):
              best = (pair, other, out_cost, in_cost)
    if best is None:
      return lists
    _, other, out_cost, in_cost = best
    move(by_cost[other][in_cost][-1], other, busiest)
    move(by_cost[busiest][out_cost][-1], busiest, other)


def balanced(costs, num_ctas: int) -> tuple:
  """Each CTA's items (indices into costs, in order): a tuple of num_ctas
  tuples, every item in exactly one, costed with `TILE_FIXED_COST`."""
  costs = [c + TILE_FIXED_COST for c in costs]
  lists = _rebalance(snake(len(costs), num_ctas), costs)
  return tuple(tuple(items) for items in lists)
