"""Files in and out that must be safe: estimators saved without pickles, a fitted ensemble's directory.

- :mod:`~stacker.io.persist`: saving and loading estimators so that a stranger's file runs no code
  (skops with trusted types, checked Keras archives), and the trust registry (``@trusted``);
- :mod:`~stacker.io.allowlist`: the explicit list of types a skops file may hold (never skops's defaults) and
  the check that a rebuilt object holds no function and no parameter naming a file, folder or URL;
- :mod:`~stacker.io.keras_archive`: a ``.keras`` archive checked before Keras reads it: every config object
  resolved as Keras resolves it (module + dotted name, registered names) and checked against an allowlist
  of what stacker's networks are made of;
- :mod:`~stacker.io.model_dir`: a fitted ensemble's directory: manifest, files and checksums, save and load;
- :mod:`~stacker.io.manifest`: the manifest's schema, checked (field by field, with clear errors) before a load;
- :mod:`~stacker.io.bounds`: documented, overridable bounds on declared arrays, archive members, HDF5 datasets
  and input sizes, checked from headers before anything is allocated;
- :mod:`~stacker.io.onnx_graph`: an ONNX graph checked before ONNX Runtime sees it: self-contained (no
  external data), default ONNX operators only, declared shapes and input bounded;
- :mod:`~stacker.io.export`: the whole fitted ensemble as one ONNX file (pixels in, probabilities out), each part
  in the ONNX form it declares, a part without one refused by name;
- :mod:`~stacker.io.onnx_builder`: the small graph builder the exported parts are written with.
"""
