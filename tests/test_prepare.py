"""Image lists from fake trees laid out like the real downloads."""

import io
import shutil
from pathlib import Path

import pytest
from PIL import Image

from ueo.bench.prepare import prepare_lists
from ueo.bench.protocol import class_names
from ueo.errors import UeoError

_buffer = io.BytesIO()
Image.new("RGB", (8, 8), (200, 30, 30)).save(_buffer, format="PNG")
PNG = _buffer.getvalue()


def image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(PNG)
    return path


def class_tree(folder: Path, names: list[str]) -> None:
    """One image per class folder."""
    for name in names:
        image(folder / name / "0001.png")


def read(path: Path) -> list[tuple[str, int]]:
    return [
        (rel, int(label))
        for rel, label in (ln.rsplit(" ", 1) for ln in path.read_text().splitlines())
    ]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def office31(tmp_path: Path) -> Path:
    root = tmp_path / "office31"
    for domain in ("amazon", "dslr", "webcam"):
        class_tree(root / domain / "images", class_names("office31"))
    return root


def test_office31(office31: Path, tmp_path: Path) -> None:
    # Extension case is ignored; hidden and non-image files are skipped.
    image(office31 / "amazon/images/bike/frame_0002.JPG")
    image(office31 / "amazon/images/bike/.hidden.jpg")
    (office31 / "amazon/images/bike/notes.txt").write_text("x")
    out = tmp_path / "lists"
    written = prepare_lists("Office-31", office31, out)
    assert written == {d: out / f"{d}.txt" for d in ("amazon", "dslr", "webcam")}
    amazon = read(written["amazon"])
    assert len(amazon) == 32
    assert amazon[:4] == [
        ("amazon/images/back_pack/0001.png", 0),
        ("amazon/images/bike/0001.png", 1),
        ("amazon/images/bike/frame_0002.JPG", 1),
        ("amazon/images/bike_helmet/0001.png", 2),
    ]
    assert amazon[-1] == ("amazon/images/trash_can/0001.png", 30)
    assert [label for _, label in read(written["webcam"])] == list(range(31))


def test_rerun_is_byte_identical(office31: Path, tmp_path: Path) -> None:
    out = tmp_path / "lists"
    prepare_lists("office31", office31, out)
    first = snapshot(out)
    prepare_lists("office31", office31, out)
    assert snapshot(out) == first
    assert sorted(first) == ["amazon.txt", "dslr.txt", "webcam.txt"]  # no temp files left


@pytest.mark.parametrize("folder", ["RealWorld", "Real_World", "Real World"])
def test_officehome_capitalised_folders(tmp_path: Path, folder: str) -> None:
    root = tmp_path / "OfficeHomeDataset"
    # Official folders are capitalised (Alarm_Clock, TV, ...): matching ignores case.
    names = [n.title() for n in class_names("officehome")]
    assert names[0] == "Alarm_Clock"
    class_tree(root / folder, names)
    written = prepare_lists("office-home", root, tmp_path / "lists", domains=["realworld"])
    assert list(written) == ["RealWorld"]
    lines = read(written["RealWorld"])
    assert lines[0] == (f"{folder}/Alarm_Clock/0001.png", 0)
    assert sorted(label for _, label in lines) == list(range(65))


def test_visda_ignores_files_next_to_class_folders(tmp_path: Path) -> None:
    root = tmp_path / "visda"
    for domain in ("train", "validation"):
        class_tree(root / domain, class_names("visda-c"))
        (root / domain / "image_list.txt").write_text("aeroplane/0001.png 0\n")
    written = prepare_lists("visda", root, tmp_path / "lists")
    assert list(written) == ["train", "validation"]
    assert read(written["validation"])[-1] == ("validation/truck/0001.png", 11)


@pytest.fixture
def domainnet(tmp_path: Path) -> Path:
    """Two domains; the official splits carry wrong labels that must be re-derived."""
    root = tmp_path / "domainnet"
    names = class_names("domainnet")
    for domain in ("clipart", "sketch"):
        class_tree(root / domain, names)
        image(root / domain / "The_Eiffel_Tower" / "0002.png")
        train = [f"{domain}/{n}/0001.png 0" for n in reversed(names)]
        (root / f"{domain}_train.txt").write_text("\n".join(train) + "\n")
        test = f"{domain}/The_Eiffel_Tower/0002.png 7\n{domain}/zigzag/0001.png 7\n"
        (root / f"{domain}_test.txt").write_text(test)
    return root


def test_domainnet_relabels_official_splits(domainnet: Path, tmp_path: Path) -> None:
    out = tmp_path / "lists"
    written = prepare_lists("DomainNet", domainnet, out, domains=["sketch", "clipart"])
    assert list(written) == ["sketch_train", "sketch_test", "clipart_train", "clipart_test"]
    train = read(written["clipart_train"])
    assert len(train) == 345
    assert train[0] == ("clipart/The_Eiffel_Tower/0001.png", 308)
    assert sorted(label for _, label in train) == list(range(345))
    assert read(written["sketch_test"]) == [
        ("sketch/The_Eiffel_Tower/0002.png", 308),
        ("sketch/zigzag/0001.png", 344),
    ]
    first = snapshot(out)
    prepare_lists("domainnet", domainnet, out, domains=["sketch", "clipart"])
    assert snapshot(out) == first


def test_domainnet_missing_listed_file(domainnet: Path, tmp_path: Path) -> None:
    with (domainnet / "sketch_train.txt").open("a") as f:
        f.write("sketch/zigzag/gone.png 7\nsketch/bee/gone.png 7\n")
    out = tmp_path / "lists"
    missing = r"2 file\(s\) listed in .*sketch_train.txt are missing.*sketch/bee/gone.png"
    with pytest.raises(UeoError, match=missing):
        prepare_lists("domainnet", domainnet, out, domains=["sketch"])
    assert not out.exists()  # nothing is written when a check fails


def test_domainnet_missing_split_file(domainnet: Path, tmp_path: Path) -> None:
    (domainnet / "clipart_test.txt").unlink()
    with pytest.raises(UeoError, match="clipart_test.txt not found"):
        prepare_lists("domainnet", domainnet, tmp_path / "lists", domains=["clipart"])


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(UeoError, match="nowhere does not exist"):
        prepare_lists("office31", tmp_path / "nowhere", tmp_path / "lists")


def test_missing_domain_lists_found_ones(office31: Path, tmp_path: Path) -> None:
    shutil.rmtree(office31 / "webcam")
    out = tmp_path / "lists"
    with pytest.raises(UeoError, match="webcam not found .*domains found: amazon, dslr"):
        prepare_lists("office31", office31, out)
    assert set(prepare_lists("office31", office31, out, domains=["amazon"])) == {"amazon"}


def test_missing_class_folder(office31: Path, tmp_path: Path) -> None:
    shutil.rmtree(office31 / "dslr/images/ruler")
    with pytest.raises(UeoError, match=r"1 class folder\(s\) missing in .*dslr.*: ruler"):
        prepare_lists("office31", office31, tmp_path / "lists")


def test_unknown_class_folder(office31: Path, tmp_path: Path) -> None:
    image(office31 / "dslr/images/zebra/0001.png")
    with pytest.raises(UeoError, match="unknown class folder .*zebra"):
        prepare_lists("office31", office31, tmp_path / "lists")


def test_unknown_domain_name(office31: Path, tmp_path: Path) -> None:
    with pytest.raises(UeoError, match="valid domains: amazon, dslr, webcam"):
        prepare_lists("office31", office31, tmp_path / "lists", domains=["Art"])


def test_prepare_command(office31: Path, tmp_path: Path, capsys) -> None:
    from ueo.cli import main

    assert (
        main(
            [
                "prepare",
                "office31",
                "--root",
                str(office31),
                "--out",
                str(tmp_path / "l"),
                "--domains",
                "dslr",
            ]
        )
        == 0
    )
    assert "dslr: 31 images" in capsys.readouterr().out
    assert (
        main(
            ["prepare", "office31", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "l")]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
