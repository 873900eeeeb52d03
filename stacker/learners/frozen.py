"""The frozen kind: a model from the zoo on a frozen backbone's pooled features (the default kind).

Any model of :mod:`stacker.learners.zoo` (or a scikit-learn classifier) is fitted per fold
on the cached features; out of core, its streaming equivalent
(:mod:`stacker.learners.streaming`) reads them a window at a time. A backbone entry with
views (``"efficientnet_lite0@260+flip"``, or ``views=("original", "flip")`` in a dict)
trains its models on every view of each training image (the mirror as one more row) and
averages their probabilities over the views of each image it predicts; each view is one
more cached forward pass per image.
"""

from __future__ import annotations

import numpy as np

from stacker.learners.base import Learner, views_mean
from stacker.learners.kinds import register_learner
from stacker.learners.streaming import streaming_code, streaming_model
from stacker.learners.zoo import check_takes_weights, code_fingerprint, fit_weighted, make_model
from stacker.level2.arrays import align_proba

__all__ = ["FrozenLearner"]


@register_learner
class FrozenLearner(Learner):
    """A model from :mod:`stacker.learners.zoo` on a frozen backbone's pooled features."""

    kind = "frozen"
    weighted = True  # in memory; the streaming models take no weights (refused before any work)
    exported = True
    takes_views = True

    @classmethod
    def code_parts(cls, out_of_core: bool = False) -> dict:
        parts = {"model_code": code_fingerprint()}
        if out_of_core:  # other (streaming) models: other results
            parts["out_of_core"] = streaming_code()
        return parts

    @classmethod
    def check_weights(cls, spec: dict, what: str) -> None:
        check_takes_weights(spec["model"], spec["name"], what)

    @classmethod
    def check_streaming(cls, spec: dict) -> None:
        streaming_model(spec["model"])  # raises for a model with no streaming equivalent
        if len(spec.get("views") or ()) > 1:
            raise ValueError(f"{spec['name']}: training on views {list(spec['views'])} needs their features in "
                             "memory; out of core, use the backbone without views (or pass out_of_core=False)")

    def views(self) -> dict:
        cache = self.__dict__.setdefault("_views", {})
        for v in self.spec.get("views") or ("original",):
            if v not in cache:
                cache[v] = self.source.with_view(v)
        return dict(cache)

    def features(self, inputs: dict):
        """The rows level 2 reads as this learner's features: the original view's, or the mean over its views."""
        views = list(self.views())
        if len(views) == 1:
            return inputs["original"]
        total = np.array(inputs[views[0]], dtype=np.float32)
        for v in views[1:]:
            total += inputs[v]
        return np.divide(total, len(views), out=total)

    def _key_extra(self) -> dict:  # views are other inputs: other results
        views = {v: ext.key_meta() for v, ext in self.views().items() if v != "original"}
        return {**super()._key_extra(), **({"views": views} if views else {})}

    def _fit_fold(self, i, tr, va, inputs, y, k, data, state):
        views = [inputs[v] for v in self.views()]
        if self.settings.get("out_of_core"):
            est = streaming_model(self.spec["model"], self.settings.random_state + i)
        else:
            est = make_model(self.spec["model"], self.settings.random_state + i, self.settings.strategy)
        w = getattr(self, "sample_weight_", None)
        if len(views) == 1:
            fit_weighted(est, views[0][tr], y[tr], None if w is None else w[tr])
        else:  # every view of a training image is a training row
            fit_weighted(est, np.concatenate([X[tr] for X in views]), np.tile(y[tr], len(views)),
                         None if w is None else np.tile(w[tr], len(views)))
        return est, {"oof_proba": views_mean([align_proba(est, est.predict_proba(X[va]), k) for X in views])}
