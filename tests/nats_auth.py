"""NATS servers of the tests' own that authenticate with nkeys.

``nkey_nats()`` lists one user by its public nkey; ``jwt_nats()`` runs in
operator (JWT) mode: an operator, an account with JetStream and a user,
each an nkey, the account and user JWTs signed as ``nsc`` would sign them
(ed25519 over ``header.claims``, base64url), the account preloaded into a
memory resolver. Both write the client's files (an nkey seed file, a
``.creds`` file) next to the server's and also make a second, unknown user
whose files the server must refuse.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import json
import os
import shutil
import tempfile
import time
from functools import cache
from pathlib import Path
from typing import Any

import nkeys

from tests.servers import NatsServer

__all__ = ["NkeyNats", "JwtNats", "jwt_nats", "nkey_nats"]


def _pair(prefix: int) -> Any:
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(claims: dict[str, Any], issuer: Any) -> str:
    """A NATS JWT (v2) of ``claims``, issued and signed by ``issuer``."""
    body = {"iat": int(time.time()), "iss": issuer.public_key.decode(), **claims}
    body["jti"] = (
        base64.b32encode(hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest())
        .decode()
        .rstrip("=")
    )
    head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = f"{head}.{_b64(json.dumps(body).encode())}"
    return f"{payload}.{_b64(issuer.sign(payload.encode()))}"


def _creds(jwt: str, seed: bytes) -> str:
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{jwt}\n"
        "------END NATS USER JWT------\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{seed.decode()}\n"
        "------END USER NKEY SEED------\n"
    )


class NkeyNats(NatsServer):
    """nats-server with JetStream whose one user is a public nkey."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        user, stranger = _pair(nkeys.PREFIX_BYTE_USER), _pair(nkeys.PREFIX_BYTE_USER)
        self.seed = workdir / "user.nk"
        self.seed.write_bytes(user.seed)
        self.stranger_seed = workdir / "stranger.nk"
        self.stranger_seed.write_bytes(stranger.seed)
        self.conf = workdir / "nats.conf"
        self.conf.write_text(
            f'authorization {{ users = [ {{ nkey: "{user.public_key.decode()}" }} ] }}\n'
        )

    def command(self) -> list[str]:
        return [*super().command(), "-c", str(self.conf)]


class JwtNats(NatsServer):
    """nats-server with JetStream in operator mode, one account, one user."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        operator = _pair(nkeys.PREFIX_BYTE_OPERATOR)
        account = _pair(nkeys.PREFIX_BYTE_ACCOUNT)
        system = _pair(nkeys.PREFIX_BYTE_ACCOUNT)
        user, stranger = _pair(nkeys.PREFIX_BYTE_USER), _pair(nkeys.PREFIX_BYTE_USER)
        unlimited = {"subs": -1, "data": -1, "payload": -1, "conn": -1, "leaf": -1}
        unlimited |= {"imports": -1, "exports": -1, "wildcards": True}
        jetstream = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
        op_jwt = _jwt(
            {
                "sub": operator.public_key.decode(),
                "name": "conveyor-tests",
                "nats": {"type": "operator", "version": 2},
            },
            operator,
        )

        def account_jwt(pair: Any, name: str, limits: dict[str, Any]) -> str:
            claims = {"type": "account", "version": 2, "limits": limits}
            return _jwt({"sub": pair.public_key.decode(), "name": name, "nats": claims}, operator)

        def user_jwt(pair: Any, issuer: Any) -> str:
            claims = {"type": "user", "version": 2, "pub": {}, "sub": {}}
            claims |= {"subs": -1, "data": -1, "payload": -1}
            return _jwt({"sub": pair.public_key.decode(), "name": "app", "nats": claims}, issuer)

        accounts = {
            account.public_key.decode(): account_jwt(account, "app", unlimited | jetstream),
            system.public_key.decode(): account_jwt(system, "SYS", unlimited),
        }
        self.creds = workdir / "user.creds"
        self.creds.write_text(_creds(user_jwt(user, account), user.seed))
        # signed by an account the server does not know
        self.stranger_creds = workdir / "stranger.creds"
        other = _pair(nkeys.PREFIX_BYTE_ACCOUNT)
        self.stranger_creds.write_text(_creds(user_jwt(stranger, other), stranger.seed))
        preload = "\n".join(f'  {k}: "{v}"' for k, v in accounts.items())
        self.conf = workdir / "nats.conf"
        self.conf.write_text(
            f'operator: "{op_jwt}"\n'
            f'system_account: "{system.public_key.decode()}"\n'
            "resolver: MEMORY\n"
            f"resolver_preload: {{\n{preload}\n}}\n"
        )

    def command(self) -> list[str]:
        return [*super().command(), "-c", str(self.conf)]


def _started(server: NatsServer) -> Any:
    server.start()
    atexit.register(shutil.rmtree, server.workdir, True)
    atexit.register(server.stop)
    return server


@cache
def nkey_nats() -> NkeyNats:
    """The process's nkey-authenticated NATS (started on first use)."""
    result: NkeyNats = _started(NkeyNats(Path(tempfile.mkdtemp(prefix="conveyor-nkey-"))))
    return result


@cache
def jwt_nats() -> JwtNats:
    """The process's NATS in operator mode (started on first use)."""
    result: JwtNats = _started(JwtNats(Path(tempfile.mkdtemp(prefix="conveyor-jwt-"))))
    return result
