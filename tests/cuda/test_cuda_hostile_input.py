"""Hostile and odd input on the GPU path (issue 6, part 5): the CPU matrix's
contract (tests/test_hostile_input.py) for device arrays.

Every public function with its arguments on the device (Numba device arrays,
under the CUDA simulator in CI): one argument made hostile at a time.  Mixed
devices, wrong dtypes and shapes, bad options and a wrong ``grad_out`` are
refused before any kernel runs, with a ``TypeError``/``ValueError`` naming the
argument and nothing changed on the device (``centers`` compared bit for bit);
labels out of range are caught by the range-check kernel; the odd but legal
inputs (NaN, empty batches, zero width, strided and Fortran-ordered device
views, ``grad_out`` sharing memory with an input) give the CPU path's answer,
or, for a ``grad_out`` that overlaps an input other than the first argument, a
``ValueError`` naming ``grad_out``.  Shapes stay tiny: the simulator runs every
block as Python threads.
"""
import copy

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
import naive
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import cuda
from test_hostile_input import (  # tests/ is on sys.path, as for naive
    CASES,
    NAMES,
    calls,
)

import fastloss as fl

ERRORS = (ValueError, TypeError)
CHEAP = settings(max_examples=2, deadline=None)  # refused before any kernel runs
KERNELS = settings(max_examples=1, deadline=None)  # runs kernels: the simulator is slow
WITH_GRAD_OUT = [n for n in NAMES if n not in ("center_update", "triplet", "CenterLoss")]


def tiny(name, **kw):
    kw.setdefault("n", (2, 3))
    kw.setdefault("c", (2, 3))
    return calls(name, **kw)


def on_device(a):
    return hasattr(a, "copy_to_host")


def host(a):
    return a.copy_to_host() if on_device(a) else (None if a is None else np.asarray(a))


def put(kw, case, keep=()):
    """The call with every array argument on the device, except those in ``keep``."""
    out = dict(kw)
    for k in case.floats + case.labels:
        if k not in keep and isinstance(kw.get(k), np.ndarray):
            out[k] = cuda.to_device(kw[k])
    return out


def gcall(case, kw):
    """Like ``Case.call``, with device results copied to the host."""
    kw = dict(kw)
    if case.name == "CenterLoss":
        centers = kw.pop("centers")
        cl = fl.CenterLoss(*centers.shape, alpha=kw.pop("alpha", 0.5), dtype=centers.dtype,
                           device="cuda", init=host(centers))
        raw = cl(kw["features"], kw["labels"], update=kw.get("update", True),
                 reduction=kw.get("reduction", "mean"), grad=kw.get("grad", True),
                 grad_out=kw.get("grad_out"))
        return raw, {"loss": host(raw.loss), "grad": host(raw.grad), "centers": host(cl.centers)}
    args = [kw.pop(k) for k in case.positional]
    raw = case.func(*args, **kw)
    if case.name == "center_update":
        return raw, {"centers": host(raw)}
    outs = {"loss": host(raw.loss)}
    if isinstance(raw.grad, tuple):
        outs.update({f"grad{k}": host(g) for k, g in enumerate(raw.grad)})
    else:
        outs["grad"] = host(raw.grad)
    if case.name == "center_loss":
        outs["centers"] = host(args[2])
    return raw, outs


def _snap(v):
    if on_device(v):
        return ("device", v.copy_to_host().tobytes())
    if isinstance(v, np.ndarray):
        return ("array", v.tobytes())
    return ("other", repr(v))


def attempt(case, kw):
    """The GPU call: the ValueError/TypeError it raised (with every argument, on
    the device or not, unchanged), or ``(raw, host outputs)``."""
    before = {k: _snap(v) for k, v in kw.items()}
    try:
        return gcall(case, kw)
    except ERRORS as exc:
        for k, s in before.items():
            assert _snap(kw[k]) == s, f"{case.name}: {k} changed although the call raised {exc!r}"
        return exc


def raises(out, names, types=ERRORS):
    names = (names,) if isinstance(names, str) else tuple(names)
    assert isinstance(out, BaseException), f"accepted, expected an error naming {names}"
    assert isinstance(out, types), f"{type(out).__name__}: {out}"
    assert any(n in str(out) for n in names), f"{type(out).__name__}({out}) names none of {names}"


def returned(out):
    if isinstance(out, BaseException):
        pytest.fail(f"raised {type(out).__name__}: {out}")
    return out


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


# ====================================================================== refused before any kernel


PAIRS = [(n, a) for n in NAMES for a in CASES[n].floats + CASES[n].labels]


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
        raises(attempt(case, dict(dkw, centers=kw["centers"])), a, (TypeError,))
        return
    if how == "only_device":
        dkw = dict(kw, **{a: cuda.to_device(kw[a])})
    else:
        dkw = put(kw, case, keep=(a,))
        if how == "list":
            dkw[a] = kw[a].tolist()
    raises(attempt(case, dkw), a, (TypeError,))


@pytest.mark.parametrize("name", WITH_GRAD_OUT)
@pytest.mark.parametrize("bad", ["numpy", "shape", "dtype", "list", "int"])
@CHEAP
@given(data=st.data())
def test_bad_grad_out_on_device(name, data, bad):
    case, kw = data.draw(tiny(name))
    kw["grad"] = True
    x = kw[case.first]
    g = {"numpy": lambda: np.full(x.shape, 7, x.dtype),
         "shape": lambda: cuda.to_device(np.full((x.shape[0] + 1,) + x.shape[1:], 7, x.dtype)),
         "dtype": lambda: cuda.to_device(np.full(x.shape, 7, np.float64 if x.dtype != np.float64
                                                  else np.float32)),
         "list": lambda: np.full(x.shape, 7, x.dtype).tolist(),
         "int": lambda: cuda.to_device(np.full(x.shape, 7, np.int32))}[bad]()
    dkw = dict(put(kw, case), grad_out=g)
    raises(attempt(case, dkw), "grad_out")


BAD_DTYPES = [np.int32, np.bool_, np.complex64]


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


@pytest.mark.parametrize("arg", [(n, o, v) for n in NAMES for o, vs in {
    "ce": {"label_smoothing": [1.5, "0.1"], "softcap": [0.0], "ignore_index": [2**63, 1.5],
               "reduction": [None]},
    "focal": {"gamma": [-1.0], "alpha": [np.ones(5, np.float32)], "ignore_index": [2**64]},
    "sigmoid_focal": {"gamma": [np.nan], "alpha": ["x"]},
    "huber": {"delta": [0.0, "1"]},
    "triplet": {"margin": [-1.0], "distance": ["l1"]},
    "batch_triplet": {"mining": ["hardest"], "margin": [np.nan]},
    "center_loss": {"alpha": [1.5, "0.5"], "reduction": ["avg"]},
    "center_update": {"alpha": [-0.5]},
}.get(n, {}).items() for v in vs], ids=lambda p: f"{p[0]}-{p[1]}={p[2]!r}"[:60])
def test_bad_options_on_device(arg):
    name, option, value = arg
    case = CASES[name]
    kw = case.build(np.random.default_rng(0), np.float32, 3, 3, "mean")
    dkw = dict(put(kw, case), **{option: value})
    raises(attempt(case, dkw), option)


# ====================================================================== the range-check kernel


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
    upper = kw["logits"].shape[-1] if a == "target" else kw["centers"].shape[0]
    if how == "uint64_huge":
        labels = np.where(labels < 0, 0, labels).astype(np.uint64)
        labels[-1] = 2**63 + 5
    else:
        labels[-1] = {"upper": upper, "negative": -1, "int64_min": np.iinfo(np.int64).min,
                      "huge": 2**40}[how]
    kw[a] = labels
    if name == "CenterLoss":
        centers = cuda.to_device(kw["centers"])
        cl = fl.CenterLoss(*kw["centers"].shape, device="cuda")
        cl.centers = centers
        before = centers.copy_to_host()
        with pytest.raises(ValueError, match=a):
            cl(cuda.to_device(kw["features"]), cuda.to_device(labels))
        assert cl.centers.copy_to_host().tobytes() == before.tobytes()
        return
    raises(attempt(case, put(kw, case)), a, (ValueError,))


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
        return cuda.to_device(np.asfortranarray(v))
    big = np.zeros(tuple(2 * s for s in v.shape), v.dtype)
    big[tuple(slice(None, None, 2) for _ in v.shape)] = v
    return cuda.to_device(big)[tuple(slice(None, None, 2) for _ in v.shape)]


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
        buf = cuda.to_device(np.concatenate([x.reshape(-1), np.zeros(1, x.dtype)]))
        dkw[case.first] = buf[:-1].reshape(x.shape) if x.size else buf[:0].reshape(x.shape)
        g = buf[1:].reshape(x.shape)
    dkw["grad_out"] = g
    before = host(g)
    try:
        raw, got = gcall(case, dkw)
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
        raises(out, "centers", (ValueError,))
        return
    if how == "list" and case.same_dtype and np.asarray(want_kw[a]).dtype != np.float64:
        raises(out, case.floats, (TypeError,))
        return
    like_cpu(returned(out)[1], case, dict(want_kw, **{a: kw[a]}) if how == "list" else want_kw, how)

