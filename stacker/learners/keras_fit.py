"""Keras fits that leave nothing behind: TensorFlow's global tables emptied after each fit.

Every Keras fit in stacker (dense heads, streaming heads, fine-tuning) runs through
:func:`keras_fit` / :func:`fit_scope`, so memory does not grow with folds.
"""

from __future__ import annotations

import contextlib

__all__ = ["keras_fit", "fit_scope"]


def keras_fit(model, *args, **kwargs):
    """``model.fit(*args, **kwargs)`` in a :func:`fit_scope`: none of its training state outlives it."""
    with fit_scope(model):
        return model.fit(*args, **kwargs)


@contextlib.contextmanager
def fit_scope(model):
    """Leave nothing of a Keras fit behind that TensorFlow would keep for the life of the process.

    Two global tables grow with every fit and pin what it used (about 60 MB and the fold's
    training rows, 120 MB, for every fine-tuning fold of EfficientNet-Lite0):

    - Keras' TensorFlow optimizer sums gradients over replicas even without a strategy, and
      each trace of a train step registers that sum's gradient under a new name
      (``tf.custom_gradient`` in graph mode), holding the traced step and the model;
    - ``tf.data.Dataset.from_generator`` (how Keras reads a ``PyDataset``) ties its Python
      function to the outermost graph, which in eager mode is never freed: the dataset, its
      ``PyDataset`` and the arrays behind it stay reachable.

    Both are read only while the fit runs, so the entries added inside the scope are removed
    when it ends, with the model's train and test functions (a later fit traces them again).
    Datasets made inside the scope must not be used after it, and scopes must not overlap in
    threads of one process (stacker fits one model at a time per process; Ray uses processes).
    """
    registry, py_funcs = _gradient_registry(), _graph_py_funcs()
    names, n_funcs = set(registry), len(py_funcs)
    try:
        yield
    finally:
        for name in set(registry) - names:
            if name.startswith("CustomGradient-"):
                del registry[name]
        del py_funcs[n_funcs:]
        model.train_function = model.test_function = None


def _graph_py_funcs() -> list:
    """The list by which TensorFlow's outermost graph keeps every eager ``py_func`` alive."""
    try:
        from tensorflow.python.framework import ops

        graph = ops.get_default_graph()
        if not hasattr(graph, "_py_funcs_used_in_graph"):
            graph._py_funcs_used_in_graph = []
        return graph._py_funcs_used_in_graph
    except (ImportError, AttributeError):  # another TensorFlow layout: nothing to release
        return []


def _gradient_registry() -> dict:
    """TensorFlow's table of registered gradient functions (empty if this TensorFlow has none)."""
    try:
        from tensorflow.python.framework import ops

        return ops._gradient_registry._registry
    except (ImportError, AttributeError):  # another TensorFlow layout: nothing to release
        return {}
