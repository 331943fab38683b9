"""The admin API and the dashboard mounted into a JobAPI: keys' scopes
decide which side a key may use."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from conveyor.http import AdminAPI, Console, Dashboard, create_api_key
from tests.helpers import settings_for
from tests.http_jobs import build

PROBLEM = "application/problem+json"


async def test_scopes_split_the_job_api_from_the_admin_api(tmp_path: Path) -> None:
    """Mounted into a JobAPI: a jobs key submits jobs and gets 403 from the
    admin API; an admin key reads the admin API and gets 403 from the job API;
    the dashboard's pages and the admin routes sit beside the job routes."""
    b = build(settings_for("bound", tmp_path))
    admin = AdminAPI(Console(b.app, jobs=b.jobs))
    b.api.asgi.include_router(admin.router)
    b.api.asgi.include_router(Dashboard(admin).router)
    try:
        async with asyncio.timeout(60), b.api:
            jobs_key = await create_api_key(b.app, "client")
            admin_key = await create_api_key(b.app, "ops", scopes=["admin:read"])
            transport = httpx.ASGITransport(app=b.api)
            async with httpx.AsyncClient(transport=transport, base_url="http://api") as c:
                as_client = {"Authorization": f"Bearer {jobs_key}"}
                as_ops = {"Authorization": f"Bearer {admin_key}"}
                accepted = await c.post("/jobs/square", json={"n": 3}, headers=as_client)
                assert accepted.status_code == 202
                refused = await c.get("/admin/queues", headers=as_client)
                assert refused.status_code == 403
                assert refused.headers["content-type"] == PROBLEM
                denied = await c.post("/jobs/square", json={"n": 3}, headers=as_ops)
                assert denied.status_code == 403
                assert denied.headers["content-type"] == PROBLEM
                listed = (await c.get("/admin/jobs", headers=as_ops)).json()
                assert [j["id"] for j in listed["items"]] == [accepted.json()["id"]]
                one = await c.get(f"/admin/jobs/{accepted.json()['id']}", headers=as_ops)
                assert one.json()["kind"] == "square"
                story = (
                    await c.get(
                        "/admin/search", params={"q": accepted.json()["id"]}, headers=as_ops
                    )
                ).json()
                assert story["found"] == ["job"]
                page = await c.get("/console/", headers=as_ops)
                assert page.status_code == 200
                assert "<h1>Overview</h1>" in page.text
                login = await c.get("/console/")
                assert login.status_code == 303
                assert login.headers["location"] == "/console/login"
                script = await c.get("/console/static/console.js")
                assert "data-live" in script.text
                paths = (await c.get("/openapi.json")).json()["paths"]
                assert "/admin/search" in paths
                assert "/jobs/square" in paths
                assert not any(p.startswith("/console") for p in paths)
    finally:
        await b.app.close()
        await b.jobs.store.close()
