"""Every public name documents itself: formula or purpose, options, shapes, paper, example.

A structural test, so that a function added to ``fastloss.__all__`` without docs fails
CI.  The examples themselves run as doctests (``--doctest-modules`` in ``addopts``);
``test_examples_run`` runs them once more from here, so that they are checked also when
only ``tests/`` is collected.
"""
import doctest
import inspect
import re

import pytest

import fastloss as fl
from fastloss.tools.registry import LOSSES

CENTER_LOSS_METHODS = ("__call__", "state_dict", "load_state_dict")

# every loss of the registry, and the public forms of center loss that are not loss functions
DOCUMENTED = [info.name for info in LOSSES] + ["center_update", "CenterLoss"]

# the words each one's "References" section must name (its papers)
PAPERS = {
    "softmax_cross_entropy": ("Szegedy", "2016", "Chowdhery", "2022", "Gemma", "2024"),
    "focal_loss": ("Lin", "2017", "Focal Loss"),
    "sigmoid_focal_loss": ("Lin", "2017", "torchvision"),
    "huber_loss": ("Huber", "1964"),
    "triplet_margin_loss": ("Schroff", "2015", "Balntas", "2016"),
    "batch_triplet_loss": ("Hermans", "Beyer", "Leibe", "2017", "Schroff", "2015"),
    "center_loss": ("Wen", "2016"),
    "center_update": ("Wen", "2016"),
    "CenterLoss": ("Wen", "2016"),
    "linear_cross_entropy": ("Wijmans", "2024", "Cut Your Losses", "Liger", "Hsu"),
}
NOT_A_LOSS = {"backend_of", "LossGrad"}


def _public():
    """(name, object) for every name in ``fastloss.__all__`` and CenterLoss's methods."""
    items = [(name, getattr(fl, name)) for name in fl.__all__]
    items += [(f"CenterLoss.{m}", getattr(fl.CenterLoss, m)) for m in CENTER_LOSS_METHODS]
    return items


PUBLIC = _public()
IDS = [name for name, _ in PUBLIC]


def _doc(obj):
    return inspect.getdoc(obj) or ""


def test_every_public_name_is_classified():
    """A new public name must be a loss of the registry (or a form of center loss) or in
    NOT_A_LOSS."""
    assert set(fl.__all__) == set(DOCUMENTED) | NOT_A_LOSS


def test_every_loss_names_its_papers():
    """A loss added to the registry must add the words of its papers to PAPERS."""
    assert set(PAPERS) == set(DOCUMENTED)


@pytest.mark.parametrize("name,obj", PUBLIC, ids=IDS)
def test_docstring_has_an_example_and_shapes(name, obj):
    doc = _doc(obj)
    assert len(doc) > 200, f"{name}: missing or one-line docstring"
    assert ">>>" in doc, f"{name}: no runnable example (>>>)"
    assert re.search(r"\bshapes?\b", doc, re.IGNORECASE), f"{name}: the shapes are not stated"


@pytest.mark.parametrize("name,obj", PUBLIC, ids=IDS)
def test_docstring_names_every_parameter(name, obj):
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):  # pragma: no cover - every public object has one
        pytest.skip(f"{name} has no signature")
    doc = _doc(obj)
    missing = [p for p in params if p != "self" and p not in doc]
    assert not missing, f"{name}: parameters not described in the docstring: {missing}"


@pytest.mark.parametrize("name", DOCUMENTED)
def test_published_losses_cite_their_paper(name):
    doc = _doc(getattr(fl, name))
    assert re.search(r"^References?:", doc, re.MULTILINE), f"{name}: no 'References:' section"
    refs = doc[re.search(r"^References?:", doc, re.MULTILINE).start():]
    missing = [w for w in PAPERS.get(name, ()) if w not in refs]
    assert not missing, f"{name}: the References section does not name {missing}"


@pytest.mark.parametrize("name", DOCUMENTED)
def test_losses_state_formula_options_and_returns(name):
    doc = _doc(getattr(fl, name))
    assert "Args:" in doc, f"{name}: no Args section"
    assert "default" in doc.lower(), f"{name}: the defaults are not stated"
    if name != "CenterLoss":
        assert "Returns:" in doc, f"{name}: no Returns section"
    # the formula: a math block or an inline one
    assert ".. math::" in doc or "=" in doc, f"{name}: no formula"


@pytest.mark.parametrize("name,obj", PUBLIC, ids=IDS)
def test_examples_run(name, obj):
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = finder.find(obj, name, globs={})
    assert tests and tests[0].examples, f"{name}: no doctest found"
    for t in tests:
        runner.run(t)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} example(s) failed"
