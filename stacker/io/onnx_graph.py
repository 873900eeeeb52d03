"""An ONNX graph from a model directory or cache is checked before ONNX Runtime sees it.

ONNX Runtime opened from bytes still resolves a tensor's *external data* (a file name
inside the graph) against the current working directory, and it allocates whatever shape
a graph declares while it builds and constant-folds a session: a few hundred bytes of
``ConstantOfShape`` made a process allocate gigabytes. :func:`check_graph` parses the
graph with the ``onnx`` package (external data never loaded) and refuses, naming the file
and the tensor or node:

- any tensor kept outside the graph (``data_location == EXTERNAL`` or ``external_data``
  entries): initializers, sparse initializers, ``Constant`` nodes and every other tensor
  attribute, in the main graph and in graphs nested in ``If``/``Loop``/``Scan`` nodes;
- any node outside the default ONNX domain (``""`` / ``"ai.onnx"``): tf2onnx emits only
  those for stacker's backbones (tiny_cnn, EfficientNet-Lite0/B0, MobileNetV2 checked),
  so no contrib, custom or ML operator is reachable; model-local functions likewise;
  an ``opset_import`` may declare only ``""``, ``"ai.onnx"`` and ``"ai.onnx.ml"``
  (tf2onnx declares the last one, unused);
- any tensor of more than :data:`DEFAULT_MAX_ELEMENTS` elements (``$STACKER_MAX_ONNX_ELEMENTS``)
  whose shape the graph fixes: an initializer or constant, the output a constant shape
  declares (``ConstantOfShape``, ``Expand``, ``Tile``, ``Reshape``, ``Range``, ``Resize``
  sizes, whose declared elements together stay under the same bound), and every tensor
  whose shape ONNX shape inference (with data propagation) finds, per image (the batch
  dimension counts as one); fully static tensors, which ONNX Runtime materialises when it
  builds the session, stay under that bound together too;
- a first input (the one stacker feeds) other than a float tensor ``(batch, height, width, 3)``
  with the backbone's height and width when they are known.

The default, 2**26 (64 Mi elements, 256 MiB of float32), is about 28 times the largest
weight of any registered backbone (ResNet50 and Xception's 3x3x512x512 convolutions,
2.4 M) and 11 times EfficientNet-B7's largest activation per image at 600 px (5.8 M).
"""

from __future__ import annotations

import hashlib
import threading

from stacker.io.bounds import BOUNDS, limit

__all__ = ["ALLOWED_NODE_DOMAINS", "ALLOWED_OPSET_DOMAINS", "DEFAULT_MAX_ELEMENTS", "DEFAULT_MAX_GRAPH_BYTES",
           "MAX_ELEMENTS_ENV", "MAX_GRAPH_BYTES_ENV", "UnsafeGraphError", "check_graph", "max_elements",
           "max_graph_bytes"]

DEFAULT_MAX_ELEMENTS, MAX_ELEMENTS_ENV, _ = BOUNDS["MAX_ONNX_ELEMENTS"]
DEFAULT_MAX_GRAPH_BYTES, MAX_GRAPH_BYTES_ENV, _ = BOUNDS["MAX_ONNX_BYTES"]  # real graphs are 8-260 MB
ALLOWED_NODE_DOMAINS = ("", "ai.onnx")
ALLOWED_OPSET_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
# op -> the inputs that fix its output's shape (ConstantOfShape's shape, Expand's shape, ...)
_SHAPE_INPUTS = {"ConstantOfShape": (0,), "Expand": (1,), "Tile": (1,), "Reshape": (1,), "Resize": (3,),
                 "Range": (0, 1, 2)}
_SMALL = 4096  # constants read as values (shapes, Range bounds); larger ones are only counted

_CHECKED: dict = {}  # (sha256, input shape, bound) of graphs that passed: sessions reopen the same bytes
_CHECKED_LOCK = threading.Lock()


class UnsafeGraphError(ValueError):
    """An ONNX graph that reads other files, names operators outside ONNX, or declares unbounded memory."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason
        super().__init__(f"refusing to open the ONNX graph {name}: {reason}. Nothing was run.")


def max_elements() -> int:
    """The element bound: ``$STACKER_MAX_ONNX_ELEMENTS`` or :data:`DEFAULT_MAX_ELEMENTS`."""
    return limit("MAX_ONNX_ELEMENTS")


def max_graph_bytes() -> int:
    """The largest graph file read: ``$STACKER_MAX_ONNX_BYTES`` or :data:`DEFAULT_MAX_GRAPH_BYTES`."""
    return limit("MAX_ONNX_BYTES")


def check_graph(data: bytes, name: str, input_shape=None) -> None:
    """Refuse (:class:`UnsafeGraphError`) a serialized graph that is not self-contained and bounded.

    ``name`` (the file) is what errors name; ``input_shape``: the backbone's ``(height,
    width, 3)`` its one input must declare, None to check only rank and channels.
    """
    limit = max_elements()
    shape = tuple(int(d) for d in input_shape) if input_shape is not None else None
    key = (hashlib.sha256(data).hexdigest(), shape, limit)
    with _CHECKED_LOCK:
        if key in _CHECKED:
            return
    if len(data) > max_graph_bytes():
        raise UnsafeGraphError(name, f"{len(data)} bytes, over the {max_graph_bytes()} allowed "
                                     f"(${MAX_GRAPH_BYTES_ENV})")
    import onnx
    from google.protobuf.message import DecodeError

    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)  # parsing reads no other file; onnx.load would follow external data
    except (DecodeError, ValueError) as exc:
        raise UnsafeGraphError(name, f"not a valid ONNX graph ({exc})") from None
    if model.functions:
        raise UnsafeGraphError(name, f"it defines model-local functions ({model.functions[0].domain}."
                                     f"{model.functions[0].name}); stacker's graphs have none")
    if len(model.training_info):
        raise UnsafeGraphError(name, "it carries training graphs; stacker's graphs have none")
    for op in model.opset_import:
        if op.domain not in ALLOWED_OPSET_DOMAINS:
            raise UnsafeGraphError(name, f"it imports the operator domain {op.domain!r}; only "
                                         f"{ALLOWED_OPSET_DOMAINS} are allowed")
    _Walk(name, limit).graph(model.graph, "graph")
    _check_input(model.graph, name, shape)
    _check_inferred(model, name, limit)
    with _CHECKED_LOCK:
        _CHECKED[key] = True


def _elements(dims, what: str, name: str) -> int:
    n = 1
    for d in dims:
        if d < 0:
            raise UnsafeGraphError(name, f"{what} declares a negative dimension {list(dims)}")
        n *= int(d)
    return n


class _Walk:
    """One pass over a graph and the graphs nested in its nodes' attributes."""

    def __init__(self, name: str, limit: int):
        self.name, self.limit = name, limit
        self.declared = 0  # elements the constant shapes declare, all together

    def fail(self, reason: str):
        raise UnsafeGraphError(self.name, reason)

    def tensor(self, t, what: str) -> None:
        from onnx import TensorProto

        if t.data_location == TensorProto.EXTERNAL or len(t.external_data):
            where = next((e.value for e in t.external_data if e.key == "location"), "?")
            self.fail(f"{what} {t.name!r} points at external data in the file {where!r}; a graph must be "
                      "self-contained")
        n = _elements(t.dims, f"{what} {t.name!r}", self.name)
        if n > self.limit:
            self.fail(f"{what} {t.name!r} has {n} elements {list(t.dims)}, over the {self.limit} allowed "
                      f"(${MAX_ELEMENTS_ENV})")

    def sparse(self, s, what: str) -> None:
        self.tensor(s.values, f"{what} values")
        self.tensor(s.indices, f"{what} indices")
        n = _elements(s.dims, f"{what} {s.values.name!r}", self.name)
        if n > self.limit:  # ONNX Runtime makes it dense
            self.fail(f"{what} {s.values.name!r} has {n} elements {list(s.dims)} once dense, over the "
                      f"{self.limit} allowed (${MAX_ELEMENTS_ENV})")

    def graph(self, g, where: str) -> None:
        from onnx import numpy_helper

        consts = {}
        for t in g.initializer:
            self.tensor(t, f"{where}: initializer")
            if _elements(t.dims, t.name, self.name) <= _SMALL:
                consts[t.name] = numpy_helper.to_array(t)
        for s in g.sparse_initializer:
            self.sparse(s, f"{where}: sparse initializer")
        for node in g.node:
            label = f"{where}: node {node.name or '(unnamed)'!r} ({node.domain + '.' if node.domain else ''}" \
                    f"{node.op_type})"
            if node.domain not in ALLOWED_NODE_DOMAINS:
                self.fail(f"{label} is in the operator domain {node.domain!r}; only the default ONNX domain "
                          "is allowed")
            for a in node.attribute:
                self.attribute(a, f"{label} attribute {a.name!r}: tensor")
            if node.op_type == "Constant" and node.output:
                value = _constant_value(node)
                if value is not None:
                    consts[node.output[0]] = value
            self.shape_inputs(node, consts, label)

    def attribute(self, a, what: str) -> None:
        if a.HasField("t"):
            self.tensor(a.t, what)
        for t in a.tensors:
            self.tensor(t, what)
        if a.HasField("sparse_tensor"):
            self.sparse(a.sparse_tensor, what)
        for s in a.sparse_tensors:
            self.sparse(s, what)
        where = what[:-len(": tensor")]
        if a.HasField("g"):
            self.graph(a.g, where)
        for sub in a.graphs:
            self.graph(sub, where)

    def shape_inputs(self, node, consts: dict, label: str) -> None:
        """Count the elements a constant shape declares (ConstantOfShape's output, Expand's target...)."""
        import numpy as np

        idx = _SHAPE_INPUTS.get(node.op_type)
        if idx is None or len(node.input) <= max(idx) or any(node.input[i] not in consts for i in idx):
            return
        values = [np.asarray(consts[node.input[i]]) for i in idx]
        if node.op_type == "Range":
            start, limit, delta = (float(np.ravel(v)[0]) if v.size else 0.0 for v in values)
            n = max(int(np.ceil((limit - start) / delta)), 0) if delta else self.limit + 1
        else:
            shape = np.ravel(values[0]).astype(np.float64)
            n = float(np.prod(np.abs(shape[shape != 0]))) if shape.size else 1.0
        if n > self.limit:
            self.fail(f"{label} declares a tensor of {n:.0f} elements, over the {self.limit} allowed "
                      f"(${MAX_ELEMENTS_ENV})")
        self.declared += int(n)
        if self.declared > self.limit:
            self.fail(f"{label}: the graph's constant shapes declare {self.declared} elements together, over the "
                      f"{self.limit} allowed (${MAX_ELEMENTS_ENV})")


def _constant_value(node):
    """A ``Constant`` node's value when it is small enough to read as a shape, else None."""
    import numpy as np
    from onnx import numpy_helper

    for a in node.attribute:
        if a.name == "value" and a.HasField("t") and _elements(a.t.dims, "", "") <= _SMALL:
            return numpy_helper.to_array(a.t)
        if a.name == "value_ints":
            return np.asarray(list(a.ints), dtype=np.int64)
        if a.name == "value_int":
            return np.asarray(a.i, dtype=np.int64)
        if a.name == "value_float":
            return np.asarray(a.f, dtype=np.float64)
    return None


def _check_input(g, name: str, shape) -> None:
    """The first input (the one stacker feeds): float, rank 4, 3 channels, the backbone's height and width when given.

    tf2onnx may leave constants as further inputs (EfficientNet-B0's normalisation); they are never fed.
    """
    from onnx import TensorProto

    fed = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in fed]
    if not inputs:
        raise UnsafeGraphError(name, "it has no input; a backbone graph takes the pixels as its first input")
    tt = inputs[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    want = list(shape) if shape is not None else [None, None, 3]
    ok = (tt.elem_type == TensorProto.FLOAT and tt.HasField("shape") and len(dims) == 4
          and all(w is None or d == w for d, w in zip(dims[1:], want)) and None not in dims[1:])
    if not ok:
        shown = ["?" if d is None else d for d in dims]
        size = f"{want[0]}, {want[1]}" if shape is not None else "height, width"
        raise UnsafeGraphError(name, f"its input {inputs[0].name!r} is {shown} of element type {tt.elem_type}; the "
                                     f"backbone takes float pixels (batch, {size}, 3)")


def _check_inferred(model, name: str, limit: int) -> None:
    """Bound every tensor whose shape ONNX shape inference finds (per image; the batch counts as one)."""
    from onnx import shape_inference

    try:
        inferred = shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - a graph ONNX cannot reason about is not opened
        raise UnsafeGraphError(name, f"ONNX shape inference fails on it ({type(exc).__name__}: {exc})") from None
    static_total = 0
    for vi in [*inferred.graph.value_info, *inferred.graph.output]:
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        n = 1
        for d in dims:
            n *= d if d is not None and d > 0 else 1
        if n > limit:
            raise UnsafeGraphError(name, f"tensor {vi.name!r} has shape {['?' if d is None else d for d in dims]}: "
                                         f"{n} elements per image, over the {limit} allowed (${MAX_ELEMENTS_ENV})")
        if None not in dims:
            static_total += n
    if static_total > limit:
        raise UnsafeGraphError(name, f"its constant tensors hold {static_total} elements together, over the {limit} "
                                     f"allowed (${MAX_ELEMENTS_ENV})")
