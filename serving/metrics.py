"""Prometheus metrics in the text exposition format, with Triton's inference metric names.

The format is Prometheus' text format 0.0.4 (``prometheus/docs/content/docs/instrumenting/exposition_formats.md``):
one ``# HELP`` and one ``# TYPE`` line per family, then ``name{label="value",...} number`` per sample, label
values escaped (``\\`` ``"`` and newline). Names and meanings follow Triton's ``docs/user_guide/metrics.md``:

=========================================== ============================================================
``nv_inference_request_success``            requests answered successfully
``nv_inference_request_failure``            requests that reached the model and failed (bad input, runtime)
``nv_inference_count``                      inferences: batch rows of successful requests
``nv_inference_exec_count``                 batched executions (``count / exec_count`` = mean batch size)
``nv_inference_request_duration_us``        cumulative time from request received to response ready
``nv_inference_queue_duration_us``          cumulative time requests waited for an instance
``nv_inference_compute_input_duration_us``  cumulative time concatenating the batch
``nv_inference_compute_infer_duration_us``  cumulative model execution time (each request is charged its batch's run)
``nv_inference_compute_output_duration_us`` cumulative time encoding responses
``nv_inference_pending_request_count``      gauge: requests queued or executing now
=========================================== ============================================================

Every sample is labelled ``model`` and ``version``. Counters are plain attributes of an
:class:`InferenceStats` updated on the event loop's thread (no locks on the hot path); the registry renders
them on a scrape. Counters of a version that was unloaded stay (Prometheus counters must not go backwards
while the process lives).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class InferenceStats:
    """Cumulative counters of one model version; durations in nanoseconds (rendered in microseconds)."""

    __slots__ = (
        "success",
        "failure",
        "count",
        "exec_count",
        "request_ns",
        "queue_ns",
        "compute_input_ns",
        "compute_infer_ns",
        "compute_output_ns",
        "pending",
    )

    def __init__(self) -> None:
        self.success = 0
        self.failure = 0
        self.count = 0
        self.exec_count = 0
        self.request_ns = 0
        self.queue_ns = 0
        self.compute_input_ns = 0
        self.compute_infer_ns = 0
        self.compute_output_ns = 0
        self.pending: Callable[[], int] | None = None

    def executed(self, requests: int, rows: int) -> None:
        """Count one batched execution (a :class:`serving.batching.DynamicBatcher` ``on_execution`` hook)."""
        self.exec_count += 1


# (metric name, type, help, how to read the value from InferenceStats)
_FAMILIES: list[tuple[str, str, str, Callable[[InferenceStats], int]]] = [
    ("nv_inference_request_success", "counter", "Number of successful inference requests", lambda s: s.success),
    ("nv_inference_request_failure", "counter", "Number of failed inference requests", lambda s: s.failure),
    ("nv_inference_count", "counter", "Number of inferences performed (batch rows)", lambda s: s.count),
    ("nv_inference_exec_count", "counter", "Number of model executions performed (batches)", lambda s: s.exec_count),
    (
        "nv_inference_request_duration_us",
        "counter",
        "Cumulative inference request duration in microseconds",
        lambda s: s.request_ns // 1000,
    ),
    (
        "nv_inference_queue_duration_us",
        "counter",
        "Cumulative inference queuing duration in microseconds",
        lambda s: s.queue_ns // 1000,
    ),
    (
        "nv_inference_compute_input_duration_us",
        "counter",
        "Cumulative compute input duration in microseconds",
        lambda s: s.compute_input_ns // 1000,
    ),
    (
        "nv_inference_compute_infer_duration_us",
        "counter",
        "Cumulative compute inference duration in microseconds",
        lambda s: s.compute_infer_ns // 1000,
    ),
    (
        "nv_inference_compute_output_duration_us",
        "counter",
        "Cumulative inference compute output duration in microseconds",
        lambda s: s.compute_output_ns // 1000,
    ),
    (
        "nv_inference_pending_request_count",
        "gauge",
        "Instantaneous number of pending requests awaiting execution per-model",
        lambda s: s.pending() if s.pending is not None else 0,
    ),
]


def escape_label_value(value: str) -> str:
    """A label value as the text format spells it inside double quotes."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_family(name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]) -> str:
    """One metric family in the text format: ``# HELP``, ``# TYPE`` and a line per ``(labels, value)``."""
    lines = [f"# HELP {name} {help_text.replace(chr(92), chr(92) * 2).replace(chr(10), chr(92) + 'n')}"]
    lines.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        label_text = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels.items())
        number = str(int(value)) if float(value).is_integer() else repr(float(value))
        lines.append(f"{name}{{{label_text}}} {number}" if label_text else f"{name} {number}")
    return "\n".join(lines) + "\n"


class MetricsRegistry:
    """The :class:`InferenceStats` of every model version seen, rendered as Triton-named families."""

    def __init__(self) -> None:
        self._stats: dict[tuple[str, str], InferenceStats] = {}

    def stats(self, model: str, version: str) -> InferenceStats:
        """The counters of ``model`` version ``version``, created at zero on first use (kept across reloads)."""
        key = (model, version)
        stats = self._stats.get(key)
        if stats is None:
            stats = self._stats[key] = InferenceStats()
        return stats

    def render(self) -> str:
        """The whole exposition, families in a fixed order, samples sorted by model and version."""
        keys = sorted(self._stats, key=lambda k: (k[0], int(k[1]) if k[1].isdigit() else k[1]))
        labels = [({"model": m, "version": v}, self._stats[(m, v)]) for m, v in keys]
        return "".join(
            render_family(name, kind, help_text, ((lab, read(s)) for lab, s in labels))
            for name, kind, help_text, read in _FAMILIES
        )
