"""The frozen kind: a model from the zoo on a frozen backbone's pooled features (the default kind).

Any model of :mod:`stacker.learners.zoo` (or a scikit-learn classifier) is fitted per fold
on the cached features; out of core, its streaming equivalent
(:mod:`stacker.learners.streaming`) reads them a window at a time.
"""

from __future__ import annotations

from stacker.learners.base import Learner
from stacker.learners.kinds import register_learner
from stacker.learners.streaming import streaming_code, streaming_model
from stacker.learners.zoo import code_fingerprint, fit_weighted, make_model
from stacker.level2.arrays import align_proba

__all__ = ["FrozenLearner"]


@register_learner
class FrozenLearner(Learner):
    """A model from :mod:`stacker.learners.zoo` on a frozen backbone's pooled features."""

    kind = "frozen"
    weighted = True  # in memory; the streaming models take no weights (refused before any work)
    exported = True

    @classmethod
    def code_parts(cls, out_of_core: bool = False) -> dict:
        parts = {"model_code": code_fingerprint()}
        if out_of_core:  # other (streaming) models: other results
            parts["out_of_core"] = streaming_code()
        return parts

    @classmethod
    def check_streaming(cls, spec: dict) -> None:
        streaming_model(spec["model"])  # raises for a model with no streaming equivalent

    def _fit_fold(self, i, tr, va, inputs, y, k, data, state):
        X = inputs["original"]
        if self.settings.get("out_of_core"):
            est = streaming_model(self.spec["model"], self.settings.random_state + i)
        else:
            est = make_model(self.spec["model"], self.settings.random_state + i, self.settings.strategy)
        w = getattr(self, "sample_weight_", None)
        fit_weighted(est, X[tr], y[tr], None if w is None else w[tr])
        return est, {"oof_proba": align_proba(est, est.predict_proba(X[va]), k)}
