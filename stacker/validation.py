"""The parameters of :class:`stacker.Ensemble`: every row, its check, its documentation, the signature.

The rows come from where each concept lives: the stacking rows and the run rows here,
the extraction options from :mod:`stacker.features.config`, and one row per learner kind
that declares a parameter (:mod:`stacker.learners.kinds`). :func:`signature` is
``Ensemble.__init__``'s (what scikit-learn's ``get_params`` and ``clone`` read),
:func:`validate` checks an ensemble's values before any work, :func:`params_doc` writes
the Parameters section of its docstring, and :func:`check_training_data` the data.
"""

from __future__ import annotations

import inspect

import numpy as np

from stacker.features.config import EXTRACTION_OPTIONS
from stacker.features.device import DEVICES
from stacker.learners.kinds import LEARNER_KINDS, kind_params, learner_specs
from stacker.level2.calibration import MIN_PROBA
from stacker.level2.registry import check_meta, combiner_names, meta_doc
from stacker.params import Param
from stacker.pseudo_labels import PARAM as PSEUDO_LABELS

__all__ = ["STACKING", "RUN", "ensemble_params", "signature", "validate", "params_doc", "check_training_data",
           "check_weighted", "training_weights", "weights_note"]


def _int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


STACKING = (
    Param("backbones", ("efficientnet_lite0",), "list of str or dict\n    Registered backbone names (``\"name@size\"``: at a square input size); a dict may set "
          "``backbone``, ``input_size``,\n    ``weights``, ``name``, ``models``, ``kind`` and a learner kind's "
          "parameter\n    (e.g. ``finetune``) for one backbone."),
    Param("models", "default", "str or list\n    Models fitted on every backbone's features, each one base learner: "
          "a preset\n    (``\"default\"``: logistic + prototype; ``\"fast\"``, ``\"best\"``, ``\"dense\"``), names\n"
          "    from :data:`stacker.learners.zoo.MODELS` or scikit-learn classifiers."),
    Param("meta", "auto", meta_doc),
    Param("meta_inputs", "proba", ""),  # documented with ``meta`` (meta_doc)
    Param("calibration", True, "bool\n    Also try every combiner followed by a temperature and floor fitted out of "
          "fold.", lambda v: isinstance(v, (bool, np.bool_)), "True or False"),
    Param("cv", 5, "int\n    Number of stratified folds, shared by every learner and level 2.",
          lambda v: _int(v) and v >= 2, "an integer >= 2"),
    Param("random_state", 0, "int\n    Seeds folds and every learner: one seed, one result.", _int, "an integer"),
    Param("class_weight", None, "None, 'balanced' or dict\n    Weights of the classes in every learner's fold fits, "
          "level 2, its calibration and\n    the reported scores: ``\"balanced\"`` gives each class the same total "
          "weight\n    (``n / (k * weight of the class)``), a dict maps class names to weights (others\n    1). "
          "Multiplies ``fit``'s ``sample_weight``. Not out of core or with Ray.",
          lambda v: v is None or v == "balanced" or isinstance(v, dict), "None, 'balanced' or a dict of class weights"),
    PSEUDO_LABELS,
)

RUN = (
    Param("strategy", None, "tf.distribute.Strategy, optional\n    Extraction and Keras models are built and run in "
          "its scope. Not saved."),
    Param("device", "auto", "{'auto', 'cpu', 'gpu'}\n    Where forward passes and Keras training run "
          "(:mod:`stacker.features.device`):\n    ``\"auto\"`` a GPU when one works here, ``\"gpu\"`` one or an error "
          "before any work\n    (with the install command), ``\"cpu\"`` never a GPU. Not saved.",
          lambda v: v in DEVICES, f"one of {DEVICES}"),
    Param("verbose", 1, "int\n    0: silent; 1: progress and fold scores."),
    Param("out_of_core", "auto", "{'auto', True, False}\n    Read features from the cache in windows instead of "
          "loading every source's\n    matrix (:mod:`stacker.learners.streaming`): models are then streaming ones "
          "and\n    level 2 sees probabilities only. ``\"auto\"`` streams once the training features\n    of all "
          "sources would take more than 4 GiB as float32\n    (:data:`stacker.features.rows.OUT_OF_CORE_BYTES`). "
          "Needs ``cache_dir``.",
          lambda v: isinstance(v, (bool, np.bool_)) or v == "auto", "'auto', True or False"),
    Param("executor", "local", "{'local', 'ray'}\n    ``\"ray\"``: extract missing features on a Ray actor pool and "
          "fit folds as Ray\n    tasks (:mod:`stacker.learners.distributed`; ``pip install 'stacker[ray]'``). Same "
          "results\n    as ``\"local\"``; needs ``cache_dir``.", lambda v: v in ("local", "ray"), "'local' or 'ray'"),
    Param("min_proba", MIN_PROBA, "float\n    Every predicted probability is at least this, rows still summing to 1 "
          "(mixed with\n    uniform: ``(1 - k * min_proba) * p + min_proba``), so one confidently wrong image\n"
          "    costs at most ``-log(min_proba)`` of log loss (13.8 at the default). The out-of-fold\n"
          "    ``meta_oof_proba_`` get the same floor. 0: the raw probabilities. Must be below\n"
          "    ``1 / n_classes``; set it at load time with ``Ensemble.load(..., min_proba=)``.",
          lambda v: isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and 0 <= v < 0.5,
          "a number >= 0 and below 1/n_classes"),
)


def ensemble_params() -> list[Param]:
    """Every parameter in signature order: stacking, extraction, learner kinds, run (each name once)."""
    params = [*STACKING, *(o.param for o in EXTRACTION_OPTIONS.values()), *kind_params(), *RUN]
    names = [p.name for p in params]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"Ensemble parameters {twice} are declared twice (an extraction option or learner kind "
                         "reuses the name of another parameter): rename the registered one")
    return params


def signature() -> inspect.Signature:
    """``Ensemble.__init__``'s signature, from the rows: ``backbones`` first, then keyword-only parameters."""
    params = ensemble_params()
    positional = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                  inspect.Parameter(params[0].name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=params[0].default)]
    return inspect.Signature(positional + [inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY, default=p.default)
                                           for p in params[1:]])


def params_doc(indent: str = "    ") -> str:
    """The numpydoc Parameters entries, one per row, from each row's ``doc``."""
    out = []
    for p in ensemble_params():
        doc = p.doc() if callable(p.doc) else p.doc
        if not doc:
            continue
        if p.doc is meta_doc:
            out.append(doc)
            continue
        kind, _, text = doc.partition("\n")
        out.append(f"{indent}{p.name} : {kind}" + "".join(f"\n{indent}{line}" for line in text.split("\n") if text))
    return "\n".join(out)


def validate(est) -> list[dict]:
    """Check every parameter of ``est`` (no network is built: a typo fails in milliseconds); its learner specs."""
    check_meta(est.meta, est.meta_inputs)
    for p in ensemble_params():
        p.validate(getattr(est, p.name))
    if est.executor == "ray" and est.cache_dir is None:
        raise ValueError("executor='ray' shares features and fold results through the cache: give a cache_dir "
                         "(on storage every Ray node mounts)")
    specs = learner_specs(est.backbones, est.models, est.input_size, est.weights,
                          {p.name: getattr(est, p.name) for p in kind_params()})
    if est.out_of_core is True:
        check_out_of_core(est, specs)
    return specs


def check_weighted(est, specs, what: str | None = None) -> None:
    """Weights need learners whose fold fits take them (checked before extraction).

    ``what`` names the feature that needs them when it is not ``class_weight`` or
    ``sample_weight`` (pseudo-labels weigh each pseudo-labelled image by its confidence).
    """
    from stacker.learners.zoo import WEIGHTS, check_takes_weights

    what = what or WEIGHTS
    if est.executor == "ray":
        raise ValueError(f"{what} are not supported with executor='ray'; use executor='local'")
    for spec in specs:
        LEARNER_KINDS[spec["kind"]].check_weights(spec, what)
    if what == WEIGHTS:  # pseudo-labelled rows never reach level 2
        for item in combiner_names(est.meta):
            if not isinstance(item, str):  # registered combiners all take weights
                check_takes_weights(item, "meta", what)


def training_weights(data, class_weight=None, sample_weight=None) -> np.ndarray | None:
    """Each training image's weight, class weight times sample weight, scaled to mean 1; None without weights.

    ``sample_weight`` is an array aligned with ``data`` (its paths, in order) or a dict
    path -> weight naming every image of ``data``; a weight of 0 takes an image's influence
    away. ``class_weight="balanced"`` gives every class the same total (sample) weight.
    """
    if class_weight is None and sample_weight is None:
        return None
    n, classes = len(data), list(data.classes)
    if sample_weight is None:
        w = np.ones(n)
    elif isinstance(sample_weight, dict):
        sample_weight = {str(p): v for p, v in sample_weight.items()}
        paths = {str(p) for p in data.paths}
        unknown = sorted(p for p in sample_weight if p not in paths)
        missing = [p for p in data.paths if str(p) not in sample_weight]
        if unknown or missing:
            raise ValueError("sample_weight must give a weight to every training image and no other path: "
                             + "; ".join(([f"{len(unknown)} paths are not training images (e.g. {unknown[0]})"]
                                          if unknown else [])
                                         + ([f"{len(missing)} training images have none (e.g. {missing[0]})"]
                                            if missing else [])))
        w = np.array([sample_weight[str(p)] for p in data.paths], dtype=np.float64)
    else:
        w = np.asarray(sample_weight, dtype=np.float64).reshape(-1) if np.ndim(sample_weight) == 1 else None
        if w is None or len(w) != n:
            raise ValueError(f"sample_weight must have one weight per training image ({n}), got shape "
                             f"{np.shape(sample_weight)}")
    _check_weights(w, "sample_weight")
    y = np.asarray(data.y)
    totals = np.bincount(y, weights=w, minlength=len(classes))
    if class_weight == "balanced":
        empty = [c for c, t in zip(classes, totals) if t == 0]
        if empty:
            raise ValueError(f"class_weight='balanced' needs weight in every class; class {empty[0]!r} has none")
        per_class = totals.sum() / (len(classes) * totals)
    elif isinstance(class_weight, dict):
        unknown = sorted(str(c) for c in class_weight if c not in classes)
        if unknown:
            raise ValueError(f"class_weight names {', '.join(map(repr, unknown[:5]))}, which are not classes of the "
                             f"training images (its classes: {', '.join(classes[:20])})")
        per_class = np.array([class_weight.get(c, 1.0) for c in classes], dtype=np.float64)
        _check_weights(per_class, "class_weight")
    else:
        per_class = np.ones(len(classes))
    w = w * per_class[y]
    if not w.any():
        raise ValueError("every training image has weight 0 (class_weight times sample_weight)")
    return w / w.mean()


def _check_weights(w: np.ndarray, name: str) -> None:
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"{name} must be finite and non-negative; got {w[~np.isfinite(w) | (w < 0)][0]!r}")
    if not w.any():
        raise ValueError(f"{name} is 0 everywhere: nothing would be learnt")


def weights_note(class_weight, sample_weight) -> str | None:
    """How the scores are weighted (``"class_weight=balanced, sample_weight"``), for the leaderboard; None if not."""
    parts = ([f"class_weight={class_weight if isinstance(class_weight, str) else 'dict'}"] if class_weight is not None
             else []) + (["sample_weight"] if sample_weight is not None else [])
    return ", ".join(parts) or None


def check_out_of_core(est, specs) -> None:
    """Out of core needs a cache, probability-only level 2 and learners that stream (checked before extraction)."""
    if est.cache_dir is None:
        raise ValueError("out_of_core streams features from the cache: give a cache_dir")
    if est.meta_inputs != "proba":
        raise ValueError(f"out-of-core level 2 combines probabilities only; meta_inputs={est.meta_inputs!r} "
                         "would load every feature matrix (use meta_inputs='proba' or out_of_core=False)")
    for spec in specs:
        LEARNER_KINDS[spec["kind"]].check_streaming(spec)


def check_training_data(data, cv: int, skipped: dict | None = None, labels: dict | None = None) -> None:
    """Two classes or more, each with at least ``cv`` usable images, labels without slips; says which were skipped."""
    from stacker.data.sources import check_labels

    if data.labels is None:
        raise ValueError(f"fit needs labelled images: class sub-folders (train/cat/1.jpg), Kaggle-style names "
                         f"(cat.1.jpg) or a CSV with path,label columns; found {_unlabelled(data)}")
    check_labels(data.labels, data.paths)
    lost = {}
    for path, reason in (skipped or {}).items():
        lost.setdefault((labels or {}).get(path), []).append(f"{path}: {reason}")
    usable = [c for c in data.classes if c in set(data.labels)]
    if len(usable) < 2:
        emptied = [c for c in data.classes if c not in usable]
        note = "".join(f"; every image of class {c!r} was skipped as unusable, e.g. {lost[c][0]}"
                       for c in emptied if c in lost)
        which = f"only one class ({usable[0]!r})" if usable else "no class"
        raise ValueError(f"{which} in the training images has usable images; need two or more{note}")
    counts = np.bincount(data.y, minlength=len(data.classes))
    small = [(c, int(n)) for c, n in zip(data.classes, counts) if n < cv]
    if small:
        notes = [f"{c!r}: {n} usable, {len(lost[c])} skipped as unusable (e.g. {lost[c][0]})"
                 for c, n in small if c in lost]
        fewest = min(n for _, n in small if n > 0) if any(n > 0 for _, n in small) else 0
        listed = ", ".join(f"{c!r} ({n} image{'' if n == 1 else 's'})" for c, n in small[:10])
        raise ValueError(f"{'class' if len(small) == 1 else 'classes'} {listed}{', ...' if len(small) > 10 else ''} "
                         f"{'has' if len(small) == 1 else 'have'} fewer images than cv={cv}: every fold needs "
                         "images of each class" + (f" ({'; '.join(notes[:3])})" if notes else "")
                         + "; add images, fix the files, merge classes"
                         + (f" or use cv={fewest}" if fewest >= 2 else " or remove them"))


def _unlabelled(data) -> str:
    """``12 images without labels in /data/test (e.g. 1.jpg, 2.jpg, ...)``: what fit got instead."""
    import os

    if not len(data):
        return "no images"
    try:
        root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in data.paths])
    except ValueError:  # paths on different drives
        root = None
    names = [os.path.basename(p) for p in data.paths[:3]]
    return (f"{len(data)} images without labels" + (f" in {root}" if root else "")
            + f" (e.g. {', '.join(names)}{', ...' if len(data) > 3 else ''})")
