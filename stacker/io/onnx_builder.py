"""A small ONNX graph builder: the ops stacker's exported ensembles are written in, and graph merging.

Every part of a fitted ensemble after the backbones (scalers, linear and prototype
models, dense heads, level 2, calibration) is a few matrix products and elementwise
ops; :class:`GraphBuilder` writes them as standard ONNX operators (opset 17, the
backbones' opset) with unique names, and :meth:`GraphBuilder.add_graph` merges a
backbone's exported graph under a prefix. Hand-written rather than converted because the
converters know neither stacker's own models nor its combiners (skl2onnx refuses unknown
classes), and these are a handful of exact formulas.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ExportError", "GraphBuilder", "OPSET"]

OPSET = 17  # the opset stacker's backbone graphs are exported in (stacker.features.engines.export_onnx)


class ExportError(ValueError):
    """A part of an ensemble that ONNX cannot express exactly: named, never approximated."""

    def __init__(self, part: str, reason: str):
        self.part = part
        super().__init__(f"cannot export {part} to ONNX: {reason}")


class GraphBuilder:
    """Nodes and initializers of one graph under construction; every value gets a fresh name."""

    def __init__(self, convert: bool = True):
        self.nodes, self.initializers, self.inputs = [], [], []
        self.convert = convert  # False: networks are placeholder inputs (checking what exports, converting nothing)
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, value, hint: str = "c", dtype=np.float32) -> str:
        """An initializer holding ``value`` (float32 unless told)."""
        from onnx import numpy_helper

        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(np.asarray(value, dtype=dtype)), name))
        return name

    def op(self, op_type: str, *inputs: str, hint: str | None = None, outputs: int = 1, **attrs):
        """Add one node; its output name (or names, for ``outputs > 1``)."""
        from onnx import helper

        outs = [self.name(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.name(f"n_{op_type}"), **attrs))
        return outs[0] if outputs == 1 else outs

    def input(self, name: str, shape, elem_type=None) -> str:
        from onnx import TensorProto, helper

        self.inputs.append(helper.make_tensor_value_info(name, elem_type or TensorProto.FLOAT, shape))
        return name

    # -- the formulas every part is made of --------------------------------------------------
    def matmul_add(self, x: str, weight, bias=None, hint: str = "lin") -> str:
        """``x @ weight + bias`` in float32 (weight ``(in, out)``)."""
        out = self.op("MatMul", x, self.const(weight, f"{hint}_w"), hint=hint)
        return out if bias is None else self.op("Add", out, self.const(np.reshape(bias, (1, -1)), f"{hint}_b"))

    def softmax(self, logits: str) -> str:
        return self.op("Softmax", logits, axis=-1)

    def normalise_rows(self, x: str) -> str:
        """Rows divided by their sums."""
        total = self.op("ReduceSum", x, self.const(np.array([1], np.int64), "axis", np.int64), keepdims=1)
        return self.op("Div", x, total)

    def columns(self, x: str, start: int, stop: int) -> str:
        """``x[:, start:stop]``."""
        i64 = np.int64
        return self.op("Slice", x, self.const([start], "start", i64), self.const([stop], "stop", i64),
                       self.const([1], "axes", i64))

    def concat(self, parts: list[str]) -> str:
        return parts[0] if len(parts) == 1 else self.op("Concat", *parts, axis=1)

    def add_graph(self, model, prefix: str, input_map: dict) -> list[str]:
        """Merge ``model`` (a ModelProto) with every name prefixed; its graph inputs read ``input_map``'s values.

        Returns the names of its outputs in this graph.
        """
        from onnx import compose

        model = compose.add_prefix(model, prefix)
        g = model.graph
        rename = {prefix + k: v for k, v in input_map.items()}
        missing = [i.name for i in g.input if i.name not in rename and i.name not in {t.name for t in g.initializer}]
        if missing:
            raise ExportError(prefix.rstrip("/"), f"graph inputs {missing} have no value")
        for node in g.node:
            node.input[:] = [rename.get(n, n) for n in node.input]
        self.nodes.extend(g.node)
        self.initializers.extend(g.initializer)
        return [o.name for o in g.output]

    def add_network(self, graph_bytes, prefix: str, feed: str, shape) -> str:
        """A one-input, one-output network's graph (``graph_bytes()``: its serialized ONNX, e.g. from tf2onnx) fed
        by ``feed``; its output. Without ``convert``, an input of ``shape`` stands for the output."""
        import onnx

        if not self.convert:
            return self.input(self.name(prefix.strip("/").replace("/", "_")), shape)
        graph = onnx.load_from_string(graph_bytes())
        (inp,) = [i.name for i in graph.graph.input if i.name not in {t.name for t in graph.graph.initializer}]
        return self.add_graph(graph, prefix, {inp: feed})[0]

    def model(self, outputs: list, metadata: dict, doc: str = ""):
        """The finished ModelProto (opset :data:`OPSET`), checked by ONNX's checker."""
        import onnx
        from onnx import helper

        graph = helper.make_graph(self.nodes, "stacker_ensemble", self.inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="stacker",
                                  doc_string=doc)
        model.ir_version = min(model.ir_version, 9)  # ONNX Runtime releases of the last two years read IR 9
        for key, value in metadata.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(model, full_check=True)
        return model
