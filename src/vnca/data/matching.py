"""Label matching: give each binarized image the label of the MNIST image it was sampled from.

For a binary image x and a grey image with Bernoulli probabilities p = clip(pixel / 255, eps,
1 - eps), the log-likelihood is

    LL(x, p) = sum_d x_d log p_d + (1 - x_d) log(1 - p_d) = x . (log p - log(1 - p)) + sum_d log(1 - p_d)

so all pairs of a chunk of queries and the whole reference set are one float32 matrix product.
Per query we keep the top-k references (exact: a block-max pre-selection that provably contains
the top k, see `_topk_chunk`), rescore those k in float64 so that near-ties between near-identical
digits are ordered correctly, and keep the best LL per reference label (for the label margin).
A one-to-one assignment over the top-k candidates (minimum total LL loss) then settles references
claimed by more than one query.

Shapes: M queries, N references, D = 784 pixels, K candidates per query, L labels,
C = chunk rows, Nb = reference blocks of B columns.
"""

from __future__ import annotations

import dataclasses

import numpy as np

EPS = 1e-6
BLOCK = 64


@dataclasses.dataclass(frozen=True)
class Reference:
    """Reference images prepared for scoring (label-sorted, padded into blocks of BLOCK)."""

    w_KvxNp: np.ndarray        # float32; row 0: the bias, then the varying pixels in `pix_Kv` order
    col_to_ref_Np: np.ndarray  # reference index of each column, -1 on padding
    varying_D: np.ndarray      # bool, pixels whose value differs between references
    pix_Kv: np.ndarray         # varying pixels, most often inked (in the references) first
    const_w_Dc: np.ndarray     # float64 weight of the constant pixels (same for every reference)
    images_NxD: np.ndarray     # uint8, original reference order (for float64 rescoring)
    w_lut_V: np.ndarray        # float64 weight of each grey value 0..255
    b64_N: np.ndarray          # float64 bias sum_d log(1 - p_d)
    labels_N: np.ndarray       # int64
    label_values_L: np.ndarray  # sorted distinct labels
    block_starts_L: np.ndarray  # first block of each label's segment
    block: int


def bernoulli_lut(eps: float = EPS) -> tuple[np.ndarray, np.ndarray]:
    """Per grey value v = 0..255: (log p - log(1 - p), log(1 - p)) in float64, p = clip(v/255)."""
    p = np.clip(np.arange(256) / 255.0, eps, 1.0 - eps)
    log1mp = np.log1p(-p)
    return np.log(p) - log1mp, log1mp


def loglik_dense(x_MxD: np.ndarray, images_NxD: np.ndarray, eps: float = EPS) -> np.ndarray:
    """Every pair's LL in float64, straight from the definition (small inputs; for tests)."""
    p = np.clip(images_NxD.astype(np.float64) / 255.0, eps, 1.0 - eps)
    x = x_MxD.astype(np.float64)
    return x @ np.log(p).T + (1.0 - x) @ np.log1p(-p).T


def prepare_reference(images_NxD: np.ndarray, labels_N: np.ndarray, eps: float = EPS,
                      block: int = BLOCK, rows_per_step: int = 4096) -> Reference:
    """Weights for scoring, columns grouped by label into blocks of `block` references.

    Column c = j * Nb + b holds member j of block b, so that a block's maximum is a reduction
    over a middle axis (fast in numpy). Each label owns a contiguous range of blocks; the last
    block of a label is padded with columns that score -1e30. Pixels with the same value in
    every reference add the same amount to every column: they stay out of the product and are
    added per query. The other pixels are ordered by how often the references ink them, so a
    chunk of queries that never inks the rare tail can use a shorter product (a row prefix).
    """
    images_NxD = np.ascontiguousarray(images_NxD, np.uint8)
    labels_N = np.asarray(labels_N).astype(np.int64)
    n = len(images_NxD)
    if n == 0:
        raise ValueError("empty reference set")
    w_lut, b_lut = bernoulli_lut(eps)
    varying_D = images_NxD.min(axis=0) != images_NxD.max(axis=0)
    const_w_Dc = w_lut[images_NxD[0, ~varying_D]]
    b64_N = np.concatenate([b_lut[images_NxD[r:r + rows_per_step]].sum(axis=1)
                            for r in range(0, n, rows_per_step)])
    label_values_L = np.unique(labels_N)
    blocks, starts = [], []
    for lab in label_values_L:
        members = np.flatnonzero(labels_N == lab)
        starts.append(len(blocks))
        members = np.concatenate([members, np.full((-len(members)) % block, -1, np.int64)])
        blocks.extend(members.reshape(-1, block))
    col_to_ref_Np = np.stack(blocks).T.ravel()  # (B, Nb) -> column j * Nb + b
    varying_idx = np.flatnonzero(varying_D)
    ink_freq = (images_NxD[:, varying_idx] > 0).mean(axis=0)
    pix_Kv = varying_idx[np.argsort(-ink_freq, kind="stable")]
    kv = len(pix_Kv)
    # Row 0: the bias, multiplied by a column of ones put in front of the queries.
    w_KvxNp = np.zeros((kv + 1, len(col_to_ref_Np)), np.float32)
    w_KvxNp[0] = -1e30
    w_lut32 = w_lut.astype(np.float32)
    for c0 in range(0, len(col_to_ref_Np), rows_per_step):
        cols = np.arange(c0, min(c0 + rows_per_step, len(col_to_ref_Np)))
        refs = col_to_ref_Np[cols]
        cols, refs = cols[refs >= 0], refs[refs >= 0]
        w_KvxNp[1:, cols] = w_lut32[images_NxD[refs][:, pix_Kv]].T
        w_KvxNp[0, cols] = b64_N[refs]
    return Reference(w_KvxNp, col_to_ref_Np, varying_D, pix_Kv, const_w_Dc, images_NxD, w_lut,
                     b64_N,
                     labels_N, label_values_L, np.asarray(starts, np.int64), block)


def _topk_chunk(x_CxD: np.ndarray, ref: Reference, k: int, s_buf=None, g_buf=None):
    """Top-k references per query row (float64 LL, descending) and the best LL per label.

    The k blocks with the largest block maxima contain the k largest entries of a row (a block
    holding one of them has a maximum >= the k-th largest value, and at most k blocks can), so a
    partition over k * B gathered columns replaces one over all N. `s_buf` (>= C x Np float32)
    and `g_buf` (>= C x K x D float64) are reused between chunks: allocating ~100 MB per chunk
    afresh costs seconds of page faults over the full data.
    """
    c, d = x_CxD.shape
    x_sel = x_CxD[:, ref.pix_Kv]
    inked = np.flatnonzero(x_sel.any(axis=0))
    kn = 1 + (int(inked[-1]) + 1 if len(inked) else 0)  # rows of W this chunk needs
    x_aug = np.empty((c, kn), np.float32)
    x_aug[:, 0] = 1.0
    x_aug[:, 1:] = x_sel[:, :kn - 1]
    np_ = ref.w_KvxNp.shape[1]
    s_CxNp = np.matmul(x_aug, ref.w_KvxNp[:kn],
                       out=None if s_buf is None else s_buf[:c * np_].reshape(c, np_))
    b = ref.block
    nb = s_CxNp.shape[1] // b
    s_CxBxNb = s_CxNp.reshape(c, b, nb)
    bmax_CxNb = s_CxBxNb.max(axis=1)
    label_max_CxL = np.maximum.reduceat(bmax_CxNb, ref.block_starts_L, axis=1)
    kb = min(k, nb)
    top_blocks_CxKb = np.argpartition(bmax_CxNb, nb - kb, axis=1)[:, nb - kb:]
    cand_vals = np.take_along_axis(s_CxBxNb, top_blocks_CxKb[:, None, :], axis=2).reshape(c, -1)
    cand_cols = (np.arange(b)[None, :, None] * nb + top_blocks_CxKb[:, None, :]).reshape(c, -1)
    kk = cand_vals.shape[1]
    pick = np.argpartition(cand_vals, kk - k, axis=1)[:, kk - k:]
    idx_CxK = ref.col_to_ref_Np[np.take_along_axis(cand_cols, pick, axis=1)]
    # Rescore the k candidates in float64 (constant pixels included) and sort them.
    x64 = x_CxD.astype(np.float64)
    w_CxKxD = np.take(ref.w_lut_V, ref.images_NxD[idx_CxK],
                      out=None if g_buf is None else g_buf[:c * k * d].reshape(c, k, d))
    ll_CxK = np.einsum("cd,ckd->ck", x64, w_CxKxD) + ref.b64_N[idx_CxK]
    order = np.lexsort((idx_CxK, -ll_CxK), axis=1)  # LL descending, ties by index
    idx_CxK = np.take_along_axis(idx_CxK, order, axis=1)
    ll_CxK = np.take_along_axis(ll_CxK, order, axis=1)
    const_C = x64[:, ~ref.varying_D] @ ref.const_w_Dc
    label_max_CxL = label_max_CxL.astype(np.float64) + const_C[:, None]
    return idx_CxK, ll_CxK, label_max_CxL


@dataclasses.dataclass
class Match:
    """Candidates and assignment for M queries against one reference set."""

    top_idx_MxK: np.ndarray     # reference indices, LL descending
    top_ll_MxK: np.ndarray      # float64 LL
    label_max_MxL: np.ndarray   # best LL per reference label (float32 accuracy)
    label_values_L: np.ndarray
    ref_labels_N: np.ndarray
    assigned_M: np.ndarray      # reference index after the one-to-one assignment
    assigned_rank_M: np.ndarray  # position of the assigned reference in the candidate list
    unresolved_M: np.ndarray    # bool: no free candidate among the top k, kept its top-1
    k: int

    @property
    def top1_M(self) -> np.ndarray:
        return self.top_idx_MxK[:, 0]

    @property
    def labels_M(self) -> np.ndarray:
        return self.ref_labels_N[self.assigned_M]


def topk_candidates(x_MxD: np.ndarray, ref: Reference, k: int = 16, chunk: int = 512,
                    progress: bool = True, desc: str = "match"):
    """Top-k candidates for every query, in chunks of `chunk` rows (tqdm progress bar)."""
    m = len(x_MxD)
    n = len(ref.labels_N)
    if n == 0:
        raise ValueError("empty reference set")
    k = max(1, min(k, n))
    idx = np.empty((m, k), np.int64)
    ll = np.empty((m, k), np.float64)
    lab = np.empty((m, len(ref.label_values_L)), np.float64)
    s_buf = np.empty(min(chunk, m) * ref.w_KvxNp.shape[1], np.float32)
    g_buf = np.empty(min(chunk, m) * k * ref.images_NxD.shape[1], np.float64)
    starts = range(0, m, chunk)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="chunk", leave=False)
    for r0 in starts:
        r1 = min(m, r0 + chunk)
        idx[r0:r1], ll[r0:r1], lab[r0:r1] = _topk_chunk(x_MxD[r0:r1], ref, k, s_buf, g_buf)
    return idx, ll, lab


def assign_one_to_one(top_idx_MxK: np.ndarray, top_ll_MxK: np.ndarray, n_ref: int):
    """One reference per query, maximising the total LL over the top-k candidates.

    Cost of giving query m its candidate j is LL_top1 - LL_j + 1 (>= 1, so no explicit zeros).
    When the candidate graph has no matching that covers every query (too many queries share
    too few candidates), each query also gets a private dummy column with a cost above any sum
    of real costs: the solver then matches as many queries as possible, and the rest keep their
    top-1 and are flagged unresolved. Returns (assigned_M, rank_M, unresolved_M).
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    m, k = top_idx_MxK.shape
    if m == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool)
    cost_MxK = (top_ll_MxK[:, :1] - top_ll_MxK) + 1.0
    rows = np.repeat(np.arange(m), k)
    cols = top_idx_MxK.ravel()

    def solve(n_cols, extra_rows=(), extra_cols=(), extra_cost=()):
        data = np.concatenate([cost_MxK.ravel(), extra_cost])
        r = np.concatenate([rows, extra_rows]).astype(np.int64)
        c = np.concatenate([cols, extra_cols]).astype(np.int64)
        g = csr_matrix((data, (r, c)), shape=(m, n_cols))
        return min_weight_full_bipartite_matching(g)

    try:
        if m > n_ref:
            raise ValueError("more queries than references")
        row_ind, col_ind = solve(n_ref)
    except ValueError:
        big = float(cost_MxK.max(axis=1).sum()) + 1.0
        row_ind, col_ind = solve(n_ref + m, np.arange(m), n_ref + np.arange(m), np.full(m, big))
    assigned = np.empty(m, np.int64)
    assigned[row_ind] = col_ind
    unresolved = assigned >= n_ref
    assigned[unresolved] = top_idx_MxK[unresolved, 0]
    rank = np.argmax(top_idx_MxK == assigned[:, None], axis=1)
    return assigned, rank, unresolved


def match(x_MxD: np.ndarray, ref_images_NxD: np.ndarray, ref_labels_N: np.ndarray, k: int = 16,
          chunk: int = 512, progress: bool = True, desc: str = "match",
          max_k: int = 256) -> Match:
    """Top-k candidates, per-label best LL and the one-to-one assignment for every query.

    If the top-k candidates admit no one-to-one assignment of every query, k grows fourfold
    (up to `max_k`) and the candidates are recomputed; queries still unplaced after that keep
    their top-1 and are reported as unresolved.
    """
    ref = prepare_reference(ref_images_NxD, ref_labels_N)
    n = len(ref.labels_N)
    while True:
        idx, ll, lab = topk_candidates(x_MxD, ref, k, chunk, progress, desc)
        assigned, rank, unresolved = assign_one_to_one(idx, ll, n)
        if not unresolved.any() or idx.shape[1] >= min(n, max_k) or len(x_MxD) > n:
            break
        k = min(4 * idx.shape[1], n, max_k)
    return Match(idx, ll, lab, ref.label_values_L, ref.labels_N, assigned, rank, unresolved,
                 idx.shape[1])


# ---------------------------------------------------------------------------------------------
# Report figures


def distribution(values: np.ndarray, thresholds=(1.0, 10.0, 50.0)) -> dict:
    """min / percentiles / median / max and counts below thresholds, as plain floats."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"n": 0}
    pct = (0.1, 1, 5, 25, 50, 75, 95)
    q = np.percentile(v, pct)
    out = {"n": int(v.size), "min": float(v.min()), "mean": float(v.mean())}
    out.update({f"p{p:g}": float(x) for p, x in zip(pct, q)})
    out["max"] = float(v.max())
    out.update({f"count_below_{t:g}": int((v < t).sum()) for t in thresholds})
    return out


def collisions(targets_M: np.ndarray) -> dict:
    """References claimed by more than one query, and how many queries claim them."""
    _, counts = np.unique(targets_M, return_counts=True)
    multi = counts[counts > 1]
    return {"distinct": len(counts), "references": len(multi),
            "rows": int(multi.sum())}


def impossible_pixels(x_MxD: np.ndarray, ref_images_NxD: np.ndarray,
                      assigned_M: np.ndarray) -> np.ndarray:
    """Per pair: pixels with x = 1 where the reference is 0, or x = 0 where it is 255."""
    out = np.empty(len(x_MxD), np.int64)
    for r0 in range(0, len(x_MxD), 8192):
        x = x_MxD[r0:r0 + 8192].astype(bool)
        g = ref_images_NxD[assigned_M[r0:r0 + 8192]]
        out[r0:r0 + 8192] = ((x & (g == 0)) | (~x & (g == 255))).sum(axis=1)
    return out


def label_margin(mt: Match, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
    """Best LL minus the best LL of a reference whose label differs from the top-1's label."""
    top_lab = mt.ref_labels_N[mt.top_idx_MxK[rows, 0]]
    lab_max = mt.label_max_MxL[rows].copy()
    pos = np.searchsorted(mt.label_values_L, top_lab)
    lab_max[np.arange(len(pos)), pos] = -np.inf
    return mt.top_ll_MxK[rows, 0] - lab_max.max(axis=1)


def summarize(mt: Match, x_MxD: np.ndarray, ref_images_NxD: np.ndarray,
              rows: slice | np.ndarray = slice(None), n_labels: int = 10) -> dict:
    """Report figures for the queries `rows` (a split inside a jointly matched group)."""
    top1 = mt.top_idx_MxK[rows, 0]
    assigned = mt.assigned_M[rows]
    ll = mt.top_ll_MxK[rows]
    labels_top1 = mt.ref_labels_N[top1]
    labels = mt.ref_labels_N[assigned]
    imp = impossible_pixels(x_MxD[rows], ref_images_NxD, assigned)
    margin = ll[:, 0] - ll[:, 1] if ll.shape[1] > 1 else np.full(len(ll), np.inf)
    return {
        "n": len(top1),
        "collisions_before_assignment": collisions(top1),
        "collisions_after_assignment": collisions(assigned),
        "rows_changed_by_assignment": int((top1 != assigned).sum()),
        "labels_changed_by_assignment": int((labels_top1 != labels).sum()),
        "unresolved_rows": int(mt.unresolved_M[rows].sum()),
        "assigned_rank_histogram": np.bincount(mt.assigned_rank_M[rows],
                                               minlength=1).tolist(),
        "margin_top1_top2_nats": distribution(margin),
        "label_margin_nats": distribution(label_margin(mt, rows)),
        "assigned_loglik_nats": distribution(ll[np.arange(len(ll)), mt.assigned_rank_M[rows]]),
        "impossible_pixels": {"total": int(imp.sum()), "pairs_with_any": int((imp > 0).sum())},
        "label_histogram": np.bincount(labels, minlength=n_labels).tolist(),
    }
