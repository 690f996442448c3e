"""Decoding untrusted images, the resize policy, padding, denormalisation and encoding."""

from __future__ import annotations

import io
import os
import struct
import tracemalloc
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.imaging import (
    MEDIA_TYPES,
    CorruptImage,
    ImageTooLarge,
    Prepared,
    UnsupportedImage,
    decode_image,
    encode_image,
    from_output,
    probe_image,
    to_input,
    working_size,
)

MAX_PIXELS = 10_000_000
ODD_SIZES = [(250, 250), (257, 263), (31, 47), (8, 8), (5, 7), (1, 1)]


def _encode(img: Image.Image, fmt: str = "PNG", **save: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` but that has no pixel data at all."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


# --- decode_image -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ODD_SIZES)
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF"])
def test_decode_keeps_odd_sizes(image_factory: Any, size: tuple[int, int], fmt: str) -> None:
    img = decode_image(image_factory.bytes(size, fmt=fmt), max_pixels=MAX_PIXELS)
    assert (img.mode, img.size) == ("RGB", size)


def test_lossless_rgb_is_unchanged(image_factory: Any) -> None:
    original = image_factory.image((31, 47))
    decoded = decode_image(_encode(original), max_pixels=MAX_PIXELS)
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(original))


def test_grayscale_becomes_equal_rgb_channels(image_factory: Any) -> None:
    gray = image_factory.image((31, 47), "L")
    rgb = np.asarray(decode_image(_encode(gray), max_pixels=MAX_PIXELS))
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], np.asarray(gray))


def test_alpha_is_composited_on_white() -> None:
    pixels = np.array(
        [[[200, 10, 30, 255], [200, 10, 30, 0], [0, 0, 0, 128]]], dtype=np.uint8
    )  # opaque, clear, half
    rgb = np.asarray(decode_image(_encode(Image.fromarray(pixels)), max_pixels=MAX_PIXELS))
    np.testing.assert_array_equal(rgb[0, 0], [200, 10, 30])
    np.testing.assert_array_equal(rgb[0, 1], [255, 255, 255])
    assert np.all(np.abs(rgb[0, 2].astype(int) - 127) <= 1)


def test_gray_alpha_is_composited_on_white(image_factory: Any) -> None:
    la = image_factory.image((9, 5), "LA")
    rgb = np.asarray(decode_image(_encode(la), max_pixels=MAX_PIXELS)).astype(float)
    gray, alpha = (np.asarray(la)[..., i].astype(float) for i in (0, 1))
    expected = gray * alpha / 255 + 255 * (1 - alpha / 255)
    assert np.abs(rgb[..., 1] - expected).max() <= 1.0


def test_palette_images_convert_and_transparent_index_turns_white(image_factory: Any) -> None:
    palette = image_factory.image((31, 47), "P")
    decoded = decode_image(_encode(palette), max_pixels=MAX_PIXELS)
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(palette.convert("RGB")))

    keyed = Image.new("P", (4, 1))
    keyed.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    keyed.putdata([0, 1, 0, 1])
    rgb = np.asarray(decode_image(_encode(keyed, transparency=0), max_pixels=MAX_PIXELS))
    np.testing.assert_array_equal(rgb[0], [[255, 255, 255], [10, 200, 30], [255, 255, 255], [10, 200, 30]])


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_is_scaled_not_clipped(fmt: str) -> None:
    values = np.array([[0, 257, 32896, 65535, 1000]], dtype=np.uint16)
    rgb = np.asarray(decode_image(_encode(Image.fromarray(values), fmt), max_pixels=MAX_PIXELS))
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 1, 128, 255, 4])
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (
            np.array([[0, 128, 255]], dtype=np.int32),
            [0, 128, 255],
        ),  # 8-bit scale, as Pillow's convert("I") gives
        (np.array([[0, 32896, 65535]], dtype=np.int32), [0, 128, 255]),  # 16-bit data opened as I
        (np.array([[0.0, 127.6, 255.0]], dtype=np.float32), [0, 128, 255]),
    ],
)
def test_32_bit_integer_and_float_modes(values: np.ndarray, expected: list[int]) -> None:
    rgb = np.asarray(decode_image(_encode(Image.fromarray(values), "TIFF"), max_pixels=MAX_PIXELS))
    np.testing.assert_array_equal(rgb[0, :, 1], expected)


def test_cmyk_jpeg_decodes_to_rgb(image_factory: Any) -> None:
    img = decode_image(image_factory.bytes((31, 47), "CMYK", fmt="JPEG"), max_pixels=MAX_PIXELS)
    assert (img.mode, img.size) == ("RGB", (31, 47))


def test_multi_picture_jpeg_from_phones_is_accepted() -> None:
    first, second = Image.new("RGB", (16, 8), (10, 20, 30)), Image.new("RGB", (16, 8))
    data = _encode(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert decode_image(data, max_pixels=MAX_PIXELS).size == (16, 8)


def test_exif_orientation_is_applied() -> None:
    # Stored 40x20, left half red, right half blue. Orientation 6 means "rotate 90 degrees clockwise to
    # display", so the displayed image is 20x40 with red on top.
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    img = decode_image(_encode(stored, "JPEG", exif=exif.tobytes(), quality=95), max_pixels=MAX_PIXELS)
    assert img.size == (20, 40)
    top, bottom = np.asarray(img)[5, 10].astype(int), np.asarray(img)[35, 10].astype(int)
    assert top[0] > 200 and top[2] < 50, top
    assert bottom[2] > 200 and bottom[0] < 50, bottom


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_is_corrupt_not_grey(image_factory: Any, fmt: str) -> None:
    data = image_factory.bytes((64, 64), fmt=fmt)
    with pytest.raises(CorruptImage, match="cannot decode"):
        decode_image(data[: len(data) * 2 // 3], max_pixels=MAX_PIXELS)


@pytest.mark.parametrize(
    "data", [b"", os.urandom(2048), b"GIF89a" + bytes(100), b"%!PS-Adobe-3.0 EPSF-3.0\n"]
)
def test_non_images_and_unaccepted_formats_are_unsupported(data: bytes) -> None:
    with pytest.raises(UnsupportedImage, match="not a supported image"):
        decode_image(data, max_pixels=MAX_PIXELS)


def test_real_gif_is_unsupported(image_factory: Any) -> None:
    with pytest.raises(UnsupportedImage):
        decode_image(image_factory.bytes((8, 8), fmt="GIF"), max_pixels=MAX_PIXELS)


def test_pixel_limit_is_inclusive(image_factory: Any) -> None:
    data = image_factory.bytes((100, 50))
    assert decode_image(data, max_pixels=5000).size == (100, 50)
    with pytest.raises(ImageTooLarge, match="100x50 = 5000 pixels; the limit is 4999"):
        decode_image(data, max_pixels=4999)


def test_pixel_limit_is_checked_before_decoding() -> None:
    # The header claims 5000x5000 and there is no pixel data: decoding would fail as corrupt, so
    # ImageTooLarge proves the size was refused first.
    with pytest.raises(ImageTooLarge, match="5000x5000"):
        decode_image(_png_header_only(5000, 5000), max_pixels=1_000_000)


def test_pillow_bomb_guard_is_reported_as_too_large() -> None:
    # 40000 x 40000 exceeds twice Image.MAX_IMAGE_PIXELS, where Pillow itself raises on open.
    assert 40000 * 40000 > 2 * Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageTooLarge):
        decode_image(_png_header_only(40000, 40000), max_pixels=10**10)


# --- working_size / to_input / from_output ------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [
        ((1000, 500), 256, (256, 128)),
        ((500, 1000), 256, (128, 256)),
        ((257, 263), 100, (98, 100)),
        ((100, 50), 256, (100, 50)),  # never upscaled
        ((256, 256), 256, (256, 256)),
        ((4000, 3), 400, (400, 1)),  # never below one pixel
        ((1000, 500), None, (1000, 500)),
    ],
)
def test_working_size(size: tuple[int, int], max_side: int | None, expected: tuple[int, int]) -> None:
    assert working_size(*size, max_side=max_side) == expected


def test_working_size_rejects_nonpositive_limit() -> None:
    with pytest.raises(ValueError, match="max_side"):
        working_size(10, 10, max_side=0)


@pytest.mark.parametrize(
    ("size", "shape", "pad"),
    [
        ((250, 250), (3, 252, 252), (2, 2)),
        ((257, 263), (3, 264, 260), (1, 3)),
        ((31, 47), (3, 48, 32), (1, 1)),
        ((8, 8), (3, 8, 8), (0, 0)),
        ((5, 7), (3, 8, 8), (1, 3)),  # raised to min_size
        ((1, 1), (3, 8, 8), (7, 7)),
        ((12, 4), (3, 8, 12), (4, 0)),
    ],
)
def test_to_input_pads_to_multiple_and_min_size(
    image_factory: Any, size: tuple[int, int], shape: tuple[int, int, int], pad: tuple[int, int]
) -> None:
    img = image_factory.image(size)
    prepared = to_input(img, multiple_of=4, min_size=8)
    assert prepared.array.shape == shape
    assert prepared.pad == pad
    assert prepared.orig_size == prepared.work_size == size
    assert prepared.array.dtype == np.float32 and prepared.array.flags.c_contiguous
    assert prepared.array.min() >= -1.0 and prepared.array.max() <= 1.0
    w, h = size
    expected = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    np.testing.assert_allclose(prepared.array[:, :h, :w], expected, atol=1e-6)


def test_padding_reflects_without_repeating_the_edge(image_factory: Any) -> None:
    prepared = to_input(image_factory.image((250, 250)))
    a = prepared.array
    np.testing.assert_array_equal(a[:, 250, :250], a[:, 248, :250])
    np.testing.assert_array_equal(a[:, 251, :250], a[:, 247, :250])
    np.testing.assert_array_equal(a[:, :250, 250], a[:, :250, 248])


def test_to_input_rejects_non_rgb(image_factory: Any) -> None:
    with pytest.raises(ValueError, match="expected an RGB image"):
        to_input(image_factory.image((8, 8), "L"))


@pytest.mark.parametrize("size", ODD_SIZES)
def test_identity_round_trip_is_exact(image_factory: Any, size: tuple[int, int]) -> None:
    img = image_factory.image(size)
    prepared = to_input(img)
    out = from_output(prepared.array.copy(), prepared)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(img))


def test_max_side_runs_smaller_and_restores_the_size(image_factory: Any) -> None:
    img = image_factory.image((400, 203))
    prepared = to_input(img, max_side=100)
    assert prepared.work_size == (100, 51)
    assert prepared.array.shape == (3, 52, 100)
    out = from_output(prepared.array, prepared)
    assert out.size == (400, 203)
    # A smooth gradient survives down- and up-scaling closely.
    assert np.abs(np.asarray(out, dtype=float) - np.asarray(img, dtype=float)).mean() < 20


def _prepared(width: int = 8, height: int = 8) -> Prepared:
    return to_input(Image.new("RGB", (width, height)))


def test_from_output_rounds_instead_of_truncating() -> None:
    prepared = _prepared()
    out = np.full(prepared.array.shape, 100.6 / 127.5 - 1.0, dtype=np.float32)
    out[0] = 100.4 / 127.5 - 1.0
    pixels = np.asarray(from_output(out, prepared))
    assert set(np.unique(pixels[..., 0])) == {100}
    assert set(np.unique(pixels[..., 1])) == {101}  # truncation would give 100


def test_from_output_clips_out_of_range_values() -> None:
    prepared = _prepared()
    out = np.full(prepared.array.shape, -1.5, dtype=np.float32)
    out[2] = 1.5
    pixels = np.asarray(from_output(out, prepared))
    assert pixels[..., 0].max() == 0 and pixels[..., 2].min() == 255


def test_from_output_rejects_wrong_shape_and_non_finite_values() -> None:
    prepared = _prepared(5, 7)
    with pytest.raises(ValueError, match="differs from input shape"):
        from_output(np.zeros((3, 8, 12), np.float32), prepared)
    bad = np.zeros(prepared.array.shape, np.float32)
    bad[1, 3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        from_output(bad, prepared)


def test_nan_in_the_cropped_padding_is_ignored() -> None:
    prepared = _prepared(5, 7)
    out = np.zeros(prepared.array.shape, np.float32)
    out[:, 7:, :] = np.nan  # padding rows only
    assert from_output(out, prepared).size == (5, 7)


# --- encode_image -------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "magic"), [("png", b"\x89PNG"), ("jpeg", b"\xff\xd8"), ("webp", b"RIFF")])
def test_encode_each_format(image_factory: Any, fmt: Any, magic: bytes) -> None:
    img = image_factory.image((31, 47))
    data = encode_image(img, fmt, quality=90)
    assert data.startswith(magic)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.size == (31, 47)
    assert Image.MIME[decoded.format] == MEDIA_TYPES[fmt]
    if fmt == "png":
        np.testing.assert_array_equal(np.asarray(decoded), np.asarray(img))


def test_jpeg_quality_is_applied(image_factory: Any) -> None:
    img = image_factory.image((64, 64))
    assert len(encode_image(img, "jpeg", quality=20)) < len(encode_image(img, "jpeg", quality=95))


def test_encode_rejects_unknown_format(image_factory: Any) -> None:
    with pytest.raises(ValueError, match="unknown output format 'gif'"):
        encode_image(image_factory.image((8, 8)), "gif")  # type: ignore[arg-type]


def test_malformed_header_is_reported_as_corrupt_not_raised_raw(image_factory: Any) -> None:
    # A BMP whose compression field names no known method: Pillow raises OSError while opening.
    bad = bytearray(image_factory.bytes((8, 8), fmt="BMP"))
    bad[30:34] = (99).to_bytes(4, "little")
    with pytest.raises(CorruptImage):
        decode_image(bytes(bad), max_pixels=10**6)


# --- hostile files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("progressive", [False, True])
def test_a_truncated_jpeg_with_an_end_marker_is_corrupt_not_grey(image_factory: Any, progressive: bool) -> None:
    """libjpeg only warns when a scan stops at an early end marker and fills the rest with grey; a 633-byte
    file declaring 5000x5000 came out as a grey 200. The strict check makes it a 400."""
    data = image_factory.bytes((256, 192), fmt="JPEG", quality=90, progressive=progressive)
    cut = data[: len(data) // 3] + b"\xff\xd9"
    with pytest.raises(CorruptImage) as refused:
        decode_image(cut, max_pixels=MAX_PIXELS)
    assert "premature" not in str(refused.value).lower()  # our words, not libjpeg's
    assert decode_image(data, max_pixels=MAX_PIXELS).size == (256, 192)  # the whole file is fine


def test_16_bit_images_are_converted_without_float64_copies() -> None:
    """numpy's allocations are traced: the conversion holds 2- and 4-byte integer copies, less than one
    float64 array; the float64 path (several 8-byte arrays at once) made eight 48 KB PNGs of 5000x5000
    take 5 GB."""
    side = 1000
    data = _encode(Image.fromarray(np.full((side, side), 40000, dtype=np.uint16)), "PNG")
    tracemalloc.start()
    try:
        rgb = decode_image(data, max_pixels=MAX_PIXELS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rgb.getpixel((0, 0)) == (156, 156, 156)
    assert peak < 8 * side * side, f"{peak / side / side:.1f} bytes per pixel of numpy temporaries"


def test_a_pillow_bomb_is_reported_with_our_limit_not_pillows() -> None:
    with pytest.raises(ImageTooLarge) as refused:
        decode_image(_png_header_only(40000, 40000), max_pixels=25_000_000)
    assert "25000000" in str(refused.value) and "DecompressionBomb" not in str(refused.value)


def test_probe_reads_the_header_and_sizes_the_work() -> None:
    probe = probe_image(_png_header_only(5000, 5000), max_pixels=10**8)
    assert (probe.format, probe.width, probe.height, probe.mode) == ("PNG", 5000, 5000, "RGB")
    assert probe.decode_bytes(1024 * 1024) == 25_000_000 * 12 + 1024 * 1024 * 48
    with pytest.raises(ImageTooLarge):
        probe_image(_png_header_only(5000, 5000), max_pixels=1000)
