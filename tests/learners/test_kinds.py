"""Learner kinds: the registry decides each backbone's kind from its declared parameter."""

from __future__ import annotations

import pytest
from conftest import TINY

from stacker.learners.kinds import DEFAULT_KIND, LEARNER_KINDS, code_parts, kind_params, learner_specs


def test_builtin_kinds_declare_their_parameter_trust_and_code():
    assert set(LEARNER_KINDS) >= {"frozen", "finetuned"} and DEFAULT_KIND == "frozen"
    assert [p.name for p in kind_params()] == ["finetune"]
    parts = code_parts()
    assert {"model_code", "finetune_code", "cut_code"} <= set(parts)
    from stacker.io.persist import trusted_types

    assert "stacker.learners.finetune.FineTunedClassifier" in trusted_types()


def test_specs_pick_the_kind_per_backbone():
    specs = learner_specs([TINY, {**TINY, "name": "ft", "finetune": True}], "logistic", kind_values={"finetune": None})
    assert [(s["name"], s["kind"]) for s in specs] == [("tiny_cnn@32:logistic", "frozen"), ("ft:finetune", "finetuned")]
    every = learner_specs([TINY], "default", kind_values={"finetune": {"epochs": 1}})
    assert [s["kind"] for s in every] == ["finetuned"] and every[0]["finetune"]["epochs"] == 1
    with pytest.raises(ValueError, match="unknown learner kind 'svm'"):
        learner_specs([{**TINY, "kind": "svm"}], "default")
    with pytest.raises(ValueError, match="names must be unique"):
        learner_specs([TINY, TINY], "logistic")


def test_out_of_core_refuses_a_model_without_a_streaming_twin():
    from sklearn.ensemble import RandomForestClassifier

    frozen = LEARNER_KINDS["frozen"]
    frozen.check_streaming({"model": "logistic"})
    with pytest.raises((ValueError, TypeError)):
        frozen.check_streaming({"model": RandomForestClassifier()})


def test_settings_are_read_only_and_replace_keeps_extraction_in_step():
    import pickle

    from stacker.features.config import ExtractionConfig
    from stacker.learners.base import Settings

    settings = Settings({"random_state": 0, "verbose": 0, "strategy": None}, extraction=ExtractionConfig())
    for change in (lambda s: s.update(cache_dir="x"), lambda s: s.__setitem__("cache_dir", "x"),
                   lambda s: s.pop("cache_dir"), lambda s: s.setdefault("new", 1), lambda s: s.clear()):
        with pytest.raises(TypeError, match="read-only"):
            change(settings)
    moved = settings.replace(cache_dir="/elsewhere", out_of_core=True)
    assert moved.cache_dir == moved.extraction.cache_dir == "/elsewhere" and settings.cache_dir is None
    assert pickle.loads(pickle.dumps(moved)) == moved


def test_name_at_size_is_the_backbone_at_that_input_size_and_a_bad_size_is_named():
    specs = learner_specs(["efficientnet_lite0@300", " efficientnet_lite1 "], "fast")
    assert [(s["name"], s["backbone"], s["input_size"]) for s in specs] == [
        ("efficientnet_lite0@300:logistic", "efficientnet_lite0", 300),
        ("efficientnet_lite1:logistic", "efficientnet_lite1", None)]
    # the same learner as the dict form, so its features and results share one cache entry
    assert specs[0] == learner_specs([{"backbone": "efficientnet_lite0", "input_size": 300}], "fast")[0]
    for bad in ("efficientnet_lite0@", "efficientnet_lite0@3x", "efficientnet_lite0@0"):
        with pytest.raises(ValueError, match="positive integer"):
            learner_specs([bad], "fast")
