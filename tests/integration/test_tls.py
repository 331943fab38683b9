"""Encrypted, authenticated connections, tried against TLS-only servers of
the tests' own (tests/tls.py) and NATS servers that take nkeys and creds
files (tests/nats_auth.py): a throw-away CA signs the servers' and the
client's certificates, Redis has no plaintext port and requires a client
certificate, PostgreSQL accepts ``hostssl ... cert`` only. The conformance
suite runs over both as ``redis-tls`` and ``postgres-tls``."""

from __future__ import annotations

import asyncio
from urllib.parse import quote

import pytest

from conveyor import App, Message, Settings
from conveyor.brokers import Delivery, broker_from_url
from conveyor.errors import BrokerError, ConfigError
from conveyor.store import store_from_url
from conveyor.testing._kafka import start_kafka
from tests.nats_auth import NkeyNats, jwt_nats, nkey_nats
from tests.tls import certificates, tls_kafka, tls_nats, tls_postgres, tls_rabbitmq, tls_redis

pytestmark = pytest.mark.slow


def _swap(url: str, old: object, new: object) -> str:
    return url.replace(quote(str(old), safe=""), quote(str(new), safe=""))


def _without(url: str, *names: str) -> str:
    base, _, query = url.partition("?")
    kept = [p for p in query.split("&") if p.partition("=")[0] not in names]
    return f"{base}?{'&'.join(kept)}"


async def _connect_error(url: str) -> str:
    """The one-line error connecting to ``url`` gives; a long connect_timeout
    shows that it is not retried (the call must end well before it)."""
    broker = broker_from_url(url)
    with pytest.raises(BrokerError) as info:
        await asyncio.wait_for(broker.connect(), 60)
    await broker.close()
    text = str(info.value)
    assert "\n" not in text
    return text


async def test_an_app_runs_over_tls_on_redis_and_postgresql() -> None:
    """The broker on TLS Redis, the store on TLS PostgreSQL: a message goes
    through the outbox and a handler, both with client certificates."""
    redis, postgres = tls_redis(), tls_postgres()
    app = App(
        "tls",
        settings=Settings(
            broker_url=f"{redis.url}&namespace=tlsapp",
            store_url=f"{postgres.url}&namespace=tlsapp",
        ),
    )
    seen: list[int] = []
    done = asyncio.Event()

    @app.handler("tls.in", group="g")
    async def handle(ctx: object, body: dict[str, int]) -> None:
        seen.append(body["n"])
        if len(seen) == 3:
            done.set()

    async with app:
        async with app.transaction() as s:
            for n in range(3):
                await s.publish("tls.in", {"n": n})
        worker = app.worker()
        task = asyncio.create_task(worker.run())
        try:
            await asyncio.wait_for(done.wait(), 60)
        finally:
            worker.stop()
            await asyncio.wait_for(task, 60)
    assert sorted(seen) == [0, 1, 2]


@pytest.mark.parametrize("server", ["redis", "postgres", "nats", "rabbitmq", "kafka"])
async def test_plaintext_is_refused(server: str) -> None:
    if server == "kafka":
        text = await _connect_error(tls_kafka().plain_url)
        assert "cannot connect to Kafka" in text
    elif server == "redis":
        text = await _connect_error(f"{tls_redis().plain_url}?connect_timeout=3")
        assert "cannot connect to Redis" in text
    elif server == "nats":
        text = await _connect_error(f"{tls_nats().plain_url}?connect_timeout=3")
        assert "cannot connect to NATS" in text
    elif server == "rabbitmq":
        plain = f"amqp://guest:guest@127.0.0.1:{tls_rabbitmq().port}/?connect_timeout=3"
        text = await _connect_error(plain)
        assert "cannot connect to RabbitMQ" in text
    else:
        text = await _connect_error(tls_postgres().plain_url)
        assert "no encryption" in text


_URLS = {
    "redis": tls_redis,
    "postgres": tls_postgres,
    "nats": tls_nats,
    "rabbitmq": tls_rabbitmq,
    "kafka": tls_kafka,
}


@pytest.mark.parametrize("server", ["redis", "postgres", "nats", "rabbitmq", "kafka"])
async def test_a_wrong_ca_is_one_clear_error_at_once(server: str) -> None:
    certs = certificates()
    url = _URLS[server]().url
    text = await _connect_error(f"{_swap(url, certs.ca, certs.wrong_ca)}&connect_timeout=600")
    assert "the server's TLS certificate failed verification" in text
    assert "check the CA file" in text


@pytest.mark.parametrize("server", ["redis", "postgres", "nats", "rabbitmq"])
async def test_no_client_certificate_is_refused(server: str) -> None:
    """(Not Kafka: the tests' TLS front, asyncio's, drops a client without a
    certificate with no TLS alert, so there is no reason to report; the
    mutual-TLS round trip below shows the certificate is presented.)"""
    if server in ("redis", "nats", "rabbitmq"):
        url = _without(_URLS[server]().url, "ssl_certfile", "ssl_keyfile")
        text = await _connect_error(f"{url}&connect_timeout=600")
        assert "refused this client's TLS certificate" in text
    else:
        url = _without(tls_postgres().url, "sslcert", "sslkey")
        text = await _connect_error(url)
        assert "certificate" in text


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("rediss://127.0.0.1:6379/0?ssl_ca_certs=/nonexistent/ca.pem", "no such file"),
        ("rediss://127.0.0.1:6379/0?ssl_ca_certs=", "ssl_ca_certs is empty"),
        ("rediss://127.0.0.1:6379/0?ssl_keyfile={key}", "ssl_keyfile without ssl_certfile"),
        ("redis://127.0.0.1:6379/0?ssl_ca_certs={ca}", "need the rediss:// scheme"),
        ("nats://127.0.0.1:4222?ssl_ca_certs={ca}", "need the tls:// scheme"),
        ("amqp://127.0.0.1:5672/?ssl_ca_certs={ca}", "need the amqps:// scheme"),
        ("tls://127.0.0.1:4222?ssl_certfile=/nonexistent/c.pem", "no such file"),
        ("postgresql://root@127.0.0.1/db?sslrootcert=/nonexistent/ca.pem", "no such file"),
        ("postgresql://root@127.0.0.1/db?sslmode=sometimes", "invalid sslmode"),
        ("postgresql://root@127.0.0.1/db?sslmode=disable&sslrootcert={ca}", "would not use"),
        ("postgresql://root@127.0.0.1/db?sslkey={key}", "sslkey without sslcert"),
        ("kafka://127.0.0.1:9092?ssl_ca_certs={ca}", "need security_protocol=SSL or SASL_SSL"),
        ("kafka://u:p@127.0.0.1:9092", "needs security_protocol=SASL_SSL"),
        ("kafka://127.0.0.1:9092?security_protocol=SASL_SSL", "needs a user name and password"),
        ("kafka://127.0.0.1:9092?sasl_mechanism=PLAIN", "needs security_protocol=SASL_SSL"),
        ("kafka://127.0.0.1:9092?security_protocol=TLS", "invalid security_protocol='TLS'"),
        ("kafka://127.0.0.1:9092?security_protocol=SSL&ssl_certfile=/no/c.pem", "no such file"),
    ],
)
def test_bad_tls_options_are_one_line_config_errors(url: str, needle: str) -> None:
    certs = certificates()
    url = url.format(ca=certs.ca, key=certs.client_key)
    build = store_from_url if url.startswith("postgresql") else broker_from_url
    with pytest.raises(ConfigError) as info:
        build(url)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


async def test_kafka_carries_messages_over_mutual_tls() -> None:
    """Publish, fetch and acknowledge through the TLS front only: every
    client the broker makes (producer, admin, group consumer, registry
    reader) speaks TLS with the client certificate, or nothing would pass."""
    await _round_trip(f"{tls_kafka().url}&namespace=tlskafka")


async def test_kafka_credentials_the_server_refuses_are_one_error_at_once() -> None:
    """Tansu with authentication on knows no user here: SCRAM is refused at
    the first attempt (not retried until connect_timeout), the password
    never shown."""
    server = start_kafka(authentication=True)
    try:
        host = server.url.removeprefix("kafka://")
        url = (
            f"kafka://alice:hunter2@{host}?security_protocol=SASL_PLAINTEXT"
            "&sasl_mechanism=SCRAM-SHA-256&connect_timeout=600"
        )
        text = await _connect_error(url)
    finally:
        server.stop()
    assert "refused SCRAM-SHA-256 authentication as 'alice'" in text
    assert "hunter2" not in text


async def test_a_sasl_mechanism_the_kafka_server_lacks_is_one_error_at_once() -> None:
    server = start_kafka()  # no authentication: no SASL mechanism at all
    try:
        host = server.url.removeprefix("kafka://")
        url = f"kafka://alice:hunter2@{host}?security_protocol=SASL_PLAINTEXT&connect_timeout=600"
        text = await _connect_error(url)
    finally:
        server.stop()
    assert "refused PLAIN authentication as 'alice'" in text
    assert "hunter2" not in text


async def _round_trip(url: str) -> None:
    broker = broker_from_url(url)
    await broker.connect()
    try:
        await broker.declare("auth.t", "g")
        await broker.publish([Message.create("auth.t", {"n": 1})])
        deliveries: list[Delivery] = []
        async with asyncio.timeout(60):
            while not deliveries:
                deliveries = list(await broker.fetch("auth.t", "g", max_messages=10, lease=30))
        assert [d.message.decode(dict) for d in deliveries] == [{"n": 1}]
        await broker.ack(deliveries)
    finally:
        await broker.close()


@pytest.mark.parametrize("kind", ["nkey", "creds"])
async def test_nats_authenticates_with_an_nkey_or_a_creds_file(kind: str) -> None:
    """A server that lists the user's public nkey, and one in operator (JWT)
    mode: the seed signs the server's nonce; without it nothing connects."""
    server = nkey_nats() if kind == "nkey" else jwt_nats()
    good = server.seed if isinstance(server, NkeyNats) else server.creds
    await _round_trip(f"{server.url}?{kind}={good}&namespace=auth{kind}")
    text = await _connect_error(f"{server.url}?connect_timeout=600")
    assert "the server refused this client's credentials" in text


@pytest.mark.parametrize("kind", ["nkey", "creds"])
async def test_nats_credentials_the_server_does_not_know_are_one_error_at_once(kind: str) -> None:
    server = nkey_nats() if kind == "nkey" else jwt_nats()
    other = server.stranger_seed if isinstance(server, NkeyNats) else server.stranger_creds
    text = await _connect_error(f"{server.url}?{kind}={other}&connect_timeout=600")
    assert "the server refused this client's credentials" in text


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("nkey=/nonexistent/user.nk", "nkey='/nonexistent/user.nk' in 'nats://"),
        ("creds=", "creds is empty"),
        ("creds={f}&nkey={f}", "creds and nkey both"),
    ],
)
def test_bad_nats_credential_options_are_one_line_config_errors(query: str, needle: str) -> None:
    url = "nats://127.0.0.1:4222?" + query.format(f=certificates().ca)
    with pytest.raises(ConfigError) as info:
        broker_from_url(url)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)
