"""The tenant ledger's arithmetic and its SQLite file (no Ray): windows, refusals, settling, restarts, races."""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import random
import sqlite3
import time

import pytest

from frugalray.config import ConfigError
from frugalray.serve.tenant_ledger import Refusal, Reservation, TenantLedger
from frugalray.serve.tenants import TenantBudget


@pytest.fixture
def ledger(tmp_path):
    with TenantLedger(tmp_path / "tenants.sqlite") as led:
        yield led


def test_spend_leaves_the_window_exactly_window_s_after_it_was_reserved(ledger):
    budget = TenantBudget(flops=100.0, window_s=3600)
    assert isinstance(ledger.reserve("acme", 100.0, 0, budget, now=0.0, holder="r1"), Reservation)
    assert isinstance(ledger.reserve("acme", 1.0, 0, budget, now=3599.0, holder="r1"), Refusal)
    assert ledger.spent("acme", now=3599.9, window_s=3600) == (100.0, 0)
    # Window (now - window_s, now]: the entry at ts=0 is out at now=3600.
    assert ledger.spent("acme", now=3600.0, window_s=3600) == (0.0, 0)
    granted = ledger.reserve("acme", 100.0, 0, budget, now=3600.0, holder="r1")
    assert isinstance(granted, Reservation) and granted.remaining_flops == 0.0


def test_retry_after_waits_for_just_enough_old_spend_to_leave(ledger):
    budget = TenantBudget(flops=100.0, window_s=60)
    for t, f in [(0.0, 30.0), (10.0, 30.0), (20.0, 30.0)]:
        assert isinstance(ledger.reserve("acme", f, 0, budget, now=t, holder="r1"), Reservation)
    refused = ledger.reserve("acme", 50.0, 0, budget, now=30.0, holder="r1")
    # 90 spent, 50 needed: the entry at 0 leaving (t=60) frees 30 -> 60 + 50 > 100; the one at 10 (t=70) -> fits.
    assert isinstance(refused, Refusal) and not refused.never_fits
    assert refused.retry_after_s == 40.0 and refused.dimension == "flops" and refused.short == ("flops",)
    assert refused.remaining_flops == 10.0 and refused.remaining_tokens is None and refused.window_s == 60
    assert isinstance(ledger.reserve("acme", 50.0, 0, budget, now=69.999, holder="r1"), Refusal)
    assert isinstance(ledger.reserve("acme", 50.0, 0, budget, now=70.0, holder="r1"), Reservation)


def test_retry_after_is_exact_at_awkward_float_times(tmp_path):
    rng = random.Random(7)
    for case in range(25):
        budget = TenantBudget(flops=rng.uniform(50, 150), completion_tokens=rng.randint(20, 60),
                              window_s=rng.uniform(1.0, 5000.0))
        with TenantLedger(tmp_path / f"case{case}.sqlite") as led:
            t = rng.uniform(0, 1e6)
            for _ in range(rng.randint(1, 12)):
                led.reserve("acme", rng.uniform(0, budget.flops / 3), rng.randint(0, 10), budget, now=t, holder="r")
                t += rng.uniform(0, budget.window_s / 10)
            need = (rng.uniform(1, budget.flops), rng.randint(1, budget.completion_tokens))
            refused = led.reserve("acme", *need, budget, now=t, holder="r")
            if isinstance(refused, Reservation):
                continue
            later = t + refused.retry_after_s
            just_before = math.nextafter(later, -math.inf)
            assert isinstance(led.reserve("acme", *need, budget, now=just_before, holder="r"), Refusal), case
            assert isinstance(led.reserve("acme", *need, budget, now=later, holder="r"), Reservation), case


def test_retry_after_rounds_up_when_float_subtraction_would_keep_the_entry_in(ledger):
    # Here ts + window - now, added back to now, lands one ulp short of taking ts out of the window.
    now, window, ts = 598164.198713661, 4408.43300242041, 594507.7507023028
    assert (now + (ts + window - now)) - window < ts
    budget = TenantBudget(flops=10.0, window_s=window)
    ledger.reserve("acme", 10.0, 0, budget, now=ts, holder="r1")
    refused = ledger.reserve("acme", 10.0, 0, budget, now=now, holder="r1")
    assert refused.retry_after_s > ts + window - now
    assert isinstance(ledger.reserve("acme", 10.0, 0, budget, now=now + refused.retry_after_s, holder="r1"),
                      Reservation)


def test_both_limits_hold_and_retry_waits_for_the_later_one(ledger):
    budget = TenantBudget(flops=100.0, completion_tokens=10, window_s=100)
    ledger.reserve("acme", 10.0, 8, budget, now=0.0, holder="r1")  # most of the tokens, few FLOPs
    ledger.reserve("acme", 80.0, 1, budget, now=50.0, holder="r1")  # most of the FLOPs, one token
    tokens_short = ledger.reserve("acme", 5.0, 5, budget, now=60.0, holder="r1")
    assert tokens_short.dimension == "completion_tokens" and tokens_short.short == ("completion_tokens",)
    assert tokens_short.retry_after_s == 40.0  # the 8 tokens at ts=0 leave at t=100
    assert (tokens_short.remaining_flops, tokens_short.remaining_tokens) == (10.0, 1)
    both = ledger.reserve("acme", 50.0, 5, budget, now=60.0, holder="r1")
    # Tokens fit once ts=0 leaves (t=100), FLOPs only once ts=50 leaves (t=150): the later one decides.
    assert both.short == ("flops", "completion_tokens") and both.dimension == "flops"
    assert both.retry_after_s == 90.0
    assert isinstance(ledger.reserve("acme", 5.0, 1, budget, now=60.0, holder="r1"), Reservation)


def test_a_worst_case_above_the_whole_budget_never_fits(ledger):
    budget = TenantBudget(completion_tokens=100)
    refused = ledger.reserve("acme", 1e30, 101, budget, now=0.0, holder="r1")
    assert refused.never_fits and refused.retry_after_s is None and refused.dimension == "completion_tokens"
    assert refused.remaining_tokens == 100 and refused.remaining_flops is None
    assert ledger.spent("acme", now=0.0, window_s=3600) == (0.0, 0)  # a refusal records nothing


def test_unlimited_tenant_is_always_granted_and_its_spend_recorded(ledger):
    for i in range(5):
        granted = ledger.reserve("free", 1e20, 10_000, None, now=float(i), holder="r1")
        assert isinstance(granted, Reservation)
        assert granted.remaining_flops is None and granted.remaining_tokens is None
    assert ledger.spent("free", now=5.0, window_s=3600) == (5e20, 50_000)
    assert ledger.remaining("free", None, now=5.0) == (None, None)


def test_tenants_do_not_share_balances(ledger):
    budget = TenantBudget(flops=10.0)
    assert isinstance(ledger.reserve("a", 10.0, 0, budget, now=0.0, holder="r1"), Reservation)
    assert isinstance(ledger.reserve("b", 10.0, 0, budget, now=0.0, holder="r1"), Reservation)
    assert isinstance(ledger.reserve("a", 1.0, 0, budget, now=0.0, holder="r1"), Refusal)


def test_settle_charges_the_actual_and_frees_the_rest(ledger):
    budget = TenantBudget(flops=100.0, completion_tokens=100)
    held = ledger.reserve("acme", 80.0, 80, budget, now=0.0, holder="r1")
    assert isinstance(ledger.reserve("acme", 50.0, 10, budget, now=1.0, holder="r1"), Refusal)
    assert ledger.settle(held.id, 30.0, 12, now=2.0) is True
    assert ledger.spent("acme", now=2.0, window_s=3600) == (30.0, 12)
    assert ledger.remaining("acme", budget, now=2.0) == (70.0, 88)
    assert isinstance(ledger.reserve("acme", 50.0, 10, budget, now=3.0, holder="r1"), Reservation)


def test_settling_above_the_reservation_is_charged_and_warned(ledger, caplog):
    budget = TenantBudget(flops=100.0, completion_tokens=100)
    held = ledger.reserve("acme", 40.0, 10, budget, now=0.0, holder="r1")
    other = ledger.reserve("acme", 40.0, 10, budget, now=0.0, holder="r1")
    with caplog.at_level(logging.WARNING, logger="frugalray.serve.tenant_ledger"):
        assert ledger.settle(held.id, 75.0, 11, now=1.0)
    assert "more than the" in caplog.text and "undercounts" in caplog.text
    ledger.settle(other.id, 40.0, 10, now=1.0)
    assert ledger.spent("acme", now=1.0, window_s=3600) == (115.0, 21)  # the books add up past the budget
    assert ledger.remaining("acme", budget, now=1.0) == (0.0, 79)  # reported remaining is clamped at 0
    refused = ledger.reserve("acme", 0.0, 0, budget, now=2.0, holder="r1")
    assert isinstance(refused, Refusal) and refused.retry_after_s == pytest.approx(3598.0)


def test_settle_twice_is_a_noop_and_bad_settles_are_refused(ledger, caplog):
    budget = TenantBudget(flops=100.0)
    held = ledger.reserve("acme", 50.0, 5, budget, now=0.0, holder="r1")
    assert ledger.settle(held.id, -3.0, -1, now=1.0) is True  # negative counts as 0
    assert ledger.spent("acme", now=1.0, window_s=3600) == (0.0, 0)
    with caplog.at_level(logging.WARNING, logger="frugalray.serve.tenant_ledger"):
        assert ledger.settle(held.id, 50.0, 5, now=2.0) is False
    assert "already settled" in caplog.text
    assert ledger.spent("acme", now=2.0, window_s=3600) == (0.0, 0)
    with pytest.raises(KeyError, match="no reservation 999"):
        ledger.settle(999, 1.0, 1, now=2.0)
    fresh = ledger.reserve("acme", 50.0, 5, budget, now=3.0, holder="r1")
    with pytest.raises(ValueError, match="flops must be a finite"):
        ledger.settle(fresh.id, math.nan, 1, now=4.0)
    with pytest.raises(TypeError, match="completion_tokens must be an int"):
        ledger.settle(fresh.id, 1.0, 1.5, now=4.0)
    assert ledger.spent("acme", now=4.0, window_s=3600) == (50.0, 5)  # still held at its worst case


def test_reserve_refuses_bad_amounts(ledger):
    for flops, tokens in [(-1.0, 0), (math.inf, 0), (math.nan, 0), (1.0, -1), (1.0, 2.5), (1.0, True)]:
        with pytest.raises(ValueError):
            ledger.reserve("acme", flops, tokens, None, now=0.0, holder="r1")
    with pytest.raises(ValueError, match="tenant"):
        ledger.reserve("", 1.0, 1, None, now=0.0, holder="r1")


def test_stale_reservations_are_charged_in_full_and_returned(ledger):
    budget = TenantBudget(flops=1000.0, completion_tokens=1000)
    dead = ledger.reserve("acme", 100.0, 50, budget, now=0.0, holder="replica-a")
    done = ledger.reserve("acme", 100.0, 50, budget, now=0.0, holder="replica-a")
    young = ledger.reserve("acme", 100.0, 50, budget, now=250.0, holder="replica-b")
    ledger.settle(done.id, 10.0, 5, now=5.0)
    expired = ledger.expire_stale(older_than_s=300.0, now=400.0)
    assert [(r.id, r.holder, r.flops, r.completion_tokens) for r in expired] == [(dead.id, "replica-a", 100.0, 50)]
    assert ledger.spent("acme", now=400.0, window_s=3600) == (210.0, 105)  # 100 + 10 + 100 pending
    assert ledger.settle(dead.id, 1.0, 1, now=401.0) is False  # expired is final: the safe side stands
    assert ledger.spent("acme", now=401.0, window_s=3600) == (210.0, 105)
    assert ledger.expire_stale(older_than_s=300.0, now=400.0) == []  # each is expired once
    assert ledger.settle(young.id, 20.0, 10, now=402.0) is True
    with pytest.raises(ValueError, match="older_than_s"):
        ledger.expire_stale(older_than_s=0, now=400.0)


def test_reopening_the_file_keeps_balances_and_open_reservations(tmp_path):
    path = tmp_path / "tenants.sqlite"
    budget = TenantBudget(flops=100.0, completion_tokens=10)
    with TenantLedger(path) as first:
        settled = first.reserve("acme", 40.0, 4, budget, now=0.0, holder="r1")
        first.settle(settled.id, 25.0, 2, now=1.0)
        pending = first.reserve("acme", 50.0, 5, budget, now=2.0, holder="r1")
    with TenantLedger(path) as second:  # a restarted replica
        assert second.spent("acme", now=3.0, window_s=3600) == (75.0, 7)
        assert isinstance(second.reserve("acme", 30.0, 1, budget, now=3.0, holder="r2"), Refusal)
        assert second.settle(pending.id, 5.0, 1, now=4.0) is True
        assert second.remaining("acme", budget, now=4.0) == (70.0, 7)
        again = second.reserve("acme", 1.0, 1, budget, now=5.0, holder="r2")
    assert again.id > pending.id  # ids keep counting across restarts


def test_prune_deletes_only_old_closed_entries(ledger):
    old = ledger.reserve("acme", 1.0, 1, None, now=0.0, holder="r1")
    ledger.settle(old.id, 1.0, 1, now=1.0)
    ledger.reserve("acme", 2.0, 2, None, now=0.0, holder="r1")  # pending: kept for expire_stale
    ledger.reserve("acme", 4.0, 4, None, now=900.0, holder="r1")
    assert ledger.prune(older_than_s=500.0, now=1000.0) == 1
    assert ledger.spent("acme", now=1000.0, window_s=10_000) == (6.0, 6)
    with pytest.raises(KeyError):
        ledger.settle(old.id, 1.0, 1, now=1000.0)


TENANTS = [f"t{k}" for k in range(16)]  # 16 balances run out at about the same moment: 16 chances to race


def _race(path, start, results, n, budget_flops):
    budget = TenantBudget(flops=budget_flops)
    granted = []
    with TenantLedger(path) as led:
        start.wait()
        for i in range(n):
            for tenant in TENANTS:
                got = led.reserve(tenant, 1.0, 1, budget, now=100.0 + i * 1e-3, holder=f"pid{os.getpid()}")
                if isinstance(got, Reservation):
                    granted.append((tenant, got.id))
                time.sleep(0.0002)  # as requests arrive: SQLite's busy wait backs off, so a spinning writer starves it
    results.put(granted)


def test_two_processes_never_reserve_past_the_balance(tmp_path):
    # 2 processes x 50 reservations of 1 FLOP per tenant, racing for balances of 40.
    path = tmp_path / "tenants.sqlite"
    TenantLedger(path).close()  # created once, as deploy() will
    ctx = mp.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(path, start, results, 50, 40.0)) for _ in range(2)]
    for p in procs:
        p.start()
    start.set()
    granted = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    both = granted[0] + granted[1]
    assert len({rid for _, rid in both}) == len(both)
    assert min(len(g) for g in granted) > 0  # both really took part
    with TenantLedger(path) as led:
        for tenant in TENANTS:
            assert sum(1 for t, _ in both if t == tenant) == 40, tenant
            assert led.spent(tenant, now=200.0, window_s=3600) == (40.0, 40), tenant


def test_bad_ledger_paths_are_refused_naming_ledger_path(tmp_path):
    bad = [
        (tmp_path / "missing" / "tenants.sqlite", "does not exist"),
        (tmp_path, "is a directory"),
        (":memory:", "not a file path"),
        ("", "not a file path"),
    ]
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database, not even close" * 100)
    bad.append((junk, "cannot use"))
    if os.path.isdir("/proc"):
        bad.append(("/proc/tenants.sqlite", "cannot use"))  # unwritable even for root
    for path, why in bad:
        with pytest.raises(ConfigError) as err:
            TenantLedger(path)
        assert "ledger_path:" in str(err.value) and why in str(err.value), (path, str(err.value))
        assert str(path) in str(err.value) or str(path) in ("", ":memory:")


def test_read_only_directory_or_file_is_refused(tmp_path, monkeypatch):
    # Root (as in CI) writes through permission bits, so the permission check is fed a refusal.
    path = tmp_path / "tenants.sqlite"
    TenantLedger(path).close()
    for denied in (str(tmp_path), str(path)):
        monkeypatch.setattr(os, "access", lambda p, mode, denied=denied: str(p) != denied)
        with pytest.raises(ConfigError, match="ledger_path: .*tenants.sqlite' is not writable"):
            TenantLedger(path)
    monkeypatch.undo()
    TenantLedger(path).close()


def test_a_ledger_from_another_schema_version_is_refused(tmp_path):
    path = tmp_path / "tenants.sqlite"
    TenantLedger(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(ConfigError, match="ledger_path: .* holds ledger schema 99"):
        TenantLedger(path)


def test_the_file_is_a_wal_database(tmp_path):
    path = tmp_path / "tenants.sqlite"
    TenantLedger(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
