"""A few Prometheus metrics, named and labelled like TF Serving's, rendered in the text exposition format.

TF Serving's (tensorflow_serving/servables/tensorflow/util.cc, recorded by model_servers/prediction_service_impl.cc),
with labels of ours where it has none for what the embedded server is asked to show (per version, per API):
- `:tensorflow:serving:request_count{model_name, version, api, status}`: TF Serving labels it with model_name and
  status; version (the version that answered, "" when none did) and api ("grpc" or "rest") are ours.
- `:tensorflow:serving:request_latency{model_name, API, entrypoint, status}`, microseconds, TF Serving's labels as
  its latest releases have them: API "Predict", "Classify" or "MultiInference", entrypoint "GRPC" (TF Serving's
  value; REST requests, which it does not time, are "REST" here), status the request's, as in request_count.
- `:tensorflow:serving:runtime_latency{model_name, version, API, runtime}`, microseconds: the time the version
  took to run the request (with batching, its wait for the batch too, as TF Serving's batching session counts
  it); runtime "TF1", TF Serving's name for TensorFlow's own runtime (not TFRT); version is ours.
- `:tensorflow:serving:batching_session:processed_batch_size`: the images in each merged call.
The series are bounded: requests that name no served model or version (NOT_FOUND) share the labels model_name ""
and version "", and any other version label is a version the server loaded. Label values are escaped, so a name
cannot add lines.
"""

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


def _labels(**values: str) -> str:
    """name="value",... in the order given, every value escaped."""
    return ",".join(f'{name}="{_label(value)}"' for name, value in values.items())


UNKNOWN_MODEL = ""  # the model_name label of requests for a model this server does not serve
RUNTIME = "TF1"  # runtime_latency's runtime label: TF Serving's for TensorFlow's own runtime, which runs ours too


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, str, str], int] = defaultdict(int)  # (model, version, api, status)
        self.latency: dict[tuple[str, str, str, str], _Histogram] = {}  # (model, API, entrypoint, status)
        self.runtime: dict[tuple[str, str, str], _Histogram] = {}  # (model, version, API)
        self.batch_size = _Histogram(BATCH_SIZE_BUCKETS)

    def record_request(self, model: str, version: int | None, api: str, method: str, status: str,
                       seconds: float) -> None:
        """One request: api is "grpc" or "rest", method the gRPC method ("Predict"), version the servable's that
        answered (None when none did). Requests that name no served model or version (NOT_FOUND) share the
        model_name and version labels "", so names a client makes up cannot add series without end."""
        if status == "NOT_FOUND":
            model, version = UNKNOWN_MODEL, None
        served = "" if version is None else str(version)
        with self._lock:
            self.requests[(model, served, api, status)] += 1
            self.latency.setdefault((model, method, api.upper(), status),
                                    _Histogram(LATENCY_BUCKETS_US)).observe(seconds * 1e6)

    def record_runtime(self, model: str, version: int, method: str, seconds: float) -> None:
        """A loaded version ran one request (model and version come from the servable, never from the client)."""
        with self._lock:
            self.runtime.setdefault((model, str(version), method), _Histogram(LATENCY_BUCKETS_US)).observe(
                seconds * 1e6)

    def record_batch(self, size: int) -> None:
        with self._lock:
            self.batch_size.observe(size)

    def render(self) -> str:
        with self._lock:
            lines = ["# TYPE :tensorflow:serving:request_count counter"]
            for (model, version, api, status), count in sorted(self.requests.items()):
                labels = _labels(model_name=model, version=version, api=api, status=status)
                lines.append(f":tensorflow:serving:request_count{{{labels}}} {count}")
            lines.append("# TYPE :tensorflow:serving:request_latency histogram")
            for (model, method, entrypoint, status), histogram in sorted(self.latency.items()):
                lines += histogram.lines(":tensorflow:serving:request_latency", _labels(
                    model_name=model, API=method, entrypoint=entrypoint, status=status))
            lines.append("# TYPE :tensorflow:serving:runtime_latency histogram")
            for (model, version, method), histogram in sorted(self.runtime.items()):
                lines += histogram.lines(":tensorflow:serving:runtime_latency", _labels(
                    model_name=model, version=version, API=method, runtime=RUNTIME))
            lines.append("# TYPE :tensorflow:serving:batching_session:processed_batch_size histogram")
            lines += self.batch_size.lines(":tensorflow:serving:batching_session:processed_batch_size", "")
        return "\n".join(lines) + "\n"
