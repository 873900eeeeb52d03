"""The registry of learner kinds: every kind declares itself once, where it is defined.

A kind is a :class:`~stacker.learners.base.Learner` subclass registered with
:func:`register_learner`. Its class attributes say what the rest of stacker needs to
know: ``kind`` (the name saved in manifests), ``param`` (the :class:`stacker.Ensemble`
parameter that selects it, with its default, check and doc), ``saved_types`` (the
classes its fold models are saved as, trusted when loading), ``code_parts()`` (the code
fingerprints that key its cached results), ``check_streaming(spec)`` (whether it can fit
out of core) and ``cli_options`` / ``from_cli(args)`` (its command-line group). The
ensemble, persistence, ``stacker cache`` and the command lines read this registry.
"""

from __future__ import annotations

from stacker.backbones import registry as _backbones
from stacker.features.views import check_views
from stacker.io.persist import trusted

__all__ = ["LEARNER_KINDS", "DEFAULT_KIND", "register_learner", "kind_params", "code_parts", "learner_specs",
           "backbone_entry", "make_learners"]

LEARNER_KINDS: dict = {}
DEFAULT_KIND = "frozen"  # a backbone that no kind's parameter selects gets frozen-feature learners


def register_learner(cls):
    """Register a learner kind (a class decorator); its ``saved_types`` become trusted for loading."""
    LEARNER_KINDS[cls.kind] = cls
    for saved in cls.saved_types:
        trusted(saved)
    return cls


def unregister_learner(kind: str) -> None:
    """Remove a registered kind (e.g. after a test); the default kind stays."""
    if kind == DEFAULT_KIND:
        raise ValueError(f"the default learner kind {kind!r} cannot be removed")
    LEARNER_KINDS.pop(kind, None)


def kind_params() -> list:
    """The :class:`stacker.Ensemble` parameters that learner kinds declare, in registration order."""
    return [cls.param for cls in LEARNER_KINDS.values() if cls.param is not None]


def code_parts() -> dict:
    """Every kind's code fingerprints, as current code gives them (for ``stacker cache``)."""
    parts = {}
    for cls in LEARNER_KINDS.values():
        parts.update(cls.code_parts())
    return parts


def _kind_of(spec: dict, kind_values: dict) -> str:
    """The kind a backbone entry asks for: ``kind=``, else the first kind whose parameter it (or the ensemble) sets."""
    if "kind" in spec:
        if spec["kind"] not in LEARNER_KINDS:
            raise ValueError(f"unknown learner kind {spec['kind']!r}; registered: {sorted(LEARNER_KINDS)}")
        return spec["kind"]
    chosen = DEFAULT_KIND
    for kind, cls in LEARNER_KINDS.items():
        if cls.param is None:
            continue
        name = cls.param.name
        spec[name] = spec.get(name, kind_values.get(name, cls.param.default)) or None
        if spec[name] is not None and chosen == DEFAULT_KIND:
            chosen = kind
    return chosen


def learner_specs(backbones, models, input_size=None, weights="imagenet", kind_values=None) -> list[dict]:
    """One spec per learner: every backbone entry times its models (or its kind's single network).

    A backbone entry is a registered name, ``"name@size"`` (the backbone at a square input
    size: larger inputs show small objects in more detail), either followed by ``+view``
    (``"name@size+flip"``: trained on each image and its views, probabilities averaged over
    them, :mod:`stacker.features.views`), or a dict that may set ``backbone``, ``input_size``,
    ``views``, ``weights``, ``name``, ``models`` (or ``head``), ``kind``, and the
    parameter of any learner kind (e.g. ``finetune``); ``kind_values`` holds the
    ensemble's values of those parameters, the default for every entry.
    """
    specs = []
    entries = [backbones] if isinstance(backbones, (str, dict)) else list(backbones)
    if not entries:
        raise ValueError("an ensemble needs at least one backbone")
    for b in entries:
        spec = backbone_entry(b) if isinstance(b, str) else dict(b)
        if "backbone" not in spec:
            raise ValueError(f"a backbone dict needs a 'backbone' key, got {sorted(spec)}")
        cfg = _backbones.get_cfg(spec["backbone"])
        spec["backbone"] = cfg.name
        spec.setdefault("input_size", input_size)
        spec.setdefault("weights", weights)
        size = spec["input_size"] or cfg.input_size
        views = check_views(spec.pop("views", None) or "original", f"backbone {cfg.name} views")
        base = (cfg.name if not spec["input_size"] else f"{cfg.name}@{size}") + "".join(f"+{v}" for v in views[1:])
        spec["base"] = spec.pop("name", None) or base
        spec["kind"] = _kind_of(spec, kind_values or {})
        if len(views) > 1:
            if not LEARNER_KINDS[spec["kind"]].takes_views:
                raise ValueError(f"backbone {base}: the {spec['kind']!r} learner kind does not average views "
                                 "(fine-tuning has its own: finetune 'tta' and 'train_views')")
            spec["views"] = views
        specs += LEARNER_KINDS[spec["kind"]].specs(spec, models)
    names = [s["name"] for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"base learner names must be unique, got {names}")
    return specs


def backbone_entry(entry: str) -> dict:
    """``"efficientnet_lite0"`` -> its spec; ``"efficientnet_lite0@300"`` -> the same with ``input_size=300``;
    ``"efficientnet_lite0@300+flip"`` -> also ``views=("original", "flip")``."""
    head, *views = entry.strip().split("+")
    name, at, size = head.partition("@")
    spec = {"backbone": name.strip()}
    if at:
        if not size.strip().isdigit() or int(size) <= 0:
            raise ValueError(f"backbone {entry!r}: the size after '@' must be a positive integer (pixels), "
                             f"got {size!r}")
        spec["input_size"] = int(size)
    if views:
        spec["views"] = check_views(["original"] + [v.strip() for v in views], f"backbone {entry!r}: views after '+'")
    return spec


def make_learners(specs, settings, sources: dict | None = None) -> dict:
    """Learner objects for specs, sharing one extractor per source id."""
    sources = {} if sources is None else sources
    out = {}
    for spec in specs:
        cls = LEARNER_KINDS[spec["kind"]]
        sid = cls.source_id(spec)
        if sid not in sources:
            sources[sid] = cls.make_source(spec, settings)
        out[spec["name"]] = cls(spec, sources[sid], settings)
    return out
