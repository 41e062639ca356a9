"""Reading image sets: folders, image lists, loose images, class lists and odd image files."""

import numpy as np
import pytest
import torch
from conftest import CLASSES
from PIL import Image

from ueo.data import OOD, UNLABELED, load_image_set
from ueo.errors import UeoError
from ueo.images import open_rgb
from ueo.loader import BadImages, ImageDataset, collate
from ueo.names import normalize_name, parse_classes

pytestmark = pytest.mark.usefixtures("single_thread")


def png(path, color=(200, 30, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (8, 8), color).save(path)
    return path


def test_image_folder_labels(image_folder):
    images = load_image_set(image_folder, CLASSES)
    assert len(images) == 30 and images.labelled
    by_folder = {}
    for path, label in zip(images.paths, images.labels, strict=True):
        by_folder.setdefault(path.split("/")[-2], set()).add(int(label))
    # Folder "red_square" matches "red square", "green_circle" matches "green_circle".
    assert by_folder == {
        "red_square": {0},
        "green_circle": {1},
        "blue_stripes": {2},
        "yellow_cross": {3},
        "black_noise": {OOD},
    }


def test_folder_matching_is_case_and_underscore_insensitive(tmp_path):
    png(tmp_path / "Golden_Retriever" / "a.png")
    png(tmp_path / "TABBY cat" / "b.jpg")
    png(tmp_path / "zebra" / "nested" / "c.png")
    (tmp_path / "zebra" / "notes.txt").write_text("not an image: ignored")
    images = load_image_set(tmp_path, ["golden retriever", "Tabby_Cat"])
    names = [p.split("/")[-1] for p in images.paths]
    assert dict(zip(names, images.labels.tolist(), strict=True)) == {
        "a.png": 0,
        "b.jpg": 1,
        "c.png": OOD,
    }
    assert normalize_name("  Ice_Cream   CONE ") == "ice cream cone"


def test_loose_images_are_unlabeled(tmp_path):
    png(tmp_path / "one.png")
    png(tmp_path / "two.JPG")
    (tmp_path / "readme.md").write_text("hi")
    (tmp_path / "sub").mkdir()  # a subfolder without images keeps it a loose-image folder
    images = load_image_set(tmp_path, CLASSES)
    assert sorted(p.split("/")[-1] for p in images.paths) == ["one.png", "two.JPG"]
    assert (images.labels == UNLABELED).all()
    assert not images.labelled


def test_image_list(tmp_path):
    for rel in ["a/1.png", "b/2.png", "my dir/with space.png", "c/4.png"]:
        png(tmp_path / rel)
    listing = tmp_path / "list.txt"
    listing.write_text(
        "# comment\n"
        "a/1.png 0\n"
        "\n"
        "b/2.png 3\n"
        "my dir/with space.png 4\n"  # split at the last space; 4 >= 4 known classes -> OOD
        "c/4.png   17  \n"
    )
    images = load_image_set(listing, CLASSES)
    assert images.paths == [
        str(tmp_path / "a/1.png"),
        str(tmp_path / "b/2.png"),
        str(tmp_path / "my dir/with space.png"),
        str(tmp_path / "c/4.png"),
    ]
    assert images.labels.tolist() == [0, 3, OOD, OOD]
    assert images.labelled


def test_image_list_with_data_root(tmp_path):
    root = tmp_path / "dataset"
    png(root / "x" / "1.png")
    listing = tmp_path / "lists" / "l.txt"
    listing.parent.mkdir()
    listing.write_text("x/1.png 1\n")
    with pytest.raises(UeoError, match="do not exist"):
        load_image_set(listing, CLASSES)  # relative to the list's folder by default
    images = load_image_set(listing, CLASSES, data_root=root)
    assert images.paths == [str(root / "x" / "1.png")] and images.labels.tolist() == [1]


@pytest.mark.parametrize(
    "line",
    ["no_label_here.png", "a.png 1.5", "a.png one", "a.png -1"],
)
def test_malformed_list_line_names_file_and_line(tmp_path, line):
    png(tmp_path / "ok.png")
    listing = tmp_path / "list.txt"
    listing.write_text(f"ok.png 0\n{line}\n")
    with pytest.raises(UeoError, match=r"list\.txt:2"):
        load_image_set(listing, CLASSES)


def test_missing_listed_image(tmp_path):
    png(tmp_path / "ok.png")
    listing = tmp_path / "list.txt"
    listing.write_text("ok.png 0\ngone.png 1\n")
    with pytest.raises(UeoError, match="gone.png"):
        load_image_set(listing, CLASSES)
    assert len(load_image_set(listing, CLASSES, check_exists=False)) == 2


def test_empty_inputs(tmp_path):
    with pytest.raises(UeoError, match="No images"):
        load_image_set(tmp_path, CLASSES)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(UeoError, match="No images"):
        load_image_set(tmp_path, CLASSES)
    with pytest.raises(UeoError, match="does not exist"):
        load_image_set(tmp_path / "nope", CLASSES)
    listing = tmp_path / "list.txt"
    listing.write_text("# nothing\n\n")
    with pytest.raises(UeoError, match="no entries"):
        load_image_set(listing, CLASSES)


def test_parse_classes(tmp_path):
    f = tmp_path / "classes.txt"
    f.write_text("cat\n dog \nice_cream\n\n\n")
    assert parse_classes(str(f)) == ["cat", "dog", "ice_cream"]
    assert parse_classes("cat, dog,ice cream") == ["cat", "dog", "ice cream"]
    assert parse_classes("cat") == ["cat"]
    f.write_text("cat\n\ndog\n")  # blank lines are ignored anywhere
    assert parse_classes(str(f)) == ["cat", "dog"]
    f.write_text("Ice Cream\ndog\nice_cream\n")
    with pytest.raises(UeoError, match=r"Duplicated class name 'ice_cream' at .*:3"):
        parse_classes(str(f))
    with pytest.raises(UeoError, match="Duplicated"):
        parse_classes("cat,CAT")
    with pytest.raises(UeoError, match="Empty"):
        parse_classes("cat,,dog")
    with pytest.raises(UeoError, match="not found"):
        parse_classes(str(tmp_path / "missing.txt"))


def test_open_rgb_modes(tmp_path):
    paths = {
        "L": png(tmp_path / "gray.png", 90, "L"),
        "LA": png(tmp_path / "gray_alpha.png", (90, 255), "LA"),
        "RGBA": png(tmp_path / "rgba.png", (10, 200, 30, 128), "RGBA"),
        "I;16": png(tmp_path / "gray16.png", 300, "I;16"),
    }
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 250, 20, 20] + [0] * 762)
    pal.save(tmp_path / "palette.png")
    paths["P"] = tmp_path / "palette.png"
    pal.save(tmp_path / "palette_t.png", transparency=0)
    paths["P+transparency"] = tmp_path / "palette_t.png"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    paths["CMYK"] = tmp_path / "cmyk.jpg"
    for mode, path in paths.items():
        img = open_rgb(str(path))
        assert img.mode == "RGB" and img.size == (8, 8), mode
    assert open_rgb(str(paths["L"])).getpixel((0, 0)) == (90, 90, 90)
    assert open_rgb(str(paths["P"])).getpixel((0, 0)) == (250, 20, 20)
    r, g, b = open_rgb(str(paths["CMYK"])).getpixel((0, 0))
    assert r > 200 and g < 60 and b < 60  # CMYK (0, 255, 255, 0) is red


def bad_files(folder):
    png(folder / "good.png")
    data = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "text.jpg").write_text("this is not an image")


def test_unreadable_images_are_reported_not_raised(tmp_path):
    bad_files(tmp_path)
    images = load_image_set(tmp_path, CLASSES)
    assert len(images) == 3
    ds = ImageDataset(images, lambda img: torch.zeros(3, 2, 2))
    x, index, bad = collate([ds[i] for i in range(3)])
    good = images.paths.index(str(tmp_path / "good.png"))
    assert x.shape == (1, 3, 2, 2) and index.tolist() == [good]
    assert sorted(i for i, _ in bad) == sorted({0, 1, 2} - {good})
    tracker = BadImages("skip")
    for i, message in bad + bad:  # twice, as over two epochs
        tracker.report(i, message)
    assert len(tracker) == 2
    with pytest.raises(UeoError, match="Unreadable image"):
        BadImages("error").report(*bad[0])
    with pytest.raises(UeoError):
        BadImages("ignore")


def test_subset_keeps_labels(image_folder):
    images = load_image_set(image_folder, CLASSES)
    sub = images.subset(images.labels == OOD)
    assert len(sub) == 6 and (sub.labels == OOD).all()
    assert all("black_noise" in p for p in sub.paths)
    assert np.array_equal(images.subset(np.array([2, 0])).labels, images.labels[[2, 0]])


def test_image_sets_are_read_without_torch(tmp_path):
    """`ueo.data` needs no torch: a runner without it (ueo.deploy) lists images with it."""
    import subprocess
    import sys

    png(tmp_path / "a" / "1.png")
    code = (
        "import sys; from ueo.data import load_image_set; "
        f"s = load_image_set({str(tmp_path)!r}, ['a'], unlabeled=True); "
        "print(len(s), 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.split() == ["1", "False"], done.stderr


def test_names_that_moved_out_of_data_still_import_with_a_warning():
    import ueo.loader
    import ueo.names

    with pytest.warns(DeprecationWarning, match=r"ueo\.loader\.make_loader"):
        from ueo.data import make_loader
    assert make_loader is ueo.loader.make_loader
    with pytest.warns(DeprecationWarning, match=r"ueo\.names\.parse_classes"):
        from ueo.data import parse_classes as moved
    assert moved is ueo.names.parse_classes
    with pytest.raises(ImportError):
        from ueo.data import no_such_name  # noqa: F401
