"""The CLI tells the truth: text verbatim, whole when piped, JSON on every
list and show, one line and a non-zero exit for every mistake, nothing
created by a command that only reads."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from conveyor import __version__
from tests.helpers import wait_until
from tests.servers import REDIS_URL, namespaced


def cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``conveyor ARGS`` with stdout and stderr piped, as a script would run it."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    return subprocess.run(
        [sys.executable, "-m", "conveyor", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**base, **(env or {})},
    )


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


BRACKETS = "missing field [red] in config[prod]"
LONG = "x" * 400

APP = textwrap.dedent(
    f"""
    from conveyor import App, PermanentError, Settings
    from conveyor.sagas import Saga, Sagas, Step

    app = App("cliout", settings=Settings(broker_url="sqlite:///q.db", idle_poll=0.02))
    sagas = Sagas(app)

    async def book(ctx, data):
        return None

    sagas.register(Saga("trip", steps=[Step("book", action=book)]))

    @app.handler("jobs", group="workers")
    async def work(ctx, body: dict):
        if body["n"] == 1:
            raise PermanentError({BRACKETS!r})
        raise PermanentError({LONG!r})
    """
)


def _run_worker_until(cwd: Path, done: str) -> None:
    """Run `conveyor worker app:app` until ``done`` (SQL) returns a row."""
    import sqlite3

    proc = subprocess.Popen(
        [sys.executable, "-m", "conveyor", "worker", "app:app"],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def finished() -> bool:
            try:
                with sqlite3.connect(cwd / "q.db") as conn:
                    return bool(conn.execute(done).fetchone())
            except sqlite3.Error:
                return False

        wait_until(finished, timeout=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_text_is_verbatim_and_whole_when_piped(tmp_path: Path) -> None:
    """Bracketed text keeps its brackets, long values are not cut, states are
    whole for grep, tracebacks are not wrapped, in every listing."""
    (tmp_path / "app.py").write_text(APP)
    for n in (1, 2):
        assert (
            cli(
                "publish", "jobs", json.dumps({"n": n}), "--broker", "sqlite:///q.db", cwd=tmp_path
            ).returncode
            == 0
        )
    script = (
        "import asyncio, app\n"
        "async def main():\n"
        "    async with app.app.transaction() as s:\n"
        "        await app.sagas.start(s, 'trip', {}, saga_id='t-1')\n"
        "asyncio.run(main())\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, check=True)
    _run_worker_until(
        tmp_path,
        "SELECT 1 FROM conveyor_sagas WHERE state = 'COMPLETED' "
        "AND (SELECT COUNT(*) FROM conveyor_dead) = 2",
    )
    listing = cli("dlq", "list", "--broker", "sqlite:///q.db", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert BRACKETS in listing.stdout
    assert LONG in listing.stdout
    shown = cli("dlq", "show", "1", "--broker", "sqlite:///q.db", cwd=tmp_path)
    assert BRACKETS in shown.stdout
    long_lines = [line for line in shown.stdout.splitlines() if "PermanentError" in line]
    assert long_lines, shown.stdout
    sagas = cli("sagas", "list", "--store", "sqlite:///q.db", cwd=tmp_path)
    [row] = [line for line in sagas.stdout.splitlines() if "t-1" in line]
    assert "COMPLETED" in row.split()
    bad = cli("worker", "nosuch[1]:app", cwd=tmp_path)
    assert "nosuch[1]" in one_error_line(bad)


def test_every_list_and_show_has_json(tmp_path: Path) -> None:
    """--json on queues, dlq list/show, sagas list/show and keys list prints
    one JSON object per line."""
    (tmp_path / "app.py").write_text(APP)
    cli("publish", "jobs", '{"n": 1}', "--broker", "sqlite:///q.db", cwd=tmp_path)
    _run_worker_until(tmp_path, "SELECT 1 FROM conveyor_dead")
    created = cli("keys", "create", "ops", "--store", "sqlite:///q.db", cwd=tmp_path)
    assert created.stdout.startswith("cvk_")
    outputs = {
        "queues": cli("queues", "--json", "--broker", "sqlite:///q.db", cwd=tmp_path),
        "dlq list": cli("dlq", "list", "--json", "--broker", "sqlite:///q.db", cwd=tmp_path),
        "dlq show": cli("dlq", "show", "1", "--json", "--broker", "sqlite:///q.db", cwd=tmp_path),
        "keys list": cli("keys", "list", "--json", "--store", "sqlite:///q.db", cwd=tmp_path),
    }
    parsed = {}
    for name, done in outputs.items():
        assert done.returncode == 0, (name, done.stderr)
        parsed[name] = [json.loads(line) for line in done.stdout.splitlines()]
    assert {
        "topic": "jobs",
        "group": "workers",
        "ready": 0,
        "in_flight": 0,
        "delayed": 0,
        "dead": 1,
    } in parsed["queues"]
    assert parsed["dlq list"][0]["reason"].endswith(BRACKETS)
    assert "PermanentError" in parsed["dlq show"][0]["traceback"]
    assert [k["name"] for k in parsed["keys list"]] == ["ops"]
    revoked = cli("keys", "revoke", "ops", "--store", "sqlite:///q.db", cwd=tmp_path)
    assert revoked.returncode == 0, revoked.stderr
    assert cli("keys", "list", "--json", "--store", "sqlite:///q.db", cwd=tmp_path).stdout == ""
    assert "no API key named 'ops'" in one_error_line(
        cli("keys", "revoke", "ops", "--store", "sqlite:///q.db", cwd=tmp_path)
    )


def test_mistakes_are_one_line_and_a_nonzero_exit(tmp_path: Path) -> None:
    """A bad log level, an unknown dead-letter id, a typo in an env file each
    stop with one error line; an unknown CONVEYOR_ variable is a warning
    naming the closest setting."""
    db = "sqlite:///q.db"
    cli("publish", "t", "{}", "--broker", db, cwd=tmp_path)
    level = one_error_line(
        cli("queues", "--broker", db, cwd=tmp_path, env={"CONVEYOR_LOG_LEVEL": "bogus"})
    )
    assert "CONVEYOR_LOG_LEVEL" in level
    assert "'bogus'" in level
    assert "no dead letter with id 99" in one_error_line(
        cli("dlq", "replay", "99", "--broker", db, cwd=tmp_path)
    )
    assert "no dead letter with id 99" in one_error_line(
        cli("dlq", "purge", "99", "-y", "--broker", db, cwd=tmp_path)
    )
    env_file = tmp_path / "bad.env"
    env_file.write_text("CONVEYOR_PREFTCH=5\n")
    typo = one_error_line(cli("queues", "--env-file", str(env_file), "--broker", db, cwd=tmp_path))
    assert "unknown setting CONVEYOR_PREFTCH" in typo
    assert "did you mean CONVEYOR_PREFETCH?" in typo
    assert "CONVEYOR_CONVEYOR" not in typo
    warned = cli("queues", "--broker", db, cwd=tmp_path, env={"CONVEYOR_BROKR_URL": "redis://x"})
    assert warned.returncode == 0
    assert (
        "unknown setting CONVEYOR_BROKR_URL is ignored (did you mean CONVEYOR_BROKER_URL?)"
        in " ".join(warned.stderr.split())
    )
    version = cli("--version", cwd=tmp_path)
    assert version.stdout.strip() == f"conveyor {__version__}"
    quiet = cli(
        "queues",
        "--log-level",
        "error",
        "--broker",
        db,
        cwd=tmp_path,
        env={"CONVEYOR_BROKR_URL": "x"},
    )
    assert quiet.returncode == 0
    assert quiet.stderr == ""  # the warning is below ERROR


def test_read_only_commands_create_no_database(tmp_path: Path) -> None:
    """queues, dlq list/show, sagas list/show and keys list on a database
    that does not exist say so and leave the folder empty."""
    for args in (
        ["queues"],
        ["dlq", "list"],
        ["sagas", "list"],
        ["keys", "list"],
        ["queues", "--json"],
    ):
        done = cli(*args, cwd=tmp_path)
        assert done.returncode == 0, (args, done.stderr)
    assert "no dead letter with id 1" in one_error_line(cli("dlq", "show", "1", cwd=tmp_path))
    assert "no saga with id 'x'" in one_error_line(cli("sagas", "show", "x", cwd=tmp_path))
    assert list(tmp_path.iterdir()) == []


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_an_unreachable_server_is_one_line_naming_host_and_port(tmp_path: Path) -> None:
    """Nothing listens on the port: the command gives up after its connect
    timeout (5 s) with one line naming the server, host and port."""
    port = _free_port()
    for url, server in (
        (f"postgresql://root@127.0.0.1:{port}/test", "PostgreSQL"),
        (f"redis://127.0.0.1:{port}/0", "Redis"),
        (f"amqp://guest:secret@127.0.0.1:{port}/", "RabbitMQ"),
        (f"nats://127.0.0.1:{port}", "NATS"),
    ):
        line = one_error_line(cli("publish", "t", "{}", "--broker", url, cwd=tmp_path, timeout=30))
        assert f"cannot connect to {server} at 127.0.0.1:{port}" in line
        assert "within 5s" in line
        assert "secret" not in line


def test_worker_names_its_broker_and_store_and_warns_of_an_implicit_one(tmp_path: Path) -> None:
    """The start line names broker and store (passwords hidden); a server
    broker with no store URL gets a warning that the store is a local file."""
    (tmp_path / "app.py").write_text("from conveyor import App\napp = App('w')\n")
    broker = namespaced(REDIS_URL)
    proc = subprocess.Popen(
        [sys.executable, "-m", "conveyor", "worker", "app:app", "--broker", broker],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")},
    )
    assert proc.stderr is not None
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if "CONVEYOR_STORE_URL" in " ".join("".join(seen).split()):
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        proc.stderr.close()
    text = " ".join("".join(seen).split())
    assert f"broker {broker}" in text
    assert "store sqlite:///conveyor.db" in text
    assert "the store (inbox, outbox, dead letters, your tables) is the local file" in text
    assert proc.returncode == 0


def test_dead_letters_page_with_a_total_and_bulk_actions_go_in_batches(tmp_path: Path) -> None:
    """1,200 dead letters: `dlq list` shows a page with the total and the
    next cursor, `--json --limit 0` streams them all, `replay --all` and
    `purge --all` handle every one (the store is read 500 at a time)."""
    import asyncio

    from conveyor import App, Message, Settings

    url = f"sqlite:///{tmp_path / 'q.db'}"

    async def fill() -> None:
        app = App("fill", settings=Settings(broker_url=url))
        async with app:
            await app.broker.declare("jobs", "workers")
            for start in range(0, 1200, 300):
                async with app.store.transaction() as tx:
                    for i in range(start, start + 300):
                        await app.store.dead_letter(
                            tx,
                            group="workers",
                            message=Message.create("jobs", {"i": i}).with_attempt(1),
                            reason=f"failed {i}",
                            error_type="E",
                            traceback="",
                        )

    asyncio.run(fill())
    page = cli("dlq", "list", "--limit", "500", "--broker", url, cwd=tmp_path)
    assert "Dead letters (500 of 1,200; next page: --after 500)" in " ".join(page.stdout.split())
    second = cli("dlq", "list", "--limit", "500", "--after", "1000", "--broker", url, cwd=tmp_path)
    assert "(200 of 1,200)" in second.stdout
    streamed = cli("dlq", "list", "--json", "--limit", "0", "--broker", url, cwd=tmp_path)
    ids = [json.loads(line)["id"] for line in streamed.stdout.splitlines()]
    assert ids == list(range(1, 1201))
    replayed = cli("dlq", "replay", "--all", "--broker", url, cwd=tmp_path)
    assert replayed.stdout.strip() == "replayed 1200 dead letter(s)", replayed.stderr
    queues = cli("queues", "--json", "--broker", url, cwd=tmp_path)
    [row] = [json.loads(line) for line in queues.stdout.splitlines()]
    assert (row["ready"], row["dead"]) == (1200, 0)
