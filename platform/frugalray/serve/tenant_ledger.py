"""Tenant balances over a rolling window, in one SQLite file every ingress replica shares.

A request reserves its worst case (FLOPs and completion tokens) before it runs and settles
what it really spent after, as the sweep's FLOP budget does (frugalray.tune.budget): the
reservation is charged at once, so concurrent requests can never together exceed the
balance; settling hands the unspent rest back. A reservation whose request died with its
replica stays open; `expire_stale` charges it in full (its request may have run partly, its
real cost is unknown but never above the worst case: the safe side) and returns it so the
caller logs it, as the sweep does after a driver dies.

Spend in the window at time `now` is the sum over entries reserved at `ts > now - window_s`
of what each is charged: the settled actual, or the worst case while pending or expired.
An entry stays at its reservation time `ts`, however late it settles.

Every change runs in a `BEGIN IMMEDIATE` transaction (one writer at a time across
processes) on a WAL database with synchronous=FULL, so two replicas sharing the file can
never both take the last of a balance, and a committed reservation survives a crash.
WAL needs every process on one host (shared memory); do not share the file over NFS.
Time is always passed in (`now`, seconds), so the arithmetic is testable and deterministic.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from frugalray.config import ConfigError
from frugalray.serve.tenants import TenantBudget

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS spend (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids are never reused, even after prune()
    tenant TEXT NOT NULL,
    holder TEXT NOT NULL,                  -- who reserved it (e.g. the ingress replica)
    ts REAL NOT NULL,                      -- reservation time: the entry's place in the window
    reserved_flops REAL NOT NULL,          -- the worst case held
    reserved_tokens INTEGER NOT NULL,
    flops REAL NOT NULL,                   -- what it is charged: worst case until settled
    tokens INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'settled', 'expired')),
    closed_ts REAL
);
CREATE INDEX IF NOT EXISTS spend_tenant_ts ON spend (tenant, ts);
CREATE INDEX IF NOT EXISTS spend_pending ON spend (ts) WHERE state = 'pending';
"""

FLOPS = "flops"
TOKENS = "completion_tokens"


@dataclass(frozen=True)
class Reservation:
    """A granted hold of a request's worst case; settle it with its `id`.

    `remaining_*`: the balance left in the window after this hold (None: that dimension has no
    limit). `expire_stale` returns Reservations too, with `remaining_*` None.
    """

    id: int
    tenant: str
    holder: str
    ts: float
    flops: float
    completion_tokens: int
    remaining_flops: float | None = None
    remaining_tokens: int | None = None


@dataclass(frozen=True)
class Refusal:
    """The balance cannot cover the request's worst case; nothing was reserved.

    `never_fits`: the worst case alone exceeds the whole budget on `dimension`, so waiting cannot
    help (the caller answers 400, not 429) and `retry_after_s` is None. Otherwise `retry_after_s`
    is how long until enough old spend leaves the window for this request to fit, assuming
    nothing new is reserved and no pending reservation settles lower (either only changes it by
    a new reservation taking the room, or settling making it fit sooner).
    `dimension`: the first limit ("flops", then "completion_tokens") the request does not fit now;
    `short` lists every such limit.
    """

    tenant: str
    dimension: str
    short: tuple[str, ...]
    retry_after_s: float | None
    never_fits: bool
    remaining_flops: float | None
    remaining_tokens: int | None
    window_s: float


def _check_amounts(what: str, flops: float, completion_tokens: int) -> None:
    if not (isinstance(flops, (int, float)) and math.isfinite(flops) and flops >= 0):
        raise ValueError(f"{what}: flops must be a finite number >= 0 (got {flops!r})")
    if isinstance(completion_tokens, bool) or not isinstance(completion_tokens, int) or completion_tokens < 0:
        raise ValueError(f"{what}: completion_tokens must be an int >= 0 (got {completion_tokens!r})")


def _check_now(now: float) -> None:
    if not (isinstance(now, (int, float)) and math.isfinite(now)):
        raise ValueError(f"now must be a finite time in seconds (got {now!r})")


class TenantLedger:
    """Per-tenant spend in one SQLite file; safe to share between threads and between processes on one host."""

    def __init__(self, path: str | Path, busy_timeout_s: float = 30.0):
        self.path = self._checked_path(path)
        try:
            # isolation_level=None: transactions are opened explicitly (BEGIN IMMEDIATE), never implicitly.
            self._db = sqlite3.connect(str(self.path), timeout=busy_timeout_s, isolation_level=None,
                                       check_same_thread=False)
        except sqlite3.Error as err:
            raise self._unusable(err) from None
        self._lock = threading.Lock()  # one connection: a transaction at a time per process
        try:
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"journal_mode stayed {mode!r}; the filesystem does not support WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            with self._transaction() as db:
                # One statement at a time: executescript() would COMMIT the open transaction first.
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                if row is not None and int(row[0]) != SCHEMA_VERSION:
                    raise ConfigError([(f"ledger_path: '{self.path}' holds ledger schema {row[0]}, this frugalray "
                                        f"writes {SCHEMA_VERSION}; point ledger_path at a new file")])
                # A real write on every open: an unwritable file is refused here, not at the first request.
                db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                           (str(SCHEMA_VERSION),))
        except sqlite3.Error as err:
            self._db.close()
            raise self._unusable(err) from None
        except ConfigError:
            self._db.close()
            raise

    @staticmethod
    def _checked_path(path: str | Path) -> Path:
        text = str(path)
        if text in ("", ":memory:") or text.startswith("file:"):
            raise ConfigError([(f"ledger_path: {text!r} is not a file path; name a file (an in-memory ledger would "
                               "forget every balance on restart)")])
        p = Path(text).expanduser().absolute()
        if not p.parent.is_dir():
            raise ConfigError([(f"ledger_path: directory '{p.parent}' (of '{p}') does not exist; create it (on a "
                               "persistent volume under Kubernetes) or point ledger_path at an existing directory")])
        if p.is_dir():
            raise ConfigError([f"ledger_path: '{p}' is a directory; name a file in it, e.g. '{p / 'tenants.sqlite'}'"])
        # SQLite also writes '<file>-wal' and '<file>-shm' beside the file, so the directory must be writable.
        if not os.access(p.parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.R_OK | os.W_OK)):
            raise ConfigError([(f"ledger_path: '{p}' is not writable (it and its directory must be); fix the "
                               "permissions or point ledger_path elsewhere")])
        return p

    def _unusable(self, err: Exception) -> ConfigError:
        return ConfigError([(f"ledger_path: cannot use '{self.path}' as a writable SQLite ledger ({err}); fix the "
                            "file's permissions, or point ledger_path at a new file")])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes the database's write lock before the first read, so a check
        # ("does it fit?") and the write that follows it are one step for every process.
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite may have rolled back already (e.g. disk full)
                    self._db.execute("ROLLBACK")
                raise

    @staticmethod
    def _window_spend(db: sqlite3.Connection, tenant: str, cutoff: float) -> tuple[float, int]:
        flops, tokens = db.execute(
            "SELECT COALESCE(SUM(flops), 0.0), COALESCE(SUM(tokens), 0) FROM spend WHERE tenant = ? AND ts > ?",
            (tenant, cutoff),
        ).fetchone()
        return float(flops), int(tokens)

    @staticmethod
    def _remaining(budget: TenantBudget | None, flops: float, tokens: int) -> tuple[float | None, int | None]:
        if budget is None:
            return None, None
        # Clamped: spend can pass the budget when a request spends more than its worst case.
        return (None if budget.flops is None else max(0.0, budget.flops - flops),
                None if budget.completion_tokens is None else max(0, budget.completion_tokens - tokens))

    @staticmethod
    def _short(budget: TenantBudget, spent: tuple[float, int], need: tuple[float, int]) -> tuple[str, ...]:
        short = []
        if budget.flops is not None and spent[0] + need[0] > budget.flops:
            short.append(FLOPS)
        if budget.completion_tokens is not None and spent[1] + need[1] > budget.completion_tokens:
            short.append(TOKENS)
        return tuple(short)

    def reserve(self, tenant: str, flops: float, completion_tokens: int, budget: TenantBudget | None,
                now: float, holder: str) -> Reservation | Refusal:
        """Hold the request's worst case if the tenant's balance covers it on every limit; all or nothing.

        A tenant without a budget always gets a reservation (recorded, so its spend is reported).
        """
        _check_amounts("reserve", flops, completion_tokens)
        _check_now(now)
        if not tenant:
            raise ValueError("reserve: tenant must be a non-empty name")
        need = (float(flops), int(completion_tokens))
        with self._transaction() as db:
            if budget is not None:
                spent = self._window_spend(db, tenant, now - budget.window_s)
                over = self._short(budget, (0.0, 0), need)
                short = over or self._short(budget, spent, need)
                if short:
                    remaining = self._remaining(budget, *spent)
                    retry = None if over else self._retry_after(db, tenant, budget, need, now)
                    return Refusal(tenant=tenant, dimension=short[0], short=short, retry_after_s=retry,
                                   never_fits=bool(over), remaining_flops=remaining[0],
                                   remaining_tokens=remaining[1], window_s=budget.window_s)
            else:
                spent = (0.0, 0)
            cur = db.execute(
                "INSERT INTO spend (tenant, holder, ts, reserved_flops, reserved_tokens, flops, tokens, state) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'pending')",
                (tenant, str(holder), float(now), need[0], need[1], need[0], need[1]),
            )
            remaining = self._remaining(budget, spent[0] + need[0], spent[1] + need[1])
            return Reservation(id=int(cur.lastrowid), tenant=tenant, holder=str(holder), ts=float(now),
                               flops=need[0], completion_tokens=need[1],
                               remaining_flops=remaining[0], remaining_tokens=remaining[1])

    def _retry_after(self, db: sqlite3.Connection, tenant: str, budget: TenantBudget,
                     need: tuple[float, int], now: float) -> float:
        """Seconds until enough of the window's oldest spend has left it for `need` to fit.

        An entry at `ts` leaves the window at `ts + window_s`. Candidates are tried oldest first
        and each is confirmed with the very query `reserve` will run then, so a retry at
        `now + retry_after_s` fits (if nothing new was reserved meanwhile) and any earlier one does not.
        """
        window = budget.window_s
        times = [t for (t,) in db.execute(
            "SELECT DISTINCT ts FROM spend WHERE tenant = ? AND ts > ? ORDER BY ts", (tenant, now - window))]
        for ts in times:
            wait = max(0.0, ts + window - now)
            while (now + wait) - window < ts:  # float rounding: the entry must really be out then
                wait = math.nextafter(wait, math.inf)
            if not self._short(budget, self._window_spend(db, tenant, (now + wait) - window), need):
                return wait
        raise AssertionError("unreachable: a worst case within the budget fits an empty window")

    def settle(self, reservation_id: int, flops: float, completion_tokens: int, now: float) -> bool:
        """Charge a pending reservation what its request really spent instead of its worst case.

        Negative amounts count as 0. Spending more than was reserved is charged in full (the books
        must add up) and logged as a warning: the worst-case bound undercounts. Returns True when
        it settled; settling a reservation that is already closed (settled, or expired by
        `expire_stale`) is a no-op that returns False and changes nothing, so a request's cleanup
        path may settle twice safely. An unknown id raises KeyError.
        """
        if not (isinstance(flops, (int, float)) and math.isfinite(flops)):
            raise ValueError(f"settle: flops must be a finite number (got {flops!r})")
        if isinstance(completion_tokens, bool) or not isinstance(completion_tokens, int):
            raise TypeError(f"settle: completion_tokens must be an int (got {completion_tokens!r})")
        _check_now(now)
        actual = (max(0.0, float(flops)), max(0, int(completion_tokens)))
        with self._transaction() as db:
            row = db.execute("SELECT tenant, state, reserved_flops, reserved_tokens FROM spend WHERE id = ?",
                             (int(reservation_id),)).fetchone()
            if row is None:
                raise KeyError(f"settle: no reservation {reservation_id} in ledger '{self.path}'")
            tenant, state, held_flops, held_tokens = row
            if state != "pending":
                log.warning("tenant %s: reservation %s is already %s; this settle changes nothing",
                            tenant, reservation_id, state)
                return False
            if actual[0] > held_flops * (1 + 1e-9) or actual[1] > held_tokens:
                log.warning(
                    "tenant %s: reservation %s spent %.4g FLOPs / %d completion tokens, more than the %.4g / %d "
                    "reserved for it (the worst-case bound undercounts); charged what it spent",
                    tenant, reservation_id, actual[0], actual[1], held_flops, held_tokens)
            db.execute("UPDATE spend SET flops = ?, tokens = ?, state = 'settled', closed_ts = ? WHERE id = ?",
                       (actual[0], actual[1], float(now), int(reservation_id)))
            return True

    def expire_stale(self, older_than_s: float, now: float) -> list[Reservation]:
        """Close every reservation still pending `older_than_s` after it was made, charged at its worst case.

        Its request died with its replica (or outlived every deadline): what it spent is unknown but
        never above the hold, so charging the hold in full is the safe side. Returns them for the
        caller to log; a later `settle` of one of them is a no-op.
        """
        if not (isinstance(older_than_s, (int, float)) and math.isfinite(older_than_s) and older_than_s > 0):
            raise ValueError(f"expire_stale: older_than_s must be a finite number > 0 (got {older_than_s!r})")
        _check_now(now)
        with self._transaction() as db:
            rows = db.execute(
                "SELECT id, tenant, holder, ts, reserved_flops, reserved_tokens FROM spend "
                "WHERE state = 'pending' AND ts < ? ORDER BY id", (now - older_than_s,)).fetchall()
            # The charge already is the worst case (flops/tokens are only lowered by settle).
            db.executemany("UPDATE spend SET state = 'expired', closed_ts = ? WHERE id = ?",
                           [(float(now), r[0]) for r in rows])
        return [Reservation(id=int(r[0]), tenant=r[1], holder=r[2], ts=float(r[3]), flops=float(r[4]),
                            completion_tokens=int(r[5])) for r in rows]

    def spent(self, tenant: str, now: float, window_s: float) -> tuple[float, int]:
        """(FLOPs, completion tokens) charged to the tenant by entries reserved after `now - window_s`.

        Pending reservations count at their worst case; settled ones at what they spent.
        """
        _check_now(now)
        with self._lock:
            return self._window_spend(self._db, tenant, now - window_s)

    def remaining(self, tenant: str, budget: TenantBudget | None, now: float) -> tuple[float | None, int | None]:
        """What the tenant may still spend in its window, per limit, clamped at 0 (None: that limit is not set)."""
        if budget is None:
            return None, None
        return self._remaining(budget, *self.spent(tenant, now, budget.window_s))

    def prune(self, older_than_s: float, now: float) -> int:
        """Delete closed entries reserved more than `older_than_s` ago (use at least the longest window).

        Pending entries are kept (`expire_stale` closes them). Returns how many were deleted.
        """
        if not (isinstance(older_than_s, (int, float)) and math.isfinite(older_than_s) and older_than_s > 0):
            raise ValueError(f"prune: older_than_s must be a finite number > 0 (got {older_than_s!r})")
        _check_now(now)
        with self._transaction() as db:
            return db.execute("DELETE FROM spend WHERE state != 'pending' AND ts <= ?",
                              (now - older_than_s,)).rowcount
