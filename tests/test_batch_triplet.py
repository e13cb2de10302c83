"""fastloss.batch_triplet_loss (online triplet mining) against naive.py's brute force."""
import numpy as np
import pytest

import fastloss as fl
import naive
from fastloss.cpu import batch_mining
from fastloss.cpu import hard_mining
from naive import check_result, finite_difference

REDUCTIONS = ["mean", "sum", "none"]
DISTANCES = ["euclidean", "squared_euclidean", "cosine"]
MININGS = ["hard", "semihard", "all"]
MARGIN = {"euclidean": 0.7, "squared_euclidean": 3.0, "cosine": 0.3}


def make_batch(rng, n=13, d=5, classes=3, dtype=np.float64):
    e = rng.normal(size=(n, d)).astype(dtype)
    labels = rng.integers(0, classes, size=n)
    labels[:classes] = np.arange(classes)  # every class present
    return e, labels


def run_both(e, labels, **kw):
    return fl.batch_triplet_loss(e, labels, **kw), naive.batch_triplet_loss(e, labels, **kw)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", MININGS)
def test_matches_reference(rng, mining, distance, reduction):
    e, labels = make_batch(rng)
    res, want = run_both(e, labels, mining=mining, distance=distance, margin=MARGIN[distance],
                         reduction=reduction)
    check_result(res, *want, np.float64)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", MININGS)
def test_soft_margin(rng, mining, distance):
    e, labels = make_batch(rng, n=11, d=4)
    for margin, reduction in [(0.0, "mean"), (MARGIN[distance], "none")]:
        res, want = run_both(e, labels, mining=mining, distance=distance, soft=True, margin=margin,
                             reduction=reduction)
        check_result(res, *want, np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", MININGS)
def test_low_precision(rng, mining, distance, dtype):
    e, labels = make_batch(rng, n=12, d=6, dtype=dtype)
    res, want = run_both(e, labels, mining=mining, distance=distance, margin=MARGIN[distance],
                         reduction="mean")
    assert res.grad.dtype == np.dtype(dtype)
    check_result(res, *want, dtype)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", MININGS)
def test_finite_differences(rng, mining, distance):
    e, labels = make_batch(rng, n=9, d=3)
    kw = dict(mining=mining, distance=distance, margin=MARGIN[distance])
    res = fl.batch_triplet_loss(e, labels, **kw)

    def f(x):
        return fl.batch_triplet_loss(x, labels, grad=False, **kw).loss

    checked = 0
    for flat in rng.choice(e.size, size=10, replace=False):
        idx = np.unravel_index(flat, e.shape)
        fd = finite_difference(f, e, idx, h=1e-6)
        fd_half = finite_difference(f, e, idx, h=5e-7)
        if abs(fd - fd_half) > 1e-6 * max(1.0, abs(fd)):
            continue  # a kink (the hinge or a change of the mined triplet) within h: skip
        np.testing.assert_allclose(res.grad[idx], fd, rtol=1e-5, atol=1e-8)
        checked += 1
    assert checked >= 5


def test_hard_mining_picks_farthest_positive_and_nearest_negative():
    # 1-D embeddings, two classes: anchor 0 at 0 has positives at 1 and 3 and negatives at 2, 5
    e = np.array([[0.0], [1.0], [3.0], [2.0], [5.0]])
    labels = np.array([0, 0, 0, 1, 1])
    res = fl.batch_triplet_loss(e, labels, margin=1.0, reduction="none")
    # anchor 0: d(0, 3) = 3 (farthest positive), d(0, 2) = 2 (nearest negative): 3 - 2 + 1
    # anchor 1 (at 1): farthest positive 3 -> 2; nearest negative 2 -> 1: 2 - 1 + 1
    # anchor 2 (at 3): farthest positive 0 -> 3; nearest negative 2 -> 1: 3 - 1 + 1
    # anchor 3 (at 2): positive row 4 -> 3; nearest negatives rows 1 and 2, both at 1: 3 - 1 + 1
    # anchor 4 (at 5): positive row 3 -> 3; nearest negative row 2 -> 2: 3 - 2 + 1
    np.testing.assert_allclose(res.loss, [2.0, 2.0, 3.0, 3.0, 2.0], rtol=1e-12)
    # anchor 3's tie goes to the lower index, row 1: d/d e_1 = -d|e_1 - e_3|/d e_1 = +1 from it
    # (row 1 is in no other term); row 2 gets +1 as anchors 0's and 1's positive, +1 as anchor
    # 4's negative, 0 as an anchor (the tie going to row 2 would give 0 and 2)
    mean = fl.batch_triplet_loss(e, labels, margin=1.0)
    np.testing.assert_allclose(mean.grad[[1, 2], 0], [1.0 / 5, 3.0 / 5], rtol=1e-12)
    check_result(res, *naive.batch_triplet_loss(e, labels, margin=1.0, reduction="none"), np.float64)


def test_hard_ties_across_chunks_go_to_the_lowest_index(rng):
    # 300 rows: the kernel's scan works in chunks of 128 columns; exact ties between columns of
    # different chunks must still go to the lowest index
    e = rng.integers(-3, 4, size=(300, 2)).astype(np.float64) + 20.0
    labels = 1 + np.arange(300) % 7
    e[0] = 0.0
    labels[0] = 0
    e[[5, 140, 260]] = [[1.0, 0.0], [2.0, 0.0], [2.0, 0.0]]  # anchor 0's positives: 140 = 260
    labels[[5, 140, 260]] = 0
    e[[3, 130, 270]] = [[0.0, 1.5], [0.0, 1.0], [0.0, 1.0]]  # its nearest negatives: 130 = 270
    labels[[3, 130, 270]] = 8
    res = fl.batch_triplet_loss(e, labels, margin=1.0, reduction="none")
    check_result(res, *naive.batch_triplet_loss(e, labels, margin=1.0, reduction="none"), np.float64)
    assert res.grad[140, 0] != 0.0 and res.grad[130, 1] != 0.0


def test_semihard_prefers_the_nearest_negative_farther_than_the_positive():
    e = np.array([[0.0], [2.0], [1.0], [3.0], [-2.5]])
    labels = np.array([0, 0, 1, 1, 1])
    res = fl.batch_triplet_loss(e, labels, mining="semihard", margin=1.0, reduction="none")
    # anchor 0: positive 1 at 2; negatives at 1, 3 (d=3), -2.5 (d=2.5): nearest farther than 2 is
    # 2.5 -> 2 - 2.5 + 1 = 0.5.  anchor 1 (at 2): positive 0 at 2; negatives at d 1, 1, 4.5:
    # 4.5 -> 2 - 4.5 + 1 < 0 -> 0.  anchor 2 (at 1): positives 3 (d=2), 4 (d=3.5); negatives
    # 0 (d=1), 1 (d=1): none farther -> farthest (d=1, lowest index 0): 2 and 3.5 -> 2 + 3.5.
    np.testing.assert_allclose(res.loss[:3], [0.5, 0.0, 2.0 + 3.5], rtol=1e-12)
    check_result(res, *naive.batch_triplet_loss(e, labels, mining="semihard", margin=1.0,
                                                reduction="none"), np.float64)
    # strictly farther: a negative at exactly d(a, p) does not qualify
    e = np.array([[0.0], [2.0], [-2.0], [3.0]])
    res = fl.batch_triplet_loss(e, [0, 0, 1, 1], mining="semihard", margin=1.0, reduction="none")
    assert res.loss[0] == 0.0  # 2 - 3 + 1, not 2 - 2 + 1


def test_all_mean_counts_positive_terms(rng):
    e, labels = make_batch(rng, n=10, d=3)
    kw = dict(mining="all", margin=0.5)
    s = float(fl.batch_triplet_loss(e, labels, reduction="sum", **kw).loss)
    m = float(fl.batch_triplet_loss(e, labels, reduction="mean", **kw).loss)
    # count the positive terms by brute force
    dist = np.linalg.norm(e[:, None] - e[None], axis=-1)
    count = sum(dist[a, p] - dist[a, n] + 0.5 > 0
                for a in range(10) for p in range(10) for n in range(10)
                if a != p and labels[a] == labels[p] and labels[n] != labels[a])
    assert 0 < count
    np.testing.assert_allclose(m * count, s, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.int8, np.uint16, np.int64], ids=lambda d: np.dtype(d).name)
def test_any_integer_labels(rng, dtype):
    e, labels = make_batch(rng, n=10, d=3)
    values = np.array([7, 3, 100, 42], dtype=dtype)  # compared for equality only
    odd = values[labels]
    for mining in MININGS:
        a = fl.batch_triplet_loss(e, odd, mining=mining, reduction="none")
        b = fl.batch_triplet_loss(e, labels, mining=mining, reduction="none")
        np.testing.assert_array_equal(a.loss, b.loss)
        np.testing.assert_array_equal(a.grad, b.grad)
    neg = fl.batch_triplet_loss(e, -1 - labels.astype(np.int64), reduction="none")
    np.testing.assert_array_equal(neg.loss, fl.batch_triplet_loss(e, labels, reduction="none").loss)


@pytest.mark.parametrize("mining", MININGS)
def test_singleton_class_has_no_positive(rng, mining):
    e, _ = make_batch(rng, n=8, d=3)
    labels = np.array([0, 0, 0, 5, 1, 1, 1, 1])  # row 3 is alone in its class
    for reduction in REDUCTIONS:
        res, want = run_both(e, labels, mining=mining, reduction=reduction, margin=1.0)
        check_result(res, *want, np.float64)
    res = fl.batch_triplet_loss(e, labels, mining=mining, reduction="none", margin=1.0)
    assert res.loss[3] == 0.0  # as an anchor it contributes nothing (as a negative it may)


@pytest.mark.parametrize("mining", MININGS)
def test_one_class_has_no_negative(rng, mining):
    e, _ = make_batch(rng, n=6, d=3)
    labels = np.full(6, 4)
    res = fl.batch_triplet_loss(e, labels, mining=mining)
    if mining == "all":
        assert float(res.loss) == 0.0  # "all": 0 when no triplet has positive loss
    else:
        assert np.isnan(float(res.loss))  # an empty mean
    np.testing.assert_array_equal(res.grad, np.zeros_like(e))
    assert float(fl.batch_triplet_loss(e, labels, mining=mining, reduction="sum").loss) == 0.0
    np.testing.assert_array_equal(fl.batch_triplet_loss(e, labels, mining=mining,
                                                        reduction="none").loss, np.zeros(6))
    want_loss, want_grad = naive.batch_triplet_loss(e, labels, mining=mining)
    assert np.isnan(want_loss) == np.isnan(float(res.loss))


def test_all_without_positive_loss_is_zero(rng):
    # classes far apart: every z < 0
    e = np.concatenate([rng.normal(size=(4, 2)) * 0.01, 100 + rng.normal(size=(4, 2)) * 0.01])
    labels = np.repeat([0, 1], 4)
    res = fl.batch_triplet_loss(e, labels, mining="all", margin=1.0)
    assert float(res.loss) == 0.0
    np.testing.assert_array_equal(res.grad, np.zeros_like(e))


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", MININGS)
def test_identical_embeddings(mining, distance, dtype):
    e = np.tile(np.array([[0.3, -1.2, 2.0]], dtype), (6, 1))
    labels = np.array([0, 0, 1, 1, 2, 2])
    res = fl.batch_triplet_loss(e, labels, mining=mining, distance=distance, margin=0.5)
    assert np.isfinite(float(res.loss)) and np.all(np.isfinite(res.grad))
    # every distance is 0 (up to the Gram matrix's round-off): every term is the margin
    tol = 1e-6 if dtype == np.float64 else 2e-3
    np.testing.assert_allclose(float(res.loss), 0.5, atol=tol)
    if distance != "cosine":
        np.testing.assert_array_equal(res.grad, np.zeros_like(e))


@pytest.mark.parametrize("distance", DISTANCES)
def test_duplicate_rows(rng, distance):
    e, labels = make_batch(rng, n=9, d=3)
    e[4] = e[1]  # a positive (or negative) at distance exactly 0
    labels[4] = labels[1]
    e[6] = e[2]
    labels[6] = (labels[2] + 1) % 3
    for mining in MININGS:
        res, want = run_both(e, labels, mining=mining, distance=distance, margin=MARGIN[distance])
        assert np.all(np.isfinite(res.grad))
        check_result(res, *want, np.float64, atol=1e-7)


def test_nan_propagates(rng):
    e, labels = make_batch(rng, n=8, d=3)
    e[2, 1] = np.nan
    for mining in ["hard", "all"]:
        assert np.isnan(float(fl.batch_triplet_loss(e, labels, mining=mining).loss))


# ---------------------------------------------------------------- hard mining by blocks
#
# mining="hard" takes the upper triangle of the Gram matrix in hard_mining.HARD_GEMM_BLOCKS column
# blocks, each mined from both sides in slices of at most hard_mining.HARD_BLOCK columns; a NaN
# distance sends it back to the full-Gram path (batch_mining.batch_mine).  Small slices and many
# blocks make small batches span many of them.


def both_paths(monkeypatch, e, labels, block, gemm_blocks=None, **kw):
    """(blocked: slices of ``block`` columns, ``gemm_blocks`` gemm blocks (default: one per
    slice); full-Gram) results of one hard-mining call."""
    with monkeypatch.context() as m:
        m.setattr(hard_mining, "HARD_BLOCK", block)
        m.setattr(hard_mining, "HARD_GEMM_BLOCKS",
                  -(-e.shape[0] // block) if gemm_blocks is None else gemm_blocks)
        blocked = fl.batch_triplet_loss(e, labels, **kw)
        m.setattr(batch_mining, "batch_hard_blocked", lambda *args: None)
        full = fl.batch_triplet_loss(e, labels, **kw)
    return blocked, full


def assert_same(a, b):
    np.testing.assert_array_equal(np.asarray(a.loss), np.asarray(b.loss))
    if a.grad is None:
        assert b.grad is None
    else:
        assert a.grad.dtype == b.grad.dtype
        np.testing.assert_array_equal(a.grad, b.grad)


def integer_batch(rng, n, d, classes, dtype):
    """Small-integer embeddings: the Gram matrix is exact (either path, any block), and exact
    ties between distances abound (so does the tie rule's work)."""
    e = rng.integers(-2, 3, size=(n, d)).astype(dtype)
    labels = rng.integers(0, classes, size=n)
    labels[:classes] = np.arange(classes)
    return e, labels


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean"])
@pytest.mark.parametrize("block, gemm_blocks", [(1, None), (2, None), (3, None), (8, None),
                                                (32, None), (256, 4), (5, 3), (8, 2), (16, 1),
                                                (7, 4), (hard_mining.HARD_BLOCK_MAX, 1)])
def test_hard_blocks_equal_the_full_gram_path_bit_for_bit(rng, monkeypatch, block, gemm_blocks,
                                                          distance, dtype):
    # exact distances: the same selections (lowest index on ties) and the same bits, whatever
    # the blocks and slices; odd sizes leave partial last blocks and odd row counts
    for n, d, classes in [(77, 3, 5), (64, 2, 4), (9, 1, 3), (2, 2, 2), (1, 3, 1)]:
        e, labels = integer_batch(rng, n, d, classes, dtype)
        for soft, reduction in [(False, "none"), (False, "mean"), (True, "sum")]:
            kw = dict(distance=distance, margin=MARGIN[distance], soft=soft, reduction=reduction)
            blocked, full = both_paths(monkeypatch, e, labels, block, gemm_blocks, **kw)
            assert_same(blocked, full)
        blocked, full = both_paths(monkeypatch, e, labels, block, gemm_blocks, distance=distance,
                                   grad=False)
        assert_same(blocked, full)


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda d: np.dtype(d).name)
def test_hard_blocks_match_reference(rng, monkeypatch, dtype, distance, soft):
    e, labels = make_batch(rng, n=70, d=6, classes=6, dtype=dtype)
    monkeypatch.setattr(hard_mining, "HARD_BLOCK", 7)  # slices of 7 columns in gemm blocks of 16
    monkeypatch.setattr(hard_mining, "HARD_GEMM_BLOCKS", 5)
    for reduction in REDUCTIONS:
        kw = dict(distance=distance, margin=MARGIN[distance], soft=soft, reduction=reduction)
        check_result(fl.batch_triplet_loss(e, labels, **kw),
                     *naive.batch_triplet_loss(e, labels, **kw), dtype)


@pytest.mark.parametrize("distance", DISTANCES)
def test_hard_blocks_agree_with_full_gram_at_default_block(rng, monkeypatch, distance):
    # the default blocks and slices; random float64 rows (no near ties): the same selections
    e, labels = make_batch(rng, n=1100, d=12, classes=20)
    blocked, full = both_paths(monkeypatch, e, labels, hard_mining.HARD_BLOCK,
                               hard_mining.HARD_GEMM_BLOCKS, distance=distance,
                               margin=MARGIN[distance], reduction="none")
    np.testing.assert_allclose(blocked.loss, full.loss, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(blocked.grad, full.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("block, gemm_blocks", [(4, None), (7, None), (128, None), (7, 4),
                                                (64, 2)])
def test_hard_ties_across_blocks_go_to_the_lowest_index(rng, monkeypatch, block, gemm_blocks):
    # exact ties between candidates in different blocks, for an anchor in the first block (its
    # candidates all found as the rows of later blocks), one in a middle block (tied candidates
    # below its block, found as a column of its own block, and above, found as a row of later
    # blocks) and one in the last block (all below: as a column)
    n = 300
    e = rng.integers(-3, 4, size=(n, 2)).astype(np.float64) + 20.0
    labels = 1 + np.arange(n) % 7
    cases = [  # anchor, its classes, (nearer positive, tied farthest ones), (farther negative,
               # tied nearest ones); the expected picks are the lowest tied indices
        (0, (0, 8), (5, 140, 260), (3, 130, 270)),
        (150, (9, 10), (151, 60, 149, 290), (152, 10, 280)),
        (299, (11, 12), (298, 100, 200), (297, 50, 250)),
    ]
    for a, (ya, yn), pos, neg in cases:
        base = np.array([-20.0 * (a + 1), 0.0])
        e[a] = base
        labels[a] = ya
        e[pos[0]] = base + [1.0, 0.0]
        for k, j in enumerate(pos[1:]):
            e[j] = base + [[2.0, 0.0], [0.0, 2.0], [-2.0, 0.0]][k]  # all at distance 2
        labels[list(pos)] = ya
        e[neg[0]] = base + [0.0, 1.5]
        for k, j in enumerate(neg[1:]):
            e[j] = base + [[0.0, -1.0], [1.0, 0.0]][k]  # both at distance 1
        labels[list(neg)] = yn
    monkeypatch.setattr(hard_mining, "HARD_BLOCK", block)
    monkeypatch.setattr(hard_mining, "HARD_GEMM_BLOCKS", -(-n // block) if gemm_blocks is None
                        else gemm_blocks)
    # the selections themselves
    cls = np.unique(labels, return_inverse=True)[1].astype(np.int32)
    records = batch_mining.Records(np.arange(0, 2 * n + 1, 2), np.empty(2 * n, np.int64),
                                   np.empty(2 * n))
    rule = batch_mining.MiningRule(batch_mining.DISTANCES["euclidean"], 1.0, False)
    assert hard_mining.batch_hard_blocked(e, cls, rule, records, np.zeros(n))
    for a, _, pos, neg in cases:
        assert (records.j[2 * a], records.j[2 * a + 1]) == (min(pos[1:]), min(neg[1:]))
    res = fl.batch_triplet_loss(e, labels, margin=1.0, reduction="none")
    check_result(res, *naive.batch_triplet_loss(e, labels, margin=1.0, reduction="none"),
                 np.float64)
    blocked, full = both_paths(monkeypatch, e, labels, block, gemm_blocks, margin=1.0,
                               reduction="none")
    assert_same(blocked, full)


@pytest.mark.parametrize("where", [0, 37, 39])
def test_hard_nan_takes_the_full_gram_path(rng, monkeypatch, where):
    # a NaN found in the first or the last block: the result is the full-Gram path's, NaN
    # rule included (its first NaN wins, and reaches the loss)
    e, labels = make_batch(rng, n=40, d=3, classes=4)
    e[where, 1] = np.nan
    for distance in DISTANCES:
        for reduction in ["none", "mean"]:
            blocked, full = both_paths(monkeypatch, e, labels, 4, 5, distance=distance,
                                       reduction=reduction)
            assert_same(blocked, full)
            assert np.isnan(blocked.loss).any()
    # no NaN in the inputs, but in the distances: inf - inf
    e, labels = make_batch(rng, n=40, d=3, classes=4)
    e[where, 0] = np.inf
    blocked, full = both_paths(monkeypatch, e, labels, 8, reduction="none")
    assert_same(blocked, full)


def test_hard_blocks_zero_norm_and_duplicate_rows(rng, monkeypatch):
    e, labels = make_batch(rng, n=30, d=3, classes=3)
    e[[4, 17]] = 0.0  # cosine: clamped norms
    e[20] = e[2]
    labels[20] = labels[2]
    e[25] = e[9]
    labels[25] = (labels[9] + 1) % 3
    monkeypatch.setattr(hard_mining, "HARD_BLOCK", 5)
    monkeypatch.setattr(hard_mining, "HARD_GEMM_BLOCKS", 3)
    for distance in DISTANCES:
        kw = dict(distance=distance, margin=MARGIN[distance], reduction="none")
        res = fl.batch_triplet_loss(e, labels, **kw)
        assert np.all(np.isfinite(res.grad))
        check_result(res, *naive.batch_triplet_loss(e, labels, **kw), np.float64, atol=1e-7)


def test_hard_block_larger_than_its_buffer_raises(rng, monkeypatch):
    e, labels = make_batch(rng, n=hard_mining.HARD_BLOCK_MAX + 3, d=2)
    monkeypatch.setattr(hard_mining, "HARD_BLOCK", hard_mining.HARD_BLOCK_MAX + 1)
    with pytest.raises(ValueError, match="HARD_BLOCK"):
        fl.batch_triplet_loss(e, labels)


# ---------------------------------------------------------------- torch parity


@pytest.mark.parametrize("soft", [False, True])
def test_torch_batch_hard(rng, soft):
    """Hermans et al.'s batch-hard loss written in torch (masked max / min over cdist)."""
    torch = pytest.importorskip("torch")
    e, labels = make_batch(rng, n=16, d=4, classes=4)
    x = torch.tensor(e, requires_grad=True)
    y = torch.tensor(labels)
    d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    same = y[:, None] == y[None, :]
    eye = torch.eye(16, dtype=torch.bool)
    hardest_pos = torch.where(same & ~eye, d, torch.full_like(d, -1.0)).max(dim=1).values
    hardest_neg = torch.where(~same, d, torch.full_like(d, float("inf"))).min(dim=1).values
    z = hardest_pos - hardest_neg + (0.0 if soft else 1.0)
    terms = torch.nn.functional.softplus(z) if soft else torch.relu(z)
    loss = terms.mean()
    loss.backward()
    res = fl.batch_triplet_loss(e, labels, margin=0.0 if soft else 1.0, soft=soft)
    check_result(res, loss.item(), x.grad.numpy(), np.float64)


# ---------------------------------------------------------------- the interface


def test_grad_false(rng):
    e, labels = make_batch(rng)
    for mining in MININGS:
        res = fl.batch_triplet_loss(e, labels, mining=mining, grad=False)
        assert res.grad is None
        np.testing.assert_allclose(float(res.loss), naive.batch_triplet_loss(e, labels, mining=mining)[0],
                                   rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16], ids=lambda d: np.dtype(d).name)
def test_grad_out_reuse_and_in_place(rng, dtype):
    e, labels = make_batch(rng, dtype=dtype)
    for mining in MININGS:
        fresh = fl.batch_triplet_loss(e, labels, mining=mining)
        out = np.full_like(e, 9.0)
        for _ in range(2):
            res = fl.batch_triplet_loss(e, labels, mining=mining, grad_out=out)
            assert res.grad is out
            np.testing.assert_array_equal(out.view(np.uint8), fresh.grad.view(np.uint8))
        e2 = e.copy()
        res = fl.batch_triplet_loss(e2, labels, mining=mining, grad_out=e2)
        assert res.grad is e2
        np.testing.assert_array_equal(e2, fresh.grad)


def test_non_contiguous(rng):
    big = rng.normal(size=(26, 9))
    e = big[::2, ::3]
    labels = np.arange(26)[::2] % 4
    res, want = run_both(e, labels, mining="semihard")
    check_result(res, *want, np.float64)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda d: np.dtype(d).name)
def test_parallel_path_matches_reference_and_serial(rng, dtype, monkeypatch):
    e, labels = make_batch(rng, n=40, d=7, classes=5, dtype=dtype)
    results = {}
    for threshold in [0, 1 << 62]:  # every kernel parallel, then every kernel serial
        monkeypatch.setattr(batch_mining, "BATCH_PARALLEL_MIN_WORK", threshold)
        results[threshold] = [fl.batch_triplet_loss(e, labels, mining=m, distance=dist,
                                                    reduction="none", margin=MARGIN[dist])
                              for m in MININGS for dist in ["euclidean", "cosine"]]
    k = 0
    for m in MININGS:
        for dist in ["euclidean", "cosine"]:
            par, ser = results[0][k], results[1 << 62][k]
            np.testing.assert_array_equal(par.loss, ser.loss)
            np.testing.assert_array_equal(par.grad, ser.grad)
            if m != "all":
                check_result(par, *naive.batch_triplet_loss(e, labels, mining=m, distance=dist,
                                                            reduction="none", margin=MARGIN[dist]),
                             dtype)
            k += 1


def test_large_batch_hard(rng):
    e, labels = make_batch(rng, n=200, d=16, classes=10, dtype=np.float32)
    res, want = run_both(e, labels, margin=1.0)
    check_result(res, *want, np.float32)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("change,name", [
    (dict(embeddings=np.zeros(12)), "embeddings"),
    (dict(embeddings=np.zeros((2, 6, 3))), "embeddings"),
    (dict(embeddings=np.zeros((12, 3), np.int32)), "embeddings"),
    (dict(labels=np.zeros(11, np.int64)), "labels"),
    (dict(labels=np.zeros((12, 1), np.int64)), "labels"),
    (dict(labels=np.zeros(12)), "labels"),
    (dict(mining="easy"), "mining"),
    (dict(distance="l1"), "distance"),
    (dict(margin=-1.0), "margin"),
    (dict(reduction="max"), "reduction"),
    (dict(grad_out=np.zeros((12, 4))), "grad_out"),
    (dict(grad_out=np.zeros((12, 3), np.float32)), "grad_out"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_raises_and_changes_nothing(rng, change, name):
    e = rng.normal(size=(12, 3))
    kw = dict(embeddings=e, labels=np.arange(12) % 3)
    kw.update(change)
    before = e.copy()
    with pytest.raises((ValueError, TypeError), match=name):
        fl.batch_triplet_loss(**kw)
    np.testing.assert_array_equal(e, before)
