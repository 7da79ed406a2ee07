"""Pipeline input stages as plain functions (no Ray): decode, list, read, retry, local writes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from support.images import PIXEL_LIMIT, edge_case_images, encode, photo, tar_bytes, write_images

from pipeline import storage
from pipeline.config import IOConfig
from pipeline.decode import decode_image
from pipeline.readers import iter_raw_images, tar_key
from pipeline.shards import InputError, ShardSpec, list_shards, safe_shard_id
from schemas.io import open_uri


# ---------------------------------------------------------------------- decode
@pytest.mark.parametrize("name", sorted(edge_case_images()))
def test_decode_edge_cases(name):
    data, expected = edge_case_images()[name]
    decoded = decode_image(data, PIXEL_LIMIT)
    assert decoded.status == expected, decoded.error
    if expected == "ok":
        assert decoded.rgb.dtype == np.uint8 and decoded.rgb.ndim == 3
        assert decoded.rgb.shape == (decoded.height, decoded.width, 3)
    else:
        assert decoded.rgb is None and decoded.error


def test_decode_mode_conversions_are_exact():
    rgb = photo("astronaut", 48)
    gray = decode_image(encode(Image.fromarray(rgb).convert("L")), PIXEL_LIMIT).rgb
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    alpha = decode_image(encode(Image.fromarray(rgb).convert("RGBA")), PIXEL_LIMIT).rgb
    np.testing.assert_array_equal(alpha, rgb)
    values = (np.arange(32 * 40, dtype=np.uint16).reshape(32, 40) * 50)
    gray16 = decode_image(encode(Image.fromarray(values)), PIXEL_LIMIT).rgb
    np.testing.assert_array_equal(gray16[..., 0], (values >> 8).astype(np.uint8))


def test_decode_applies_exif_orientation():
    image = np.zeros((40, 20, 3), dtype=np.uint8)
    image[:10] = 255  # white band at the top
    pil = Image.fromarray(image)
    exif = pil.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    decoded = decode_image(encode(pil, "JPEG", exif=exif.tobytes(), quality=100), PIXEL_LIMIT)
    assert (decoded.height, decoded.width) == (20, 40)
    assert decoded.rgb[:, -10:].mean() > 200 and decoded.rgb[:, :10].mean() < 50


def test_decode_too_large_is_checked_from_the_header():
    decoded = decode_image(encode(np.zeros((100, 100, 3), dtype=np.uint8)), 5000)
    assert decoded.status == "too_large" and (decoded.width, decoded.height) == (100, 100)
    assert decode_image(encode(np.zeros((50, 100, 3), dtype=np.uint8)), 5000).status == "ok"


# ---------------------------------------------------------------------- listing
def test_image_files_grouped_in_stable_sorted_shards(tmp_path):
    write_images(tmp_path / "in", ["b.png", "a.png", "sub/c.jpg", "sub/a.png", "z.png"])
    (tmp_path / "in" / "notes.txt").write_text("ignored")
    io_cfg = IOConfig(str(tmp_path / "in"), str(tmp_path / "out"), images_per_shard=2)
    shards = list_shards(io_cfg)
    assert [s.shard_id for s in shards] == ["images-000000", "images-000001", "images-000002"]
    assert [k for s in shards for k in s.keys] == ["a.png", "b.png", "sub/a.png", "sub/c.jpg",
                                                   "z.png"]
    assert list_shards(io_cfg) == shards
    # --limit is applied while labelling, so the groups (and resume) do not depend on it
    limited = list_shards(dataclasses.replace(io_cfg, limit=3))
    assert limited == shards


def test_listing_formats_globs_and_errors(tmp_path):
    (tmp_path / "tars").mkdir()
    for name in ("s-1.tar", "s-0.tar"):
        (tmp_path / "tars" / name).write_bytes(tar_bytes({"k.png": encode(photo("coins"))}))
    shards = list_shards(IOConfig(str(tmp_path / "tars"), str(tmp_path / "out")))
    assert [(s.shard_id, s.kind) for s in shards] == [("s-0", "webdataset"),
                                                      ("s-1", "webdataset")]
    globbed = list_shards(IOConfig(str(tmp_path / "tars" / "*-1.tar"), str(tmp_path / "o")))
    assert [s.shard_id for s in globbed] == ["s-1"]
    (tmp_path / "tars" / "x.parquet").write_bytes(b"")
    with pytest.raises(InputError, match="mixes"):
        list_shards(IOConfig(str(tmp_path / "tars"), str(tmp_path / "out")))
    forced = list_shards(IOConfig(str(tmp_path / "tars"), str(tmp_path / "o"),
                                  input_format="parquet"))
    assert [s.shard_id for s in forced] == ["x"]
    with pytest.raises(InputError, match="does not exist"):
        list_shards(IOConfig(str(tmp_path / "missing"), str(tmp_path / "out")))


def test_shard_ids_are_safe_and_unique():
    assert safe_shard_id("shard-000", "shard-000.tar") == "shard-000"
    assert safe_shard_id("dir/part", "dir/part.tar") == "dir__part"
    weird = safe_shard_id("../a b?", "../a b?.tar")
    assert "/" not in weird and " " not in weird and ".." not in weird.split("-")[0]
    assert weird != safe_shard_id("../a b!", "../a b!.tar")


# ---------------------------------------------------------------------- readers
def test_tar_member_names_never_become_paths(tmp_path, monkeypatch):
    png = encode(photo("coins", 32))
    members = {"../../evil.png": png, "/abs/x.png": png, "dir/ok.jpg": png,
               "dir/ok.json": b"{}"}
    shard_file = tmp_path / "shard.tar"
    shard_file.write_bytes(tar_bytes(members, symlink="link.png"))
    work = tmp_path / "cwd" / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    before = sorted(p for p in tmp_path.rglob("*"))
    fs, _ = open_uri(str(shard_file))
    shard = ShardSpec("shard", "webdataset", (str(shard_file),), (), str(shard_file), "fp")
    items = list(iter_raw_images(shard, fs))
    assert [i.key for i in items] == ["../../evil", "/abs/x", "dir/ok"]
    assert all(i.data == png for i in items)
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert tar_key("a/b.c.jpg") == "a/b.c"


def test_damaged_archives_yield_an_error_item(tmp_path):
    good = tar_bytes({f"{i}.png": encode(photo("coins", 32)) for i in range(3)})
    (tmp_path / "cut.tar").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.tar").write_bytes(b"not a tar file" * 100)
    fs, _ = open_uri(str(tmp_path))
    for name, min_good in (("cut.tar", 1), ("junk.tar", 0)):
        shard = ShardSpec(name, "webdataset", (str(tmp_path / name),), (), name, "fp")
        items = list(iter_raw_images(shard, fs))
        assert items[-1].error is not None and items[-1].error[0] == "decode_error"
        assert items[-1].key == name and len(items) - 1 >= min_good


def test_parquet_reader_binary_struct_and_ids(tmp_path):
    png = encode(photo("camera", 32))
    table = pa.table({"img": [png, None, png], "name": ["x", "y", "z"]})
    pq.write_table(table, tmp_path / "p.parquet")
    hf = pa.table({"image": [{"bytes": png, "path": "a.png"}]})
    pq.write_table(hf, tmp_path / "hf.parquet")
    fs, _ = open_uri(str(tmp_path))
    shard = ShardSpec("p", "parquet", (str(tmp_path / "p.parquet"),), (), "p", "fp")
    items = list(iter_raw_images(shard, fs, "img", "name"))
    assert [(i.key, len(i.data)) for i in items] == [("x", len(png)), ("y", 0), ("z", len(png))]
    shard = ShardSpec("hf", "parquet", (str(tmp_path / "hf.parquet"),), (), "hf", "fp")
    assert [(i.key, i.data) for i in iter_raw_images(shard, fs)] == [("00000000", png)]


# ---------------------------------------------------------------------- storage
def test_retry_transient_errors_then_succeed_and_permanent_fail_fast():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    assert storage.retry(flaky, "flaky", base_delay_s=0.01) == "ok" and len(calls) == 3
    calls.clear()

    def missing():
        calls.append(1)
        raise FileNotFoundError("gone")

    with pytest.raises(FileNotFoundError):
        storage.retry(missing, "missing", base_delay_s=0.01)
    assert len(calls) == 1
    assert storage.is_transient(OSError("SlowDown: please reduce your request rate"))
    assert not storage.is_transient(PermissionError("AccessDenied"))


def test_local_writes_are_all_or_nothing(tmp_path, monkeypatch):
    import fsspec

    fs = fsspec.filesystem("file")
    target = str(tmp_path / "d" / "x.json")
    storage.put_bytes(fs, target, b"first")
    monkeypatch.setattr(storage.os, "replace", lambda a, b: (_ for _ in ()).throw(
        OSError("killed before the rename")))
    with pytest.raises(OSError, match="killed"):
        storage.put_bytes(fs, target, b"second, longer")
    assert (tmp_path / "d" / "x.json").read_bytes() == b"first"
    assert [p.name for p in (tmp_path / "d").iterdir() if p.suffix == ".json"] == ["x.json"]
