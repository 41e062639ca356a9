"""Every bad input gets a clean answer: odd image modes, huge images, odd paths and text files.

Images are written as real files in a format that holds their mode, and checked pixel by pixel.
"""

import logging
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from conftest import CLASSES
from PIL import Image

from ueo import images as images_module
from ueo.data import OOD, UNLABELED, load_image_set
from ueo.errors import UeoError
from ueo.images import BadImageError, open_rgb, to_rgb
from ueo.loader import BadImages, ImageDataset, collate
from ueo.names import parse_classes

pytestmark = pytest.mark.usefixtures("single_thread")

WHITE = (255, 255, 255)


def save(img, path, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return str(path)


def row(path):
    """The first row of `open_rgb(path)` as a list of RGB tuples."""
    img = open_rgb(path)
    assert img.mode == "RGB"
    return [img.getpixel((x, 0)) for x in range(img.width)]


def gray(*levels):
    return [(v, v, v) for v in levels]


def over_white(color, alpha):
    return tuple(round(c * alpha / 255 + 255 * (1 - alpha / 255)) for c in color)


def close(a, b, tol=1):
    """Pixel lists equal within `tol` per channel."""
    pairs = [xy for p, q in zip(a, b, strict=True) for xy in zip(p, q, strict=True)]
    return all(abs(x - y) <= tol for x, y in pairs)


# --- image modes -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["png", "bmp", "tiff"])
def test_bilevel(tmp_path, fmt):
    img = Image.new("1", (2, 1), 0)
    img.putpixel((1, 0), 1)
    path = save(img, tmp_path / f"bw.{fmt}")
    assert Image.open(path).mode == "1"
    assert row(path) == gray(0, 255)


@pytest.mark.parametrize("fmt", ["png", "bmp", "tiff", "jpg"])
def test_grayscale(tmp_path, fmt):
    path = save(Image.new("L", (2, 1), 90), tmp_path / f"g.{fmt}")
    assert Image.open(path).mode == "L"
    assert close(row(path), gray(90, 90))


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_gray_alpha_is_composited_on_white(tmp_path, fmt):
    img = Image.new("LA", (3, 1))
    for x, alpha in enumerate([255, 128, 0]):
        img.putpixel((x, 0), (90, alpha))
    path = save(img, tmp_path / f"la.{fmt}")
    assert Image.open(path).mode == "LA"
    expected = [over_white((90, 90, 90), a) for a in (255, 128, 0)]
    assert close(row(path), expected)
    assert row(path)[2] == WHITE  # fully transparent: the background, not the hidden gray


def palette_image():
    img = Image.new("P", (2, 1), 0)
    img.putpalette([0, 0, 0, 250, 20, 20])
    img.putpixel((1, 0), 1)
    return img


@pytest.mark.parametrize("fmt", ["png", "gif", "bmp", "tiff"])
def test_palette(tmp_path, fmt):
    path = save(palette_image(), tmp_path / f"p.{fmt}")
    assert Image.open(path).mode == "P"
    assert row(path) == [(0, 0, 0), (250, 20, 20)]


@pytest.mark.parametrize("fmt", ["png", "gif"])
def test_palette_transparency_is_composited_on_white(tmp_path, fmt):
    path = save(palette_image(), tmp_path / f"pt.{fmt}", transparency=0)
    assert Image.open(path).mode == "P" and "transparency" in Image.open(path).info
    assert row(path) == [WHITE, (250, 20, 20)]  # index 0 (black) is transparent


def test_palette_with_alpha(tmp_path):
    img = Image.new("PA", (2, 1))
    img.putpalette([0, 0, 0, 250, 20, 20])
    img.putpixel((0, 0), (1, 0))
    img.putpixel((1, 0), (1, 255))
    path = save(img, tmp_path / "pa.tiff")
    assert Image.open(path).mode == "PA"
    assert row(path) == [WHITE, (250, 20, 20)]


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_color_key_transparency(tmp_path, fmt):
    img = Image.new("RGB", (2, 1), (1, 2, 3))
    img.putpixel((1, 0), (200, 100, 50))
    kwargs = {"transparency": (1, 2, 3)} if fmt == "png" else {}
    path = save(img, tmp_path / f"key.{fmt}", **kwargs)
    first = WHITE if fmt == "png" else (1, 2, 3)
    assert row(path) == [first, (200, 100, 50)]


@pytest.mark.parametrize("fmt", ["png", "bmp", "tiff", "webp", "jpg"])
def test_rgb(tmp_path, fmt):
    img = Image.new("RGB", (2, 1), (200, 30, 30))
    kwargs = {"lossless": True} if fmt == "webp" else {}
    path = save(img, tmp_path / f"rgb.{fmt}", **kwargs)
    assert close(row(path), [(200, 30, 30)] * 2, tol=2 if fmt == "jpg" else 0)


@pytest.mark.parametrize("fmt", ["png", "tiff", "webp"])
def test_rgba_is_composited_on_white(tmp_path, fmt):
    img = Image.new("RGBA", (3, 1))
    for x, alpha in enumerate([255, 128, 0]):
        img.putpixel((x, 0), (10, 200, 30, alpha))
    path = save(img, tmp_path / f"rgba.{fmt}", **({"lossless": True} if fmt == "webp" else {}))
    assert Image.open(path).mode == "RGBA"
    assert close(row(path), [over_white((10, 200, 30), a) for a in (255, 128, 0)])
    assert row(path)[2] == WHITE


def test_premultiplied_rgba_is_composited_on_white():
    img = Image.new("RGBa", (1, 1), (5, 100, 15, 128))  # premultiplied (10, 200, 30) at 128
    (pixel,) = [to_rgb(img).getpixel((0, 0))]
    assert close([pixel], [over_white((10, 200, 30), 128)], tol=2)


@pytest.mark.parametrize("fmt", ["jpg", "tiff"])
def test_cmyk(tmp_path, fmt):
    path = save(Image.new("CMYK", (2, 1), (0, 255, 255, 0)), tmp_path / f"cmyk.{fmt}")
    assert Image.open(path).mode == "CMYK"
    assert close(row(path), [(255, 0, 0)] * 2, tol=3)  # CMYK (0, 255, 255, 0) is red


def test_ycbcr(tmp_path):
    path = save(Image.new("YCbCr", (2, 1), (76, 85, 255)), tmp_path / "ycc.tiff")
    assert Image.open(path).mode == "YCbCr"
    assert close(row(path), [(254, 0, 0)] * 2, tol=3)  # red in YCbCr


def test_lab(tmp_path):
    path = save(Image.new("LAB", (3, 1), (255, 128, 128)), tmp_path / "lab.tiff")
    img = Image.open(path)
    assert img.mode == "LAB"
    img.close()
    lab = Image.new("LAB", (2, 1), (0, 128, 128))
    lab.putpixel((1, 0), (138, 209, 198))  # red
    path = save(lab, tmp_path / "lab2.tiff")
    assert close(row(path), [(0, 0, 0), (255, 0, 0)], tol=6)


def test_hsv():
    img = Image.new("HSV", (2, 1), (0, 255, 255))
    img.putpixel((1, 0), (85, 255, 128))  # a third of the way round: green, half bright
    rgb = to_rgb(img)
    assert [rgb.getpixel((x, 0)) for x in range(2)] == [(255, 0, 0), (0, 128, 0)]


def sixteen_bit(mode, levels):
    img = Image.new(mode, (len(levels), 1))
    for x, v in enumerate(levels):
        img.putpixel((x, 0), v)
    return img


@pytest.mark.parametrize(
    "mode, fmt",
    [("I;16", "png"), ("I;16", "tiff"), ("I;16B", "tiff"), ("I;16L", "tiff")],
)
def test_16_bit_gray_is_scaled_not_clipped(tmp_path, mode, fmt):
    path = save(sixteen_bit(mode, [0, 300, 128 * 257, 65535]), tmp_path / f"g16.{fmt}")
    assert Image.open(path).mode.startswith("I;16")
    # PIL's convert("RGB") clips at 255: 300 would read as white.
    assert row(path) == gray(0, 1, 128, 255)


@pytest.mark.parametrize(
    "values, expected",
    [
        ([0, 100, 255], [0, 100, 255]),  # 8-bit values
        ([0, 300, 128 * 257, 65535], [0, 1, 128, 255]),  # 16-bit values
        ([-5, 2**30, 2**31 - 1], [0, 128, 255]),  # 31-bit values; negative clipped
    ],
)
def test_32_bit_integer_gray(tmp_path, values, expected):
    img = Image.fromarray(np.array([values], dtype=np.int32))
    path = save(img, tmp_path / "i32.tiff")
    assert Image.open(path).mode == "I"
    assert row(path) == gray(*expected)


@pytest.mark.parametrize(
    "values, expected",
    [
        ([0.0, 0.5, 1.0], [0, 128, 255]),  # max <= 1: [0, 1]
        ([0.0, 100.4, 300.0, float("nan"), -2.0], [0, 100, 255, 0, 0]),  # [0, 255], clipped
        ([float("nan"), float("inf")], [0, 255]),
    ],
)
def test_float_gray(tmp_path, values, expected):
    path = save(Image.fromarray(np.array([values], dtype=np.float32)), tmp_path / "f.tiff")
    assert Image.open(path).mode == "F"
    assert row(path) == gray(*expected)


# --- huge images -----------------------------------------------------------------------------


def png_header(path, width, height):
    """A PNG that declares a size but holds no pixels: a size check must not decode it."""

    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return str(path)


@pytest.mark.parametrize(
    "side, message",
    [
        (100_000, "decompression bomb"),  # PIL's DecompressionBombError
        (10_000, "decompression bomb"),  # PIL's DecompressionBombWarning
        (9_000, "megapixels"),  # under PIL's guard, over ours: refused from the header
    ],
)
def test_huge_image_is_refused_before_decoding(tmp_path, side, message):
    path = png_header(tmp_path / "huge.png", side, side)
    with pytest.raises(BadImageError, match=message):
        open_rgb(path)


def test_huge_image_is_a_bad_image_under_both_policies(tmp_path):
    save(Image.new("RGB", (8, 8)), tmp_path / "good.png")
    png_header(tmp_path / "bomb.png", 100_000, 100_000)
    png_header(tmp_path / "big.png", 9_000, 9_000)
    images = load_image_set(tmp_path, CLASSES)
    ds = ImageDataset(images, lambda img: torch.zeros(3, 2, 2))
    x, index, bad = collate([ds[i] for i in range(len(ds))])
    assert x.shape[0] == 1 and len(bad) == 2
    tracker = BadImages("skip")
    for i, message in bad:
        tracker.report(i, message)
    assert len(tracker) == 2
    for i, message in bad:
        with pytest.raises(UeoError, match="Unreadable image: .*(bomb|big)"):
            BadImages("error").report(i, message)


def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path):
    path = save(Image.new("RGB", (3600, 1800), (10, 200, 30)), tmp_path / "big.jpg")
    img = open_rgb(path)
    assert img.size == (1800, 900)  # halved: both sides stay >= DRAFT_SIZE (896)
    assert close([img.getpixel((5, 5))], [(10, 200, 30)], tol=3)
    small = save(Image.new("RGB", (1000, 800)), tmp_path / "small.jpg")
    assert open_rgb(small).size == (1000, 800)


def test_pixel_budget_applies_after_reduced_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(images_module, "MAX_PIXELS", 2_000_000)
    jpeg = save(Image.new("RGB", (3600, 1800)), tmp_path / "big.jpg")  # 6.5 MP, read at 1.6
    assert open_rgb(jpeg).size == (1800, 900)
    png = save(Image.new("RGB", (1500, 1500)), tmp_path / "big.png")  # 2.25 MP, no reduction
    with pytest.raises(BadImageError, match="1500x1500 pixels exceed"):
        open_rgb(png)


# --- paths -----------------------------------------------------------------------------------


def test_single_image_file_is_a_one_image_set(tmp_path):
    path = save(Image.new("RGB", (8, 8)), tmp_path / "photo.JPG", format="JPEG")
    images = load_image_set(path, CLASSES)
    assert images.paths == [path] and images.labels.tolist() == [UNLABELED]


def test_image_without_extension_is_identified(tmp_path):
    path = save(Image.new("RGB", (8, 8)), tmp_path / "photo", format="PNG")
    images = load_image_set(path, CLASSES)
    assert images.paths == [path] and images.labels.tolist() == [UNLABELED]


def test_list_file_that_is_not_utf8_names_the_file(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_bytes("café.png 0\n".encode("latin-1"))
    with pytest.raises(UeoError, match=r"list\.txt.*UTF-8"):
        load_image_set(listing, CLASSES)
    garbage = tmp_path / "blob"
    garbage.write_bytes(bytes(range(256)))
    with pytest.raises(UeoError, match=r"blob.*UTF-8"):
        load_image_set(garbage, CLASSES)


def test_list_file_with_bom_and_crlf(tmp_path):
    save(Image.new("RGB", (8, 8)), tmp_path / "a b" / "1.png")
    save(Image.new("RGB", (8, 8)), tmp_path / "2.png")
    listing = tmp_path / "list.txt"
    listing.write_bytes("\ufeffa b/1.png 0\r\n\r\n2.png 7\r\n".encode())
    images = load_image_set(listing, CLASSES)
    assert images.paths == [str(tmp_path / "a b" / "1.png"), str(tmp_path / "2.png")]
    assert images.labels.tolist() == [0, OOD]
    listing.write_bytes("a b/1.png 1\r2.png 2\r".encode("utf-16"))
    assert load_image_set(listing, CLASSES).labels.tolist() == [1, 2]


@pytest.mark.parametrize("label", ["1.5", "-1", "x", "+3", "١", "³", "１", "0x1", "1e2", "1_0"])
def test_label_must_be_a_plain_nonnegative_integer(tmp_path, label):
    save(Image.new("RGB", (8, 8)), tmp_path / "ok.png")
    listing = tmp_path / "list.txt"
    listing.write_text(f"ok.png 0\nok.png {label}\n", encoding="utf-8")
    with pytest.raises(UeoError, match=r"list\.txt:2"):
        load_image_set(listing, CLASSES)


def test_data_path_that_is_neither_file_nor_folder(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(UeoError, match="not a file or a folder"):
        load_image_set(tmp_path / "pipe", CLASSES)


def tree(root):
    save(Image.new("RGB", (8, 8)), root / "cat" / "a.png")
    save(Image.new("RGB", (8, 8)), root / "dog" / "b.png")


def test_symlinks_back_into_the_tree_are_not_followed(tmp_path):
    root = tmp_path / "root"
    tree(root)
    os.symlink(root, root / "cat" / "loop")  # a loop
    os.symlink(root / "cat", root / "kitten")  # a second way to the same folder
    os.symlink(root / "cat" / "a.png", root / "dog" / "same.png")  # a file counted twice
    save(Image.new("RGB", (8, 8)), tmp_path / "sibling" / "x.png")
    os.symlink(tmp_path, root / "dog" / "up")  # a folder that holds the tree: a loop too
    images = load_image_set(root, ["cat", "dog", "kitten"])
    assert images.paths == [str(root / "cat" / "a.png"), str(root / "dog" / "b.png")]
    assert images.labels.tolist() == [0, 1]


def test_symlinks_leading_out_are_followed_once(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    tree(root)
    save(Image.new("RGB", (8, 8)), outside / "more" / "c.png")
    os.symlink(outside / "more", outside / "more" / "self")  # a loop outside the tree
    os.symlink(outside / "more", root / "cat" / "more")
    os.symlink(outside / "more", root / "dog" / "again")  # the same target: once only
    os.symlink(outside / "more", root / "bird")
    os.symlink(tmp_path / "gone", root / "cat" / "broken")
    images = load_image_set(root, ["cat", "dog", "bird"])
    # Folders are read in name order: "bird" reaches the target first, then "cat/more" and
    # "dog/again" lead to a folder already read.
    assert images.paths == [
        str(root / "bird" / "c.png"),
        str(root / "cat" / "a.png"),
        str(root / "dog" / "b.png"),
    ]
    assert images.labels.tolist() == [2, 0, 1]


def test_stray_images_do_not_turn_a_class_tree_into_loose_images(tmp_path, caplog):
    tree(tmp_path)
    save(Image.new("RGB", (8, 8)), tmp_path / "stray.png")
    save(Image.new("RGB", (8, 8)), tmp_path / "stray2.jpg", format="JPEG")
    with caplog.at_level(logging.WARNING, logger="ueo.data"):
        images = load_image_set(tmp_path, ["cat", "dog"])
    assert [p.split("/")[-1] for p in images.paths] == ["a.png", "b.png"]
    assert images.labels.tolist() == [0, 1] and images.labelled
    assert "2 image(s)" in caplog.text and "stray.png" in caplog.text


def test_loose_images_with_imageless_subfolders(tmp_path):
    save(Image.new("RGB", (8, 8)), tmp_path / "one.png")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hi")
    (tmp_path / "empty").mkdir()
    images = load_image_set(tmp_path, CLASSES)
    assert images.paths == [str(tmp_path / "one.png")]
    assert images.labels.tolist() == [UNLABELED]


# --- class lists -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        "cat\ndog\n".encode("utf-8-sig"),
        b"cat\r\ndog\r\n",
        b"cat\rdog\r",
        "cat\ndog\n".encode("utf-16"),
        "cat\r\ndog".encode("utf-16-be").join([b"\xfe\xff", b""]),
        b"\n\n  cat  \n\n\t\ndog\n\n",  # blank lines anywhere, spaces around
    ],
)
def test_class_file_encodings_and_line_endings(tmp_path, data):
    path = tmp_path / "classes.txt"
    path.write_bytes(data)
    assert parse_classes(str(path)) == ["cat", "dog"]


def test_class_file_not_utf8_says_so(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_bytes("café\nthé\n".encode("latin-1"))
    with pytest.raises(UeoError, match=r"classes\.txt.*not UTF-8.*save it as UTF-8"):
        parse_classes(str(path))


@pytest.mark.parametrize(
    "spec", ["lists/classes", "classes.csv", "names.lst", ".classes", "~/x", "~nosuchuser/x"]
)
def test_class_file_that_looks_like_a_path_must_exist(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UeoError, match=f"[Cc]lass file {spec} not found"):
        parse_classes(spec)


def test_class_file_under_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "classes").write_text("cat\ndog\n")
    assert parse_classes("~/classes") == ["cat", "dog"]


def test_class_spec_that_is_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "classes").mkdir()
    for spec in ["classes", str(tmp_path / "classes")]:
        with pytest.raises(UeoError, match="is a folder"):
            parse_classes(spec)


def test_comma_lists_and_single_words():
    assert parse_classes("cat,dog") == ["cat", "dog"]
    assert parse_classes("cat") == ["cat"]
    assert parse_classes("st. bernard, pug") == ["st. bernard", "pug"]
    assert parse_classes("ice cream") == ["ice cream"]


def test_long_comma_list_is_no_file_name():
    # One path component holds at most 255 bytes: probing the list as a file raised OSError.
    names = [f"class number {i}" for i in range(100)]
    assert parse_classes(",".join(names)) == names


def test_data_path_too_long(tmp_path):
    with pytest.raises(UeoError, match="too long"):
        load_image_set(tmp_path / ("x" * 300), CLASSES)


def test_duplicate_class_names_name_both_lines(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("Ice Cream\n\ndog\nice_cream\n")
    with pytest.raises(UeoError, match=r"'ice_cream' at .*classes\.txt:4.*'Ice Cream' at .*:1"):
        parse_classes(str(path))


def test_empty_class_file(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("\n \n")
    with pytest.raises(UeoError, match="No class names"):
        parse_classes(str(path))
