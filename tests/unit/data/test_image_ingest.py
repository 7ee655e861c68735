"""Image drops: ImageFolder and manifest layouts, the image table, and every bad image."""

from __future__ import annotations

import io

import pandas as pd
import pytest
from airflow.sdk.exceptions import AirflowFailException
from PIL import Image

from conveyor.data.datasets import latest_version
from conveyor.errors import DropRejected, ValidationFailed
from conveyor.lake import read_json
from helpers import ingest_and_validate, write_drop

CLASSES = ("circle", "square", "triangle")


def png(size=(32, 32), mode="RGB", colour=(200, 30, 30), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    fill = colour if mode in ("RGB", "CMYK") else 40000 if mode.startswith("I") else 128
    Image.new(mode, size, fill).save(buffer, fmt)
    return buffer.getvalue()


def good_files(per_class: int = 10) -> dict[str, bytes]:
    files = {}
    for c, name in enumerate(CLASSES):
        for n in range(per_class):
            files[f"{name}/{n}.png"] = png(colour=(20 * n, 80 * c, 5 * n + c))
    return files


def ingest(files: dict[str, bytes], drop: str = "d1"):
    from conveyor.lake import Lake

    write_drop(Lake.from_env(), drop, files, pipeline="shapes")
    return ingest_and_validate(drop, pipeline="shapes", run_id=f"run-{drop}")


def test_image_folder_drop_gets_an_image_table(lake):
    ingested, validated = ingest(good_files())
    assert ingested["rows"] == 30
    with (lake.raw("shapes", ingested["version"]) / "images.parquet").open("rb") as handle:
        table = pd.read_parquet(handle)
    assert set(table.columns) >= {"path", "label", "sha256", "bytes", "width", "height", "mode", "format", "decodes"}
    assert set(table["label"]) == set(CLASSES) and table["decodes"].all()
    assert (table["width"] == 32).all() and set(table["format"]) == {"PNG"}
    report = read_json(lake.reports("shapes", "run-d1") / "validation" / "result.json")
    assert report["classes"]["images_per_class"] == {"circle": 10, "square": 10, "triangle": 10}
    assert report["classes"]["imbalance_ratio"] == 1.0
    assert latest_version(lake, "shapes") == ingested["version"]


def test_manifest_layout(lake):
    files = {f"img/{i}.png": payload for i, payload in enumerate(good_files().values())}
    labels = [name.split("/")[0] for name in good_files()]
    files["manifest.csv"] = ("path,label\n" + "".join(f"img/{i}.png,{labels[i]}\n" for i in range(30))).encode()
    ingested, _ = ingest(files)
    assert ingested["rows"] == 30


@pytest.mark.parametrize(
    ("name", "payload", "error"),
    [
        ("zero.jpg", b"", "zero bytes"),
        ("text.png", b"this is not an image at all\n", "not an image"),
        ("truncated.jpg", png(size=(64, 64), fmt="JPEG")[:300], "does not decode"),
    ],
)
def test_corrupt_images_are_listed_by_name_and_the_drop_quarantined(lake, name, payload, error):
    files = good_files()
    files[f"circle/{name}"] = payload
    with pytest.raises(AirflowFailException) as err:
        ingest(files)
    assert isinstance(err.value.__cause__, ValidationFailed)
    assert f"corrupt image circle/{name}" in err.value.__cause__.failures[1]
    assert f"corrupt image circle/{name}" in str(err.value) and error in str(err.value)
    assert "tolerated: 0.0%" in str(err.value)
    assert (lake.quarantine("shapes", "d1") / "circle" / name).read_bytes() == payload
    report = read_json(lake.quarantine("shapes", "d1") / "_report.json")
    assert report["corrupt_files"][0]["path"] == f"circle/{name}"


def test_bad_files_within_the_tolerated_share_are_left_out(lake, tmp_path, monkeypatch):
    import shutil

    from conveyor import settings

    include = tmp_path / "include"
    shutil.copytree(settings.include_dir() / "expectations", include / "expectations")
    (include / "pipelines").mkdir()
    text = (settings.pipelines_dir() / "shapes.yaml").read_text()
    tolerant = text.replace("max_bad_file_share: 0.0", "max_bad_file_share: 0.1")
    (include / "pipelines" / "shapes.yaml").write_text(tolerant)
    monkeypatch.setenv("CONVEYOR_INCLUDE_DIR", str(include))
    files = good_files()
    files["square/zero.jpg"] = b""
    ingested, validated = ingest(files)
    assert validated is not None and ingested["rows"] == 31


@pytest.mark.parametrize(
    ("payload", "expectation"),
    [
        (png(size=(1, 1)), "expect_column_values_to_be_between(column='width'"),
        (png(mode="CMYK", fmt="JPEG"), "expect_column_values_to_be_in_set(column='mode'"),
        (png(mode="I;16"), "expect_column_values_to_be_in_set(column='mode'"),
    ],
)
def test_images_breaking_the_suite(lake, payload, expectation):
    files = good_files()
    files["square/odd.png"] = payload
    with pytest.raises(AirflowFailException, match=r"expect_column_values_to_be_(between|in_set)") as err:
        ingest(files)
    assert isinstance(err.value.__cause__, ValidationFailed)
    assert expectation in str(err.value)
    assert (lake.quarantine("shapes", "d1") / "square" / "odd.png").exists()


def test_a_class_with_no_images(lake):
    files = {k: v for k, v in good_files().items() if not k.startswith("triangle/")}
    with pytest.raises(AirflowFailException, match="expect_column_distinct_values_to_equal_set") as err:
        ingest(files)
    assert isinstance(err.value.__cause__, ValidationFailed)


def test_same_image_in_two_classes(lake):
    files = good_files()
    files["square/copy.png"] = files["circle/0.png"]
    with pytest.raises(AirflowFailException, match="duplicate_across_classes") as err:
        ingest(files)
    assert isinstance(err.value.__cause__, ValidationFailed)


@pytest.mark.parametrize(
    ("row", "rule"),
    [
        ("../../etc/passwd,circle", "paths inside the drop"),
        ("/etc/passwd,circle", "paths inside the drop"),
        ("img/missing.png,circle", "file exists"),
    ],
)
def test_manifest_rows_outside_the_drop_or_missing_are_rejected(lake, row, rule):
    files = {"img/0.png": png(), "manifest.csv": f"path,label\nimg/0.png,circle\n{row}\n".encode()}
    with pytest.raises(AirflowFailException, match=rule) as err:
        ingest(files)
    assert isinstance(err.value.__cause__, DropRejected)
    assert "manifest.csv line 3" in str(err.value)
    assert (lake.quarantine("shapes", "d1") / "manifest.csv").exists()


def test_images_outside_class_folders_are_rejected(lake):
    with pytest.raises(AirflowFailException, match="ImageFolder layout") as err:
        ingest({"loose.png": png()})
    assert isinstance(err.value.__cause__, DropRejected)


# --- issue 17: image drops that blocked ingest, and the files operating systems leave behind ------------


def png_bomb(width: int, height: int) -> bytes:
    """A 1-bit PNG of width x height black pixels: a few kilobytes that decode to width x height pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    packer = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def test_a_png_that_decodes_to_hundreds_of_megapixels_is_a_bad_file_and_quarantined(lake):
    bomb = png_bomb(20_000, 20_000)  # 400 megapixels
    assert len(bomb) < 200_000
    files = good_files()
    files["circle/bomb.png"] = bomb
    with pytest.raises(AirflowFailException) as err:
        ingest(files)
    assert isinstance(err.value.__cause__, ValidationFailed)
    assert "corrupt image circle/bomb.png: rule 'at most 89478485 pixels' (CONVEYOR_MAX_IMAGE_PIXELS)" in str(err.value)
    assert (lake.quarantine("shapes", "d1") / "circle" / "bomb.png").read_bytes() == bomb


def test_the_pixel_cap_is_a_setting(lake, monkeypatch):
    from conveyor.data.images import describe_image

    monkeypatch.setenv("CONVEYOR_MAX_IMAGE_PIXELS", "1000")
    info = describe_image(png(size=(64, 64)))
    assert info["decodes"] is False and "64x64 is 4096 pixels" in info["error"] and info["width"] == 64
    assert describe_image(png(size=(16, 16)))["decodes"] is True


def manifest_drop(manifest: bytes) -> dict[str, bytes]:
    files = {f"img/{i}.png": payload for i, payload in enumerate(good_files().values())}
    files["manifest.csv"] = manifest
    return files


def manifest_text() -> str:
    labels = [name.split("/")[0] for name in good_files()]
    return "path,label\n" + "".join(f"img/{i}.png,{labels[i]}\n" for i in range(30))


def test_a_manifest_with_a_utf8_bom_is_accepted(lake):
    ingested, _ = ingest(manifest_drop(b"\xef\xbb\xbf" + manifest_text().encode()))
    assert ingested["rows"] == 30


@pytest.mark.parametrize(
    ("manifest", "cap", "rule"),
    [
        (manifest_text().replace("circle", "cercl\xe9").encode("latin-1"), None, "rule 'encoding utf-8': byte"),
        (manifest_text().encode(), "100", "rule 'at most 100 bytes' (CONVEYOR_MAX_MANIFEST_BYTES)"),
        (b'path,label\nimg/0.png,"' + b"x" * 200_000 + b'"\n', None, "rule 'readable CSV'"),
    ],
    ids=["not UTF-8", "over the size cap", "a field over csv's limit"],
)
def test_an_unreadable_manifest_is_rejected_not_left_blocking(lake, monkeypatch, manifest, cap, rule):
    if cap:
        monkeypatch.setenv("CONVEYOR_MAX_MANIFEST_BYTES", cap)
    with pytest.raises(AirflowFailException) as err:
        ingest(manifest_drop(manifest))
    assert isinstance(err.value.__cause__, DropRejected)
    assert f"manifest.csv: {rule}" in str(err.value)
    assert (lake.quarantine("shapes", "d1") / "manifest.csv").read_bytes() == manifest
    assert not lake.landing("shapes", "d1").exists()


def test_files_operating_systems_leave_in_class_folders_are_skipped_and_listed(lake):
    files = good_files()
    files.update(
        {
            "circle/Thumbs.db": b"\xd0\xcf\x11\xe0junk",
            "square/.DS_Store": b"\x00\x00\x00\x01Bud1",
            "triangle/desktop.ini": b"[.ShellClassInfo]\r\n",
        }
    )
    ingested, validated = ingest(files)
    assert validated is not None and ingested["rows"] == 30 and ingested["skipped"] == 3
    manifest = read_json(lake.raw("shapes", ingested["version"]) / "manifest.json")
    assert {item["path"] for item in manifest["skipped"]} == {
        "circle/Thumbs.db",
        "square/.DS_Store",
        "triangle/desktop.ini",
    }
    assert all("operating-system file" in item["reason"] for item in manifest["skipped"])
    assert not any(f["path"].endswith(("Thumbs.db", ".DS_Store", "desktop.ini")) for f in manifest["files"])
