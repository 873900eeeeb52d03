"""A ``.keras`` archive checked before Keras reads it: standard members, bounded size, known objects only.

Keras rebuilds every object in an archive's ``config.json`` from its ``module``, ``class_name``
and ``registered_name``, and it resolves them more freely than the text suggests: module
``keras`` with class name ``layers.Lambda`` is the ``Lambda`` layer, a class name may resolve
to a function (``applications.imagenet_utils.decode_predictions``, which downloads a file),
a ``registered_name`` such as ``package>Name`` takes precedence over both, and ``safe_mode``
lets a ``Lambda`` call any function Keras exports by name. A check on the bare class name
against a list of bad layers is therefore blind to renamed ones.

So every config object is first *resolved* the way Keras resolves it
(:func:`resolve_config_object`) to one canonical name, and that name must be in an allowlist
of what stacker's own networks contain, collected from real saved models (the test backbone,
the Keras applications stacker registers, EfficientNet-Lite, the ``dense`` head and the
fine-tuned network; ``tests/io/test_stranger_keras.py`` saves each and checks it against
these lists). Anything else -- another layer, any function object, a lambda, a registered
name that is not stacker's -- is refused with the archive's name, the object's place in the
config and its resolved name. Keras then loads the archive with ``safe_mode=True``.

Size: the three standard members at most ``2 GiB`` uncompressed in all
(``$STACKER_MAX_KERAS_BYTES``); :mod:`stacker.io.bounds` bounds each HDF5 dataset.
"""

from __future__ import annotations

import json
import os
import zipfile

from stacker.io.bounds import check_keras_weights

__all__ = ["check_keras_archive", "load_keras", "resolve_config_object", "config_objects", "ALLOWED_CLASSES",
           "ALLOWED_FUNCTIONS", "ALLOWED_REGISTERED", "MAX_KERAS_BYTES_ENV"]

MAX_KERAS_BYTES_ENV = "STACKER_MAX_KERAS_BYTES"
MAX_KERAS_BYTES = 2 << 30  # the largest registered backbone (EfficientNet-B7, 64 M weights) is 0.26 GiB
_MEMBERS = {"config.json", "metadata.json", "model.weights.h5"}

# Serialised values, not classes: Keras turns them into tensors, arrays, bytes or tuples without
# looking anything up (their nested objects are checked like any other).
_VALUES = frozenset({"__keras_tensor__", "__tensor__", "__numpy__", "__bytes__", "__tuple__", "__ellipsis__",
                     "__slice__"})

# Resolved names (Keras's public API name, or ``module.Class`` where Keras writes one) of every class in
# the networks stacker saves. Collected from saved models; each is a layer, initialiser, regulariser,
# constraint or dtype policy that computes on tensors and opens no file.
ALLOWED_CLASSES = frozenset({
    # models and dtype
    "keras.src.models.functional.Functional", "keras.Sequential", "keras.DTypePolicy",
    # layers of the test backbone, EfficientNet-Lite/B*, MobileNet/V2, ResNet50, InceptionV3, Xception,
    # the dense head and the fine-tuned network
    "keras.layers.InputLayer", "keras.layers.Conv2D", "keras.layers.DepthwiseConv2D", "keras.layers.SeparableConv2D",
    "keras.layers.BatchNormalization", "keras.layers.ReLU", "keras.layers.Activation", "keras.layers.Add",
    "keras.layers.Multiply", "keras.layers.Concatenate", "keras.layers.Reshape", "keras.layers.ZeroPadding2D",
    "keras.layers.AveragePooling2D", "keras.layers.MaxPooling2D", "keras.layers.GlobalAveragePooling2D",
    "keras.layers.GlobalMaxPooling2D", "keras.layers.Dense", "keras.layers.Dropout", "keras.layers.Normalization",
    "keras.layers.Rescaling",
    # fine-tuning's pixel augmentation (mode="full")
    "keras.layers.RandomFlip", "keras.layers.RandomZoom", "keras.layers.RandomRotation",
    "keras.layers.RandomContrast", "keras.layers.RandomTranslation",
    # initialisers, regulariser; loss and optimiser of a compiled head's compile_config
    "keras.initializers.GlorotUniform", "keras.initializers.VarianceScaling", "keras.initializers.Ones",
    "keras.initializers.Zeros", "keras.regularizers.L2", "keras.losses.CategoricalCrossentropy",
    "keras.optimizers.Adam",
})

# Functions named as objects (``class_name: "function"``): none in stacker's networks (their activations
# are strings, which Keras looks up in ``keras.activations`` only), so a function object is always refused.
ALLOWED_FUNCTIONS = frozenset()

# Registered names (``package>Name``) of stacker's own layers.
ALLOWED_REGISTERED = frozenset({"stacker>ImagePreprocessing"})


def resolve_config_object(obj: dict) -> tuple[str, str]:
    """``(kind, name)`` of the object Keras would rebuild from a config dict with a ``class_name``.

    ``kind`` is ``"value"`` (a serialised tensor, array, tuple...), ``"registered"`` (looked up by
    registered name, which Keras tries before anything else), ``"function"`` or ``"class"``; for the
    last two, ``name`` is ``module.name`` as Keras joins it, so ``keras`` + ``layers.Lambda`` and
    ``keras.layers`` + ``Lambda`` are both ``keras.layers.Lambda``. Mirrors
    ``keras.src.saving.serialization_lib.deserialize_keras_object`` and ``_retrieve_class_or_fn``.
    """
    cls = obj.get("class_name")
    module = obj.get("module")
    if not isinstance(cls, str):
        return "class", f"{module}.{cls!r}"
    if cls in _VALUES:
        return "value", cls
    if cls.startswith("__"):  # __lambda__ (Python bytecode), __typespec__ and any other special form
        return "special", cls
    has_reg = "registered_name" in obj
    reg = obj.get("registered_name")
    if cls == "function":
        name = obj.get("config")
        if not isinstance(name, str):
            return "function", f"{module}.{name!r}"
        # functions are looked up by their name among registered objects first; the module_objects path
        # (activations.get...) uses registered_name instead
        for key in (name, reg if has_reg else None):
            if isinstance(key, str) and (">" in key or key != name):
                return "registered", key
        if module == "builtins":  # Keras searches its activations, losses, metrics... for the bare name
            return "function", f"builtins.{name}"
        return "function", f"{module}.{name}"
    key = reg if has_reg else cls
    if key is not None and (not isinstance(key, str) or key != cls or ">" in key):
        return "registered", str(key)
    return "class", f"{module}.{cls}"


def config_objects(node, path: str = ""):
    """``(path, dict)`` for every dict with a ``class_name`` in a Keras config tree, in document order;
    ``path`` like ``config.layers[2].config.function`` (``""`` for the root)."""
    stack = [(path, node)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, dict):
            if "class_name" in item:
                yield where or "(root)", item
            stack.extend((f"{where}.{k}" if where else str(k), v) for k, v in reversed(list(item.items())))
        elif isinstance(item, list):
            stack.extend((f"{where}[{i}]", v) for i, v in reversed(list(enumerate(item))))


_KIND_WORDS = {"registered": "the registered name ", "function": "the function ", "special": "the special object "}
_SHOWN = 8  # refused objects named in the error


def _allowed(kind: str, name: str, registered: set) -> bool:
    if kind == "value":
        return True
    if kind == "registered":
        return name in registered
    if kind == "function":
        return name in ALLOWED_FUNCTIONS
    return kind == "class" and name in ALLOWED_CLASSES


def check_keras_archive(path: str, custom_objects=None, max_bytes: int | None = None) -> None:
    """Refuse a ``.keras`` file that holds more than a stacker network can.

    Allowed: the three standard members, at most ``max_bytes`` uncompressed (default 2 GiB,
    ``$STACKER_MAX_KERAS_BYTES``), and config objects that resolve (as Keras resolves them) to
    :data:`ALLOWED_CLASSES`, :data:`ALLOWED_FUNCTIONS` or stacker's registered layers
    (:data:`ALLOWED_REGISTERED`, plus the registered names in ``custom_objects``, which the caller trusts).
    """
    limit = max_bytes or int(os.environ.get(MAX_KERAS_BYTES_ENV, MAX_KERAS_BYTES))
    registered = set(ALLOWED_REGISTERED) | {k for k in (custom_objects or {}) if isinstance(k, str) and ">" in k}
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            extra = sorted({i.filename for i in infos} - _MEMBERS)
            if extra:
                raise ValueError(f"unexpected archive members {extra}")
            total = sum(i.file_size for i in infos)
            if total > limit:
                raise ValueError(f"{total} bytes uncompressed, more than the {limit} allowed "
                                 f"(${MAX_KERAS_BYTES_ENV})")
            config = json.loads(zf.read("config.json"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"refusing to load {path}: {e}") from None
    if not isinstance(config, dict) or "class_name" not in config:  # Keras would look a bare string up
        raise ValueError(f"refusing to load {path}: its config.json is not a Keras model config "
                         f"(a {type(config).__name__} without a class_name)")
    refused = []
    for where, obj in config_objects(config):
        kind, name = resolve_config_object(obj)
        if not _allowed(kind, name, registered):
            refused.append(f"{where} resolves to {_KIND_WORDS.get(kind, '')}{name}")
    if refused:
        shown = "; ".join(refused[:_SHOWN]) + (f"; and {len(refused) - _SHOWN} more" if len(refused) > _SHOWN else "")
        raise ValueError(
            f"refusing to load {path}: its config.json names objects that stacker's networks are not made of "
            f"(Keras would rebuild them as named; only allowlisted layers, initialisers and stacker's own layers "
            f"are loaded): {shown}")


def load_keras(path: str, custom_objects=None):
    """A Keras model from a checked archive, with ``safe_mode=True`` and no compilation."""
    import keras

    check_keras_weights(path)  # HDF5 datasets within stacker.io.bounds, before Keras reads any
    check_keras_archive(path, custom_objects)
    return keras.saving.load_model(path, safe_mode=True, compile=False, custom_objects=custom_objects)
