"""The SSRF guard for webhook URLs.

A webhook URL is chosen by the API's caller, and the worker that delivers to
it sits inside the deployment's network: without a guard, a caller could
make the worker POST to ``http://169.254.169.254/`` (cloud metadata), to
``localhost`` or to any private service. The guard:

1. accepts only ``http``/``https`` URLs with a host and no user info;
2. resolves the host (an injectable resolver; by default the event loop's
   ``getaddrinfo``) and refuses it if ANY address it resolves to is not
   public: loopback, private, link-local, CGNAT, multicast, reserved,
   unspecified, documentation ranges, and IPv6 forms that embed such an IPv4
   address (IPv4-mapped, NAT64, 6to4) are all refused;
3. pins the connection to the address it checked. ``GuardedTransport``
   rewrites each request's URL host to that address and keeps the original
   name in the ``Host`` header and, for ``https``, in the TLS SNI and the
   certificate check (httpcore's ``sni_hostname`` request extension). There
   is no second DNS look-up between the check and the connection, so DNS
   rebinding cannot swap in a private address.

An allow-list (CIDRs and/or host names, each with its ports) permits targets
the guard would refuse: tests and local deployments allow ``127.0.0.1:PORT``;
a host name on the list skips the address check (it is still resolved once
and pinned). An entry without ports opens 80 and 443 only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import httpx

from conveyor.errors import ConfigError, UnsafeTarget

__all__ = [
    "Guard",
    "GuardedTransport",
    "Resolver",
    "Target",
    "is_public",
    "system_resolver",
]

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""``await resolver(host, port)``: the IP addresses (as strings) ``host`` resolves to."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_URL_LENGTH = 2048

# Ranges that are not public beyond what the ``ipaddress`` properties say
# (Python 3.11 calls multicast, site-local and IPv4-compatible IPv6 global).
_EXTRA_REFUSED = tuple(
    ipaddress.ip_network(net)
    for net in (
        "0.0.0.0/8",  # "this network"
        "100.64.0.0/10",  # carrier-grade NAT
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation
        "203.0.113.0/24",  # documentation
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and 255.255.255.255
        "::/96",  # unspecified, loopback and deprecated IPv4-compatible
        "64:ff9b:1::/48",  # local-use NAT64
        "100::/64",  # discard-only
        "2001::/23",  # IETF protocol assignments (Teredo included)
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local (deprecated)
        "ff00::/8",  # multicast
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, NAT64, 6to4)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def is_public(ip: IPAddress) -> bool:
    """Whether ``ip`` is a globally routable unicast address, judging an IPv6
    address that embeds an IPv4 one by the IPv4 address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return False
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            return is_public(embedded)
        if ip.is_site_local:
            return False
    if (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    ):
        return False
    return not any(ip in net for net in _EXTRA_REFUSED if net.version == ip.version)


async def system_resolver(host: str, port: int) -> list[str]:
    """Resolve ``host`` with the event loop's ``getaddrinfo`` (no blocking)."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    addresses: list[str] = []
    for *_, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """A URL that passed the guard, and the address to connect to."""

    url: httpx.URL
    host: str
    port: int
    address: str

    @property
    def pinned_url(self) -> httpx.URL:
        """``url`` with its host replaced by the checked address."""
        return self.url.copy_with(host=self.address)


def _normal_host(host: str) -> str:
    return host.rstrip(".").lower()


def _opens(ports: Sequence[tuple[int, int]], port: int) -> bool:
    return any(low <= port <= high for low, high in ports)


Ports = tuple[int, int]
"""An inclusive range of ports."""

_DEFAULT_PORTS: tuple[Ports, ...] = ((80, 80), (443, 443))


def _ports(text: str, entry: str) -> tuple[Ports, ...]:
    """``8080``, ``8000-8999`` or ``*`` (a comma-separated list of those)."""
    out: list[Ports] = []
    for part in text.split(","):
        part = part.strip()
        if part == "*":
            out.append((1, 65535))
            continue
        low, dash, high = part.partition("-")
        if not (low.isdigit() and (not dash or high.isdigit())):
            raise ConfigError(f"webhook allow-list entry {entry!r}: {part!r} is not a port")
        first, last = int(low), int(high if dash else low)
        if not 1 <= first <= last <= 65535:
            raise ConfigError(f"webhook allow-list entry {entry!r}: ports are 1 to 65535")
        out.append((first, last))
    return tuple(out)


def _split(entry: str) -> tuple[str, tuple[Ports, ...]]:
    """An allow-list entry as (address, CIDR or host name; its ports)."""
    text = entry.strip()
    if text.startswith("["):  # [IPv6 or IPv6 CIDR]:ports
        inside, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise ConfigError(f"webhook allow-list entry {entry!r}: no closing ']'")
        if not rest:
            return inside, _DEFAULT_PORTS
        if not rest.startswith(":"):
            raise ConfigError(f"webhook allow-list entry {entry!r}: expected ]:PORT")
        return inside, _ports(rest[1:], entry)
    if text.count(":") == 1:  # IPv4, CIDR or host name, then :ports
        where, _, ports = text.partition(":")
        return where, _ports(ports, entry)
    return text, _DEFAULT_PORTS  # no port (an IPv6 address needs brackets for one)


class Guard:
    """Checks webhook URLs; see the module doc.

    ``allow`` holds entries permitted despite the rules: a CIDR or bare
    address (``"127.0.0.1/32"``, ``"10.0.0.0/8"``, ``"[fd00::/8]"``) or a host
    name (``"hooks.internal"``), each with the ports it opens after a colon
    (``"127.0.0.1:8901"``, ``"10.0.0.0/8:8000-8999"``, ``"hooks.internal:*"``;
    ``[...]`` around IPv6). Without ports an entry opens 80 and 443 only, so
    allowing a host never opens its other services (a Redis on 6379). Public
    addresses need no entry, on any port. ``resolver`` defaults to
    ``system_resolver``.
    """

    def __init__(self, *, allow: Sequence[str] = (), resolver: Resolver | None = None) -> None:
        networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, tuple[Ports, ...]]] = []
        hosts: dict[str, tuple[Ports, ...]] = {}
        for entry in allow:
            if not entry.strip():
                raise ConfigError("an empty entry in the webhook allow-list; remove it")
            text, ports = _split(entry)
            try:
                networks.append((ipaddress.ip_network(text, strict=False), ports))
            except ValueError:
                if not text or "/" in text or ":" in text or " " in text:
                    raise ConfigError(
                        f"webhook allow-list entry {entry!r} is neither a CIDR nor a host name"
                    ) from None
                hosts[_normal_host(text)] = (*hosts.get(_normal_host(text), ()), *ports)
        self.networks = tuple(networks)
        self.hosts = hosts
        self.resolver: Resolver = resolver or system_resolver

    def parse(self, url: str | httpx.URL) -> httpx.URL:
        """Check the form of ``url`` (no DNS): http(s), a host, no user info."""
        text = str(url)
        if len(text) > MAX_URL_LENGTH:
            raise UnsafeTarget(f"webhook URL is {len(text)} characters, over {MAX_URL_LENGTH}")
        try:
            parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise UnsafeTarget(f"webhook URL {text!r} is not a valid URL: {exc}") from None
        if parsed.scheme not in ("http", "https"):
            raise UnsafeTarget(
                f"webhook URL {text!r} must use http or https, not {parsed.scheme or 'nothing'!r}"
            )
        if parsed.userinfo:
            raise UnsafeTarget(
                f"webhook URL {text!r} carries user info; put credentials elsewhere "
                "(deliveries are signed)"
            )
        if not parsed.host:
            raise UnsafeTarget(f"webhook URL {text!r} has no host")
        return parsed

    def permits(self, ip: IPAddress, port: int) -> bool:
        """Whether ``ip``:``port`` may be connected to: a public address, or
        one the allow-list opens on that port."""
        return is_public(ip) or any(
            ip in net and _opens(ports, port)
            for net, ports in self.networks
            if net.version == ip.version
        )

    def check_literal(self, parsed: httpx.URL) -> None:
        """Refuse (``UnsafeTarget``) a URL whose host is an address the guard
        does not permit; a host name passes (only resolving can judge it).
        No DNS: safe inside a transaction."""
        host = parsed.raw_host.decode("ascii")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        if "%" in host:
            raise UnsafeTarget(f"webhook URL {str(parsed)!r} names a zoned address")
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            return
        if not self.permits(literal, port):
            raise UnsafeTarget(
                f"webhook URL {str(parsed)!r} refused: {host} port {port} is not a public "
                "address; if this target is intended, add it (with its port) to the webhook "
                "allow-list"
            )

    async def check(self, url: str | httpx.URL) -> Target:
        """Parse and resolve ``url``; refuse it (``UnsafeTarget``) unless every
        address it resolves to is permitted. A host that does not resolve
        raises ``httpx.ConnectError`` (it may resolve later)."""
        parsed = self.parse(url)
        host = parsed.raw_host.decode("ascii")  # IDNA-encoded: what DNS and TLS see
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            if "%" in host:  # a zoned IPv6 literal: link-local by nature
                raise UnsafeTarget(f"webhook URL {str(parsed)!r} names a zoned address") from None
            literal = None
        if literal is not None:
            addresses = [literal]
        else:
            try:
                resolved = await self.resolver(host, port)
            except (OSError, UnicodeError) as exc:
                raise httpx.ConnectError(f"cannot resolve webhook host {host!r}: {exc}") from exc
            if not resolved:
                raise httpx.ConnectError(f"webhook host {host!r} resolves to no address")
            addresses = [ipaddress.ip_address(a) for a in resolved]
        if literal is None and _opens(self.hosts.get(_normal_host(host), ()), port):
            return Target(url=parsed, host=host, port=port, address=str(addresses[0]))
        refused = [str(a) for a in addresses if not self.permits(a, port)]
        if refused:
            shown = host if literal is not None else f"{host} ({', '.join(refused)})"
            raise UnsafeTarget(
                f"webhook URL {str(parsed)!r} refused: {shown} port {port} is not a public "
                "address; if this target is intended, add it (with its port) to the webhook "
                "allow-list"
            )
        return Target(url=parsed, host=host, port=port, address=str(addresses[0]))


class GuardedTransport(httpx.AsyncBaseTransport):
    """An httpx transport that sends each request only to the address its
    ``Guard`` checked (see the module doc), through ``inner``.

    The default ``inner`` keeps no idle connection: pooled connections are
    keyed by address, and a TLS session verified for one host name must not
    carry requests for another name that resolves to the same address.
    """

    def __init__(self, guard: Guard, inner: httpx.AsyncBaseTransport | None = None) -> None:
        self.guard = guard
        self.inner = inner or httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_keepalive_connections=0)
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        limit = timeouts.get("connect") if isinstance(timeouts, dict) else None
        try:
            async with asyncio.timeout(limit):
                target = await self.guard.check(request.url)
        except TimeoutError:
            raise httpx.ConnectTimeout(
                f"resolving {request.url.host!r} took longer than {limit}s", request=request
            ) from None
        extensions = dict(request.extensions)
        if target.url.scheme == "https":
            extensions["sni_hostname"] = target.host
        pinned = httpx.Request(
            request.method,
            target.pinned_url,
            headers=request.headers,  # keeps Host: the original name
            stream=request.stream,
            extensions=extensions,
        )
        return await self.inner.handle_async_request(pinned)

    async def aclose(self) -> None:
        await self.inner.aclose()
