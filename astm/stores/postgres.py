"""Many processes, one state: the PostgreSQL store (peers in the style of Datomic).

``Store("postgresql://user@host/db")``, opened with ``async with store:``.
Each process is a peer: it keeps the refs in memory with their versions and
runs transactions locally at its basis ``t``. Three parts, each behind the
interface the local stores implement too:

* :class:`PostgresCommitter` sends a commit request's read versions, writes
  and outbox entries to PostgreSQL (``astm_commit_batch``), which takes the
  global commit lock, validates the read versions (serializable), gives the
  commit the next ``t`` and appends it to the log. A conflict retries the body
  locally; a conflict only on commuted refs re-applies the commutes to fresh
  values without running the body again. A dedicated sender task carries the
  commits queued while a round trip is in flight, so one caller's
  cancellation never touches another's commit.
* The log is followed, in ``t`` order, own commits included: peers learn of
  commits through LISTEN/NOTIFY and catch up from the log table, and poll it
  as well, so a lost notification or a reconnect never leaves a peer silently
  stale. Every row enters the peer through the store's ``Timeline.apply``.
* :class:`PostgresOutbox`: entries are committed with the transaction; any
  peer delivers them (``FOR UPDATE SKIP LOCKED`` with a lease), at least once,
  with the same ``(t, seq)`` key on every redelivery, one at a time per
  ``order_key``, through the same dispatcher as every store.

A read replica (``Store(primary_url, replica=replica_url)``, a hot standby
streaming from the primary) serves a peer's open, its cache misses and its
following of the log, while commits, the outbox, fencing, trimming and
LISTEN stay on the primary. Nothing it answers is trusted to be recent: a
ref read from it is used only if its version is the newest at the peer's
basis, that is if the replica's ``t``, read in the same statement, is at
least the basis, or if none of the commits the peer applied after that ``t``
wrote the ref (else the peer waits briefly and then asks the primary); log
rows it lacks are read from the primary. A replica that fails is left alone
for a while (a warning, rate-limited), and every read goes to the primary
meanwhile.

A commit whose outcome is unknown (the connection dropped after sending it)
is resolved by looking its transaction id up in the log under the commit lock
and *fencing* the ids not found: ``astm_commit_batch`` refuses a fenced id, so
an orphaned request that a server or pooler still executes later can no
longer commit once the answer "not committed" has been given.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
import uuid
from collections import deque
from collections.abc import Collection, Hashable, Iterable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.lowlevel

from .. import codec
from .._backend import Waiter, spawn
from .._commit import CommitRequest, Committed, Counts, decode_row, encode_changes, encode_outbox, row_text
from .._errors import CommitOutcomeUnknown, CommittedNotApplied, StorageError, _Conflict
from .._ops import apply_calls, decode_calls
from .._tx import run_watches
from ..abc import CommitRecord, Key, OutboxEntry, Recovered

if TYPE_CHECKING:
    import asyncpg

    from .._ref import Ref
    from .._timeline import Timeline

__all__ = ["SCHEMA_VERSION", "PostgresCommitter", "PostgresOutbox", "PostgresStorage"]

#: a peer's own commit as it sent it: (time, [(name, ("v", new value))], the encoded changes)
_Own = tuple[float, list[tuple[str, tuple[Any, ...]]], list[tuple[str, str, str, Any]]]

log = logging.getLogger("astm")

SCHEMA_VERSION = 8
CHANNEL = "astm_commits"
POLL_SECONDS = 1.0
#: while the server is lost, the follower says so at most once per this many seconds
LOST_LOG_SECONDS = 10.0
OUTBOX_POLL_SECONDS = 0.2
#: a claim the server refuses is logged at most once per this many seconds per peer
CLAIM_REFUSED_LOG_SECONDS = 10.0
OUTBOX_LEASE = "30 seconds"
#: how long a commit whose connection dropped keeps trying to learn its outcome
RESOLVE_SECONDS = 10.0
#: the most transactions one round trip carries
BATCH_MAX = 64
#: after this many deltas on one ref since its last whole value, the next change sends the whole value
MAX_DELTAS = 64
#: a collection of n entries may chain up to n // 16 deltas (at most this many): re-sending a 100k-entry value
#: every 64 commits cost more than the commits themselves, while a cold read applying a few thousand small
#: deltas costs less than decoding the value it starts from
MAX_CHAIN = 4096
#: log rows one catch-up query brings (the loop runs between chunks)
CATCH_UP_CHUNK = 500
#: notifications (with their rows) a peer keeps until it applies them, and parsed rows it keeps while they
#: do not follow on from its basis; beyond either it reads the log instead
PUSHED_KEPT = 64
PUSHED_ROWS_KEPT = 10_000
#: how long a committer waits for the notification of the other peers' commits before its own, rather than
#: reading them from the log
ANNOUNCE_WAIT_SECONDS = 0.002
#: how often a peer polls the log when LISTEN/NOTIFY is not available
FALLBACK_POLL_SECONDS = 0.1
#: the log keeps at least this many commits and this many seconds (resolving a lost commit reads it)
LOG_KEEP_MIN = 1000
LOG_KEEP_SECONDS = 60.0
TRIM_SECONDS = 10.0
#: how long a read waits for a replica that has not replayed what the peer needs before asking the primary
#: (measured here: a hot standby on the same machine shows a commit a median 2 ms and a p99 12 ms after its
#: notification arrives)
REPLICA_WAIT_SECONDS = 0.05
#: a replica that failed is not asked again for this long (every read goes to the primary meanwhile), twice as
#: long after each further failure in a row, up to REPLICA_RETRY_MAX_SECONDS
REPLICA_RETRY_SECONDS = 2.0
REPLICA_RETRY_MAX_SECONDS = 60.0
#: at most one warning about the replica per this many seconds (with the count of reads it did not serve)
REPLICA_WARN_SECONDS = 10.0
#: a replica that takes longer than this to answer counts as failed (the primary answers instead)
REPLICA_TIMEOUT_SECONDS = 2.0
#: how many of its last commits a peer remembers the written names of (to use a replica that lags)
RECENT_COMMITS = 1024

_APPLY_FUNCTION = """CREATE OR REPLACE FUNCTION astm_apply(p_batch jsonb, INOUT cur bigint, OUT results jsonb)
    LANGUAGE plpgsql AS $$
    DECLARE
        tx jsonb;
        chk record;
        have bigint;
        bad text[];
    BEGIN
        -- called with the commit lock held: validates and applies each transaction in turn
        results := '[]'::jsonb;
        FOR tx IN SELECT * FROM jsonb_array_elements(p_batch) LOOP
            -- an id fenced by the resolution of a dropped connection never commits
            IF EXISTS (SELECT 1 FROM astm_fence f WHERE f.tx_id = (tx->>'id')::uuid) THEN
                results := results || jsonb_build_array(jsonb_build_object('status', 'fenced', 't', cur));
                CONTINUE;
            END IF;
            -- each transaction is validated against the state the earlier ones left, one index lookup
            -- per ref (a join could be planned as a scan of the whole table)
            bad := NULL;
            FOR chk IN SELECT * FROM jsonb_to_recordset(tx->'reads') AS r(name text, t bigint) LOOP
                SELECT r.t INTO have FROM astm_refs r WHERE r.name = chk.name;
                IF have > chk.t THEN
                    bad := array_append(bad, chk.name);
                END IF;
            END LOOP;
            IF bad IS NOT NULL THEN
                results := results || jsonb_build_array(
                    jsonb_build_object('status', 'conflict', 't', cur, 'names', to_jsonb(bad)));
                CONTINUE;
            END IF;
            FOR chk IN SELECT * FROM jsonb_to_recordset(tx->'commutes') AS r(name text, t bigint) LOOP
                SELECT r.t INTO have FROM astm_refs r WHERE r.name = chk.name;
                IF have > chk.t THEN
                    bad := array_append(bad, chk.name);
                END IF;
            END LOOP;
            IF bad IS NOT NULL THEN
                results := results || jsonb_build_array(
                    jsonb_build_object('status', 'stale', 't', cur, 'names', to_jsonb(bad)));
                CONTINUE;
            END IF;
            -- a delta applies only to the very version it was made on
            FOR chk IN SELECT * FROM jsonb_to_recordset(tx->'writes') AS w(name text, kind text, base bigint)
                      WHERE w.kind = 'd' LOOP
                SELECT r.t INTO have FROM astm_refs r WHERE r.name = chk.name;
                IF have IS DISTINCT FROM chk.base THEN
                    bad := array_append(bad, chk.name);
                END IF;
            END LOOP;
            IF bad IS NOT NULL THEN
                results := results || jsonb_build_array(
                    jsonb_build_object('status', 'conflict', 't', cur, 'names', to_jsonb(bad)));
                CONTINUE;
            END IF;
            cur := cur + 1;
            DELETE FROM astm_refs r USING jsonb_to_recordset(tx->'writes') AS x(name text, kind text)
             WHERE x.kind = 'x' AND r.name = x.name;
            DELETE FROM astm_ref_deltas d USING jsonb_to_recordset(tx->'writes') AS x(name text, kind text)
             WHERE x.kind = 'x' AND d.name = x.name;
            INSERT INTO astm_refs (name, t, value, base_t)
                 SELECT x.name, cur, x.value, cur
                   FROM jsonb_to_recordset(tx->'writes') AS x(name text, kind text, value text) WHERE x.kind = 'v'
            ON CONFLICT (name) DO UPDATE SET t = excluded.t, value = excluded.value, base_t = excluded.base_t;
            DELETE FROM astm_ref_deltas d USING jsonb_to_recordset(tx->'writes') AS x(name text, kind text)
             WHERE x.kind = 'v' AND d.name = x.name;
            UPDATE astm_refs r SET t = cur FROM jsonb_to_recordset(tx->'writes') AS x(name text, kind text)
             WHERE x.kind = 'd' AND r.name = x.name;
            INSERT INTO astm_ref_deltas (name, t, calls)
                 SELECT x.name, cur, x.calls
                   FROM jsonb_to_recordset(tx->'writes') AS x(name text, kind text, calls text) WHERE x.kind = 'd';
            INSERT INTO astm_log (t, tx_id, time, changes)
                 VALUES (cur, (tx->>'id')::uuid, (tx->>'time')::double precision, tx->>'changes');
            INSERT INTO astm_outbox (t, seq, effect, payload, order_key)
                 SELECT cur, x.seq, x.effect, x.payload, x.order_key
                   FROM jsonb_to_recordset(tx->'outbox') AS x(seq int, effect text, payload text, order_key text);
            results := results || jsonb_build_array(jsonb_build_object('status', 'ok', 't', cur));
        END LOOP;
    END $$"""


#: A batch's notification carries its log rows when they fit in a payload (under 8000 bytes), so that the
#: other peers apply them without reading the log: "<t> [[t, time, changes], ...]", else just "<t>".
#: ``time`` travels as text (float8out is exact; a jsonb number of a float8 keeps only 15 digits).
_ANNOUNCE_FUNCTION = """CREATE OR REPLACE FUNCTION astm_announce(p_start bigint, p_cur bigint) RETURNS void
    LANGUAGE plpgsql AS $$
    DECLARE
        rows text;
    BEGIN
        SELECT jsonb_agg(jsonb_build_array(l.t, l.time::text, l.changes) ORDER BY l.t)::text INTO rows
          FROM astm_log l WHERE l.t > p_start AND l.t <= p_cur;
        IF rows IS NOT NULL AND octet_length(rows) < 7900 THEN
            PERFORM pg_notify('astm_commits', p_cur::text || ' ' || rows);
        ELSE
            PERFORM pg_notify('astm_commits', p_cur::text);
        END IF;
    END $$"""


#: Any peer's commit call takes the commit lock if it is free and commits its batch together with every
#: other peer's queued one (one WAL flush for all); when the lock is busy it queues its batch (an unlogged
#: table: no flush) and then waits in astm_commit_pending, which commits whatever is queued by then and
#: hands each peer its own results. So peers share flushes, and throughput grows with them.
_COMMIT_FUNCTION = """CREATE OR REPLACE FUNCTION astm_commit_batch(p_batch jsonb) RETURNS jsonb
    LANGUAGE plpgsql AS $$
    DECLARE
        cur bigint;
        start bigint;
        queued jsonb;
        everything jsonb;
        res jsonb;
    BEGIN
        -- the commit lock is an advisory lock: waiting for it, or holding it to collect results, writes
        -- nothing, so a peer whose results another peer's commit produced costs no WAL flush of its own
        IF NOT pg_try_advisory_xact_lock(7272727) THEN  -- another peer is committing: queue for the next one
            INSERT INTO astm_pending (id, payload) SELECT (b->>'id')::uuid, b FROM jsonb_array_elements(p_batch) b;
            RETURN NULL;
        END IF;
        SELECT m.value::bigint INTO cur FROM astm_meta m WHERE m.key = 't';
        start := cur;
        WITH d AS (DELETE FROM astm_pending RETURNING payload, seq)
        SELECT COALESCE(jsonb_agg(d.payload ORDER BY d.seq), '[]'::jsonb) INTO queued FROM d;
        everything := queued || p_batch;
        SELECT a.cur, a.results INTO cur, res FROM astm_apply(everything, cur) a;
        INSERT INTO astm_results (id, result)
             SELECT (q.payload->>'id')::uuid, r.result
               FROM jsonb_array_elements(queued) WITH ORDINALITY AS q(payload, n)
               JOIN jsonb_array_elements(res) WITH ORDINALITY AS r(result, m) ON q.n = r.m;
        IF cur > start THEN  -- a batch that committed nothing (all conflicts) writes no WAL: no flush
            UPDATE astm_meta SET value = cur::text WHERE key = 't';
            PERFORM astm_announce(start, cur);
        END IF;
        RETURN (SELECT COALESCE(jsonb_agg(r.result ORDER BY r.m), '[]'::jsonb)
                  FROM jsonb_array_elements(res) WITH ORDINALITY AS r(result, m)
                 WHERE r.m > jsonb_array_length(queued));
    END $$"""

_PENDING_FUNCTION = """CREATE OR REPLACE FUNCTION astm_commit_pending(p_mine uuid[]) RETURNS jsonb
    LANGUAGE plpgsql AS $$
    DECLARE
        cur bigint;
        start bigint;
        queued jsonb;
        res jsonb;
    BEGIN
        PERFORM pg_advisory_xact_lock(7272727);  -- waits its turn
        SELECT m.value::bigint INTO cur FROM astm_meta m WHERE m.key = 't';
        start := cur;
        WITH d AS (DELETE FROM astm_pending RETURNING payload, seq)
        SELECT COALESCE(jsonb_agg(d.payload ORDER BY d.seq), '[]'::jsonb) INTO queued FROM d;
        IF jsonb_array_length(queued) > 0 THEN
            SELECT a.cur, a.results INTO cur, res FROM astm_apply(queued, cur) a;
            INSERT INTO astm_results (id, result)
                 SELECT (q.payload->>'id')::uuid, r.result
                   FROM jsonb_array_elements(queued) WITH ORDINALITY AS q(payload, n)
                   JOIN jsonb_array_elements(res) WITH ORDINALITY AS r(result, m) ON q.n = r.m;
            IF cur > start THEN
                UPDATE astm_meta SET value = cur::text WHERE key = 't';
                PERFORM astm_announce(start, cur);
            END IF;
        END IF;
        WITH x AS (DELETE FROM astm_results WHERE id = ANY(p_mine) RETURNING id, result)
        SELECT COALESCE(jsonb_object_agg(x.id::text, x.result), '{}'::jsonb) INTO res FROM x;
        RETURN res;
    END $$"""

#: queued batches and the results other peers' calls left for their owners (unlogged: a server crash
#: empties them, and the peers then resolve their commits through the log)
_QUEUES = [
    """CREATE UNLOGGED TABLE IF NOT EXISTS astm_pending (
        id uuid PRIMARY KEY, seq bigserial NOT NULL, payload jsonb NOT NULL)""",
    """CREATE UNLOGGED TABLE IF NOT EXISTS astm_results (
        id uuid PRIMARY KEY, result jsonb NOT NULL, at timestamptz NOT NULL DEFAULT now())""",
]

_FENCE = "CREATE TABLE IF NOT EXISTS astm_fence (tx_id uuid PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())"
#: a ref's value is its whole value at base_t with its deltas after base_t applied, in t order
_DELTAS = """CREATE TABLE IF NOT EXISTS astm_ref_deltas (
    name text NOT NULL, t bigint NOT NULL, calls text NOT NULL, PRIMARY KEY (name, t))"""

#: the outbox claim and dead-letter queries read only the entries they need
_INDEXES = [
    "CREATE INDEX IF NOT EXISTS astm_outbox_pending ON astm_outbox (t, seq) WHERE error IS NULL",
    """CREATE INDEX IF NOT EXISTS astm_outbox_lanes ON astm_outbox (order_key, t, seq)
        WHERE error IS NULL AND order_key IS NOT NULL""",
    "CREATE INDEX IF NOT EXISTS astm_outbox_dead ON astm_outbox (t, seq) WHERE error IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS astm_fence_at ON astm_fence (at)",
]

_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS astm_meta (key text PRIMARY KEY, value text NOT NULL)",
    """CREATE TABLE IF NOT EXISTS astm_refs (
        name text PRIMARY KEY, t bigint NOT NULL, value text NOT NULL, base_t bigint NOT NULL)""",
    _DELTAS,
    """CREATE TABLE IF NOT EXISTS astm_log (
        t bigint PRIMARY KEY, tx_id uuid NOT NULL UNIQUE, time double precision NOT NULL, changes text NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS astm_outbox (
        t bigint NOT NULL, seq int NOT NULL, effect text NOT NULL, payload text NOT NULL, order_key text,
        attempts int NOT NULL DEFAULT 0, error text, next_at timestamptz NOT NULL DEFAULT now(),
        locked_until timestamptz, PRIMARY KEY (t, seq))""",
    _FENCE,
    *_QUEUES,
    _APPLY_FUNCTION,
    _ANNOUNCE_FUNCTION,
    _COMMIT_FUNCTION,
    _PENDING_FUNCTION,
    *_INDEXES,
]
#: schema versions 1 and 2 -> 8: the fence, deltas (log rows become [name, "v", value])
_MIGRATE = [
    _FENCE,
    _DELTAS,
    "ALTER TABLE astm_refs ADD COLUMN IF NOT EXISTS base_t bigint",
    "UPDATE astm_refs SET base_t = t WHERE base_t IS NULL",
    "ALTER TABLE astm_refs ALTER COLUMN base_t SET NOT NULL",
    """UPDATE astm_log SET changes = (
        SELECT COALESCE(jsonb_agg(jsonb_build_array(c->0, 'v', c->2)), '[]'::jsonb)::text
          FROM jsonb_array_elements(changes::jsonb) AS c)""",
    *_QUEUES,
    _APPLY_FUNCTION,
    _ANNOUNCE_FUNCTION,
    _COMMIT_FUNCTION,
    _PENDING_FUNCTION,
    *_INDEXES,
]
#: schema versions 3 to 7 -> 8: validation by index lookups, the outbox indexes, commits shared between peers,
#: deletions, no write to astm_meta by a batch that committed nothing, log rows in the notifications
_MIGRATE_3 = [*_QUEUES, _APPLY_FUNCTION, _ANNOUNCE_FUNCTION, _COMMIT_FUNCTION, _PENDING_FUNCTION, *_INDEXES]

#: refs a peer does not hold, and the basis they are read at, in one statement (one snapshot): the basis row,
#: the refs' whole values, their deltas
_LOAD = """
SELECT 0 AS kind, NULL::text AS name, value::bigint AS t, NULL::text AS value FROM astm_meta WHERE key = 't'
UNION ALL SELECT 1, name, t, value FROM astm_refs WHERE name = ANY($1::text[])
UNION ALL SELECT 2, name, t, calls FROM astm_ref_deltas WHERE name = ANY($1::text[])
"""
#: the schema version and the basis, in one statement (a peer opening on a replica)
_BASIS = """SELECT (SELECT value FROM astm_meta WHERE key = 'schema_version') AS version,
                   (SELECT value::bigint FROM astm_meta WHERE key = 't') AS t"""
_LOG = "SELECT t, time, changes FROM astm_log WHERE t > $1 AND t <= $2 ORDER BY t LIMIT $3"

_COMMIT = "SELECT astm_commit_batch($1::jsonb)"
_PENDING = "SELECT astm_commit_pending($1::uuid[])"

_CLAIM = f"""
UPDATE astm_outbox o SET locked_until = now() + interval '{OUTBOX_LEASE}', attempts = o.attempts + 1
 WHERE (o.t, o.seq) IN (
       SELECT c.t, c.seq FROM astm_outbox c
        WHERE c.error IS NULL AND c.next_at <= now() AND c.effect = ANY($2)
          AND (c.locked_until IS NULL OR c.locked_until < now())
          AND (c.order_key IS NULL OR NOT EXISTS (
               SELECT 1 FROM astm_outbox p
                WHERE p.order_key = c.order_key AND p.error IS NULL AND (p.t, p.seq) < (c.t, c.seq)))
        ORDER BY c.t, c.seq LIMIT $1 FOR UPDATE SKIP LOCKED)
RETURNING o.t, o.seq, o.effect, o.payload, o.attempts
"""

_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (OSError, ConnectionError)


def _connection_errors() -> tuple[type[BaseException], ...]:
    """What a lost or restarting server raises (as opposed to an answer from a working one)."""
    import asyncpg
    from asyncpg import exceptions as ex

    return (
        *_CONNECTION_ERRORS,
        asyncpg.PostgresConnectionError,
        asyncpg.InterfaceError,
        ex.InternalClientError,
        ex.OperatorInterventionError,  # admin shutdown, cannot connect now, crash shutdown
    )


def _replica_errors() -> tuple[type[BaseException], ...]:
    """What makes a replica's answer unusable: a lost server, any error it reports (a query cancelled by a
    recovery conflict, a schema not replayed yet), or no answer in time."""
    import asyncpg

    return (*_connection_errors(), asyncpg.PostgresError, TimeoutError)


def _parse_pushed(payload: str) -> list[tuple[int, float, str]]:
    """The log rows a notification carried: ``[[t, time as text, changes], ...]`` (see astm_announce)."""
    return [(int(t), float(when), str(changes)) for t, when, changes in json.loads(payload)]


def _what_failed(exc: BaseException) -> str:
    """How a commit's round trip failed, for the error its caller gets."""
    import asyncpg

    if isinstance(exc, asyncpg.PostgresError):
        return "PostgreSQL reported an error while the commit waited for its turn"
    return "the connection to PostgreSQL was lost during the commit"


def _cause_of(exc: BaseException) -> str:
    import asyncpg

    return _server_said(exc) if isinstance(exc, asyncpg.PostgresError) else repr(exc)


def _server_said(exc: BaseException) -> str:
    """What PostgreSQL said in an error it reported: its message, detail and hint, and the SQLSTATE."""
    parts = [" ".join(str(exc).split())]
    for field in ("detail", "hint"):
        extra = getattr(exc, field, None)
        if extra and extra not in parts[0]:
            parts.append(f"{field.upper()}: {extra}")
    code = getattr(exc, "sqlstate", None)
    return " ".join(parts) + (f" [SQLSTATE {code}]" if code else "")


class _Throttle:
    """At most one log line per ``seconds``; counts the lines held back in between."""

    __slots__ = ("held", "last", "seconds")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.last = -math.inf
        self.held = 0

    def due(self) -> int | None:
        """None: hold this line back; else how many were held back since the last line (which this is)."""
        now = time.monotonic()
        if now - self.last < self.seconds:
            self.held += 1
            return None
        held, self.held, self.last = self.held, 0, now
        return held


async def _no_reset(conn: Any) -> None:
    """Nothing to reset on a pooled connection (asyncpg still rolls back a transaction left open)."""


def _chain_bound(value: Any) -> int:
    """How many deltas a ref holding ``value`` may chain before a commit sends it whole."""
    try:
        n = len(value)
    except TypeError:
        return MAX_DELTAS
    return max(MAX_DELTAS, min(n // 16, MAX_CHAIN))


def _text_safe(text: str) -> str:
    """Text PostgreSQL can store (no NUL, valid UTF-8), for error messages that quote user data."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


class _Host(Protocol):
    """What a peer needs of its store: installing and applying logged commits, and the counters."""

    _counts: Counts
    _refs: MutableMapping[str, Ref[Any]]

    def _install(self, t: int, refs: list[tuple[str, int, Any]]) -> None: ...

    def _cold(self, refs: Iterable[Ref[Any]]) -> list[Ref[Any]]: ...

    def _warm(self, refs: list[Ref[Any]], found: dict[str, tuple[int, Any]]) -> None: ...

    def _touch(self, refs: Iterable[Ref[Any]]) -> None: ...

    def _rebase(self, t: int) -> None: ...

    def _apply_logged(
        self, t: int, when: float, changes: list[tuple[str, tuple[Any, ...]]], where: str
    ) -> tuple[list[tuple[Ref[Any], Any, Any]], list[Waiter] | None, bool]: ...


class PostgresStorage:
    """A peer: the connections, the schema, and following the shared log (see the module docstring)."""

    def __init__(self, dsn: str, timeline: Timeline, host: _Host, replica: str | None = None) -> None:
        try:
            import asyncpg  # noqa: F401
        except ImportError:  # pragma: no cover - an extra
            raise StorageError(
                dsn, "the PostgreSQL store needs asyncpg", "pip install 'astm-state[postgres]'"
            ) from None
        self.dsn = dsn
        self._where = self._describe(dsn)
        #: the read replica's DSN, if any, and its pool once open
        self.replica = replica
        self.replica_pool: asyncpg.Pool | None = None
        self._replica_down_until = float("-inf")
        self._replica_strikes = 0
        self._replica_warned = float("-inf")
        self._replica_unserved = 0
        #: reads the replica answered, reads it could not serve (it lagged or failed) that went to the primary,
        #: and of those the times it failed
        self.replica_reads = 0
        self.replica_fallbacks = 0
        self.replica_failures = 0
        #: the newest t this peer knows is committed (notifications, commit answers, the primary's reads),
        #: and a t that sync(t) asks for: what a catch-up from the replica must reach
        self._known = 0
        self._asked = 0
        self._known_checked = time.monotonic()
        self.timeline = timeline
        self.host = host
        self.pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._catching_up = anyio.Lock()
        self._changed = anyio.Event()
        self._closing = False
        self._stopped = anyio.Event()
        self._following = False
        #: times this peer lost its notification connection and opened a new one
        self.reconnects = 0
        #: times its notifications stopped while the connection looked open
        self.silent_losses = 0
        self._heard = False
        #: log rows that notifications carried, not applied yet: payloads as received, then parsed rows
        self._pushed: list[tuple[int, str]] = []
        self._pushed_rows: deque[tuple[int, float, str]] = deque()
        #: batches of log rows applied from notifications, and log reads made
        self.pushed_applied = 0
        self.log_reads = 0
        #: the newest t a notification announced, and an event the next one sets (for a committer waiting
        #: for the notification of the commits up to its own)
        self._heard_t = 0
        self._announced: anyio.Event | None = None
        self._can_listen = True
        #: per ref: deltas stored since its last whole value (past MAX_DELTAS a commit sends the value)
        self.deltas: dict[str, int] = {}
        #: the names each of the last commits this peer applied wrote, in t order up to its basis (whether it
        #: held those refs or not): a replica's version of a ref is still the newest at the basis if none of
        #: the commits after the replica's t wrote it
        self._recent: deque[tuple[int, frozenset[str]]] = deque(maxlen=RECENT_COMMITS)

        self.committer = PostgresCommitter(self)
        self.log = PostgresLog(self)
        self.outbox = PostgresOutbox(self)

    # -- opening ---------------------------------------------------------------------

    def where(self) -> str:
        """The database, for messages (the DSN without credentials)."""
        return self._where

    @staticmethod
    def _describe(dsn: str) -> str:
        import urllib.parse

        p = urllib.parse.urlsplit(dsn)
        return f"postgresql://{p.hostname}:{p.port or 5432}{p.path}"

    def require_pool(self) -> asyncpg.Pool:
        if self.pool is None:
            raise StorageError(
                self.where(),
                "the store is not open",
                "open it first: `async with store:` (or `await store.open()`)",
            )
        return self.pool

    async def open(self) -> None:
        import asyncpg

        if self.pool is not None:
            return
        try:
            # no reset query when a connection goes back (a round trip each time): the store keeps no session
            # state on pooled connections (its advisory locks are transaction locks; it listens elsewhere)
            # (with a replica, a peer may open without a query to the primary's pool: it connects when used)
            primary_min = 0 if self.replica is not None else 1
            self.pool = await asyncpg.create_pool(self.dsn, min_size=primary_min, max_size=8, reset=_no_reset)
        except _connection_errors() as exc:
            raise StorageError(
                self.where(), f"cannot connect ({exc})", "check the URL and that the server runs"
            ) from exc
        try:
            if self.replica is not None:
                # connects nothing yet: a replica that is down is found (and warned about) at its first read
                self.replica_pool = await asyncpg.create_pool(self.replica, min_size=0, max_size=8, reset=_no_reset)
            # a peer starts from the basis alone: refs are read when first used (a bounded cache)
            t = await self._replica_basis()
            on_replica = t is not None
            if t is None:
                async with self.pool.acquire() as conn:
                    await self._schema(conn)
                    t = int(await conn.fetchval("SELECT value FROM astm_meta WHERE key = 't'"))
        except _connection_errors() as exc:
            await self._close_pools()
            raise StorageError(
                self.where(),
                f"the connection to PostgreSQL was lost while opening the store ({exc!r})",
                "open it again once the server answers",
            ) from exc
        except BaseException:
            await self._close_pools()
            raise
        with self.timeline.lock:
            self.host._install(t, [])
        try:
            await self._listen()
        except _connection_errors() as exc:  # the follower polls the log, and connects its listener later
            log.warning("astm peer: cannot listen for commits yet (%r); following the log by polling", exc)
        if on_replica:
            # opened at the replica's basis, which may lag: catch up with the primary's t (read after
            # LISTEN, so nothing later goes unannounced) before the open returns, so that a peer never opens
            # behind a commit acknowledged before its open began (the rows come from the replica if it has
            # them in time)
            try:
                if self._listener is not None:
                    primary_t = int(await self._listener.fetchval("SELECT value FROM astm_meta WHERE key = 't'"))
                else:
                    async with self.pool.acquire() as conn:
                        primary_t = int(await conn.fetchval("SELECT value FROM astm_meta WHERE key = 't'"))
                if primary_t < t:
                    raise StorageError(
                        self.where(),
                        f"the replica {self._describe(self.replica or '')} is at t={t}, ahead of the primary "
                        f"(t={primary_t}): it is not a replica of this database",
                        "give replica= the URL of a standby of the primary's database",
                    )
                self._known = max(self._known, primary_t)
                await self._catch_up_to(primary_t)
            except BaseException:
                if self._listener is not None:
                    self._listener.terminate()
                    self._listener = None
                await self._close_pools()
                raise
        self._following = True
        spawn(self._follow)

    async def _replica_basis(self) -> int | None:
        """The basis to open at, read from the replica; None if it cannot tell (then the primary does)."""
        import asyncpg

        pool = self._usable_replica()
        if pool is None:
            return None
        try:
            with anyio.fail_after(REPLICA_TIMEOUT_SECONDS):
                async with pool.acquire() as conn:
                    row = await conn.fetchrow(_BASIS)
        except asyncpg.UndefinedTableError:
            return None  # no schema there yet: the primary creates it
        except _replica_errors() as exc:
            self._replica_failed(exc)
            return None
        self._replica_strikes = 0
        if row is None or row["version"] is None or int(row["version"]) != SCHEMA_VERSION:
            return None  # a schema to create or migrate (or refuse): the primary's business
        self.replica_reads += 1
        return int(row["t"])

    def _usable_replica(self) -> asyncpg.Pool | None:
        """The replica's pool, unless there is none or it failed less than REPLICA_RETRY_SECONDS ago."""
        if self.replica_pool is None or time.monotonic() < self._replica_down_until:
            return None
        return self.replica_pool

    def _replica_failed(self, exc: BaseException) -> None:
        """The replica did not answer: leave it alone for a while, and say so (rate-limited)."""
        self.replica_failures += 1
        self._replica_strikes += 1
        pause = min(REPLICA_RETRY_SECONDS * 2 ** (self._replica_strikes - 1), REPLICA_RETRY_MAX_SECONDS)
        self._replica_down_until = time.monotonic() + pause
        self._replica_unserved_read(f"the read replica failed ({exc!r})")

    def _replica_skipped(self) -> None:
        """A read went to the primary while the replica is left alone after a failure (counted, not logged)."""
        if self.replica_pool is not None:
            self.replica_fallbacks += 1
            self._replica_unserved += 1

    def _replica_unserved_read(self, why: str) -> None:
        """A read the replica could not serve went to the primary: a warning at most every REPLICA_WARN_SECONDS."""
        self.replica_fallbacks += 1
        self._replica_unserved += 1
        now = time.monotonic()
        if now - self._replica_warned >= REPLICA_WARN_SECONDS:
            log.warning(
                "astm peer: %s; reading from the primary %s instead of the replica %s "
                "(%d read(s) since the last warning)",
                why,
                self.where(),
                self._describe(self.replica or ""),
                self._replica_unserved,
            )
            self._replica_warned = now
            self._replica_unserved = 0

    def _values(self, rows: list[Any], deltas: list[Any]) -> dict[str, tuple[int, Any]]:
        """Refs' (t, value) by name: each whole value at its base_t with its deltas applied in t order."""
        values = {r["name"]: codec.loads(r["value"]) for r in rows}
        counts: dict[str, int] = {}
        for d in deltas:
            name = d["name"]
            values[name] = apply_calls(values[name], decode_calls(json.loads(d["value"])))
            counts[name] = counts.get(name, 0) + 1
        for r in rows:
            self.deltas[r["name"]] = counts.get(r["name"], 0)
        return {r["name"]: (r["t"], values[r["name"]]) for r in rows}

    async def names(self, prefix: str) -> list[str]:
        """The names of the stored refs that start with ``prefix``."""
        pool = self.require_pool()
        pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        with self._reading(f"the names of the refs starting with {prefix!r}"):
            async with pool.acquire() as conn:
                return [r["name"] for r in await conn.fetch("SELECT name FROM astm_refs WHERE name LIKE $1", pattern)]

    def _reading(self, what: str) -> contextlib.AbstractContextManager[None]:
        """Reads from PostgreSQL outside a commit: a lost server is a StorageError, and nothing was committed.

        A cache miss inside a transaction reads through here; the transaction
        ends with this error before it commits anything.
        """
        return self.lost_server(
            f"reading {what}",
            "nothing was committed",
            "it is safe to run the transaction again once the server answers",
        )

    @contextlib.contextmanager
    def lost_server(self, doing: str, outcome: str, fix: str) -> Iterator[None]:
        """A lost or restarting server while ``doing`` something, or an error the server reports (a full
        disk, say), is a StorageError that says ``outcome``."""
        import asyncpg

        try:
            yield
        except _connection_errors() as exc:
            raise StorageError(
                self.where(), f"the connection to PostgreSQL was lost while {doing} ({exc!r}); {outcome}", fix
            ) from exc
        except asyncpg.PostgresError as exc:
            raise StorageError(
                self.where(), f"PostgreSQL reported an error while {doing} ({_server_said(exc)}); {outcome}", fix
            ) from exc

    async def load(self, refs: list[Ref[Any]]) -> None:
        """Read refs this peer does not hold, in one query, at one snapshot; they join the cache.

        The peer applies the log up to that snapshot, no further, before it
        installs them (with the follower held meanwhile), so no commit to them
        between the snapshot and the install can be skipped.

        With a replica, they are read there first, and used only if its
        snapshot is at least this peer's basis, or if no commit after the
        snapshot up to the basis wrote them: otherwise the replica could hold a
        version older than a commit this peer has applied already (and skipped
        for these refs, which it did not hold). The peer then waits up to
        REPLICA_WAIT_SECONDS for the replica, and reads the primary after that.
        """
        cold = self.host._cold(refs)
        if not cold:
            return
        names = sorted({r.name for r in cold})
        shown = ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        with self._reading(f"the refs {shown}"):
            await self._load_cold(cold, names)

    async def _load_cold(self, cold: list[Ref[Any]], names: list[str]) -> None:
        pool = self.require_pool()
        if await self._load_from_replica(cold, names):
            return
        async with self._catching_up:
            async with pool.acquire() as conn:
                snap, rows, deltas = self._loaded(await conn.fetch(_LOAD, names))
            found = self._values(rows, deltas)
            self._known = max(self._known, snap)
            # apply up to the snapshot, not past it: those refs are still cold
            await self._catch_up_to(snap, locked=True, source="primary")
            with self.timeline.lock:
                self.host._warm(cold, found)

    @staticmethod
    def _loaded(records: list[Any]) -> tuple[int, list[Any], list[Any]]:
        """The basis, the ref rows and the delta rows (in t order per ref) of a _LOAD answer."""
        snap = next(r["t"] for r in records if r["kind"] == 0)
        rows = [r for r in records if r["kind"] == 1]
        deltas = sorted((r for r in records if r["kind"] == 2), key=lambda r: (r["name"], r["t"]))
        return int(snap), rows, deltas

    async def _load_from_replica(self, cold: list[Ref[Any]], names: list[str]) -> bool:
        """Install ``cold`` from the replica if its versions are the newest at this peer's basis; False if not."""
        deadline = time.monotonic() + REPLICA_WAIT_SECONDS
        delay = 0.001
        while True:
            pool = self._usable_replica()
            if pool is None:
                self._replica_skipped()
                return False
            try:
                with anyio.fail_after(REPLICA_TIMEOUT_SECONDS):
                    async with pool.acquire() as conn:
                        records = await conn.fetch(_LOAD, names)
                snap, rows, deltas = self._loaded(records)
            except _replica_errors() as exc:
                self._replica_failed(exc)
                return False
            self._replica_strikes = 0
            async with self._catching_up:
                # the rule: a version read at snap is the newest at this peer's basis if snap >= basis (the
                # peer then applies the log up to snap), or if no commit after snap up to the basis wrote it
                if snap >= self.timeline.t or self._unchanged_since(snap, names):
                    found = self._values(rows, deltas)
                    await self._catch_up_to(snap, locked=True, source="replica")
                    with self.timeline.lock:
                        self.host._warm(cold, found)
                    self.replica_reads += 1
                    return True
            if time.monotonic() + delay > deadline:
                self._replica_unserved_read(
                    f"the read replica lags more than {REPLICA_WAIT_SECONDS} s "
                    f"(it is at t={snap}, this peer at t={self.timeline.t})"
                )
                return False
            await anyio.sleep(delay)
            delay *= 2

    async def _schema(self, conn: asyncpg.Connection) -> None:
        import asyncpg

        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(727272)")  # one peer creates the schema
                exists = await conn.fetchval("SELECT to_regclass('astm_meta') IS NOT NULL")
                if exists:
                    version = await conn.fetchval("SELECT value FROM astm_meta WHERE key = 'schema_version'")
                    if version is not None and int(version) in (1, 2, 3, 4, 5, 6, 7):
                        for statement in _MIGRATE if int(version) < 3 else _MIGRATE_3:
                            await conn.execute(statement)
                        await conn.execute(
                            "UPDATE astm_meta SET value = $1 WHERE key = 'schema_version'", str(SCHEMA_VERSION)
                        )
                        version = str(SCHEMA_VERSION)
                    if version is None or int(version) != SCHEMA_VERSION:
                        raise StorageError(
                            self.where(),
                            f"schema version {version} is not the version {SCHEMA_VERSION} this astm uses",
                            "use the astm version that created it",
                        )
                    return
                for statement in _SCHEMA:
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO astm_meta VALUES ('schema_version', $1), ('t', '0') ON CONFLICT DO NOTHING",
                    str(SCHEMA_VERSION),
                )
        except asyncpg.InsufficientPrivilegeError as exc:
            raise StorageError(
                self.where(),
                f"the database user lacks a right the store needs ({exc})",
                "grant it CREATE on the schema (or create the astm tables as an owner) and USAGE, SELECT, "
                "INSERT, UPDATE, DELETE on them",
            ) from exc

    async def _listen(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.add_listener(CHANNEL, self._notified)
        except asyncpg.PostgresError as exc:  # e.g. behind a pooler in transaction mode
            await conn.close()
            self._can_listen = False
            log.warning("astm peer: LISTEN is not available (%s); following the log by polling", exc)
            return
        except BaseException:
            conn.terminate()
            raise
        self._listener = conn

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        self._heard = True
        head, _, rows = payload.partition(" ")
        t = int(head)
        if t > self._heard_t:
            self._heard_t = t
        if t > self._known:
            self._known = t
        if t > self.timeline.t and not (rows and self._apply_in_place(t, rows)):
            if rows:
                if len(self._pushed) < PUSHED_KEPT:
                    self._pushed.append((t, rows))  # parsed by whoever applies them
                else:  # far behind (a long catch-up): the log serves it, in chunks, and nothing piles up here
                    self._pushed.clear()
                    self._pushed_rows.clear()
            self._changed.set()
        if self._announced is not None:
            self._announced.set()

    def _apply_in_place(self, t: int, payload: str) -> bool:
        """Apply a notification's rows in its callback when they follow on from the basis; True if done.

        The common case of a peer keeping up: waking the follower task for it
        (an event, a cancel scope, the catch-up lock) cost more than applying
        the rows. Anything else is left to the follower, which applies it as
        before: rows queued or being applied already (their order), a read
        replica (it serves catch-ups), a ref with watches among the changes
        (they run in order in the follower), rows that do not start at the
        basis, or any error.
        """
        if self._pushed or self._pushed_rows or self.replica_pool is not None or self._catching_up.locked():
            return False
        tl = self.timeline
        held = self.host._refs
        try:
            rows = _parse_pushed(payload)
            if not rows or rows[0][0] != tl.t + 1 or rows[-1][0] != t:
                return False
            decoded = [(rt, when, decode_row(json.loads(changes))) for rt, when, changes in rows]
            for _, _, changes in decoded:
                for name, _ in changes:
                    r = held.get(name)
                    if r is not None and r._watches:
                        return False
            with tl.lock:
                wake, _ = self._apply_decoded(decoded)  # it skips what is applied and stops at a gap
        except Exception:  # rows it cannot read, an inconsistent log: the follower meets them too and says so
            return False
        for w in wake:
            w.fire()
        self.pushed_applied += 1
        return tl.t >= t

    def _take_pushed(self, start: int, upto: int | None) -> list[tuple[int, float, str]] | None:
        """The log rows notifications carried from ``start + 1`` on, contiguous, up to ``upto``; None if
        they do not start there (a notification was too large, or lost: read the log)."""
        rows = self._pushed_rows
        payloads, self._pushed = self._pushed, []
        for last, payload in payloads:
            if last <= start:
                continue  # applied already (its rows came another way): not worth parsing
            try:
                rows.extend(_parse_pushed(payload))
            except (ValueError, TypeError) as exc:  # not what astm_announce sends: the log has the rows
                log.warning("astm peer: a notification's rows could not be read (%r); reading the log", exc)
                rows.clear()
        while rows and rows[0][0] <= start:
            rows.popleft()
        if len(rows) > PUSHED_ROWS_KEPT:
            rows.clear()  # this peer is far behind its notifications: the log serves it
        if not rows or rows[0][0] != start + 1:
            return None
        out = []
        nxt = start + 1
        while rows and rows[0][0] == nxt and (upto is None or nxt <= upto):
            out.append(rows.popleft())
            nxt += 1
        return out

    # -- following the log -----------------------------------------------------------

    async def _follow(self) -> None:
        """Catch up on notifications, and every POLL_SECONDS in case one was lost; reconnect as needed.

        A listener that looks open but hears nothing while polls keep finding
        commits has lost its notifications silently: it is replaced. Where
        LISTEN is not available at all, the peer polls more often instead.
        """
        errors = _connection_errors()
        unannounced = 0
        last_trim = time.monotonic()
        lost = False  # the server, since the last attempt that reached it
        lost_log = _Throttle(LOST_LOG_SECONDS)
        try:
            while not self._closing:
                poll = POLL_SECONDS if self._can_listen else FALLBACK_POLL_SECONDS
                with anyio.move_on_after(poll) as waited:
                    await self._changed.wait()
                self._changed = anyio.Event()
                if self._closing:
                    break
                heard, self._heard = self._heard, False
                try:
                    if self._can_listen and (self._listener is None or self._listener.is_closed()):
                        if self._listener is not None:
                            self._listener.terminate()
                            self._listener = None
                        await self._listen()
                        self.reconnects += 1
                    before = self.timeline.t
                    if waited.cancelled_caught:
                        await self._check_known()
                        await self.catch_up()
                    elif not await self._apply_announced():
                        await self.catch_up()
                    if waited.cancelled_caught and not heard and self.timeline.t > before and self._can_listen:
                        unannounced += 1
                        if unannounced >= 2 and self._listener is not None:
                            log.warning("astm peer: notifications stopped arriving; reconnecting its listener")
                            self.silent_losses += 1
                            self._listener.terminate()
                            self._listener = None
                    else:
                        unannounced = 0
                    if time.monotonic() - last_trim > TRIM_SECONDS:
                        last_trim = time.monotonic()
                        await self._trim()
                    if lost:
                        lost = False
                        log.warning("astm peer reached PostgreSQL again")
                except errors as exc:
                    lost = True
                    held = lost_log.due()  # one line, not one per attempt
                    if held is not None:
                        again = f" ({held} more attempts failed since the last line)" if held else ""
                        log.warning("astm peer lost PostgreSQL (%s); reconnecting%s", exc, again)
                    if self._listener is not None:
                        self._listener.terminate()
                        self._listener = None
                    await anyio.sleep(0.2)
                except Exception:  # a follower that stops would leave this peer's reads behind for good
                    log.exception("astm peer could not apply the shared log; trying again in a second")
                    await anyio.sleep(1)
        finally:
            self._stopped.set()

    async def _apply_announced(self) -> bool:
        """Apply every commit announced or asked for: from the rows notifications carried, reading the log
        only for what they lack. True if that reached them all. Not with a replica: it serves catch-up reads."""
        if self.replica_pool is not None:
            return False
        target = max(self._known, self._asked)
        if self.timeline.t < target:
            await self._fetch_apply(self.require_pool(), target, False)
        if self.timeline.t < target:
            return False
        self._asked = 0
        return True

    async def _trim(self) -> None:
        """Drop log rows past history retention and a minute old (no peer resolving a commit needs them)."""
        pool = self.require_pool()
        keep = max(self.timeline.history, LOG_KEEP_MIN)
        async with pool.acquire() as conn:
            await conn.execute(
                "DELETE FROM astm_log WHERE t < (SELECT value::bigint FROM astm_meta WHERE key = 't') - $1 "
                "AND time < $2",
                keep,
                time.time() - LOG_KEEP_SECONDS,
            )
            await conn.execute("DELETE FROM astm_fence WHERE at < now() - interval '1 hour'")
            await conn.execute("DELETE FROM astm_results WHERE at < now() - interval '1 hour'")  # owners gone

    async def _check_known(self) -> None:
        """With a replica, learn the primary's t now and then (a poll): a replica that stopped replaying while
        notifications are lost too must not leave this peer behind for good."""
        if self.replica_pool is None or time.monotonic() - self._known_checked < POLL_SECONDS:
            return
        self._known_checked = time.monotonic()
        async with self.require_pool().acquire() as conn:
            t = int(await conn.fetchval("SELECT value FROM astm_meta WHERE key = 't'"))
        self._known = max(self._known, t)

    async def ask_for(self, t: int) -> None:
        """``sync(t)`` is ahead of this peer: have the follower look now rather than at its next poll."""
        if t > self.timeline.t:
            self._asked = max(self._asked, t)
            self._changed.set()

    async def catch_up(self, upto: int | None = None) -> None:
        """Apply every log row after this peer's basis (up to ``upto`` at least).

        With a replica, the rows come from it when it has them: the peer waits
        up to REPLICA_WAIT_SECONDS for it to reach the newest ``t`` known to be
        committed (or asked for by ``sync``), then reads the rest from the primary.
        """
        if upto is not None and self.timeline.t >= upto:
            return
        await self._catch_up_to(None)

    async def _catch_up_to(self, upto: int | None, locked: bool = False, source: str = "any") -> None:
        """Apply log rows after the basis, up to ``upto`` (or all), in chunks that let other tasks run.

        ``source``: "primary", "replica" (one read there, the primary for what it lacks), or "any" (the
        replica, waiting for it briefly, then the primary). The rows are fetched without holding the
        catch-up lock (fetches of several tasks overlap); applying them takes it, and skips what another
        task applied meanwhile. ``locked``: the caller holds it already.
        """
        if source != "primary" and self.replica_pool is not None:
            target = upto if upto is not None else max(self._known, self._asked)
            wait = REPLICA_WAIT_SECONDS if source == "any" else 0.0
            served = await self._catch_up_replica(upto, target, locked, wait)
            if served is None:
                return
            got = self.timeline.t
            await self._fetch_apply(self.require_pool(), upto, locked)
            if served and self.timeline.t > got:  # the primary had what the replica lacked
                if wait:
                    self._replica_unserved_read(
                        f"the read replica lags more than {wait} s (it had t={got}, the primary t={self.timeline.t})"
                    )
                else:
                    self.replica_fallbacks += 1  # the very newest commits: a replica rarely has them yet
        else:
            await self._fetch_apply(self.require_pool(), upto, locked)
        if upto is None:
            # the primary had nothing further: a t asked for beyond it is not committed yet
            self._known = max(self._known, self.timeline.t)
            self._asked = 0

    async def _catch_up_replica(self, upto: int | None, target: int, locked: bool, wait: float) -> bool | None:
        """Apply the replica's log rows until ``target``, waiting up to ``wait`` for it.

        None: done. True: it answered but fell short of ``target``. False: it failed (or is left alone).
        """
        deadline = time.monotonic() + wait
        delay = 0.001
        while True:
            pool = self._usable_replica()
            if pool is None:
                self._replica_skipped()
                return False
            if not await self._fetch_apply(pool, upto, locked, replica=True):
                return False
            if self.timeline.t >= target:
                self.replica_reads += 1
                return None
            if time.monotonic() + delay > deadline:
                return True
            await anyio.sleep(delay)
            delay *= 2

    async def _fetch_apply(self, pool: asyncpg.Pool, upto: int | None, locked: bool, replica: bool = False) -> bool:
        """Fetch and apply the log rows ``pool``'s server has after the basis, up to ``upto``.

        ``replica``: the fetches are the replica's (timed, their errors caught); False if it failed.
        """
        while upto is None or self.timeline.t < upto:
            start = self.timeline.t
            pushed = None if replica else self._take_pushed(start, upto)
            if pushed:
                if locked:
                    await self._apply(pushed)
                else:
                    async with self._catching_up:
                        await self._apply(pushed)
                self.pushed_applied += 1
                continue
            if replica:
                try:
                    with anyio.fail_after(REPLICA_TIMEOUT_SECONDS):
                        rows = await self._fetch_log(pool, start, upto)
                except _replica_errors() as exc:
                    self._replica_failed(exc)
                    return False
                self._replica_strikes = 0
            else:
                rows = await self._fetch_log(pool, start, upto)
            if not rows:
                break
            if locked:
                await self._apply_fetched(rows, start)
            else:
                async with self._catching_up:
                    await self._apply_fetched(rows, start)
            if len(rows) == CATCH_UP_CHUNK:
                await anyio.lowlevel.checkpoint()  # a long gap: let the loop breathe between chunks
        return True

    async def _fetch_log(self, pool: asyncpg.Pool, start: int, upto: int | None) -> list[Any]:
        self.log_reads += 1
        async with pool.acquire() as conn:
            return list(await conn.fetch(_LOG, start, sys.maxsize if upto is None else upto, CATCH_UP_CHUNK))

    async def _apply_fetched(self, rows: list[Any], start: int) -> None:
        """Apply rows fetched from ``start`` on (holding the catch-up lock)."""
        if rows[0]["t"] > start + 1:
            # the log was trimmed past this peer's basis: start again from the refs table
            with self.timeline.lock:
                if self.timeline.t == start:
                    self.host._rebase(rows[0]["t"] - 1)
                    self._recent.clear()
        await self._apply([r for r in rows if r["t"] > self.timeline.t])

    async def _apply(self, rows: list[Any]) -> None:
        tl = self.timeline
        decoded = [(t, when, decode_row(json.loads(changes))) for t, when, changes in rows]
        with tl.lock:
            wake, watched = self._apply_decoded(decoded)
        for x in wake:
            x.fire()
        if watched:
            await run_watches(watched)

    def _apply_decoded(
        self,
        decoded: list[tuple[int, float, list[tuple[str, tuple[Any, ...]]]]],
        kinds: list[tuple[str, str, str, Any]] | None = None,
    ) -> tuple[list[Waiter], list[tuple[Ref[Any], Any, Any]]]:
        """Apply decoded log rows in t order from the basis on (under the timeline's lock).

        Returns the waiters to wake and the changes of watched refs. Rows at or
        before the basis are skipped; it stops at a gap. The delta chains count
        each change's kind as logged; ``kinds``: this peer's own commit (one
        row), whose changes hold whole values, and these are what it logged.
        """
        tl = self.timeline
        wake: list[Waiter] = []
        watched: list[tuple[Ref[Any], Any, Any]] = []
        for t, when, changes in decoded:
            if t <= tl.t:
                continue
            if t != tl.t + 1:
                break  # never past a commit not applied (the caller reads the log from here)
            applied, w, any_watched = self.host._apply_logged(t, when, changes, self.where())
            self._record(t, changes)
            counts = self.deltas
            logged = [(name, change[0]) for name, change in changes] if kinds is None else [k[:2] for k in kinds]
            for name, kind in logged:
                counts[name] = counts.get(name, 0) + 1 if kind == "d" else 0
            if w:
                wake.extend(w)
            if any_watched:
                watched.extend(applied)
        return wake, watched

    def _record(self, t: int, changes: list[tuple[str, Any]]) -> None:
        """Remember the names commit ``t`` wrote (just applied, under the lock); kept contiguous in t."""
        recent = self._recent
        if recent and recent[-1][0] != t - 1:
            recent.clear()
        recent.append((t, frozenset(name for name, _ in changes)))

    def _unchanged_since(self, snap: int, names: list[str]) -> bool:
        """Whether no commit after ``snap`` up to the basis wrote any of ``names`` (under the catch-up lock).

        Then a ref's newest version at ``snap`` is its newest at the basis too. False when this peer does
        not remember every commit after ``snap``.
        """
        recent = self._recent
        if not recent or recent[-1][0] != self.timeline.t or recent[0][0] > snap + 1:
            return False
        for t, written in reversed(recent):
            if t <= snap:
                break
            if not written.isdisjoint(names):
                return False
        return True

    async def apply_own(self, commits: list[tuple[int, _Own]]) -> None:
        """This peer's own commits, just acknowledged: applied from what it sent, not read back.

        Only the commits of other peers in between (if any) are read from the log.
        """
        if not commits:
            return
        tl = self.timeline
        for t, (when, changes, kinds) in sorted(commits, key=lambda c: c[0]):
            if tl.t >= t:
                continue
            # the other peers' commits in between, if any: from their notification, which is usually on its
            # way (they committed first), else from the primary (a replica has rarely replayed them yet)
            await self._await_announced(t - 1)
            await self._catch_up_to(t - 1, source="primary")
            async with self._catching_up:
                with tl.lock:
                    if tl.t != t - 1:
                        continue
                    wake, watched = self._apply_decoded([(t, when, changes)], kinds)
            for w in wake:
                w.fire()
            if watched:
                await run_watches(watched)

    async def _await_announced(self, t: int) -> None:
        """Wait up to ANNOUNCE_WAIT_SECONDS for the notification of commit ``t`` (cheaper than a log read);
        not when this peer has it already, hears no notifications, or reads catch-ups from a replica."""
        if self.timeline.t >= t or self._heard_t >= t or self._listener is None or self.replica_pool is not None:
            return
        with anyio.move_on_after(ANNOUNCE_WAIT_SECONDS):
            while self._heard_t < t:
                announced = self._announced = anyio.Event()
                await announced.wait()

    async def catch_up_after(self, t: int, committed: bool = True) -> None:
        """Apply the log up to ``t``, riding out a reconnect: this peer's own commit (``committed``), or the
        newest commit a refused one conflicted with (before the transaction runs again)."""
        errors = _connection_errors()
        deadline = time.monotonic() + RESOLVE_SECONDS
        self._known = max(self._known, t)
        while True:
            try:
                await self._await_announced(t)  # its notification carries it, usually at once
                if self.timeline.t < t:
                    await self._catch_up_to(t, source="primary")  # the newest commits: the primary has them
                return
            except Exception as exc:
                lost = isinstance(exc, errors)
                if lost and time.monotonic() <= deadline:
                    await anyio.sleep(0.1)
                    continue
                if not committed:
                    if not lost:
                        raise
                    raise StorageError(
                        self.where(),
                        f"the transaction conflicted with commits up to t={t}, so it was not committed, and "
                        f"this peer cannot read them to run it again ({exc!r})",
                        "it is safe to run it again once the server answers",
                    ) from exc
                # the commit stands whatever applying it here met: never "not committed"
                failed = "cannot read the log to apply it" if lost else "failed to apply the log up to it"
                raise CommittedNotApplied(
                    self.where(),
                    f"committed at t={t}, but this peer {failed} ({exc!r})",
                    "the commit is durable: do not run the transaction again; this peer shows it once it can "
                    f"read the log (await store.sync({t}))",
                    t,
                ) from exc

    # -- closing ---------------------------------------------------------------------

    async def close(self) -> None:
        """Stop following the log, then close every connection."""
        self._closing = True
        self._changed.set()
        await self.committer.stop()
        if self.pool is None:
            return
        if self._following:
            with anyio.move_on_after(5):
                await self._stopped.wait()
        if self._listener is not None:
            try:
                with anyio.fail_after(2):
                    await self._listener.close()
            except Exception:
                self._listener.terminate()
        await self._close_pools()

    async def _close_pools(self) -> None:
        for pool in (self.pool, self.replica_pool):
            if pool is None:
                continue
            try:
                with anyio.fail_after(5):
                    await pool.close()
            except Exception:
                pool.terminate()
        self.pool = self.replica_pool = None


class PostgresLog:
    """The log storage face of a peer: every commit is durable in PostgreSQL before it is applied here."""

    #: refs keep their encoded value (a commit's log row carries old and new)
    encodes = True

    def __init__(self, peer: PostgresStorage) -> None:
        self._peer = peer
        self.failed: BaseException | None = None

    @property
    def durable_t(self) -> int:
        return self._peer.timeline.t

    def recover(self) -> Recovered:  # pragma: no cover - a peer opens asynchronously (PostgresStorage.open)
        return Recovered()

    def refusal(self) -> Exception:  # pragma: no cover - a peer's commits are refused by the server
        raise AssertionError("a PostgreSQL peer does not refuse commits locally")

    def submit(self, t: int, record: CommitRecord | None) -> None:  # pragma: no cover
        raise AssertionError("a PostgreSQL peer commits through PostgresCommitter")

    async def wait_durable(self, t: int) -> None:
        return None

    def close(self) -> None:  # pragma: no cover - closed by PostgresStorage.close
        return None


class PostgresCommitter:
    """Commits validated by ``astm_commit_batch`` in PostgreSQL, then applied here from the log."""

    def __init__(self, peer: PostgresStorage) -> None:
        self._peer = peer
        self._queue: list[tuple[uuid.UUID, dict[str, Any], Waiter, _Own]] = []
        self._sending = False
        #: answered batches waiting to be applied, in the order they were sent
        self._answered: deque[tuple[list[tuple[uuid.UUID, dict[str, Any], Waiter, _Own]], list[Any]]] = deque()
        self._applying = False
        self._stopped = False
        self._conn: asyncpg.Connection | None = None

    async def stop(self) -> None:
        self._stopped = True
        if self._conn is not None:
            try:
                with anyio.fail_after(2):
                    await self._conn.close()
            except Exception:
                self._conn.terminate()
            self._conn = None

    async def commit(self, request: CommitRequest) -> Committed:
        """Validate and commit ``request`` in PostgreSQL; returns once this peer has applied it.

        Raises ``_Conflict`` to run the body again.
        """
        peer = self._peer
        tl = peer.timeline
        peer.require_pool()
        tx_id = uuid.uuid4()
        while True:
            with tl.lock:
                bad = request.stale_reads()
                if bad:
                    raise _Conflict(bad)
                commuted = request.finish()
                changes = self._whole_after(encode_changes(request))
                reads = [{"name": n, "t": t} for n, t in request.versions(request.reads)]
                commutes = [{"name": n, "t": t} for n, t in request.versions(commuted)]
            writes = []
            for name, kind, text, _ in changes:
                if kind == "v":
                    writes.append({"name": name, "kind": "v", "value": text})
                elif kind == "n":
                    writes.append({"name": name, "kind": "v", "value": codec.text(json.loads(text)[0])})
                elif kind == "x":
                    writes.append({"name": name, "kind": "x"})
                else:
                    base, calls = json.loads(text)
                    writes.append({"name": name, "kind": "d", "base": base, "calls": codec.text(calls)})
            now = time.time()
            payload = {
                "id": str(tx_id),
                "time": now,
                "reads": reads,
                "commutes": commutes,
                "writes": writes,
                "changes": row_text(changes),
                "outbox": [
                    {"seq": seq, "effect": name, "payload": p, "order_key": ok}
                    for seq, name, p, ok in encode_outbox(request.outbox)
                ],
            }
            own: _Own = (now, [(name, ("v", value)) for name, _, _, value in changes], changes)
            result = await self._batched(tx_id, payload, own)
            status, t = result["status"], result["t"]
            await peer.catch_up_after(t, committed=status == "ok")
            if status == "ok":
                with tl.lock:
                    peer.host._touch(request.vals)
                    peer.host._touch(request.reads)
                    entry = tl.entry(t)
                    host = peer.host
                    host._counts.commits += 1
                    host._counts.attempts += request.attempts
                    if request.pin:
                        tl.pin(t - 1)
                        tl.pin(t)
                changes_applied = entry[2] if entry is not None else [(r, None, v) for r, v in request.vals.items()]
                return t, changes_applied, None, False
            if status == "stale":
                continue  # only commuted refs moved: re-apply the commutes, not the body
            if status == "fenced":  # pragma: no cover - a live connection never sends a fenced id
                raise StorageError(peer.where(), "this commit was fenced after a lost connection", "run it again")
            refs = peer.host._refs
            raise _Conflict([refs[n] for n in result["names"] if n in refs])

    def _whole_after(self, changes: list[tuple[str, str, str, Any]]) -> list[tuple[str, str, str, Any]]:
        """Send a ref's whole value instead of a delta once its chain of deltas is long (a bounded chain).

        The bound grows with the value's size (see MAX_CHAIN), so re-sending a
        large value costs each commit about as little as a small one.
        """
        counts = self._peer.deltas
        out = []
        for change in changes:
            name, kind, _, value = change
            if kind == "d" and counts.get(name, 0) >= _chain_bound(value):
                change = (name, "v", codec.dumps(value, f"ref {name!r}"), value)
            out.append(change)
        return out

    async def _batched(self, tx_id: uuid.UUID, payload: dict[str, Any], own: _Own) -> dict[str, Any]:
        """Queue one commit for the sender task, which sends everything queued in one round trip.

        While a batch is in flight, later commits queue up and go together in
        the next one, so a busy peer pays one round trip (one WAL flush) for
        many commits. The round trip runs in the sender's own task: cancelling
        a caller takes its commit out of the queue if it has not been sent, and
        never touches the commits of other callers.
        """
        w = Waiter()
        item = (tx_id, payload, w, own)
        self._queue.append(item)
        if not self._sending:
            self._sending = True
            spawn(self._send_loop)
        try:
            await w.wait()
        except BaseException:
            if item in self._queue:
                self._queue.remove(item)  # not sent: it will not commit
            raise
        if isinstance(w.payload, BaseException):
            raise w.payload
        return w.payload  # type: ignore[no-any-return]

    async def _send_loop(self) -> None:
        """Send queued batches one after another; their answers are applied by a task of their own.

        Applying a batch (reading the other peers' commits in between, then
        installing this peer's own) overlaps with sending the next one.
        """
        try:
            while self._queue:
                batch, self._queue = self._queue[:BATCH_MAX], self._queue[BATCH_MAX:]
                try:
                    results = await self._send([p for _, p, _, _ in batch], [i for i, _, _, _ in batch])
                except BaseException as exc:
                    for _, _, bw, _ in batch:
                        bw.fire(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                self._answered.append((batch, results))
                if not self._applying:
                    self._applying = True
                    spawn(self._apply_loop)
        finally:
            self._sending = False
            if self._queue and not self._stopped:
                self._sending = True
                spawn(self._send_loop)

    async def _apply_loop(self) -> None:
        """Install this peer's acknowledged commits in t order, then wake their callers."""
        try:
            while self._answered:
                batch, results = self._answered.popleft()
                mine = [(res["t"], own) for (_, _, _, own), res in zip(batch, results, strict=True)
                        if isinstance(res, dict) and res["status"] == "ok"]  # fmt: skip
                try:
                    await self._peer.apply_own(mine)
                except _connection_errors():
                    pass  # each committer reads its commit back
                except Exception:  # the commits stand: their callers must hear so, and read them back
                    log.exception("astm peer could not apply its own commits; each caller reads its commit back")
                for (_, _, bw, _), res in zip(batch, results, strict=True):
                    bw.fire(res)
        finally:
            self._applying = False
            if self._answered and not self._stopped:
                self._applying = True
                spawn(self._apply_loop)

    async def _send(self, payloads: list[dict[str, Any]], ids: list[uuid.UUID]) -> list[Any]:
        """One round trip for a batch. If the connection drops, each outcome is looked up and fenced.

        Committed: the commit stands. Not committed: a clear ``StorageError``
        (safe to run again), and the id is fenced so the request can no longer
        commit. Unreachable for ``RESOLVE_SECONDS``: ``CommitOutcomeUnknown``.
        Never re-sent, never re-run.
        """
        import asyncpg

        peer = self._peer
        peer.require_pool()
        errors = _connection_errors()
        queued = False
        conn = self._conn
        if conn is None or conn.is_closed():
            # a connection of its own: no pool reset (two round trips) after every commit
            try:
                conn = self._conn = await asyncpg.connect(peer.dsn)
            except (*errors, asyncpg.PostgresError) as exc:
                unsent = StorageError(
                    peer.where(),
                    f"cannot connect to PostgreSQL ({_cause_of(exc)}), so the commit was not sent; "
                    "the transaction was not committed",
                    "it is safe to run it again once the server answers",
                )
                unsent.__cause__ = exc
                return [unsent] * len(ids)
        try:
            answer = await conn.fetchval(_COMMIT, json.dumps(payloads))
            if answer is None:  # queued behind another peer's commit: take our results when our turn comes
                queued = True
                mine = json.loads(await conn.fetchval(_PENDING, ids))
                return [mine[str(i)] for i in ids]
            return list(json.loads(answer))
        except errors as exc:
            if self._conn is not None:
                self._conn.terminate()
                self._conn = None
            return await self.resolve(ids, exc)
        except asyncpg.PostgresError as exc:
            if queued:
                # the batch waits in the queue, where another peer's commit may have taken it up: look it up
                return await self.resolve(ids, exc)
            # the server refused the call, so its transaction rolled back: nothing of the batch committed
            refused = StorageError(
                peer.where(),
                f"PostgreSQL refused the commit ({_server_said(exc)}); the transaction was not committed",
                "fix the cause on the server (a full disk: free space there), then run it again",
            )
            refused.__cause__ = exc
            return [refused] * len(ids)

    async def resolve(self, ids: list[uuid.UUID], first: BaseException) -> list[Any]:
        """The outcome of each commit whose connection dropped: committed (its t), or fenced and not committed."""
        import asyncpg

        peer = self._peer
        pool = peer.require_pool()
        # a lost server, or one that refuses the lookup or the fence (a full disk): try again until the deadline
        errors = (*_connection_errors(), asyncpg.PostgresError)
        deadline = time.monotonic() + RESOLVE_SECONDS
        while time.monotonic() < deadline:
            await anyio.sleep(0.1)
            try:
                async with pool.acquire() as conn, conn.transaction():
                    # the commit lock: waits out a batch still running on the dropped connection
                    await conn.execute("SELECT pg_advisory_xact_lock(7272727)")
                    found = dict(await conn.fetch("SELECT tx_id, t FROM astm_log WHERE tx_id = ANY($1)", ids))
                    missing = [i for i in ids if i not in found]
                    if missing:
                        # still queued: take it out, so no peer's commit call takes it up later
                        await conn.execute("DELETE FROM astm_pending WHERE id = ANY($1)", missing)
                        await conn.execute("DELETE FROM astm_results WHERE id = ANY($1)", missing)
                        # fence them: the orphaned request, should it still run, can no longer commit
                        await conn.executemany(
                            "INSERT INTO astm_fence (tx_id) VALUES ($1) ON CONFLICT DO NOTHING", [(i,) for i in missing]
                        )
            except errors:
                continue
            lost = StorageError(
                peer.where(),
                f"{_what_failed(first)} ({_cause_of(first)}); the transaction was not committed",
                "it is safe to run it again",
            )
            lost.__cause__ = first
            return [{"status": "ok", "t": found[i]} if i in found else lost for i in ids]
        raise CommitOutcomeUnknown(
            peer.where(),
            f"{_what_failed(first)}, and its outcome is unknown ({_cause_of(first)})",
            "the transaction may or may not have committed; check with a fresh read once the server is back",
        ) from first


class PostgresOutbox:
    """The outbox in PostgreSQL, shared by every peer (claimed with leases)."""

    def __init__(self, peer: PostgresStorage) -> None:
        self._peer = peer
        #: refused claims are logged rarely (the dispatcher claims every OUTBOX_POLL_SECONDS)
        self._refused_log = _Throttle(CLAIM_REFUSED_LOG_SECONDS)

    def committed(self, t: int, entries: list[tuple[str, Any, Hashable | None]]) -> None:
        return None  # committed with the transaction; the dispatcher's kick claims them

    async def claim(self, limit: int, effects: Collection[str]) -> list[OutboxEntry]:
        peer = self._peer
        if peer.pool is None or peer._closing:
            return []
        import asyncpg

        try:
            async with peer.pool.acquire() as conn:
                rows = await conn.fetch(_CLAIM, limit, list(effects))
        except _connection_errors():
            return []
        except asyncpg.PostgresError as exc:
            # a full disk, a lock timeout: nothing was claimed, and the dispatcher must live on to claim again
            if self._refused_log.due() is not None:
                log.warning("astm outbox: PostgreSQL refused to claim due entries (%s); retrying", _server_said(exc))
            return []
        return [
            OutboxEntry((r["t"], r["seq"]), r["effect"], codec.loads(r["payload"]), None, r["attempts"]) for r in rows
        ]

    async def _execute(self, query: str, *args: Any, doing: str, outcome: str, fix: str = "") -> str:
        pool = self._peer.require_pool()
        with self._peer.lost_server(doing, outcome, fix):
            async with pool.acquire() as conn:
                return str(await conn.execute(query, *args))

    async def _settle(self, entry: OutboxEntry, query: str, *args: Any) -> None:
        """Record what became of a claimed entry; with the server lost, its lease runs out and it comes again."""
        await self._execute(
            query,
            *entry.key,
            *args,
            doing=f"recording what became of outbox entry {entry.key} ({entry.effect!r})",
            outcome=f"the entry stays claimed until its lease ends ({OUTBOX_LEASE}), then it is delivered again",
        )

    async def done(self, entry: OutboxEntry) -> None:
        await self._settle(entry, "DELETE FROM astm_outbox WHERE t = $1 AND seq = $2")

    async def retry(self, entry: OutboxEntry, error: str, delay: float) -> None:
        await self._settle(
            entry,
            "UPDATE astm_outbox SET locked_until = NULL, next_at = now() + make_interval(secs => $3) "
            "WHERE t = $1 AND seq = $2",
            delay,
        )

    async def dead(self, entry: OutboxEntry, error: str) -> None:
        await self._settle(
            entry, "UPDATE astm_outbox SET locked_until = NULL, error = $3 WHERE t = $1 AND seq = $2", _text_safe(error)
        )

    async def requeue(self, key: Key | None) -> int:
        lost = {
            "doing": "requeueing dead letters",
            "outcome": "they may or may not have been requeued",
            "fix": "call requeue() again once the server answers (requeueing twice does no harm)",
        }
        if key is None:
            done = await self._execute(
                "UPDATE astm_outbox SET error = NULL, attempts = 0, next_at = now() WHERE error IS NOT NULL", **lost
            )
        else:
            done = await self._execute(
                "UPDATE astm_outbox SET error = NULL, attempts = 0, next_at = now() "
                "WHERE t = $1 AND seq = $2 AND error IS NOT NULL",
                *key,
                **lost,
            )
            if done.split()[-1] == "0":
                raise KeyError(f"no dead letter with key {key!r}")
        return int(done.split()[-1])

    async def dead_letters(self) -> list[OutboxEntry]:
        pool = self._peer.require_pool()
        with self._peer.lost_server("reading the outbox's dead letters", "nothing changed", "ask again later"):
            async with pool.acquire() as conn:
                rows = await conn.fetch(
                    "SELECT t, seq, effect, payload, attempts, error FROM astm_outbox "
                    "WHERE error IS NOT NULL ORDER BY t, seq"
                )
        out = []
        for r in rows:
            entry = OutboxEntry((r["t"], r["seq"]), r["effect"], codec.loads(r["payload"]), None, r["attempts"])
            entry.error = r["error"]
            out.append(entry)
        return out

    async def pending(self, effects: Collection[str] | None = None) -> int:
        pool = self._peer.require_pool()
        with self._peer.lost_server("counting the pending outbox entries", "nothing changed", "ask again later"):
            async with pool.acquire() as conn:
                if effects is None:
                    return int(await conn.fetchval("SELECT count(*) FROM astm_outbox WHERE error IS NULL"))
                return int(
                    await conn.fetchval(
                        "SELECT count(*) FROM astm_outbox WHERE error IS NULL AND effect = ANY($1)", list(effects)
                    )
                )

    def next_due(self) -> float | None:
        if self._peer._closing:
            return None
        # other peers commit entries too, and nothing tells this one: look again soon
        return time.monotonic() + OUTBOX_POLL_SECONDS
