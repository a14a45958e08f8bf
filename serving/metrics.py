"""A few Prometheus metrics, named like TF Serving's, rendered in the text exposition format."""

import bisect
import threading
from collections import defaultdict

LATENCY_BUCKETS_US = (1e3, 2.5e3, 5e3, 1e4, 2.5e4, 5e4, 1e5, 2.5e5, 5e5, 1e6, 2.5e6, 5e6)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, running = [], 0
        sep = "," if labels else ""
        for bound, count in zip(self.buckets, self.counts, strict=True):
            running += count
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound:g}"}} {running}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        braced = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{braced} {self.sum:g}")
        out.append(f"{name}_count{braced} {self.count}")
        return out


def _label(value: str) -> str:
    """A label value as the exposition format writes it: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


UNKNOWN_MODEL = ""  # the model_name label of requests for a model this server does not serve


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)  # (model, api, status) -> count
        self.latency: dict[tuple[str, str], _Histogram] = {}
        self.batch_size = _Histogram(BATCH_SIZE_BUCKETS)

    def record_request(self, model: str, api: str, status: str, seconds: float) -> None:
        """Requests that name no served model (NOT_FOUND) share the model_name label "", so names a client
        makes up cannot add series without end."""
        if status == "NOT_FOUND":
            model = UNKNOWN_MODEL
        with self._lock:
            self.requests[(model, api, status)] += 1
            if status == "OK":
                self.latency.setdefault((model, api), _Histogram(LATENCY_BUCKETS_US)).observe(seconds * 1e6)

    def record_batch(self, size: int) -> None:
        with self._lock:
            self.batch_size.observe(size)

    def render(self) -> str:
        with self._lock:
            lines = ["# TYPE :tensorflow:serving:request_count counter"]
            for (model, api, status), count in sorted(self.requests.items()):
                lines.append(f':tensorflow:serving:request_count{{model_name="{_label(model)}",api="{api}",'
                             f'status="{status}"}} {count}')
            lines.append("# TYPE :tensorflow:serving:request_latency histogram")
            for (model, api), histogram in sorted(self.latency.items()):
                lines += histogram.lines(":tensorflow:serving:request_latency",
                                         f'model_name="{_label(model)}",api="{api}"')
            lines.append("# TYPE :tensorflow:serving:batching_session:processed_batch_size histogram")
            lines += self.batch_size.lines(":tensorflow:serving:batching_session:processed_batch_size", "")
        return "\n".join(lines) + "\n"
