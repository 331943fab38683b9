"""The console's admin API on SQLite and on PostgreSQL + Redis: filters,
pagination, groups, replay through the inbox, purge confirmation, scopes,
the audit log, search and mounting into a JobAPI."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from conveyor import App, RetryPolicy, Settings
from conveyor.http import AdminAPI, ApiKeys, Console
from conveyor.messages import Message
from conveyor.runtime import Context, Journal
from conveyor.testing import eventually, running
from tests.namespaces import drop_all
from tests.servers import POSTGRES_URL, REDIS_URL, namespaced

PROBLEM = "application/problem+json"
TIMEOUT = f"{__name__}.ProviderTimeout"
DECLINED = f"{__name__}.Declined"
FAST = RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.01)


class ProviderTimeout(Exception):
    """The payment provider did not answer."""


class Declined(Exception):
    """The card was declined."""


@dataclass
class Rig:
    app: App
    journal: Journal
    console: Console
    admin: AdminAPI
    failing: dict[str, bool]

    def client(self, key: str | None = None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.admin), base_url="http://admin", headers=headers
        )

    async def applied(self) -> dict[str, int]:
        rows = await self.app.store.read("SELECT msg_id, COUNT(*) FROM applied GROUP BY msg_id")
        return {str(r[0]): int(r[1]) for r in rows}


def _urls(kind: str, tmp_path: Path) -> tuple[str, str]:
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'admin.db'}"
        return url, url
    return namespaced(REDIS_URL, "adm"), namespaced(POSTGRES_URL, "adm")


@contextlib.asynccontextmanager
async def rig(kind: str, tmp_path: Path) -> AsyncIterator[Rig]:
    broker_url, store_url = _urls(kind, tmp_path)
    app = App(
        "admin-test",
        settings=Settings(broker_url=broker_url, store_url=store_url, idle_poll=0.01),
    )
    journal = Journal(app, flush_every=0.05)
    failing = {"pay": True, "ship": True}

    @app.on_connect
    async def tables(app: App) -> None:
        async with app.transaction() as s:
            await s.execute("CREATE TABLE IF NOT EXISTS applied (msg_id TEXT NOT NULL)")

    @app.handler("pay", group="payer", retry=FAST)
    async def pay(ctx: Context, body: dict[str, Any]) -> None:
        if failing["pay"]:
            raise ProviderTimeout(f"no answer for order {body['order']}")
        await ctx.execute("INSERT INTO applied (msg_id) VALUES (?)", (ctx.message.id,))

    @app.handler("ship", group="shipper", retry=FAST)
    async def ship(ctx: Context, body: dict[str, Any]) -> None:
        if failing["ship"]:
            raise Declined("address unknown")
        await ctx.execute("INSERT INTO applied (msg_id) VALUES (?)", (ctx.message.id,))

    console = Console(app, trace_link="http://traces/trace/{trace_id}")
    admin = AdminAPI(console)
    try:
        async with asyncio.timeout(120), app:
            yield Rig(app, journal, console, admin, failing)
    finally:
        await app.close()
        await drop_all({broker_url, store_url})


async def _dead(r: Rig, pay: int, ship: int) -> None:
    for i in range(pay):
        await r.app.publish("pay", {"order": i}, headers={"correlation-id": f"order-{i}"})
    for i in range(ship):
        await r.app.publish("ship", {"order": i})
    async with running(r.app):

        async def all_dead() -> bool:
            return await r.app.store.dead_letter_count() == pay + ship

        await eventually(all_dead, timeout=60, what="every message dead-lettered")
        await r.journal.flush()


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["detail"]
    return body


KINDS = ["sqlite", "postgres+redis"]


@pytest.mark.parametrize("kind", KINDS)
async def test_dead_letters_filter_page_and_group(kind: str, tmp_path: Path) -> None:
    """The list pages by cursor through every match once; filters narrow it;
    groups count by topic, group, error type and frame; one shows its history."""
    async with rig(kind, tmp_path) as r, r.client() as c:
        await _dead(r, pay=7, ship=3)
        seen: list[int] = []
        after = 0
        while True:
            page = (await c.get("/admin/dead-letters", params={"limit": 3, "after": after})).json()
            assert page["total"] == 10
            seen += [d["id"] for d in page["items"]]
            if page["next"] is None:
                break
            after = int(page["next"])
        assert len(seen) == 10
        assert len(set(seen)) == 10
        assert seen == sorted(seen)
        pays = (await c.get("/admin/dead-letters", params={"topic": "pay"})).json()
        assert pays["total"] == 7
        assert {d["error_type"] for d in pays["items"]} == {TIMEOUT}
        text = (await c.get("/admin/dead-letters", params={"reason": "order 3"})).json()
        assert [d["correlation_id"] for d in text["items"]] == ["order-3"]
        typed = await c.get("/admin/dead-letters", params={"error_type": DECLINED})
        assert typed.json()["total"] == 3
        late = await c.get("/admin/dead-letters", params={"since": 4102444800})
        assert late.json()["total"] == 0
        groups = (await c.get("/admin/dead-letters/groups")).json()
        assert [(g["topic"], g["error_type"], g["count"]) for g in groups] == [
            ("pay", TIMEOUT, 7),
            ("ship", DECLINED, 3),
        ]
        assert all(" in pay" in g["frame"] or " in ship" in g["frame"] for g in groups)
        one = (await c.get(f"/admin/dead-letters/{pays['items'][0]['id']}")).json()
        assert one["traceback"]
        assert "ProviderTimeout" in one["traceback"]
        assert [h["event"] for h in one["history"]] == ["published", "retry", "dead_letter"]
        assert one["payload"].replace(" ", "").startswith('{"order":')
        assert_problem(await c.get("/admin/dead-letters/999999"), 404)
        queues = {(q["topic"], q["group"]): q for q in (await c.get("/admin/queues")).json()}
        assert queues[("pay", "payer")]["dead"] == 7
        assert queues[("pay", "payer")]["failed_per_min"] > 0


@pytest.mark.parametrize("kind", KINDS)
async def test_replay_goes_through_the_inbox_and_is_audited(kind: str, tmp_path: Path) -> None:
    """Replaying a group applies each message once: a dead letter of a
    message its group already applied is skipped by the inbox; the audit
    log records the actor and how many were replayed."""
    async with rig(kind, tmp_path) as r:
        await _dead(r, pay=5, ship=2)
        keys = ApiKeys(r.app)
        writer = await keys.create("ops", scopes=["admin:write"])
        r.failing["pay"] = False
        # One message applied already, and dead-lettered again by hand (as a
        # crash between apply and ack could): the replay must not apply it twice.
        applied_once = Message.create("pay", {"order": 99}, headers={"correlation-id": "o-99"})
        async with r.app.transaction() as s:
            await r.app.store.inbox_add(s.tx, "payer", applied_once.id)
            await s.execute("INSERT INTO applied (msg_id) VALUES (?)", (applied_once.id,))
            await r.app.store.dead_letter(
                s.tx,
                group="payer",
                message=applied_once,
                reason="ProviderTimeout: x",
                error_type=TIMEOUT,
                traceback="",
            )
        async with r.client(writer) as c, running(r.app):
            groups = (await c.get("/admin/dead-letters/groups", params={"topic": "pay"})).json()
            framed = next(g for g in groups if g["frame"])
            done = await c.post("/admin/dead-letters/replay", json={"dead_group": framed["id"]})
            assert done.status_code == 200, done.text
            assert done.json()["affected"] == 5
            assert done.json()["remaining"] == 0
            rest = await c.post("/admin/dead-letters/replay", json={"topic": "pay"})
            assert rest.json()["affected"] == 1

            async def settled() -> bool:
                return len(await r.applied()) == 6

            await eventually(settled, timeout=60, what="every payment applied")
            await r.journal.flush()
            again = await c.post("/admin/dead-letters/replay", json={"topic": "pay"})
            assert again.json()["affected"] == 0
            assert_problem(
                await c.post("/admin/dead-letters/replay", json={"dead_group": "nope"}), 404
            )
            assert_problem(await c.post("/admin/dead-letters/replay", json={}), 422)
        assert set((await r.applied()).values()) == {1}
        async with r.client(writer) as c:
            audit = (await c.get("/admin/audit")).json()["items"]
        assert [(a["action"], a["actor"], a["affected"]) for a in audit] == [
            ("dead_letters.replay", "ops", 0),
            ("dead_letters.replay", "ops", 1),
            ("dead_letters.replay", "ops", 5),
        ]
        assert audit[2]["target"] == {"dead_group": framed["id"]}


@pytest.mark.parametrize("kind", KINDS)
async def test_purge_needs_confirm_and_scopes_are_enforced(kind: str, tmp_path: Path) -> None:
    """A read-only key reads but gets 403 on writes; a jobs key gets 403 on
    reads; no key is 401; a purge without confirm=true is 400 and changes
    nothing; with it, the selection is gone and audited."""
    async with rig(kind, tmp_path) as r:
        await _dead(r, pay=2, ship=3)
        keys = ApiKeys(r.app)
        reader = await keys.create("viewer", scopes=["admin:read"])
        jobs = await keys.create("client")
        writer = await keys.create("ops", scopes=["admin:write"])
        async with r.client() as c:
            assert_problem(await c.get("/admin/queues"), 401)
        async with r.client("cvk_wrong") as c:
            assert_problem(await c.get("/admin/queues"), 401)
        async with r.client(jobs) as c:
            assert_problem(await c.get("/admin/queues"), 403)
        async with r.client(reader) as c:
            assert (await c.get("/admin/dead-letters")).status_code == 200
            assert_problem(await c.post("/admin/dead-letters/replay", json={"all": True}), 403)
            assert_problem(
                await c.post("/admin/dead-letters/purge?confirm=true", json={"all": True}), 403
            )
            first = (await c.get("/admin/dead-letters")).json()["items"][0]["id"]
            assert_problem(await c.post(f"/admin/dead-letters/{first}/replay"), 403)
        async with r.client(writer) as c:
            body = assert_problem(
                await c.post("/admin/dead-letters/purge", json={"topic": "ship"}), 400
            )
            assert "confirm" in body["detail"]
            assert await r.app.store.dead_letter_count() == 5
            gone = await c.post("/admin/dead-letters/purge?confirm=true", json={"topic": "ship"})
            assert gone.json()["affected"] == 3
            assert await r.app.store.dead_letter_count() == 2
            capped = await c.post(
                "/admin/dead-letters/purge?confirm=true", json={"all": True, "limit": 1}
            )
            assert capped.json() | {"audit_id": None} == {
                "action": "dead_letters.purge",
                "affected": 1,
                "remaining": 1,
                "audit_id": None,
            }
            audit = (await c.get("/admin/audit", params={"action": "dead_letters.purge"})).json()
            assert [(a["actor"], a["affected"]) for a in audit["items"]] == [("ops", 1), ("ops", 3)]
            page = (await c.get("/admin/audit", params={"limit": 1})).json()
            assert page["next"]
            older = await c.get("/admin/audit", params={"limit": 1, "before": page["next"]})
            assert older.json()["items"][0]["affected"] == 3


@pytest.mark.parametrize("kind", KINDS)
async def test_search_tells_the_story_of_an_id(kind: str, tmp_path: Path) -> None:
    """A correlation id, a message id or a dead letter's number lead to the
    same story: its messages, attempts, dead letters and a verdict."""
    async with rig(kind, tmp_path) as r, r.client() as c:
        await _dead(r, pay=2, ship=0)
        await r.journal.flush()
        story = (await c.get("/admin/search", params={"q": "order-1"})).json()
        assert story["correlation_id"] == "order-1"
        assert story["verdict"].startswith("dead in pay (group payer) after 2 attempts")
        assert "ProviderTimeout" in story["verdict"]
        [message] = story["messages"]
        assert message["groups"] == ["payer"]
        # The journal is best effort and has been seen to miss one of the two
        # attempts on Redis + PostgreSQL (cause open); the dead letter is the
        # record of them.
        assert message["attempts"] >= 1
        assert story["dead_letters"][0]["attempts"] == 2
        by_id = (await c.get("/admin/search", params={"q": message["id"]})).json()
        assert by_id["verdict"] == story["verdict"]
        assert "message" in by_id["found"]
        number = str(story["dead_letters"][0]["id"])
        assert (await c.get("/admin/search", params={"q": number})).json()["verdict"] == story[
            "verdict"
        ]
        unknown = (await c.get("/admin/search", params={"q": "nothing-here"})).json()
        assert unknown["verdict"].startswith("nothing is known")
        assert_problem(await c.get("/admin/search"), 422)
        assert (await c.get("/admin/sagas")).json() == {"items": [], "next": None}
        assert_problem(await c.get("/admin/sagas", params={"state": "BOGUS"}), 422)
        assert_problem(await c.get("/admin/sagas/none"), 404)
        assert (await c.get("/admin/jobs")).json() == {"items": [], "next": None}
        assert_problem(await c.get("/admin/jobs/none"), 404)
        workers = (await c.get("/admin/workers", params={"all": True})).json()
        assert isinstance(workers, list)


async def test_the_schema_documents_every_route_with_problem_errors(tmp_path: Path) -> None:
    """/openapi.json lists the admin routes; their errors are problem bodies."""
    async with rig("sqlite", tmp_path) as r, r.client() as c:
        schema = (await c.get("/openapi.json")).json()
        paths = schema["paths"]
        for path in (
            "/admin/queues",
            "/admin/dead-letters",
            "/admin/dead-letters/groups",
            "/admin/dead-letters/{dead_id}",
            "/admin/dead-letters/replay",
            "/admin/dead-letters/purge",
            "/admin/sagas/{saga_id}",
            "/admin/search",
            "/admin/audit",
            "/admin/breakers",
            "/admin/workers",
            "/admin/jobs",
        ):
            assert path in paths, path
        forbidden = paths["/admin/dead-letters/purge"]["post"]["responses"]["403"]
        assert PROBLEM in forbidden["content"]
        assert_problem(await c.get("/admin/nope"), 404)


@pytest.mark.parametrize("kind", KINDS)
async def test_every_dashboard_page_renders(kind: str, tmp_path: Path) -> None:
    """The console's pages answer 200 with their tables on this store."""
    from conveyor.http import Dashboard

    async with rig(kind, tmp_path) as r:
        await _dead(r, pay=2, ship=1)
        pages = Dashboard(r.admin)
        transport = httpx.ASGITransport(app=pages)
        async with httpx.AsyncClient(transport=transport, base_url="http://console") as c:
            first = (await r.console.dead_letters(None, limit=1)).items[0].id
            groups = await r.console.dead_groups()
            for path, needle in (
                ("/console/", 'id="queues-table"'),
                ("/console/dead-letters", 'id="groups-table"'),
                (f"/console/dead-letters/{first}", "Traceback"),
                (f"/console/dead-letters/confirm?action=purge&dead_group={groups[0].id}", "Purge"),
                ("/console/sagas?stuck=true", "no sagas match"),
                ("/console/audit", "no admin action yet"),
                ("/console/search?q=order-1", 'id="verdict"'),
            ):
                page = await c.get(path)
                assert page.status_code == 200, (path, page.text)
                assert needle in page.text, path
            purged = await c.post(
                "/console/dead-letters/purge",
                content=f"dead_group={groups[0].id}",
                headers={"content-type": "application/x-www-form-urlencoded"},
            )
            assert purged.status_code == 303
            assert "purged" in purged.headers["location"]
