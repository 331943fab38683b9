"""nginx in front of the replicas: round robin, no affinity, and which
failures it may retry on another replica.

Every path in the configuration is relative to nginx's prefix (``-p DIR``),
so the pid file, logs and temporary files stay in the run's own directory
and the machine's nginx service and ``/etc/nginx`` are never touched.

Retries (``proxy_next_upstream error timeout http_502 http_503``):

- A GET (poll) is idempotent: nginx retries it on the next replica.
- A POST whose connection to a replica could not even be opened (the
  replica is dead: connection refused) was never sent, and nginx retries it
  on the next replica whatever the method.
- A POST that was sent and then lost (the replica died mid-request, or
  answered 502/503) is NOT retried by nginx: ``non_idempotent`` stays off,
  because the replica may have accepted the job before it died, and only an
  ``Idempotency-Key`` makes a second try harmless. nginx cannot tell a
  keyed request from an unkeyed one in ``proxy_next_upstream``, so the
  retry belongs to the client, which always sends a key
  (``conveyor.client`` makes one per submit) and retries 502/503/504 with
  the same key: the service then answers the original job.

A replica that fails is left out for ``fail_timeout`` seconds
(``max_fails=1``), so a dead replica costs one refused connection, not one
per request.
"""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Sequence
from pathlib import Path

__all__ = ["REPLICA_HEADER", "nginx_command", "nginx_conf", "start_nginx"]

REPLICA_HEADER = "X-Replica"
"""The response header in which a replica names itself."""


def nginx_conf(*, port: int, upstreams: Sequence[str], fail_timeout: float = 5.0) -> str:
    """The configuration: listen on ``127.0.0.1:port``, spread requests over
    ``upstreams`` (``host:port``) in turn."""
    servers = "\n".join(
        f"        server {u} max_fails=1 fail_timeout={fail_timeout:g}s;" for u in upstreams
    )
    return f"""\
worker_processes 1;
pid nginx.pid;
error_log error.log notice;
events {{ worker_connections 1024; }}
http {{
    log_format upstream '$remote_addr "$request" $status '
                        'upstream=$upstream_addr upstream_status=$upstream_status '
                        'time=$request_time';
    access_log access.log upstream;
    client_body_temp_path tmp/client_body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    client_max_body_size 64k;

    # Round robin (the default method), no ip_hash/hash/sticky: any replica
    # answers any request, since a job lives in Redis, not in a replica.
    upstream sum_of_primes {{
{servers}
        keepalive 32;
    }}

    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://sum_of_primes;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_connect_timeout 1s;
            proxy_read_timeout 10s;
            # See the module docstring: POSTs are retried here only when
            # they were never sent; the client retries the rest with its key.
            proxy_next_upstream error timeout http_502 http_503;
            proxy_next_upstream_tries 3;
            proxy_next_upstream_timeout 5s;
        }}
    }}
}}
"""


def nginx_command(binary: str, workdir: Path, *extra: str) -> list[str]:
    """``nginx -p workdir -c nginx.conf`` in the foreground (``daemon off``)."""
    directives = "daemon off;"
    if os.geteuid() == 0:
        # Workers would otherwise switch to `nobody`, which cannot write
        # temporary files in a private run directory.
        directives += f" user {pwd.getpwuid(os.geteuid()).pw_name};"
    return [binary, "-p", f"{workdir}/", "-c", "nginx.conf", "-e", "error.log",
            "-g", directives, *extra]  # fmt: skip


def start_nginx(binary: str, workdir: Path, conf: str) -> subprocess.Popen[bytes]:
    """Write ``conf`` to ``workdir``, check it and start nginx in its own
    process group (so a stop can reach its workers too)."""
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    (workdir / "nginx.conf").write_text(conf)
    check = subprocess.run(
        nginx_command(binary, workdir, "-t"), capture_output=True, text=True, timeout=30
    )
    if check.returncode != 0:
        raise RuntimeError(f"nginx refused {workdir / 'nginx.conf'}: {check.stderr.strip()}")
    with (workdir / "nginx.out").open("ab") as out:
        return subprocess.Popen(
            nginx_command(binary, workdir),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
