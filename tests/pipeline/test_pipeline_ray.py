"""End-to-end pipeline on a real local Ray and a real S3 server (SeaweedFS), stub engine."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools.coco import COCO
from support.contract import stub_job
from support.images import edge_case_images, encode, photo, photos, tar_bytes, write_vocabulary

from cass_engine import CassConfig
from jobs import export_coco
from jobs import label as label_job
from pipeline.config import ComputeConfig, EngineSpec, IOConfig, JobConfig
from pipeline.decode import decode_image
from pipeline.plan import StartupError
from pipeline.runner import run_job
from pipeline.stub import StubOptions, stub_labels
from schemas import annotations_to_label_map
from schemas.io import (
    completed_shards,
    iter_label_rows,
    list_label_files,
    read_label_table,
    read_run_record,
)

NUM_CLASSES = 5


def _upload_webdataset(fs, prefix: str, num_shards: int, per_shard: int) -> dict[str, bytes]:
    """Tar shards of PNG photos (+ json side members); returns ``{image_id: bytes}``."""
    images = iter(photos(num_shards * per_shard, max_side=64))
    expected = {}
    for s in range(num_shards):
        members = {}
        for i in range(per_shard):
            data = encode(next(images))
            members[f"{s:02d}{i:03d}.png"] = data
            members[f"{s:02d}{i:03d}.json"] = b'{"caption": "x"}'
            expected[f"shard-{s:02d}/{s:02d}{i:03d}"] = data
        fs.pipe_file(f"{prefix}/shard-{s:02d}.tar", tar_bytes(members))
    return expected


def _rows(output_uri: str, server=None) -> list[dict]:
    options = server.storage_options if server else None
    return list(iter_label_rows(output_uri, options))


def _assert_labels_equal_stub(rows: list[dict], images: dict[str, bytes]) -> None:
    assert sorted(r["image_id"] for r in rows) == sorted(images)
    for row in rows:
        assert row["status"] == "ok", row["error"]
        expected = stub_labels(decode_image(images[row["image_id"]], 10**8).rgb, NUM_CLASSES)
        got = annotations_to_label_map(row["annotations"], row["height"], row["width"])
        np.testing.assert_array_equal(got, expected)


def test_end_to_end_s3_webdataset_to_s3_with_coco_export(ray_cpus, s3_server, vocab_file,
                                                         tmp_path):
    bucket = s3_server.new_bucket()
    fs = s3_server.filesystem()
    images = _upload_webdataset(fs, f"{bucket}/wds", num_shards=3, per_shard=4)
    lines: list[str] = []
    output = f"s3://{bucket}/labels"
    summary = run_job(stub_job(f"s3://{bucket}/wds", output, vocab_file, s3_server, actors=2),
                      emit=lines.append)
    assert summary.status == "complete" and summary.exit_code == 0
    rows = _rows(output, s3_server)
    _assert_labels_equal_stub(rows, images)
    assert completed_shards(output, s3_server.storage_options) == [
        "shard-00", "shard-01", "shard-02"]
    record = read_run_record(output, s3_server.storage_options)
    assert record["totals"]["images"] == 12 and record["failed_shards"] == []
    assert [c["name"] for c in record["categories"]] == ["sky", "tree", "person", "road",
                                                         "building"]
    assert record["engine_config"]["gamma"] == 0.2 and record["models"]["engine"] == "stub"
    assert len(record["resources"]["worker_peak_memory_bytes"]) == 2
    certified = list_label_files(output, s3_server.storage_options)
    assert [p.rsplit("/", 1)[-1] for p in certified] == [
        f"shard-0{i}.{record['run_id']}-0.parquet" for i in range(3)]
    _, meta = read_label_table(f"s3://{certified[1]}", storage_options=s3_server.storage_options)
    assert meta["vocabulary_hash"] == record["vocabulary_hash"]
    assert meta["categories"][2].synonyms == ("person", "man")
    text = json.dumps(record) + "\n".join(lines) + json.dumps(meta["run"])
    assert s3_server.secret not in text and s3_server.key not in text
    assert any(re.search(r"shards 3/3 .* img/s .* ETA", line) for line in lines)
    _check_coco_export(output, s3_server, tmp_path / "coco.json", rows)


def test_gcs_image_prefix_to_gcs_then_rerun_skips_everything(ray_cpus, gcs_server, vocab_file,
                                                            tmp_path):
    bucket = gcs_server.new_bucket()
    fs = gcs_server.filesystem()
    images = {}
    for i, array in enumerate(photos(5, 48)):
        images[f"im{i}.jpg" if i % 2 else f"im{i}.png"] = encode(array)
    for name, data in images.items():
        fs.pipe_file(f"{bucket}/photos/{name}", data)
    output = f"gs://{bucket}/labels"
    job = stub_job(f"gs://{bucket}/photos", output, vocab_file, gcs_server,
               io_options={"images_per_shard": 2})
    summary = run_job(job, emit=lambda _: None)
    assert summary.status == "complete" and summary.record["totals"]["images"] == 5
    assert any("ignores conditional writes" in action  # the emulator does; told, not hidden
               for action in summary.record["history"][-1]["actions"])
    rows = _rows(output, gcs_server)
    assert all(row["source_uri"].startswith(f"gs://{bucket}/photos/") for row in rows)
    _assert_labels_equal_stub(rows, {r["image_id"]: images[r["key"]] for r in rows})
    assert len(completed_shards(output, gcs_server.storage_options)) == 3
    again = run_job(job, emit=lambda _: None)
    assert again.status == "complete" and again.record["this_run"]["shards_skipped"] == 3
    assert again.record["totals"]["images"] == 5 and again.record["totals"]["shards"] == 3
    assert [h["status"] for h in again.record["history"]] == ["complete", "complete"]
    assert again.record["history"][-1]["images_labelled"] == 0
    _check_coco_export(output, gcs_server, tmp_path / "coco.json", rows)


def _check_coco_export(output: str, server, path: Path, rows: list[dict]) -> None:
    assert export_coco.main(["--labels", output, "--out", str(path), "--storage-options",
                             json.dumps(server.storage_options)]) == 0
    coco = COCO(str(path))
    by_name = {img["cass_image_id"]: img for img in coco.dataset["images"]}
    for row in rows:
        image = by_name[row["image_id"]]
        rebuilt = np.full((image["height"], image["width"]), -1)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]])):
            assert ann["iscrowd"] == 0
            rebuilt[coco.annToMask(ann).astype(bool)] = ann["category_id"] - 1
        expected = annotations_to_label_map(row["annotations"], row["height"], row["width"])
        np.testing.assert_array_equal(rebuilt, expected)


def test_parquet_shards_and_limit_then_full_rerun(ray_cpus, s3_server, vocab_file):
    bucket = s3_server.new_bucket()
    fs = s3_server.filesystem()
    images = {}
    for p, arrays in enumerate((photos(3, 56), photos(4, 48))):
        ids = [f"img{p}-{i}" for i in range(len(arrays))]
        blobs = [encode(a, "WEBP", lossless=True) for a in arrays]
        images.update({f"part-{p}/{k}": b for k, b in zip(ids, blobs, strict=True)})
        table = pa.table({"image": blobs, "id": ids, "caption": ["c"] * len(ids)})
        with fs.open(f"{bucket}/pq/part-{p}.parquet", "wb") as f:
            pq.write_table(table, f)
    output = f"s3://{bucket}/out"
    limited = run_job(stub_job(f"s3://{bucket}/pq", output, vocab_file, s3_server,
                           io_options={"id_column": "id", "limit": 5}), emit=lambda _: None)
    assert limited.status == "limited" and limited.record["totals"]["images"] == 5
    full = run_job(stub_job(f"s3://{bucket}/pq", output, vocab_file, s3_server,
                        io_options={"id_column": "id"}), emit=lambda _: None)
    assert full.status == "complete"
    assert full.record["this_run"]["shards_skipped"] == 1
    assert full.record["totals"]["images"] == 7 and full.record["this_run"]["images"] == 4
    _assert_labels_equal_stub(_rows(output, s3_server), images)


def test_limit_on_image_files_is_reported_limited_then_completed(ray_cpus, tmp_path,
                                                                 vocab_file):
    (tmp_path / "in").mkdir()
    for i, array in enumerate(photos(5, 40)):
        (tmp_path / "in" / f"im{i}.png").write_bytes(encode(array))
    job = stub_job(str(tmp_path / "in"), str(tmp_path / "out"), vocab_file,
               io_options={"images_per_shard": 2, "limit": 3}, actors=2)
    limited = run_job(job, emit=lambda _: None)
    assert limited.status == "limited" and limited.exit_code == 0
    assert limited.record["totals"]["images"] == 3
    assert sorted(r["key"] for r in _rows(str(tmp_path / "out"))) == ["im0.png", "im1.png",
                                                                      "im2.png"]
    full = run_job(dataclasses.replace(job, io=dataclasses.replace(job.io, limit=None)),
                   emit=lambda _: None)
    assert full.status == "complete" and full.record["this_run"]["shards_skipped"] == 1
    assert full.record["totals"]["images"] == 5
    keys = [r["key"] for r in _rows(str(tmp_path / "out"))]
    assert sorted(keys) == [f"im{i}.png" for i in range(5)]  # each exactly once


def test_resume_after_interruption_without_duplicates(ray_cpus, s3_server, vocab_file):
    bucket = s3_server.new_bucket()
    fs = s3_server.filesystem()
    images = {}
    for i, array in enumerate(photos(12, 40)):
        images[f"im{i:02d}.png"] = encode(array)
        fs.pipe_file(f"{bucket}/imgs/im{i:02d}.png", images[f"im{i:02d}.png"])
    output = f"s3://{bucket}/out"
    job = stub_job(f"s3://{bucket}/imgs", output, vocab_file, s3_server,
               StubOptions(seconds_per_image=0.15), io_options={"images_per_shard": 2},
               actors=1, shards_per_actor=1, progress_interval_s=0.05)

    def interrupt(line: str) -> None:
        match = re.search(r"shards (\d+)/", line)
        if match and int(match.group(1)) >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_job(job, emit=interrupt)
    record = read_run_record(output, s3_server.storage_options)
    done = completed_shards(output, s3_server.storage_options)
    assert record["status"] == "interrupted" and 2 <= len(done) < 6
    fs.rm(f"{bucket}/out/_done/{done[0]}.json")  # killed between table and record
    summary = run_job(job, emit=lambda _: None)
    assert summary.status == "complete"
    assert summary.record["this_run"]["shards_skipped"] == len(done) - 1
    assert summary.record["totals"]["images"] == 12 and summary.record["totals"]["shards"] == 6
    rows = _rows(output, s3_server)
    keyed = {r["image_id"]: images[r["key"]] for r in rows}
    assert len(rows) == len(keyed) == 12
    _assert_labels_equal_stub(rows, keyed)
    assert len(completed_shards(output, s3_server.storage_options)) == 6


def test_killed_actor_mid_run_is_replaced_and_its_shards_retried(ray_cpus, tmp_path,
                                                                 vocab_file):
    images = {}
    (tmp_path / "in").mkdir()
    for i, array in enumerate(photos(12, 40)):
        images[f"im{i:02d}.png"] = encode(array)
        (tmp_path / "in" / f"im{i:02d}.png").write_bytes(images[f"im{i:02d}.png"])
    stub = StubOptions(die_after_images=3, marker_dir=str(tmp_path))
    summary = run_job(stub_job(str(tmp_path / "in"), str(tmp_path / "out"), vocab_file, stub=stub,
                           io_options={"images_per_shard": 3}, actors=2),
                      emit=lambda _: None)
    assert (tmp_path / "stub-died").exists()
    assert summary.status == "complete" and summary.record["this_run"]["retries"] >= 1
    assert summary.record["resources"]["worker_replacements"] == 1
    rows = _rows(str(tmp_path / "out"))
    _assert_labels_equal_stub(rows, {r["image_id"]: images[r["key"]] for r in rows})
    assert len(rows) == 12


def test_changed_weights_are_refused_even_after_a_failed_start(ray_cpus, tmp_path, vocab_file):
    (tmp_path / "in").mkdir()
    for i, array in enumerate(photos(3, 40)):
        (tmp_path / "in" / f"im{i}.png").write_bytes(encode(array))
    job = stub_job(str(tmp_path / "in"), str(tmp_path / "out"), vocab_file,
               io_options={"images_per_shard": 2})
    assert run_job(job, emit=lambda _: None).status == "complete"
    record_path = tmp_path / "out" / "run.json"
    record = json.loads(record_path.read_text())
    assert len(record["models"]["sha256"]) == 64
    record["models"]["sha256"] = "0" * 64  # as if the output was made with other weights
    record_path.write_text(json.dumps(record))
    (tmp_path / "out" / "_done" / "images-000001.json").unlink()  # leave work to do
    for _ in range(2):  # the refusal must survive its own failed run record
        with pytest.raises(StartupError, match=r"model weights differ .*sha256"):
            run_job(job, emit=lambda _: None)
        after = json.loads(record_path.read_text())
        assert after["status"] == "failed" and after["models"]["sha256"] == "0" * 64
    overwrite = dataclasses.replace(job, io=dataclasses.replace(job.io, overwrite=True))
    assert run_job(overwrite, emit=lambda _: None).status == "complete"


def test_workers_that_do_not_start_in_time_fail_the_start(ray_cpus, tmp_path, vocab_file):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(encode(photo("coffee", 40)))
    job = stub_job(str(tmp_path / "in"), str(tmp_path / "out"), vocab_file,
               stub=StubOptions(startup_seconds=30.0), startup_timeout_s=2.0)
    with pytest.raises(StartupError, match=r"did not start within 2 s \(--startup-timeout\)"):
        run_job(job, emit=lambda _: None)
    assert json.loads((tmp_path / "out" / "run.json").read_text())["status"] == "failed"


def test_stalled_shard_restarts_its_worker_and_is_reported(ray_cpus, tmp_path, vocab_file):
    (tmp_path / "in").mkdir()
    images = {}
    for i, array in enumerate(photos(12, 40)):
        if i == 4:  # the stub engine blocks forever on this image, like a hung GPU call
            array = np.full((66, 40, 3), 128, dtype=np.uint8)
        images[f"im{i:02d}.png"] = encode(array)
        (tmp_path / "in" / f"im{i:02d}.png").write_bytes(images[f"im{i:02d}.png"])
    job = stub_job(str(tmp_path / "in"), str(tmp_path / "out"), vocab_file,
               stub=StubOptions(hang_on_height=66), io_options={"images_per_shard": 3},
               actors=2, max_attempts=2, stall_timeout_s=3.0)
    summary = run_job(job, emit=lambda _: None)
    assert summary.status == "incomplete" and summary.exit_code == 3
    failed = summary.record["failed_shards"]
    assert len(failed) == 1 and failed[0]["attempts"] == 2
    assert all(reason.startswith("stalled: nothing finished for")
               for reason in failed[0]["reasons"]), failed[0]["reasons"]
    assert summary.record["resources"]["worker_replacements"] >= 2
    rows = _rows(str(tmp_path / "out"))
    assert sorted(r["key"] for r in rows) == sorted(set(images) - {"im03.png", "im04.png",
                                                                   "im05.png"})
    _assert_labels_equal_stub(rows, {r["image_id"]: images[r["key"]] for r in rows})
    assert len(completed_shards(str(tmp_path / "out"))) == 3


def test_slow_shard_that_keeps_finishing_images_is_not_stalled(ray_cpus, tmp_path, vocab_file):
    (tmp_path / "in").mkdir()
    for i, array in enumerate(photos(12, 40)):
        (tmp_path / "in" / f"im{i:02d}.png").write_bytes(encode(array))
    job = stub_job(str(tmp_path / "in"), str(tmp_path / "out"), vocab_file,
               stub=StubOptions(seconds_per_image=0.4), actors=1, stall_timeout_s=2.0)
    summary = run_job(job, emit=lambda _: None)  # one shard of 12 images: ~5 s > 2 s
    assert summary.status == "complete", summary.record["failed_shards"]
    assert summary.record["this_run"]["retries"] == 0
    assert summary.record["resources"]["worker_replacements"] == 0
    assert len(_rows(str(tmp_path / "out"))) == 12


def test_bad_inputs_are_error_rows_and_a_poison_shard_is_reported(ray_cpus, s3_server,
                                                                  vocab_file):
    bucket = s3_server.new_bucket()
    fs = s3_server.filesystem()
    cases = edge_case_images()
    fs.pipe_file(f"{bucket}/in/a-bad-images.tar", tar_bytes({k: v for k, (v, _) in cases.items()}))
    good = tar_bytes({"g0.png": encode(photo("coffee", 40)), "g1.png": encode(photo("coins", 40))})
    fs.pipe_file(f"{bucket}/in/b-truncated.tar", good[: len(good) // 2 + 100])
    fs.pipe_file(f"{bucket}/in/c-not-a-tar.tar", b"definitely not a tar archive" * 50)
    poison = np.zeros((77, 40, 3), dtype=np.uint8)
    fs.pipe_file(f"{bucket}/in/d-poison.tar", tar_bytes({"p.png": encode(poison)}))
    output = f"s3://{bucket}/out"
    job = stub_job(f"s3://{bucket}/in", output, vocab_file, s3_server,
               StubOptions(die_on_height=77), actors=2, max_attempts=2)
    summary = run_job(job, emit=lambda _: None)
    assert summary.status == "incomplete" and summary.exit_code == 3
    failed = summary.record["failed_shards"]
    assert [f["shard_id"] for f in failed] == ["d-poison"]
    assert failed[0]["attempts"] == 2 and "died" in failed[0]["reasons"][0]
    rows = {r["image_id"]: r for r in _rows(output, s3_server)}
    for name, (_, status) in cases.items():
        assert rows[f"a-bad-images/{name.rsplit('.', 1)[0]}"]["status"] == status
    assert rows["b-truncated/b-truncated.tar"]["status"] == "decode_error"
    assert rows["c-not-a-tar/c-not-a-tar.tar"]["status"] == "decode_error"
    assert completed_shards(output, s3_server.storage_options) == [
        "a-bad-images", "b-truncated", "c-not-a-tar"]


def test_cli_fails_fast_and_refuses_mixing(ray_cpus, s3_server, tmp_path, vocab_file,
                                           capsys):
    bucket = s3_server.new_bucket()
    s3_server.filesystem().pipe_file(f"{bucket}/in/a.png", encode(photo("camera", 40)))
    options = json.dumps(s3_server.storage_options)
    base = ["--engine", "stub", "--storage-options", options, "--vocab", str(vocab_file)]
    out = ["--output", f"s3://{bucket}/out"]
    assert label_job.main(base + out + ["--input", f"s3://{bucket}/missing/"]) == 2
    assert "does not exist" in capsys.readouterr().err
    wrong = json.dumps({**s3_server.storage_options, "secret": "wrong-secret-123"})
    argv = ["--engine", "stub", "--vocab", str(vocab_file), "--input", f"s3://{bucket}/in"]
    assert label_job.main(argv + out + ["--storage-options", wrong]) == 2
    err = capsys.readouterr().err
    assert "access denied" in err and "wrong-secret-123" not in err
    assert label_job.main(base + out + ["--input", f"s3://{bucket}/in",
                                        "--vocab", str(tmp_path / "nope.txt")]) == 2
    assert "vocabulary" in capsys.readouterr().err
    assert label_job.main(base + out + ["--input", f"s3://{bucket}/in"]) == 0
    other = write_vocabulary(tmp_path / "other.txt", ["cat", "dog", "grass"])
    again = base + out + ["--input", f"s3://{bucket}/in", "--vocab", str(other)]
    assert label_job.main(again) == 2
    assert "refusing" in capsys.readouterr().err
    assert label_job.main(again + ["--overwrite"]) == 0
    rows = _rows(f"s3://{bucket}/out", s3_server)
    assert len(rows) == 1 and len(rows[0]["presence"]) == 3


def test_engine_that_cannot_start_fails_the_run_with_a_clear_message(ray_cpus, tmp_path,
                                                                      vocab_file):
    from pipeline.plan import StartupError

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(encode(photo("coins", 32)))
    config = CassConfig.from_preset("coco_stuff", vocabulary_path=str(vocab_file))
    engine = EngineSpec(config, clip_weights=str(tmp_path / "missing-clip.pt"),
                        dino_weights=str(tmp_path / "missing-dino.pth"))
    job = JobConfig(IOConfig(str(tmp_path / "in"), str(tmp_path / "out")), ComputeConfig(),
                    engine)
    with pytest.raises(StartupError, match="engine failed to start.*missing-clip"):
        run_job(job, emit=lambda _: None)
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["status"] == "failed" and "missing-clip" in record["error"]
