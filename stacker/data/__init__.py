"""Images in, pixels out: where images come from and how they become pixel batches.

Modules, one job each:

- :mod:`~stacker.data.formats`: the one table of image formats (magic bytes, TensorFlow
  decoding, EXIF orientation, extensions) and opening a file by its first bytes.
- :mod:`~stacker.data.sources`: :class:`ImageSet` and the readers of folders and CSV files.
- :mod:`~stacker.data.inputs`: what a user passes (arrays, PIL images, paths, folders,
  sets) made into checked arrays or an :class:`ImageSet`, in one place.
- :mod:`~stacker.data.scan`: the header scan that finds unusable files and their reasons.
- :mod:`~stacker.data.decode`: decoding, EXIF orientation, RGB conversion, resizing and
  the threaded pixel pipelines (with formats, hashed whole into the feature cache's key).
- :mod:`~stacker.data.fingerprint`: content digests of files, what every cache keys on.
- :mod:`~stacker.data.storage`: local paths and URLs (``s3://``, ``gs://``, ``az://``, ``file://``)
  through one set of calls (fsspec): listing, opening, object versions.
- :mod:`~stacker.data.cachedir`: where the cache folder is when no one names one.
"""
