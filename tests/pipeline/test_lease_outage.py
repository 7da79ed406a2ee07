"""A storage outage longer than the lease's time to live: the holder re-takes its own expired
lease when storage answers again, unless another run took it meanwhile."""

from __future__ import annotations

import threading

import pytest

from pipeline.lease import Lease, LeaseLost, check_holder, read_holder
from schemas.io import open_uri


@pytest.fixture
def outage(tmp_path, monkeypatch):
    """``(fs, root, down)``: a local output whose reads fail while ``down[0]`` is True."""
    fs, root = open_uri(str(tmp_path / "out"))
    real, down = fs.cat_file, [False]

    def cat_file(path, *args, **kwargs):
        if down[0]:
            raise OSError("storage unreachable")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(fs, "cat_file", cat_file)
    return fs, root, down


def test_own_expired_lease_is_retaken_when_storage_returns(outage):
    fs, root, down = outage
    now = [1_000.0]
    lease = Lease(fs, root, "run-a", "2026-01-01T00:00:00Z", ttl_s=10, clock=lambda: now[0])
    lease.acquire()
    down[0] = True
    now[0] += 5
    assert not lease.renew() and not lease.lost.is_set() and not lease.expired
    now[0] += 20  # the outage outlasts the time to live
    assert not lease.renew() and lease.expired
    assert not lease.lost.is_set()  # nobody else could take it: not lost yet
    down[0] = False
    assert lease.renew() and not lease.lost.is_set() and not lease.expired
    holder = read_holder(fs, root)
    assert holder.run_id == "run-a" and holder.expires_at == now[0] + 10
    check_holder(fs, root, "run-a", clock=lambda: now[0])
    lease.release()
    assert read_holder(fs, root) is None


def test_expired_lease_taken_by_another_run_during_the_outage_stays_lost(outage):
    fs, root, down = outage
    now = [1_000.0]  # an old clock: the lease is long expired for the other run
    lease = Lease(fs, root, "run-a", "2026-01-01T00:00:00Z", ttl_s=10, clock=lambda: now[0])
    lease.acquire()
    down[0] = True
    now[0] += 30
    assert not lease.renew() and not lease.lost.is_set()
    down[0] = False  # storage answers the other run first: it takes the expired lease over
    taker = Lease(fs, root, "run-b", "2026-01-01T01:00:00Z", ttl_s=60)
    taker.acquire()
    assert taker.took_over is not None and taker.took_over.run_id == "run-a"
    assert not lease.renew() and lease.lost.is_set()  # the conditional re-take fails
    assert not lease.renew()  # for good
    with pytest.raises(LeaseLost):
        check_holder(fs, root, "run-a")
    lease.release()  # a lost lease is not deleted
    assert read_holder(fs, root).run_id == "run-b"
    taker.release()


def test_an_expired_lease_certifies_nothing_until_its_holder_retakes_it(outage):
    fs, root, down = outage
    now = [1_000.0]
    clock = lambda: now[0]  # noqa: E731
    lease = Lease(fs, root, "run-a", "2026-01-01T00:00:00Z", ttl_s=10, clock=clock)
    lease.acquire()
    check_holder(fs, root, "run-a", clock=clock)
    now[0] += 30  # expired (the renewals could not reach storage): another run may take it
    with pytest.raises(LeaseLost, match="expired"):
        check_holder(fs, root, "run-a", clock=clock, wait_s=0.2)
    retake = threading.Timer(0.3, lease.renew)  # the holder's next renewal re-takes it
    retake.start()
    check_holder(fs, root, "run-a", clock=clock, wait_s=10)  # waited for it
    retake.join()
    assert not lease.lost.is_set()
    lease.release()


def test_a_renewal_that_landed_without_an_answer_does_not_lose_the_lease(tmp_path,
                                                                          monkeypatch):
    import pipeline.lease as lease_module

    fs, root = open_uri(str(tmp_path / "out"))
    now = [1_000.0]
    lease = Lease(fs, root, "run-a", "2026-01-01T00:00:00Z", ttl_s=120, clock=lambda: now[0])
    lease.acquire()
    real = lease_module.replace_object

    def lands_then_times_out(*args):
        real(*args)  # the write reaches storage...
        raise TimeoutError("read timed out")  # ...but its answer is lost

    monkeypatch.setattr(lease_module, "replace_object", lands_then_times_out)
    now[0] += 30
    assert not lease.renew() and not lease.lost.is_set()
    monkeypatch.setattr(lease_module, "replace_object", real)
    now[0] += 30
    assert lease.renew() and not lease.lost.is_set()  # its stale token is not another run
    assert read_holder(fs, root).expires_at == now[0] + 120
    other = Lease(fs, root, "run-b", "2026-01-01T00:01:00Z", ttl_s=120, clock=lambda: now[0])
    now[0] += 200  # expired: run-b takes it over, and run-a's next renewal is refused
    other.acquire()
    assert not lease.renew() and lease.lost.is_set()
