"""A stranger's ONNX graph reads no other file and allocates no more than it is allowed to.

Each test forges the ONNX graph of a small, legitimately saved ensemble (the attacker
controls every file and re-hashes the manifest), first proves the payload is live by
opening it with ONNX Runtime directly, then runs the directory through ``Ensemble.load`` +
predict, ``stacker.predict`` and ``stacker predict`` on the ONNX engine in child processes
(:mod:`sandbox`) and checks that each refuses it with an error naming the file and the
reason, touching nothing outside. ONNX Runtime reads external data from C++, where the
audit hook cannot see it, so the external-data test also runs the children under
``strace`` (when it is installed) and looks for the read.

``STACKER_UNDER_TEST=/path/to/checkout`` runs the children on another build (e.g. the
pre-fix commit, to show these tests fail there); run pytest with that checkout first on
``PYTHONPATH`` too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sandbox import child_env, forged_copy, image_copy, saved_backbone_file, touched_outside

CHILD_ENV = child_env(STACKER_ENGINE="onnx")
SECRET = np.full(16, 1000.0, np.float32)  # tiny_cnn's 16 features, shifted by what the file holds


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A fitted tiny ensemble saved with its ONNX graph."""
    return saved_backbone_file(tmp_path_factory.mktemp("stranger-onnx"), ".onnx", onnx=True)


def _forge(saved, tmp_path, change):
    """A copy of the saved model whose graph is ``change(ModelProto)``, the manifest's sha256s rewritten."""
    def rewrite(path):
        proto = onnx.load_model(str(path))
        change(proto)
        path.write_bytes(proto.SerializeToString())

    return forged_copy(saved[1], saved[2], tmp_path, rewrite)


def _image(saved, tmp_path):
    return image_copy(saved[0], tmp_path)


def _add_to_output(proto, tensor_name: str, op: str = "Add") -> None:
    """Make the graph's output ``op(output, tensor_name)``, so the tensor reaches the features."""
    out = proto.graph.output[0]
    proto.graph.node.append(helper.make_node(op, [out.name, tensor_name], ["forged_out"], name="forged_" + op))
    out.name = "forged_out"


def _external_leak(proto) -> None:
    """An initializer whose 16 floats ONNX Runtime reads from ``secret.bin`` (relative: the working directory)."""
    leak = TensorProto(name="leak", data_type=TensorProto.FLOAT, dims=[16], data_location=TensorProto.EXTERNAL)
    leak.external_data.add(key="location", value="secret.bin")
    proto.graph.initializer.append(leak)
    _add_to_output(proto, "leak")


BOMB = 2 ** 27  # float32 elements: 512 MiB, allocated when ONNX Runtime builds the session


def _constant_of_shape_bomb(proto) -> None:
    """A few hundred bytes: ``ConstantOfShape([2**27])`` of ones, reduced to one number the output is multiplied by."""
    proto.graph.initializer.append(numpy_helper.from_array(np.array([BOMB], np.int64), "bomb_shape"))
    proto.graph.node.extend([
        helper.make_node("ConstantOfShape", ["bomb_shape"], ["bomb"], name="bomb",
                         value=numpy_helper.from_array(np.ones(1, np.float32))),
        helper.make_node("ReduceMin", ["bomb"], ["bomb_one"], name="bomb_reduce", keepdims=0),
    ])
    _add_to_output(proto, "bomb_one", "Mul")


def _run_graph(graph: bytes, cwd) -> tuple:
    """(first output on zeros, peak RSS in MiB) of ``graph`` opened by ONNX Runtime directly, in a child in ``cwd``.

    The peak is the child's ``VmHWM``: ``ru_maxrss`` would carry the forked test process's over ``exec``.
    """
    code = ("import sys, numpy as np, onnxruntime as ort\n"
            "s = ort.InferenceSession(sys.stdin.buffer.read(), providers=['CPUExecutionProvider'])\n"
            "out = s.run(None, {s.get_inputs()[0].name: np.zeros((1, 32, 32, 3), np.float32)})[0]\n"
            "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
            "print(repr(out.ravel().tolist()), int(hwm.split()[1]) // 1024)\n")
    proc = subprocess.run([sys.executable, "-c", code], input=graph, capture_output=True, cwd=str(cwd), check=True)
    values, rss = proc.stdout.decode().rsplit(" ", 1)
    return np.array(eval(values)), int(rss)  # noqa: S307 - our own child's repr of a list of floats


def _assert_refused(results, *words):
    """Every entry point failed, touched nothing outside, and said which file and why."""
    for entry, (code, err, events) in results.items():
        assert events == [], f"{entry} touched outside the model directory: {events}"
        assert code != 0, f"{entry} loaded the forged graph"
        for word in words:
            assert word in err, f"{entry}: the error does not say {word!r}:\n{err[-2000:]}"


def _strace(tmp_path):
    """A ``prefix`` for :func:`sandbox.touched_outside` logging every file the child opens at the system-call
    level (ONNX Runtime's own reads included) to ``strace-<entry>.log``; None without strace."""
    if not shutil.which("strace"):
        return None
    return lambda entry: ["strace", "-f", "-qq", "-e", "trace=open,openat", "-o", str(tmp_path / f"strace-{entry}.log")]


def _native_opens(entry, tmp_path, name: str) -> list:
    """Files named ``name`` that the child of ``entry`` opened, from its strace log."""
    log = tmp_path / f"strace-{entry}.log"
    return [line for line in log.read_text().splitlines() if name in line and "ENOENT" not in line]


@pytest.mark.slow  # child processes under the audit hook
def test_external_data_in_a_graph_is_refused_before_onnx_runtime_reads_it(saved, tmp_path):
    (tmp_path / "secret.bin").write_bytes(SECRET.tobytes())  # a file in the user's working directory
    model, graph = _forge(saved, tmp_path, _external_leak)
    original, _ = _run_graph((saved[1] / saved[2]).read_bytes(), tmp_path)
    leaked, _ = _run_graph(graph.read_bytes(), tmp_path)
    np.testing.assert_allclose(leaked - original, SECRET)  # live: the file's content reaches the features

    strace = _strace(tmp_path)  # the same children, seen by the audit hook and (where there is strace) by the kernel
    results = touched_outside(model, _image(saved, tmp_path), tmp_path, env=CHILD_ENV, prefix=strace)
    _assert_refused(results, os.path.basename(graph), "'leak'", "external data", "secret.bin")
    if strace:
        opened = {e: _native_opens(e, tmp_path, "secret.bin") for e in results}
        assert opened == {e: [] for e in results}, opened


@pytest.mark.slow  # child processes under the audit hook
def test_a_constant_of_shape_bomb_is_refused_before_onnx_runtime_allocates_it(saved, tmp_path):
    model, graph = _forge(saved, tmp_path, _constant_of_shape_bomb)
    original, base_rss = _run_graph((saved[1] / saved[2]).read_bytes(), tmp_path)
    same, bomb_rss = _run_graph(graph.read_bytes(), tmp_path)
    np.testing.assert_allclose(same, original)  # the same features...
    assert bomb_rss - base_rss > 400, (base_rss, bomb_rss)  # ...for 512 MiB more: the payload is live

    results = touched_outside(model, _image(saved, tmp_path), tmp_path, env=CHILD_ENV)
    _assert_refused(results, os.path.basename(graph), "ConstantOfShape", "STACKER_MAX_ONNX_ELEMENTS")


@pytest.mark.slow  # child processes under the audit hook
def test_the_legitimate_graph_still_predicts_on_onnx_runtime(saved, tmp_path):
    model, _graph = _forge(saved, tmp_path, lambda proto: None)
    for entry, (code, err, events) in touched_outside(model, _image(saved, tmp_path), tmp_path,
                                                      env=CHILD_ENV).items():
        assert (code, events) == (0, []), f"{entry}:\n{err[-2000:]}"


# -- the checks one by one, on the graph bytes ------------------------------------------------

def _in_domain(proto):
    proto.opset_import.add(domain="com.microsoft", version=1)
    proto.graph.node.append(helper.make_node("Gelu", [proto.graph.output[0].name], ["gelu"], domain="com.microsoft"))
    proto.graph.output[0].name = "gelu"


def _nested_external(proto):
    """An ``If`` whose branches are Constant nodes with external data: hidden one graph down."""
    def branch(tag):
        t = TensorProto(name=f"c_{tag}", data_type=TensorProto.FLOAT, dims=[16], data_location=TensorProto.EXTERNAL)
        t.external_data.add(key="location", value="../secret.bin")
        out = helper.make_tensor_value_info(f"b_{tag}", TensorProto.FLOAT, [16])
        return helper.make_graph([helper.make_node("Constant", [], [f"b_{tag}"], value=t)], f"g_{tag}", [], [out])
    proto.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    proto.graph.node.append(helper.make_node("If", ["cond"], ["branch"], name="hidden",
                                             then_branch=branch("then"), else_branch=branch("else")))
    _add_to_output(proto, "branch")


def _sparse_bomb(proto):
    values = numpy_helper.from_array(np.ones(1, np.float32), "sparse_bomb")
    indices = numpy_helper.from_array(np.zeros(1, np.int64), "sparse_bomb_idx")
    proto.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [BOMB]))


def _range_bomb(proto):
    for name, v in (("r0", 0.0), ("r1", float(BOMB)), ("r2", 1.0)):
        proto.graph.initializer.append(numpy_helper.from_array(np.array(v, np.float32), name))
    proto.graph.node.append(helper.make_node("Range", ["r0", "r1", "r2"], ["range"], name="range_bomb"))


def _outer_product_bomb(proto):
    """Two 16 Ki vectors, 128 KiB of file, whose product ONNX Runtime folds into 2**28 floats at session build."""
    n = 2 ** 14
    proto.graph.initializer.extend([numpy_helper.from_array(np.ones((n, 1), np.float32), "col"),
                                    numpy_helper.from_array(np.ones((1, n), np.float32), "row")])
    proto.graph.node.append(helper.make_node("MatMul", ["col", "row"], ["outer"], name="outer"))


def _computed_expand(proto):
    """``Expand`` to a shape concatenated at run time from constants."""
    proto.graph.initializer.extend([numpy_helper.from_array(np.array([2 ** 14], np.int64), "d0"),
                                    numpy_helper.from_array(np.array([2 ** 14], np.int64), "d1"),
                                    numpy_helper.from_array(np.ones(1, np.float32), "one")])
    proto.graph.node.extend([helper.make_node("Concat", ["d0", "d1"], ["shape"], axis=0),
                             helper.make_node("Expand", ["one", "shape"], ["expanded"], name="expand")])


def _input_size(proto):
    proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 100000


@pytest.mark.parametrize("change, words", [
    (_in_domain, ("com.microsoft",)),
    (_nested_external, ("node 'hidden' (If)", "tensor 'c_", "external data", "secret.bin")),
    (_sparse_bomb, ("sparse initializer", "once dense")),
    (_range_bomb, ("range_bomb", "Range")),
    (_outer_product_bomb, ("'outer'", "per image")),
    (_computed_expand, ("'expanded'", "per image")),
    (_input_size, ("100000", "(batch, 32, 32, 3)")),
], ids=["domain", "nested-external", "sparse", "range", "outer-product", "computed-expand", "input-size"])
def test_check_graph_refuses_each_kind_by_name(saved, tmp_path, change, words):
    from stacker.io.onnx_graph import UnsafeGraphError, check_graph

    _data, root, rel = saved
    check_graph((root / rel).read_bytes(), rel, (32, 32, 3))  # the legitimate graph passes
    proto = onnx.load_model(str(root / rel))
    change(proto)
    with pytest.raises(UnsafeGraphError) as err:
        check_graph(proto.SerializeToString(), "forged.onnx", (32, 32, 3))
    for word in ("forged.onnx", *words):
        assert word in str(err.value), str(err.value)


def test_the_element_bound_is_overridable(saved, monkeypatch):
    from stacker.io.onnx_graph import UnsafeGraphError, check_graph

    _data, root, rel = saved
    monkeypatch.setenv("STACKER_MAX_ONNX_ELEMENTS", "100")  # tiny_cnn's largest weight has 1152
    with pytest.raises(UnsafeGraphError, match="STACKER_MAX_ONNX_ELEMENTS"):
        check_graph((root / rel).read_bytes(), rel, (32, 32, 3))


def test_a_forged_graph_in_the_cache_is_refused_and_exported_again(saved, tmp_path):
    """The cache's exported graphs pass the same check: a forged one is reported and replaced."""
    from stacker.backbones import build
    from stacker.features.engines import export_onnx
    from stacker.features.layout import CacheLayout
    from stacker.io.onnx_graph import check_graph

    model = build("tiny_cnn", weights=None, input_size=32)
    path = CacheLayout(str(tmp_path / "cache")).onnx_file(model.name, model.input_shape, "id")
    os.makedirs(os.path.dirname(path))
    proto = onnx.load_model(str(saved[1] / saved[2]))
    _external_leak(proto)
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
    with pytest.warns(UserWarning, match="external data"):
        graph = export_onnx(model, str(tmp_path / "cache"), "id")
    check_graph(graph, path, (32, 32, 3))
    with open(path, "rb") as f:
        assert f.read() == graph  # the forged file was replaced by the fresh export
