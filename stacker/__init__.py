"""stacker: stacked ensembles of pretrained CNNs for image classification.

Images -> pretrained backbones -> cached HDF5 features -> out-of-fold learners (a zoo of
models per backbone) -> level 2 (selected by cross-validated log loss, calibrated) ->
predictions and Kaggle submissions.
"""

__version__ = "0.2.0"

import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter

from . import finetune as _finetune  # noqa: E402,F401 - registers the fine-tuned learner kind
from .ensemble import Ensemble  # noqa: E402
from .images import ImageSet, load_images  # noqa: E402
from .predict import Prediction, load, predict  # noqa: E402
from . import backbones, submission  # noqa: E402

__all__ = ["Ensemble", "ImageSet", "Prediction", "backbones", "load", "load_images", "predict", "submission",
           "__version__"]
