"""How a run ends: exit codes, the final run record (cumulative totals from the completion
records, the history entry), the end-of-run cleanup, and the placement check of local outputs.

Exit codes: 0 complete or limited, 2 bad configuration/input/output (or the output held by
another run), 3 incomplete, 130 interrupted (SIGINT), 143 terminated (SIGTERM).
"""

from __future__ import annotations

from dataclasses import dataclass

import ray

from schemas.completion import check_output
from schemas.times import utc_timestamp
from schemas.uris import public_uri

from .lease import LeaseLost, check_holder
from .memory import peak_rss_bytes
from .plan import JobPlan, StartupError
from .progress import Progress
from .record import is_termination, output_totals
from .storage import is_local, remove_object, retry

EXIT_OK = 0
EXIT_BAD_CONFIG = 2
EXIT_INCOMPLETE = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


@dataclass
class RunSummary:
    """Outcome of a run: ``complete``, ``limited``, ``incomplete`` or ``interrupted``."""

    status: str
    exit_code: int
    record: dict


def abandon(plan: JobPlan | None, status: str, exit_code: int, error: str | None = None) -> None:
    """End a plan that did not (or not completely) run: record ``status`` if the run record
    still says ``running``, and release the output's lease. Idempotent."""
    if plan is None:
        return
    try:
        if plan.record.get("status") == "running":
            if error is not None:
                plan.record["error"] = error
            resources = {"driver_peak_memory_bytes": peak_rss_bytes()}
            end_record(plan, status, exit_code, resources)
    finally:
        plan.release()


def exit_code_of(exc: BaseException) -> int:
    """The exit code of an interrupted run: 143 after SIGTERM, 130 after SIGINT."""
    return EXIT_TERMINATED if is_termination(exc) else EXIT_INTERRUPTED


def live_node_count() -> int:
    """Nodes of the current Ray cluster that are alive."""
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def check_output_placement(plan: JobPlan) -> None:
    """Refuse a local output path on a multi-node cluster (each node has its own disk)
    unless the user vouches that it is shared storage (``--output-is-shared``).

    Raises:
        StartupError: local output, several live nodes, not vouched for.
    """
    if not is_local(plan.out_fs) or plan.job.policy.output_is_shared:
        return
    nodes = live_node_count()
    if nodes > 1:
        raise StartupError(
            f"the output {plan.job.io.output_uri} is a local path and the cluster has "
            f"{nodes} nodes: each node would write to its own disk. Use an object store "
            "URI (s3://, gs://), or pass --output-is-shared if the path is the same shared "
            "file system on every node")


def finish(plan: JobPlan, progress: Progress, failed: list[dict], resources: dict,
            unscheduled: int, status: str | None = None,
            exit_code: int | None = None) -> RunSummary:
    limited = unscheduled or progress.truncated
    status = status or ("incomplete" if failed else "limited" if limited else "complete")
    totals = _output_totals(plan)
    lost = plan.lease is not None and plan.lease.lost.is_set()
    if lost and status != "interrupted":
        status = "incomplete"
    not_holding = totals.get("shards_not_holding") or []
    if not_holding and status in ("complete", "limited"):
        status = "incomplete"  # a certified table went missing or changed during the run
    code = {"incomplete": EXIT_INCOMPLETE, "interrupted": EXIT_INTERRUPTED}.get(status, EXIT_OK)
    code = exit_code if exit_code is not None else code
    plan.record.update(failed_shards=failed, unscheduled_shards=unscheduled,
                       this_run=progress.totals())
    saved = end_record(plan, status, code, resources, totals)
    progress.set_live({})
    progress.maybe_report(force=True)
    progress.emit(progress.summary(status, public_uri(plan.job.io.output_uri)))
    for shard in failed:
        progress.emit(f"[cass-label] failed shard {shard['shard_id']}: {shard['reasons'][-1]}")
    if not_holding:
        progress.emit(f"[cass-label] {len(not_holding)} completed shard(s) no longer hold "
                      f"(table missing or changed): {', '.join(not_holding[:5])}; rerun the "
                      "same command to relabel them")
    if not saved:
        progress.emit("[cass-label] this run lost the output's lease to another run: its "
                      "run record was not written and its unfinished shards are not in the "
                      "output")
    return RunSummary(status, code, plan.record)


def end_record(plan: JobPlan, status: str, exit_code: int, resources: dict,
               totals: dict | None = None) -> bool:
    """Final totals (from the completion records, after removing labels objects that no
    record names; ``totals`` when already computed), history entry and run record; False
    when the lease was lost (nothing written)."""
    record = plan.record
    record.update(status=status, ended_at=utc_timestamp(), resources=resources)
    record["totals"] = totals if totals is not None else _output_totals(plan)
    entry = record["history"][-1]
    this_run = record.get("this_run") or {}
    entry.update(status=status, ended_at=record["ended_at"], exit_code=exit_code,
                 shards_labelled=this_run.get("shards_labelled", 0),
                 shards_skipped=len(plan.skipped), images_labelled=this_run.get("images", 0),
                 shards_failed=len(record.get("failed_shards") or []),
                 retries=this_run.get("retries", 0))
    return plan.save_record()


def _output_totals(plan: JobPlan) -> dict:
    """What the output holds now, from its completion records; uncertified labels objects
    (attempts that lost, late writes) are removed while this run holds the lease."""
    if plan.lease is not None and plan.lease.lost.is_set():
        return plan.record.get("totals") or {}
    try:
        check = retry(lambda: check_output(plan.out_fs, plan.out_root, plan.fingerprint),
                      "read the completion records")
        if check.uncertified and plan.lease is not None:  # the flag may be a renewal old
            check_holder(plan.out_fs, plan.out_root, plan.run_id)
        for path in check.uncertified:
            remove_object(plan.out_fs, path)
    except LeaseLost:
        plan.lease.lost.set()
        return plan.record.get("totals") or {}
    except OSError as exc:
        return {"error": f"could not read the completion records: {type(exc).__name__}"}
    totals = output_totals((c.record for c in check.certified.values()), len(plan.shards))
    totals["shards_not_holding"] = sorted(check.problems)
    return totals

