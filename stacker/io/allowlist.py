"""What a skops file from someone else may hold: an explicit list of types, and values that are inert.

skops trusts every scikit-learn estimator by default, and some of them read or write files
named by their own parameters or fitted attributes when they predict (a text vectorizer with
``input="filename"`` fed by a stacking layer whose "predictions" are paths, a ``Pipeline``
whose ``memory`` is a folder, a transformer holding a function). Nested estimators let such a
reader sit inside an ordinary-looking learner. So stacker does not use skops's defaults:

- :func:`file_types` lists every type a file names: ``skops.io.get_untrusted_types`` plus every
  ``__module__``/``__class__`` of its ``schema.json``, each with the skops node that rebuilds it;
- :func:`refused_types` keeps those not on the allowlist: plain containers and numbers
  (:data:`BUILTIN_TYPES`), NumPy arrays, dtypes and scalars (:data:`NUMPY_TYPES`), the
  scikit-learn parts of stacker's own models (:data:`SKLEARN_TYPES`), the classes stacker
  registered with :func:`stacker.io.persist.trusted` (rebuilt as plain objects only), and the
  user's own ``trusted=`` / ``--trust`` / ``$STACKER_TRUSTED_TYPES`` names;
- :func:`check_inert` walks the rebuilt object before any of its methods is called: no value
  may be a function, method or foreign class, and no parameter may name a cache folder, a file,
  a URL or a process pool (:data:`PARAM_RULES`).
"""

from __future__ import annotations

import json
import zipfile

import numpy as np

__all__ = ["BUILTIN_TYPES", "NUMPY_TYPES", "SKLEARN_TYPES", "PARAM_RULES", "TYPE_RULES", "UnsafeValueError",
           "file_types", "refused_types", "check_inert", "type_name"]

# builtins: the skops nodes that may rebuild each (never a reduce, a function or a method node)
BUILTIN_TYPES = {
    "builtins.dict": {"DictNode", "TypeNode"}, "builtins.list": {"ListNode", "TypeNode"},
    "builtins.tuple": {"TupleNode", "TypeNode"}, "builtins.str": {"JsonNode", "TypeNode"},
    "builtins.int": {"JsonNode", "TypeNode"}, "builtins.float": {"JsonNode", "TypeNode"},
    "builtins.bool": {"JsonNode", "TypeNode"}, "builtins.NoneType": {"JsonNode", "TypeNode"},
}
# NumPy: arrays (``allow_pickle=False`` members, or JSON of checked nodes), dtypes and scalar types
NUMPY_TYPES = {"numpy.ndarray": {"NdArrayNode"}, "numpy.dtype": {"DTypeNode"}}
NUMPY_TYPES.update({f"numpy.{t.__name__}": {"NdArrayNode", "TypeNode"}
                    for t in {np.dtype(c).type for c in "?bhilqpBHILQPefdgFDGUS"}})

# scikit-learn: what the zoo's logistic learner, the "logistic" combiner and a user's logistic
# model are made of, and the trees of a forest (the forest and ``sklearn.tree._tree.Tree`` itself
# still need the user's trust). Every other estimator, scikit-learn's included, needs ``trusted=``.
SKLEARN_TYPES = (
    "sklearn.pipeline.Pipeline",
    "sklearn.preprocessing._data.StandardScaler",
    "sklearn.linear_model._logistic.LogisticRegression",
    "sklearn.linear_model._logistic.LogisticRegressionCV",
    "sklearn.model_selection._split.StratifiedKFold",
    "sklearn.tree._classes.DecisionTreeClassifier",
    "sklearn.tree._classes.ExtraTreeClassifier",
)


def _none(value) -> bool:
    return value is None


def _job_count(value) -> bool:
    return value is None or (isinstance(value, (int, np.integer)) and not isinstance(value, bool))


# parameter name -> (value is inert, why another value is refused): checked on every estimator in a file
PARAM_RULES = {
    "memory": (_none, "must be None: it names a cache folder that is written and read outside the model directory"),
    "input": (lambda v: v == "content", "must be 'content': other values open the files or streams it is given"),
    "transform_input": (_none, "must be None: it routes data between steps"),
    "n_jobs": (_job_count, "must be None or a number of workers"),
}
# type name -> more rules for that type only (where a common parameter name means a path)
TYPE_RULES = {
    "stacker.learners.finetune.FineTunedClassifier": {
        "weights_dir": (_none, "must be None: it names a folder on the machine that saved the model"),
        "weights": (lambda v: v is None or v == "imagenet",
                    "must be None or 'imagenet': a weights path names a file on the machine that saved the model"),
    },
}


class UnsafeValueError(ValueError):
    """A skops file's estimator holds a value that could read, write or run something; nothing was returned."""

    def __init__(self, path: str, where: str, reason: str):
        self.path, self.where, self.reason = path, where, reason
        super().__init__(f"refusing to load {path}: {where} {reason}. stacker never saves such a value; "
                         "nothing in the file was used.")


def _schema_types(node, found: dict) -> None:
    """Every ``__module__.__class__`` in a skops schema, with the node kinds that rebuild it."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            module, cls = item.get("__module__"), item.get("__class__")
            if module is not None or cls is not None:
                found.setdefault(f"{module}.{cls}", set()).add(str(item.get("__loader__")))
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def file_types(path: str) -> dict:
    """Type name -> skops node kinds, for every type a skops file names (schema and skops's own audit)."""
    import skops.io as sio

    try:
        with zipfile.ZipFile(path) as zf:
            schema = json.loads(zf.read("schema.json"))
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as e:  # noqa: BLE001 - any parse failure of a foreign file is "not a stacker file"
        raise ValueError(f"{path} is not a readable skops file ({type(e).__name__}: {e})") from None
    found: dict = {}
    _schema_types(schema, found)
    for name in untrusted:
        found.setdefault(name, set()).add("?")
    return found


def refused_types(found: dict, registered, user) -> list:
    """Names (with the node kind where that is what is refused) of ``found`` types not on the allowlist.

    ``registered``: stacker's ``@trusted`` classes (plain objects only); ``user``: the caller's
    trusted names, rebuilt however skops rebuilds them, as before.
    """
    user, registered = set(user), set(registered) | set(SKLEARN_TYPES)
    refused = []
    for name, loaders in sorted(found.items()):
        if name in user:
            continue
        allowed = BUILTIN_TYPES.get(name) or NUMPY_TYPES.get(name) or ({"ObjectNode"} if name in registered else None)
        if allowed is None:
            refused.append(name)
            continue
        odd = sorted(loaders - allowed - {"?"})
        if odd:
            refused.append(f"{name} (as {', '.join(odd)})")
    return refused


def check_inert(obj, path: str, registered=(), user=()) -> None:
    """Refuse (:class:`UnsafeValueError`) a rebuilt object that holds a function, a foreign class or object, or a
    parameter of :data:`PARAM_RULES` / :data:`TYPE_RULES` whose value names a file, folder, URL or worker pool.

    Runs right after skops rebuilt ``obj`` and before any of its methods is called. Objects of
    :data:`SKLEARN_TYPES`, ``registered`` (stacker's ``@trusted`` classes) and ``user`` (the
    caller's trusted names) have their parameters checked and their attributes walked; a user
    type without attributes (a Cython ``Tree``) is the user's to vouch for.
    """
    user = set(user)
    objects = set(SKLEARN_TYPES) | set(registered) | user
    seen = set()
    stack = [(obj, type(obj).__name__)]
    while stack:
        value, where = stack.pop()
        if id(value) in seen or isinstance(value, (str, bytes, int, float, bool, type(None), np.generic, np.dtype)):
            continue
        seen.add(id(value))
        name = type_name(value if isinstance(value, type) else type(value))
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                stack.extend((v, f"{where}[{i}]") for i, v in enumerate(value.ravel()))
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(value))
        elif isinstance(value, dict):
            stack.extend((v, f"{where}[{k!r}]") for k, v in value.items())
        elif isinstance(value, type):
            if not (name in BUILTIN_TYPES or name in NUMPY_TYPES or name in user):
                raise UnsafeValueError(path, where, f"is the class {name}; stacker never saves a class as a value")
        elif name in objects and hasattr(value, "__dict__"):
            state = vars(value)
            for param, (ok, why) in {**PARAM_RULES, **TYPE_RULES.get(name, {})}.items():
                if param in state and not ok(state[param]):
                    at = f"the {type(value).__name__}" + ("" if where == type(value).__name__ else f" at {where}")
                    raise UnsafeValueError(path, f"{at} has {param}={state[param]!r}: the parameter {param}", why)
            stack.extend((v, f"{where}.{k}") for k, v in state.items())
        elif name in user:
            continue
        elif callable(value):
            raise UnsafeValueError(path, where, f"is a function or callable object ({name}); a saved estimator's "
                                   "parameters and attributes are data")
        else:
            raise UnsafeValueError(path, where, f"is a {name}, not a type on the allowlist")


def type_name(cls) -> str:
    """``module.QualName`` of a class, as skops and ``trusted=`` spell it."""
    return f"{cls.__module__}.{cls.__qualname__}"
