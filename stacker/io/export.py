"""The whole fitted ensemble as one ONNX file: pixels in, calibrated class probabilities out.

:func:`export_onnx` writes one graph holding every backbone (the ONNX graphs stacker
already runs on ONNX Runtime), every fold model of every level-1 learner, level 2, its
calibration and the ``min_proba`` floor. It runs on plain ONNX Runtime: no stacker,
TensorFlow, scikit-learn or skops. Each part declares its own ONNX form where it is
defined, as ``onnx_proba(graph, x)`` (stacker's models and combiners; a fine-tuned
network is its Keras model as tf2onnx converts it); the scikit-learn types stacker builds
on are in :data:`SKLEARN` here. A part with neither is refused by name
(:class:`~stacker.io.onnx_builder.ExportError`), never approximated; each learner kind
says what of it cannot be exported (``Learner.export_refusal``). :func:`readiness` runs
the same checks without converting any network (every saved model records it).

The input contract (one input per distinct backbone input size, float32 NHWC RGB in
0..255, resized with Pillow's bilinear resize from the upright RGB image) and the class
names are in the file's metadata (``stacker.inputs``, ``stacker.classes``).
"""

from __future__ import annotations

import json
import re
import warnings

import numpy as np

from stacker.io.onnx_builder import ExportError, GraphBuilder

__all__ = ["export_onnx", "readiness", "onnx_proba", "ExportError", "SKLEARN", "read_contract"]

EPS = 1e-8  # stacker.level2.arrays.EPS: probabilities are clipped to this before a log


# -- scikit-learn parts --------------------------------------------------------------------------
def _standard_scaler(est, g, x, part):
    if getattr(est, "with_mean", True) and est.mean_ is not None:
        x = g.op("Sub", x, g.const(est.mean_[None]))
    if getattr(est, "with_std", True) and est.scale_ is not None:
        x = g.op("Div", x, g.const(est.scale_[None]))
    return x


def _logistic_regression(est, g, x, part):
    coef, intercept = np.asarray(est.coef_), np.asarray(est.intercept_)
    if getattr(est, "multi_class", "auto") == "ovr" and coef.shape[0] > 1:
        raise ExportError(part, "one-vs-rest logistic regression (multi_class='ovr') is not exported")
    decision = g.matmul_add(x, coef.T, intercept, "logistic")
    if coef.shape[0] == 1:  # binary: [1 - sigmoid(d), sigmoid(d)]
        p1 = g.op("Sigmoid", decision)
        return g.concat([g.op("Sub", g.const([[1.0]]), p1), p1])
    return g.softmax(decision)


def _pipeline(est, g, x, part):
    for name, step in est.steps[:-1]:
        x = transform(step, g, x, f"{part} step {name!r}")
    return onnx_proba(est.steps[-1][1], g, x, f"{part} step {est.steps[-1][0]!r}")


def _sklearn_table():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    return {StandardScaler: ("transform", _standard_scaler), LogisticRegression: ("proba", _logistic_regression),
            Pipeline: ("proba", _pipeline)}


SKLEARN: dict = {}  # type -> (role, function(est, graph, x, part)); filled on first use


def _sklearn(est, role):
    if not SKLEARN:
        SKLEARN.update(_sklearn_table())
    entry = SKLEARN.get(type(est))
    return entry[1] if entry and entry[0] == role else None


def onnx_proba(est, g: GraphBuilder, x: str, part: str) -> str:
    """The ONNX value of ``est.predict_proba(x)``: its own ``onnx_proba``, a :data:`SKLEARN` entry, or a refusal."""
    return _converted(est, g, x, part, "proba")


def transform(est, g: GraphBuilder, x: str, part: str) -> str:
    """The ONNX value of ``est.transform(x)``: its own ``onnx_transform``, a :data:`SKLEARN` entry, or a refusal."""
    return _converted(est, g, x, part, "transform")


def _converted(est, g: GraphBuilder, x: str, part: str, role: str) -> str:
    own = getattr(est, f"onnx_{role}", None)
    if own is not None:
        return own(g, x)
    convert = _sklearn(est, role)
    if convert is None:
        raise ExportError(part, f"{type(est).__module__}.{type(est).__name__} has no ONNX form")
    return convert(est, g, x, part)


def aligned(est, g: GraphBuilder, proba: str, k: int) -> str:
    """``align_proba``: a model's columns placed in class-index order (a fold that lacked a class has fewer)."""
    classes = np.asarray(getattr(est, "classes_", np.arange(k)))
    if len(classes) == k and np.array_equal(classes, np.arange(k)):
        return proba
    place = np.zeros((len(classes), k), np.float32)
    place[np.arange(len(classes)), classes.astype(int)] = 1.0
    return g.op("MatMul", proba, g.const(place))


def weighted_blocks(g: GraphBuilder, z: str, weights, k: int) -> str:
    """``sum_l weights[l] * z[:, l*k:(l+1)*k]`` over the blocks of non-zero weight (level 2's linear mixes)."""
    terms = [g.op("Mul", g.columns(z, l * k, (l + 1) * k), g.const(np.float32(w)))
             for l, w in enumerate(np.asarray(weights, dtype=np.float64)) if w != 0]
    out = terms[0] if terms else g.op("Mul", g.columns(z, 0, k), g.const(np.float32(0)))
    for t in terms[1:]:
        out = g.op("Add", out, t)
    return out


# -- the ensemble ----------------------------------------------------------------------------------
def export_onnx(ens, path: str) -> dict:
    """Write ``ens`` (fitted) to ``path`` as one ONNX graph; return its input contract and outputs.

    Raises :class:`ExportError` naming the first part that ONNX cannot express exactly.
    """
    import onnx

    g, out, contract = _graph(ens)
    k = len(ens.classes_)
    g.nodes.append(onnx.helper.make_node("Identity", [out], ["probabilities"], name="probabilities"))
    output = onnx.helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, ["batch", k])
    from stacker import __version__

    meta = {"stacker.classes": json.dumps(list(map(str, ens.classes_))), "stacker.inputs": json.dumps(contract),
            "stacker.version": __version__, "stacker.min_proba": repr(float(ens.min_proba)),
            "stacker.learners": json.dumps(list(ens.learners_)), "stacker.level2": ens.meta_.name}
    model = g.model([output], meta, doc="stacker ensemble: RGB pixels -> calibrated class probabilities")
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return {"inputs": contract, "classes": list(ens.classes_), "output": "probabilities"}


def readiness(ens) -> dict:
    """Whether :func:`export_onnx` can write ``ens``, found without writing it (saved in the manifest, shown in
    the report): ``{"onnx": True}``, or ``{"onnx": False, "part": ..., "reason": ...}`` for the first part refused.

    Every part is written as in an export, except the Keras networks (backbones, fine-tuned tops), which tf2onnx
    converts whole and which are placeholders here: a check costs no conversion.
    """
    try:
        _graph(ens, convert=False)
    except ExportError as e:
        return {"onnx": False, "part": e.part, "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - e.g. a user's model whose own onnx_proba fails: the model is still saved
        warnings.warn(f"could not check whether this model exports to ONNX: {type(e).__name__}: {e}", stacklevel=2)
        return {"onnx": False, "part": "?", "reason": f"the check failed: {type(e).__name__}: {e}"}
    return {"onnx": True}


def _graph(ens, convert: bool = True):
    """``(graph, its probabilities output, the input contract)`` of the fitted ``ens`` (``convert=False``: the
    Keras networks are placeholders, see :class:`GraphBuilder`)."""
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(ens, "meta_")
    g, k = GraphBuilder(convert=convert), len(ens.classes_)
    features, contract = _backbones(ens, g)
    probas, feats = [], []
    for name, learner in ens.learners_.items():
        x, pixels = features[_source_key(learner)]  # pixels: the rows are the images, then their mirrors
        folds = [aligned(est, g, onnx_proba(est, g, x, f"learner {name} fold {i}"), k)
                 for i, est in enumerate(learner.fold_models_)]
        proba = folds[0] if len(folds) == 1 else g.op("Mean", *folds)
        probas.append(proba if pixels is None else _halves_mean(g, proba, pixels))  # the mean over both views
        if ens.meta_inputs != "proba":  # no unused nodes in the file
            feats.append(x if pixels is None else _halves_mean(g, x, pixels))
    z = g.concat({"proba": probas, "features": feats, "both": probas + feats}[ens.meta_inputs])
    proba = aligned(ens.meta_.combiner, g, onnx_proba(ens.meta_.combiner, g, z, f"level 2 ({ens.meta_.name})"), k)
    proba = calibrated(g, proba, ens.meta_.temperature, ens.meta_.floor, k)
    return g, floored(g, proba, ens.min_proba, k), contract


def _source_key(learner):
    return learner.source_id(learner.spec)


def _backbones(ens, g: GraphBuilder):
    """Every source's graph merged once, fed by the input of its size (and its mirror, for the flip view).

    Returns (source -> (features, the pixels input when the rows are its images then their mirrors, else None),
    the input contract).
    """
    import onnx

    from stacker.features.config import EXTRACTION_OPTIONS

    features, inputs = {}, {}
    for name, learner in ens.learners_.items():
        views, shown = learner.views(), learner.predict_views()
        refusal = learner.export_refusal(ens.meta_inputs)
        if refusal:
            raise ExportError(f"learner {name}", refusal)
        if not set(shown) <= {"original", "flip"}:
            raise ExportError(f"learner {name}", f"it averages the views {sorted(shown)} of its {learner.kind} "
                                                 "source, which only stacker computes (exported: the image and its "
                                                 "mirror)")
        key, ext = _source_key(learner), views["original"]
        if key in features:
            continue
        if ext.resize != "pil":
            raise ExportError(f"backbone {learner.spec['base']}", f"resize={ext.resize!r} runs TensorFlow's resize "
                                                                  "inside stacker; export a model fitted with resize='pil'")
        for option, value in (ext.options or {}).items():
            if EXTRACTION_OPTIONS[option].pixels is not None:
                raise ExportError(f"backbone {learner.spec['base']}", f"extraction option {option}={value!r} "
                                                                      "transforms pixels in Python")
        size = int(ext.size)
        pixels = inputs.get(size)
        if pixels is None:
            pixels = inputs[size] = g.input(f"pixels_{size}", ["batch", size, size, 3])
        mirrored = "flip" in shown  # one pass over the images and their mirrors
        feed = g.op("Concat", pixels, _mirror(g, pixels), axis=0) if mirrored else pixels
        prefix = g.name(re.sub(r"[^A-Za-z0-9_.-]", "_", "_".join(map(str, key))))  # unique per source
        out = g.add_network(ext.onnx_graph, f"{prefix}/", feed, ["rows", "features"])
        if np.dtype(ext.feature_dtype) != np.float32:  # features are rounded to the cached type, as stacker does
            out = g.op("Cast", g.op("Cast", out, to=onnx.TensorProto.FLOAT16), to=onnx.TensorProto.FLOAT)
        features[key] = (out, pixels if mirrored else None)
    contract = [{"name": f"pixels_{s}", "shape": ["batch", s, s, 3], "dtype": "float32", "layout": "NHWC, RGB",
                 "range": "0..255", "resize": f"PIL: Image.open(f).convert('RGB') (EXIF-upright), "
                                              f".resize(({s}, {s}), Image.BILINEAR)"} for s in inputs]
    return features, contract


def _mirror(g: GraphBuilder, pixels: str) -> str:
    """NHWC ``pixels`` mirrored left to right (the "flip" view)."""
    i64 = np.int64
    return g.op("Slice", pixels, g.const([-1], "start", i64), g.const([np.iinfo(i64).min], "stop", i64),
                g.const([2], "axes", i64), g.const([-1], "steps", i64))


def _halves_mean(g: GraphBuilder, rows: str, pixels: str) -> str:
    """The mean of the first and second halves of ``rows`` (images, then their mirrors), n = ``pixels``' batch."""
    i64 = np.int64
    n = g.op("Slice", g.op("Shape", pixels), g.const([0], "start", i64), g.const([1], "stop", i64))
    first = g.op("Slice", rows, g.const([0], "start", i64), n, g.const([0], "axes", i64))
    second = g.op("Slice", rows, n, g.const([np.iinfo(i64).max], "stop", i64), g.const([0], "axes", i64))
    return g.op("Div", g.op("Add", first, second), g.const(np.float32(2.0)))


def calibrated(g: GraphBuilder, proba: str, temperature: float, floor: float, k: int) -> str:
    """``stacker.level2.calibration.calibrate``: softmax(log(clip(p)) / T), then mixed with ``floor`` of uniform."""
    if temperature != 1.0:
        logp = g.op("Log", g.op("Max", proba, g.const(np.float32(EPS))))
        proba = g.softmax(g.op("Div", logp, g.const(np.float32(temperature))))
    if floor:
        proba = g.op("Add", g.op("Mul", proba, g.const(np.float32(1 - floor))), g.const(np.float32(floor / k)))
    return proba


def floored(g: GraphBuilder, proba: str, min_proba: float, k: int) -> str:
    """``with_min_proba``: ``(1 - k m) p + m``."""
    if not min_proba:
        return proba
    return g.op("Add", g.op("Mul", proba, g.const(np.float32(1 - k * min_proba))), g.const(np.float32(min_proba)))


def read_contract(path: str) -> dict:
    """The classes and inputs an exported file declares (its metadata), read with ``onnx`` only."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    return {"classes": json.loads(meta["stacker.classes"]), "inputs": json.loads(meta["stacker.inputs"])}
