"""fastloss.batch_triplet_loss (online triplet mining) against naive.py's brute force, on both
sides.

A test that takes ``backend`` runs on the CPU and on the GPU path (``dev`` moves its
arrays to that side and back); on the "cuda" side ``run`` also checks the CPU path's
answer.  A test marked ``cpu`` or ``cuda`` is about that side alone: the CPU's chunks,
blocked hard mining, parallel path, finite differences and torch; the GPU's threads per
block.  The simulator runs tiny batches (its pairwise kernel has 4 x 4 tiles: 7 rows span
a partial one): ``SIZES`` holds each side's where they differ.
"""
import numpy as np
import pytest

import fastloss as fl
import naive
import sides
from fastloss.cpu import batch_mining
from fastloss.cpu import hard_mining
from naive import check_result, finite_difference

REDUCTIONS = ["mean", "sum", "none"]
DISTANCES = ["euclidean", "squared_euclidean", "cosine"]
MININGS = ["hard", "semihard", "all"]
MARGIN = {"euclidean": 0.7, "squared_euclidean": 3.0, "cosine": 0.3}

#: per side, (rows, features) of the tests that name them: the CPU tests' and the simulator's
SIZES = {"cpu": {"reference": (13, 5), "soft": (11, 4), "low_precision": (12, 6),
                 "all_mean": (10, 3), "far_apart": (4, 2), "grad_out": (13, 5),
                 "grad_false": (13, 5), "non_contiguous": (26, 9), "duplicates": (9, 3),
                 "extremes": (8, 3)},
         "cuda": {"reference": (7, 5), "soft": (7, 4), "low_precision": (7, 7),
                  "all_mean": (7, 3), "far_apart": (3, 2), "grad_out": (7, 3),
                  "grad_false": (7, 5), "non_contiguous": (14, 9), "duplicates": (7, 3),
                  "extremes": (7, 3)}}


def dtype_id(d):
    return np.dtype(d).name


def make_batch(rng, n=13, d=5, classes=3, dtype=np.float64):
    e = rng.normal(size=(n, d)).astype(dtype)
    labels = rng.integers(0, classes, size=n)
    labels[:classes] = np.arange(classes)  # every class present
    return e, labels


def run(backend, dev, e, labels, **kw):
    """batch_triplet_loss on the test's side, on the host: the side's arrays in, the side's
    arrays out, the loss of the embeddings' dtype; on the "cuda" side the result is checked
    against the CPU path's (NaN where it has NaN)."""
    args = dev.put(e), dev.put(np.asarray(labels))
    res = fl.batch_triplet_loss(*args, **kw)
    assert isinstance(res.loss, type(args[0]))
    assert res.grad is None or type(res.grad) is type(args[0])
    got = sides.on_host(res, dev)
    assert got.loss.dtype == e.dtype
    if backend == "cuda":
        cpu = fl.batch_triplet_loss(e, labels, **kw)
        check_result(got, np.asarray(cpu.loss, np.float64),
                     None if cpu.grad is None else cpu.grad.astype(np.float64), e.dtype)
    return got


def check(backend, dev, e, labels, dtype=np.float64, **kw):
    """``run``, checked against the float64 brute force; returns the side's result."""
    got = run(backend, dev, e, labels, **kw)
    check_result(got, *naive.batch_triplet_loss(e, labels, **kw), dtype)
    return got


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", MININGS)
def test_matches_reference(rng, backend, dev, mining, distance, reduction):
    n, d = SIZES[backend]["reference"]
    e, labels = make_batch(rng, n, d)
    got = check(backend, dev, e, labels, mining=mining, distance=distance, margin=MARGIN[distance],
                reduction=reduction)
    if reduction == "mean":
        assert isinstance(float(got.loss), float)


def _soft_cases(backend, distance):
    """(margin, reduction) of the soft margin: the CPU all three; the simulator one reduction
    per distance."""
    if backend == "cpu":
        return [(0.0, "mean"), (MARGIN[distance], "none"), (MARGIN[distance], "sum")]
    return [{"euclidean": (0.0, "mean"), "cosine": (MARGIN[distance], "sum"),
             "squared_euclidean": (MARGIN[distance], "none")}[distance]]


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", MININGS)
def test_soft_margin(rng, backend, dev, mining, distance):
    e, labels = make_batch(rng, *SIZES[backend]["soft"])
    for margin, reduction in _soft_cases(backend, distance):
        check(backend, dev, e, labels, mining=mining, distance=distance, soft=True, margin=margin,
              reduction=reduction)


@pytest.mark.parametrize("backend, mining, distance, dtype", sides.per_side(
    lambda side: [(m, dist, dt) for m in MININGS
                  for dist in (DISTANCES if side == "cpu" else ["euclidean", "cosine"])
                  for dt in (np.float32, np.float16)]),
    ids=lambda v: dtype_id(v) if isinstance(v, type) else v)
def test_low_precision(rng, backend, dev, mining, distance, dtype):
    n, d = SIZES[backend]["low_precision"]
    e, labels = make_batch(rng, n, d, dtype=dtype)
    got = check(backend, dev, e, labels, dtype, mining=mining, distance=distance,
                margin=MARGIN[distance], reduction="mean")
    assert got.grad.dtype == np.dtype(dtype)


@pytest.mark.cpu
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


def test_hard_mining_picks_farthest_positive_and_nearest_negative(backend, dev):
    # 1-D embeddings, two classes: anchor 0 at 0 has positives at 1 and 3 and negatives at 2, 5
    e = np.array([[0.0], [1.0], [3.0], [2.0], [5.0]])
    labels = np.array([0, 0, 0, 1, 1])
    got = check(backend, dev, e, labels, margin=1.0, reduction="none")
    # anchor 0: d(0, 3) = 3 (farthest positive), d(0, 2) = 2 (nearest negative): 3 - 2 + 1
    # anchor 1 (at 1): farthest positive 3 -> 2; nearest negative 2 -> 1: 2 - 1 + 1
    # anchor 2 (at 3): farthest positive 0 -> 3; nearest negative 2 -> 1: 3 - 1 + 1
    # anchor 3 (at 2): positive row 4 -> 3; nearest negatives rows 1 and 2, both at 1: 3 - 1 + 1
    # anchor 4 (at 5): positive row 3 -> 3; nearest negative row 2 -> 2: 3 - 2 + 1
    np.testing.assert_allclose(got.loss, [2.0, 2.0, 3.0, 3.0, 2.0], rtol=1e-12)
    # anchor 3's tie goes to the lower index, row 1: d/d e_1 = -d|e_1 - e_3|/d e_1 = +1 from it
    # (row 1 is in no other term); row 2 gets +1 as anchors 0's and 1's positive, +1 as anchor
    # 4's negative, 0 as an anchor (the tie going to row 2 would give 0 and 2)
    mean = run(backend, dev, e, labels, margin=1.0)
    np.testing.assert_allclose(mean.grad[[1, 2], 0], [1.0 / 5, 3.0 / 5], rtol=1e-12)
    # exact ties everywhere (integer points, several of the simulator's tiles), squared
    # distances too.  (Not cosine: there 1 - g / (|x| |y|) of equal angles may differ in the
    # last bit, FMA or not, and a tie broken by round-off may go either way on either backend.)
    e = np.random.default_rng(5).integers(-2, 3, size=(12, 3)).astype(np.float64)
    labels = np.arange(12) % 3
    for distance in DISTANCES[:2]:
        check(backend, dev, e, labels, distance=distance, margin=MARGIN[distance], reduction="none")


@pytest.mark.cpu
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


def test_semihard_prefers_the_nearest_negative_farther_than_the_positive(backend, dev):
    e = np.array([[0.0], [2.0], [1.0], [3.0], [-2.5]])
    labels = np.array([0, 0, 1, 1, 1])
    got = check(backend, dev, e, labels, mining="semihard", margin=1.0, reduction="none")
    # anchor 0: positive 1 at 2; negatives at 1, 3 (d=3), -2.5 (d=2.5): nearest farther than 2 is
    # 2.5 -> 2 - 2.5 + 1 = 0.5.  anchor 1 (at 2): positive 0 at 2; negatives at d 1, 1, 4.5:
    # 4.5 -> 2 - 4.5 + 1 < 0 -> 0.  anchor 2 (at 1): positives 3 (d=2), 4 (d=3.5); negatives
    # 0 (d=1), 1 (d=1): none farther -> farthest (d=1, lowest index 0): 2 and 3.5 -> 2 + 3.5.
    np.testing.assert_allclose(got.loss[:3], [0.5, 0.0, 2.0 + 3.5], rtol=1e-12)
    # strictly farther: a negative at exactly d(a, p) does not qualify
    e = np.array([[0.0], [2.0], [-2.0], [3.0]])
    got = run(backend, dev, e, np.array([0, 0, 1, 1]), mining="semihard", margin=1.0,
              reduction="none")
    assert got.loss[0] == 0.0  # 2 - 3 + 1, not 2 - 2 + 1


def test_all_mean_counts_positive_terms(rng, backend, dev):
    n, d = SIZES[backend]["all_mean"]
    e, labels = make_batch(rng, n, d)
    kw = dict(mining="all", margin=0.5)
    s = float(check(backend, dev, e, labels, reduction="sum", **kw).loss)
    m = float(check(backend, dev, e, labels, reduction="mean", **kw).loss)
    # count the positive terms by brute force
    dist = np.linalg.norm(e[:, None] - e[None], axis=-1)
    count = sum(dist[a, p] - dist[a, q] + 0.5 > 0
                for a in range(n) for p in range(n) for q in range(n)
                if a != p and labels[a] == labels[p] and labels[q] != labels[a])
    assert 0 < count
    np.testing.assert_allclose(m * count, s, rtol=1e-12)


def test_all_without_positive_loss_is_zero(rng, backend, dev):
    # classes far apart: every z < 0, an empty "all" mean is 0 with a zero gradient
    k, d = SIZES[backend]["far_apart"]
    e = np.concatenate([rng.normal(size=(k, d)) * 0.01, 100 + rng.normal(size=(k, d)) * 0.01])
    got = run(backend, dev, e, np.repeat([0, 1], k), mining="all", margin=1.0)
    assert float(got.loss) == 0.0
    np.testing.assert_array_equal(got.grad, np.zeros_like(e))


@pytest.mark.parametrize("mining", MININGS)
def test_singleton_class_has_no_positive(rng, backend, dev, mining):
    e, _ = make_batch(rng, n=8, d=3)
    labels = np.array([6, 0, 0, 5, 1, 1, 1, 7])  # rows 0, 3 and 7 are alone in their classes
    for reduction in REDUCTIONS:
        got = check(backend, dev, e, labels, mining=mining, reduction=reduction, margin=1.0)
        if reduction == "none":
            # as an anchor it contributes nothing (as a negative it may)
            np.testing.assert_array_equal(got.loss[[0, 3, 7]], 0.0)


@pytest.mark.parametrize("mining", MININGS)
def test_one_class_has_no_negative(rng, backend, dev, mining):
    e, _ = make_batch(rng, n=6, d=3)
    labels = np.full(6, 4)
    got = run(backend, dev, e, labels, mining=mining)
    if mining == "all":
        assert float(got.loss) == 0.0  # "all": 0 when no triplet has positive loss
    else:
        assert np.isnan(float(got.loss))  # an empty mean
    np.testing.assert_array_equal(got.grad, np.zeros_like(e))
    assert float(run(backend, dev, e, labels, mining=mining, reduction="sum").loss) == 0.0
    np.testing.assert_array_equal(run(backend, dev, e, labels, mining=mining,
                                      reduction="none").loss, np.zeros(6))
    want_loss, want_grad = naive.batch_triplet_loss(e, labels, mining=mining)
    assert np.isnan(want_loss) == np.isnan(float(got.loss))


@pytest.mark.parametrize("backend, mining, distance, dtype", sides.per_side(
    lambda side: [(m, dist, dt) for m in MININGS for dist in DISTANCES
                  for dt in ((np.float64, np.float32) if side == "cpu" else (np.float64,))]),
    ids=lambda v: dtype_id(v) if isinstance(v, type) else v)
def test_identical_embeddings(backend, dev, mining, distance, dtype):
    e = np.tile(np.array([[0.3, -1.2, 2.0]], dtype), (6, 1))
    labels = np.array([0, 0, 1, 1, 2, 2])
    # (no comparison of the sides: a cosine gradient here is round-off, of either sign)
    res = fl.batch_triplet_loss(dev.put(e), dev.put(labels), mining=mining, distance=distance,
                                margin=0.5)
    got = sides.on_host(res, dev)
    assert np.isfinite(float(got.loss)) and np.all(np.isfinite(got.grad))
    # every distance is 0 (up to the Gram matrix's round-off): every term is the margin
    tol = 1e-6 if dtype == np.float64 else 2e-3
    np.testing.assert_allclose(float(got.loss), 0.5, atol=tol)
    if distance != "cosine":
        np.testing.assert_array_equal(got.grad, np.zeros_like(e))


@pytest.mark.parametrize("distance", DISTANCES)
def test_duplicate_rows(rng, backend, dev, distance):
    e, labels = make_batch(rng, *SIZES[backend]["duplicates"])
    e[4] = e[1]  # a positive at distance exactly 0
    labels[4] = labels[1]
    e[6] = e[2]  # a negative at distance exactly 0
    labels[6] = (labels[2] + 1) % 3
    for mining in MININGS:
        got = run(backend, dev, e, labels, mining=mining, distance=distance,
                  margin=MARGIN[distance])
        assert np.all(np.isfinite(got.grad))
        check_result(got, *naive.batch_triplet_loss(e, labels, mining=mining, distance=distance,
                                                    margin=MARGIN[distance]), np.float64, atol=1e-7)


def test_extreme_values_stay_finite(rng, backend, dev):
    e, labels = make_batch(rng, *SIZES[backend]["extremes"])
    e *= 1e4
    for mining, distance in (("hard", "euclidean"), ("semihard", "cosine"), ("all", "euclidean")):
        got = check(backend, dev, e, labels, mining=mining, distance=distance, margin=1e4)
        assert np.isfinite(float(got.loss)) and np.all(np.isfinite(got.grad))


def test_nan_propagates(rng, backend, dev):
    e, labels = make_batch(rng, n=8, d=3)
    e[2, 1] = np.nan
    for mining in MININGS:
        for distance in ("euclidean", "cosine"):  # on the "cuda" side, NaN where the CPU has it
            got = run(backend, dev, e, labels, mining=mining, distance=distance, reduction="none")
            assert np.isnan(got.loss[2]) and np.isnan(got.grad[2]).any()
        assert np.isnan(float(run(backend, dev, e, labels, mining=mining).loss))


def test_empty_batch(backend, dev):
    e = np.zeros((0, 4))
    labels = np.zeros(0, np.int64)
    for mining in MININGS:
        got = run(backend, dev, e, labels, mining=mining)
        assert got.grad.shape == (0, 4)
        assert (float(got.loss) == 0.0) if mining == "all" else np.isnan(float(got.loss))
    assert float(run(backend, dev, e, labels, reduction="sum").loss) == 0.0
    assert run(backend, dev, e, labels, reduction="none").loss.shape == (0,)


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


@pytest.mark.cpu
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


@pytest.mark.cpu
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


@pytest.mark.cpu
@pytest.mark.parametrize("distance", DISTANCES)
def test_hard_blocks_agree_with_full_gram_at_default_block(rng, monkeypatch, distance):
    # the default blocks and slices; random float64 rows (no near ties): the same selections
    e, labels = make_batch(rng, n=1100, d=12, classes=20)
    blocked, full = both_paths(monkeypatch, e, labels, hard_mining.HARD_BLOCK,
                               hard_mining.HARD_GEMM_BLOCKS, distance=distance,
                               margin=MARGIN[distance], reduction="none")
    np.testing.assert_allclose(blocked.loss, full.loss, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(blocked.grad, full.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.cpu
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


@pytest.mark.cpu
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


@pytest.mark.cpu
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


@pytest.mark.cpu
def test_hard_block_larger_than_its_buffer_raises(rng, monkeypatch):
    e, labels = make_batch(rng, n=hard_mining.HARD_BLOCK_MAX + 3, d=2)
    monkeypatch.setattr(hard_mining, "HARD_BLOCK", hard_mining.HARD_BLOCK_MAX + 1)
    with pytest.raises(ValueError, match="HARD_BLOCK"):
        fl.batch_triplet_loss(e, labels)


# ---------------------------------------------------------------- torch parity


@pytest.mark.cpu
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


#: label dtypes, and the values that stand for the classes 0, 1 and 2 (compared for equality only)
LABEL_VALUES = [(np.int8, [7, -3, 100]), (np.uint16, [7, 3, 65535]), (np.int32, [-2**31, 0, 5]),
                (np.int64, [-1, -2, -3]), (np.uint64, [2**40, 3, 2**62])]


def _label_cases(side):
    """(dtype, values, mining, reduction): the CPU every mining per dtype; the simulator one."""
    if side == "cpu":
        return [(dt, v, m, "none") for dt, v in LABEL_VALUES for m in MININGS]
    return [(dt, v, MININGS[k % 3], REDUCTIONS[k % 3]) for k, (dt, v) in enumerate(LABEL_VALUES)]


@pytest.mark.parametrize("backend, dtype, values, mining, reduction", sides.per_side(_label_cases),
                         ids=lambda v: dtype_id(v) if isinstance(v, type) else
                         (None if isinstance(v, list) else v))
def test_any_integer_labels(rng, backend, dev, dtype, values, mining, reduction):
    e, labels = make_batch(rng, n=SIZES[backend]["all_mean"][0], d=3)
    odd = np.array(values, dtype)[labels]
    got = check(backend, dev, e, odd, mining=mining, reduction=reduction)
    if backend == "cpu":  # the same bits as with the labels 0, 1, 2
        plain = fl.batch_triplet_loss(e, labels, mining=mining, reduction=reduction)
        np.testing.assert_array_equal(got.loss, plain.loss)
        np.testing.assert_array_equal(got.grad, plain.grad)


def test_grad_false(rng, backend, dev):
    e, labels = make_batch(rng, *SIZES[backend]["grad_false"])
    for mining in MININGS:
        got = run(backend, dev, e, labels, mining=mining, grad=False)
        assert got.grad is None
        np.testing.assert_allclose(float(got.loss),
                                   naive.batch_triplet_loss(e, labels, mining=mining)[0], rtol=1e-12)


@pytest.mark.parametrize("backend, dtype", sides.per_side(
    lambda side: [(d,) for d in ((np.float64, np.float32, np.float16) if side == "cpu"
                                 else (np.float64, np.float16))]),
    ids=lambda v: dtype_id(v) if isinstance(v, type) else v)
def test_grad_out_reuse_and_in_place(rng, backend, dev, dtype):
    e, labels = make_batch(rng, *SIZES[backend]["grad_out"], dtype=dtype)
    dl = dev.put(labels)
    minings = MININGS if backend == "cpu" else {np.float64: ("hard", "all"),
                                                np.float16: ("semihard",)}[dtype]
    for mining in minings:
        fresh = sides.on_host(fl.batch_triplet_loss(dev.put(e), dl, mining=mining), dev)
        out = dev.put(np.full_like(e, 9.0))
        for _ in range(2):  # reused: the same bits every time
            res = fl.batch_triplet_loss(dev.put(e), dl, mining=mining, grad_out=out)
            assert res.grad is out
            np.testing.assert_array_equal(dev.get(out).view(np.uint8), fresh.grad.view(np.uint8))
        de = dev.put(e)
        res = fl.batch_triplet_loss(de, dl, mining=mining, grad_out=de)  # through a temporary
        assert res.grad is de
        np.testing.assert_array_equal(dev.get(de), fresh.grad)


def test_non_contiguous(rng, backend, dev):
    big = rng.normal(size=SIZES[backend]["non_contiguous"])
    labels = np.arange(big.shape[0]) % 4
    views = dev.put(big)[::2, ::3], dev.put(labels)[::2]
    for mining, distance in (("semihard", "euclidean"), ("all", "cosine")):
        res = fl.batch_triplet_loss(*views, mining=mining, distance=distance)
        check_result(sides.on_host(res, dev), *naive.batch_triplet_loss(big[::2, ::3], labels[::2],
                                                               mining=mining, distance=distance),
                     np.float64)


def test_backend_with_numpy_returns_numpy(rng, backend):
    e, labels = make_batch(rng, n=7, d=3)
    res = fl.batch_triplet_loss(e, labels, backend=backend)
    assert type(res.loss) is np.ndarray and type(res.grad) is np.ndarray
    check_result(res, *naive.batch_triplet_loss(e, labels), np.float64)
    out = np.zeros_like(e)
    assert fl.batch_triplet_loss(e, labels, grad_out=out, backend=backend).grad is out
    np.testing.assert_array_equal(out, res.grad)


@pytest.mark.cpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=dtype_id)
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


@pytest.mark.cpu
def test_large_batch_hard(rng):
    e, labels = make_batch(rng, n=200, d=16, classes=10, dtype=np.float32)
    check_result(fl.batch_triplet_loss(e, labels, margin=1.0),
                 *naive.batch_triplet_loss(e, labels, margin=1.0), np.float32)


@pytest.mark.cuda
def test_threads_per_block(rng, threads_per_block):
    e, labels = make_batch(rng, n=12, d=8, classes=4)
    for mining, distance in (("hard", "cosine"), ("semihard", "euclidean"), ("all", "squared_euclidean")):
        kw = dict(mining=mining, distance=distance, margin=MARGIN[distance], reduction="none")
        res = fl.batch_triplet_loss(e, labels, backend="cuda", **kw)
        check_result(res, *naive.batch_triplet_loss(e, labels, **kw), np.float64)


# ---------------------------------------------------------------- bad input


BAD_INPUT = [
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
]
#: a NumPy buffer beside device inputs
ON_THE_HOST = [(dict(grad_out="host"), "grad_out")]


@pytest.mark.parametrize("backend, change, name", sides.per_side(
    lambda side: BAD_INPUT + (ON_THE_HOST if side == "cuda" else [])),
    ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_raises_and_changes_nothing(rng, backend, dev, change, name):
    e = rng.normal(size=(12, 3))
    kw = dict(embeddings=dev.put(e), labels=dev.put(np.arange(12) % 3))
    for key, value in change.items():
        if isinstance(value, str) and value == "host":
            value = np.zeros((12, 3))
        elif isinstance(value, np.ndarray):
            value = dev.put(value)
        kw[key] = value
    passed = [kw["embeddings"]] + ([kw["grad_out"]] if "grad_out" in kw else [])
    befores = [np.array(dev.get(x), copy=True) for x in passed]
    with pytest.raises((ValueError, TypeError), match=name):
        fl.batch_triplet_loss(**kw)
    for x, before in zip(passed, befores):
        np.testing.assert_array_equal(dev.get(x), before)


# ---------------------------------------------------------------- the GPU's tiles and pair lists


def _pairwise_sizes():
    """(N, D) around the pairwise kernel's edges: one row, fewer rows than a tile, a tile,
    one past it, two tiles and a part; D below, at and past one staged step."""
    from fastloss.cuda import triplet as kernels
    t, k = kernels.PAIR_TILE, kernels.PAIR_K
    return [(1, 1), (1, k + 1), (t - 1, k - 1), (t, k), (t + 1, 1), (2 * t + 1, k + 1),
            (3 * t - 1, 2 * k + 3)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16], ids=dtype_id)
def test_pairwise_kernel_at_tile_edges(rng, dtype):
    """The upper-triangle kernel against float64: every entry, both triangles exactly
    equal, 0 on the diagonal and between duplicate rows, equal rows giving equal entries."""
    from numba import cuda
    from fastloss.cuda import triplet as kernels
    compute = np.float64 if dtype == np.float64 else np.float32
    for n, d in _pairwise_sizes():
        e = rng.normal(size=(n, d)).astype(dtype)
        if n > 3:
            e[n - 1] = e[1]  # a duplicate in another tile (or another part of one)
        ref = e.astype(np.float64)
        for dot in (False, True):
            m = cuda.to_device(np.full((n, n), np.nan, compute))
            kernels.pairwise_kernel[kernels.pair_tiles(n), (kernels.PAIR_SIDE, kernels.PAIR_SIDE)](
                cuda.to_device(e), dot, compute(0), m)
            got = m.copy_to_host()
            want = ref @ ref.T if dot else ((ref[:, None] - ref[None]) ** 2).sum(-1)
            tol = 1e-12 if compute == np.float64 else 1e-5
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1, d))
            assert (got == got.T).all()
            if not dot:
                assert (np.diag(got) == 0).all()
            if n > 3:
                assert (got[1] == got[n - 1]).all()
                if not dot:
                    assert got[1, n - 1] == 0


@pytest.mark.parametrize("backend, mining, distance", sides.per_side(
    lambda side: [(m, dist) for m in MININGS for dist in DISTANCES]))
def test_batch_sizes_at_tile_edges(rng, backend, dev, mining, distance):
    """Whole calls at batch sizes around the simulator's pairwise tiles (4 rows): one row
    (no triplet), a partial tile, one past it, two and a part."""
    for n, d in ((1, 3), (3, 2), (5, 5), (9, 4)):
        e, labels = make_batch(rng, n, d, classes=min(n, 3))
        check(backend, dev, e, labels, mining=mining, distance=distance, margin=MARGIN[distance],
              reduction="mean")


@pytest.mark.cuda
@pytest.mark.parametrize("threads", [1, 2])
def test_backward_with_few_threads(rng, threads):
    """The backward's pair lists built a block of candidates at a time and its column
    groups walked several times per thread: 1 or 2 threads for 11 columns and 9 rows."""
    from fastloss.cuda import _blocks
    _blocks.set_threads_per_block(threads)
    e, labels = make_batch(rng, n=9, d=11, classes=3)
    for mining, distance in (("hard", "euclidean"), ("semihard", "cosine"),
                             ("all", "squared_euclidean")):
        kw = dict(mining=mining, distance=distance, margin=MARGIN[distance], reduction="sum")
        res = fl.batch_triplet_loss(e, labels, backend="cuda", **kw)
        check_result(res, *naive.batch_triplet_loss(e, labels, **kw), np.float64)
