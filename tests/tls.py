"""Throw-away certificates and TLS-only servers of the tests' own.

``certificates()`` makes, once per process, a CA, a server certificate for
127.0.0.1 and localhost, a client certificate (mutual TLS), and a second CA
that signs none of them (the "wrong CA"). ``tls_redis()`` and
``tls_postgres()`` and ``tls_nats()`` start, once per process, a private
redis-server, PostgreSQL cluster and nats-server on free ports that accept
TLS with a client certificate only: Redis has no plaintext port,
PostgreSQL's pg_hba has one ``hostssl ... cert`` line and nothing else,
NATS runs with ``--tlsverify``; ``tls_rabbitmq()`` a RabbitMQ node of its
own with a TLS listener only (``fail_if_no_peer_cert``); ``tls_kafka()``
Tansu, which cannot terminate TLS itself (its 0.6 ``--cert`` serves
plaintext), behind a TLS front that requires a client certificate, the
only address it advertises.
"""

from __future__ import annotations

import atexit
import datetime
import ipaddress
import shutil
import ssl
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlencode

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conveyor.testing._kafka import KafkaServer, start_kafka
from tests.proxy import Proxy
from tests.servers import NatsServer, PrivatePostgres, PrivateRabbitMQ, RedisServer, _free_port

__all__ = [
    "Certificates",
    "certificates",
    "tls_kafka",
    "tls_nats",
    "tls_postgres",
    "tls_rabbitmq",
    "tls_redis",
]


@dataclass(frozen=True)
class Certificates:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    wrong_ca: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _ca(common: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(_name(common))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    common: str,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    server: bool,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(ca[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [
                    x509.ExtendedKeyUsageOID.SERVER_AUTH
                    if server
                    else x509.ExtendedKeyUsageOID.CLIENT_AUTH
                ]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca[1].public_key()), critical=False
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(ca[1], hashes.SHA256()), key


def _pem(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@cache
def certificates() -> Certificates:
    """A CA, server and client certificates, and a wrong CA, in a temporary
    directory the PostgreSQL server's user can read."""
    directory = Path(tempfile.mkdtemp(prefix="conveyor-tls-"))
    directory.chmod(0o755)
    atexit.register(shutil.rmtree, directory, True)
    ca = _ca("Conveyor test CA")
    server = _leaf("127.0.0.1", ca, server=True)
    # PostgreSQL's cert authentication maps the certificate's CN to the user.
    client = _leaf("root", ca, server=False)
    wrong = _ca("Some other CA")
    out = Certificates(
        dir=directory,
        ca=_pem(ca[0], directory / "ca.pem"),
        server_cert=_pem(server[0], directory / "server.pem"),
        server_key=directory / "server.key",
        client_cert=_pem(client[0], directory / "client.pem"),
        client_key=directory / "client.key",
        wrong_ca=_pem(wrong[0], directory / "wrong-ca.pem"),
    )
    _write_key(server[1], out.server_key)
    _write_key(client[1], out.client_key)
    return out


def client_options(certs: Certificates, *, libpq: bool) -> dict[str, str]:
    """URL options naming the CA and the client certificate."""
    names = ("sslrootcert", "sslcert", "sslkey") if libpq else PYTHON_NAMES
    return dict(zip(names, map(str, (certs.ca, certs.client_cert, certs.client_key)), strict=True))


PYTHON_NAMES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


class TlsRedis(RedisServer):
    """redis-server with a TLS port only, client certificates required."""

    def __init__(self, workdir: Path, certs: Certificates) -> None:
        super().__init__(workdir)
        self.certs = certs
        self.plain_url = f"redis://127.0.0.1:{self.port}/0"
        self.url = f"rediss://127.0.0.1:{self.port}/0?" + urlencode(
            client_options(certs, libpq=False)
        )

    def command(self) -> list[str]:
        c = self.certs
        return [
            "redis-server",
            "--bind", "127.0.0.1",
            "--port", "0",
            "--tls-port", str(self.port),
            "--tls-cert-file", str(c.server_cert),
            "--tls-key-file", str(c.server_key),
            "--tls-ca-cert-file", str(c.ca),
            "--tls-auth-clients", "yes",
            "--dir", str(self.workdir),
            "--save", "",
            "--appendonly", "no",
        ]  # fmt: skip


class TlsPostgres(PrivatePostgres):
    """A private PostgreSQL cluster: ``ssl=on`` and one pg_hba line,
    ``hostssl all all 127.0.0.1/32 cert``: TLS with a client certificate
    signed by the test CA, whose CN is the user, or nothing."""

    def __init__(self, certs: Certificates) -> None:
        super().__init__(
            settings={
                "ssl": "on",
                "ssl_cert_file": "server.pem",
                "ssl_key_file": "server.key",
                "ssl_ca_file": "ca.pem",
            },
            hba="local all all trust\nhostssl all all 127.0.0.1/32 cert\n",
            files=(certs.server_cert, certs.server_key, certs.ca),
        )
        self.certs = certs
        options = {"sslmode": "verify-full", **client_options(certs, libpq=True)}
        self.plain_url = f"{self.url}?sslmode=disable"
        self.url = f"{self.url}?" + urlencode(options)


class TlsNats(NatsServer):
    """nats-server with JetStream, TLS required and client certificates verified."""

    def __init__(self, workdir: Path, certs: Certificates) -> None:
        super().__init__(workdir)
        self.certs = certs
        self.plain_url = f"nats://127.0.0.1:{self.port}"
        self.url = f"tls://127.0.0.1:{self.port}?" + urlencode(client_options(certs, libpq=False))

    def command(self) -> list[str]:
        c = self.certs
        return [
            *super().command(),
            "--tlsverify",
            "--tlscert", str(c.server_cert),
            "--tlskey", str(c.server_key),
            "--tlscacert", str(c.ca),
        ]  # fmt: skip


class TlsRabbitMQ(PrivateRabbitMQ):
    """A RabbitMQ node of the tests' own whose only listener is TLS with
    client certificates required."""

    def __init__(self, workdir: Path, certs: Certificates) -> None:
        super().__init__(workdir)
        self.certs = certs
        self.config = (
            "listeners.tcp = none\n"
            f"listeners.ssl.default = {self.port}\n"
            f"ssl_options.cacertfile = {certs.ca}\n"
            f"ssl_options.certfile = {certs.server_cert}\n"
            f"ssl_options.keyfile = {certs.server_key}\n"
            "ssl_options.verify = verify_peer\n"
            "ssl_options.fail_if_no_peer_cert = true\n"
        )
        self.url = f"amqps://guest:guest@127.0.0.1:{self.port}/?" + urlencode(
            client_options(certs, libpq=False)
        )


class TlsKafka:
    """Tansu on a private port, reached only through a TLS front on another
    that requires a client certificate signed by the test CA."""

    def __init__(self, certs: Certificates) -> None:
        self.certs = certs
        self.port = _free_port()
        self.plain_url = f"kafka://127.0.0.1:{self.port}?connect_timeout=3"
        self.url = f"kafka://127.0.0.1:{self.port}?security_protocol=SSL&" + urlencode(
            client_options(certs, libpq=False)
        )
        self._front: Proxy | None = None
        self._tansu: KafkaServer | None = None

    def start(self) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.certs.ca))
        context.load_cert_chain(self.certs.server_cert, self.certs.server_key)
        context.verify_mode = ssl.CERT_REQUIRED
        behind = _free_port()
        self._front = Proxy(behind, port=self.port, tls=context)
        self._tansu = start_kafka(port=behind, advertised_port=self.port)

    def stop(self) -> None:
        if self._tansu is not None:
            self._tansu.stop()
        if self._front is not None:
            self._front.close()


def _started(server: Any, *cleanup: Path) -> Any:
    """``server`` started, to be stopped (and ``cleanup`` removed) at exit."""
    server.start()
    for path in cleanup:
        atexit.register(shutil.rmtree, path, True)
    atexit.register(server.stop)
    return server


@cache
def tls_redis() -> TlsRedis:
    """The process's TLS-only Redis (started on first use, stopped at exit)."""
    workdir = Path(tempfile.mkdtemp(prefix="conveyor-tls-redis-"))
    return cast(TlsRedis, _started(TlsRedis(workdir, certificates()), workdir))


@cache
def tls_postgres() -> TlsPostgres:
    """The process's TLS-only PostgreSQL (started on first use, stopped at exit)."""
    server = TlsPostgres(certificates())
    return cast(TlsPostgres, _started(server, server.dir))


@cache
def tls_nats() -> TlsNats:
    """The process's TLS-only NATS (started on first use, stopped at exit)."""
    workdir = Path(tempfile.mkdtemp(prefix="conveyor-tls-nats-"))
    return cast(TlsNats, _started(TlsNats(workdir, certificates()), workdir))


@cache
def tls_rabbitmq() -> TlsRabbitMQ:
    """The process's TLS-only RabbitMQ (started on first use, stopped at exit)."""
    workdir = Path(tempfile.mkdtemp(prefix="conveyor-tls-rabbitmq-"))
    return cast(TlsRabbitMQ, _started(TlsRabbitMQ(workdir, certificates()), workdir))


@cache
def tls_kafka() -> TlsKafka:
    """The process's TLS-only Kafka (started on first use, stopped at exit)."""
    return cast(TlsKafka, _started(TlsKafka(certificates())))
