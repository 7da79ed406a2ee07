"""The fault-injection table of the README, computed from outputs' files (no run's own word).

:func:`audit_output` reads an output the way a downstream user would (``run.json``, the
completion records, the certified labels objects) and counts, against the images the input
holds, which are lost and which duplicated; :func:`fault_row` turns that into one table row.
With ``CASS_FAULT_TABLE=FILE`` set, the fault tests append their rows to FILE (JSON lines);
``python tests/support/fault_table.py FILE`` prints the Markdown table for the README.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Iterable, Mapping

import pyarrow.parquet as pq

from schemas.completion import check_output
from schemas.io import iter_label_rows, open_uri, read_run_record

COLUMNS = ("fault", "runs", "images", "lost", "duplicated", "outcome")


def audit_output(output_uri: str, storage_options: Mapping | None,
                 expected_ids: Iterable[str]) -> dict:
    """Check an output from its files alone.

    Returns:
        ``images`` (expected), ``lost`` and ``duplicated`` image ids (counts), ``unexpected``
        ids, ``problems`` (records that do not hold), ``uncertified`` labels objects (never
        read), ``records_match`` (every record's counts equal its object's rows, and their
        sums equal ``run.json``'s totals) and ``reader_ids_match`` (the public reader returns
        exactly the certified rows).
    """
    expected = set(expected_ids)
    fs, root = open_uri(output_uri, storage_options)
    record = read_run_record(output_uri, storage_options)
    check = check_output(fs, root, record.get("fingerprint"))
    seen: Counter = Counter()
    records_match = True
    for certified in check.certified.values():
        with fs.open(certified.path, "rb") as f:
            ids = pq.read_table(f, columns=["image_id"]).column("image_id").to_pylist()
        seen.update(ids)
        records_match &= len(ids) == int(certified.record["num_images"])
    totals = record.get("totals") or {}
    records_match &= totals.get("shards") == len(check.certified)
    records_match &= totals.get("images") == sum(
        int(c.record["num_images"]) for c in check.certified.values())
    reader = Counter() if check.problems else Counter(  # with problems the reader refuses
        r["image_id"] for r in iter_label_rows(output_uri, storage_options, columns=["image_id"]))
    return {
        "images": len(expected), "lost": len(expected - set(seen)),
        "duplicated": sum(n - 1 for n in seen.values() if n > 1),
        "unexpected": sorted(set(seen) - expected), "problems": dict(check.problems),
        "uncertified": list(check.uncertified), "records_match": bool(records_match),
        "reader_ids_match": reader == seen, "status": record.get("status"),
    }


def assert_exactly_once(audit: Mapping) -> None:
    """Every input image in the output exactly once, records consistent, nothing stray."""
    assert audit["lost"] == 0 and audit["duplicated"] == 0, audit
    assert not audit["unexpected"] and not audit["problems"], audit
    assert audit["records_match"] and audit["reader_ids_match"], audit


def fault_row(fault: str, runs: int, audit: Mapping, outcome: str) -> dict:
    """One row of the table; appended to ``$CASS_FAULT_TABLE`` when that is set."""
    row = {"fault": fault, "runs": runs, "images": audit["images"], "lost": audit["lost"],
           "duplicated": audit["duplicated"], "outcome": outcome}
    path = os.environ.get("CASS_FAULT_TABLE")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    return row


def markdown(rows: Iterable[Mapping]) -> str:
    """The rows as a Markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as table:
        print(markdown(json.loads(line) for line in table if line.strip()))
