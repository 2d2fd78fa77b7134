"""Prometheus metrics of the server: requests and tokens, and speculative counters named like vLLM's.

Speculative and generation counters are read from the engine at scrape time (`Engine.counters`),
so they count every verification step, cancelled requests included: a client that disconnects
shows as a generation-token count that stops growing. Names carry the `gemma_mtp:` prefix where
vLLM's carry `vllm:` (`gemma_mtp:spec_decode_num_drafts_total` is `vllm:spec_decode_num_drafts_total`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ..engine import Engine
    from .limits import Admission

PREFIX = "gemma_mtp:"
CONTENT_TYPE = CONTENT_TYPE_LATEST  # the exposition format generate_latest writes, as the client library names it


class _EngineCollector(Collector):
    """The engine's running totals as Prometheus counters."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        c = self.engine.counters
        plain = (
            ("generation_tokens", "Tokens generated (cancelled requests included).", c.generated_tokens),
            ("verification_steps", "Target forward passes that verified drafts (or decoded one token).", c.steps),
            ("spec_decode_num_drafts", "Verification steps that checked at least one draft token.", c.drafts),
            ("spec_decode_num_draft_tokens", "Draft tokens proposed and verified.", c.draft_tokens),
            ("spec_decode_num_accepted_tokens", "Draft tokens accepted.", c.accepted_tokens),
            ("spec_decode_num_sibling_tokens", "Runners-up verified beside the drafts (greedy draft trees).", c.sibling_tokens),
        )
        for name, doc, value in plain:
            yield CounterMetricFamily(PREFIX + name, doc, value=value)
        per_position = (
            ("spec_decode_num_accepted_tokens_per_pos", "Draft tokens accepted, by draft position (0 = first).", c.accepted_at),
            ("spec_decode_num_draft_tokens_per_pos", "Draft tokens verified, by draft position (0 = first).", c.drafted_at),
        )
        for name, doc, values in per_position:
            family = CounterMetricFamily(PREFIX + name, doc, labels=["position"])
            for position, value in enumerate(list(values)):
                family.add_metric([str(position)], value)
            yield family
        yield from _cost_gauges(self.engine)


def _cost_gauges(engine: Engine) -> Iterator[Metric]:
    """The engine's fitted step costs (engine/costs.py) and the draft plan each hint kind gets now."""
    c = engine.scheduler.costs.snapshot()
    gauges = (
        ("step_cost_forward_seconds", "Fitted seconds of a one-row target forward (0 before any was timed).", c["forward_s"]),
        ("step_cost_row_seconds", "Fitted seconds each further verified row adds to a target forward.", c["row_s"]),
        ("step_cost_draft_token_seconds", "Fitted seconds the drafter takes per draft token (0 before any).", c["draft_token_s"]),
        ("step_cost_draft_call_seconds", "Fitted fixed seconds of a drafter call, per request it drafts for.", c["draft_call_s"]),
        ("step_cost_row_relative", "Cost of a verified row relative to a one-row forward, as the draft schedule prices it.", c["row_cost"]),
        (
            "step_cost_draft_relative",
            "Cost of a draft token relative to a one-row forward, as the draft schedule prices it.",
            c["draft_cost"],
        ),
        (
            "step_cost_draft_call_relative",
            "Fixed cost of a drafter call relative to a one-row forward, paid once per drafting step.",
            c["draft_call_cost"],
        ),
        ("step_cost_measured", "1 once the draft schedule prices with measured costs, 0 while it uses the prior.", float(c["measured"])),
        (
            "step_cost_sharing_requests",
            "Requests the last verification forward verified together; each plan pays its share of the forward.",
            c["sharing"],
        ),
    )
    for name, doc, value in gauges:
        yield GaugeMetricFamily(PREFIX + name, doc, value=value)
    lengths = GaugeMetricFamily(
        PREFIX + "draft_schedule_length", "Draft length a learning request of each hint kind gets now.", labels=["hint"]
    )
    for hint, plan in engine.scheduler.snapshot().items():
        lengths.add_metric([hint], plan["draft_length"])
    yield lengths


class ServerMetrics:
    """One registry per app, so several servers in one process (tests) keep their own counts."""

    def __init__(self, engine: Engine, admission: Admission) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.finished = Counter(
            PREFIX + "request_success", "Requests answered to the end, by finish reason.", ["finished_reason"], registry=r
        )
        self.failed = Counter(PREFIX + "request_errors", "Requests answered with an error, by HTTP status.", ["status"], registry=r)
        self.cancelled = Counter(PREFIX + "request_cancelled", "Requests whose client went away before the answer ended.", registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of requests answered to the end.", registry=r)
        self.running = Gauge(PREFIX + "num_requests_running", "Requests being generated now.", registry=r)
        waiting = Gauge(PREFIX + "num_requests_waiting", "Requests waiting for a slot (--max-concurrent) or for KV-cache room.", registry=r)
        waiting.set_function(lambda: admission.queued + engine.worker.waiting)
        usage = Gauge(
            PREFIX + "kv_cache_usage_perc", "Share of the KV-cache budget (--kv-cache-mb) running requests hold (0-1).", registry=r
        )
        usage.set_function(lambda: engine.kv_budget.held / engine.kv_budget.limit_bytes)
        self.first_chunk = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Seconds from a request's arrival to its first verified output.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )
        r.register(_EngineCollector(engine))

    def finish(self, final: dict) -> None:
        self.finished.labels(final["finish_reason"]).inc()
        self.prompt_tokens.inc(final["usage"]["prompt_tokens"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
