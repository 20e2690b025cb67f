"""Cases ported from Clojure's test suite (agents and atoms), mapped to astm.

Origins: github:clojure/clojure at 58b075ec, ``test/clojure/test_clojure/agents.clj``
and ``atoms.clj`` (``refs.clj`` holds no tests, only a list of names), and,
where a test says so, the docstrings of ``clojure.core`` (``src/clj/clojure/core.clj``)
and ``clojure.lang.Agent`` (``src/jvm/clojure/lang/Agent.java``) that define the
behaviour. Tests that Clojure keeps disabled (``#_(deftest ...)``, because they
sleep and hope) are ported too, made deterministic with events.

The mapping: ``(agent x)`` is ``store.agent(name, x)``; ``send``/``send-off``
are ``agent.send``/``agent.send_off`` (a worker thread); ``await``/``await-for``
is ``await agent.wait(timeout)``; ``agent-error`` is ``agent.error``;
``restart-agent`` (and the deprecated ``clear-agent-errors``) is
``agent.restart(state, clear_actions=...)``; ``:error-mode``/``:error-handler``
are ``error_mode``/``error_handler``; a ``CountDownLatch`` or ``promise`` is an
``anyio.Event``. ``(atom x)`` is ``store.atom(name, x)``; ``swap!``/``reset!``/
``compare-and-set!``/``add-watch``/``:validator`` are ``swap``/``reset``/
``compare_and_set``/``add_watch``/``validator``.

Cases with no equivalent in astm, and why:

* ``invalid-restart`` (``#_``): astm agents have no validator (only refs and
  atoms do); only its first step, restarting an agent that has not failed, is
  ported.
* ``earmuff-agent-bound``: astm has no ``*agent*``; an action is a plain
  function of the state (the error handler receives the agent as argument).
* ``thread-conveyance-to-agents``: Clojure conveys the sender's dynamic
  bindings to the action; astm runs actions in a fresh context, so the
  sender's ``contextvars`` are not visible in them.
* ``seque-threads``, ``seque-into-seque-deadlock``: ``seque`` is a Clojure
  library function built on agents and a ``LinkedBlockingQueue``.
* ``agent-errors``' list of errors and ``shutdown-agents``: astm keeps one
  error per agent (``agent.error``); shutting down is ``store.aclose()``, per
  store. Agent watches and validators (the commented list at the end of
  ``agents.clj``) do not exist in astm.
* ``swap-vals-returns-old-value``, ``deref-swap-arities``' ``swap-vals!``,
  ``deref-reset-returns-old-value``, ``reset-on-deref-reset-equality``: astm
  has no ``swap_vals``/``reset_vals``; ``swap``/``reset`` return the new value,
  which the ports check instead.
* ``atoms-are-suppliers``: ``java.util.function`` interfaces.
"""

from __future__ import annotations

import threading
from decimal import Decimal
from typing import Any

import anyio
import pytest

import astm


class Fatal(BaseException):
    """A throwable that is not an Exception (Java's Error/Throwable outside Exception)."""


# -- agents.clj ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", [MemoryError, Fatal])
async def test_clojure_agents_handle_all_throwables_during_agent_actions(
    store: astm.Store, kind: type[BaseException]
) -> None:
    """An action raising any throwable (MemoryError, a BaseException) fails the agent; after restart it runs again."""
    agt: astm.Agent[Any] = store.agent("agt", None)

    def throws(state: Any) -> Any:
        raise kind("just testing Throwables")

    agt.send(throws)
    with pytest.raises(astm.AgentFailed), anyio.fail_after(5):
        await agt.wait()  # let the action finish; the "agent has errors" error bubbles up
    assert isinstance(agt.error, kind)
    agt.restart(agt.state)  # clear-agent-errors
    assert agt.state is None and agt.error is None
    agt.send(lambda s: s is None)
    with anyio.fail_after(5):
        await agt.wait()
    assert agt.state is True


def test_clojure_agents_default_modes_without_handler(store: astm.Store) -> None:
    """An agent made without an error handler is in fail mode."""
    assert store.agent("a", None).error_mode == "fail"
    assert store.agents("f", None).error_mode == "fail"


def test_clojure_agents_default_modes_with_handler(store: astm.Store) -> None:
    """An agent made with an error handler and no mode is in continue mode."""
    assert store.agent("a", None, error_handler=print).error_mode == "continue"
    assert store.agents("f", None, error_handler=print).error_mode == "continue"


async def test_clojure_agents_continue_handler(store: astm.Store) -> None:
    """In continue mode a failed action leaves the state, records no error, and the handler gets agent and error."""
    err: list[Any] = []
    agt = store.agent("agt", 0, error_mode="continue", error_handler=lambda *args: err.extend(args))
    agt.send(lambda s: 1 / s)  # (send agt /): (/ 0)
    with anyio.fail_after(5):
        await agt.wait()
    assert agt.state == 0
    assert agt.error is None
    assert err[0] == agt
    assert isinstance(err[1], ZeroDivisionError)


async def test_clojure_agents_fail_handler(store: astm.Store) -> None:
    """In fail mode the handler gets agent and error; the agent keeps its state, refuses sends (disabled in Clojure)."""
    err: list[Any] = []
    agt = store.agent("agt", 0, error_mode="fail", error_handler=lambda *args: err.extend(args))
    agt.send(lambda s: 1 / s)
    with pytest.raises(astm.AgentFailed), anyio.fail_after(5):
        await agt.wait()
    assert isinstance(agt.error, ZeroDivisionError)
    assert agt.state == 0
    assert err[0] == agt
    assert isinstance(err[1], ZeroDivisionError)
    with pytest.raises(astm.AgentFailed):
        agt.send(lambda s: s + 1)


async def test_clojure_agents_can_send_from_error_handler_before_popping_action_that_caused_error(
    store: astm.Store,
) -> None:
    """The error handler's send to another agent is dispatched and runs."""
    latch = anyio.Event()
    target_agent: astm.Agent[Any] = store.agent("target", "before-error")

    def handler(agt: astm.Agent[Any], err: BaseException) -> None:
        target_agent.send(lambda _: latch.set())

    failing_agent: astm.Agent[Any] = store.agent("failing", None, error_handler=handler)

    def throws(state: Any) -> Any:
        raise RuntimeError()

    failing_agent.send(throws)
    with anyio.fail_after(10):
        await latch.wait()


async def test_clojure_agents_send_off_in_error_handler(store: astm.Store) -> None:
    """The error handler's send_off to another agent is dispatched and runs in a worker thread."""
    main = threading.get_ident()
    target_agent: astm.Agent[Any] = store.agent("target", "before-error")

    def handler(agt: astm.Agent[Any], err: BaseException) -> None:
        target_agent.send_off(lambda _: ("ran", threading.get_ident() != main, repr(err)))

    failing_agent: astm.Agent[Any] = store.agent("failing", None, error_handler=handler)

    def throws(state: Any) -> Any:
        raise RuntimeError("boom")

    failing_agent.send(throws)
    with anyio.fail_after(10):
        while target_agent.state == "before-error":
            await anyio.sleep(0.001)
        await target_agent.wait()
    assert target_agent.state == ("ran", True, "RuntimeError('boom')")


async def test_clojure_agents_can_send_to_self_from_error_handler_before_popping_action_that_caused_error(
    store: astm.Store,
) -> None:
    """The error handler's send to the failing agent itself runs (a handler implies continue mode)."""
    latch = anyio.Event()

    def handler(agt: astm.Agent[Any], err: BaseException) -> None:
        agt.send(lambda _: latch.set())

    failing_agent: astm.Agent[Any] = store.agent("failing", None, error_handler=handler)

    def throws(state: Any) -> Any:
        raise RuntimeError()

    failing_agent.send(throws)
    with anyio.fail_after(2):
        await latch.wait()


async def _fail_behind_a_promise(store: astm.Store) -> astm.Agent[int]:
    """restart-no-clear/restart-clear's set-up: 1, then an action that waits for a promise of 0, then / inc inc."""
    p = anyio.Event()
    agt = store.agent("agt", 1, error_mode="fail")

    async def deref_promise(v: int) -> int:
        await p.wait()
        return 0

    agt.send(deref_promise)
    agt.send(lambda v: 1 // v)  # (send agt /): (/ 0)
    agt.send(lambda v: v + 1)
    agt.send(lambda v: v + 1)
    p.set()  # (deliver p 0)
    with pytest.raises(astm.AgentFailed), anyio.fail_after(5):
        await agt.wait()
    assert agt.state == 0
    assert isinstance(agt.error, ZeroDivisionError)
    return agt


async def test_clojure_agents_restart_no_clear(store: astm.Store) -> None:
    """A restart keeps the actions queued behind the failure: 10, then inc inc gives 12 (disabled in Clojure)."""
    agt = await _fail_behind_a_promise(store)
    agt.restart(10)
    with anyio.fail_after(5):
        await agt.wait()
    assert agt.state == 12
    assert agt.error is None


async def test_clojure_agents_restart_clear(store: astm.Store) -> None:
    """A restart clearing actions drops the queued ones: 10, and a later inc gives 11 (disabled in Clojure)."""
    agt = await _fail_behind_a_promise(store)
    agt.restart(10, clear_actions=True)
    with anyio.fail_after(5):
        await agt.wait()
    assert agt.state == 10
    assert agt.error is None
    agt.send(lambda v: v + 1)
    with anyio.fail_after(5):
        await agt.wait()
    assert agt.state == 11
    assert agt.error is None


def test_clojure_agents_invalid_restart_of_an_agent_that_has_not_failed(store: astm.Store) -> None:
    """Restarting an agent that has not failed is refused (invalid-restart's first step, disabled in Clojure)."""
    agt = store.agent("agt", 2, error_mode="fail")
    with pytest.raises(RuntimeError, match="has not failed"):
        agt.restart(4)
    assert agt.state == 2


async def test_clojure_core_await_for_times_out(store: astm.Store) -> None:
    """await-for gives up after its timeout while an action still runs (astm raises TimeoutError), then completes."""
    gate = anyio.Event()
    agt = store.agent("agt", 0)

    async def slow(v: int) -> int:
        await gate.wait()
        return v + 1

    agt.send(slow)
    with pytest.raises(TimeoutError):
        await agt.wait(timeout=0.02)
    gate.set()
    await agt.wait(timeout=5)
    assert agt.state == 1


async def test_clojure_agent_java_actions_run_one_at_a_time_in_send_order(store: astm.Store) -> None:
    """Agent.java's action queue: one agent's actions never overlap, and each sender's run in the order it sent them."""
    log: astm.Agent[tuple[tuple[int, int], ...]] = store.agent("log", ())
    running = 0
    overlapped = False

    async def record(state: tuple[tuple[int, int], ...], item: tuple[int, int]) -> tuple[tuple[int, int], ...]:
        nonlocal running, overlapped
        running += 1
        overlapped |= running > 1
        await anyio.sleep(0)
        running -= 1
        return (*state, item)

    async def sender(i: int) -> None:
        for j in range(20):
            log.send(record, (i, j))
            await anyio.sleep(0)

    async with anyio.create_task_group() as tg:
        for i in range(30):
            tg.start_soon(sender, i)
    with anyio.fail_after(10):
        await log.wait()
    assert not overlapped and len(log.state) == 600
    for i in range(30):
        assert [j for k, j in log.state if k == i] == list(range(20))


async def test_clojure_agent_java_send_in_transaction_is_held_until_commit(store: astm.Store) -> None:
    """Agent.java's dispatchAction: a send inside a transaction goes out when it commits, once, despite retries."""
    counter = store.ref("counter", 0)
    sent: astm.Agent[tuple[int, ...]] = store.agent("sent", ())
    attempts = 0

    async def bump() -> None:
        nonlocal attempts
        attempts += 1
        v = counter.get()
        await anyio.sleep(0)
        counter.set(v + 1)
        sent.send(lambda s, v: (*s, v), v)

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(store.atomically, bump)
    with anyio.fail_after(10):
        await sent.wait()
    assert attempts > 50, "the test must make transactions retry"
    assert sorted(sent.state) == list(range(50))


async def test_clojure_agent_java_sends_from_an_action_are_held_until_it_succeeds(store: astm.Store) -> None:
    """Agent.java's doRun: an action's sends go out after it succeeds, and are dropped when it fails."""
    order: list[str] = []
    b: astm.Agent[int] = store.agent("b", 0)

    def on_b(v: int) -> int:
        order.append("b runs")
        return v + 1

    async def succeeds(v: int) -> int:
        b.send(on_b)
        await anyio.sleep(0.01)
        order.append("a finishes")
        return v + 1

    def fails(v: int) -> int:
        b.send(on_b)
        raise ValueError("no")

    a = store.agent("a", 0, error_mode="continue")
    a.send(succeeds)
    a.send(fails)
    with anyio.fail_after(10):
        await a.wait()
        await b.wait()
    assert order == ["a finishes", "b runs"] and b.state == 1 and a.state == 1


async def test_clojure_core_await_for_refused_inside_an_agent_action(store: astm.Store) -> None:
    """From await-for: waiting for agents inside an agent action is refused at once, rather than deadlocking."""
    agt: astm.Agent[str] = store.agent("agt", "idle")

    async def waits_for_itself(state: str) -> str:
        try:
            await agt.wait(timeout=0.5)
        except TimeoutError:
            return "deadlocked"
        except RuntimeError:
            return "refused"
        return "returned"

    agt.send(waits_for_itself)
    with anyio.fail_after(10):
        while agt.state == "idle":
            await anyio.sleep(0.01)
    assert agt.state == "refused"


async def test_clojure_core_await_for_refused_inside_a_transaction(store: astm.Store) -> None:
    """From await-for: waiting for agents inside a transaction is refused (its sends only go out at commit)."""
    agt = store.agent("agt", 0)
    r = store.ref("r", 0)

    async def body() -> int:
        r.set(1)
        agt.send(lambda v: v + 1)
        await agt.wait(timeout=0.5)
        return agt.state  # 0: the send has not run, although wait() returned

    with pytest.raises(RuntimeError):
        await store.atomically(body)


# -- atoms.clj ------------------------------------------------------------------------


def test_clojure_atoms_swap_returns_new_value(store: astm.Store) -> None:
    """swap returns the new value and the atom holds it (swap-vals-returns-old-value; astm has no swap_vals)."""
    a = store.atom("a", 0)
    assert a.swap(lambda v: v + 1) == 1
    assert a.swap(lambda v: v + 1) == 2
    assert a.get() == 2


def test_clojure_atoms_deref_swap_arities(store: astm.Store) -> None:
    """swap passes one to four extra arguments after the value: 1, 3, 6, 10."""
    a = store.atom("a", 0)

    def plus(v: int, *xs: int) -> int:
        return v + sum(xs)

    assert a.swap(plus, 1) == 1
    assert a.swap(plus, 1, 1) == 3
    assert a.swap(plus, 1, 1, 1) == 6
    assert a.swap(plus, 1, 1, 1, 1) == 10
    assert a.get() == 10


def test_clojure_atoms_deref_reset_returns_new_value(store: astm.Store) -> None:
    """reset returns the value set, whatever it replaces (deref-reset-returns-old-value; no reset_vals in astm)."""
    a: astm.Atom[Any] = store.atom("a", 0)
    assert a.reset("b") == "b"
    assert a.reset(Decimal(45)) == Decimal(45)
    assert a.get() == Decimal(45)


def test_clojure_core_swap_is_atomic_across_threads(store: astm.Store) -> None:
    """From the docstring of swap!: concurrent swaps from eight threads are each applied once (f may be retried)."""
    a = store.atom("a", 0)
    calls = 0
    lock = threading.Lock()

    def inc(v: int) -> int:
        nonlocal calls
        with lock:
            calls += 1
        return v + 1

    def worker() -> None:
        for _ in range(2000):
            a.swap(inc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert a.get() == 16000
    assert calls >= 16000


def test_clojure_core_compare_and_set_compares_identity(store: astm.Store) -> None:
    """From the docstring of compare-and-set!: it sets only if the current value is identical (not just equal)."""
    current = tuple(range(2))
    equal_copy = tuple(range(2))
    assert current == equal_copy and current is not equal_copy
    a = store.atom("a", current)
    assert a.compare_and_set(equal_copy, (9,)) is False
    assert a.get() is current
    assert a.compare_and_set(current, (9,)) is True
    assert a.get() == (9,)


def test_clojure_core_atom_validator(store: astm.Store) -> None:
    """From the docstring of atom: a validator refuses a bad initial value, and a swap or reset to a bad value."""
    with pytest.raises(astm.ValidationError):
        store.atom("bad", -1, validator=lambda v: v >= 0)
    a = store.atom("a", 0, validator=lambda v: v >= 0)
    with pytest.raises(astm.ValidationError):
        a.swap(lambda v: v - 1)
    with pytest.raises(astm.ValidationError):
        a.reset(-5)
    assert a.compare_and_set(0, 3) is True
    assert a.get() == 3


def test_clojure_core_add_watch_on_atom(store: astm.Store) -> None:
    """From add-watch's docstring: each change calls the watch with key, atom, old and new; remove-watch stops it."""
    a = store.atom("a", 0)
    seen: list[tuple[Any, ...]] = []
    a.add_watch("k", lambda key, ref, old, new: seen.append((key, ref, old, new)))
    a.swap(lambda v: v + 1)
    a.reset(10)
    assert a.compare_and_set(10, 11) is True
    assert a.compare_and_set(10, 12) is False  # no change, no call
    a.remove_watch("k")
    a.reset(99)
    assert seen == [("k", a, 0, 1), ("k", a, 1, 10), ("k", a, 10, 11)]
