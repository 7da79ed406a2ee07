"""A labelled scene for the review tests (loose PNGs, a tar and a Parquet shard, one
failure), the review job run on it, its rows, and the one-line error check."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from jobs.review import main as review_main
from schemas.io import iter_label_rows
from support.audit_data import failed_row, ok_row, write_labels_output

CLASSES = [["background"], ["cat & dog", "pet"], ["sky <blue>"]]


def label_map(i: int, hw=(12, 16)) -> np.ndarray:
    """A label map of image ``i``: class 1 right of column ``2 + i``, class 2 top left."""
    labels = np.zeros(hw, np.int64)
    labels[:, 2 + i:] = 1
    labels[:4, :3] = 2
    return labels


def png_bytes(array: np.ndarray) -> bytes:
    """``array`` encoded as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def make_scene(tmp_path: Path) -> dict:
    """Six loose PNGs, one tar shard with two images, one Parquet shard with two, one failure."""
    rng = np.random.default_rng(0)
    photos = {f"img{i}": (rng.random((12, 16, 3)) * 255).astype(np.uint8) for i in range(10)}
    rows = []
    for i in range(6):
        path = tmp_path / f"img{i}.png"
        path.write_bytes(png_bytes(photos[f"img{i}"]))
        rows.append(ok_row(f"img{i}.png", label_map(i), 3, [0.2, 0.5, 0.3],
                           source_uri=str(path), scores=[0.9 - 0.1 * i, 0.8, 0.5]))
    rows.append(failed_row("broken.png"))
    tar_path = tmp_path / "shard.tar"
    with tarfile.open(tar_path, "w") as archive:
        for i in (6, 7):
            data = png_bytes(photos[f"img{i}"])
            info = tarfile.TarInfo(f"sub/img{i}.png")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    tar_rows = [ok_row(f"sub/img{i}", label_map(i), 3, [0.3, 0.4, 0.3], shard_id="t0",
                       source_uri=str(tar_path), scores=[0.05, 0.1, 0.2]) for i in (6, 7)]
    parquet_path = tmp_path / "shard.parquet"
    pq.write_table(pa.table({"image": [png_bytes(photos["img8"]), png_bytes(photos["img9"])]}),
                   parquet_path)
    pq_rows = [ok_row(f"{r:08d}", label_map(8 + r), 3, [0.3, 0.4, 0.3], shard_id="p0",
                      source_uri=str(parquet_path), scores=[0.1, 0.15, 0.2]) for r in (0, 1)]
    labels = tmp_path / "out"
    write_labels_output(str(labels), {"s0": rows, "t0": tar_rows, "p0": pq_rows}, CLASSES)
    return {"labels": str(labels), "photos": photos, "out": str(tmp_path / "review")}


def run_review(scene: dict, *extra: str) -> int:
    """jobs/review.py on the scene's labels, writing to its review folder."""
    return review_main(["--labels", scene["labels"], "--out", scene["out"], *extra])


def one_line_error(capsys, prefix: str) -> str:
    """The captured stderr, checked to be one line starting with ``prefix``."""
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(prefix), err
    return err


def scene_rows(scene: dict) -> list[dict]:
    """The label rows of a scene's output."""
    return list(iter_label_rows(scene["labels"]))
