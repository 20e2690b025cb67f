"""Agents: serial per-identity queues; sends held by transactions and by running actions."""

from __future__ import annotations

import gc
import random
import threading
import tracemalloc
from typing import Any, Literal

import anyio
import pytest
from pyrsistent import PVector, pvector

import astm


def append(state: PVector[Any], item: Any) -> PVector[Any]:
    return state.append(item)


def boom(state: Any) -> Any:
    raise ValueError("bad action")


class TestOrder:
    async def test_per_agent_order_from_50_tasks(self, store: astm.Store) -> None:
        """1000 sends from 50 tasks: each task's sends run in the order it sent them, all exactly once."""
        log: astm.Agent[PVector[Any]] = store.agent("log", pvector())

        async def sender(i: int) -> None:
            for j in range(20):
                log.send(append, (i, j))
                if j % 5 == 0:
                    await anyio.sleep(0)

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(sender, i)
        await log.wait()
        items = list(log.state)
        assert len(items) == 1000 and len(set(items)) == 1000
        for i in range(50):
            assert [j for k, j in items if k == i] == list(range(20))

    async def test_actions_run_one_at_a_time(self, store: astm.Store) -> None:
        """Async actions of one agent never overlap, even when they await."""
        running = 0
        overlap = False

        async def slow(state: int) -> int:
            nonlocal running, overlap
            running += 1
            overlap |= running > 1
            await anyio.sleep(0.001)
            running -= 1
            return state + 1

        a = store.agent("a", 0)
        for _ in range(20):
            a.send(slow)
        await a.wait()
        assert a.state == 20 and not overlap

    async def test_send_off_runs_in_a_worker_thread(self, store: astm.Store) -> None:
        """send_off runs a blocking function in a worker thread, in order with other actions."""
        main = threading.get_ident()
        a: astm.Agent[tuple[Any, ...]] = store.agent("a", ())
        a.send(lambda s: (*s, "first"))
        a.send_off(lambda s: (*s, threading.get_ident() != main))
        a.send(lambda s: (*s, "last"))
        await a.wait()
        assert a.state == ("first", True, "last")

    async def test_wait_waits_for_earlier_sends_only(self, store: astm.Store) -> None:
        """wait() returns once the actions sent before it ran; a timeout raises TimeoutError."""
        gate = anyio.Event()

        async def blocked(state: int) -> int:
            await gate.wait()
            return state + 1

        a = store.agent("a", 0)
        a.send(blocked)
        with pytest.raises(TimeoutError):
            await a.wait(timeout=0.02)
        gate.set()
        await a.wait()
        assert a.state == 1
        await a.wait()  # idle: returns at once


class TestTransactions:
    async def test_send_in_transaction_only_on_commit(self, store: astm.Store) -> None:
        """A send inside a transaction is dispatched once if it commits, never if it aborts."""
        a: astm.Agent[tuple[Any, ...]] = store.agent("a", ())
        r = store.ref("r", 0)

        def ok() -> None:
            r.set(1)
            a.send(lambda s: (*s, "committed"))

        def boom() -> None:
            a.send(lambda s: (*s, "aborted"))
            raise ValueError("no")

        await store.atomically(ok)
        with pytest.raises(ValueError, match="no"):
            await store.atomically(boom)
        await a.wait()
        assert a.state == ("committed",)

    async def test_exactly_once_per_commit_under_forced_retries(self, store: astm.Store) -> None:
        """Under contention with retries, each committed reservation sends one action and one outbox entry."""
        seats = store.ref("seats", 30)
        confirmations: astm.Agent[PVector[Any]] = store.agent("confirmations", pvector())
        delivered: list[tuple[int, tuple[int, int]]] = []

        @store.effect("confirm")
        async def confirm(customer: int, *, key: tuple[int, int]) -> None:
            delivered.append((customer, key))

        attempts = 0

        async def reserve(customer: int) -> bool:
            nonlocal attempts
            attempts += 1
            left = seats.get()
            await anyio.sleep(random.random() * 0.002)
            confirmations.send(append, customer)
            confirm.enqueue(customer)
            if left <= 0:
                raise LookupError("sold out")
            seats.set(left - 1)
            return True

        sold: list[int] = []

        async def customer(i: int) -> None:
            try:
                await store.atomically(reserve, i)
                sold.append(i)
            except LookupError:
                pass

        async with anyio.create_task_group() as tg:
            for i in range(80):
                tg.start_soon(customer, i)
        await confirmations.wait()
        await store.outbox.drain()
        assert attempts > 80, "the test must force retries"
        assert len(sold) == 30 and seats.get() == 0
        assert sorted(confirmations.state) == sorted(sold)
        assert sorted(c for c, _ in delivered) == sorted(sold)
        assert len({k for _, k in delivered}) == 30

    async def test_after_commit_effects(self, store: astm.Store, caplog: pytest.LogCaptureFixture) -> None:
        """after_commit effects run in order after commit, once; never on abort; a failure is logged, others run."""
        r = store.ref("r", 0)
        ran: list[str] = []

        def broken() -> None:
            raise RuntimeError("effect broke")

        async def body(fail: bool) -> None:
            r.alter(lambda v: v + 1)
            astm.after_commit(ran.append, "one")
            astm.after_commit(broken)
            astm.after_commit(ran.append, "three")
            if fail:
                raise KeyError("abort")

        await store.atomically(body, False)
        with pytest.raises(KeyError):
            await store.atomically(body, True)
        assert ran == ["one", "three"]
        assert "effect broke" in caplog.text

    async def test_after_commit_not_for_retried_attempts(self, store: astm.Store) -> None:
        """An attempt that retries registers nothing: effects run once per commit."""
        hot = store.ref("hot", 0)
        ran: list[int] = []

        async def bump() -> None:
            v = hot.get()
            astm.after_commit(ran.append, v)
            await anyio.sleep(0)
            hot.set(v + 1)

        async with anyio.create_task_group() as tg:
            for _ in range(40):
                tg.start_soon(store.atomically, bump)
        assert store.stats().retries > 0
        assert sorted(ran) == list(range(40))


class TestHeldSends:
    async def test_sends_from_an_action_wait_for_it(self, store: astm.Store) -> None:
        """A send made inside an action runs only after that action has finished."""
        order: list[str] = []
        b = store.agent("b", 0)

        def on_b(state: int) -> int:
            order.append("b runs")
            return state + 1

        async def on_a(state: int) -> int:
            b.send(on_b)
            await anyio.sleep(0.01)
            order.append("a finishes")
            return state + 1

        a = store.agent("a", 0)
        a.send(on_a)
        await a.wait()
        await b.wait()
        assert order == ["a finishes", "b runs"]

    async def test_sends_of_a_failed_action_are_dropped(self, store: astm.Store) -> None:
        """A failing action's held sends are discarded."""
        b = store.agent("b", 0)

        def fail(state: int) -> int:
            b.send(lambda s: s + 1)
            raise RuntimeError("x")

        a = store.agent("a", 0, error_mode="continue")
        a.send(fail)
        await a.wait()
        await b.wait()
        assert b.state == 0


class TestHandlerSends:
    """Sends made by an error handler are dispatched (Clojure's Agent.java releases them), not dropped."""

    @pytest.mark.parametrize("mode", ["fail", "continue"])
    async def test_handler_send_to_another_agent_runs(
        self, store: astm.Store, mode: Literal["fail", "continue"]
    ) -> None:
        """The handler's send to another agent runs in either mode; the failed action's own sends do not."""
        audit: astm.Agent[tuple[Any, ...]] = store.agent("audit", ())
        other: astm.Agent[tuple[Any, ...]] = store.agent("other", ())

        def failing(state: int) -> int:
            other.send(lambda s: (*s, "from the failed action"))
            raise ValueError("no")

        def handler(agent: astm.Agent[int], exc: BaseException) -> None:
            audit.send(lambda s, e: (*s, (agent.name, repr(e))), exc)

        a = store.agent("a", 0, error_mode=mode, error_handler=handler)
        a.send(failing)
        with anyio.fail_after(5):
            while not audit.state:
                await anyio.sleep(0.001)
        await audit.wait()
        await other.wait()
        assert audit.state == (("a", "ValueError('no')"),)
        assert other.state == ()
        assert (a.error is not None) == (mode == "fail")

    async def test_handler_send_to_itself_in_continue_mode(self, store: astm.Store) -> None:
        """In continue mode the handler's send to the failing agent itself runs after the failed action."""

        def handler(agent: astm.Agent[tuple[Any, ...]], exc: BaseException) -> None:
            agent.send(lambda s: (*s, "from the handler"))

        a: astm.Agent[tuple[Any, ...]] = store.agent("a", (), error_mode="continue", error_handler=handler)
        gate = anyio.Event()

        async def first(state: tuple[Any, ...]) -> tuple[Any, ...]:
            await gate.wait()
            raise ValueError("no")

        a.send(first)
        a.send(lambda s: (*s, "sent before the failure"))
        gate.set()
        await a.wait()
        await a.wait()  # the handler's send was counted after the first wait() began
        assert a.error is None
        assert a.state == ("sent before the failure", "from the handler")

    async def test_handler_send_to_itself_in_fail_mode_waits_for_restart(self, store: astm.Store) -> None:
        """In fail mode the handler's send to itself is queued behind the failure: it runs after restart (Clojure)."""

        def handler(agent: astm.Agent[tuple[Any, ...]], exc: BaseException) -> None:
            agent.send(lambda s: (*s, "from the handler"))

        a: astm.Agent[tuple[Any, ...]] = store.agent("a", (), error_mode="fail", error_handler=handler)
        a.send(boom)
        with pytest.raises(astm.AgentFailed):
            await a.wait()
        state_at_failure: tuple[Any, ...] = a.state
        assert isinstance(a.error, ValueError) and state_at_failure == ()
        with pytest.raises(astm.AgentFailed):
            a.send(lambda s: (*s, "refused"))
        a.restart(("restarted",))
        await a.wait()
        assert a.state == ("restarted", "from the handler") and a.error is None

    async def test_handler_send_to_itself_dropped_by_restart_clearing_actions(self, store: astm.Store) -> None:
        """restart(clear_actions=True) drops the handler's queued send to itself too."""

        def handler(agent: astm.Agent[tuple[Any, ...]], exc: BaseException) -> None:
            agent.send(lambda s: (*s, "from the handler"))

        a: astm.Agent[tuple[Any, ...]] = store.agent("a", (), error_mode="fail", error_handler=handler)
        a.send(boom)
        with pytest.raises(astm.AgentFailed):
            await a.wait()
        a.restart(("restarted",), clear_actions=True)
        await a.wait()
        await anyio.sleep(0.01)
        assert a.state == ("restarted",)

    async def test_async_handler_is_awaited_and_its_sends_run(self, store: astm.Store) -> None:
        """An async error handler is awaited before the queue goes on; its sends are dispatched."""
        seen: list[str] = []
        other: astm.Agent[tuple[Any, ...]] = store.agent("other", ())

        async def handler(agent: astm.Agent[int], exc: BaseException) -> None:
            await anyio.sleep(0.005)
            seen.append(f"handled {exc}")
            other.send(lambda s: (*s, "from the async handler"))

        def after(state: int) -> int:
            seen.append("next action")
            return state + 1

        a = store.agent("a", 0, error_mode="continue", error_handler=handler)
        a.send(boom)
        a.send(after)
        await a.wait()
        await other.wait()
        assert seen == ["handled bad action", "next action"]
        assert a.state == 1 and other.state == ("from the async handler",)


class TestErrors:
    async def test_fail_mode_refuses_until_restart(self, store: astm.Store) -> None:
        """In fail mode a failed agent keeps its queue, refuses sends with AgentFailed, and resumes on restart."""
        a = store.agent("a", 0)

        def boom(state: int) -> int:
            raise ValueError("bad action")

        a.send(boom)
        a.send(lambda s: s + 10)  # queued behind the failure
        with pytest.raises(astm.AgentFailed, match="restart") as info:
            await a.wait()
        assert isinstance(a.error, ValueError) and info.value.__cause__ is a.error
        with pytest.raises(astm.AgentFailed):
            a.send(lambda s: s + 1)
        a.restart(100)
        await a.wait()
        assert a.state == 110 and a.error is None
        with pytest.raises(RuntimeError, match="not failed"):
            a.restart(0)

    async def test_restart_clearing_actions(self, store: astm.Store) -> None:
        """restart(clear_actions=True) drops what was queued."""

        def boom(state: int) -> int:
            raise ZeroDivisionError

        a = store.agent("a", 0)
        a.send(boom)
        a.send(lambda s: s + 10)
        with pytest.raises(astm.AgentFailed):
            await a.wait()
        a.restart(5, clear_actions=True)
        await a.wait()
        assert a.state == 5

    def test_handler_defaults_to_continue_mode(self, store: astm.Store) -> None:
        """An agent family given an error handler and no mode continues (Clojure's default); without one it fails."""
        with_handler = astm.AgentFamily(store, "h", 0, error_handler=lambda ag, e: None)
        without = astm.AgentFamily(store, "n", 0)
        explicit = astm.AgentFamily(store, "e", 0, "fail", lambda ag, e: None)
        assert with_handler.error_mode == "continue" and with_handler[1].error_mode == "continue"
        assert without.error_mode == "fail" and without[1].error_handler is None
        assert explicit.error_mode == "fail"

    async def test_store_agent_with_handler_keeps_going(self, store: astm.Store) -> None:
        """store.agent(..., error_handler=h) without a mode keeps running after a failure; the next send is accepted."""
        seen: list[BaseException] = []
        a = store.agent("a", 0, error_handler=lambda ag, e: seen.append(e))
        fam = store.agents("fam", 0, error_handler=lambda ag, e: seen.append(e))
        assert a.error_mode == "continue" and fam.error_mode == "continue"
        for agent in (a, fam["k"]):
            agent.send(boom)
            await agent.wait()
            agent.send(lambda s: s + 1)  # would raise AgentFailed in fail mode
            await agent.wait()
            assert agent.state == 1 and agent.error is None
        assert [str(e) for e in seen] == ["bad action", "bad action"]

    async def test_explicit_fail_mode_wins_over_handler(self, store: astm.Store) -> None:
        """An explicit error_mode="fail" with a handler calls the handler, then stops the agent."""
        seen: list[BaseException] = []
        a = store.agent("a", 0, error_mode="fail", error_handler=lambda ag, e: seen.append(e))
        assert a.error_mode == "fail" and a.error_handler is not None
        a.send(boom)
        with pytest.raises(astm.AgentFailed):
            await a.wait()
        assert len(seen) == 1 and a.error is seen[0]
        with pytest.raises(astm.AgentFailed):
            a.send(lambda s: s + 1)

    async def test_base_exception_fails_the_agent_instead_of_wedging_it(self, store: astm.Store) -> None:
        """An action raising a BaseException (not an Exception) fails the agent: wait() raises, restart() resumes it."""

        class Fatal(BaseException):
            pass

        def fatal(state: int) -> int:
            raise Fatal()

        a = store.agent("a", 0, error_mode="continue")
        a.send(fatal)
        a.send(lambda s: s + 10)
        with pytest.raises(astm.AgentFailed), anyio.fail_after(5):
            await a.wait()
        assert isinstance(a.error, Fatal)
        a.restart(1)
        await a.wait()
        assert a.state == 11 and a.error is None

    async def test_continue_mode_and_handler(self, store: astm.Store) -> None:
        """In continue mode the handler sees the error and later actions still run."""
        seen: list[tuple[Any, str]] = []
        a = store.agent("a", 0, error_mode="continue", error_handler=lambda ag, e: seen.append((ag.key, str(e))))
        a.send(lambda s: s + 1)
        a.send(lambda s: int("x"))
        a.send(lambda s: s + 1)
        await a.wait()
        assert a.state == 2 and a.error is None
        assert len(seen) == 1 and "invalid literal" in seen[0][1]

    def test_bad_arguments(self, store: astm.Store) -> None:
        """Bad error modes and non-callables are refused clearly."""
        with pytest.raises(ValueError, match="error_mode"):
            store.agent("x", 0, error_mode="ignore")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="callable"):
            store.agent("y", 0).send(5)  # type: ignore[arg-type]


class TestFamilies:
    async def test_family_creates_on_first_use(self, store: astm.Store) -> None:
        """family[key] is the agent of that identity; identities are independent."""
        carts: astm.AgentFamily[PVector[Any]] = store.agents("cart", pvector())
        carts["ann"].send(append, "apple")
        carts["bob"].send(append, "pear")
        carts["ann"].send(append, "plum")
        await carts["ann"].wait()
        await carts["bob"].wait()
        assert list(carts["ann"].state) == ["apple", "plum"]
        assert list(carts["bob"].state) == ["pear"]
        assert carts["nobody"].state == pvector()
        assert carts["ann"] == carts["ann"] and "ann" in carts and len(carts) == 2

    async def test_100k_identities_stay_cheap(self, store: astm.Store) -> None:
        """100,000 identities that received work hold no task and little memory once idle."""
        counters = store.agents("counter", 0)
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(100_000):
            counters[i].send(lambda s: s + 1)
            if i % 5000 == 0:
                await anyio.sleep(0)
        for _ in range(200):
            if not counters.busy:
                break
            await anyio.sleep(0.01)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        assert counters.busy == 0, "idle identities must not keep a queue or a task"
        assert all(counters[i].state == 1 for i in range(0, 100_000, 997))
        per_identity = (after - before) / 100_000
        assert per_identity < 200, f"{per_identity:.0f} bytes per idle identity"

    def test_name_kinds_do_not_mix(self, store: astm.Store) -> None:
        """One name is either a lone agent or a family."""
        store.agent("mailer", 0)
        with pytest.raises(ValueError, match="already names"):
            store.agents("mailer", 0)


class TestTrio:
    def test_agents_and_outbox_on_trio(self) -> None:
        """Agents and the outbox work on trio too."""
        got: list[Any] = []

        async def main() -> None:
            store = astm.Store()
            a = store.agent("a", 0)
            r = store.ref("r", 0)

            @store.effect("note")
            async def note(payload: int, *, key: tuple[int, int]) -> None:
                got.append((payload, key))

            def body() -> None:
                r.set(1)
                a.send(lambda s: s + 5)
                note.enqueue(7)

            await store.atomically(body)
            await a.wait()
            await store.aclose()
            got.append(a.state)

        anyio.run(main, backend="trio")
        assert got == [(7, (1, 0)), 5]
