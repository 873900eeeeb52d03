"""Extraction options: one row each gives the check, the default, the cache key and the CLI option."""

from __future__ import annotations

import pickle

import numpy as np

import pytest

from stacker.features.config import (BUILTIN_OPTIONS, EXTRACTION_OPTIONS, ExtractionConfig, check_option,
                                     key_parts, register_extraction_option, unregister_extraction_option)
from stacker.params import Option, Param


def test_config_holds_every_option_frozen_with_defaults_and_checks():
    config = ExtractionConfig(resize="bicubic", batch_size=8)
    assert config.resize == "bicubic" and config.batch_size == 8 and config.on_bad_image == "raise"
    with pytest.raises(AttributeError, match="frozen"):
        config.resize = "pil"
    assert pickle.loads(pickle.dumps(config)).batch_size == 8  # Ray tasks carry it
    kwargs = config.extractor_kwargs()
    assert kwargs["resize"] == "bicubic" and kwargs["options"] == {}
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        ExtractionConfig(batch_size=0)
    with pytest.raises(TypeError, match="unknown extraction options"):
        ExtractionConfig(resise="pil")
    with pytest.raises(ValueError, match="on_bad_image must be 'raise' or 'skip', got 'ignore'"):
        check_option("on_bad_image", "ignore")


def test_builtin_rows_have_their_cli_form_and_key_role():
    names = [o.name for o in BUILTIN_OPTIONS]
    assert names[:3] == ["weights", "input_size", "batch_size"] and "engine" in names
    assert EXTRACTION_OPTIONS["input_size"].param.cli.flags == ("--image-size",)
    assert not EXTRACTION_OPTIONS["cache_dir"].in_key and EXTRACTION_OPTIONS["resize"].in_key
    assert EXTRACTION_OPTIONS["weights"].param.from_cli("none") is None
    with pytest.raises(ValueError, match="built-in"):
        unregister_extraction_option("resize")


def test_a_registered_option_is_checked_keyed_and_removable():
    register_extraction_option(Param("gamma", 1.0, "float\n    A toy gamma.", check=lambda v: v > 0, what="positive",
                                     cli=Option(("--gamma",), "a toy gamma", type=float)),
                               pixels=lambda px, g: 255.0 * (px / 255.0) ** g)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_extraction_option(Param("gamma", 1.0, ""))
        config = ExtractionConfig(gamma=2.0)
        assert config.extra() == {"gamma": 2.0} and config.extractor_kwargs()["options"] == {"gamma": 2.0}
        assert key_parts(config.extra()) == {"gamma": 2.0}
        with pytest.raises(ValueError, match="gamma must be positive, got -1"):
            ExtractionConfig(gamma=-1)
    finally:
        unregister_extraction_option("gamma")
    assert "gamma" not in EXTRACTION_OPTIONS


def test_an_option_unknown_to_this_process_fails_instead_of_being_ignored():
    from stacker.features.config import apply_pixels

    with pytest.raises(ValueError, match=r"not registered in this process.*STACKER_PLUGINS"):
        apply_pixels(np.zeros((1, 2, 2, 3), np.float32), {"sepia": True})  # e.g. a Ray worker without the plugin
    with pytest.raises(ValueError, match="not registered"):
        key_parts({"sepia": True})


def test_an_option_may_not_take_another_parameters_name():
    import stacker

    register_extraction_option(Param("cv", 3, "int\n    A clash."))
    try:
        with pytest.raises(ValueError, match=r"\['cv'\] are declared twice"):
            stacker.Ensemble()
    finally:
        unregister_extraction_option("cv")
    assert stacker.Ensemble().cv == 5
