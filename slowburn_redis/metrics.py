"""Metrics of a budget: Prometheus (an exporter object, or ``slowburn-redis metrics --port P``) and OpenTelemetry.

    metrics = BudgetMetrics(budget)              # every tenant with limits, or tenants=["acme"]
    task = asyncio.create_task(metrics.run())    # follows events and ledgers, refreshes status
    registry = metrics.prometheus_registry()     # prometheus_client.start_http_server(9108, registry=registry)
    metrics.instrument_opentelemetry(meter)      # or an OpenTelemetry Meter: same figures

What is measured (labels are words: ``tenant``, ``agent`` ("" for the
tenant's own limits), ``limit`` as written, e.g. ``usd 5/day``, never an
internal key):

- per limit, from ``budget.status`` every `interval` seconds:
  ``slowburn_limit_amount``, ``_used``, ``_reserved``, ``_remaining``,
  ``_used_ratio`` ((used + reserved) / amount), ``_overrun``, ``_waiters``,
  ``_refill_seconds``; ``slowburn_queue_length`` per tenant;
- from the tenant's event channel: ``slowburn_pauses_total`` (a call began
  waiting), ``slowburn_denials_total`` (an acquire found a limit spent:
  a wait began or a reject-mode call was refused), ``slowburn_resumes_total``
  and the ``slowburn_wait_seconds`` histogram (how long each wait lasted),
  ``slowburn_overruns_total``, ``slowburn_lease_expired_total``;
- from the tenant's ledger stream: ``slowburn_calls_total`` (settled
  admissions, by agent, model and outcome), ``slowburn_spent_usd_total``
  and ``slowburn_tokens_total`` (direction ``input``/``output``);
- ``slowburn_redis_errors_total`` (by operation) for every failed read.

Counters start when the exporter starts (the ledger and events are
followed from then on). Needs the extra ``slowburn-redis[metrics]``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from slowburn_redis.budget import Budget
from slowburn_redis.events import Event
from slowburn_redis.status import LimitStatus, Status

log = structlog.get_logger("slowburn_redis")

WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
"""Upper bounds (seconds) of the wait-time histogram."""

GAUGES = {
    "amount": "The limit's amount (usd in dollars).",
    "used": "Committed usage in the window.",
    "reserved": "Estimates of calls still in flight.",
    "remaining": "What an acquire could still take now.",
    "used_ratio": "(used + reserved) / amount; 1 or more when spent.",
    "overrun": "Usage charged beyond the estimates, in the window.",
    "waiters": "Calls queued on this limit.",
    "refill_seconds": "Seconds until some of the window expires (0 when nothing will).",
}

COUNTERS = {
    "pauses": ("Calls that began waiting on a spent budget.", ("tenant", "agent", "limit")),
    "denials": (
        "Acquires that found a limit spent (a wait began, or a reject-mode refusal).",
        ("tenant", "agent", "limit"),
    ),
    "resumes": ("Waits that ended with an admission.", ("tenant", "agent")),
    "overruns": ("Commits that cost more than their estimate.", ("tenant", "agent")),
    "lease_expired": ("Reservations whose worker never settled them.", ("tenant", "agent")),
    "calls": ("Settled admissions, from the ledger.", ("tenant", "agent", "model", "outcome")),
    "spent_usd": ("Dollars committed, from the ledger.", ("tenant", "agent", "model")),
    "tokens": ("Tokens committed, from the ledger.", ("tenant", "agent", "model", "direction")),
    "redis_errors": ("Reads of the budget that failed.", ("operation",)),
}


@dataclass
class _Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * len(WAIT_BUCKETS))
    total: int = 0
    sum: float = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(WAIT_BUCKETS):
            if value <= bound:
                self.counts[i] += 1


class BudgetMetrics:
    """The figures of a budget's tenants, kept up to date by `run` (see the module docstring).

    `tenants` is the list to follow, or None for every tenant with limits
    (found with SCAN at each refresh). `interval` is how often the limits
    are read. One Redis status call per tenant per interval; events and
    ledgers are followed as they arrive (pub/sub and a blocking XREAD).
    """

    def __init__(self, budget: Budget, tenants: Sequence[str] | None = None, *, interval: float = 5.0) -> None:
        if not interval > 0:
            raise ValueError("interval must be positive")
        self.budget = budget
        self.tenants = list(tenants) if tenants is not None else None
        self.interval = float(interval)
        self.statuses: dict[str, Status] = {}
        self.counters: dict[str, dict[tuple[str, ...], float]] = {name: defaultdict(float) for name in COUNTERS}
        self.waits: dict[tuple[str, str], _Histogram] = defaultdict(_Histogram)
        self._labels: dict[tuple[str, str], tuple[str, str]] = {}
        self._followers: dict[str, list[asyncio.Task[None]]] = {}
        self._wait_listeners: list[Any] = []
        self.refreshed = asyncio.Event()

    # reading ---------------------------------------------------------------

    async def _tenants(self) -> list[str]:
        if self.tenants is not None:
            return self.tenants
        from slowburn_redis.cli.tenants import find_tenants

        return await find_tenants(self.budget)

    async def refresh(self) -> None:
        """Read every followed tenant's status once, and start following tenants seen for the first time."""
        try:
            tenants = await self._tenants()
        except Exception as exc:
            self._error("scan", exc)
            return
        for tenant in tenants:
            try:
                status = await self.budget.status(tenant)
            except Exception as exc:
                self._error("status", exc)
                continue
            self.statuses[tenant] = status
            for row in status.limits:
                self._labels[(tenant, row.key)] = (row.agent or "", str(row.limit))
            if tenant not in self._followers:
                try:  # ledger entries from now on: ids are the server's milliseconds
                    since = f"{await self.budget.engine.server_time_ms()}-0"
                except Exception as exc:
                    self._error("time", exc)
                    continue
                self._followers[tenant] = [
                    asyncio.create_task(self._follow_events(tenant)),
                    asyncio.create_task(self._follow_ledger(tenant, since)),
                ]
        self.refreshed.set()

    async def run(self) -> None:
        """Refresh every `interval` seconds until cancelled (then stop following)."""
        try:
            while True:
                await self.refresh()
                await asyncio.sleep(self.interval)
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Stop following events and ledgers."""
        tasks = [t for ts in self._followers.values() for t in ts]
        self._followers.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    def _error(self, operation: str, exc: BaseException) -> None:
        self.counters["redis_errors"][(operation,)] += 1
        log.warning("metrics.read_failed", operation=operation, error=str(exc))

    async def _follow_events(self, tenant: str) -> None:
        while True:
            try:
                async for event in self.budget.events(tenant):
                    self.observe_event(event)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._error("events", exc)
                await asyncio.sleep(min(self.interval, 1.0))

    async def _follow_ledger(self, tenant: str, since: str) -> None:
        """Count the ledger entries after id `since` (read before this task started: none is missed)."""
        key = self.budget.keys(tenant).ledger
        last = since
        while True:
            try:
                entries = await self.budget.engine.xread(key, last, block_ms=1000, count=500)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._error("ledger", exc)
                await asyncio.sleep(min(self.interval, 1.0))
                continue
            for entry_id, fields in entries:
                last = entry_id
                self.observe_ledger(tenant, fields)

    # observing -------------------------------------------------------------

    def limit_label(self, tenant: str, key: str | None) -> tuple[str, str]:
        """(agent, limit in words) of an internal limit key, as the last status read named it."""
        if not key:
            return "", ""
        found = self._labels.get((tenant, key))
        if found is not None:
            return found
        parts = key.split(":")  # not yet seen in a status: name it from the key itself
        agent = parts[1] if parts[0] == "A" and len(parts) > 3 else ""
        return agent, " ".join(parts[-2:-1])

    def observe_event(self, event: Event) -> None:
        """Count one event of the tenant's channel."""
        extra = event.model_extra or {}
        agent = event.agent or ""
        _, limit = self.limit_label(event.tenant, event.limit)
        if event.type == "waiting":
            self.counters["pauses"][(event.tenant, agent, limit)] += 1
        elif event.type == "exhausted":
            self.counters["denials"][(event.tenant, agent, limit)] += 1
        elif event.type == "resumed":
            self.counters["resumes"][(event.tenant, agent)] += 1
            seconds = float(extra.get("waited_ms") or 0) / 1000
            self.waits[(event.tenant, agent)].observe(seconds)
            for listener in self._wait_listeners:
                listener(seconds, {"tenant": event.tenant, "agent": agent})
        elif event.type == "overrun":
            self.counters["overruns"][(event.tenant, agent)] += 1
        elif event.type == "lease_expired":
            self.counters["lease_expired"][(event.tenant, agent)] += 1

    def observe_ledger(self, tenant: str, fields: dict[str, Any]) -> None:
        """Count one ledger entry (a settled call)."""
        agent, model = str(fields.get("agent") or ""), str(fields.get("model") or "")
        self.counters["calls"][(tenant, agent, model, str(fields.get("outcome") or "ok"))] += 1
        self.counters["spent_usd"][(tenant, agent, model)] += int(fields.get("usd") or 0) / 10**9
        for direction in ("input", "output"):
            tokens = int(fields.get(f"{direction}_tokens") or 0)
            if tokens:
                self.counters["tokens"][(tenant, agent, model, direction)] += tokens

    def limit_rows(self) -> Iterator[tuple[dict[str, str], LimitStatus]]:
        """(labels, status) of every limit last read."""
        for tenant, status in self.statuses.items():
            for row in status.limits:
                yield (
                    {
                        "tenant": tenant,
                        "agent": row.agent or "",
                        "limit": str(row.limit),
                        "dimension": row.limit.dimension,
                    },
                    row,
                )

    def gauge_values(self, row: LimitStatus) -> dict[str, float]:
        """The gauges of one limit."""
        return {
            "amount": float(row.limit.amount),
            "used": row.used,
            "reserved": row.reserved,
            "remaining": row.remaining,
            "used_ratio": row.fraction,
            "overrun": row.overrun,
            "waiters": float(row.waiters),
            "refill_seconds": row.refill_in or 0.0,
        }

    # exporting -------------------------------------------------------------

    def prometheus_registry(self) -> Any:
        """A ``prometheus_client.CollectorRegistry`` holding these metrics (serve it, or register the collector)."""
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry()
        registry.register(PrometheusCollector(self))
        return registry

    def instrument_opentelemetry(self, meter: Any) -> None:
        """Publish the same figures through an OpenTelemetry ``Meter`` (observable gauges and counters, a histogram)."""
        from opentelemetry.metrics import CallbackOptions, Observation

        def gauge(name: str) -> Any:
            def read(options: CallbackOptions) -> Iterable[Observation]:
                return [Observation(self.gauge_values(row)[name], labels) for labels, row in self.limit_rows()]

            return read

        for name, description in GAUGES.items():
            meter.create_observable_gauge(f"slowburn.limit.{name}", callbacks=[gauge(name)], description=description)

        def counter(name: str, labels: tuple[str, ...]) -> Any:
            def read(options: CallbackOptions) -> Iterable[Observation]:
                return [Observation(v, dict(zip(labels, k, strict=True))) for k, v in self.counters[name].items()]

            return read

        for name, (description, labels) in COUNTERS.items():
            meter.create_observable_counter(
                f"slowburn.{name}", callbacks=[counter(name, labels)], description=description
            )
        histogram = meter.create_histogram("slowburn.wait", unit="s", description="How long each wait lasted.")
        self._wait_listeners.append(lambda seconds, attrs: histogram.record(seconds, attrs))


class PrometheusCollector:
    """A prometheus_client collector reading a `BudgetMetrics` at each scrape."""

    def __init__(self, metrics: BudgetMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        m = self.metrics
        label_names = ["tenant", "agent", "limit", "dimension"]
        rows = list(m.limit_rows())
        for name, description in GAUGES.items():
            family = GaugeMetricFamily(f"slowburn_limit_{name}", description, labels=label_names)
            for labels, row in rows:
                family.add_metric([labels[k] for k in label_names], m.gauge_values(row)[name])
            yield family
        queue = GaugeMetricFamily("slowburn_queue_length", "Calls waiting in the tenant's queue.", labels=["tenant"])
        for tenant, status in m.statuses.items():
            queue.add_metric([tenant], float(status.queue_length))
        yield queue
        for name, (description, names) in COUNTERS.items():
            counter = CounterMetricFamily(f"slowburn_{name}", description, labels=list(names))
            for key, value in m.counters[name].items():
                counter.add_metric(list(key), value)
            yield counter
        histogram = HistogramMetricFamily(
            "slowburn_wait_seconds", "How long each wait lasted.", labels=["tenant", "agent"]
        )
        for (tenant, agent), h in m.waits.items():
            buckets = [(str(bound), float(h.counts[i])) for i, bound in enumerate(WAIT_BUCKETS)]
            buckets.append(("+Inf", float(h.total)))
            histogram.add_metric([tenant, agent], buckets, h.sum)
        yield histogram
