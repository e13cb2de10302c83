"""Hostile and odd input, for every public function (issue 6, part 5).

One table (``CASES``) holds each public function with a builder of a small
random valid call; every test below takes a valid call, mutates ONE thing into
something hostile or odd, and checks the contract of SPEC.md ("Bad input gets
a clear error, and nothing is changed"):

1. the call either returns a result that agrees with a reference (the same call
   on pristine, C-contiguous copies, bit for bit; or the float64 references of
   ``naive.py``), or raises ``ValueError``/``TypeError`` whose message names the
   offending argument;
2. never any other exception (no IndexError, ZeroDivisionError, Numba error,
   SystemError, crash);
3. inputs that are not documented as written are unchanged, and on an error
   nothing at all is (``centers`` compared bit for bit);
4. a ``grad_out`` is either fully written (and is the returned gradient) or,
   on an error, untouched.

What is decided here where SPEC.md is silent (and why):

* ``grad_out`` that shares memory with an input other than the first argument
  itself (``grad_out=target``, a view overlapping ``sample_weight``, ``weight``,
  the labels, or the logits shifted by one element): SPEC promises in-place
  only for ``grad_out=<first argument>``; anything else must give the correct
  gradient (the CPU writes through a temporary) or a ``ValueError`` naming
  ``grad_out`` (the GPU's softmax, focal and Huber losses refuse it; see
  tests/cuda/test_cuda_hostile_input.py).  ``grad_out`` overlapping ``centers`` is a ValueError (SPEC of
  center_loss: "must not share memory with centers").
* ``ignore_index`` equal to a valid class is legal: those rows are ignored.
* Lists are accepted wherever arrays are (SPEC: lists live on the CPU), except
  ``centers``, which is updated in place and must be a NumPy array.
* NaN in one element is confined as in PyTorch: the loss of that sample (or
  element) is NaN, every other sample's loss and gradient is unaffected; inf is
  only required not to leak into other samples.
* ``softcap=inf`` is the limit of soft-capping: no cap.
"""
import copy
import inspect

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
import naive
from hypothesis import given, settings
from hypothesis import strategies as st

import fastloss as fl

DTYPES = [np.float16, np.float32, np.float64]
WIDE = [np.float32, np.float64]
REDUCTIONS = ["mean", "sum", "none"]
FEW = settings(max_examples=3, deadline=None)
SOME = settings(max_examples=5, deadline=None)
ERRORS = (ValueError, TypeError)


# ====================================================================== the table


class Case:
    """One public function: how to build a valid call, make it, and check it.

    ``build(rng, dtype, n, c, reduction)`` returns the call's arguments as one
    dict (positional ones by name).  ``floats`` are the float array arguments,
    ``labels`` the integer ones, ``first`` the argument the gradient is taken
    against, ``rows`` maps an array argument to the axis that indexes samples.
    """

    def __init__(self, name, func, positional, build, floats, labels, first, *, writes=False,
                 same_dtype=False, sample_axes=None):
        self.name, self.func, self.positional, self.build = name, func, positional, build
        self.floats, self.labels, self.first = floats, labels, first
        self.writes = writes  # updates centers in place
        self.same_dtype = same_dtype  # float inputs must share one dtype (triplet)
        self.sample_axes = sample_axes or {}

    def arrays(self, kw):
        return [k for k in self.floats + self.labels if kw.get(k) is not None]

    def call(self, kw):
        """(raw result, outputs): outputs maps "loss", "grad", "grad0..2", "centers" to arrays."""
        kw = dict(kw)
        if self.name == "CenterLoss":
            return _call_center_object(kw)
        args = [kw.pop(k) for k in self.positional]
        raw = self.func(*args, **kw)
        outs = {}
        if self.name == "center_update":
            outs["centers"] = np.array(raw, copy=True)
            return raw, outs
        outs["loss"] = np.asarray(raw.loss)
        if isinstance(raw.grad, tuple):
            for k, g in enumerate(raw.grad):
                outs[f"grad{k}"] = np.array(g, copy=True)
        else:
            outs["grad"] = None if raw.grad is None else np.array(raw.grad, copy=True)
        if self.writes:
            centers = args[2] if self.name == "center_loss" else None
            outs["centers"] = np.array(centers, copy=True)
        return raw, outs

    def reference(self, kw):
        """The float64 references of naive.py for the call ``kw`` (outputs as in ``call``)."""
        kw = {k: (np.asarray(v) if isinstance(v, list) else v) for k, v in kw.items()}
        if self.name in ("center_loss", "CenterLoss", "center_update"):
            centers = kw["centers"]
            outs = {}
            if self.name != "center_update":
                loss, grad = naive.center_loss(kw["features"], kw["labels"], centers,
                                               reduction=kw.get("reduction", "mean"))
                outs = {"loss": loss, "grad": grad if kw.get("grad", True) else None}
            if kw.get("update", True) or self.name == "center_update":
                outs["centers"] = naive.center_update(centers, kw["features"], kw["labels"],
                                                      alpha=kw.get("alpha", 0.5))
            else:
                outs["centers"] = np.asarray(centers, np.float64)
            return outs
        ref = getattr(naive, self.func.__name__)
        accepted = inspect.signature(ref).parameters
        loss, grad = ref(**{k: v for k, v in kw.items() if k in accepted})
        if not kw.get("grad", True):
            grad = None
        if isinstance(grad, tuple):
            return {"loss": loss, **{f"grad{k}": g for k, g in enumerate(grad)}}
        return {"loss": loss, "grad": grad}


def _call_center_object(kw):
    centers = kw["centers"]
    try:
        K, D = np.shape(centers)
    except ValueError:  # not a matrix: then init is refused
        K, D = 3, 2
    try:
        dtype = np.asarray(centers).dtype  # a list of floats: float64
    except ValueError:
        dtype = None
    cl = fl.CenterLoss(K, D, alpha=kw.get("alpha", 0.5), init=centers,
                       dtype=dtype if dtype in (np.float32, np.float64) else "float32")
    before = cl.centers.copy()
    try:
        raw = cl(kw["features"], kw["labels"], update=kw.get("update", True),
                 reduction=kw.get("reduction", "mean"), grad=kw.get("grad", True),
                 grad_out=kw.get("grad_out"))
    except ERRORS:
        assert cl.centers.tobytes() == before.tobytes(), "CenterLoss.centers changed on an error"
        raise
    grad = None if raw.grad is None else np.array(raw.grad, copy=True)
    return raw, {"loss": np.asarray(raw.loss), "grad": grad, "centers": cl.centers.copy()}


def _classes(rng, dtype, n, c, reduction, *, prob, focal):
    x = (rng.normal(size=(n, c)) * 2).astype(dtype)
    if prob:
        t = rng.dirichlet(np.ones(c), size=n).astype(dtype) if c else np.zeros((n, 0), dtype)
    else:
        t = rng.integers(0, max(c, 1), size=n)
        if n > 2:
            t[-1] = -100  # one ignored row
    kw = {"logits": x, "target": t, "sample_weight": rng.uniform(0.5, 2.0, n).astype(dtype),
              "reduction": reduction, "grad": bool(rng.random() < 0.85)}
    if focal:
        kw.update(alpha=rng.uniform(0.25, 1.0, c).astype(dtype), gamma=1.5)
    else:
        kw.update(weight=rng.uniform(0.5, 2.0, c).astype(dtype), label_smoothing=0.05)
    return kw


def _sigmoid(rng, dtype, n, c, reduction):
    return {"logits": (rng.normal(size=(n, c)) * 2).astype(dtype),
                "targets": (rng.random((n, c)) < 0.4).astype(dtype), "reduction": reduction,
                "grad": bool(rng.random() < 0.85)}


def _huber(rng, dtype, n, c, reduction):
    return {"input": (rng.normal(size=(n, c)) * 2).astype(dtype),
                "target": rng.normal(size=(n, c)).astype(dtype),
                "sample_weight": rng.uniform(0.5, 2.0, (n, 1)).astype(dtype), "delta": 1.0,
                "reduction": reduction, "grad": bool(rng.random() < 0.85)}


def _triplet(rng, dtype, n, c, reduction):
    a, p, m = (rng.normal(size=(n, c)).astype(dtype) for _ in range(3))
    return {"anchor": a, "positive": p, "negative": m, "margin": 1.0,
                "distance": str(rng.choice(["euclidean", "squared_euclidean", "cosine"])),
                "swap": bool(rng.random() < 0.3), "reduction": reduction, "grad": bool(rng.random() < 0.85)}


def _batch(rng, dtype, n, c, reduction):
    return {"embeddings": rng.normal(size=(n, c)).astype(dtype),
                "labels": rng.integers(0, 3, size=n), "margin": 1.0,
                "mining": str(rng.choice(["hard", "semihard", "all"])),
                "distance": str(rng.choice(["euclidean", "squared_euclidean", "cosine"])),
                "soft": bool(rng.random() < 0.3), "reduction": reduction, "grad": bool(rng.random() < 0.85)}


def _center(rng, dtype, n, c, reduction):
    k = 3
    cdt = np.float32 if dtype == np.float16 else dtype
    return {"features": rng.normal(size=(n, c)).astype(dtype), "labels": rng.integers(0, k, size=n),
                "centers": rng.normal(size=(k, c)).astype(cdt), "alpha": 0.5, "reduction": reduction,
                "grad": bool(rng.random() < 0.85), "update": bool(rng.random() < 0.8)}


def _center_update(rng, dtype, n, c, reduction):
    kw = _center(rng, dtype, n, c, reduction)
    return {k: kw[k] for k in ("centers", "features", "labels", "alpha")}


CASES = {c.name: c for c in [
    Case("ce", fl.softmax_cross_entropy, ("logits", "target"),
         lambda *a: _classes(*a, prob=False, focal=False),
         ("logits", "weight", "sample_weight"), ("target",), "logits"),
    Case("ce_prob", fl.softmax_cross_entropy, ("logits", "target"),
         lambda *a: _classes(*a, prob=True, focal=False),
         ("logits", "target", "weight", "sample_weight"), (), "logits"),
    Case("focal", fl.focal_loss, ("logits", "target"), lambda *a: _classes(*a, prob=False, focal=True),
         ("logits", "alpha", "sample_weight"), ("target",), "logits"),
    Case("focal_prob", fl.focal_loss, ("logits", "target"),
         lambda *a: _classes(*a, prob=True, focal=True),
         ("logits", "target", "alpha", "sample_weight"), (), "logits"),
    Case("sigmoid_focal", fl.sigmoid_focal_loss, ("logits", "targets"), _sigmoid,
         ("logits", "targets"), (), "logits"),
    Case("huber", fl.huber_loss, ("input", "target"), _huber, ("input", "target", "sample_weight"),
         (), "input"),
    Case("triplet", fl.triplet_margin_loss, ("anchor", "positive", "negative"), _triplet,
         ("anchor", "positive", "negative"), (), "anchor", same_dtype=True),
    Case("batch_triplet", fl.batch_triplet_loss, ("embeddings", "labels"), _batch, ("embeddings",),
         ("labels",), "embeddings"),
    Case("center_loss", fl.center_loss, ("features", "labels", "centers"), _center,
         ("features", "centers"), ("labels",), "features", writes=True),
    Case("center_update", fl.center_update, ("centers", "features", "labels"), _center_update,
         ("centers", "features"), ("labels",), "features", writes=True),
    Case("CenterLoss", None, (), _center, ("features", "centers"), ("labels",), "features",
         writes=True),
]}
NAMES = list(CASES)
WITH_GRAD_OUT = [n for n in NAMES if n not in ("center_update", "triplet")]
CLASSIFICATION = ["ce", "ce_prob", "focal", "focal_prob"]


@st.composite
def calls(draw, name, dtypes=DTYPES, n=(2, 6), c=(2, 5)):
    """A valid call of case ``name``: ``(case, kwargs)``."""
    case = CASES[name]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = draw(st.sampled_from(dtypes))
    kw = case.build(rng, dtype, draw(st.integers(*n)), draw(st.integers(*c)),
                    draw(st.sampled_from(REDUCTIONS)))
    return case, kw


# ====================================================================== checking


def _snap(v):
    if isinstance(v, np.ndarray):
        return ("array", v.dtype, v.shape, v.tolist() if v.dtype == object else np.array(v).tobytes())
    if isinstance(v, (list, tuple)):
        return ("seq", copy.deepcopy(v) if not any(isinstance(e, np.ndarray) for e in v)
                else tuple(_snap(e) for e in v))
    return ("other", id(v))


def _pristine(kw):
    return {k: (np.array(v, copy=True) if isinstance(v, np.ndarray) else copy.deepcopy(v))
            for k, v in kw.items()}


_LAST = {}


def ref(case):
    """The reference for the inputs of the last ``attempt``, as they were before it."""
    return case.reference(_LAST["kw"])


def attempt(case, kw, *, written=(), buffers=()):
    """Make the call; return ``(raw, outputs)`` or the ValueError/TypeError raised.

    Any other exception propagates (a test failure).  Inputs other than those
    in ``written`` (plus ``centers`` when the call updates it, and
    ``grad_out``) must be unchanged on success; on an error nothing may have
    changed, ``buffers`` (the arrays that inputs are views of) included."""
    updates = case.writes and (case.name == "center_update" or kw.get("update", True))
    before = {k: _snap(v) for k, v in kw.items() if isinstance(v, (np.ndarray, list, tuple))}
    bufs = [_snap(b) for b in buffers]
    _LAST["kw"] = _pristine(kw)
    try:
        out = case.call(kw)
    except ERRORS as exc:
        for k, s in before.items():
            assert _snap(kw[k]) == s, f"{case.name}: {k} changed although the call raised {exc!r}"
        for b, s in zip(buffers, bufs):
            assert _snap(b) == s, f"{case.name}: a buffer changed although the call raised {exc!r}"
        return exc
    for k, s in before.items():
        if k in written or k == "grad_out" or (k == "centers" and updates):
            continue
        assert _snap(kw[k]) == s, f"{case.name}: input {k} was modified"
    return out


def raises(out, names, *, types=ERRORS):
    """``out`` (from attempt) is an error of ``types`` whose message names one of ``names``."""
    names = (names,) if isinstance(names, str) else tuple(names)
    assert isinstance(out, BaseException), f"accepted, expected an error naming {names}"
    assert isinstance(out, types), f"{type(out).__name__}: {out}"
    assert any(n in str(out) for n in names), f"{type(out).__name__}({out!s}) names none of {names}"


def returned(out):
    if isinstance(out, BaseException):
        pytest.fail(f"raised {type(out).__name__}: {out}")
    return out


def same(got, want, what=""):
    """Outputs equal bit for bit (NaN equal to NaN)."""
    assert got.keys() == want.keys(), (what, got.keys(), want.keys())
    for k in want:
        a, b = got[k], want[k]
        if b is None:
            assert a is None, (what, k)
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, (what, k, a.shape, b.shape, a.dtype, b.dtype)
        assert np.array_equal(a, b, equal_nan=True), f"{what}: {k} differs:\n{a}\nvs\n{b}"


def _tol_dtype(kw):
    """The least precise float dtype among the call's float arrays."""
    found = [np.asarray(v).dtype for v in kw.values()
             if isinstance(v, (np.ndarray, list)) and np.asarray(v).dtype.kind == "f"]
    return min(found, key=lambda d: d.itemsize) if found else np.dtype(np.float64)


def close(got, want, dtype, what="", rows=None):
    """Outputs within round-off of the float64 reference; ``rows``: only those entries
    (a boolean mask per output name, or None for all)."""
    for k, w in want.items():
        if k not in got:
            continue
        g = got[k]
        if w is None:
            assert g is None, (what, k)
            continue
        w = np.asarray(w, np.float64)
        assert g.shape == w.shape, (what, k, g.shape, w.shape)
        mask = None if rows is None else rows.get(k)
        if mask is not None:
            g, w = np.asarray(g)[mask], w[mask]
        scale = None
        if k == "loss":
            finite = np.abs(w[np.isfinite(w)])
            scale = max(1.0, float(finite.max())) if finite.size else 1.0
        naive.assert_close(g, w, dtype, scale=scale, what=f"{what} {k}")


# ====================================================================== wrong kinds of array


BAD_FLOAT_DTYPES = [np.int32, np.int64, np.bool_, np.complex128, object, "U3"]


def _as(v, dt):
    a = np.asarray(v)
    if dt == "U3":
        return a.astype(str).astype("U3")
    if dt is object:
        return a.astype(object)
    return a.astype(dt)


@pytest.mark.parametrize("arg", [(n, a) for n in NAMES for a in CASES[n].floats],
                         ids=lambda p: f"{p[0]}-{p[1]}")
@pytest.mark.parametrize("bad", BAD_FLOAT_DTYPES)
@FEW
@given(data=st.data())
def test_float_argument_of_wrong_dtype(arg, data, bad):
    name, a = arg
    case, kw = data.draw(calls(name))
    kw[a] = _as(kw[a], bad)
    out = attempt(case, kw)
    if name == "sigmoid_focal" and a == "targets" and bad in (np.int32, np.int64, np.bool_):
        close(returned(out)[1], ref(case), _tol_dtype(kw), "integer 0/1 targets")
        return
    if name.endswith("_prob") and a == "target":  # an integer target means class indices
        raises(out, "target")
        return
    raises(out, a, types=(TypeError,))


LABEL_DTYPES_OK = [np.int8, np.uint8, np.int16, np.int32, np.uint32, np.uint64]
LABEL_DTYPES_BAD = [np.float64, np.float32, np.bool_, np.complex128, object, "U3"]


@pytest.mark.parametrize("arg", [(n, a) for n in NAMES for a in CASES[n].labels],
                         ids=lambda p: f"{p[0]}-{p[1]}")
@pytest.mark.parametrize("dt", LABEL_DTYPES_OK + LABEL_DTYPES_BAD)
@FEW
@given(data=st.data())
def test_labels_of_any_integer_dtype_and_nothing_else(arg, data, dt):
    name, a = arg
    case, kw = data.draw(calls(name))
    if dt in LABEL_DTYPES_OK:
        labels = np.asarray(kw[a])
        labels = np.where(labels < 0, 0, labels)  # unsigned types: no ignored row
        want = case.call(_pristine({**kw, a: labels}))[1]
        kw[a] = labels.astype(dt)
        same(returned(attempt(case, kw))[1], want, f"labels as {np.dtype(dt)}")
        return
    kw[a] = _as(kw[a], dt)
    raises(attempt(case, kw), a)


# ====================================================================== wrong shapes and objects


def _grow(v, axis):
    v = np.asarray(v)
    return np.concatenate([v, np.take(v, [0], axis=axis)], axis=axis)


def _shape_names(case, a):
    """Who may be named when ``a`` has a shape that does not fit: ``a``, or the
    argument it must match."""
    if a == case.first or case.same_dtype:
        return case.arrays(CASES[case.name].build(np.random.default_rng(0), np.float64, 3, 2, "mean"))
    if a == "centers":
        return ("centers", "features")
    return (a, case.first)


@pytest.mark.parametrize("arg", [(n, a) for n in NAMES for a in CASES[n].floats + CASES[n].labels],
                         ids=lambda p: f"{p[0]}-{p[1]}")
@pytest.mark.parametrize("how", ["extra_axis", "grow", "scalar", "flatten"])
@FEW
@given(data=st.data())
def test_argument_of_wrong_shape(arg, data, how):
    name, a = arg
    case, kw = data.draw(calls(name, n=(2, 5), c=(2, 4)))
    v = np.asarray(kw[a])
    if how == "extra_axis":
        kw[a] = np.stack([v, v])
    elif how == "grow":  # one more sample, or one more feature for centers and weights
        kw[a] = _grow(v, 1 if a == "centers" else 0)
    elif how == "scalar":
        kw[a] = v.reshape(-1)[0]
        if a == "alpha" or (name == "huber" and a == "sample_weight"):
            # legal: one alpha for every class; one weight broadcast against everything
            close(returned(attempt(case, kw))[1], ref(case), _tol_dtype(kw))
            return
    else:  # flatten, or a 1-D argument as a column
        kw[a] = v.reshape(-1) if v.ndim > 1 else v.reshape(-1, 1)
        if name == "triplet" or (name == "huber" and a == "sample_weight"):
            # triplet: a flat vector is one triplet (wrong length: an error); huber's (N*1,)
            # weights broadcast against (N, D) only when D == N
            out = attempt(case, kw)
            if not isinstance(out, BaseException):
                close(out[1], ref(case), _tol_dtype(kw))
                return
    raises(attempt(case, kw), _shape_names(case, a))


ODD_OBJECTS = {
    "ragged": [[1.0, 2.0], [3.0]],
    "none": None,
    "string": "abc",
    "dict": {"a": 1},
    "complex_scalar": 1j,
}


@pytest.mark.parametrize("arg", [(n, a) for n in NAMES for a in CASES[n].floats + CASES[n].labels],
                         ids=lambda p: f"{p[0]}-{p[1]}")
@pytest.mark.parametrize("odd", list(ODD_OBJECTS))
def test_odd_objects_instead_of_arrays(arg, odd):
    name, a = arg
    case = CASES[name]
    kw = case.build(np.random.default_rng(7), np.float32, 4, 3, "mean")
    kw[a] = copy.deepcopy(ODD_OBJECTS[odd])
    if odd == "none" and name == "CenterLoss" and a == "centers":
        return  # init=None: zero centers, legal
    out = attempt(case, kw)
    if odd == "none" and a in ("weight", "sample_weight", "alpha"):
        # None is the documented default of the optional arguments
        close(returned(out)[1], ref(case), _tol_dtype(kw))
        return
    raises(out, (a, "init") if name == "CenterLoss" and a == "centers" else a)


@pytest.mark.parametrize("arg", [(n, a) for n in NAMES for a in CASES[n].floats + CASES[n].labels],
                         ids=lambda p: f"{p[0]}-{p[1]}")
@FEW
@given(data=st.data())
def test_list_inputs(arg, data):
    """Lists are CPU arrays (SPEC); ``centers`` is updated in place, so it must be an ndarray."""
    name, a = arg
    case, kw = data.draw(calls(name, dtypes=WIDE))
    dtype = np.asarray(kw[a]).dtype
    kw[a] = np.asarray(kw[a]).tolist()
    out = attempt(case, kw)
    if a == "centers" and name != "CenterLoss":
        raises(out, "centers", types=(TypeError,))
    elif case.same_dtype and dtype != np.float64:
        raises(out, case.floats, types=(TypeError,))  # a list is float64; the others are not
    else:
        close(returned(out)[1], ref(case), _tol_dtype(kw), f"{a} as a list")


# ====================================================================== labels


@pytest.mark.parametrize("arg", [(n, a) for n in NAMES for a in CASES[n].labels],
                         ids=lambda p: f"{p[0]}-{p[1]}")
@pytest.mark.parametrize("how", ["upper", "negative", "huge", "int64_min", "uint64_huge",
                                 "ignore_minus_one"])
@SOME
@given(data=st.data())
def test_labels_out_of_range(arg, data, how):
    name, a = arg
    case, kw = data.draw(calls(name))
    labels = np.asarray(kw[a]).copy()
    i = data.draw(st.integers(0, labels.size - 1))
    upper = np.asarray(kw["logits"]).shape[-1] if a == "target" else np.asarray(
        kw.get("centers", np.zeros((3, 1)))).shape[0]
    value = {"upper": upper, "negative": -1, "huge": 2**40, "int64_min": np.iinfo(np.int64).min,
             "uint64_huge": 2**63 + 5, "ignore_minus_one": -1}[how]
    if how == "uint64_huge":
        labels = np.where(labels < 0, 0, labels).astype(np.uint64)
    if how == "ignore_minus_one":
        labels[labels == -100] = -1
    labels[i] = value
    kw[a] = labels
    if how == "ignore_minus_one":
        if a != "target":
            return
        kw["ignore_index"] = -1  # -1 is now the ignored class: legal
    out = attempt(case, kw)
    if name == "batch_triplet" and how != "uint64_huge":
        # any integers are labels here: compared only for equality
        close(returned(out)[1], ref(case), _tol_dtype(kw), how)
    elif how == "ignore_minus_one":
        close(returned(out)[1], ref(case), _tol_dtype(kw), how)
    else:
        raises(out, a, types=(ValueError,))


@pytest.mark.parametrize("name", ["ce", "focal"])
@SOME
@given(data=st.data())
def test_ignore_index_equal_to_a_valid_class(name, data):
    """Legal: the rows of that class are ignored, as if they were not there."""
    case, kw = data.draw(calls(name, dtypes=WIDE, n=(3, 8)))
    labels = kw["target"]
    cls = int(data.draw(st.sampled_from(sorted(set(labels[labels >= 0].tolist())))))
    labels[labels == -100] = cls  # -100 is a class index out of range now
    kw["ignore_index"] = cls
    got = returned(attempt(case, kw))[1]
    close(got, ref(case), _tol_dtype(kw), f"ignore_index={cls}")
    keep = labels != cls
    if kw["reduction"] != "none" and kw["grad"]:
        # the same as the call on the other rows only
        rest = dict(kw, logits=kw["logits"][keep], target=labels[keep],
                    sample_weight=kw["sample_weight"][keep], ignore_index=-100)
        want = case.call(rest)[1]
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5, equal_nan=True)
        np.testing.assert_allclose(got["grad"][keep], want["grad"], rtol=1e-5, atol=1e-7)
        assert not np.any(got["grad"][~keep])


@pytest.mark.parametrize("name", ["ce", "focal"])
@pytest.mark.parametrize("value", [1.5, "0", None, 2**63, -(2**63) - 1, 2**70, [0]])
def test_bad_ignore_index(name, value):
    case = CASES[name]
    kw = case.build(np.random.default_rng(1), np.float32, 4, 3, "mean")
    kw["ignore_index"] = value
    raises(attempt(case, kw), "ignore_index")


# ====================================================================== options


MUST_RAISE = {
    "ce": {"label_smoothing": [-0.1, 1.5, np.nan, "0.1", None], "z_loss": [-1.0, np.nan, "1"],
           "softcap": [0.0, -1.0, np.nan, "1", 1j],
           "reduction": ["avg", None, "MEAN", 1, ["mean"]], "backend": ["gpu", None, 1]},
    "focal": {"gamma": [-1.0, np.nan, "2", None, 1j],
              "alpha": ["x", [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 1j], "reduction": ["avg", None]},
    "sigmoid_focal": {"gamma": [-1.0, np.nan, None, "2"], "alpha": ["x", None, 1j, [0.25]],
                      "reduction": ["avg", None]},
    "huber": {"delta": [0.0, -1.0, np.nan, "1", None, 1j], "reduction": ["sum ", None]},
    "triplet": {"margin": [-1.0, np.nan, "1", None], "eps": [-1e-6, np.nan, "0"],
                "distance": ["l1", None, 2, "Euclidean"], "reduction": ["avg", None]},
    "batch_triplet": {"margin": [-0.5, np.nan, "1"], "mining": ["hardest", None, 1],
                      "distance": ["l2", None], "reduction": ["avg", None]},
    "center_loss": {"alpha": [-0.1, 1.5, np.nan, "0.5", None, 1j], "reduction": ["avg", None]},
    "center_update": {"alpha": [-0.1, 1.5, np.nan, "0.5", None]},
    "CenterLoss": {"alpha": [-0.1, 1.5, np.nan, "0.5", None], "reduction": ["avg", None]},
}
MUST_RAISE["ce_prob"] = MUST_RAISE["ce"]
MUST_RAISE["focal_prob"] = MUST_RAISE["focal"]

#: odd but legal values: the call returns (any value) or raises naming the option
MAY_RETURN = {
    "ce": {"softcap": [np.inf, 1e-30, 1e30], "z_loss": [np.inf, 1e30], "label_smoothing": [1.0, 0.0]},
    "focal": {"gamma": [0.0, np.inf, 1e30, 1e-30], "alpha": [np.nan, 0.0, -1.0, np.inf]},
    "sigmoid_focal": {"gamma": [0.0, np.inf], "alpha": [np.nan, -1.0, 2.0, np.inf]},
    "huber": {"delta": [np.inf, 1e-30, 1e30]},
    "triplet": {"margin": [0.0, np.inf], "eps": [0.0, np.inf, 1e30]},
    "batch_triplet": {"margin": [0.0, np.inf]},
    "center_loss": {"alpha": [0.0, 1.0]},
    "center_update": {"alpha": [0.0, 1.0]},
    "CenterLoss": {"alpha": [0.0, 1.0]},
}
MAY_RETURN["ce_prob"] = MAY_RETURN["ce"]
MAY_RETURN["focal_prob"] = MAY_RETURN["focal"]


@pytest.mark.parametrize("opt", [(n, o, v) for n in NAMES for o, vs in MUST_RAISE[n].items()
                                 for v in vs], ids=lambda p: f"{p[0]}-{p[1]}={p[2]!r}")
def test_bad_option_raises(opt):
    name, option, value = opt
    case = CASES[name]
    kw = case.build(np.random.default_rng(2), np.float32, 4, 3, "mean")
    kw[option] = copy.deepcopy(value)
    raises(attempt(case, kw), option)


@pytest.mark.parametrize("opt", [(n, o, v) for n in NAMES for o, vs in MAY_RETURN[n].items()
                                 for v in vs], ids=lambda p: f"{p[0]}-{p[1]}={p[2]!r}")
def test_odd_option_returns_or_raises_cleanly(opt):
    name, option, value = opt
    case = CASES[name]
    kw = case.build(np.random.default_rng(3), np.float64, 4, 3, "mean")
    kw[option] = value
    out = attempt(case, kw)
    if isinstance(out, BaseException):
        raises(out, option)


@pytest.mark.parametrize("name", ["ce", "ce_prob"])
def test_softcap_inf_is_no_cap(name):
    case = CASES[name]
    kw = case.build(np.random.default_rng(4), np.float64, 5, 4, "none")
    kw["grad"] = True
    want = case.call(dict(kw, softcap=None))[1]
    same(returned(attempt(case, dict(kw, softcap=np.inf)))[1], want, "softcap=inf")


@pytest.mark.parametrize("name", ["huber"])
def test_huber_delta_inf_is_half_squared_error(name):
    case = CASES[name]
    kw = case.build(np.random.default_rng(5), np.float64, 5, 4, "sum")
    kw.update(grad=True, delta=np.inf)
    got = returned(attempt(case, kw))[1]
    r = kw["input"] - kw["target"]
    w = np.broadcast_to(kw["sample_weight"], r.shape)
    np.testing.assert_allclose(got["loss"], np.sum(0.5 * w * r * r), rtol=1e-12)
    np.testing.assert_allclose(got["grad"], w * r, rtol=1e-12)


@pytest.mark.parametrize("value", [0, -1, 2.5, "3", None])
@pytest.mark.parametrize("arg", ["num_classes", "num_features"])
def test_center_loss_object_bad_sizes(arg, value):
    kw = {"num_classes": 3, "num_features": 2}
    kw[arg] = value
    if arg == "num_features" and value == 0:
        assert fl.CenterLoss(**kw).centers.shape == (3, 0)  # zero-width centers are legal
        return
    with pytest.raises(ERRORS, match=arg):
        fl.CenterLoss(**kw)


@pytest.mark.parametrize("kw,word", [
    ({"dtype": "float16"}, "dtype"), ({"dtype": "int32"}, "dtype"),
    ({"dtype": "no-such-type"}, "dtype"), ({"dtype": object}, "dtype"),
    ({"device": "gpu"}, "device"), ({"device": None}, "device"),
    ({"alpha": 2.0}, "alpha"), ({"init": np.zeros((3, 3))}, "centers"),
    ({"init": np.zeros((3, 2), np.int64)}, "centers"), ({"init": "x"}, "centers"),
])
def test_center_loss_object_bad_options(kw, word):
    with pytest.raises(ERRORS, match=word):
        fl.CenterLoss(3, 2, **kw)


@pytest.mark.parametrize("state,word", [
    ({}, "centers"), ({"centers": np.zeros((2, 2))}, "centers"),
    ({"centers": np.zeros((3, 2)), "alpha": 3.0}, "alpha"),
    ({"centers": np.zeros((3, 2), complex)}, "centers"), ({"centers": None}, "centers"),
    (None, "state"), ([1, 2], "state"), ("centers", "state"),
])
def test_center_loss_object_bad_state_changes_nothing(state, word):
    cl = fl.CenterLoss(3, 2, alpha=0.25, init=np.arange(6.0).reshape(3, 2))
    before = cl.centers.copy()
    with pytest.raises(ERRORS, match=word):
        cl.load_state_dict(state)
    assert cl.centers.tobytes() == before.tobytes() and cl.alpha == 0.25


# ====================================================================== NaN, inf, huge, empty


def _sample_rows(case, a, index, kw):
    """Masks, per output, of the entries that an odd value at ``kw[a][index]`` may touch
    (its sample: a row of the classification losses, triplets and center loss, an
    element of the elementwise losses)."""
    shape = np.shape(kw[case.first])
    rows = np.zeros(shape[0], bool)
    affected = {}
    none = kw.get("reduction", "mean") == "none"
    if case.name in ("sigmoid_focal", "huber"):
        m = np.zeros(shape, bool)
        m[index] = True
        return {"loss": m if none else None, "grad": m}
    if a == "centers":
        rows = np.asarray(kw["labels"]) == index[0]
    else:
        rows[index[0]] = True
    grad_rows = np.broadcast_to(rows[:, None], shape)
    affected = {"loss": rows if none else None, "grad": grad_rows,
                "grad0": grad_rows, "grad1": grad_rows, "grad2": grad_rows}
    if "centers" in kw:
        touched = np.zeros(np.shape(kw["centers"]), bool)
        labels = np.asarray(kw["labels"])
        touched[labels[rows] if a != "centers" else index[0]] = True
        affected["centers"] = touched
    return affected


def _counts(case, kw, a, index):
    """Whether the sample at ``index`` enters the loss (not an ignored row; for a center,
    whether a row has its class)."""
    if a == "centers":
        return bool(np.any(np.asarray(kw["labels"]) == index[0]))
    if case.name in ("ce", "focal"):
        return kw["target"][index[0]] != kw.get("ignore_index", -100)
    return True


@pytest.mark.parametrize("arg", [(n, a) for n in NAMES if n != "batch_triplet" for a in CASES[n].floats
                                 if a not in ("weight", "alpha", "sample_weight")],
                         ids=lambda p: f"{p[0]}-{p[1]}")
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@SOME
@given(data=st.data())
def test_nan_and_inf_stay_in_their_sample(arg, data, bad):
    name, a = arg
    case, kw = data.draw(calls(name, dtypes=WIDE))
    v = np.array(kw[a], copy=True)
    index = tuple(data.draw(st.integers(0, s - 1)) for s in v.shape)
    clean = case.reference(kw)
    v[index] = bad
    kw[a] = v
    got = returned(attempt(case, kw))[1]
    touched = _sample_rows(case, a, index, kw)
    keep = {k: (None if m is None else ~m) for k, m in touched.items()}
    dtype = _tol_dtype(kw)
    for k in got:
        if k == "loss" and kw.get("reduction", "mean") != "none":
            continue
        if keep.get(k) is not None and got[k] is not None:
            close({k: got[k]}, {k: clean[k]}, dtype, f"{bad} at {a}{index}", rows=keep)
    if np.isnan(bad) and _counts(case, kw, a, index) and "loss" in got:
        loss = got["loss"]
        assert np.isnan(loss[touched["loss"]]).all() if kw["reduction"] == "none" else np.isnan(loss)
    if np.isnan(bad) and "centers" in got and a == "features" and (
            case.name == "center_update" or kw.get("update", True)) and kw.get("alpha", 0.5) > 0:
        col = index[1]
        assert np.isnan(got["centers"][kw["labels"][index[0]], col])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@FEW
@given(data=st.data())
def test_nan_in_batch_mining_does_not_crash(data, bad):
    case, kw = data.draw(calls("batch_triplet", dtypes=WIDE, n=(3, 7)))
    e = kw["embeddings"].copy()
    e[data.draw(st.integers(0, e.shape[0] - 1)), data.draw(st.integers(0, e.shape[1] - 1))] = bad
    kw["embeddings"] = e
    got = returned(attempt(case, kw))[1]
    assert got["loss"].shape == ((e.shape[0],) if kw["reduction"] == "none" else ())


@pytest.mark.parametrize("name", ["ce", "focal"])
@SOME
@given(data=st.data())
def test_minus_inf_masked_classes_give_finite_results(name, data):
    """-inf logits mask classes out (a common idiom): finite loss and gradient (0 there)
    wherever the target is another class, as in PyTorch."""
    case, kw = data.draw(calls(name, dtypes=DTYPES, n=(2, 6), c=(3, 6)))
    x, t = kw["logits"].copy(), kw["target"]
    C = x.shape[1]
    for i in range(x.shape[0]):
        others = [c for c in range(C) if c != t[i]]
        x[i, data.draw(st.sampled_from(others))] = -np.inf
    kw.update(logits=x, grad=True)
    kw.pop("label_smoothing", None)
    got = returned(attempt(case, kw))[1]
    assert np.isfinite(got["loss"]).all() and np.isfinite(got["grad"]).all()
    assert not np.any(got["grad"][np.isneginf(x)])
    close(got, ref(case), _tol_dtype(kw), "-inf masked")


def _hugify(case, kw, rng):
    if case.first == "logits" or case.name == "huber":
        a = case.first
        v = np.asarray(kw[a])
        big = np.where(rng.random(v.shape) < 0.5, -1e4, 1e4) * rng.uniform(0.5, 1.0, v.shape)
        big.reshape(-1)[rng.integers(v.size)] = 1e30 if v.dtype != np.float16 else 6e4
        kw[a] = big.astype(v.dtype)
    else:
        for a in case.floats:
            v = np.asarray(kw[a])
            kw[a] = (v * (1e15 if v.dtype != np.float16 else 30.0)).astype(v.dtype)


@pytest.mark.parametrize("name", NAMES)
@SOME
@given(data=st.data())
def test_huge_values_give_finite_results(name, data):
    case, kw = data.draw(calls(name, dtypes=WIDE))
    _hugify(case, kw, np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))))
    got = returned(attempt(case, kw))[1]
    if name == "batch_triplet":  # naive's softplus overflows here; mining in float32 may flip
        # near-ties: finite is the contract (an empty mean is nan)
        assert np.isfinite(got["grad"]).all() if got["grad"] is not None else True
        assert not np.isinf(got["loss"]).any()
        return
    want = ref(case)
    for k, v in got.items():  # finite wherever the float64 reference is
        assert v is None or np.isfinite(v[np.isfinite(want[k])]).all(), (k, v)
    close(got, want, _tol_dtype(kw), "huge")


@pytest.mark.parametrize("name", NAMES)
@FEW
@given(data=st.data())
def test_empty_batch(name, data):
    """N = 0: PyTorch's nan for "mean" (0 for "all" mining), 0 for "sum", (0,) for "none"."""
    case, kw = data.draw(calls(name, n=(0, 0)))
    got = returned(attempt(case, kw))[1]
    close(got, ref(case), _tol_dtype(kw), "empty batch")
    if "centers" in got:
        assert got["centers"].tobytes() == np.asarray(kw["centers"]).tobytes()


@pytest.mark.parametrize("name", NAMES)
@FEW
@given(data=st.data())
def test_zero_width(name, data):
    """D = 0 (C = 0 for the softmax losses: an error naming the logits)."""
    case, kw = data.draw(calls(name, c=(0, 0)))
    out = attempt(case, kw)
    if name in CLASSIFICATION:
        raises(out, "logits")
        return
    if name == "triplet":  # every distance of empty vectors is 0 (cosine: 1 - 0): the margin
        per = np.full(kw["anchor"].shape[0], kw["margin"])
        want = {"none": per, "sum": per.sum(), "mean": per.mean()}[kw["reduction"]]
        got = returned(out)[1]
        np.testing.assert_allclose(got["loss"], want)
        assert all(got.get(f"grad{k}") is None or got[f"grad{k}"].shape == kw["anchor"].shape
                   for k in range(3))
        return
    close(returned(out)[1], ref(case), _tol_dtype(kw), "zero width")


# ====================================================================== memory layouts


def _strided(v, rng):
    """A view equal to ``v``, with steps of 2 (and a reversed first axis) into a bigger buffer."""
    v = np.asarray(v)
    if v.ndim == 0:
        return v
    big = np.zeros(tuple(2 * s + 1 for s in v.shape), v.dtype)
    big[...] = rng.normal(size=big.shape).astype(v.dtype) if v.dtype.kind == "f" else -7
    view = big[tuple(slice(1, None, 2) for _ in v.shape)][::-1]
    view[...] = v
    assert not view.flags.c_contiguous or view.size <= 1
    return view


@pytest.mark.parametrize("arg", [(n, a) for n in NAMES for a in CASES[n].floats + CASES[n].labels],
                         ids=lambda p: f"{p[0]}-{p[1]}")
@pytest.mark.parametrize("layout", ["fortran", "strided"])
@FEW
@given(data=st.data())
def test_layouts_give_the_same_bits(arg, data, layout):
    """Fortran order, strided and reversed views: the result of the contiguous call, bit
    for bit; ``centers`` is updated through the view.  (Read-only arrays: below, all at
    once, as each combination of read-only arguments compiles its own kernels.)"""
    name, a = arg
    case, kw = data.draw(calls(name))
    want = case.call(_pristine(kw))[1]
    v = np.array(kw[a], copy=True)
    if layout == "fortran":
        v = np.asfortranarray(v)
    elif layout == "strided":
        v = _strided(v, np.random.default_rng(0))
    else:
        v.flags.writeable = False
    kw[a] = v
    buffers = (v.base,) if layout == "strided" else ()
    before = np.array(v.base, copy=True) if layout == "strided" else None
    out = attempt(case, kw, buffers=buffers)
    writes = a == "centers" and name != "CenterLoss" and (
        name == "center_update" or kw.get("update", True))
    if layout == "read_only" and writes:
        raises(out, "centers", types=(ValueError,))
        return
    same(returned(out)[1], want, f"{a} {layout}")
    if layout == "strided":
        outside = np.ones(v.base.shape, bool)
        outside[tuple(slice(1, None, 2) for _ in v.shape)] = False
        assert np.array_equal(v.base[outside], before[outside]), "wrote outside the view"
        if writes and name != "CenterLoss":
            assert np.array_equal(v, want["centers"])


@pytest.mark.parametrize("name", NAMES)
@FEW
@given(data=st.data())
def test_everything_read_only(name, data):
    """Read-only inputs work and give the same bits (one dtype: each compiles its kernels)."""
    case, kw = data.draw(calls(name, dtypes=[np.float32]))
    want = case.call(_pristine(kw))[1]
    for a in case.arrays(kw):
        kw[a] = np.array(kw[a], copy=True)
        kw[a].flags.writeable = False
    out = attempt(case, kw)
    if case.writes and name != "CenterLoss" and (name == "center_update" or kw.get("update", True)):
        raises(out, "centers", types=(ValueError,))
    else:
        same(returned(out)[1], want, "read-only inputs")


# ====================================================================== grad_out


def _grad_case(name, data, dtypes=DTYPES):
    case, kw = data.draw(calls(name, dtypes=dtypes))
    kw["grad"] = True
    want = case.call(_pristine(kw))[1]
    return case, kw, want


def _written_or_refused(case, kw, want, out, grad_out, buffers, what):
    """Property 4: the gradient landed in ``grad_out`` (which is what came back),
    or the call refused with an error naming grad_out and left ``buffers`` as they were."""
    if isinstance(out, BaseException):
        raises(out, "grad_out")
        return False
    raw, got = out
    assert raw.grad is grad_out, f"{what}: the returned gradient is not grad_out"
    same(got, want, what)
    return True


@pytest.mark.parametrize("name", WITH_GRAD_OUT)
@pytest.mark.parametrize("bad", ["shape", "transposed", "dtype", "int", "read_only", "list", "extra_axis"])
@FEW
@given(data=st.data())
def test_bad_grad_out_is_refused_untouched(name, data, bad):
    case, kw, _ = _grad_case(name, data)
    x = np.asarray(kw[case.first])
    if bad == "shape":
        g = np.full((x.shape[0] + 1,) + x.shape[1:], 7, x.dtype)
    elif bad == "transposed":
        g = np.full(x.shape[::-1], 7, x.dtype)
        if g.shape == x.shape:
            g = np.full((x.shape[0], x.shape[1] + 1), 7, x.dtype)
    elif bad == "dtype":
        g = np.full(x.shape, 7, np.float32 if x.dtype != np.float32 else np.float64)
    elif bad == "int":
        g = np.full(x.shape, 7, np.int64)
    elif bad == "read_only":
        g = np.full(x.shape, 7, x.dtype)
        g.flags.writeable = False
    elif bad == "list":
        g = np.full(x.shape, 7, x.dtype).tolist()
    else:
        g = np.full((1,) + x.shape, 7, x.dtype)
    kw["grad_out"] = g
    before = _snap(g)
    raises(attempt(case, kw), "grad_out")
    assert _snap(g) == before


@pytest.mark.parametrize("name", WITH_GRAD_OUT)
@pytest.mark.parametrize("layout", ["fresh", "fortran", "strided", "in_place"])
@FEW
@given(data=st.data())
def test_grad_out_layouts(name, data, layout):
    case, kw, want = _grad_case(name, data)
    x = np.asarray(kw[case.first])
    buffers = ()
    if layout == "fresh":
        g = np.full(x.shape, 7, x.dtype)
    elif layout == "fortran":
        g = np.asfortranarray(np.full(x.shape, 7, x.dtype))
    elif layout == "strided":
        g = _strided(np.full(x.shape, 7, x.dtype), np.random.default_rng(1))
        buffers = (g.base,)
    else:  # the first argument itself: SPEC's in-place mode
        kw[case.first] = g = np.array(x, copy=True)
    kw["grad_out"] = g
    outside = None
    if layout == "strided":
        outside = np.ones(g.base.shape, bool)
        outside[tuple(slice(1, None, 2) for _ in g.shape)] = False
        base_before = g.base[outside].copy()
    out = attempt(case, kw, written=(case.first,) if layout == "in_place" else (), buffers=buffers)
    if layout in ("fresh", "in_place"):
        returned(out)
    if _written_or_refused(case, kw, want, out, g, buffers, layout) and outside is not None:
        assert np.array_equal(g.base[outside], base_before), "wrote outside grad_out"


def _overlapping(x, v, off):
    """``(grad_out, view)``: a buffer shaped like ``x`` and a view holding ``v`` that starts
    ``off`` elements into it (an integer view of the same bytes for labels)."""
    store = v.dtype if v.dtype.kind == "f" else np.dtype(f"i{x.dtype.itemsize}")
    buf = np.zeros(x.size + v.size, x.dtype)
    view = buf[off:off + v.size].view(store).reshape(v.shape)
    view[...] = v
    return buf[:x.size].reshape(x.shape), view


def _aliases(case, kw, _rng=None):
    """(label, other argument, grad_out, buffer) for every way grad_out can share memory
    with an input other than the first argument itself."""
    x = np.asarray(kw[case.first])
    gsize = x.size
    out = []
    for a in case.floats:  # the labels: test_grad_out_overlapping_the_labels (a subprocess)
        v = kw.get(a)
        if a == case.first or v is None or np.asarray(v).size == 0:
            continue
        v = np.asarray(v)
        if v.shape == x.shape and v.dtype == x.dtype:
            out.append(("same array", a, None, None))  # grad_out=kw[a]
        if v.dtype != x.dtype:
            continue
        g, view = _overlapping(x, v, min(gsize // 2 + 1, gsize))  # over grad_out's second half
        out.append(("overlapping view", a, g, view))
    if x.size > 1:
        buf = np.zeros(gsize + 1, x.dtype)
        first = buf[:gsize].reshape(x.shape)
        first[...] = x
        out.append(("shifted first argument", case.first, buf[1:].reshape(x.shape), first))
    return out


@pytest.mark.parametrize("name", WITH_GRAD_OUT)
@SOME
@given(data=st.data())
def test_grad_out_sharing_memory_with_another_input(name, data):
    """grad_out = target, a view overlapping sample_weight/weight/alpha/centers, or the
    logits shifted by one element: the correct gradient, or an error naming grad_out (SPEC:
    in-place is for the first argument only; centers must not be shared).  Every way, each
    on fresh copies."""
    case, kw0, want = _grad_case(name, data)
    for k in range(len(_aliases(case, kw0, None))):
        kw = _pristine(kw0)
        how, a, g, view = _aliases(case, kw, None)[k]
        if g is None:
            kw[a] = g = np.array(kw[a], copy=True)
            buffers = ()
        else:
            kw[a] = view
            buffers = (view.base if view.base is not None else view,)
        kw["grad_out"] = g
        out = attempt(case, kw, written=(a,), buffers=buffers)
        if a == "centers" and name != "CenterLoss":  # CenterLoss copies its init
            raises(out, "grad_out", types=(ValueError,))
            continue
        _written_or_refused(case, kw, want, out, g, buffers, f"grad_out {how} {a}")


# ---------------------------------------------------------------------- triplet's three


@pytest.mark.parametrize("how", ["fresh", "in_place", "crossed", "one_buffer", "two_items",
                                 "not_a_tuple", "shifted", "wrong_dtype"])
@FEW
@given(data=st.data())
def test_triplet_grad_out(data, how):
    case, kw, want = _grad_case("triplet", data)
    a, p, n = (np.array(kw[k], copy=True) for k in ("anchor", "positive", "negative"))
    kw.update(anchor=a, positive=p, negative=n)
    buffers = ()
    written = ()
    if how == "fresh":
        g = tuple(np.full(a.shape, 7, a.dtype) for _ in range(3))
    elif how == "in_place":
        g, written = (a, p, n), ("anchor", "positive", "negative")
    elif how == "crossed":
        g, written = (p, n, a), ("anchor", "positive", "negative")
    elif how == "one_buffer":
        b = np.full(a.shape, 7, a.dtype)
        g = (b, b, np.full(a.shape, 7, a.dtype))
    elif how == "two_items":
        g = (np.full(a.shape, 7, a.dtype),) * 2
    elif how == "not_a_tuple":
        g = np.full(a.shape, 7, a.dtype)
    elif how == "shifted":
        buf = np.zeros(a.size + 1, a.dtype)
        view = buf[1:].reshape(a.shape)
        view[...] = n
        kw["negative"] = view
        g = (buf[:-1].reshape(a.shape), np.full(a.shape, 7, a.dtype), np.full(a.shape, 7, a.dtype))
        buffers, written = (buf,), ("negative",)
    else:
        g = tuple(np.full(a.shape, 7, np.int32) for _ in range(3))
    kw["grad_out"] = g
    snaps = [_snap(x) for x in (g if isinstance(g, tuple) else (g,))]
    out = attempt(case, kw, written=written, buffers=buffers)
    if how in ("one_buffer", "two_items", "not_a_tuple", "wrong_dtype"):
        raises(out, "grad_out")
        assert [_snap(x) for x in (g if isinstance(g, tuple) else (g,))] == snaps
        return
    if isinstance(out, BaseException) and how in ("crossed", "shifted"):
        raises(out, "grad_out")
        return
    raw, got = returned(out)
    assert all(r is o for r, o in zip(raw.grad, g))
    same(got, want, f"triplet grad_out {how}")


# ---------------------------------------------------------------------- grad_out over the labels


_LABEL_ALIAS_SCRIPT = r"""
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import test_hostile_input as H
for name in ("ce", "focal", "batch_triplet", "center_loss", "CenterLoss"):
    case = H.CASES[name]
    for seed, dtype in ((0, np.float64), (1, np.float32), (2, np.float16)):
        kw = case.build(np.random.default_rng(seed), dtype, 7, 3, ("sum", "mean", "none")[seed])
        kw["grad"] = True
        want = case.call(H._pristine(kw))[1]
        x, labels = kw[case.first], np.asarray(kw[case.labels[0]])
        for off in (1, 3, x.size // 2, x.size - 1):
            g, view = H._overlapping(x, labels, off)
            raw, got = case.call(dict(H._pristine(kw), grad_out=g, **{case.labels[0]: view}))
            assert raw.grad is g, name
            H.same(got, want, f"{name} grad_out over the labels at {off}")
print("ok")
"""


def test_grad_out_overlapping_the_labels():
    """grad_out sharing bytes with the labels (an integer view of its buffer): the right
    gradient.  In a subprocess: the kernels once wrote the gradient over labels still to be
    read, then indexed with its bits (a segfault in center_loss's update)."""
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, "-c", _LABEL_ALIAS_SCRIPT, here], capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (
        f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


def test_may_overlap_fast_answer_only_for_separate_allocations():
    # the overlap checks' shortcut: two distinct arrays that own their memory are apart;
    # anything else (a view, the same array, memory owned elsewhere) asks NumPy
    from fastloss.cpu._storage import may_overlap
    a, b = np.zeros((4, 3)), np.zeros((4, 3))
    assert not may_overlap(a, b)
    assert may_overlap(a, a)
    assert may_overlap(a, a[1:])
    assert may_overlap(a[::2], a.T)
    assert not may_overlap(a[:2], a[2:])
    buf = bytearray(96)
    u, v = np.frombuffer(buf, np.float64, 6), np.frombuffer(buf, np.float64, 6, 48)
    assert not u.flags.owndata
    assert may_overlap(np.frombuffer(buf, np.float64), u) and not may_overlap(u, v)
