"""The image store and its checks: content-addressed bytes, and images that are not images,
truncated or enormous refused with an error that names where they came from."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from storage.images import ImageError, ImageStore, check_image, image_bytes


def _png(size=(20, 10), colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_good_image_decodes_to_rgb():
    image = check_image(_png(), "a.png", max_pixels=1000)
    assert image.mode == "RGB" and image.size == (20, 10) and image.getpixel((3, 3)) == (200, 30, 30)


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"", "empty image file"),
        (b"this is a text file, not a picture", "not an image"),
        (_png()[:-30], "unreadable image"),  # truncated: the last chunks are gone
    ],
)
def test_bad_bytes_are_refused_naming_where(data, problem):
    with pytest.raises(ImageError, match=f"data.jsonl:3: column 'image'.*{problem}"):
        check_image(data, "data.jsonl:3: column 'image'", max_pixels=10_000)


def test_an_enormous_image_is_refused_before_decoding():
    with pytest.raises(ImageError, match=r"20x10 = 200 pixels exceeds corpus.max_image_pixels=199"):
        check_image(_png(), "big.png", max_pixels=199)


def test_store_is_content_addressed_and_detects_changed_bytes(tmp_path):
    store = ImageStore(tmp_path / "images")
    a, b = _png(), _png(colour=(0, 0, 255))
    ha, hb = store.put(a), store.put(b)
    assert ha != hb and store.put(a) == ha  # the same bytes are stored once, under one name
    assert store.path(ha).read_bytes() == a and not list(store.root.rglob("*.tmp-*"))
    assert store.open(hb).getpixel((0, 0)) == (0, 0, 255)
    store.path(hb).write_bytes(a)
    with pytest.raises(ImageError, match="no longer hash"):
        store.open(hb)
    with pytest.raises(ImageError, match="not in the image store"):
        store.open("0" * 64)


def test_image_bytes_from_a_path_a_datasets_value_and_a_pil_image(tmp_path):
    data = _png()
    (tmp_path / "x.png").write_bytes(data)
    assert image_bytes(str(tmp_path / "x.png"), "row 0") == data
    assert image_bytes({"bytes": data, "path": None}, "row 0") == data
    assert image_bytes({"bytes": None, "path": str(tmp_path / "x.png")}, "row 0") == data
    assert check_image(image_bytes(Image.new("RGB", (4, 4), "white"), "row 0"), "row 0", 100).size == (4, 4)
    with pytest.raises(ImageError, match="row 1: cannot read image file"):
        image_bytes(str(tmp_path / "missing.png"), "row 1")
    with pytest.raises(ImageError, match="row 2: int is not an image"):
        image_bytes(3, "row 2")


def test_a_store_in_s3_beside_the_labels(tmp_path, s3_server):
    """An object-store image store (``<labels_uri>/images``): images are copied in once from the
    corpus's local store, read back checked, and a missing or changed object is an error that names
    it without the URI's query."""
    from storage import fs as fsmod

    local, remote = ImageStore(tmp_path / "images"), ImageStore(fsmod.join(s3_server, "images"))
    assert remote.fs is not None and remote.root == Path("labels/run/images")
    a, b = _png(), _png(colour=(0, 0, 255))
    ha, hb = local.put(a), local.put(b)
    assert remote.copy_from(local, [ha, hb, ha]) == 2 and remote.copy_from(local, [ha, hb]) == 0
    assert remote.has(ha) and remote.read(hb) == b and remote.open(hb).getpixel((0, 0)) == (0, 0, 255)
    assert remote.put(a) == ha
    with remote.fs.open_output_stream(str(remote.path(hb))) as out:
        out.write(a)
    with pytest.raises(ImageError, match=rf"^s3://labels/run/images/{hb[:2]}/{hb}: the stored bytes no longer hash"):
        remote.open(hb)
    with pytest.raises(ImageError, match=r"not in the image store s3://labels/run/images; it was stored before") as e:
        remote.open("0" * 64)
    assert "endpoint_override" not in str(e.value)
    with pytest.raises(ImageError, match="not in the image store"):  # the source is checked too
        remote.copy_from(local, ["1" * 64])
