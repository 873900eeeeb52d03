"""Files in and out that must be safe: estimators saved without pickles, a fitted ensemble's directory.

- :mod:`~stacker.io.persist`: saving and loading estimators so that a stranger's file runs no code
  (skops with trusted types, checked Keras archives), and the trust registry (``@trusted``);
- :mod:`~stacker.io.model_dir`: a fitted ensemble's directory: manifest, files and checksums, save and load.
"""
