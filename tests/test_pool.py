"""Sample pool: layout of the pool rows, damage rows, and a global shuffle (trap T7)."""

import jax
import jax.numpy as jnp
import numpy as np

from vnca import pool


def _pool_with_ids(size, filled):
    """A pool whose entry i has image value i and state value 1000 + i."""
    ids = np.arange(size, dtype=np.float32)
    return {
        "images": jnp.asarray(np.broadcast_to(ids[:, None, None, None], (size, 2, 2, 1))),
        "states": jnp.asarray(np.broadcast_to(1000 + ids[:, None, None, None], (size, 2, 2, 3))),
        "filled": jnp.asarray(filled),
    }


def test_take_feeds_last_rows_from_first_slots():
    p = _pool_with_ids(8, [True, True, False, True, True, True, True, True])
    fed = pool.take(p, batch_size=6, n_pool=3)
    np.testing.assert_array_equal(fed["use_B"], [False, False, False, True, True, False])
    np.testing.assert_array_equal(fed["images"][:, 0, 0, 0], [0, 0, 0, 0, 1, 2])
    np.testing.assert_array_equal(fed["states"][:, 1, 1, 2], [0, 0, 0, 1000, 1001, 1002])
    dmg = pool.damage_rows(6, 3, 2, fed["use_B"])
    np.testing.assert_array_equal(dmg, [False, False, False, True, True, False])


def test_write_back_is_a_permutation_of_kept_and_new_entries_filled_first():
    size, n_pool, b = 16, 4, 8
    filled = np.zeros(size, bool)
    filled[:10] = True  # 10 filled, 6 empty slots
    p = _pool_with_ids(size, filled)
    new_img = jnp.full((b, 2, 2, 1), 0.0) + jnp.arange(100, 100 + b, dtype=jnp.float32)[
        :, None, None, None]
    new_state = new_img.repeat(3, axis=-1) + 1000
    out = pool.write_back(p, n_pool, new_img, new_state, jax.random.key(3))
    ids = np.asarray(out["images"][:, 0, 0, 0])
    # Candidates: slots 4..15 (6 filled: 4..9, 6 empty: 10..15) and 8 new entries -> 14 filled
    # entries, all kept (14 <= 16) and first, then 2 of the 6 empty ones.
    want_filled = set(range(4, 10)) | set(range(100, 108))
    assert set(ids[:14].tolist()) == want_filled
    assert set(ids[14:].tolist()) <= set(range(10, 16))
    np.testing.assert_array_equal(out["filled"], [True] * 14 + [False] * 2)
    # images and states move together
    np.testing.assert_array_equal(np.asarray(out["states"][:, 0, 0, 0]), ids + 1000)
    # taken slots 0..3 are gone
    assert not set(ids.tolist()) & {0, 1, 2, 3}


def test_shuffle_moves_entries_across_device_blocks():
    """With 8 device blocks of a 64-slot pool, an entry from block 0 lands in every block over a
    few draws, and the order is not block-preserving (R only swapped whole blocks)."""
    size, n_pool, b, blocks = 64, 4, 8, 8
    p = _pool_with_ids(size, np.ones(size, bool))
    new = jnp.zeros((b, 2, 2, 1)) + 500.0
    seen_blocks = set()
    write_back = jax.jit(pool.write_back, static_argnums=1)
    for seed in range(12):
        out = write_back(p, n_pool, new, new.repeat(3, axis=-1), jax.random.key(seed))
        ids = np.asarray(out["images"][:, 0, 0, 0])
        pos = int(np.flatnonzero(ids == 5)[0]) if 5 in ids else None  # slot 5 is in block 0
        if pos is not None:
            seen_blocks.add(pos // (size // blocks))
        # a block-only permutation would keep each output block's ids within one input block
        block_of = [int(i) // (size // blocks) for i in ids if i < size]
        assert len({tuple(sorted(set(block_of[j:j + 8]))) for j in range(0, 56, 8)}) > 1
    assert len(seen_blocks) >= 5, seen_blocks


def test_shuffle_order_is_uniform_over_positions():
    """Each of 8 filled entries lands in each position with frequency ~ 1/8."""
    filled = jnp.ones((8,), bool)
    counts = np.zeros((8, 8))
    keys = jax.random.split(jax.random.key(0), 800)
    orders = np.asarray(jax.vmap(pool.shuffle_order, in_axes=(None, 0))(filled, keys))
    for order in orders:
        assert sorted(order.tolist()) == list(range(8))
        counts[order, np.arange(8)] += 1
    assert np.all(np.abs(counts / 800 - 1 / 8) < 0.06), counts
