"""Label matching on data made in the test: exact top-k, permutation recovery, assignment."""

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from vnca.data import matching


def strokes(rng, n, min_core=8):
    """Grey 28x28 'digits': 1-3 thick line segments, saturated core, grey rim, 0 background."""
    yy, xx = np.mgrid[0:28, 0:28].astype(float)
    out = np.zeros((n, 28, 28))
    for i in range(n):
        while True:
            img = np.zeros((28, 28))
            for _ in range(rng.integers(1, 4)):
                a, b = rng.uniform(4, 24, 2), rng.uniform(4, 24, 2)
                ab = b - a
                t = np.clip(((yy - a[0]) * ab[0] + (xx - a[1]) * ab[1]) / max(ab @ ab, 1e-9),
                            0, 1)
                d = np.hypot(yy - a[0] - t * ab[0], xx - a[1] - t * ab[1])
                img = np.maximum(img, np.clip(1.8 - 0.9 * d, 0, 1))
            if (np.round(img * 255) == 255).sum() >= min_core:
                break
        out[i] = img
    return np.round(out * 255).astype(np.uint8).reshape(n, 784)


def near_duplicate_problem(seed=0, n=300, n_pairs=40):
    """Known images (with deliberate near-duplicate pairs), binarized with a fixed seed, shuffled.

    A pair (a, b) shares one stroke image: `a` has one extra grey (128) pixel next to the stroke,
    `b` has 8 core pixels lowered from 255 to 230. When b's binarization keeps those 8 pixels on
    (probability 0.43), `a` explains it better (8 * -log 0.9 > log 2): a top-1 collision on `a`,
    which only a one-to-one assignment settles. A pair whose two binarized images agree on every
    pixel where the originals differ is indistinguishable by any method and is dropped.
    Returns (originals, labels, queries, perm) with queries[j] sampled from originals[perm[j]].
    """
    rng = np.random.default_rng(seed)
    g = strokes(rng, n + n_pairs)
    labels = rng.integers(0, 10, n + n_pairs)
    pa, pb = [], []
    for base in g[n:]:
        img = base.reshape(28, 28)
        near = np.zeros((28, 28), bool)
        near[1:] |= img[:-1] > 0
        near[:-1] |= img[1:] > 0
        near[:, 1:] |= img[:, :-1] > 0
        near[:, :-1] |= img[:, 1:] > 0
        rim = np.flatnonzero((near & (img == 0)).ravel())
        core = rng.choice(np.flatnonzero(base == 255), 8, replace=False)
        a, b = base.copy(), base.copy()
        a[rng.choice(rim)] = 128
        b[core] = 230
        pa.append(a)
        pb.append(b)
    originals = np.concatenate([g[:n], pa, pb])
    olabels = np.concatenate([labels, labels[n:]])
    x = (rng.random(originals.shape) < originals / 255.0).astype(np.uint8)
    ia = n + np.arange(n_pairs)
    ib = ia + n_pairs
    keep_pair = ((x[ia] != x[ib]) & (originals[ia] != originals[ib])).any(axis=1)
    keep = np.concatenate([np.ones(n, bool), keep_pair, keep_pair])
    originals, olabels, x = originals[keep], olabels[keep], x[keep]
    perm = rng.permutation(len(originals))
    return originals, olabels, x[perm], perm


def test_permutation_and_labels_recovered_exactly_with_near_duplicates():
    originals, labels, queries, perm = near_duplicate_problem(seed=0)
    mt = matching.match(queries, originals, labels, k=8, chunk=64, progress=False)
    coll = matching.collisions(mt.top1_M)
    # The near-duplicates really collide under plain top-1 ...
    assert coll["references"] >= 5 and coll["rows"] == 2 * coll["references"]
    assert (mt.top1_M != perm).sum() == coll["references"]
    # ... and the one-to-one assignment recovers the permutation and the labels exactly.
    np.testing.assert_array_equal(mt.assigned_M, perm)
    np.testing.assert_array_equal(mt.labels_M, labels[perm])
    assert not mt.unresolved_M.any()
    # Independent check: the global optimum over all pairs (dense LL, Hungarian) agrees.
    rows, cols = linear_sum_assignment(-matching.loglik_dense(queries, originals))
    np.testing.assert_array_equal(cols[np.argsort(rows)], perm)
    s = matching.summarize(mt, queries, originals)
    assert s["collisions_before_assignment"] == coll
    assert s["collisions_after_assignment"]["references"] == 0
    assert s["rows_changed_by_assignment"] == coll["references"]
    assert s["impossible_pixels"] == {"total": 0, "pairs_with_any": 0}
    assert s["label_histogram"] == np.bincount(labels[perm], minlength=10).tolist()


@pytest.mark.parametrize("n_ref,k,chunk", [(203, 5, 7), (64, 3, 1000), (17, 17, 4)])
def test_topk_equals_dense_brute_force(n_ref, k, chunk):
    rng = np.random.default_rng(n_ref)
    refs = strokes(rng, n_ref, min_core=0)
    labels = rng.choice([0, 3, 7], n_ref)  # not every label value present, odd segment sizes
    x = (rng.random((40, 784)) < refs[rng.integers(0, n_ref, 40)] / 255.0).astype(np.uint8)
    x[:5] = rng.integers(0, 2, (5, 784))  # some queries that fit nothing well
    ref = matching.prepare_reference(refs, labels)
    idx, ll, lab = matching.topk_candidates(x, ref, k=k, chunk=chunk, progress=False)
    dense = matching.loglik_dense(x, refs)
    order = np.lexsort((np.broadcast_to(np.arange(n_ref), dense.shape), -dense), axis=1)
    np.testing.assert_array_equal(idx, order[:, :k])
    np.testing.assert_allclose(ll, np.take_along_axis(dense, order[:, :k], 1), rtol=0, atol=1e-9)
    per_label = np.stack([dense[:, labels == v].max(1) for v in (0, 3, 7)], axis=1)
    np.testing.assert_allclose(lab, per_label, rtol=2e-6, atol=1e-2)  # float32 product


def test_label_margin_against_dense():
    rng = np.random.default_rng(5)
    refs = strokes(rng, 120, min_core=0)
    labels = rng.integers(0, 10, 120)
    x = (rng.random((30, 784)) < refs[:30] / 255.0).astype(np.uint8)
    mt = matching.match(x, refs, labels, k=4, chunk=8, progress=False)
    dense = matching.loglik_dense(x, refs)
    best = dense.argmax(1)
    other = np.where(labels[None, :] != labels[best][:, None], dense, -np.inf).max(1)
    np.testing.assert_allclose(matching.label_margin(mt), dense.max(1) - other, atol=1e-2)


def test_assignment_equals_hungarian_on_candidates():
    rng = np.random.default_rng(1)
    m, n, k = 30, 40, 6
    idx = np.stack([rng.choice(n, k, replace=False) for _ in range(m)])
    ll = -np.sort(rng.exponential(5.0, (m, k)), axis=1)  # descending, like top-k lists
    assigned, rank, unresolved = matching.assign_one_to_one(idx, ll, n)
    big = 1e6
    dense = np.full((m, n), big)
    for i in range(m):
        dense[i, idx[i]] = ll[i, 0] - ll[i] + 1.0
    r, c = linear_sum_assignment(dense)
    assert dense[r, c].max() < big  # a full matching exists among the candidates
    ours = dense[np.arange(m), assigned].sum()
    assert ours == pytest.approx(dense[r, c].sum(), abs=1e-9)
    assert len(set(assigned.tolist())) == m and not unresolved.any()
    np.testing.assert_array_equal(idx[np.arange(m), rank], assigned)


def test_assignment_falls_back_when_candidates_have_no_full_matching():
    # Three queries whose only candidates are references 0 and 1: one query cannot be placed.
    idx = np.array([[0, 1], [0, 1], [1, 0]])
    ll = np.array([[-1.0, -5.0], [-2.0, -3.0], [-1.0, -9.0]])
    assigned, rank, unresolved = matching.assign_one_to_one(idx, ll, n_ref=5)
    assert unresolved.sum() == 1
    placed = assigned[~unresolved]
    assert sorted(placed.tolist()) == [0, 1]
    # The unresolved query keeps its top-1; the placed two take the cheapest option (brute
    # force over all ways to place two of the three queries on references 0 and 1: cost 2).
    u = np.flatnonzero(unresolved)[0]
    assert assigned[u] == idx[u, 0] and rank[u] == 0
    cost = ll[:, :1] - ll + 1.0
    placed_rows = np.flatnonzero(~unresolved)
    assert cost[placed_rows, rank[placed_rows]].sum() == pytest.approx(2.0)
    # More queries than references: also no exception.
    a2, _, u2 = matching.assign_one_to_one(np.zeros((3, 1), int), np.zeros((3, 1)), n_ref=1)
    assert u2.sum() == 2 and (a2 == 0).all()


def test_match_grows_k_when_top_k_has_no_full_matching():
    rng = np.random.default_rng(2)
    refs = strokes(rng, 6, min_core=0)
    refs[1] = refs[0]  # an exact duplicate: both queries from it rank the same image first
    x = (rng.random((2, 784)) < refs[[0, 0]] / 255.0).astype(np.uint8)
    mt = matching.match(x, refs, np.arange(6), k=1, progress=False)
    assert mt.k == 4 and not mt.unresolved_M.any()
    assert sorted(mt.assigned_M.tolist()) == [0, 1]
    assert (mt.top1_M == mt.top1_M[0]).all()  # the tie goes to the lower index for both


def test_impossible_pixels_and_collisions_counts():
    ref = np.zeros((2, 784), np.uint8)
    ref[0, :10] = 255
    ref[1, :10] = 128
    x = np.zeros((3, 784), np.uint8)
    x[0, :10] = 1          # fits ref 0 exactly
    x[1, :9] = 1           # x = 0 where ref 0 is 255: one impossible pixel
    x[1, 700] = 1          # x = 1 where ref 0 is 0: another
    x[2, 3] = 1
    imp = matching.impossible_pixels(x, ref, np.array([0, 0, 1]))
    np.testing.assert_array_equal(imp, [0, 2, 0])
    assert matching.collisions(np.array([4, 4, 4, 2, 1, 1])) == {
        "distinct": 3, "references": 2, "rows": 5}


def test_distribution_figures():
    d = matching.distribution(np.array([0.5, 2.0, 20.0, 80.0, np.inf]))
    assert d["n"] == 4 and d["min"] == 0.5 and d["max"] == 80.0
    assert (d["count_below_1"], d["count_below_10"], d["count_below_50"]) == (1, 2, 3)
    assert d["p50"] == pytest.approx(11.0)
