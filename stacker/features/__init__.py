"""Feature sources: images become cached rows, computed once per image content and never twice.

- :mod:`~stacker.features.extractor`: pooled features of one backbone through the cache (the only
  place a CNN forward pass over images happens);
- :mod:`~stacker.features.progress`: extraction progress as periodic lines when stderr is a log, not a terminal;
- :mod:`~stacker.features.cutpoint`: activations at a backbone's cut point, per view (for fine-tuning);
- :mod:`~stacker.features.views`: exact variants of each image (its mirror...), each cached apart;
- :mod:`~stacker.features.config`: the extraction options, declared once (parameters, CLI, cache key);
- :mod:`~stacker.features.engines`: what runs the forward pass (Keras, XLA, ONNX Runtime);
- :mod:`~stacker.features.device`: where it runs (the CPU or a GPU, chosen once per process);
- :mod:`~stacker.features.cache`: the HDF5 feature files and the keyed stores of learner results;
- :mod:`~stacker.features.layout`: every path and key rule of a cache folder, and its registered kinds;
- :mod:`~stacker.features.rows`: cached rows as lazy matrices, read a window at a time.
"""
