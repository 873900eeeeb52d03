"""stacker: stacked ensembles of pretrained CNNs for image classification.

Images -> pretrained backbones -> cached HDF5 features -> out-of-fold learners (a zoo of
models per backbone) -> level 2 (selected by cross-validated log loss, calibrated) ->
predictions and Kaggle submissions. The sub-packages follow that flow:

- :mod:`stacker.data`: image sets, formats, decoding, content fingerprints;
- :mod:`stacker.backbones`: the registry of pretrained CNNs and their weights;
- :mod:`stacker.features`: feature sources through the cache (extraction options, engines, cache layout);
- :mod:`stacker.learners`: level-1 learners, their kinds and models;
- :mod:`stacker.level2`: combiners, calibration and the choice among them;
- :mod:`stacker.io`: estimators saved without pickles, a fitted ensemble's directory;
- :mod:`stacker.app`: the command line, recipes' shared code, reports, the cache inventory;

and at the top, :mod:`stacker.ensemble` (wiring only), :mod:`stacker.validation` (its
parameters), :mod:`stacker.params` (how a parameter is declared), :mod:`stacker.predict`,
:mod:`stacker.submission` and :mod:`stacker.doctor` (label issues, outliers, duplicates and
leaks in a fitted ensemble's training images).
"""

__version__ = "0.3.0"

import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter

from stacker import backbones, submission  # noqa: E402
from stacker.data.sources import ImageSet, load_images  # noqa: E402
from stacker.ensemble import Ensemble  # noqa: E402
from stacker.predict import Prediction, load, predict  # noqa: E402

__all__ = ["Ensemble", "ImageSet", "Prediction", "backbones", "load", "load_images", "predict", "submission",
           "__version__"]
