"""One rule for the timestamps the output's files carry."""

from __future__ import annotations

import calendar
import time

from schemas.times import COMPACT_FORMAT, TIMESTAMP_FORMAT, utc_compact, utc_timestamp


def test_timestamps_are_utc_iso_8601_in_whole_seconds():
    assert utc_timestamp(0) == "1970-01-01T00:00:00Z"
    assert utc_compact(86_399.9) == "19700101T235959Z"
    before = int(time.time())
    parsed = calendar.timegm(time.strptime(utc_timestamp(), TIMESTAMP_FORMAT))
    assert before <= parsed <= time.time()
    assert calendar.timegm(time.strptime(utc_compact(1e9), COMPACT_FORMAT)) == 1_000_000_000
