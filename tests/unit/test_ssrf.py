"""The SSRF guard for webhook URLs: which targets are refused, the allow-list,
and the transport that connects to the checked address (no network)."""

from __future__ import annotations

import ipaddress

import httpx
import pytest

from conveyor.errors import ConfigError, UnsafeTarget
from conveyor.http._ssrf import Guard, GuardedTransport, is_public

PUBLIC = "93.184.216.34"


class FakeDNS:
    """A resolver answering from a table, counting look-ups."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        host = host.rstrip(".").lower()  # as DNS reads names
        if host not in self.table:
            raise OSError(f"{host} does not resolve")
        return self.table[host]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/hook",
        "http://127.8.9.10/hook",
        "http://10.1.2.3/hook",
        "http://172.16.0.1/hook",
        "http://192.168.1.1/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://100.64.0.1/hook",
        "http://0.0.0.0/hook",
        "http://224.0.0.1/hook",
        "http://255.255.255.255/hook",
        "http://[::1]/hook",
        "http://[::]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://[::ffff:10.0.0.1]/hook",
        "http://[64:ff9b::7f00:1]/hook",
        "http://[2002:7f00:1::]/hook",
        "http://[fe80::1]/hook",
        "http://[fc00::1]/hook",
        "http://[fd12:3456::1]/hook",
        "http://[fec0::1]/hook",
        "http://[ff02::1]/hook",
    ],
)
async def test_non_public_literals_are_refused(url: str) -> None:
    """An IP literal that is loopback, private, link-local, CGNAT, multicast,
    unspecified or an IPv6 form of one is refused without any DNS look-up."""
    dns = FakeDNS({})
    with pytest.raises(UnsafeTarget, match="not a public address"):
        await Guard(resolver=dns).check(url)
    assert dns.lookups == []


@pytest.mark.parametrize(
    "address", [PUBLIC, "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]
)
def test_public_addresses_pass(address: str) -> None:
    """Globally routable addresses, and IPv6 forms of public IPv4 ones, are public."""
    assert is_public(ipaddress.ip_address(address))


async def test_hostname_resolving_to_loopback_is_refused() -> None:
    """A name whose address is loopback is refused, and the error names the address."""
    dns = FakeDNS({"evil.example": ["127.0.0.1"]})
    with pytest.raises(UnsafeTarget, match=r"evil\.example \(127\.0\.0\.1\)"):
        await Guard(resolver=dns).check("https://evil.example/hook")


async def test_hostname_with_one_private_address_among_public_ones_is_refused() -> None:
    """ANY non-public address refuses the name, even listed after a public one."""
    dns = FakeDNS({"mixed.example": [PUBLIC, "10.0.0.7"]})
    with pytest.raises(UnsafeTarget, match=r"10\.0\.0\.7"):
        await Guard(resolver=dns).check("https://mixed.example/hook")


async def test_public_hostname_passes_and_is_pinned_to_its_first_address() -> None:
    """A public name passes; the target keeps the name and the checked address."""
    dns = FakeDNS({"hooks.example": [PUBLIC, "2606:4700:4700::1111"]})
    target = await Guard(resolver=dns).check("https://hooks.example:8443/in?x=1")
    assert (target.host, target.port, target.address) == ("hooks.example", 8443, PUBLIC)
    assert str(target.pinned_url) == f"https://{PUBLIC}:8443/in?x=1"


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("ftp://hooks.example/x", "http or https"),
        ("file:///etc/passwd", "http or https"),
        ("gopher://hooks.example/x", "http or https"),
        ("http://user:pw@hooks.example/x", "user info"),
        ("http://user@hooks.example/x", "user info"),
        ("http:///nohost", "no host"),
        ("http://[fe80::1%25eth0]/x", "fe80::1"),
        ("http://hooks.example/" + "a" * 2100, "over 2048"),
    ],
)
async def test_malformed_urls_are_refused(url: str, needle: str) -> None:
    """Only http(s) URLs with a host, no user info and a sane length pass."""
    with pytest.raises(UnsafeTarget, match=needle):
        await Guard(resolver=FakeDNS({"hooks.example": [PUBLIC]})).check(url)


async def test_allow_list_permits_cidrs_and_host_names() -> None:
    """A CIDR on the allow-list permits its addresses; a host name on it
    permits that name whatever it resolves to; nothing else is loosened."""
    dns = FakeDNS({"hooks.internal": ["10.1.2.3"], "other.internal": ["10.9.9.9"]})
    guard = Guard(allow=["127.0.0.1/32:8080", "hooks.internal"], resolver=dns)
    assert (await guard.check("http://127.0.0.1:8080/x")).address == "127.0.0.1"
    assert (await guard.check("http://HOOKS.internal./x")).address == "10.1.2.3"
    with pytest.raises(UnsafeTarget):
        await guard.check("http://127.0.0.2/x")
    with pytest.raises(UnsafeTarget):
        await guard.check("http://other.internal/x")


async def test_allow_list_entries_open_only_their_ports() -> None:
    """An entry opens the ports it names (80 and 443 when it names none):
    allowing 127.0.0.1 for a webhook receiver does not open the Redis beside it."""
    dns = FakeDNS({"hooks.internal": ["10.1.2.3"]})
    guard = Guard(
        allow=[
            "127.0.0.1:8901",
            "10.0.0.0/8:8000-8999",
            "hooks.internal:8443",
            "[::1]:*",
            "192.168.1.5",
        ],
        resolver=dns,
    )
    assert (await guard.check("http://127.0.0.1:8901/x")).port == 8901
    assert (await guard.check("http://10.2.3.4:8500/x")).address == "10.2.3.4"
    assert (await guard.check("https://hooks.internal:8443/x")).address == "10.1.2.3"
    assert (await guard.check("http://[::1]:6379/x")).address == "::1"
    assert (await guard.check("https://192.168.1.5/x")).port == 443
    for refused in (
        "http://127.0.0.1:6379/x",
        "http://127.0.0.1/x",
        "http://10.2.3.4:9000/x",
        "https://hooks.internal/x",
        "http://192.168.1.5:5432/x",
    ):
        with pytest.raises(UnsafeTarget, match="port"):
            await guard.check(refused)


@pytest.mark.parametrize(
    "entry", ["", "10.0.0.0/33", "not a host", "127.0.0.1:0", "127.0.0.1:http", "[::1", "h:9-1"]
)
def test_bad_allow_list_entries_are_config_errors(entry: str) -> None:
    """An allow-list entry that is neither a CIDR nor a host name is refused up front."""
    with pytest.raises(ConfigError):
        Guard(allow=[entry])


async def test_unresolvable_host_is_a_connect_error() -> None:
    """A name that does not resolve is a (retryable) connection error, not a refusal."""
    with pytest.raises(httpx.ConnectError, match="cannot resolve"):
        await Guard(resolver=FakeDNS({})).check("https://gone.example/x")


async def test_transport_connects_to_the_checked_address_keeping_host_and_sni() -> None:
    """The request goes to the address that was checked, with the original
    name in the Host header and as TLS SNI; the name is resolved once."""
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    dns = FakeDNS({"hooks.example": [PUBLIC]})
    transport = GuardedTransport(Guard(resolver=dns), httpx.MockTransport(answer))
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.post("https://hooks.example/in", content=b"{}")
    assert response.status_code == 204
    [request] = seen
    assert request.url.host == PUBLIC
    assert request.headers["host"] == "hooks.example"
    assert request.extensions["sni_hostname"] == "hooks.example"
    assert request.content == b"{}"
    assert dns.lookups == ["hooks.example"]


async def test_transport_refuses_a_name_that_rebinds_to_a_private_address() -> None:
    """Each request is checked again: a name that now resolves to a private
    address is refused before any connection."""
    seen: list[httpx.Request] = []
    dns = FakeDNS({"rebind.example": [PUBLIC]})

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    transport = GuardedTransport(Guard(resolver=dns), httpx.MockTransport(answer))
    async with httpx.AsyncClient(transport=transport) as client:
        await client.post("http://rebind.example/in")
        dns.table["rebind.example"] = ["192.168.0.10"]
        with pytest.raises(UnsafeTarget):
            await client.post("http://rebind.example/in")
    assert [r.url.host for r in seen] == [PUBLIC]
