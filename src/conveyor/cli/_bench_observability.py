"""``conveyor bench observability``: what metrics and tracing cost, in one run.

The no-op consume and the full unit of work on the embedded default, each
drained by a worker child process in every configuration, round after round
(the configurations interleaved, so a machine that gets busier mid-run
slows all of them alike); the median rate of each is compared:

- ``off``: this build with no observer installed;
- ``metrics``: ``Metrics(app)`` (counters and histograms per message);
- ``tracing``: metrics and ``Tracing(app)``, every span sampled and exported
  over OTLP/HTTP to a receiver on 127.0.0.1 that reads and drops them;
- ``sampled``: the same with one trace in ten sampled (``traceidratio``);
- ``baseline`` (with ``baseline_src``): another build's ``src`` directory,
  e.g. the commit before the observer seam, for what ``off`` costs.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from conveyor.cli._bench import OBSERVE_ENV, _consume

__all__ = ["run_observability_bench"]

TARGETS = {"off": 0.03, "metrics": 0.10, "tracing": 0.25, "sampled": 0.25}
NAMES = ("metrics", "tracing", "sampled")


class _Sink(BaseHTTPRequestHandler):
    """Accepts OTLP/HTTP exports and drops them."""

    received = 0

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        type(self).received += length
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def _otlp_sink() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _configs(endpoint: str, baseline_src: Path | None) -> dict[str, Mapping[str, str]]:
    configs: dict[str, Mapping[str, str]] = {}
    if baseline_src is not None:
        configs["baseline"] = {"PYTHONPATH": str(baseline_src), OBSERVE_ENV: ""}
    configs["off"] = {OBSERVE_ENV: ""}
    configs["metrics"] = {OBSERVE_ENV: "metrics"}
    configs["tracing"] = {
        OBSERVE_ENV: "tracing",
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_TRACES_SAMPLER": "always_on",
        "OTEL_SERVICE_NAME": "bench",
    }
    configs["sampled"] = {
        **configs["tracing"],
        "OTEL_TRACES_SAMPLER": "traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.1",
    }
    return configs


def run_observability_bench(
    console: Console, *, messages: int, rounds: int = 3, baseline_src: Path | None = None
) -> dict[str, float]:
    """Measure; print a table; return ``{workload_config: median rate}`` and
    ``{workload_config_cost: 1 - rate / reference}``."""
    results: dict[str, float] = {}
    with (
        tempfile.TemporaryDirectory(prefix="conveyor-bench-") as tmp,
        _otlp_sink() as endpoint,
        Progress(console=console, transient=True) as progress,
    ):
        configs = _configs(endpoint, baseline_src)
        rates: dict[tuple[str, str], list[float]] = {}
        task = progress.add_task("observability", total=rounds * 2 * len(configs))
        for r in range(rounds):
            for workload in ("noop", "uow"):
                for name, env in configs.items():
                    progress.update(task, description=f"round {r + 1}: {workload}, {name}")
                    url = f"sqlite:///{tmp}/{workload}-{name}-{r}.db"
                    rate = _consume(workload, url, messages, tmp, env=env)["rate"]
                    rates.setdefault((workload, name), []).append(rate)
                    progress.advance(task)
    for (workload, name), values in rates.items():
        results[f"{workload}_{name}"] = statistics.median(values)
    for workload in ("noop", "uow"):
        off = results[f"{workload}_off"]
        for name in NAMES:
            results[f"{workload}_{name}_cost"] = 1 - results[f"{workload}_{name}"] / off
        if baseline_src is not None:
            results[f"{workload}_off_cost"] = 1 - off / results[f"{workload}_baseline"]
    results["otlp_bytes"] = float(_Sink.received)
    _print(console, results, messages, rounds, baseline_src is not None)
    return results


def _print(console: Console, r: dict[str, float], n: int, rounds: int, with_baseline: bool) -> None:
    table = Table(
        title=f"Observability cost, embedded default, {n:,} messages, median of {rounds} rounds"
    )
    table.add_column("configuration")
    table.add_column("no-op consume", justify="right")
    table.add_column("cost", justify="right")
    table.add_column("unit of work", justify="right")
    table.add_column("cost", justify="right")
    table.add_column("target", justify="right")

    def cost(workload: str, name: str) -> str:
        value = r.get(f"{workload}_{name}_cost")
        if value is None:
            return ""
        colour = "green" if value <= TARGETS[name] else "red"
        return f"[{colour}]{value:+.1%}[/]"

    names = (["baseline"] if with_baseline else []) + ["off", *NAMES]
    labels = {
        "baseline": "build without the observer seam",
        "off": "observability off",
        "metrics": "metrics",
        "tracing": "metrics + tracing (all sampled, exported)",
        "sampled": "metrics + tracing (1 trace in 10 sampled)",
    }
    for name in names:
        target = "" if name == "baseline" else f"<= {TARGETS[name]:.0%}"
        if name == "off" and not with_baseline:
            target = "(needs a baseline build)"
        row = (
            labels[name],
            f"{r[f'noop_{name}']:,.0f} msg/s",
            cost("noop", name) if name != "baseline" else "",
            f"{r[f'uow_{name}']:,.0f} msg/s",
            cost("uow", name) if name != "baseline" else "",
            target,
        )
        # Conveyor's own figures and styles, never outside text: markup is safe.
        table.add_row(*(Text.from_markup(cell) for cell in row))
    console.print(table)
    console.print(
        "cost: off against the baseline build; metrics and tracing against off "
        f"({r['otlp_bytes'] / 1e6:,.1f} MB of spans exported)"
    )
