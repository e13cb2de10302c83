"""Hostile and odd input, for every public function, on both sides (issue 6, part 5).

One table (``CASES``) holds each public function with a builder of a small
random valid call; every test below takes a valid call, mutates ONE thing into
something hostile or odd, and checks the contract of SPEC.md ("Bad input gets
a clear error, and nothing is changed"):

1. the call either returns a result that agrees with a reference (the same call
   on pristine, C-contiguous copies, bit for bit; or the float64 references of
   ``naive.py``; on the GPU, the CPU path's answer), or raises
   ``ValueError``/``TypeError`` whose message names the offending argument;
2. never any other exception (no IndexError, ZeroDivisionError, Numba error,
   SystemError, crash);
3. inputs that are not documented as written are unchanged, and on an error
   nothing at all is (``centers`` compared bit for bit, on the host or the device);
4. a ``grad_out`` is either fully written (and is the returned gradient) or,
   on an error, untouched.

The CPU's matrix (the tests marked ``cpu``) makes every argument hostile in
every way; the GPU's (marked ``cuda``: Numba device arrays, under the CUDA
simulator in CI, so shapes stay tiny and examples few) checks what differs on
the device: mixed devices, device arrays of the wrong dtype or shape, a wrong
``grad_out`` on the device, labels out of range caught by the range-check
kernel, and the odd but legal inputs (NaN, empty batches, zero width, strided
and Fortran-ordered device views, ``grad_out`` sharing memory with an input,
``backend="cuda"`` with odd NumPy inputs) against the CPU path's answer.  The
bad options and ``ignore_index`` values are refused before any kernel runs and
are checked on both sides (``backend``).

The table comes from the registry (``fastloss.tools.registry.LOSSES``): each
loss's function, its positional arguments (the names of what ``make_inputs``
draws), which of them are floats or labels, which is updated in place, whether
it takes ``grad_out``.  What the registry cannot say is in tables here:
``BUILDS`` (per loss, the calls this file makes: fuller than the registry's
inputs, with every optional array given so that each can be made hostile, one
ignored row, and any size down to empty and zero-width; a loss not listed runs
its registry inputs with its first check option), ``SAME_DTYPE``, the two
functions that are not losses (``center_update``, ``CenterLoss``),
``MUST_RAISE``/``MAY_RETURN`` (each loss's bad and odd option values; every
loss gets ``COMMON_MUST_RAISE``), and the per-loss expectations written in the
tests themselves (``CLASSIFICATION``, the names in their conditions).

What is decided here where SPEC.md is silent (and why):

* ``grad_out`` that shares memory with an input other than the first argument
  itself (``grad_out=target``, a view overlapping ``sample_weight``, ``weight``,
  the labels, or the logits shifted by one element): SPEC promises in-place
  only for ``grad_out=<first argument>``; anything else must give the correct
  gradient (the CPU writes through a temporary) or a ``ValueError`` naming
  ``grad_out`` (the GPU's softmax, focal and Huber losses refuse it).
  ``grad_out`` overlapping ``centers`` is a ValueError (SPEC of center_loss:
  "must not share memory with centers").
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
from fastloss.tools.registry import LOSSES

DTYPES = [np.float16, np.float32, np.float64]
WIDE = [np.float32, np.float64]
REDUCTIONS = ["mean", "sum", "none"]
FEW = settings(max_examples=3, deadline=None)
SOME = settings(max_examples=5, deadline=None)
CHEAP = settings(max_examples=2, deadline=None)  # GPU: refused before any kernel runs
KERNELS = settings(max_examples=1, deadline=None)  # GPU: runs kernels (the simulator is slow)
ERRORS = (ValueError, TypeError)


# ====================================================================== the table


class Case:
    """One public function: how to build a valid call, make it, and check it.

    ``build(rng, dtype, n, c, reduction)`` returns the call's arguments as one
    dict (positional ones by name).  ``floats`` are the float array arguments,
    ``labels`` the integer ones, ``first`` the argument the gradient is taken
    against; ``updated`` the argument written in place (``centers``), if any.
    """

    def __init__(self, name, func, positional, build, *, first=None, updated=None,
                 grad_out=True, same_dtype=()):
        self.name, self.func, self.positional, self.build = name, func, positional, build
        self.first = first or positional[0]
        self.updated = updated
        self.writes = updated is not None  # updates centers in place
        self.grad_out = grad_out  # takes grad_out=
        sample = build(np.random.default_rng(0), np.float64, 3, 2, "mean")
        arrays = [k for k in dict.fromkeys(positional + tuple(sample))
                  if isinstance(sample.get(k), np.ndarray)]
        self.floats = tuple(k for k in arrays if sample[k].dtype.kind == "f")
        self.labels = tuple(k for k in arrays if sample[k].dtype.kind in "iu")
        # the float inputs that must share one dtype (triplet: all; linear: E, W, bias)
        self.same_dtype = self.floats if same_dtype is None else tuple(same_dtype)

    def arrays(self, kw):
        return [k for k in self.floats + self.labels if kw.get(k) is not None]

    def call(self, kw):
        """(raw result, outputs): outputs maps "loss", "grad", "grad0..2", "centers" to
        host arrays (copies), whichever side the call ran on."""
        kw = dict(kw)
        if self.name == "CenterLoss":
            return _call_center_object(kw)
        args = [kw.pop(k) for k in self.positional]
        raw = self.func(*args, **kw)
        if self.name == "center_update":
            return raw, {"centers": host(raw)}
        outs = {"loss": host(raw.loss)}
        if isinstance(raw.grad, tuple):
            outs.update({f"grad{k}": host(g) for k, g in enumerate(raw.grad)})
        else:
            outs["grad"] = host(raw.grad)
        if self.updated is not None:
            outs[self.updated] = host(args[self.positional.index(self.updated)])
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


def on_device(a):
    return hasattr(a, "copy_to_host")


def host(a):
    """A host copy of an array of either side (None stays None)."""
    if a is None:
        return None
    return a.copy_to_host() if on_device(a) else np.array(a, copy=True)


def to_device(a):
    from numba import cuda
    return cuda.to_device(a)


def put(kw, case, keep=()):
    """The call with every array argument on the device, except those in ``keep``."""
    out = dict(kw)
    for k in case.floats + case.labels:
        if k not in keep and isinstance(kw.get(k), np.ndarray):
            out[k] = to_device(kw[k])
    return out


def _call_center_object(kw):
    """The CenterLoss object on the call's arguments: on the device when any of them is."""
    centers = kw["centers"]
    device = "cuda" if any(on_device(v) for v in kw.values()) else "cpu"
    init = host(centers) if on_device(centers) else centers
    try:
        K, D = np.shape(init)
    except ValueError:  # not a matrix: then init is refused
        K, D = 3, 2
    try:
        dtype = np.asarray(init).dtype  # a list of floats: float64
    except ValueError:
        dtype = None
    cl = fl.CenterLoss(K, D, alpha=kw.get("alpha", 0.5), init=init, device=device,
                       dtype=dtype if dtype in (np.float32, np.float64) else "float32")
    before = host(cl.centers)
    try:
        raw = cl(kw["features"], kw["labels"], update=kw.get("update", True),
                 reduction=kw.get("reduction", "mean"), grad=kw.get("grad", True),
                 grad_out=kw.get("grad_out"))
    except ERRORS:
        assert host(cl.centers).tobytes() == before.tobytes(), "CenterLoss.centers changed on an error"
        raise
    return raw, {"loss": host(raw.loss), "grad": host(raw.grad), "centers": host(cl.centers)}


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
            "swap": bool(rng.random() < 0.3), "reduction": reduction,
            "grad": bool(rng.random() < 0.85)}


def _batch(rng, dtype, n, c, reduction):
    return {"embeddings": rng.normal(size=(n, c)).astype(dtype),
            "labels": rng.integers(0, 3, size=n), "margin": 1.0,
            "mining": str(rng.choice(["hard", "semihard", "all"])),
            "distance": str(rng.choice(["euclidean", "squared_euclidean", "cosine"])),
            "soft": bool(rng.random() < 0.3), "reduction": reduction,
            "grad": bool(rng.random() < 0.85)}


def _center(rng, dtype, n, c, reduction):
    k = 3
    cdt = np.float32 if dtype == np.float16 else dtype
    return {"features": rng.normal(size=(n, c)).astype(dtype),
            "labels": rng.integers(0, k, size=n),
            "centers": rng.normal(size=(k, c)).astype(cdt), "alpha": 0.5,
            "reduction": reduction, "grad": bool(rng.random() < 0.85),
            "update": bool(rng.random() < 0.8)}


def _linear(rng, dtype, n, c, reduction):
    v = 4
    kw = {"embeddings": rng.normal(size=(n, c)).astype(dtype),
          "classifier": rng.normal(size=(v, c)).astype(dtype),
          "target": rng.integers(0, v, size=n), "bias": rng.normal(size=v).astype(dtype),
          "weight": rng.uniform(0.5, 2.0, v).astype(dtype),
          "sample_weight": rng.uniform(0.5, 2.0, n).astype(dtype), "label_smoothing": 0.05,
          "reduction": reduction, "grad": bool(rng.random() < 0.85)}
    if n > 2:
        kw["target"][-1] = -100  # one ignored row
    return kw


def _center_update(rng, dtype, n, c, reduction):
    kw = _center(rng, dtype, n, c, reduction)
    return {k: kw[k] for k in ("centers", "features", "labels", "alpha")}


#: per loss, the cases of this file: (case name, builder of a call)
BUILDS = {
    "softmax_cross_entropy": [("ce", lambda *a: _classes(*a, prob=False, focal=False)),
                              ("ce_prob", lambda *a: _classes(*a, prob=True, focal=False))],
    "focal_loss": [("focal", lambda *a: _classes(*a, prob=False, focal=True)),
                   ("focal_prob", lambda *a: _classes(*a, prob=True, focal=True))],
    "sigmoid_focal_loss": [("sigmoid_focal", _sigmoid)],
    "huber_loss": [("huber", _huber)],
    "triplet_margin_loss": [("triplet", _triplet)],
    "batch_triplet_loss": [("batch_triplet", _batch)],
    "center_loss": [("center_loss", _center)],
    "linear_cross_entropy": [("linear_ce", _linear)],
}
#: per loss, the float arguments that must share one dtype (None: all of them)
SAME_DTYPE = {"triplet_margin_loss": None, "linear_cross_entropy": ("embeddings", "classifier", "bias")}
#: losses whose grad_out is a tuple: tested in their own files, not by the one-array layouts here
TUPLE_GRAD_OUT = {"linear_cross_entropy"}


def _positional(info):
    """The names of the positional arguments the registry's ``make_inputs`` draws."""
    n = len(info.make_inputs(np.random.default_rng(0), np.dtype(np.float64)))
    return tuple(inspect.signature(info.function).parameters)[:n]


def _registry_build(info, positional):
    """A loss not in BUILDS: its registry inputs at ``(n, c)``, its first check option."""
    option = info.options[0]
    inputs = {k: v for k, v in option.inputs.items() if k != "shape"}

    def build(rng, dtype, n, c, reduction):
        args = info.make_inputs(rng, np.dtype(dtype), shape=(n, c), **inputs)
        kw = dict(zip(positional, args))
        kw.update(option.make_kwargs(rng, np.dtype(dtype), args))
        return {**kw, "reduction": reduction, "grad": bool(rng.random() < 0.85)}
    return build


def _cases():
    assert set(BUILDS) <= {info.name for info in LOSSES}, "BUILDS names a loss the registry lacks"
    cases = []
    for info in LOSSES:
        positional = _positional(info)
        updated = None if info.updates is None else positional[info.updates]
        for name, build in BUILDS.get(info.name, [(info.short, _registry_build(info, positional))]):
            cases.append(Case(name, info.function, positional, build, updated=updated,
                              grad_out=info.grad_out and info.name not in TUPLE_GRAD_OUT,
                              same_dtype=SAME_DTYPE.get(info.name, ())))
    # the functions that are not losses: the update alone, and the object
    cases.append(Case("center_update", fl.center_update, ("centers", "features", "labels"),
                      _center_update, first="features", updated="centers", grad_out=False))
    cases.append(Case("CenterLoss", None, ("features", "labels", "centers"), _center,
                      updated="centers"))
    return {c.name: c for c in cases}


CASES = _cases()
NAMES = list(CASES)
WITH_GRAD_OUT = [n for n in NAMES if CASES[n].grad_out]
CLASSIFICATION = ["ce", "ce_prob", "focal", "focal_prob"]  # zero classes: an error naming logits


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
    if on_device(v):
        return ("device", v.dtype, v.shape, v.copy_to_host().tobytes())
    if isinstance(v, np.ndarray):
        return ("array", v.dtype, v.shape, v.tolist() if v.dtype == object else np.array(v).tobytes())
    if isinstance(v, (list, tuple)):
        return ("seq", copy.deepcopy(v)
                if not any(isinstance(e, np.ndarray) or on_device(e) for e in v)
                else tuple(_snap(e) for e in v))
    return ("other", id(v))


def _pristine(kw):
    return {k: (host(v) if isinstance(v, np.ndarray) or on_device(v) else copy.deepcopy(v))
            for k, v in kw.items()}


_LAST = {}


def ref(case):
    """The reference for the inputs of the last ``attempt``, as they were before it."""
    return case.reference(_LAST["kw"])


def attempt(case, kw, *, written=(), buffers=()):
    """Make the call (on either side); return ``(raw, host outputs)`` or the
    ValueError/TypeError raised.

    Any other exception propagates (a test failure).  Inputs other than those
    in ``written`` (plus ``centers`` when the call updates it, and
    ``grad_out``) must be unchanged on success; on an error nothing may have
    changed, ``buffers`` (the arrays that inputs are views of) included."""
    updates = case.writes and (case.name == "center_update" or kw.get("update", True))
    before = {k: _snap(v) for k, v in kw.items()
              if isinstance(v, (np.ndarray, list, tuple)) or on_device(v)}
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


def close(got, want, dtype, what="", rows=None, slack=1):
    """Outputs within round-off of the float64 reference (``slack`` times the dtype's
    tolerances); ``rows``: only those entries (a boolean mask per output name, or None
    for all)."""
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
        r, a = naive.tol(dtype)
        naive.assert_close(g, w, dtype, scale=scale, what=f"{what} {k}", rtol=r * slack,
                           atol=a * slack)


# ====================================================================== wrong kinds of array


BAD_FLOAT_DTYPES = [np.int32, np.int64, np.bool_, np.complex128, object, "U3"]


def _as(v, dt):
    a = np.asarray(v)
    if dt == "U3":
        return a.astype(str).astype("U3")
    if dt is object:
        return a.astype(object)
    return a.astype(dt)


@pytest.mark.cpu
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


def _class_count(kw):
    """The classes a call's target indexes: the logits' last axis, or the classifier's rows."""
    return tuple(kw["logits"].shape)[-1] if "logits" in kw else tuple(kw["classifier"].shape)[0]


@pytest.mark.cpu
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


@pytest.mark.cpu
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


@pytest.mark.cpu
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
    if odd == "none" and a in ("weight", "sample_weight", "alpha", "bias"):
        # None is the documented default of the optional arguments
        close(returned(out)[1], ref(case), _tol_dtype(kw))
        return
    raises(out, (a, "init") if name == "CenterLoss" and a == "centers" else a)


@pytest.mark.cpu
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
    elif a in case.same_dtype and dtype != np.float64:
        raises(out, case.same_dtype, types=(TypeError,))  # a list is float64; the others are not
    else:
        close(returned(out)[1], ref(case), _tol_dtype(kw), f"{a} as a list")


# ====================================================================== labels


@pytest.mark.cpu
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
    upper = _class_count(kw) if a == "target" else np.asarray(kw.get("centers", np.zeros((3, 1)))).shape[0]
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


@pytest.mark.cpu
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
@pytest.mark.parametrize("value", [1.5, "0", None, 2**63, 2**64, -(2**63) - 1, 2**70, [0]])
def test_bad_ignore_index(backend, name, value):
    """Refused before any kernel runs, on either side."""
    case = CASES[name]
    kw = case.build(np.random.default_rng(1), np.float32, 4, 3, "mean")
    if backend == "cuda":
        kw = put(kw, case)
    kw["ignore_index"] = value
    raises(attempt(case, kw), "ignore_index")


# ====================================================================== options


#: bad values of every call that takes the option (a loss added to the registry gets these)
COMMON_MUST_RAISE = {"reduction": ["avg", None]}
#: each case's own bad values (beyond the common ones)
MUST_RAISE = {
    "ce": {"label_smoothing": [-0.1, 1.5, np.nan, "0.1", None], "z_loss": [-1.0, np.nan, "1"],
           "softcap": [0.0, -1.0, np.nan, "1", 1j],
           "reduction": ["avg", None, "MEAN", 1, ["mean"]], "backend": ["gpu", None, 1]},
    "focal": {"gamma": [-1.0, np.nan, "2", None, 1j],
              "alpha": ["x", [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], np.ones(5, np.float32), 1j]},
    "sigmoid_focal": {"gamma": [-1.0, np.nan, None, "2"], "alpha": ["x", None, 1j, [0.25]],
},
    "huber": {"delta": [0.0, -1.0, np.nan, "1", None, 1j], "reduction": ["sum ", None]},
    "triplet": {"margin": [-1.0, np.nan, "1", None], "eps": [-1e-6, np.nan, "0"],
                "distance": ["l1", None, 2, "Euclidean"]},
    "batch_triplet": {"margin": [-0.5, np.nan, "1"], "mining": ["hardest", None, 1],
                      "distance": ["l2", None]},
    "center_loss": {"alpha": [-0.1, 1.5, np.nan, "0.5", None, 1j]},
    "center_update": {"alpha": [-0.1, -0.5, 1.5, np.nan, "0.5", None]},
    "CenterLoss": {"alpha": [-0.1, 1.5, np.nan, "0.5", None]},
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


def _must_raise(name):
    """(option, bad value) of a case: the common ones for the options it takes, then its own."""
    takes = CASES[name].build(np.random.default_rng(0), np.float64, 3, 2, "mean")
    table = {o: list(vs) for o, vs in COMMON_MUST_RAISE.items() if o in takes}
    for o, vs in MUST_RAISE.get(name, {}).items():
        table[o] = table.get(o, []) + [v for v in vs if o not in COMMON_MUST_RAISE or v not in table[o]]
    return [(o, v) for o, vs in table.items() for v in vs]


@pytest.mark.parametrize("opt", [(n, o, v) for n in NAMES for o, v in _must_raise(n)],
                         ids=lambda p: f"{p[0]}-{p[1]}={p[2]!r}")
def test_bad_option_raises(backend, opt):
    """Refused before any kernel runs, on either side."""
    name, option, value = opt
    case = CASES[name]
    kw = case.build(np.random.default_rng(2), np.float32, 4, 3, "mean")
    if backend == "cuda":
        kw = put(kw, case)
    kw[option] = copy.deepcopy(value)
    raises(attempt(case, kw), option)


@pytest.mark.cpu
@pytest.mark.parametrize("opt", [(n, o, v) for n in NAMES for o, vs in MAY_RETURN.get(n, {}).items()
                                 for v in vs], ids=lambda p: f"{p[0]}-{p[1]}={p[2]!r}")
def test_odd_option_returns_or_raises_cleanly(opt):
    name, option, value = opt
    case = CASES[name]
    kw = case.build(np.random.default_rng(3), np.float64, 4, 3, "mean")
    kw[option] = value
    out = attempt(case, kw)
    if isinstance(out, BaseException):
        raises(out, option)


@pytest.mark.cpu
@pytest.mark.parametrize("name", ["ce", "ce_prob"])
def test_softcap_inf_is_no_cap(name):
    case = CASES[name]
    kw = case.build(np.random.default_rng(4), np.float64, 5, 4, "none")
    kw["grad"] = True
    want = case.call(dict(kw, softcap=None))[1]
    same(returned(attempt(case, dict(kw, softcap=np.inf)))[1], want, "softcap=inf")


@pytest.mark.cpu
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


@pytest.mark.cpu
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


@pytest.mark.cpu
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


@pytest.mark.cpu
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
    if case.name == "linear_ce":
        # every row's logits hold every class: a value in the classifier or the bias reaches
        # every row not ignored; one in the embeddings its row, and the classifier's and
        # bias's gradients (sums over rows) everywhere
        # (an ignored row's gradient too: its zero row of G times an inf is NaN, as in BLAS)
        kept = np.asarray(kw["target"]) != kw.get("ignore_index", -100)
        if a == "embeddings":
            rows[index[0]] = True
        else:
            rows = kept
        grad_rows = rows if a == "embeddings" else np.ones_like(rows)
        return {"loss": rows if none else None, "grad0": np.broadcast_to(grad_rows[:, None], shape),
                "grad1": np.ones(np.shape(kw["classifier"]), bool),
                "grad2": np.ones(np.shape(kw["classifier"])[:1], bool)}
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
    if case.name == "linear_ce":  # a class's weights reach every row not ignored
        kept = np.asarray(kw["target"]) != kw.get("ignore_index", -100)
        return bool(kept[index[0]] if a == "embeddings" else kept.any())
    return True


@pytest.mark.cpu
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
            # containment, not precision (the losses' own tests hold that): a leaked NaN
            # or inf shows as such; twice the round-off bound leaves room for float32
            # triplet gradients of nearly coincident points, which cancellation costs digits
            close({k: got[k]}, {k: clean[k]}, dtype, f"{bad} at {a}{index}", rows=keep,
                  slack=2)
    if np.isnan(bad) and _counts(case, kw, a, index) and "loss" in got:
        loss = got["loss"]
        assert np.isnan(loss[touched["loss"]]).all() if kw["reduction"] == "none" else np.isnan(loss)
    if np.isnan(bad) and "centers" in got and a == "features" and (
            case.name == "center_update" or kw.get("update", True)) and kw.get("alpha", 0.5) > 0:
        col = index[1]
        assert np.isnan(got["centers"][kw["labels"][index[0]], col])


@pytest.mark.cpu
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


@pytest.mark.cpu
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
    if case.name == "linear_ce":  # logits of about +-1e4: the embeddings scaled up
        kw["embeddings"] = (np.asarray(kw["embeddings"]) * 1e4).astype(np.asarray(kw["embeddings"]).dtype)
        return
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


@pytest.mark.cpu
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


@pytest.mark.cpu
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


@pytest.mark.cpu
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


@pytest.mark.cpu
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


@pytest.mark.cpu
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


@pytest.mark.cpu
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


@pytest.mark.cpu
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


@pytest.mark.cpu
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


@pytest.mark.cpu
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


@pytest.mark.cpu
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


# ====================================================================== the GPU: device arrays


DEVICE_WITH_GRAD_OUT = [n for n in WITH_GRAD_OUT if n != "CenterLoss"]
PAIRS = [(n, a) for n in NAMES for a in CASES[n].floats + CASES[n].labels]


def tiny(name, **kw):
    kw.setdefault("n", (2, 3))
    kw.setdefault("c", (2, 3))
    return calls(name, **kw)


def like_cpu(got, case, kw_host, what=""):
    """The GPU outputs against the CPU path's on the same (host) inputs."""
    want = case.call(copy.deepcopy(kw_host))[1]
    dtype = min((np.asarray(v).dtype for v in kw_host.values()
                 if isinstance(v, np.ndarray) and v.dtype.kind == "f"), key=lambda d: d.itemsize)
    assert got.keys() == want.keys(), (got.keys(), want.keys())
    for k, w in want.items():
        if w is None:
            assert got[k] is None, (what, k)
            continue
        assert got[k].shape == w.shape, (what, k, got[k].shape, w.shape)
        naive.assert_close(got[k], w, dtype, what=f"{what} {k}",
                           scale=max(1.0, float(np.max(np.abs(w[np.isfinite(w)]), initial=0.0))))


# ---------------------------------------------------------------------- refused before any kernel


@pytest.mark.cuda
@pytest.mark.parametrize("arg", PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
@pytest.mark.parametrize("how", ["numpy", "list", "only_device"])
@CHEAP
@given(data=st.data())
def test_mixed_devices_name_the_argument(arg, data, how):
    """One argument on the host among device arrays (or the only one on the device):
    TypeError naming it, nothing changed (SPEC: arrays on two devices)."""
    name, a = arg
    case, kw = data.draw(tiny(name))
    if name == "CenterLoss":  # its centers live on the device already: features/labels on the host
        if a == "centers":
            return
        dkw = put(kw, case, keep=(a,))
        if how == "list":
            dkw[a] = kw[a].tolist()
        raises(attempt(case, dict(dkw, centers=kw["centers"])), a, types=(TypeError,))
        return
    if how == "only_device":
        dkw = dict(kw, **{a: to_device(kw[a])})
    else:
        dkw = put(kw, case, keep=(a,))
        if how == "list":
            dkw[a] = kw[a].tolist()
    raises(attempt(case, dkw), a, types=(TypeError,))


@pytest.mark.cuda
@pytest.mark.parametrize("name", DEVICE_WITH_GRAD_OUT)
@pytest.mark.parametrize("bad", ["numpy", "shape", "dtype", "list", "int"])
@CHEAP
@given(data=st.data())
def test_bad_grad_out_on_device(name, data, bad):
    case, kw = data.draw(tiny(name))
    kw["grad"] = True
    x = kw[case.first]
    g = {"numpy": lambda: np.full(x.shape, 7, x.dtype),
         "shape": lambda: to_device(np.full((x.shape[0] + 1,) + x.shape[1:], 7, x.dtype)),
         "dtype": lambda: to_device(np.full(x.shape, 7, np.float64 if x.dtype != np.float64
                                                  else np.float32)),
         "list": lambda: np.full(x.shape, 7, x.dtype).tolist(),
         "int": lambda: to_device(np.full(x.shape, 7, np.int32))}[bad]()
    dkw = dict(put(kw, case), grad_out=g)
    raises(attempt(case, dkw), "grad_out")


BAD_DTYPES = [np.int32, np.bool_, np.complex64]


@pytest.mark.cuda
@pytest.mark.parametrize("arg", PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
@pytest.mark.parametrize("bad", BAD_DTYPES + [np.float32, "extra_axis", "grow"])
@CHEAP
@given(data=st.data())
def test_device_argument_of_wrong_dtype_or_shape(arg, data, bad):
    name, a = arg
    case, kw = data.draw(tiny(name))
    v = kw[a]
    if name == "CenterLoss" and a == "centers":
        return  # CenterLoss's centers are its own (see the CPU matrix for init)
    if isinstance(bad, str):
        v = np.stack([v, v]) if bad == "extra_axis" else np.concatenate(
            [v, np.take(v, [0], axis=1 if a == "centers" else 0)], axis=1 if a == "centers" else 0)
        names = (a, case.first) if a != case.first else tuple(case.floats + case.labels)
        if case.same_dtype or a == "centers":
            names = tuple(case.floats + case.labels)
    else:
        if np.dtype(bad).kind == v.dtype.kind or (np.dtype(bad).kind in "iu" and v.dtype.kind in "iu"):
            return  # a float for a float, an integer for labels: legal
        if name == "sigmoid_focal" and a == "targets" and bad in (np.int32, np.bool_):
            return  # 0/1 integer targets are legal
        v = v.astype(bad)
        names = (a,)
    dkw = put(dict(kw, **{a: v}), case)
    raises(attempt(case, dkw), names)


# ====================================================================== the range-check kernel


@pytest.mark.cuda
@pytest.mark.parametrize("arg", [(n, a) for n in NAMES for a in CASES[n].labels
                                 if n != "batch_triplet"], ids=lambda p: f"{p[0]}-{p[1]}")
@pytest.mark.parametrize("how", ["upper", "negative", "int64_min", "uint64_huge", "huge"])
@KERNELS
@given(data=st.data())
def test_device_labels_out_of_range(arg, data, how):
    """Caught on the device, before any loss kernel; centers untouched (a label of
    int64's minimum once passed as the "no ignore_index" sentinel)."""
    name, a = arg
    case, kw = data.draw(tiny(name))
    labels = kw[a].copy()
    upper = _class_count(kw) if a == "target" else kw["centers"].shape[0]
    if how == "uint64_huge":
        labels = np.where(labels < 0, 0, labels).astype(np.uint64)
        labels[-1] = 2**63 + 5
    else:
        labels[-1] = {"upper": upper, "negative": -1, "int64_min": np.iinfo(np.int64).min,
                      "huge": 2**40}[how]
    kw[a] = labels
    if name == "CenterLoss":
        centers = to_device(kw["centers"])
        cl = fl.CenterLoss(*kw["centers"].shape, device="cuda")
        cl.centers = centers
        before = centers.copy_to_host()
        with pytest.raises(ValueError, match=a):
            cl(to_device(kw["features"]), to_device(labels))
        assert cl.centers.copy_to_host().tobytes() == before.tobytes()
        return
    raises(attempt(case, put(kw, case)), a, types=(ValueError,))


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["ce", "focal"])
@KERNELS
@given(data=st.data())
def test_device_ignore_index_equal_to_a_valid_class(name, data):
    case, kw = data.draw(tiny(name, dtypes=[np.float32, np.float64], n=(3, 4)))
    cls = int(kw["target"][0])
    kw["target"][kw["target"] == -100] = cls  # -100 would be out of range now
    kw["ignore_index"] = cls
    like_cpu(returned(attempt(case, put(kw, case)))[1], case, kw, "ignore_index = a class")


# ====================================================================== odd but legal, on the device


@pytest.mark.cuda
@pytest.mark.parametrize("name", [n for n in NAMES if n != "CenterLoss"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@KERNELS
@given(data=st.data())
def test_device_nan_and_inf_as_on_the_cpu(name, data, bad):
    """One odd element: the CPU path's answer (whose confinement the CPU matrix checks)."""
    case, kw = data.draw(tiny(name, dtypes=[np.float32, np.float64]))
    a = case.first if name != "center_update" else "features"
    v = kw[a].copy()
    v[data.draw(st.integers(0, v.shape[0] - 1)), data.draw(st.integers(0, v.shape[1] - 1))] = bad
    kw[a] = v
    like_cpu(returned(attempt(case, put(kw, case)))[1], case, kw, f"{bad}")


@pytest.mark.cuda
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("what", ["empty", "zero_width"])
@KERNELS
@given(data=st.data())
def test_device_empty_batch_and_zero_width(name, data, what):
    case, kw = data.draw(tiny(name, n=(0, 0)) if what == "empty" else tiny(name, c=(0, 0)))
    out = attempt(case, put(kw, case))
    if what == "zero_width" and case.first == "logits" and name != "sigmoid_focal":
        raises(out, "logits")
        return
    like_cpu(returned(out)[1], case, kw, what)


def _strided_device(v, layout):
    if layout == "fortran":
        return to_device(np.asfortranarray(v))
    big = np.zeros(tuple(2 * s for s in v.shape), v.dtype)
    big[tuple(slice(None, None, 2) for _ in v.shape)] = v
    return to_device(big)[tuple(slice(None, None, 2) for _ in v.shape)]


@pytest.mark.cuda
@pytest.mark.parametrize("arg", [(n, a) for n in NAMES for a in CASES[n].floats
                                 if n != "CenterLoss" and a not in ("weight", "alpha")],
                         ids=lambda p: f"{p[0]}-{p[1]}")
@pytest.mark.parametrize("layout", ["fortran", "strided"])
@KERNELS
@given(data=st.data())
def test_device_strided_and_fortran_views(arg, data, layout):
    """Non-contiguous 2-D device views: the contiguous call's answer; centers updated
    through the view."""
    name, a = arg
    case, kw = data.draw(tiny(name))
    dkw = put(kw, case)
    dkw[a] = _strided_device(kw[a], layout)
    _, got = returned(attempt(case, dkw))
    like_cpu(got, case, kw, f"{a} {layout}")


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["ce_prob", "focal_prob", "sigmoid_focal", "huber",
                                  "batch_triplet", "center_loss"])
@pytest.mark.parametrize("how", ["in_place", "other_input", "shifted"])
@KERNELS
@given(data=st.data())
def test_device_grad_out_sharing_memory(name, data, how):
    """grad_out = the first argument (in place, SPEC), = another input of the same shape,
    or a view of the first argument shifted by one element: the right gradient, or a
    ValueError naming grad_out with nothing written."""
    case, kw = data.draw(tiny(name, n=(2, 3)))
    kw["grad"] = True
    want_kw = copy.deepcopy(kw)
    dkw = put(kw, case)
    x = kw[case.first]
    if how == "in_place":
        g = dkw[case.first]
    elif how == "other_input":
        other = {"ce_prob": "target", "focal_prob": "target", "sigmoid_focal": "targets",
                 "huber": "target", "batch_triplet": None, "center_loss": "centers"}[name]
        if other is None or kw[other].shape != x.shape:
            return
        g = dkw[other]
    else:
        buf = to_device(np.concatenate([x.reshape(-1), np.zeros(1, x.dtype)]))
        dkw[case.first] = buf[:-1].reshape(x.shape) if x.size else buf[:0].reshape(x.shape)
        g = buf[1:].reshape(x.shape)
    dkw["grad_out"] = g
    before = host(g)
    try:
        raw, got = case.call(dkw)
    except ERRORS as exc:
        assert how != "in_place", f"in place refused: {exc}"
        assert "grad_out" in str(exc), exc
        if how == "other_input" and name == "center_loss":
            assert "centers" in str(exc)
        np.testing.assert_array_equal(host(g), before)
        return
    assert not (how == "other_input" and name == "center_loss"), "grad_out = centers accepted"
    assert raw.grad is g
    like_cpu(got, case, want_kw, f"grad_out {how}")


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["ce", "huber", "center_loss", "triplet"])
@pytest.mark.parametrize("how", ["read_only", "fortran", "list"])
@KERNELS
@given(data=st.data())
def test_backend_cuda_with_odd_numpy_inputs(name, data, how):
    """``backend="cuda"`` copies NumPy inputs over: read-only, Fortran-ordered and list
    inputs give the CPU answer (centers: read-only is refused, lists are not arrays)."""
    case, kw = data.draw(tiny(name))
    want_kw = copy.deepcopy(kw)
    a = case.first
    if how == "read_only":
        for k in case.floats + case.labels:
            kw[k] = kw[k].copy()
            kw[k].flags.writeable = False
    elif how == "fortran":
        kw[a] = np.asfortranarray(kw[a])
    else:
        kw[a] = kw[a].tolist()
    out = attempt(case, dict(kw, backend="cuda"))
    if how == "read_only" and name == "center_loss" and kw.get("update", True):
        raises(out, "centers", types=(ValueError,))
        return
    if how == "list" and a in case.same_dtype and np.asarray(want_kw[a]).dtype != np.float64:
        raises(out, case.same_dtype, types=(TypeError,))
        return
    like_cpu(returned(out)[1], case, dict(want_kw, **{a: kw[a]}) if how == "list" else want_kw, how)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["ce", "huber", "center_loss", "triplet", "linear_ce"])
@CHEAP
@given(data=st.data())
def test_backend_cuda_refuses_a_read_only_numpy_grad_out(name, data):
    """``backend="cuda"`` on NumPy inputs copies the gradient back into a NumPy
    ``grad_out``: a read-only one is refused before anything runs, naming it (it once
    failed only at the copy-back, in NumPy's words), and nothing changes."""
    case, kw = data.draw(tiny(name))
    kw["grad"] = True
    if name == "triplet":
        likes = [kw["anchor"]] * 3
    elif name == "linear_ce":
        likes = [kw["embeddings"], kw["classifier"]] + (
            [kw["bias"]] if kw.get("bias") is not None else [])
    else:
        likes = [kw[case.first]]
    outs = []
    for x in likes:
        g = np.full(np.shape(x), 7, np.asarray(x).dtype)
        g.flags.writeable = False
        outs.append(g)
    kw["grad_out"] = tuple(outs) if name in ("triplet", "linear_ce") else outs[0]
    raises(attempt(case, dict(kw, backend="cuda")), "grad_out", types=(ValueError,))

