"""Image pre- and post-processing shared by ``dclgan translate`` and the HTTP service: pure functions.

decode (bytes -> RGB ``PIL.Image``) -> :func:`to_input` (resize policy, normalise to [-1, 1], reflect-pad
to the network's size multiple) -> the network -> :func:`from_output` (crop the padding, denormalise with
rounding, resize back) -> :func:`encode_image`. The output always has exactly the input's width and height.

Exception tree (all raised by :func:`decode_image`)::

    ImageError
     +-- UnsupportedImage   not an image, or a format/mode we do not accept
     +-- CorruptImage       recognised but undecodable (truncated, broken data)
     +-- ImageTooLarge      more pixels than allowed (decompression-bomb guard)

Must not import onnxruntime, fastapi, torch or ``training``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

from service.contract import to_rgb

OutputFormat = Literal["png", "jpeg", "webp"]
MEDIA_TYPES: dict[OutputFormat, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

# Only formats we mean to accept. Restricting Image.open keeps Pillow away from plug-ins with a history of
# problems on untrusted input (EPS shells out to Ghostscript). JPEG includes the MPO files of many phones.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")

# Bytes per pixel of Pillow's in-memory modes (RGB and the other 3-channel modes are stored as 4 bytes).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
# libjpeg's colour space of a JPEG -> the output colour space that keeps it (no conversion work).
_JPEG_OUTPUT = {"Gray": "GRAY", "YCbCr": "RGB", "CMYK": "CMYK", "YCCK": "CMYK"}


class ImageError(ValueError):
    """An uploaded or on-disk image that cannot be translated."""


class UnsupportedImage(ImageError):
    """Not an image, or a format we do not accept."""


class CorruptImage(ImageError):
    """A recognised image whose data cannot be decoded (e.g. a truncated JPEG)."""


class ImageTooLarge(ImageError):
    """More pixels than the configured limit."""


@dataclass(frozen=True)
class Probe:
    """What an image's header says, read without decoding a pixel: enough to size its memory."""

    format: str
    width: int
    height: int
    mode: str

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def decode_bytes(self, work_pixels: int) -> int:
        """An upper bound of the memory that decoding, preparing, running and encoding this image holds at
        once: the decoded image and its RGB copy (Pillow keeps RGB as 4 bytes a pixel), the float32
        network input and output at the working size with a temporary each (12 bytes a pixel apiece), and
        the 8-bit output image back at full size."""
        decoded = _MODE_BYTES.get(self.mode, 4)
        return self.pixels * (decoded + 4 + 4) + work_pixels * 4 * 12


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """``Image.open`` restricted to the accepted formats, with header errors mapped to ours."""
    try:
        img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError as exc:
        raise UnsupportedImage(f"not a supported image (accepted: {', '.join(ACCEPTED_FORMATS)})") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard (process-global, ~179 Mpx) fired first: report our limit, not Pillow's text.
        raise ImageTooLarge(f"the image declares more than {max_pixels} pixels, the limit") from exc
    except Exception as exc:  # noqa: BLE001 - plugins raise OSError, ValueError, struct.error... on bad headers
        raise CorruptImage("cannot read the image header") from exc
    width, height = img.size
    if width * height > max_pixels:
        raise ImageTooLarge(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    return img


def probe_image(data: bytes, *, max_pixels: int) -> Probe:
    """Read the header only (cheap): format, size and mode; refuses what :func:`decode_image` would refuse
    before decoding (not an image, unreadable header, too many pixels)."""
    img = _open(data, max_pixels)
    return Probe(format=str(img.format), width=img.width, height=img.height, mode=img.mode)


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode untrusted bytes into an RGB image with EXIF orientation applied.

    The pixel count is checked from the header, before any pixel data is decoded. Truncated or
    corrupt files raise ``CorruptImage`` rather than coming out half grey: Pillow refuses data that
    ends early (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays False), but libjpeg only *warns* about a
    JPEG whose scan stops at an early end marker and fills the rest with grey, and Pillow drops its
    warnings; so JPEGs are first checked by :func:`check_jpeg`. Error messages never quote a
    library's own text: clients get ours, the cause stays on the exception chain for the log.

    Args:
        data: the encoded file.
        max_pixels: largest accepted width * height (after decoding, before any resize).

    Raises:
        UnsupportedImage, CorruptImage, ImageTooLarge.
    """
    img = _open(data, max_pixels)
    if img.format in ("JPEG", "MPO"):
        check_jpeg(data)
    try:
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
    # Pillow's decoders signal malformed data with an open-ended set of types (OSError, ValueError,
    # SyntaxError, struct.error, zlib.error, ...); for untrusted input every one of them means "corrupt".
    except Exception as exc:
        raise CorruptImage(f"cannot decode the {img.format} image: truncated or corrupt data") from exc
    try:
        return to_rgb(img)
    except ValueError as exc:
        raise UnsupportedImage(f"cannot convert image mode {img.mode} to RGB") from exc


def check_jpeg(data: bytes) -> None:
    """Raise ``CorruptImage`` unless libjpeg decodes ``data`` without a single warning.

    simplejpeg's ``strict`` mode turns libjpeg-turbo's warnings ("premature end of data segment",
    "corrupt JPEG data") into errors. It decodes at 1/8 scale (DCT scaling), which still reads every
    entropy-coded byte but costs about a tenth of a full decode (10 ms for 5000x5000 here).
    """
    try:
        colorspace = simplejpeg.decode_jpeg_header(data)[2]
        simplejpeg.decode_jpeg(
            data, colorspace=_JPEG_OUTPUT.get(colorspace, "RGB"), strict=True, min_height=1, min_width=1
        )
    except Exception as exc:
        raise CorruptImage("cannot decode the JPEG image: truncated or corrupt data") from exc


def working_size(width: int, height: int, *, max_side: int | None) -> tuple[int, int]:
    """The size the network runs at: downscaled, aspect kept, so that the longer side is at most
    ``max_side``; never upscaled. ``None`` keeps the size."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


@dataclass(frozen=True)
class Prepared:
    """One image ready for the network, plus what :func:`from_output` needs to undo the preparation.

    Attributes:
        array: (3, H, W) float32 in [-1, 1]; H and W are multiples of the model's ``multiple_of``, so
            the service can batch images whose ``array.shape`` is equal.
        orig_size: (width, height) of the decoded image, the size of the final output.
        work_size: (width, height) after the resize policy, before padding.
        pad: (bottom, right) rows and columns of reflect padding added.
    """

    array: np.ndarray
    orig_size: tuple[int, int]
    work_size: tuple[int, int]
    pad: tuple[int, int]


def _padded(n: int, multiple_of: int, min_size: int) -> int:
    return max(-(-n // multiple_of), -(-min_size // multiple_of)) * multiple_of


def to_input(
    img: Image.Image, *, max_side: int | None = None, multiple_of: int = 4, min_size: int = 8
) -> Prepared:
    """Resize (policy: :func:`working_size`), normalise to [-1, 1] and reflect-pad an RGB image.

    Padding goes on the bottom and right, up to a multiple of ``multiple_of`` and at least
    ``min_size``. Reflect (not zero) padding keeps the added border looking like image content,
    which matters because InstanceNorm statistics cover the whole padded image. numpy's "reflect"
    mode reflects repeatedly when the pad exceeds the image (e.g. 5x7 -> 8x8, or 1x1), so tiny
    images need no special case.
    """
    if img.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {img.mode}; decode with decode_image/to_rgb")
    orig = img.size
    work = working_size(*orig, max_side=max_side)
    if work != orig:
        img = img.resize(work, Image.Resampling.LANCZOS)
    width, height = work
    pad = (_padded(height, multiple_of, min_size) - height, _padded(width, multiple_of, min_size) - width)
    chw = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / np.float32(127.5) - np.float32(1.0)
    array = np.pad(chw, ((0, 0), (0, pad[0]), (0, pad[1])), mode="reflect")
    return Prepared(array=np.ascontiguousarray(array), orig_size=orig, work_size=work, pad=pad)


def from_output(array: np.ndarray, prepared: Prepared) -> Image.Image:
    """Turn the network's output for ``prepared`` back into an image of the original size.

    Crops the padding, maps [-1, 1] to 0..255 with **rounding** (the authors' ``test.py`` truncates,
    which darkens every pixel by half a level on average), and resizes back if the resize policy
    shrank the input.

    Args:
        array: (3, H, W) float32 in [-1, 1], the same shape as ``prepared.array``.
        prepared: what :func:`to_input` returned for this image.

    Raises:
        ValueError: wrong shape or non-finite values (a broken model must not produce a silent image).
    """
    if array.shape != prepared.array.shape:
        raise ValueError(f"output shape {array.shape} differs from input shape {prepared.array.shape}")
    width, height = prepared.work_size
    cropped = array[:, :height, :width]
    if not np.isfinite(cropped).all():
        raise ValueError("model output contains NaN or infinity")
    pixels = np.rint(np.clip((cropped + 1.0) * 127.5, 0.0, 255.0)).astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)))
    if prepared.work_size != prepared.orig_size:
        img = img.resize(prepared.orig_size, Image.Resampling.LANCZOS)
    return img


def encode_image(
    img: Image.Image, fmt: OutputFormat = "png", *, quality: int = 95, png_compress_level: int = 1
) -> bytes:
    """Encode an RGB image; ``quality`` (1-100) applies to JPEG and WebP only.

    PNG defaults to zlib level 1: at 256x256 Pillow's default (6) costs 15-30 ms per image here,
    about 5% of a CPU inference, for files only ~5% smaller. Pass 6-9 when size matters more.
    """
    if fmt not in MEDIA_TYPES:
        raise ValueError(f"unknown output format {fmt!r}; expected one of {', '.join(MEDIA_TYPES)}")
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=png_compress_level)
    else:
        img.save(buf, format=fmt.upper(), quality=quality)
    return buf.getvalue()
