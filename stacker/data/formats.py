"""Image formats: one table of what stacker knows about each, and opening a file by its first bytes.

Every format a Pillow plugin opens is read (JPEG, PNG, BMP, GIF, WebP, TIFF including
16-bit and float, PPM/PGM, ICO, TGA, SGI, ...); Pillow's registry gives their file
extensions. :data:`FORMATS` holds a row only for a format stacker knows more about:
the first bytes that name it (so :func:`open_image` asks its plugin first, and the
``tf.data`` pipeline lets TensorFlow decode it), whether TensorFlow decodes it, whether
its EXIF orientation is applied, and extensions Pillow may not register. Everything
else (:data:`IMAGE_EXTENSIONS`, :data:`EXIF_FORMATS`, :data:`TENSORFLOW_MAGIC`,
:func:`sniff`) derives from the table, so a new format is one row. The module decides
which decoder makes the pixels, so its source is part of the feature cache's key.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["END_MARKERS", "EXIF_FORMATS", "FORMATS", "Format", "HEAD_BYTES", "IMAGE_EXTENSIONS", "TENSORFLOW_MAGIC",
           "open_image", "sniff"]


@dataclass(frozen=True)
class Format:
    """One image format, as Pillow names it (``Image.format``).

    Attributes
    ----------
    name : str
        Pillow's format name.
    magic : tuple of (int, bytes)
        ``(offset, bytes)`` pairs that must all match the file's first bytes; ``()``
        when the format has no signature of its own. Each is the shortest that tells
        the format apart (what TensorFlow's decoder checks); Pillow's plugin checks the
        rest, and a file it refuses gets Pillow's full search.
    tensorflow : bool
        ``tf.io.decode_image`` decodes it; other formats are decoded by Pillow inside
        the ``tf.data`` pipeline.
    exif : bool
        Its EXIF orientation is read by the header scan and applied to the pixels.
    extensions : tuple of str
        File extensions read as images besides those Pillow registers.
    end : bytes
        The bytes a complete file ends with (``b""``: not checked). The header scan
        decodes a file that ends otherwise, so a truncated one is refused before any
        forward pass, and one with trailing bytes after its end marker still passes.
    """

    name: str
    magic: tuple = ()
    tensorflow: bool = False
    exif: bool = False
    extensions: tuple = ()
    end: bytes = b""


FORMATS = (
    Format("JPEG", ((0, b"\xff\xd8\xff"),), tensorflow=True, exif=True, end=b"\xff\xd9"),  # EOI marker
    Format("MPO", exif=True, end=b"\xff\xd9"),  # several JPEGs in one file: Pillow names it apart, opens as JPEG
    Format("PNG", ((0, b"\x89PNG"),), tensorflow=True, exif=True, end=b"IEND\xaeB`\x82"),  # IEND chunk and CRC
    Format("GIF", ((0, b"GIF"),), tensorflow=True, end=b";"),  # trailer byte 0x3B
    Format("BMP", ((0, b"BM"),), tensorflow=True),
    Format("WEBP", ((0, b"RIFF"), (8, b"WEBP")), tensorflow=True, exif=True),
    Format("HEIF", extensions=(".heic", ".heif")),  # a Pillow plugin may be installed
)

EXIF_FORMATS = frozenset(f.name for f in FORMATS if f.exif)
TENSORFLOW_MAGIC = tuple(f.magic for f in FORMATS if f.tensorflow)  # any one of them: TensorFlow decodes the file
HEAD_BYTES = max(offset + len(m) for f in FORMATS for offset, m in f.magic)  # what sniff needs to read
END_MARKERS = {f.name: f.end for f in FORMATS if f.end}  # Pillow's format name -> the bytes a whole file ends with


def _pillow_extensions() -> tuple:
    from PIL import Image

    Image.init()
    return tuple(sorted(e for e, fmt in Image.registered_extensions().items() if fmt in Image.OPEN))


# Every extension a Pillow plugin opens, plus the table's own (files without an extension are read too).
IMAGE_EXTENSIONS = tuple(sorted(set(_pillow_extensions()) | {e for f in FORMATS for e in f.extensions}))


def sniff(head: bytes) -> str | None:
    """The name of the format whose magic starts ``head`` (a file's first :data:`HEAD_BYTES`), or None."""
    for fmt in FORMATS:
        if fmt.magic and all(head[offset:offset + len(m)] == m for offset, m in fmt.magic):
            return fmt.name
    return None


def open_image(source):
    """``PIL.Image.open`` of a file path or of a file's bytes, asking the format its first bytes name first.

    Pillow otherwise tries its plugins in registration order, building a file object
    for each that might accept the file: that halved the cost of opening a JPEG
    (0.11 -> 0.06 ms), paid twice per image (header scan, decode). A file the named
    plugin refuses gets Pillow's full search, so what opens is unchanged. Bytes are an
    object fetched whole from a URL (:mod:`stacker.data.storage`).
    """
    import io

    from PIL import Image, UnidentifiedImageError

    in_memory = isinstance(source, bytes)
    if in_memory:
        head = source[:HEAD_BYTES]
    else:
        with open(source, "rb") as fh:
            head = fh.read(HEAD_BYTES)
    fmt = sniff(head)
    if fmt is not None:
        try:
            return Image.open(io.BytesIO(source) if in_memory else source, formats=[fmt])
        except UnidentifiedImageError:
            pass
    return Image.open(io.BytesIO(source) if in_memory else source)  # each try reads from the start
