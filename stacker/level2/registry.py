"""The combiner registry: the one place where a level-2 combiner is declared and described.

``@register_combiner(name, inputs=..., auto=..., meaning=...)`` on a combiner class, or on a
factory ``(n_learners, random_state) -> unfitted estimator``, is all a new combiner needs:
its name then works in ``Ensemble(meta=...)`` and ``--meta``, ``meta="auto"`` tries it when
``auto=True``, a class is trusted for save/load (:func:`stacker.io.persist.trusted`), and
the CLI help, the report's weights and the Ensemble docstring describe it from here.
Registration order is the order in which ``"auto"`` tries its candidates (it breaks ties).

A fitted combiner may expose ``weights_``, one per learner; ``meaning`` says what they are.
This module knows no combiner: :mod:`stacker.level2.combiners` registers the built-in ones.
"""

from __future__ import annotations

import inspect
import textwrap
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable

import numpy as np

from stacker.io.persist import trusted
from stacker.learners.zoo import fresh_estimator
from stacker.level2.arrays import META_INPUTS

__all__ = ["COMBINERS", "INPUTS", "Combiner", "auto_combiners", "check_meta", "combiner_label", "combiner_names",
           "learner_weights", "make_combiner", "meta_doc", "meta_help", "meta_inputs_help", "probability_combiners",
           "register_combiner", "unregister_combiner", "weight_meaning"]

# what a combiner reads: "proba", the learners' probability blocks only (so meta_inputs="proba"),
# or "any" level-2 columns, features included
INPUTS = ("proba", "any")
DEFAULT_MEANING = "each learner's weight in the combiner"


@dataclass(frozen=True)
class Combiner:
    """One registered combiner; calling it, ``(n_learners, random_state)``, makes a fresh unfitted one."""

    name: str
    make: Callable
    inputs: str
    auto: bool
    meaning: str | None  # what its ``weights_`` mean; None: the generic sentence
    source: object  # the decorated class or factory (its docstring's first line describes it)

    def __call__(self, n_learners: int, random_state: int = 0):
        return self.make(n_learners, random_state)

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.source) or ""
        return doc.split("\n\n")[0].replace("\n", " ").strip()


_REGISTRY: dict[str, Combiner] = {}
COMBINERS = MappingProxyType(_REGISTRY)  # name -> Combiner, read-only, live, in registration order


def register_combiner(name: str, *, inputs: str = "proba", auto: bool = False, meaning: str | None = None):
    """Declare a combiner (a class decorator, or a decorator on a factory); returns it unchanged.

    Parameters
    ----------
    name : str
        What ``meta=`` and ``--meta`` call it (no comma, ``+`` or space: lists and the
        ``+T`` of calibrated candidates use them; ``"auto"`` is taken).
    inputs : {"proba", "any"}
        ``"proba"``: it reads ``n_learners`` probability blocks, so it needs
        ``meta_inputs="proba"``; ``"any"``: any columns, the learners' features included.
    auto : bool
        ``meta="auto"`` tries it.
    meaning : str, optional
        What its fitted ``weights_`` mean, for the report.

    A class is made as ``cls(n_learners=..., random_state=...)``, each passed only if its
    constructor takes it, and is trusted for loading; a factory's estimators must be
    trusted where their class is defined (or by skops).
    """
    if not isinstance(name, str) or not name or name == "auto" or any(c in name for c in ",+ \t\n"):
        raise ValueError(f"a combiner's name is a word without commas, '+' or spaces, other than 'auto'; got {name!r}")
    if inputs not in INPUTS:
        raise ValueError(f"inputs must be one of {INPUTS}, got {inputs!r}")

    def register(obj):
        if name in _REGISTRY:
            raise ValueError(f"a combiner named {name!r} is already registered")
        if isinstance(obj, type):
            make = _class_factory(obj)
            trusted(obj)
        elif callable(obj):
            make = obj
        else:
            raise TypeError(f"register_combiner decorates a class or a factory function, got {type(obj).__name__}")
        _REGISTRY[name] = Combiner(name, make, inputs, bool(auto), meaning, obj)
        return obj

    return register


def _class_factory(cls) -> Callable:
    takes = set(inspect.signature(cls).parameters)

    def make(n_learners, random_state):
        kwargs = {"n_learners": n_learners, "random_state": random_state}
        return cls(**{key: value for key, value in kwargs.items() if key in takes})

    return make


def unregister_combiner(name: str) -> Combiner:
    """Remove a registered combiner (a plugin's or a test's); its class stays trusted for loading."""
    return _REGISTRY.pop(name)


def probability_combiners() -> tuple:
    """Names of the combiners that read probability blocks only (they need ``meta_inputs="proba"``)."""
    return tuple(n for n, c in _REGISTRY.items() if c.inputs == "proba")


def auto_combiners() -> tuple:
    """What ``meta="auto"`` tries, in order."""
    return tuple(n for n, c in _REGISTRY.items() if c.auto)


def _feature_readers() -> list:
    """Names of the combiners that read any columns (``inputs="any"``): those ``meta_inputs="features"`` allows."""
    return [n for n, c in _REGISTRY.items() if c.inputs == "any"]


def combiner_names(meta) -> tuple:
    """The candidates that ``meta`` stands for: ``"auto"``, a name, a list of names, or an estimator."""
    if isinstance(meta, str):
        items = auto_combiners() if meta == "auto" else tuple(s.strip() for s in meta.split(",") if s.strip())
    elif isinstance(meta, (list, tuple)):
        items = tuple(meta)
    else:
        fresh_estimator(meta, 0, "a meta-learner")  # checks fit/predict_proba
        return (meta,)
    if not items:
        raise ValueError("meta must name at least one combiner")
    unknown = [m for m in items if isinstance(m, str) and m not in _REGISTRY]
    if unknown:
        raise ValueError(f"unknown meta-learner {unknown[0]!r}; use 'auto', one of {sorted(_REGISTRY)}, "
                         "a list of them, or a scikit-learn classifier")
    return items


def check_meta(meta, meta_inputs: str) -> tuple:
    """:func:`combiner_names` of ``meta``, once each candidate can read what ``meta_inputs`` gives level 2."""
    if meta_inputs not in META_INPUTS:
        raise ValueError(f"meta_inputs must be one of {META_INPUTS}, got {meta_inputs!r}")
    candidates = combiner_names(meta)
    if meta_inputs != "proba":
        bad = [c for c in candidates if isinstance(c, str) and _REGISTRY[c].inputs == "proba"]
        if bad:
            readers = ", ".join(repr(n) for n in _feature_readers())
            raise ValueError(f"meta={bad[0]!r} combines probabilities; with meta_inputs={meta_inputs!r} "
                             f"use {'meta=' + readers + ' or ' if readers else ''}a scikit-learn classifier")
    return candidates


def make_combiner(item, n_learners: int, random_state: int = 0):
    """A fresh combiner from a name or a scikit-learn classifier."""
    if isinstance(item, str):
        return _REGISTRY[item](n_learners, random_state)
    return fresh_estimator(item, random_state, "a meta-learner")


def combiner_label(item) -> str:
    """A candidate's name in level 2's table: its registered name, or its estimator's class name."""
    return item if isinstance(item, str) else type(item).__name__


def learner_weights(combiner) -> np.ndarray | None:
    """Per-learner weights of a fitted combiner (``None`` for those without any, e.g. a dense net)."""
    w = getattr(combiner, "weights_", None)
    return None if w is None else np.asarray(w, dtype=np.float64)


def weight_meaning(label: str) -> str:
    """What the weights of level 2's choice ``label`` (``"greedy+T"``, a saved run's name...) mean.

    Unknown names (a combiner no longer registered, ``"best member (2)"``) get the generic sentence.
    """
    entry = _REGISTRY.get(str(label).split("+")[0])
    return entry.meaning if entry is not None and entry.meaning else DEFAULT_MEANING


def _or(names) -> str:
    names = list(names)
    return " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def meta_help() -> str:
    """The ``--meta`` help: what ``auto`` tries, then the other names."""
    others = [n for n in _REGISTRY if not _REGISTRY[n].auto]
    return (f"level 2: auto (lowest cross-validated log loss among {', '.join(auto_combiners())}), one of those"
            + (f" or {', '.join(others)}" if others else "") + ", or a comma-separated list to choose from")


def meta_inputs_help() -> str:
    """The ``--meta-inputs`` help: which combiners read features."""
    readers = _feature_readers()
    needs = f"needs --meta {_or(readers)}" if readers else "no registered combiner reads them"
    return f"what level 2 sees: the learners' probabilities, their features ({needs}), or both"


def meta_doc(indent: str = "    ", width: int = 96) -> str:
    """The ``meta`` and ``meta_inputs`` entries of :class:`stacker.Ensemble`'s docstring (numpydoc).

    One line per registered combiner, from its docstring; ``indent`` is the docstring's own.
    """
    body = indent + "    "

    def fill(text, first, rest):
        return textwrap.fill(text, width, initial_indent=first, subsequent_indent=rest)

    auto = ", ".join(f'``"{n}"``' for n in auto_combiners())
    readers = _feature_readers()
    lines = [indent + "meta : str, list or estimator",
             fill(f'Level 2: ``"auto"`` picks, by cross-validated log loss, among {auto} (each with and without '
                  "calibration); a name or list of names restricts the choice; any scikit-learn classifier is "
                  "used as given. The registered combiners (:mod:`stacker.level2.registry`):", body, body),
             ""]
    lines += [fill(f'``"{c.name}"``{" (auto)" if c.auto else ""}: {c.summary}', body + "- ", body + "  ")
              for c in _REGISTRY.values()]
    needs = ", ".join([f'``meta="{n}"``' for n in readers[:1]] + [f'``"{n}"``' for n in readers[1:]])
    needs = f"{needs} or an estimator" if readers else "an estimator"
    lines += [indent + 'meta_inputs : {"proba", "features", "both"}',
              fill(f"What level 2 sees; features need {needs}.", body, body)]
    return "\n".join(lines)
