"""Many processes, one state: the PostgreSQL store (peers in the style of Datomic).

``Store("postgresql://user@host/db")``, opened with ``async with store:``.
Each process is a peer: it keeps the refs in memory with their versions and
runs transactions locally at its basis ``t``. A commit sends the versions it
read, its writes and its outbox entries to PostgreSQL in one round trip
(``astm_commit``), which takes the global commit lock, validates the read
versions (serializable), gives the commit the next ``t`` and appends it to the
log. A conflict retries the body locally; a conflict only on commuted refs
re-applies the commutes to fresh values without running the body again.

Peers apply the global log in ``t`` order, their own commits included: they
learn of commits through LISTEN/NOTIFY and catch up from the log table, and
poll it as well, so a lost notification or a reconnect never leaves a peer
silently stale.

A commit whose outcome is unknown (the connection dropped after sending it)
is resolved by looking its transaction id up in the log, under the commit
lock, never by running the body again. The outbox lives in PostgreSQL: any
peer delivers entries (``FOR UPDATE SKIP LOCKED``), at least once, with the
same ``(t, seq)`` key on every redelivery, one at a time per ``order_key``.
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from typing import TYPE_CHECKING, Any

import anyio

from .. import codec
from .._backend import Waiter, spawn
from .._errors import StorageError, _Conflict

if TYPE_CHECKING:
    import asyncpg

    from .._ref import Ref
    from .._store import Store
    from .._tx import Transaction

__all__ = ["SCHEMA_VERSION", "PostgresStorage"]

log = logging.getLogger("astm")

SCHEMA_VERSION = 1
CHANNEL = "astm_commits"
POLL_SECONDS = 1.0
OUTBOX_POLL_SECONDS = 0.2
OUTBOX_LEASE = "30 seconds"
#: how long a commit whose connection dropped keeps trying to learn its outcome
RESOLVE_SECONDS = 10.0

_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS astm_meta (key text PRIMARY KEY, value text NOT NULL)",
    "CREATE TABLE IF NOT EXISTS astm_refs (name text PRIMARY KEY, t bigint NOT NULL, value text NOT NULL)",
    """CREATE TABLE IF NOT EXISTS astm_log (
        t bigint PRIMARY KEY, tx_id uuid NOT NULL UNIQUE, time double precision NOT NULL, changes text NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS astm_outbox (
        t bigint NOT NULL, seq int NOT NULL, effect text NOT NULL, payload text NOT NULL, order_key text,
        attempts int NOT NULL DEFAULT 0, error text, next_at timestamptz NOT NULL DEFAULT now(),
        locked_until timestamptz, PRIMARY KEY (t, seq))""",
    """CREATE OR REPLACE FUNCTION astm_commit_batch(p_batch jsonb) RETURNS jsonb
    LANGUAGE plpgsql AS $$
    DECLARE
        cur bigint;
        tx jsonb;
        bad text[];
        results jsonb := '[]'::jsonb;
    BEGIN
        SELECT m.value::bigint INTO cur FROM astm_meta m WHERE m.key = 't' FOR UPDATE;  -- the commit lock
        FOR tx IN SELECT * FROM jsonb_array_elements(p_batch) LOOP
            -- each transaction is validated against the state the earlier ones left
            SELECT array_agg(r.name) INTO bad
              FROM astm_refs r JOIN jsonb_to_recordset(tx->'reads') AS x(name text, t bigint) ON r.name = x.name
             WHERE r.t > x.t;
            IF bad IS NOT NULL THEN
                results := results || jsonb_build_array(
                    jsonb_build_object('status', 'conflict', 't', cur, 'names', to_jsonb(bad)));
                CONTINUE;
            END IF;
            SELECT array_agg(r.name) INTO bad
              FROM astm_refs r JOIN jsonb_to_recordset(tx->'commutes') AS x(name text, t bigint) ON r.name = x.name
             WHERE r.t > x.t;
            IF bad IS NOT NULL THEN
                results := results || jsonb_build_array(
                    jsonb_build_object('status', 'stale', 't', cur, 'names', to_jsonb(bad)));
                CONTINUE;
            END IF;
            cur := cur + 1;
            INSERT INTO astm_refs (name, t, value)
                 SELECT x.name, cur, x.value FROM jsonb_to_recordset(tx->'writes') AS x(name text, value text)
            ON CONFLICT (name) DO UPDATE SET t = excluded.t, value = excluded.value;
            INSERT INTO astm_log (t, tx_id, time, changes)
                 VALUES (cur, (tx->>'id')::uuid, (tx->>'time')::double precision, tx->>'changes');
            INSERT INTO astm_outbox (t, seq, effect, payload, order_key)
                 SELECT cur, x.seq, x.effect, x.payload, x.order_key
                   FROM jsonb_to_recordset(tx->'outbox') AS x(seq int, effect text, payload text, order_key text);
            results := results || jsonb_build_array(jsonb_build_object('status', 'ok', 't', cur));
        END LOOP;
        UPDATE astm_meta SET value = cur::text WHERE key = 't';
        PERFORM pg_notify('astm_commits', cur::text);
        RETURN results;
    END $$""",
]

_COMMIT = "SELECT astm_commit_batch($1::jsonb)"
#: the most transactions one round trip carries
BATCH_MAX = 64

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


class PostgresStorage:
    """The PostgreSQL backend of a store: a peer of every other process using the same database."""

    remote = True

    def __init__(self, dsn: str, store: Store) -> None:
        try:
            import asyncpg  # noqa: F401
        except ImportError:  # pragma: no cover - an extra
            raise StorageError(
                dsn, "the PostgreSQL store needs asyncpg", "pip install 'astm-state[postgres]'"
            ) from None
        self.dsn = dsn
        self.store = store
        self.durable_t = 0
        self.pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._catching_up = anyio.Lock()
        self._changed = anyio.Event()
        self._closing = False
        self._stopped = anyio.Event()
        self._delivery_stopped = anyio.Event()
        self._peer = uuid.uuid4().hex[:12]
        self._queue: list[tuple[uuid.UUID, dict[str, Any], Waiter]] = []
        #: times this peer lost its notification connection and opened a new one
        self.reconnects = 0
        self._sending = False

    # -- opening ---------------------------------------------------------------------

    async def open(self) -> None:
        import asyncpg

        try:
            self.pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=8)
        except _connection_errors() as exc:
            raise StorageError(
                self._where(), f"cannot connect ({exc})", "check the URL and that the server runs"
            ) from exc
        try:
            async with self.pool.acquire() as conn:
                await self._schema(conn)
                # one snapshot: the basis t, the values at t and the log up to t agree
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    t = int(await conn.fetchval("SELECT value FROM astm_meta WHERE key = 't'"))
                    rows = await conn.fetch("SELECT name, t, value FROM astm_refs")
                    history = await conn.fetch(
                        "SELECT t, time, changes FROM astm_log WHERE t > $1 AND t <= $2 ORDER BY t",
                        t - self.store._history,
                        t,
                    )
        except BaseException:
            await self.pool.close()
            self.pool = None
            raise
        store = self.store
        with store._lock:
            store._t = t
            for name, rt, value in rows:
                self._install(name, rt, codec.loads(value), value)
            for rt, when, changes in history:
                entry = [(store._refs[n], codec.decode(o), codec.decode(v)) for n, o, v in json.loads(changes)]
                store._log.append((rt, when, entry))
            store._oldest = history[0]["t"] - 1 if history else t
            store._trim_len = len(store._log) + max(1, store._history // 8)
        self.durable_t = t
        await self._listen()
        spawn(self._follow)
        spawn(self._deliver_loop)

    async def _schema(self, conn: asyncpg.Connection) -> None:
        import asyncpg

        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(727272)")  # one peer creates the schema
                exists = await conn.fetchval("SELECT to_regclass('astm_meta') IS NOT NULL")
                if exists:
                    version = await conn.fetchval("SELECT value FROM astm_meta WHERE key = 'schema_version'")
                    if version is None or int(version) != SCHEMA_VERSION:
                        raise StorageError(
                            self._where(),
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
                self._where(),
                f"the database user lacks a right the store needs ({exc})",
                "grant it CREATE on the schema (or create the astm tables as an owner) and USAGE, SELECT, "
                "INSERT, UPDATE, DELETE on them",
            ) from exc

    def _where(self) -> str:
        import urllib.parse

        p = urllib.parse.urlsplit(self.dsn)
        return f"postgresql://{p.hostname}:{p.port or 5432}{p.path}"

    async def _listen(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.dsn)
        await conn.add_listener(CHANNEL, self._notified)
        self._listener = conn

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        if int(payload) > self.store._t:
            self._changed.set()

    # -- following the log -----------------------------------------------------------

    async def _follow(self) -> None:
        """Catch up on notifications, and every POLL_SECONDS in case one was lost; reconnect as needed."""
        errors = _connection_errors()
        while not self._closing:
            with anyio.move_on_after(POLL_SECONDS):
                await self._changed.wait()
            self._changed = anyio.Event()
            if self._closing:
                break
            try:
                if self._listener is None or self._listener.is_closed():
                    if self._listener is not None:
                        self._listener.terminate()
                        self._listener = None
                    await self._listen()
                    self.reconnects += 1
                await self.catch_up()
            except errors as exc:
                log.warning("astm peer lost PostgreSQL (%s); reconnecting", exc)
                if self._listener is not None:
                    self._listener.terminate()
                    self._listener = None
                await anyio.sleep(0.2)
        self._stopped.set()

    async def catch_up(self, upto: int | None = None) -> None:
        """Apply every log row after this peer's basis (up to ``upto`` at least)."""
        assert self.pool is not None
        async with self._catching_up:
            if upto is not None and self.store._t >= upto:
                return
            async with self.pool.acquire() as conn:
                rows = await conn.fetch("SELECT t, time, changes FROM astm_log WHERE t > $1 ORDER BY t", self.store._t)
            if rows:
                await self._apply(rows)

    async def _apply(self, rows: list[Any]) -> None:
        store = self.store
        wake: list[Waiter] = []
        watched: list[tuple[Ref[Any], Any, Any]] = []
        with store._lock:
            for t, when, changes in rows:
                if t <= store._t:
                    continue
                assert t == store._t + 1, f"log gap: at {store._t}, got {t}"
                applied = []
                for name, old_json, new_json in json.loads(changes):
                    new = codec.decode(new_json)
                    r = store._refs.get(name)
                    if r is None:
                        r = self._install(name, 0, codec.decode(old_json), json.dumps(old_json))
                    old = r._cur[1]
                    r._cur = (t, new)
                    r._enc = json.dumps(new_json, separators=(",", ":"), ensure_ascii=False)
                    applied.append((r, old, new))
                    if r._waiters:
                        wake.extend(r._waiters)
                        r._waiters = None
                    if r._watches:
                        watched.append((r, old, new))
                store._t = t
                store._log.append((t, when, applied))
                if len(store._log) >= store._trim_len:
                    store._trim(t)
            self.durable_t = store._t
            if store._tick:
                wake.extend(store._tick)
                store._tick = []
        for w in wake:
            w.fire()
        for r, old, new in watched:
            for key, fn in list((r._watches or {}).items()):
                try:
                    res = fn(key, r, old, new)
                    if hasattr(res, "__await__"):
                        await res
                except Exception:
                    log.exception("watch %r on ref %r failed", key, r.name)

    def _install(self, name: str, t: int, value: Any, enc: str) -> Ref[Any]:
        from .._ref import Ref

        store = self.store
        r = store._refs.get(name)
        if r is None:
            r = Ref(store, name, value, None, len(store._refs))
            store._refs[name] = r
        r._cur = (t, value)
        r._enc = enc
        return r

    # -- committing ------------------------------------------------------------------

    async def commit(self, tx: Transaction) -> tuple[int, list[tuple[Ref[Any], Any, Any]]]:
        """Validate and commit ``tx`` in PostgreSQL; returns (t, changes) once this peer has applied it.

        Raises ``_Conflict`` to run the body again.
        """
        store = self.store
        if self.pool is None:
            raise StorageError(
                self._where(),
                "the store is not open",
                "open it first: `async with store:` (or await store.__aenter__())",
            )
        tx_id = uuid.uuid4()
        while True:
            with store._lock:
                rp = tx.rp
                bad = [r for r in tx.reads if r._cur[0] > rp]
                if bad:
                    raise _Conflict(bad)
                vals = tx.vals
                commuted = tx.finish_values()
                names = [r.name for r in vals]
                old_vals = [r._cur[1] for r in vals]
                encs = [codec.dumps(v, f"ref {r.name!r}") for r, v in vals.items()]
                olds = [r._enc or codec.dumps(r._cur[1], f"ref {r.name!r}") for r in vals]
                read_names = [r.name for r in tx.reads]
                read_ts = [r._cur[0] for r in tx.reads]
                commute_ts = [r._cur[0] for r in commuted]
            changes = (
                "[" + ",".join(f"[{json.dumps(n)},{o},{e}]" for n, o, e in zip(names, olds, encs, strict=True)) + "]"
            )
            outbox = []
            for seq, (name, entry, order_key) in enumerate(tx.outbox or ()):
                where = f"outbox entry of effect {name!r}"
                outbox.append({
                    "seq": seq, "effect": name, "payload": codec.dumps(entry, where),
                    "order_key": None if order_key is None else codec.dumps(order_key, where),
                })  # fmt: skip
            payload = {
                "id": str(tx_id),
                "time": time.time(),
                "reads": [{"name": n, "t": t} for n, t in zip(read_names, read_ts, strict=True)],
                "commutes": [{"name": r.name, "t": t} for r, t in zip(commuted, commute_ts, strict=True)],
                "writes": [{"name": n, "value": e} for n, e in zip(names, encs, strict=True)],
                "changes": changes,
                "outbox": outbox,
            }
            result = await self._batched(tx_id, payload)
            status, t = result["status"], result["t"]
            if status == "ok":
                await self._catch_up_after(t)
                return t, [(r, old, vals[r]) for r, old in zip(vals, old_vals, strict=True)]
            await self._catch_up_after(t)
            if status == "stale":
                continue  # only commuted refs moved: re-apply the commutes, not the body
            raise _Conflict([store._refs[n] for n in result["names"] if n in store._refs])

    async def _batched(self, tx_id: uuid.UUID, payload: dict[str, Any]) -> dict[str, Any]:
        """Queue one commit; a leader sends everything queued in one round trip (one WAL flush).

        While a batch is in flight, later commits queue up and go together in
        the next one, so a busy peer pays one round trip for many commits.
        """
        w = Waiter()
        self._queue.append((tx_id, payload, w))
        if not self._sending:
            self._sending = True
            try:
                while self._queue:
                    batch, self._queue = self._queue[:BATCH_MAX], self._queue[BATCH_MAX:]
                    try:
                        results = await self._send([p for _, p, _ in batch], [i for i, _, _ in batch])
                    except BaseException as exc:
                        for _, _, bw in batch:
                            bw.fire(exc)
                        continue
                    for (_, _, bw), res in zip(batch, results, strict=True):
                        bw.fire(res)
            finally:
                self._sending = False
        await w.wait()
        if isinstance(w.payload, BaseException):
            raise w.payload
        return w.payload  # type: ignore[no-any-return]

    async def _send(self, payloads: list[dict[str, Any]], ids: list[uuid.UUID]) -> list[Any]:
        """One round trip for a batch. If the connection drops, each outcome is looked up in the log.

        Committed: the commit stands. Not committed: a clear ``StorageError``
        (safe to run again). Unreachable for ``RESOLVE_SECONDS``: a
        ``StorageError`` saying the outcome is unknown. Never re-sent, never
        re-run.
        """
        assert self.pool is not None
        errors = _connection_errors()
        try:
            async with self.pool.acquire() as conn:
                return list(json.loads(await conn.fetchval(_COMMIT, json.dumps(payloads))))
        except errors as exc:
            first = exc
        deadline = time.monotonic() + RESOLVE_SECONDS
        while time.monotonic() < deadline:
            await anyio.sleep(0.1)
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    # the commit lock: waits out a batch still running on the dropped connection
                    await conn.execute("SELECT 1 FROM astm_meta WHERE key = 't' FOR UPDATE")
                    found = dict(await conn.fetch("SELECT tx_id, t FROM astm_log WHERE tx_id = ANY($1)", ids))
            except errors:
                continue
            lost = StorageError(
                self._where(),
                f"the connection to PostgreSQL was lost during the commit ({first!r}); "
                "the transaction was not committed",
                "it is safe to run it again",
            )
            lost.__cause__ = first
            return [{"status": "ok", "t": found[i]} if i in found else lost for i in ids]
        raise StorageError(
            self._where(),
            f"the connection to PostgreSQL was lost during a commit and its outcome is unknown ({first!r})",
            "the transaction may or may not have committed; check with a fresh read once the server is back",
        ) from first

    async def _catch_up_after(self, t: int) -> None:
        """Apply the log up to this peer's own commit ``t``, riding out a reconnect."""
        errors = _connection_errors()
        deadline = time.monotonic() + RESOLVE_SECONDS
        while True:
            try:
                await self.catch_up(t)
                return
            except errors as exc:
                if time.monotonic() > deadline:
                    raise StorageError(
                        self._where(),
                        f"committed at t={t}, but this peer cannot read the log to apply it ({exc!r})",
                        "the commit is durable; it will appear once the server is reachable",
                    ) from exc
                await anyio.sleep(0.1)

    # -- the outbox ------------------------------------------------------------------

    async def _deliver_loop(self) -> None:
        try:
            await self._deliver_rounds()
        finally:
            self._delivery_stopped.set()

    async def _deliver_rounds(self) -> None:
        errors = _connection_errors()
        outbox = self.store.outbox
        while not self._closing:
            names = list(outbox._effects)
            rows: list[Any] = []
            if names and self.pool is not None:
                try:
                    async with self.pool.acquire() as conn:
                        rows = await conn.fetch(_CLAIM, outbox.concurrency, names)
                except errors:
                    rows = []
            if not rows:
                await anyio.sleep(OUTBOX_POLL_SECONDS)
                continue
            async with anyio.create_task_group() as tg:
                for row in rows:
                    tg.start_soon(self._deliver, row)

    async def _deliver(self, row: Any) -> None:
        assert self.pool is not None
        outbox = self.store.outbox
        eff = outbox._effects[row["effect"]]
        key = (row["t"], row["seq"])
        try:
            await eff.handler(codec.loads(row["payload"]), key=key)
        except Exception as exc:
            attempts = row["attempts"]
            dead = attempts >= eff.max_attempts
            delay = min(eff.max_backoff, eff.backoff * (2 ** (attempts - 1))) * random.uniform(0.5, 1.0)
            async with self.pool.acquire() as conn:
                await conn.execute(
                    "UPDATE astm_outbox SET locked_until = NULL, error = $3, "
                    "next_at = now() + make_interval(secs => $4) WHERE t = $1 AND seq = $2",
                    key[0], key[1], repr(exc) if dead else None, delay,
                )  # fmt: skip
            return
        async with self.pool.acquire() as conn:
            await conn.execute("DELETE FROM astm_outbox WHERE t = $1 AND seq = $2", *key)
        with outbox._lock:
            outbox._delivered += 1

    async def pending(self) -> int:
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            return int(await conn.fetchval("SELECT count(*) FROM astm_outbox WHERE error IS NULL"))

    async def drain(self) -> None:
        # other peers deliver too and nothing notifies this one of their deliveries: poll
        while await self.pending():  # noqa: ASYNC110
            await anyio.sleep(0.05)

    async def dead(self) -> list[tuple[tuple[int, int], str, Any, int, str]]:
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT t, seq, effect, payload, attempts, error FROM astm_outbox "
                "WHERE error IS NOT NULL ORDER BY t, seq"
            )
        return [((r["t"], r["seq"]), r["effect"], codec.loads(r["payload"]), r["attempts"], r["error"]) for r in rows]

    async def requeue(self, key: tuple[int, int] | None) -> int:
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            if key is None:
                done = await conn.execute(
                    "UPDATE astm_outbox SET error = NULL, attempts = 0, next_at = now() WHERE error IS NOT NULL"
                )
            else:
                done = await conn.execute(
                    "UPDATE astm_outbox SET error = NULL, attempts = 0, next_at = now() "
                    "WHERE t = $1 AND seq = $2 AND error IS NOT NULL",
                    *key,
                )
        return int(done.split()[-1])

    # -- closing ---------------------------------------------------------------------

    async def close(self) -> None:
        """Stop following the log and delivering, then close every connection."""
        self._closing = True
        self._changed.set()
        if self.pool is None:
            return
        with anyio.move_on_after(5):
            await self._stopped.wait()
            await self._delivery_stopped.wait()
        if self._listener is not None:
            try:
                with anyio.fail_after(2):
                    await self._listener.close()
            except Exception:
                self._listener.terminate()
        try:
            with anyio.fail_after(5):
                await self.pool.close()
        except Exception:
            self.pool.terminate()

    # the durable-store hooks the engine calls on local backends do not apply to a peer
    async def wait_durable(self, t: int) -> None:
        return None
