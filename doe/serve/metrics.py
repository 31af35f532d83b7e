"""Prometheus metrics of one server, in a registry of its own (several apps in one process
do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SWITCH_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1)


class Metrics:
    """Requests, errors by kind, batch sizes, queue depth, expert switches and per-task latency."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("doe_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("doe_errors", "Requests that failed, by kind", ["kind"], registry=r)
        self.items = Counter("doe_items", "Items answered, by task and by what served them (an expert or dense)",
                             ["task", "expert"], registry=r)
        self.in_flight = Gauge("doe_in_flight_requests", "HTTP requests being handled", registry=r)
        self.queue_depth = Gauge("doe_queue_depth", "Items waiting for the worker", registry=r)
        self.batch_size = Histogram("doe_batch_size", "Items per batch handed to the runtime",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.batch_tokens = Histogram("doe_batch_tokens", "Padded text tokens per batch",
                                      buckets=(16, 64, 256, 1024, 4096, 16384, 65536), registry=r)
        self.queue_wait = Histogram("doe_queue_wait_seconds", "Time an item waited in the queue",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("doe_request_latency_seconds", "Receipt to answer, per item, by task",
                                 ["task"], buckets=_LATENCY_BUCKETS, registry=r)
        self.forward = Histogram("doe_forward_seconds",
                                 "Switch + forward of one batch the runtime ran, by task ('mixed' for mixed batches)",
                                 ["task"], buckets=_LATENCY_BUCKETS, registry=r)
        self.switches = Counter("doe_switches", "Expert switches (install, swap or restore)", registry=r)
        self.switch_seconds = Histogram("doe_switch_seconds", "Time of one expert switch",
                                        buckets=_SWITCH_BUCKETS, registry=r)
        self.generated_tokens = Counter("doe_generated_tokens", "Tokens generated, by task (the expert's, or the "
                                        "base model's id for dense)", ["task"], registry=r)
        # generation through the continuous-batching engine, by expert (the base model's id for dense)
        self.generations = Counter("doe_generation_requests", "Generations finished, by expert", ["expert"],
                                   registry=r)
        self.prompt_tokens = Counter("doe_prompt_tokens", "Prompt tokens of finished generations, by expert",
                                     ["expert"], registry=r)
        self.first_token = Histogram("doe_time_to_first_token_seconds", "Receipt to first generated token",
                                     ["expert"], buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("doe_inter_token_latency_seconds", "Time between two tokens of one generation",
                                     ["expert"], buckets=_LATENCY_BUCKETS, registry=r)
        self.generation_queue = Histogram("doe_generation_queue_seconds", "Receipt to admission into the batch",
                                          ["expert"], buckets=_LATENCY_BUCKETS, registry=r)
        self.decode_rows = Histogram("doe_decode_batch_rows", "Rows per decode step (batch occupancy)",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.kv_slots = Gauge("doe_kv_cache_slots", "Cache positions held by the decode batch (rows x longest row)",
                              registry=r)
        self.kv_budget = Gauge("doe_kv_cache_budget", "The most cache positions the batch may hold (0: no limit)",
                               registry=r)
        self.generation_queue_depth = Gauge("doe_generation_queue_depth", "Generations waiting for admission",
                                            registry=r)

    def observe_step(self, rows: int, slots: int) -> None:
        self.decode_rows.observe(rows)
        self.kv_slots.set(slots)

    def observe_switch(self, ms: float) -> None:
        self.switches.inc()
        self.switch_seconds.observe(ms / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)
