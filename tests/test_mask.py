"""The block ranges of the mask rule against brute force over every element."""
import dataclasses
import itertools
import random

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.mask import MaskRule, segment_block_ranges


def visible_matrix(rule):
  """An independent numpy oracle of the rule's visibility, [T, S]."""
  pos = np.arange(rule.seq_len_q)[:, None] + rule.offset
  key = np.arange(rule.seq_len_k)[None, :]
  vis = np.ones((rule.seq_len_q, rule.seq_len_k), bool)
  if rule.is_causal:
    vis &= key <= pos
  if rule.window_left is not None:
    vis &= key >= pos - rule.window_left
  if rule.window_right is not None:
    vis &= key <= pos + rule.window_right
  return vis


def test_visible_matches_oracle():
  for rule in random_rules(20, seed=99):
    rows = jnp.arange(rule.seq_len_q)[:, None]
    cols = jnp.arange(rule.seq_len_k)[None, :]
    vis = np.broadcast_to(rule.visible(rows, cols),
                          (rule.seq_len_q, rule.seq_len_k))
    np.testing.assert_array_equal(vis, visible_matrix(rule))


def test_key_interval_matches_oracle():
  """Each row's visible keys by position are the interval key_interval
  gives (what the Hopper kernels compare against)."""
  for rule in random_rules(100, seed=7):
    pos = jnp.arange(rule.seq_len_q) + rule.offset
    lo, hi = (np.broadcast_to(np.asarray(b), pos.shape)
              for b in rule.key_interval(pos))
    key = np.arange(rule.seq_len_k)[None, :]
    np.testing.assert_array_equal(
        (key >= lo[:, None]) & (key <= hi[:, None]), visible_matrix(rule))


def random_rules(n, seed=0):
  rng = random.Random(seed)
  for _ in range(n):
    t, s = rng.randint(1, 90), rng.randint(1, 90)
    window = [None, rng.randint(0, 40)]
    yield MaskRule(
        seq_len_q=t, seq_len_k=s, is_causal=rng.random() < 0.6,
        offset=rng.choice([0, s - t, rng.randint(-30, 30)]),
        window_left=rng.choice(window), window_right=rng.choice(window))


@pytest.mark.parametrize("block_q,block_k", [(16, 16), (16, 32), (32, 16)])
def test_block_ranges_cover_exactly(block_q, block_k):
  for rule in random_rules(150, seed=block_q * 7 + block_k):
    vis = visible_matrix(rule)
    t, s = vis.shape
    for i in range(-(-t // block_q)):
      start, full_start, full_end, end = rule.key_blocks(i, block_q, block_k)
      assert 0 <= start <= full_start <= full_end <= end
      tile_rows = vis[i * block_q:(i + 1) * block_q]
      for j in range(-(-s // block_k)):
        tile = tile_rows[:, j * block_k:(j + 1) * block_k]
        full = tile.shape[1] == block_k and tile.all()
        if tile.any():
          assert start <= j < end, (rule, i, j)
        if full_start <= j < full_end:
          assert full, (rule, i, j, "marked wholly visible")
    for j in range(-(-s // block_k)):
      start, full_start, full_end, end = rule.query_blocks(j, block_q, block_k)
      assert 0 <= start <= full_start <= full_end <= end
      tile_cols = vis[:, j * block_k:(j + 1) * block_k]
      for i in range(-(-t // block_q)):
        tile = tile_cols[i * block_q:(i + 1) * block_q]
        if tile.any():
          assert start <= i < end, (rule, i, j)
        if full_start <= i < full_end:
          assert tile.all(), (rule, i, j, "marked wholly visible")


def _bounds(rule, pos):
  """Each position's [lo, hi] visible keys, independently of key_interval."""
  lo = np.maximum(pos - rule.window_left, 0)
  hi = np.full_like(pos, rule.seq_len_k - 1)
  if rule.is_causal:
    hi = np.minimum(hi, pos)
  if rule.window_right is not None:
    hi = np.minimum(hi, pos + rule.window_right)
  return lo, hi


@pytest.mark.parametrize("query_major", [True, False])
def test_one_sided_runs_mask_the_same(query_major):
  """Where one_sided_runs holds, comparing each masked run's blocks against
  one bound (the left for leading key blocks / trailing query blocks, the
  right for the others) gives exactly the rule's visibility on every
  element of the padded tiles that a kernel keeps."""
  rng = random.Random(11 + query_major)
  held = refused = 0
  for _ in range(300):
    t, s = rng.randint(1, 120), rng.randint(1, 120)
    rule = MaskRule(seq_len_q=t, seq_len_k=s, is_causal=rng.random() < 0.7,
                    offset=rng.choice([0, s - t, rng.randint(-20, 20)]),
                    window_left=rng.randint(0, 70),
                    window_right=rng.choice([None, rng.randint(0, 30)]))
    block_q, block_k = rng.choice([(8, 8), (8, 16), (16, 8), (16, 16)])
    if not rule.one_sided_runs(block_q, block_k, query_major=query_major):
      refused += 1
      continue
    held += 1
    num_q, num_k = -(-t // block_q), -(-s // block_k)
    rows = np.arange(num_q * block_q)
    keys = np.arange(num_k * block_k)
    lo, hi = _bounds(rule, rows + rule.offset)
    oracle = np.zeros((len(rows), len(keys)), bool)
    oracle[:t, :s] = visible_matrix(rule)
    left = keys[None, :] >= lo[:, None]    # the left bound alone
    right = keys[None, :] <= hi[:, None]   # the right bound (and S) alone
    # Rows past T are dropped (forward, dQ) or carry P = 0 (dK/dV).
    real = rows < t
    tiles = num_q if query_major else num_k
    for tile in range(tiles):
      if query_major:
        start, full_start, full_end, end = rule.key_blocks(tile, block_q,
                                                           block_k)
        runs = [(range(start, full_start), left),
                (range(full_end, end), right)]
      else:
        start, full_start, full_end, end = rule.query_blocks(tile, block_q,
                                                             block_k)
        runs = [(range(start, full_start), right),
                (range(full_end, end), left)]
      for blocks, one_bound in runs:
        for b in blocks:
          i, j = (tile, b) if query_major else (b, tile)
          r = slice(i * block_q, (i + 1) * block_q)
          c = slice(j * block_k, (j + 1) * block_k)
          np.testing.assert_array_equal(
              one_bound[r, c][real[r]], oracle[r, c][real[r]],
              err_msg=f"{rule} {block_q}x{block_k} block ({i}, {j})")
  assert held > 30 and refused > 30, (held, refused)


def test_one_sided_runs_on_long_windows():
  """The benchmark's window (1k at 16k) and what refuses one-sided runs."""
  window = MaskRule(seq_len_q=16384, seq_len_k=16384, is_causal=True,
                    window_left=1024)
  assert window.one_sided_runs(128, 128, query_major=True)
  assert window.one_sided_runs(128, 256, query_major=True)
  assert window.one_sided_runs(64, 128, query_major=False)
  narrow = dataclasses.replace(window, window_left=100)
  assert not narrow.one_sided_runs(128, 128, query_major=True)
  for rule in (dataclasses.replace(window, window_left=None),
               dataclasses.replace(window, has_segments=True),
               dataclasses.replace(window, has_mask_array=True)):
    assert not rule.one_sided_runs(128, 128, query_major=True)


@pytest.mark.parametrize("has_segments", [False, True])
def test_key_and_query_ranges_are_inverses(has_segments):
  """Key tile j visits query block i exactly when i is in j's range: the
  fused Hopper dQ orders its adds by this (a mismatch would deadlock)."""
  for rule in random_rules(200, seed=5 + has_segments):
    rule = dataclasses.replace(rule, has_segments=has_segments)
    for block_q, block_k in [(16, 32), (32, 16), (16, 16)]:
      num_q = -(-rule.seq_len_q // block_q)
      num_k = -(-rule.seq_len_k // block_k)
      seen_by = {i: [] for i in range(num_q)}
      for j in range(num_k):
        start, _, _, end = rule.query_blocks(j, block_q, block_k)
        for i in range(start, end):
          seen_by[i].append(j)
      for i in range(num_q):
        start, _, _, end = rule.key_blocks(i, block_q, block_k)
        assert seen_by[i] == list(range(start, end)), (rule, i)


def test_causal_ranges_skip_the_future():
  rule = MaskRule(seq_len_q=256, seq_len_k=256, is_causal=True)
  assert rule.key_blocks(0, 64, 64) == (0, 0, 0, 1)
  assert rule.key_blocks(3, 64, 64) == (0, 0, 3, 4)
  assert rule.query_blocks(3, 64, 64) == (3, 4, 4, 4)


def test_window_visits_a_band():
  rule = MaskRule(seq_len_q=1024, seq_len_k=1024, is_causal=True,
                  window_left=128)
  for i in range(16):
    start, _, _, end = rule.key_blocks(i, 64, 64)
    assert end - start <= 4  # (64 + 128) / 64 + 1 blocks, not i + 1


def test_segment_block_ranges_packed_documents():
  # Two documents of 40 and 24 tokens, sorted ids: blocks of 16.
  seg = jnp.asarray([[0] * 40 + [1] * 24], jnp.int32)
  key_range, query_range = segment_block_ranges(seg, seg, 16, 16)
  # (first, end, whole_first, whole_end): block 2 holds both documents.
  np.testing.assert_array_equal(key_range[0], [[0, 3, 0, 2], [0, 3, 0, 2],
                                               [0, 4, 0, 0], [2, 4, 3, 4]])
  np.testing.assert_array_equal(query_range[0], key_range[0])
  brute = np.asarray(seg[0][:, None] == seg[0][None, :])
  for i, j in itertools.product(range(4), range(4)):
    tile = brute[i * 16:(i + 1) * 16, j * 16:(j + 1) * 16]
    if tile.any():
      assert key_range[0, i, 0] <= j < key_range[0, i, 1]
    assert (key_range[0, i, 2] <= j < key_range[0, i, 3]) == tile.all()


@pytest.mark.parametrize("sort", [True, False])
def test_segment_whole_runs(sort):
  """Every block of the whole run matches wholly; for sorted ids every
  wholly matching block is in it; partial last blocks never are."""
  rng = np.random.default_rng(3 + sort)
  for _ in range(20):
    t, s = rng.integers(1, 100, 2)
    q_seg = rng.integers(0, 3, (2, t))
    kv_seg = rng.integers(0, 3, (2, s))
    if sort:
      q_seg, kv_seg = np.sort(q_seg), np.sort(kv_seg)
    for block_q, block_k in [(8, 16), (16, 8)]:
      key_range, query_range = segment_block_ranges(
          jnp.asarray(q_seg, jnp.int32), jnp.asarray(kv_seg, jnp.int32),
          block_q, block_k)
      for b, i, j in itertools.product(range(2), range(-(-t // block_q)),
                                       range(-(-s // block_k))):
        tile = (q_seg[b, i * block_q:(i + 1) * block_q, None]
                == kv_seg[b, None, j * block_k:(j + 1) * block_k])
        whole = tile.shape == (block_q, block_k) and tile.all()
        for (first, end, w_first, w_end), n in ((key_range[b, i], j),
                                                (query_range[b, j], i)):
          assert first <= w_first <= w_end <= end or w_first == w_end
          if tile.any():
            assert first <= n < end
          if w_first <= n < w_end:
            assert whole
          elif sort:
            assert not whole


@pytest.mark.parametrize("kwargs, span", [
    (dict(is_causal=True), None),
    (dict(), None),
    (dict(window_left=1024), None),  # unbounded to the right
    (dict(is_causal=True, window_left=1024), 1025),
    (dict(is_causal=True, window_left=1024, window_right=8), 1025),
    (dict(window_left=100, window_right=27), 128),
    (dict(is_causal=True, window_left=10, window_right=-3), 8),
])
def test_key_span_is_the_widest_row(kwargs, span):
  rule = MaskRule(seq_len_q=300, seq_len_k=300, **kwargs)
  assert rule.key_span == span
  if span is not None:  # no row sees more, and some row sees exactly that
    assert visible_matrix(rule).sum(axis=1).max() == min(span, 300)
