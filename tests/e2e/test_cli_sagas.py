"""``conveyor sagas list|show`` run as a subprocess against a SQLite store that
a small saga app filled in-process: three sagas COMPLETED (one of them got a
late reply), one COMPENSATED after a refused step, one still RUNNING."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conveyor import App, Context, Settings
from conveyor.sagas import (
    COMPENSATED,
    COMPLETED,
    RUNNING,
    Saga,
    Sagas,
    Step,
    StepFailed,
    saga_id_of,
)
from conveyor.testing import eventually, running
from tests.e2e.test_cli import cli

STEPS = ("reserve", "charge", "ship")
ORDERS = ("order-1", "order-2", "order-3", "order-4")


@dataclass(frozen=True)
class Prepared:
    """The store's URL and file, and the history of every saga in it."""

    url: str
    db: Path
    workdir: Path
    histories: dict[str, list[tuple[int, str, str]]]


async def _prepare(db: Path) -> dict[str, list[tuple[int, str, str]]]:
    url = f"sqlite:///{db}"
    app = App("sagas-cli", settings=Settings(broker_url=url, store_url=url, idle_poll=0.01))
    sagas = Sagas(app)
    sagas.register(
        Saga(
            "order",
            steps=[Step(n, command=f"svc.{n}", compensation=f"svc.undo_{n}") for n in STEPS],
        )
    )
    # Nobody handles audit.check: an audit saga waits on its first step.
    sagas.register(Saga("audit", version=2, steps=[Step("check", command="audit.check")]))

    def participant(name: str) -> None:
        @sagas.participant(f"svc.{name}", group=name)
        async def act(ctx: Context, data: dict[str, Any]) -> dict[str, Any]:
            if data.get("refuse") == name:
                raise StepFailed(f"{name} refused")
            return {f"{name}_ref": f"{name}-{saga_id_of(ctx)}"}

        @sagas.participant(f"svc.undo_{name}", group=f"undo_{name}")
        async def undo(ctx: Context, data: dict[str, Any]) -> None:
            return None

    for name in STEPS:
        participant(name)

    async def state(sid: str) -> str:
        record = await sagas.get(sid)
        return "" if record is None else record.state

    async def settles(sid: str, want: str) -> None:
        async def reached() -> bool:
            return await state(sid) == want

        await eventually(reached, what=f"saga {sid} {want}")

    async with app, running(app):
        for n, sid in enumerate(ORDERS, 1):
            data: dict[str, Any] = {"order": n}
            if sid == "order-4":
                data["refuse"] = "ship"
            async with app.transaction() as s:
                await sagas.start(s, "order", data, saga_id=sid)
            # One at a time, so "newest first" is the order they were started in.
            await settles(sid, COMPENSATED if sid == "order-4" else COMPLETED)
        async with app.transaction() as s:
            await sagas.start(s, "audit", {"who": "ops"}, saga_id="audit-1")
        first = next(e for e in await sagas.history("order-1") if e.type == "sent")
        async with app.transaction() as s:
            await s.publish(
                "saga.order",
                {"ok": True, "data": {}, "reason": ""},
                type="saga.reply",
                headers={
                    "saga-id": "order-1",
                    "saga-step": "reserve",
                    "saga-phase": "action",
                    "saga-token": str(first.detail["token"]),
                },
            )

        async def late_reply_recorded() -> bool:
            return "ignored" in [e.type for e in await sagas.history("order-1")]

        await eventually(late_reply_recorded, what="late reply recorded")
        assert await state("audit-1") == RUNNING
        return {
            sid: [(e.seq, e.type, e.step) for e in await sagas.history(sid)]
            for sid in (*ORDERS, "audit-1")
        }


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    workdir = tmp_path_factory.mktemp("sagas_cli")
    db = workdir / "sagas.db"
    histories = asyncio.run(_prepare(db))
    return Prepared(url=f"sqlite:///{db}", db=db, workdir=workdir, histories=histories)


def _rows(table: str) -> dict[str, list[str]]:
    """The body rows of a rich table, by their first cell."""
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells and cells[0] and cells[0] != "id":
            rows[cells[0]] = cells
    return rows


def _ids(table: str) -> list[str]:
    return list(_rows(table))


def test_list_shows_every_saga_newest_first_with_state_step_and_error(
    prepared: Prepared,
) -> None:
    """`sagas list` has one row per saga, newest first, with its name, version,
    state, the step it waits on and the error that made it compensate."""
    out = cli("sagas", "list", "--store", prepared.url, cwd=prepared.workdir).stdout
    rows = _rows(out)
    assert list(rows) == ["audit-1", "order-4", "order-3", "order-2", "order-1"]
    header = ["id", "name", "version", "state", "step", "attempt", "age", "updated", "error"]
    table_header = next(
        [c.strip() for c in line.split("┃")[1:-1]] for line in out.splitlines() if "┃ id" in line
    )
    assert table_header == header
    audit = dict(zip(header, rows["audit-1"], strict=True))
    assert (audit["name"], audit["version"], audit["state"]) == ("audit", "2", RUNNING)
    assert (audit["step"], audit["attempt"]) == ("check (action)", "1")
    failed = dict(zip(header, rows["order-4"], strict=True))
    assert (failed["state"], failed["step"], failed["error"]) == (
        COMPENSATED,
        "",
        "ship refused",
    )
    for sid in ("order-1", "order-2", "order-3"):
        done = dict(zip(header, rows[sid], strict=True))
        assert (done["name"], done["state"], done["error"]) == ("order", COMPLETED, "")


def test_list_filters_by_state_name_and_limit(prepared: Prepared) -> None:
    """--state (repeatable, any case), --name and --limit select the rows shown."""

    def ids(*args: str) -> list[str]:
        return _ids(
            cli("sagas", "list", *args, "--store", prepared.url, cwd=prepared.workdir).stdout
        )

    assert ids("--state", "COMPENSATED") == ["order-4"]
    assert ids("--state", "running", "--state", "compensated") == ["audit-1", "order-4"]
    assert ids("--name", "order", "--state", "COMPLETED") == ["order-3", "order-2", "order-1"]
    assert ids("--name", "audit") == ["audit-1"]
    assert ids("--limit", "2") == ["audit-1", "order-4"]
    empty = cli("sagas", "list", "--state", "FAILED", "--store", prepared.url, cwd=prepared.workdir)
    assert empty.stdout.strip() == "no sagas"


def test_list_json_has_one_object_per_saga(prepared: Prepared) -> None:
    """--json prints one JSON object per saga with its record and current step."""
    out = cli("sagas", "list", "--json", "--store", prepared.url, cwd=prepared.workdir).stdout
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in records] == ["audit-1", "order-4", "order-3", "order-2", "order-1"]
    by_id = {r["id"]: r for r in records}
    assert by_id["audit-1"]["current"] == "check (action)"
    assert by_id["audit-1"]["data"] == {"who": "ops"}
    assert by_id["order-4"]["state"] == COMPENSATED
    assert by_id["order-4"]["error"] == "ship refused"
    assert by_id["order-2"]["data"] == {
        "order": 2,
        **{f"{n}_ref": f"{n}-order-2" for n in STEPS},
    }


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("sagas", "list", "--state", "DONE"), "unknown saga state 'DONE'"),
        (("sagas", "show", "nope"), "no saga with id 'nope'"),
    ],
)
def test_bad_input_is_one_readable_line_and_exit_1(
    prepared: Prepared, args: tuple[str, ...], needle: str
) -> None:
    """An unknown state or saga id is one `error:` line naming it, and exit 1."""
    proc = cli(*args, "--store", prepared.url, cwd=prepared.workdir, check=False)
    assert proc.returncode == 1
    assert needle in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr + proc.stdout


def _timeline(out: str) -> list[list[str]]:
    """The rows of the history table: [#, at, event, step, details]."""
    lines = re.split(r"\n\s*Steps\s*\n", out.split("History of saga", 1)[1])[0]
    rows = []
    for line in lines.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells and cells[0].isdigit():
            rows.append(cells)
        elif cells and rows and not cells[0]:  # a wrapped details cell
            rows[-1][4] = f"{rows[-1][4]} {cells[4]}".strip()
    return rows


def _steps(out: str) -> list[list[str]]:
    section = re.split(r"\n\s*Steps\s*\n", out)[1]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells and cells[0] and cells[0] != "step":
            rows.append(cells)
    return rows


def test_show_timeline_compensates_in_reverse_and_the_history_is_consistent(
    prepared: Prepared,
) -> None:
    """`sagas show` of the compensated saga: its state and error, every event in
    order (the refused ship, then charge undone before reserve), each step's
    outcome, and a history that folds back to the stored record."""
    out = cli("sagas", "show", "order-4", "--store", prepared.url, cwd=prepared.workdir).stdout
    assert "COMPENSATED" in out
    assert "ship refused" in out
    rows = _timeline(out)
    assert [(int(r[0]), r[2], r[3]) for r in rows] == prepared.histories["order-4"]
    assert [(r[2], r[3]) for r in rows] == [
        ("started", ""),
        ("sent", "reserve"),
        ("succeeded", "reserve"),
        ("sent", "charge"),
        ("succeeded", "charge"),
        ("sent", "ship"),
        ("failed", "ship"),
        ("sent", "charge"),
        ("compensated", "charge"),
        ("sent", "reserve"),
        ("compensated", "reserve"),
        ("saga_compensated", ""),
    ]
    assert rows[0][1] == "+0ms"
    sends = [r[4] for r in rows if r[2] == "sent"]
    assert sends[0].startswith("action, attempt 1, to=svc.reserve")
    assert sends[3].startswith("compensation, attempt 1, to=svc.undo_charge")
    assert "reason: ship refused" in rows[6][4]
    assert [(r[0], r[1], r[2], r[4]) for r in _steps(out)] == [
        ("reserve", "action", "succeeded", "1"),
        ("charge", "action", "succeeded", "1"),
        ("ship", "action", "failed", "1"),
        ("charge", "compensation", "compensated", "1"),
        ("reserve", "compensation", "compensated", "1"),
    ]
    assert "history consistent: yes" in out


def test_show_marks_a_late_reply_as_ignored(prepared: Prepared) -> None:
    """A reply that came after the saga completed is in the timeline as ignored."""
    out = cli("sagas", "show", "order-1", "--store", prepared.url, cwd=prepared.workdir).stdout
    rows = _timeline(out)
    assert [r[2] for r in rows][-2:] == ["completed", "ignored"]
    assert rows[-1][3] == "reserve"
    assert rows[-1][4] == "ignored: saga finished"
    assert "history consistent: yes" in out


def test_show_json_lists_the_events(prepared: Prepared) -> None:
    """--json gives the record, the consistency verdict, every event of the
    history in order with its offset from the start, and per-step spans."""
    out = cli(
        "sagas", "show", "order-4", "--json", "--store", prepared.url, cwd=prepared.workdir
    ).stdout
    view = json.loads(out)
    assert view["saga"]["id"] == "order-4"
    assert view["saga"]["state"] == COMPENSATED
    assert view["consistent"] is True
    events = view["events"]
    assert [(e["seq"], e["type"], e["step"]) for e in events] == prepared.histories["order-4"]
    assert events[0]["offset"] == 0
    offsets = [e["offset"] for e in events]
    assert offsets == sorted(offsets)
    assert events[1]["detail"]["to"] == "svc.reserve"
    spans = [(s["step"], s["phase"], s["outcome"]) for s in view["steps"]]
    assert spans[-2:] == [
        ("charge", "compensation", "compensated"),
        ("reserve", "compensation", "compensated"),
    ]
    for s in view["steps"]:
        assert s["ended_at"] >= s["sent_at"]


def test_show_says_when_the_record_differs_from_its_history(
    prepared: Prepared, tmp_path: Path
) -> None:
    """A stored record that its history does not fold to is reported as such."""
    db = tmp_path / "tampered.db"
    shutil.copy(prepared.db, db)
    for suffix in ("-wal", "-shm"):
        if Path(f"{prepared.db}{suffix}").exists():
            shutil.copy(f"{prepared.db}{suffix}", f"{db}{suffix}")
    conn = sqlite3.connect(db)
    try:
        conn.execute("UPDATE conveyor_sagas SET state = 'COMPLETED' WHERE id = 'order-4'")
        conn.commit()
    finally:
        conn.close()
    url = f"sqlite:///{db}"
    out = cli("sagas", "show", "order-4", "--store", url, cwd=tmp_path).stdout
    assert "history consistent: no" in out
    view = json.loads(
        cli("sagas", "show", "order-4", "--json", "--store", url, cwd=tmp_path).stdout
    )
    assert view["consistent"] is False
