"""The orchestrator: durable saga instances driven by replies and timers.

Every change to a saga happens in one store transaction: the worker's unit of
work for the reply (or timer) that caused it, holding the inbox record, the
saga row, the events appended to its history and the commands sent through
the outbox. A crash at any point either loses the whole change (the message is
redelivered and handled again) or keeps all of it (the redelivered duplicate
is skipped by the inbox). Timeouts are durable: the awaited request's deadline
is a column of the saga row, and every orchestrating worker scans for
deadlines that have passed (``timer_interval``); a timeout is one more
transition, guarded like the others, so two scanners never apply it twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Unpack

import pydantic

from conveyor.errors import ConfigError, DeadLetter, SagaConflict, SagaError, StepFailed
from conveyor.messages import CORRELATION_ID, Message, uuid7
from conveyor.resilience import RetryPolicy
from conveyor.runtime import App, Context, Session
from conveyor.runtime._context import Outbound
from conveyor.runtime._handlers import Handler, HandlerOptions
from conveyor.sagas._definition import Saga, Step
from conveyor.sagas._history import (
    COMPENSATING,
    FAILED,
    RUNNING,
    SagaEvent,
    SagaRecord,
    _blank,
    apply,
)
from conveyor.sagas._tables import (
    create_tables,
    due_sagas,
    insert_saga,
    load_events,
    load_saga,
    save_saga,
)

__all__ = ["SAGA_ID", "OnChange", "Sagas", "saga_id_of"]

_log = logging.getLogger(__name__)

SAGA_ID = "saga-id"
_NAME, _STEP, _PHASE, _TOKEN, _REPLY_TO = (
    "saga-name",
    "saga-step",
    "saga-phase",
    "saga-token",
    "saga-reply-to",
)
_REPLY, _CALL, _RESUME = "saga.reply", "saga.call", "saga.resume"

ParticipantFunc = Callable[..., Awaitable[object]]
OnChange = Callable[[Session, SagaRecord, Sequence[SagaEvent]], Awaitable[None]]
"""``async def f(session, record, events)``: called in the transaction that
records ``events``, with the record after them (keep a read model in step)."""


def saga_id_of(ctx: Context) -> str:
    """The id of the saga a participant's command belongs to."""
    value = ctx.message.headers.get(SAGA_ID)
    if not value:
        raise SagaError(f"message {ctx.message.id} on {ctx.message.topic!r} is not a saga command")
    return value


def _as_dict(value: object, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Mapping):
        return dict(value)
    raise SagaError(f"{what} must be a dict or a pydantic model, got {type(value).__name__}")


class _Turn:
    """The events and messages one orchestrator step produces."""

    def __init__(
        self,
        saga: Saga,
        record: SagaRecord,
        now: float,
        cause: Message | None,
        outbound: Outbound,
    ) -> None:
        self.outbound = outbound
        self.since = record.updated_at
        """When the saga last changed before this turn (a step's send)."""
        self.saga = saga
        self.record = record
        self.now = now
        self.cause = cause
        self.events: list[SagaEvent] = []
        self.messages: list[Message] = []
        self.dead: list[tuple[Message, str]] = []

    def emit(self, type: str, step: str = "", **detail: Any) -> None:
        event = SagaEvent(seq=self.record.seq + 1, type=type, at=self.now, step=step, detail=detail)
        self.record = apply(self.record, event)
        self.events.append(event)

    def message(
        self, topic: str, body: object, *, type: str, headers: dict[str, str], delay: float = 0.0
    ) -> Message:
        # The saga id is the correlation id of everything the saga sends.
        causal = {CORRELATION_ID: self.record.id}
        if self.cause is not None:
            causal = {**self.cause.causal_headers(), CORRELATION_ID: self.record.id}
        # No ordering key: a participant needs none (a compensation that
        # overtakes its action voids the step), and one held-back message
        # must never queue a saga's others behind it.
        message = self.outbound.build(topic, body, {"type": type, "headers": {**headers, **causal}})
        if delay > 0:
            message = replace(message, not_before=self.now + delay)
        return message


class Sagas:
    """The orchestrator and participant helpers for one ``App``.

    ``register`` a ``Saga``; ``start`` instances inside a transaction (the
    first command commits with the caller's writes); decorate the services'
    handlers with ``participant`` so that each step acts at most once per
    saga, whatever is redelivered, retried or late. Replies, local-step
    calls and resumes for a saga go to the topic ``saga.<name>``, handled by
    this app's workers with ``concurrency`` and ``retry`` as for any handler;
    each worker also scans for passed deadlines every ``timer_interval``.
    """

    def __init__(
        self,
        app: App,
        *,
        concurrency: int = 1,
        retry: RetryPolicy | None = None,
        timer_interval: float = 1.0,
    ) -> None:
        self.app = app
        self._timer_interval = timer_interval
        self._scanning = False
        self._orchestrated: set[str] = set()
        self._concurrency = concurrency
        self._retry = retry
        self._definitions: dict[tuple[str, int], Saga] = {}
        self._latest: dict[str, Saga] = {}
        self._listeners: dict[str, OnChange] = {}
        app.on_connect(self._create_tables)

    @staticmethod
    async def _create_tables(app: App) -> None:
        async with app.store.transaction() as tx:
            await create_tables(tx)

    def register(
        self, saga: Saga, *, orchestrate: bool = True, on_change: OnChange | None = None
    ) -> Saga:
        """Know ``saga`` (several versions of one name may be registered) and,
        with ``orchestrate``, handle its replies and timers in this app's
        workers; ``False`` lets a process start sagas that others drive.
        ``on_change`` sees every change in the transaction that makes it."""
        key = (saga.name, saga.version)
        if key in self._definitions:
            raise ConfigError(f"saga {saga.name!r} version {saga.version} is registered twice")
        first = saga.name not in self._latest
        self._definitions[key] = saga
        if on_change is not None:
            self._listeners[saga.name] = on_change
        if first or saga.version > self._latest[saga.name].version:
            self._latest[saga.name] = saga
        if orchestrate:
            self._orchestrated.add(saga.name)
        if orchestrate and not self._scanning:
            self._scanning = True
            self.app.every(self._timer_interval)(self._expire)
        if first and orchestrate:

            async def orchestrator(ctx: Context) -> None:
                await self._handle(ctx)

            orchestrator.__qualname__ = f"saga {saga.name}"
            self.app.handler(
                saga.topic, group=saga.topic, concurrency=self._concurrency, retry=self._retry
            )(orchestrator)
        return saga

    def definition(self, name: str, version: int | None = None) -> Saga:
        saga = self._latest.get(name) if version is None else self._definitions.get((name, version))
        if saga is None:
            known = ", ".join(sorted(f"{n} v{v}" for n, v in self._definitions)) or "none"
            raise SagaError(
                f"no saga {name!r} (version {version or 'latest'}) is registered; known: {known}"
            )
        return saga

    async def start(
        self,
        session: Session,
        saga: str | Saga,
        data: Mapping[str, Any] | pydantic.BaseModel,
        *,
        saga_id: str | None = None,
    ) -> str:
        """Create a saga instance and send its first step, when ``session``
        commits. Starting an id that already exists changes nothing and returns it."""
        definition = self.definition(saga if isinstance(saga, str) else saga.name)
        sid = saga_id or uuid7()
        turn = _Turn(definition, _blank(sid), self.app.clock.time(), None, self.app.outbound)
        turn.emit(
            "started",
            name=definition.name,
            version=definition.version,
            data=_as_dict(data, "saga data"),
            steps=[s.name for s in definition.steps],
        )
        self._advance(turn)
        # An id that exists (or that a concurrent start has inserted and not
        # yet committed: the insert waits for it) gets nothing written or sent.
        if not await insert_saga(session.tx, turn.record, turn.events):
            return sid
        await session.send(turn.messages)
        await self._notify(session, turn)
        return sid

    async def _notify(self, session: Session, turn: _Turn) -> None:
        listener = self._listeners.get(turn.saga.name)
        if listener is not None and turn.events:
            await listener(session, turn.record, turn.events)
        observers = self.app.observers
        if observers and turn.events:
            record, events, since = turn.record, tuple(turn.events), turn.since
            session.on_commit(lambda: observers.saga_changed(record, events, since=since))

    async def get(self, saga_id: str) -> SagaRecord | None:
        async with self.app.store.transaction() as tx:
            return await load_saga(tx, saga_id)

    async def history(self, saga_id: str) -> list[SagaEvent]:
        async with self.app.store.transaction() as tx:
            return await load_events(tx, saga_id)

    # The state machine. ---------------------------------------------------

    def _advance(self, turn: _Turn) -> None:
        """After a change: send the next request, or finish."""
        r = turn.record
        steps = turn.saga.steps
        if r.state == RUNNING:
            if r.done >= len(steps):
                turn.emit("completed")
            else:
                self._send(turn, r.done, "action", attempt=1)
        elif r.state in (COMPENSATING, FAILED):
            index = r.undo
            while index >= 0 and not steps[index].compensable:
                index -= 1
            if index < 0:
                turn.emit("saga_compensated")
            else:
                self._send(turn, index, "compensation", attempt=1)

    def _send(
        self, turn: _Turn, index: int, phase: str, *, attempt: int, delay: float = 0.0
    ) -> None:
        step = turn.saga.steps[index]
        token = uuid7()
        timeout = step.timeout_for(phase)
        deadline = None if timeout is None else turn.now + delay + timeout
        turn.emit(
            "sent",
            step.name,
            index=index,
            phase=phase,
            attempt=attempt,
            token=token,
            deadline=deadline,
            delay=round(delay, 6),
            to=step.target(phase) or "local",
        )
        headers = {
            SAGA_ID: turn.record.id,
            _NAME: turn.saga.name,
            _STEP: step.name,
            _PHASE: phase,
            _TOKEN: token,
            _REPLY_TO: turn.saga.topic,
        }
        target = step.target(phase)
        if target is not None:
            turn.messages.append(
                turn.message(
                    target,
                    dict(turn.record.data),
                    type="saga.command",
                    headers=headers,
                    delay=delay,
                )
            )
        else:
            turn.messages.append(
                turn.message(turn.saga.topic, {}, type=_CALL, headers=headers, delay=delay)
            )

    def _step_failed(self, turn: _Turn, step: Step, reason: str, *, timed_out: bool) -> None:
        r = turn.record
        index = r.step
        if r.phase == "action":
            policy = step.retry
            if timed_out and r.attempt < policy.max_attempts:
                self._send(
                    turn, index, "action", attempt=r.attempt + 1, delay=policy.backoff(r.attempt)
                )
                return
            turn.emit("failed", step.name, index=index, reason=reason, timed_out=timed_out)
            self._advance(turn)
            return
        policy = step.compensation_retry
        turn.emit(
            "compensation_failed",
            step.name,
            index=index,
            reason=reason,
            attempt=r.attempt,
            timed_out=timed_out,
        )
        if r.attempt < policy.max_attempts:
            self._send(
                turn, index, "compensation", attempt=r.attempt + 1, delay=policy.backoff(r.attempt)
            )
            return
        why = f"compensation {step.name!r} failed {r.attempt} times: {reason}"
        # The dead letter is a "resume" for this orchestrator carrying the
        # saga's token: replaying it (conveyor dlq replay) tries the
        # compensation again from the first attempt.
        token = uuid7()
        turn.emit("saga_failed", step.name, reason=why, token=token)
        headers = {SAGA_ID: r.id, _NAME: turn.saga.name, _STEP: step.name, _TOKEN: token}
        turn.dead.append(
            (turn.message(turn.saga.topic, {"reason": why}, type=_RESUME, headers=headers), why)
        )

    async def _handle(self, ctx: Context) -> None:
        message = ctx.message
        headers = message.headers
        saga_id, token = headers.get(SAGA_ID), headers.get(_TOKEN)
        if not saga_id or not token or message.type not in (_REPLY, _CALL, _RESUME):
            raise DeadLetter(
                f"not a saga message (type {message.type!r}, saga-id {saga_id!r}, token {token!r})"
            )
        record = await load_saga(ctx.tx, saga_id)
        if record is None:
            raise DeadLetter(f"unknown saga {saga_id}")
        try:
            saga = self.definition(record.name, record.version)
        except SagaError as exc:
            raise DeadLetter(str(exc)) from None
        turn = _Turn(saga, record, self.app.clock.time(), message, self.app.outbound)
        before = record.seq
        if token != record.token or (record.terminal and message.type != _RESUME):
            if message.type == _REPLY:
                turn.emit(
                    "ignored",
                    headers.get(_STEP, ""),
                    token=token,
                    reason="saga finished" if record.terminal else "answers an earlier request",
                )
            else:
                return  # a call or resume that was already handled
        else:
            step = saga.steps[record.step]
            if message.type == _REPLY:
                reply = message.decode(dict)
                self._on_reply(turn, step, reply)
            elif message.type == _RESUME:
                turn.emit("resumed", step.name, index=record.step)
                self._send(turn, record.step, "compensation", attempt=1)
            else:
                await self._call(ctx, turn, step)
        await self._commit(ctx, before, turn)

    async def _commit(self, session: Session, before: int, turn: _Turn) -> None:
        """Store the turn: row, history, outgoing messages, read model, dead letters."""
        await save_saga(session.tx, before, turn.record, turn.events)
        await session.send(turn.messages)
        await self._notify(session, turn)
        saga_id = turn.record.id
        for dead, why in turn.dead:
            _log.error(
                "saga %s failed: %s",
                saga_id,
                why,
                extra={"event": "conveyor.saga_failed", "saga_id": saga_id},
            )
            await session.dead_letter(
                f"saga {saga_id}: {why}",
                error_type="SagaCompensationFailed",
                message=dead,
                group=turn.saga.topic,
            )

    async def _expire(self, app: App) -> None:
        await self.expire()

    async def expire(self) -> int:
        """Time out every awaited request whose deadline has passed; returns
        how many. Each orchestrating worker runs this every ``timer_interval``."""
        now = self.app.clock.time()
        async with self.app.store.transaction() as tx:
            due = await due_sagas(tx, now, names=self._orchestrated, limit=500)
        expired = 0
        for saga_id in due:
            try:
                async with self.app.transaction() as session:
                    record = await load_saga(session.tx, saga_id)
                    if (
                        record is None
                        or record.terminal
                        or record.deadline is None
                        or record.deadline > now
                        or (record.name, record.version) not in self._definitions
                    ):
                        continue
                    saga = self._definitions[(record.name, record.version)]
                    step = saga.steps[record.step]
                    turn = _Turn(saga, record, now, None, self.app.outbound)
                    timeout = step.timeout_for(record.phase) or 0.0
                    self._step_failed(turn, step, f"no reply within {timeout:g}s", timed_out=True)
                    await self._commit(session, record.seq, turn)
                expired += 1
            except SagaConflict:
                continue  # another worker moved this saga first
        return expired

    def _on_reply(self, turn: _Turn, step: Step, reply: Mapping[str, Any]) -> None:
        r = turn.record
        ok = bool(reply.get("ok"))
        if r.phase == "action":
            if ok:
                turn.emit("succeeded", step.name, index=r.step, data=dict(reply.get("data") or {}))
            else:
                turn.emit(
                    "failed",
                    step.name,
                    index=r.step,
                    reason=str(reply.get("reason", "")),
                    timed_out=False,
                )
            self._advance(turn)
        elif ok:
            turn.emit("compensated", step.name, index=r.step)
            self._advance(turn)
        else:
            self._step_failed(turn, step, str(reply.get("reason", "")), timed_out=False)

    async def _call(self, ctx: Context, turn: _Turn, step: Step) -> None:
        """Run a local step in this transaction (its writes commit with the outcome)."""
        r = turn.record
        func = step.local(r.phase)
        assert func is not None
        try:
            async with ctx.tx.savepoint():
                result = await func(ctx, dict(r.data))
        except StepFailed as exc:
            if r.phase == "action":
                turn.emit("failed", step.name, index=r.step, reason=exc.reason, timed_out=False)
                self._advance(turn)
            else:
                self._step_failed(turn, step, exc.reason, timed_out=False)
            return
        except Exception as exc:
            if r.phase == "action":
                raise  # the worker retries the call on the orchestrator's policy
            self._step_failed(turn, step, f"{type(exc).__name__}: {exc}", timed_out=False)
            return
        if r.phase == "action":
            turn.emit(
                "succeeded",
                step.name,
                index=r.step,
                data=_as_dict(result, f"step {step.name!r} result"),
            )
        else:
            turn.emit("compensated", step.name, index=r.step)
        self._advance(turn)

    # Participants. ---------------------------------------------------------

    def participant(
        self, topic: str, *, group: str | None = None, **options: Unpack[HandlerOptions]
    ) -> Callable[[ParticipantFunc], ParticipantFunc]:
        """Register ``async def f(ctx, data) -> dict | None`` as the handler of
        saga commands on ``topic``; what it returns is merged into the saga's
        data and ``raise StepFailed(reason)`` refuses the step.

        The participant records each (saga, step) it answers, in the same
        transaction as its own writes and its reply: a repeated command gets
        the first reply again without acting; a compensation that arrives
        before its action (the orchestrator timed out first) voids the step,
        so the late action does nothing; a compensation of a step that never
        acted replies at once without calling ``f``. So an action and its
        compensation must be handled by services that share one store.

        The options are ``App.handler``'s (``HandlerOptions``).
        """

        def register(func: ParticipantFunc) -> ParticipantFunc:
            body_type = Handler.inspect_body(func)
            codec = self.app.codec

            async def call(ctx: Context) -> object:
                if body_type is None:
                    return await func(ctx)
                return await func(ctx, ctx.message.decode(body_type, codec))

            async def handle(ctx: Context) -> None:
                await self._participate(ctx, call)

            handle.__qualname__ = func.__qualname__
            self.app.handler(topic, group=group or func.__name__, **options)(handle)
            return func

        return register

    async def _participate(
        self, ctx: Context, call: Callable[[Context], Awaitable[object]]
    ) -> None:
        h = ctx.message.headers
        saga_id, step, phase, token, reply_to = (
            h.get(SAGA_ID),
            h.get(_STEP),
            h.get(_PHASE),
            h.get(_TOKEN),
            h.get(_REPLY_TO),
        )
        if not (saga_id and step and token and reply_to) or phase not in ("action", "compensation"):
            raise DeadLetter(
                "not a saga command: saga-id, saga-step, saga-token, saga-reply-to and saga-phase headers are required"
            )
        tx = ctx.tx
        row = await tx.fetchone(
            "SELECT status, reply FROM conveyor_saga_steps WHERE saga_id = ? AND step = ?",
            [saga_id, step],
        )
        status = None if row is None else str(row[0])
        now = self.app.clock.time()

        async def reply(ok: bool, data: Mapping[str, Any] | None = None, reason: str = "") -> None:
            await ctx.publish(
                reply_to,
                {"ok": ok, "data": dict(data or {}), "reason": reason},
                type=_REPLY,
                headers={SAGA_ID: saga_id, _STEP: step, _PHASE: phase, _TOKEN: token},
            )

        async def record(new: str, answer: Mapping[str, Any]) -> None:
            text = _dumps(answer)
            if row is None:
                await tx.execute(
                    "INSERT INTO conveyor_saga_steps (saga_id, step, status, reply, updated_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    [saga_id, step, new, text, now],
                )
            else:
                await tx.execute(
                    "UPDATE conveyor_saga_steps SET status = ?, reply = ?, updated_at = ? "
                    "WHERE saga_id = ? AND step = ?",
                    [new, text, now, saga_id, step],
                )

        if phase == "action":
            if status in ("done", "failed"):
                assert row is not None
                first = _loads(row[1])
                await reply(bool(first.get("ok")), first.get("data"), str(first.get("reason", "")))
                return
            if status in ("voided", "compensated"):
                await reply(False, reason=f"step {step} was compensated before it ran")
                return
            try:
                async with tx.savepoint():
                    result = await call(ctx)
            except StepFailed as exc:
                await record("failed", {"ok": False, "reason": exc.reason})
                await reply(False, reason=exc.reason)
                return
            data = _as_dict(result, f"the reply of {step!r}")
            await record("done", {"ok": True, "data": data})
            await reply(True, data)
            return
        if status in ("voided", "compensated"):
            await reply(True)
            return
        if status != "done":
            # Never acted (or refused): nothing to undo; a late action now does nothing.
            await record("voided", {"ok": False, "reason": "voided"})
            await reply(True)
            return
        # Take the step before undoing it: a conditional update that locks the
        # record until this transaction ends. A second delivery of the same
        # compensation (a resend after a timeout, on another replica) waits
        # here, then finds the step compensated and does nothing.
        taken = await tx.execute(
            "UPDATE conveyor_saga_steps SET status = 'compensated', reply = ?, updated_at = ? "
            "WHERE saga_id = ? AND step = ? AND status = 'done'",
            [_dumps({"ok": True}), now, saga_id, step],
        )
        if not taken:
            await reply(True)
            return
        try:
            async with tx.savepoint():
                await call(ctx)
        except StepFailed as exc:
            # Not undone: the step is done again, for the next attempt.
            assert row is not None
            await tx.execute(
                "UPDATE conveyor_saga_steps SET status = 'done', reply = ? "
                "WHERE saga_id = ? AND step = ?",
                [row[1], saga_id, step],
            )
            await reply(False, reason=exc.reason)
            return
        await reply(True)


def _dumps(value: Mapping[str, Any]) -> str:
    return json.dumps(dict(value), separators=(",", ":"), default=str)


def _loads(text: str) -> dict[str, Any]:
    value = json.loads(text)
    return value if isinstance(value, dict) else {}
