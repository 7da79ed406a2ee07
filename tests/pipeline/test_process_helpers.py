"""The pipeline's shared process helpers: run ids and peak memory."""

from __future__ import annotations

import re

import psutil

from pipeline.memory import peak_rss_bytes
from pipeline.plan import new_run_id


def test_run_ids_are_sortable_utc_times_and_unique():
    ids = {new_run_id() for _ in range(20)}
    assert len(ids) == 20
    assert all(re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", i) for i in ids)


def test_peak_memory_is_in_bytes():
    ballast = bytearray(64 * 2**20)  # touched: resident
    ballast[::4096] = b"x" * len(ballast[::4096])
    rss = psutil.Process().memory_info().rss
    # the kernel updates its high-water mark lazily: within 10 %; KiB taken for bytes: 1/1024
    assert 0.9 * rss <= peak_rss_bytes() < 64 * rss
    del ballast
