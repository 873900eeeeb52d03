"""stacker: stacked ensembles of pretrained CNNs for image classification.

Images -> pretrained backbones -> cached HDF5 features -> out-of-fold learners (a zoo of
models per backbone) -> level 2 (selected by cross-validated log loss, calibrated) ->
predictions and Kaggle submissions.
"""

__version__ = "0.2.0"

import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter

from stacker.learners import finetuned as _finetuned  # noqa: E402,F401 - registers the fine-tuned learner kind
from stacker.ensemble import Ensemble  # noqa: E402
from stacker.data.images import ImageSet, load_images  # noqa: E402
from stacker.predict import Prediction, load, predict  # noqa: E402
from stacker import backbones  # noqa: E402
from stacker import submission

__all__ = ["Ensemble", "ImageSet", "Prediction", "backbones", "load", "load_images", "predict", "submission",
           "__version__"]
