"""The schema of a saved ensemble's ``manifest.json``, checked before anything in it is used.

A manifest from someone else can hold anything JSON can: ``"files"`` as a list, a learner
without ``folds``, a number where a path is expected. :func:`check_manifest` validates the
types of every field the loader reads (with :mod:`jsonschema`) and raises
:class:`ManifestError` naming the manifest, the field (``learners[0].folds``) and what it
must be, instead of a bare ``AttributeError`` or ``KeyError`` deep inside the load.
Fields that are only reported (``scores``, ``environment``...) are checked for their
container type; fields the loader never reads are not constrained.
"""

from __future__ import annotations

import json

import jsonschema

from stacker.io.persist import ModelIntegrityError

__all__ = ["MANIFEST_SCHEMA", "ManifestError", "check_manifest", "field_name"]

_SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$", "title": "a sha256 (64 lowercase hex digits)"}
_REL = {"type": "string", "minLength": 1, "title": "a path relative to the model directory"}
_STRINGS = {"type": "array", "items": {"type": "string"}}
_NUMBER = {"type": "number"}

MANIFEST_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["format", "format_version", "classes", "params", "learners", "level2", "files"],
    "properties": {
        "format": {"const": "stacker-ensemble"},
        "format_version": {"type": "integer"},
        "stacker_version": {"type": "string"},
        "classes": {"type": "array", "minItems": 1, "uniqueItems": True, "items": {"type": "string"}},
        "params": {"type": "object"},
        "files": {"type": "object", "minProperties": 1, "additionalProperties": _SHA256},
        "learners": {
            "type": "array", "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "kind", "spec", "backbone_file", "folds"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "kind": {"type": "string", "minLength": 1},
                    "spec": {
                        "type": "object",
                        "required": ["backbone", "base", "input_size", "weights"],
                        "properties": {
                            "backbone": {"type": "string", "minLength": 1},
                            "base": {"type": "string", "minLength": 1},
                            "name": {"type": "string"},
                            "kind": {"type": "string"},
                            "input_size": {"type": ["integer", "null"], "minimum": 1},
                            "weights": {"type": ["string", "null"]},
                            "finetune": {"type": ["object", "null"]},
                        },
                    },
                    "backbone_file": _REL,
                    "onnx_file": {"anyOf": [_REL, {"type": "null"}]},
                    "weights_id": {"type": ["string", "null"]},
                    "folds": {"type": "array", "minItems": 1, "items": _REL},
                    "learner_key": {"type": ["string", "null"]},
                },
            },
        },
        "level2": {
            "type": "object",
            "required": ["name", "temperature", "floor", "table"],
            "properties": {"name": {"type": "string"}, "temperature": _NUMBER, "floor": _NUMBER,
                           "table": {"type": "object"}, "weights": {"type": ["object", "null"]}},
        },
        "scores": {"type": "object"},
        "skipped": {"type": "object"},
        "meta_importance": {"type": "object"},
        "config": {"type": "object"},
        "environment": {"type": "object"},
        "histories": {"type": "object"},
        "export": {"type": "object", "required": ["onnx"],
                   "properties": {"onnx": {"type": "boolean"}, "part": {"type": "string"},
                                  "reason": {"type": "string"}}},
        "train_ids": _STRINGS,
        "train_paths": _STRINGS,
    },
}

_VALIDATOR = jsonschema.Draft202012Validator(MANIFEST_SCHEMA)
_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
               float: "a number", type(None): "null"}


class ManifestError(ModelIntegrityError):
    """A manifest that is not what stacker writes: a field of the wrong type, missing or malformed."""


def field_name(path) -> str:
    """``("learners", 0, "folds")`` -> ``learners[0].folds`` (how an error names the field)."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(the whole manifest)"


def _reason(error) -> str:
    """What the field must be, in a few words (never the whole offending value)."""
    got = _JSON_TYPES.get(type(error.instance), type(error.instance).__name__)
    kind = error.validator
    if kind == "type":
        want = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        return f"must be {' or '.join(want)}, not {got}"
    if kind == "required":
        missing = [k for k in error.validator_value if isinstance(error.instance, dict) and k not in error.instance]
        return f"lacks the required key(s) {', '.join(map(repr, missing))}"
    if kind == "const":
        return f"must be {json.dumps(error.validator_value)}"
    if "title" in error.schema:
        return f"must be {error.schema['title']}, got {_short(error.instance)}"
    if kind in ("minItems", "minProperties"):
        return "must not be empty"
    if kind == "uniqueItems":
        return "must not repeat a value"
    if kind in ("minimum", "minLength"):
        return f"must be at least {error.validator_value}, got {_short(error.instance)}"
    return error.message[:200]


def _short(value) -> str:
    text = (json.dumps(value) if isinstance(value, (str, int, float, bool, type(None)))
            else _JSON_TYPES.get(type(value), type(value).__name__))
    return text if len(text) <= 80 else text[:77] + "..."


def check_manifest(manifest, path: str) -> dict:
    """``manifest`` if it matches :data:`MANIFEST_SCHEMA`; else :class:`ManifestError` naming ``path``,
    the first offending field and the reason."""
    errors = sorted(_VALIDATOR.iter_errors(manifest), key=lambda e: (list(map(str, e.absolute_path)), e.validator))
    if errors:
        error = errors[0]
        raise ManifestError(f"{path}: the manifest's field {field_name(error.absolute_path)} {_reason(error)}; "
                            "this is not a manifest stacker wrote, refusing to load it")
    return manifest
