"""A labeling job with its weights at a URL: what the run records and how often it is copied.

The CLIP file is served over HTTP on loopback behind basic auth, with the credentials and a
signature in the URL as users pass them; two workers on the one node must copy it once into
the engine's one cache folder, and every record names the URL without its credentials, with
the file's sha256 (never the node-local copy).
"""

from __future__ import annotations

import base64
import json
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from support.images import encode, photo, write_vocabulary
from support.weights_files import (  # noqa: F401 - fixtures
    clip_file,
    clip_random,
    clip_state,
    dino_file,
    dino_random,
    dino_state,
    files,
    sha256,
)

from cass_engine.config import CassConfig
from pipeline.config import ComputeConfig, EngineSpec, IOConfig, JobConfig
from pipeline.runner import run_job
from schemas.uris import public_uri

USER, PASSWORD = "reader", "SECRET-password"


class _WeightsServer:
    """Serves files on 127.0.0.1 to requests with the right basic auth; counts the GETs."""

    def __init__(self, served: dict[str, Path]) -> None:
        self.gets: Counter[str] = Counter()
        expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                if self.headers.get("Authorization") != expected or path not in served:
                    self.send_error(401 if path in served else 404)
                    return
                server.gets[path] += 1
                self.send_response(200)
                self.send_header("Content-Length", str(served[path].stat().st_size))
                self.end_headers()
                with open(served[path], "rb") as f:
                    shutil.copyfileobj(f, self.wfile)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def clip_served(clip_file) -> Iterator[tuple[_WeightsServer, Path]]:
    path = clip_file("openai-state-dict")  # float16 like OpenAI's file
    server = _WeightsServer({"/weights/ViT-B-16.pt": path})
    yield server, path
    server.close()


@pytest.mark.slow
def test_job_records_the_weight_url_and_sha256_and_copies_once_per_node(
        ray_cpus, tmp_path, clip_served, dino_file):
    server, clip_path = clip_served
    url = (f"http://{USER}:{PASSWORD}@127.0.0.1:{server.port}/weights/ViT-B-16.pt"
           "?X-Amz-Signature=SECRET-signature")
    dino_path = dino_file("timm-wrapped-fp16")
    vocab = write_vocabulary(tmp_path / "vocab.txt", ["sky", "person"])
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(encode(photo("astronaut", 48)))
    config = CassConfig.from_preset("coco_stuff", vocabulary_path=str(vocab), short_side=64,
                                    slide_crop=None)
    cache = tmp_path / "cache"
    engine = EngineSpec(config, clip_weights=url, dino_weights=str(dino_path), cache_dir=str(cache))
    job = JobConfig(IOConfig(str(tmp_path / "in"), str(tmp_path / "out")),
                    ComputeConfig(actors=2, cpus_per_actor=1, batch_size=1), engine)
    summary = run_job(job, emit=lambda _: None)
    assert summary.status == "complete"

    text = (tmp_path / "out" / "run.json").read_text()
    record = json.loads(text)
    clip, dino = record["models"]["clip"], record["models"]["dino"]
    assert clip["source"] == public_uri(url) == (
        f"http://***@127.0.0.1:{server.port}/weights/ViT-B-16.pt")
    assert clip["sha256"] == sha256(clip_path) and clip["format"] == "openai-state-dict"
    assert dino["source"] == str(dino_path) and dino["sha256"] == sha256(dino_path)
    workers = record["resources"]["workers"]
    assert len(workers) == 2
    assert all(w["weights_info"]["clip"]["source"] == clip["source"] for w in workers)
    for path in (tmp_path / "out").rglob("*"):  # run.json, Parquet metadata, everything
        if path.is_file():
            data = path.read_bytes()
            assert b"SECRET" not in data and str(cache).encode() not in data, path

    assert server.gets == {"/weights/ViT-B-16.pt": 1}  # two workers, one copy
    staged = [p for p in (cache / "weights").iterdir() if not p.name.endswith(".lock")]
    assert [p.name.endswith("-ViT-B-16.pt") for p in staged] == [True]
    assert sha256(staged[0]) == clip["sha256"]
    assert sorted(p.name for p in cache.iterdir()) == ["text", "weights"]  # one cache root
