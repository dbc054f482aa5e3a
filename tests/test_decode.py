"""open_image: one decoding path for files and bytes, each failure its own ImageReadError."""

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from cnnkit.data.decode import (
    CorruptImageError,
    EmptyImageError,
    ImageNotFoundError,
    ImageReadError,
    ImageTooLargeError,
    NotAnImageError,
    image_header,
    open_image,
)


def encoded(format: str, size=(40, 30), mode="RGB", **save) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(buf, format=format, **save)
    return buf.getvalue()


def test_every_failure_is_an_image_read_error_and_a_value_error():
    for kind in (
        ImageNotFoundError,
        NotAnImageError,
        EmptyImageError,
        ImageTooLargeError,
        CorruptImageError,
    ):
        assert issubclass(kind, ImageReadError) and issubclass(kind, ValueError)
    assert issubclass(EmptyImageError, NotAnImageError)


def test_bytes_and_path_decode_alike(tmp_path):
    png = encoded("PNG")
    (tmp_path / "a.png").write_bytes(png)
    from_bytes, from_path = open_image(png), open_image(tmp_path / "a.png")
    assert from_bytes.size == (40, 30)
    assert np.array_equal(np.asarray(from_bytes), np.asarray(from_path))


def test_exif_orientation_and_first_frame():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    assert open_image(encoded("JPEG", size=(40, 20), exif=exif)).size == (20, 40)
    buf = io.BytesIO()
    frames = [Image.new("L", (8, 8), 0), Image.new("L", (8, 8), 255)]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert np.asarray(open_image(buf.getvalue()).convert("L")).max() == 0


def test_bytes_failures():
    with pytest.raises(EmptyImageError, match="image data: not an image"):
        open_image(b"")
    with pytest.raises(NotAnImageError) as e:
        open_image(b"plain text")
    assert not isinstance(e.value, EmptyImageError)
    with pytest.raises(CorruptImageError, match="truncated") as e:
        open_image(encoded("PNG", size=(200, 200))[:200])  # header fine, pixels cut
    assert e.value.reason


@pytest.mark.parametrize(
    "data",
    [encoded("JPEG")[:6], encoded("PNG")[:16], encoded("BMP")[:18], b"P6\n"],
    ids=["jpeg", "png", "bmp", "ppm"],
)
def test_a_truncated_header_is_corrupt_not_a_crash(data):
    # Image.open itself raises OSError or ValueError on these, not UnidentifiedImageError
    with pytest.raises(CorruptImageError):
        open_image(data)


def test_max_pixels_is_checked_on_the_header(monkeypatch):
    def no_decoding(self):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageTooLargeError, match="100x50 = 5,000 pixels; the limit is 4,999") as e:
        open_image(encoded("PNG", size=(100, 50)), max_pixels=4_999)
    assert e.value.size == (100, 50) and e.value.max_pixels == 4_999


def test_a_decompression_bomb_is_too_large(monkeypatch, tmp_path):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow refuses over twice this
    with pytest.raises(ImageTooLargeError) as e:
        open_image(encoded("PNG", size=(20, 20)))
    assert e.value.size is None and "pixels" in e.value.reason
    (tmp_path / "bomb.png").write_bytes(encoded("PNG", size=(20, 20)))
    with pytest.raises(ImageTooLargeError, match="bomb.png: too large to decode"):
        open_image(tmp_path / "bomb.png")


def test_file_failures_name_the_file(tmp_path):
    with pytest.raises(ImageNotFoundError, match="missing.png: no such file"):
        open_image(tmp_path / "missing.png")
    with pytest.raises(ImageNotFoundError, match="is a directory, not an image"):
        open_image(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(EmptyImageError, match=r"empty.png: not an image file \(or a format"):
        open_image(tmp_path / "empty.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(NotAnImageError, match=r"notes.png: not an image file \(or a format"):
        open_image(str(tmp_path / "notes.png"))
    (tmp_path / "cut.png").write_bytes(encoded("PNG", size=(200, 200))[:200])
    with pytest.raises(
        CorruptImageError, match=r"cut.png: cannot decode image \(.*is it truncated"
    ):
        open_image(tmp_path / "cut.png")


def test_image_header_reads_mode_and_size_without_decoding(tmp_path):
    (tmp_path / "grey.png").write_bytes(encoded("PNG", size=(12, 9), mode="L"))
    assert image_header(tmp_path / "grey.png") == ("L", 12, 9)
    truncated = encoded("JPEG", size=(64, 48))[:1000]  # header intact, pixels cut off
    (tmp_path / "cut.jpg").write_bytes(truncated)
    assert image_header(tmp_path / "cut.jpg") == ("RGB", 64, 48)
    (tmp_path / "text.png").write_text("not an image")
    assert image_header(tmp_path / "text.png") is None
    assert image_header(tmp_path / "missing.png") is None
