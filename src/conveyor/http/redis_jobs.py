"""A ``JobStore`` on Redis: job records as hashes with native ``EXPIRE``.
Requires ``pip install 'conveyor[redis]'``.

URL: ``redis://host:port/db?namespace=NAME``; keys are
``conveyor:{NAME}:job:<id>``, ``conveyor:{NAME}:idem:<owner>:<key>`` and the
outbox ``conveyor:{NAME}:jobs-outbox`` (the braces keep a namespace in one
Redis Cluster hash slot, which ``MULTI`` and the scripts need).

Accepting a job writes the record, the idempotency response and the message
in one Lua script (atomic, one round trip): the message goes to a Redis outbox (a sorted set
scored by when it may next be sent). ``relay()`` leases due entries (their
score moves ``lease`` seconds ahead), publishes them to the App's broker and
then deletes them: at-least-once, since a relay that dies between publish and
delete leaves the entry to be sent again once its lease ends, and the
handler's inbox drops the duplicate (same message id). Every replica of the
server runs the relay (``JobAPI``'s lifespan).

State changes are Lua scripts, so a cancel and a final state cannot both
win. A record's expiry is checked against the store's clock on every read
and enforced by Redis ``EXPIRE`` as well (which frees the memory). The final
state is written when the handler returns, before its transaction commits: a
crash in between re-runs the handler, which finds the job final and stops;
the job's webhook is queued in that transaction.
"""

from __future__ import annotations

import base64
import json
import math
import time
from collections.abc import Mapping
from typing import Any

from conveyor._redis import RedisConfig
from conveyor._redis import client as redis_client
from conveyor._time import Clock, SystemClock
from conveyor._urls import redact
from conveyor.errors import BrokerError, StoreError
from conveyor.http._jobs import (
    CANCELLED,
    SUCCEEDED,
    IdempotencyRecord,
    JobRecord,
    StoredResponse,
)
from conveyor.http._json import json_text
from conveyor.messages import CORRELATION_ID, Message
from conveyor.runtime import App, Session

try:
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "RedisJobStore needs the redis client: pip install 'conveyor[redis]'"
    ) from exc

__all__ = ["RedisJobStore"]

# A job that never finishes is forgotten after this long.
_PENDING_KEEP = 7 * 24 * 3600

_FINAL = "local s = redis.call('HGET', KEYS[1], 'status') "
_IS_FINAL = "(s == 'SUCCEEDED' or s == 'FAILED' or s == 'CANCELLED')"

# KEYS[1] idem key; ARGV fingerprint, now, lease_until, expires_at (seconds).
_BEGIN = """
local now = tonumber(ARGV[2])
local cur = redis.call('HMGET', KEYS[1], 'fingerprint', 'response', 'lease_until', 'expires_at')
if cur[1] then
  local pending = (cur[2] == false or cur[2] == '')
  if tonumber(cur[4]) > now and (not pending or tonumber(cur[3]) > now) then
    return {cur[1], cur[2] or '', cur[3], cur[4]}
  end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'fingerprint', ARGV[1], 'response', '', 'lease_until', ARGV[3],
           'expires_at', ARGV[4])
redis.call('EXPIRE', KEYS[1], math.max(1, math.ceil(tonumber(ARGV[4]) - now)))
return false
"""

_RUNNING = (
    _FINAL
    + "if not s or "
    + _IS_FINAL
    + " then return 0 end "
    + "redis.call('HSET', KEYS[1], 'status', 'RUNNING', 'updated_at', ARGV[1]) return 1"
)

_PROGRESS = (
    _FINAL
    + "if s ~= 'RUNNING' then return 0 end "
    + "redis.call('HSET', KEYS[1], 'progress', ARGV[1], 'note', ARGV[2], 'updated_at', ARGV[3]) "
    + "return 1"
)

# ARGV now, ttl. Returns 1 if cancelled now, 0 if already final, -1 if unknown.
_CANCEL = (
    _FINAL
    + "if not s then return -1 end "
    + "if "
    + _IS_FINAL
    + " then return 0 end "
    + "redis.call('HSET', KEYS[1], 'status', 'CANCELLED', 'updated_at', ARGV[1], "
    + "'finished_at', ARGV[1], 'expires_at', tonumber(ARGV[1]) + tonumber(ARGV[2])) "
    + "redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]))) return 1"
)

# ARGV status, result, error, now, ttl. A job cancelled meanwhile stays
# cancelled, but its first finish reports it (once) so its webhook is sent.
_FINISH = (
    _FINAL
    + "if not s then return 0 end "
    + "if s == 'CANCELLED' then "
    + "  if redis.call('HSETNX', KEYS[1], 'notified', '1') == 1 then return 1 end return 0 "
    + "end "
    + "if "
    + _IS_FINAL
    + " then return 0 end "
    + "local fields = {'status', ARGV[1], 'updated_at', ARGV[4], 'finished_at', ARGV[4], "
    + "'expires_at', tonumber(ARGV[4]) + tonumber(ARGV[5]), 'notified', '1'} "
    + "if ARGV[2] ~= '' then table.insert(fields, 'result') table.insert(fields, ARGV[2]) end "
    + "if ARGV[3] ~= '' then table.insert(fields, 'error') table.insert(fields, ARGV[3]) end "
    + "if ARGV[1] == 'SUCCEEDED' then table.insert(fields, 'progress') "
    + "table.insert(fields, '1.0') end "
    + "redis.call('HSET', KEYS[1], unpack(fields)) "
    + "redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[5]))) return 1"
)

# KEYS job, outbox[, idem]; ARGV pending keep, outbox entry, its score,
# idempotency response ('' for none), its expires_at, its keep, then the
# job's field/value pairs. One script: the three writes land together.
_ACCEPT = """
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[3], 'response', ARGV[4], 'expires_at', ARGV[5])
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[6]))
end
return 1
"""

# KEYS[1] outbox; ARGV now, lease until, limit. Leases due entries.
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], ARGV[2], member)
end
return due
"""


class RedisJobStore:
    """Job records in Redis (see the module doc). ``lease``: seconds before a
    relayed outbox entry that was not confirmed is sent again."""

    def __init__(
        self, url: str, *, clock: Clock | None = None, lease: float = 30.0, batch: int = 256
    ) -> None:
        self._config = RedisConfig(url)
        namespace = self._config.namespace
        self.url = url
        self.namespace = namespace
        self.clock: Clock = clock or SystemClock()
        self.lease = lease
        self.batch = batch
        self._prefix = f"conveyor:{{{namespace}}}:"
        self._client: aioredis.Redis | None = None
        self._app: App | None = None
        self._scripts: dict[str, Any] = {}

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            self._client = redis_client(self._config)
            for name, source in (
                ("accept", _ACCEPT),
                ("begin", _BEGIN),
                ("running", _RUNNING),
                ("progress", _PROGRESS),
                ("cancel", _CANCEL),
                ("finish", _FINISH),
                ("claim", _CLAIM),
            ):
                self._scripts[name] = self._client.register_script(source)
        return self._client

    async def connect(self, app: App) -> None:
        self._app = app
        _ = self.client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _job(self, job_id: str) -> str:
        return f"{self._prefix}job:{job_id}"

    def _idem(self, owner: str, key: str) -> str:
        return f"{self._prefix}idem:{owner}:{key}"

    @property
    def _outbox(self) -> str:
        return f"{self._prefix}jobs-outbox"

    async def _call(self, what: str, coro: Any) -> Any:
        try:
            return await coro
        except RedisError as exc:
            raise StoreError(f"Redis job store {redact(self.url)}: {what} failed: {exc}") from exc
        except OSError as exc:
            raise StoreError(f"Redis job store {redact(self.url)}: {what} failed: {exc}") from exc

    async def ping(self) -> None:
        await self._call("ping", self.client.ping())

    async def begin_idempotent(
        self, owner: str, key: str, fingerprint: str, *, lease: float, keep: float
    ) -> IdempotencyRecord | None:
        now = self.clock.time()
        found = await self._call(
            "idempotency claim",
            self._scripts_ready("begin")(
                keys=[self._idem(owner, key)], args=[fingerprint, now, now + lease, now + keep]
            ),
        )
        if not found:
            return None
        fp, response, lease_until, expires_at = (_text(v) for v in found)
        return IdempotencyRecord(
            owner=owner,
            key=key,
            fingerprint=fp,
            response=StoredResponse.from_json(response) if response else None,
            lease_until=float(lease_until),
            expires_at=float(expires_at),
        )

    def _scripts_ready(self, name: str) -> Any:
        _ = self.client
        return self._scripts[name]

    async def release_idempotent(self, owner: str, key: str) -> None:
        idem = self._idem(owner, key)
        response = await self._call("idempotency read", self.client.hget(idem, "response"))
        if not response:
            await self._call("idempotency release", self.client.delete(idem))

    async def accept(
        self,
        record: JobRecord,
        *,
        topic: str,
        payload: Mapping[str, object],
        idempotency: tuple[str, StoredResponse, float] | None = None,
    ) -> None:
        app = self._require_app()
        # The job id is its messages' correlation id (as on the SQL store).
        message = app.outbound.build(
            topic, dict(payload), {"type": "conveyor.job", "headers": {CORRELATION_ID: record.id}}
        )
        entry = json.dumps(
            {"envelope": message.envelope(), "payload": base64.b64encode(message.payload).decode()}
        )
        fields: dict[str, str] = {
            "id": record.id,
            "kind": record.kind,
            "owner": record.owner,
            "status": record.status,
            "created_at": repr(record.created_at),
            "updated_at": repr(record.updated_at),
        }
        if record.callback_url is not None:
            fields["callback_url"] = record.callback_url
        now = self.clock.time()
        keys = [self._job(record.id), self._outbox]
        args: list[object] = [_PENDING_KEEP, entry, now, "", 0, 0]
        if idempotency is not None:
            key, response, keep = idempotency
            keys.append(self._idem(record.owner, key))
            args[3:6] = [response.to_json(), now + keep, max(1, math.ceil(keep))]
        for name, value in fields.items():
            args += [name, value]
        await self._call("accept", self._scripts_ready("accept")(keys=keys, args=args))

    def _require_app(self) -> App:
        if self._app is None:
            raise StoreError("the Redis job store is not connected; use it through Jobs(app)")
        return self._app

    async def get(self, job_id: str) -> JobRecord | None:
        raw = await self._call("read", self.client.hgetall(self._job(job_id)))
        if not raw:
            return None
        record = _record({_text(k): _text(v) for k, v in raw.items()})
        if record.expires_at is not None and record.expires_at <= self.clock.time():
            return None
        return record

    async def mark_running(self, job_id: str) -> bool:
        done = await self._call(
            "mark running",
            self._scripts_ready("running")(keys=[self._job(job_id)], args=[self.clock.time()]),
        )
        return bool(int(done))

    async def set_progress(self, job_id: str, progress: float, note: str | None) -> None:
        await self._call(
            "progress",
            self._scripts_ready("progress")(
                keys=[self._job(job_id)],
                args=[repr(float(progress)), note or "", self.clock.time()],
            ),
        )

    async def cancel(self, job_id: str, *, ttl: float) -> JobRecord | None:
        await self._call(
            "cancel",
            self._scripts_ready("cancel")(keys=[self._job(job_id)], args=[self.clock.time(), ttl]),
        )
        return await self.get(job_id)

    async def is_cancelled(self, job_id: str) -> bool:
        status = await self._call("read", self.client.hget(self._job(job_id), "status"))
        return _text(status) == CANCELLED if status else False

    async def finish(
        self,
        session: Session,
        job_id: str,
        *,
        status: str,
        result: object = None,
        error: str | None = None,
        ttl: float,
    ) -> JobRecord | None:
        changed = await self._call(
            "finish",
            self._scripts_ready("finish")(
                keys=[self._job(job_id)],
                args=[
                    status,
                    "" if status != SUCCEEDED else json_text(result),
                    error or "",
                    self.clock.time(),
                    ttl,
                ],
            ),
        )
        if not int(changed):
            return None
        raw = await self._call("read", self.client.hgetall(self._job(job_id)))
        return _record({_text(k): _text(v) for k, v in raw.items()}) if raw else None

    async def prune(self) -> int:
        """Nothing to do: Redis expires records itself."""
        return 0

    async def relay(self) -> int:
        app = self._require_app()
        now = self.clock.time()
        due = await self._call(
            "outbox claim",
            self._scripts_ready("claim")(
                keys=[self._outbox], args=[now, now + self.lease, self.batch]
            ),
        )
        if not due:
            return 0
        messages = []
        for member in due:
            data = json.loads(member)
            messages.append(
                Message.from_envelope(data["envelope"], base64.b64decode(data["payload"]))
            )
        started = time.perf_counter()
        try:
            await app.broker.publish(messages)
        except Exception as exc:
            if app.observers:
                app.observers.published(
                    messages, via="relay", seconds=time.perf_counter() - started, error=exc
                )
            raise BrokerError(f"relay of {len(messages)} job message(s) failed: {exc}") from exc
        if app.observers:
            app.observers.published(messages, via="relay", seconds=time.perf_counter() - started)
        await self._call("outbox delete", self.client.zrem(self._outbox, *due))
        return len(messages)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _float(value: str | None) -> float | None:
    return None if value is None or value == "" else float(value)


def _record(h: dict[str, str]) -> JobRecord:
    status = h.get("status", "PENDING")
    return JobRecord(
        id=h["id"],
        kind=h["kind"],
        owner=h.get("owner", ""),
        status=status,
        progress=_float(h.get("progress")),
        note=h.get("note") or None,
        result=json.loads(h["result"]) if h.get("result") else None,
        error=h.get("error") or None,
        callback_url=h.get("callback_url"),
        created_at=float(h["created_at"]),
        updated_at=float(h["updated_at"]),
        finished_at=_float(h.get("finished_at")),
        expires_at=_float(h.get("expires_at")),
    )
