"""The embedded TF-Serving-compatible model server, for machines without Docker, tests and CI.

    python -m serving.server --model_name=mnist --model_base_path=models/mnist --port=8500 --rest_api_port=8501

Flags mirror tensorflow_model_server (both `--flag=value` and `--flag value`). Differences, all deliberate:
- Port 0 binds a free port (tensorflow_model_server reads `--rest_api_port=0` as "no REST"; use -1 for that).
  Once listening the server prints `listening grpc_port=N rest_port=M`; in-process, start_server() returns
  the bound ports.
- `--model_config_file`: a base_path that does not exist as given is looked up relative to the current
  directory with its leading "/" dropped, so serving/models.config (base_path /models/mnist, the container's
  path) also works from the repo root. `--model_base_path`, if given too, replaces the base_path of the model
  named `--model_name` (or of the only model in the file).
- `--host` (not in tensorflow_model_server) chooses the address to bind, 0.0.0.0 by default.
- gRPC and REST requests are limited to MAX_MESSAGE_BYTES (16 MB): larger gRPC messages get
  RESOURCE_EXHAUSTED, larger REST bodies 413, before anything is allocated for them.
- `--rest_api_timeout_in_ms` bounds each socket read of a REST connection (a stalled client frees its thread).
- `--file_system_poll_wait_seconds=0` loads the versions once at start and never polls again.
- `--max_num_load_retries` (5) and `--load_retry_interval_micros` (60 s), as tensorflow_model_server's: a
  version that fails to load is tried again on later polls, that many times that far apart (tensorflow_model_
  server retries inside the load); a version that changes on disk starts afresh. Load errors shown to clients
  (GetModelStatus) have the server's paths replaced by `<version>` and `<model_base_path>`.
- SIGTERM and SIGINT stop accepting, drain in-flight requests for up to `--grace_period_seconds` (REST
  connections already waiting in the listen backlog included: served, not reset), exit 0.
- `--max_images_per_request` (4096), not in tensorflow_model_server: a request of more images gets
  INVALID_ARGUMENT / 400 before it is batched (serving/limits.py); 0 turns the bound off. The pixels a request's
  images may declare are bounded in the model's graph, for TF Serving too.
- `--static_dir` (not in tensorflow_model_server): the drawing page's directory, served at / on the REST port
  (GET only; the files in it and nothing else; serving/static.py). Default: the repository's web/;
  `--static_dir=` serves no page.
"""

import argparse
import asyncio
import dataclasses
import gc
import logging
import signal
import sys
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import tensorflow as tf

from serving import configs
from serving.batching import Batcher, BatchingOptions
from serving.grpc_service import add_services
from serving.limits import DEFAULT_MAX_IMAGES, RequestLimits
from serving.memory import Trimmer
from serving.metrics import Metrics
from serving.models import Model, ModelManager
from serving.predict import Predictor
from serving.rest import MAX_BODY_BYTES, RestServer
from serving.static import DEFAULT_STATIC_DIR

log = logging.getLogger("serving")

MAX_MESSAGE_BYTES = MAX_BODY_BYTES
PREDICT_THREADS = 64  # calls the batcher does not take (all, without batching) run on this many threads at most
DEFAULT_METRICS_PATH = "/monitoring/prometheus/metrics"


@dataclass
class ServerOptions:
    port: int = 8500
    rest_api_port: int = 8501
    model_name: str = "default"
    model_base_path: str = ""
    model_config_file: str = ""
    enable_batching: bool = False
    batching_parameters_file: str = ""
    file_system_poll_wait_seconds: float = 1.0
    max_num_load_retries: int = 5
    load_retry_interval_micros: int = 60_000_000
    monitoring_config_file: str = ""
    rest_api_timeout_in_ms: int = 30000
    tensorflow_intra_op_parallelism: int = 0
    tensorflow_inter_op_parallelism: int = 0
    host: str = "0.0.0.0"
    grace_period_seconds: float = 10.0
    static_dir: str = DEFAULT_STATIC_DIR
    max_images_per_request: int = DEFAULT_MAX_IMAGES


def _resolve_base_path(base_path: str) -> Path:
    path = Path(base_path)
    if not path.exists() and path.is_absolute() and Path(base_path.lstrip("/")).exists():
        return Path(base_path.lstrip("/"))
    return path


def build_models(options: ServerOptions) -> list[Model]:
    if not options.model_config_file:
        if not options.model_base_path:
            raise ValueError("Give --model_base_path (with --model_name) or --model_config_file")
        return [Model(options.model_name, _resolve_base_path(options.model_base_path))]
    config = configs.read_text_proto(options.model_config_file, configs.ModelServerConfig)
    entries = list(config.model_config_list.config)
    if not entries:
        raise ValueError(f"{options.model_config_file}: no model_config_list entries")
    models = []
    for entry in entries:
        base_path = entry.base_path
        if options.model_base_path and (entry.name == options.model_name or len(entries) == 1):
            base_path = options.model_base_path
        if entry.model_platform not in ("", "tensorflow"):
            raise ValueError(f"Model {entry.name}: platform {entry.model_platform!r} is not supported")
        models.append(Model(entry.name, _resolve_base_path(base_path), entry.model_version_policy,
                            dict(entry.version_labels)))
    return models


def _metrics_path(options: ServerOptions) -> str | None:
    if not options.monitoring_config_file:
        return None
    prometheus = configs.read_text_proto(options.monitoring_config_file, configs.MonitoringConfig).prometheus_config
    return (prometheus.path or DEFAULT_METRICS_PATH) if prometheus.enable else None


def _set_tf_threads(options: ServerOptions) -> None:
    try:
        if options.tensorflow_intra_op_parallelism:
            tf.config.threading.set_intra_op_parallelism_threads(options.tensorflow_intra_op_parallelism)
        if options.tensorflow_inter_op_parallelism:
            tf.config.threading.set_inter_op_parallelism_threads(options.tensorflow_inter_op_parallelism)
    except RuntimeError as e:  # TF already initialised in this process (in-process servers in tests)
        log.warning("Could not set TensorFlow thread pools: %s", e)


_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def grpc_event_loop() -> asyncio.AbstractEventLoop:
    """The asyncio loop, on its own thread, that runs every gRPC server of this process.

    One loop per process, never closed: grpc.aio's one completion queue wakes every loop bound to it, and a
    loop must outlive the servers on it, so servers started and stopped in one process (the tests) share it.
    """
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="grpc-loop", daemon=True).start()
        return _loop


async def _start_grpc(predictor: Predictor, address: str) -> tuple[grpc.aio.Server, int]:
    message_limits = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    server = grpc.aio.server(options=message_limits)
    add_services(server, predictor)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if not port:
        raise OSError(f"Could not bind gRPC to {address}")
    await server.start()
    return server, port


class RunningServer:
    def __init__(self, manager: ModelManager, batcher: Batcher | None, grpc_server: grpc.aio.Server, grpc_port: int,
                 rest: RestServer | None, metrics: Metrics, executor: futures.Executor | None = None,
                 trimmer: Trimmer | None = None) -> None:
        self.manager, self.batcher, self.metrics, self.trimmer = manager, batcher, metrics, trimmer
        self.grpc_server, self.grpc_port = grpc_server, grpc_port
        self._executor = executor
        self.rest = rest
        self.rest_port = rest.server_address[1] if rest else None
        self._rest_thread = None
        if rest:
            self._rest_thread = threading.Thread(target=rest.serve_forever, name="rest", daemon=True)
            self._rest_thread.start()

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish (at most grace_seconds), release everything."""
        log.info("Stopping: no new connections, draining in-flight requests (grace %.0f s)", grace_seconds)
        grpc_done = asyncio.run_coroutine_threadsafe(self.grpc_server.stop(grace_seconds), grpc_event_loop())
        if self.rest:
            self.rest.draining = True
            self.rest.shutdown()
            self.rest.answer_backlog()
            self.rest.server_close()
            if not self.rest.wait_idle(grace_seconds):
                log.warning("REST requests still running after the grace period")
            self.rest.close_connections()
        try:
            grpc_done.result(grace_seconds + 1)
        except TimeoutError:
            log.warning("gRPC server did not stop within the grace period")
        if self.batcher:
            self.batcher.stop()
        if self._executor:
            self._executor.shutdown(wait=False)
        if self.trimmer:
            self.trimmer.stop()
            if self.trimmer.available:
                log.info("Memory: %s", self.trimmer.summary())
        self.manager.stop()
        log.info("Stopped")


def start_server(options: ServerOptions) -> RunningServer:
    if options.static_dir and not Path(options.static_dir).is_dir():
        raise ValueError(f"--static_dir={options.static_dir}: not a directory")
    _set_tf_threads(options)
    models = build_models(options)
    metrics_path = _metrics_path(options)
    batcher = None
    metrics = Metrics()
    if options.enable_batching:
        params = configs.BatchingParameters()
        if options.batching_parameters_file:
            params = configs.read_text_proto(options.batching_parameters_file, configs.BatchingParameters)
        batching = BatchingOptions.from_proto(params)
        log.info("Batching enabled: %s", batching)
        batcher = Batcher(batching, metrics.record_batch)
    for model in models:
        log.info("Model %s: base path %s", model.name, model.base_path)
    manager = ModelManager(models, options.file_system_poll_wait_seconds, options.max_num_load_retries,
                           options.load_retry_interval_micros / 1e6)
    manager.start()
    log.info("Models loaded; polling every %s s", options.file_system_poll_wait_seconds or "never (disabled)")

    # Where a call the batcher does not take runs (every call without batching): threads that live as long as
    # the server, never a REST connection's own (TensorFlow keeps state for each thread that ever ran it).
    executor = futures.ThreadPoolExecutor(PREDICT_THREADS, thread_name_prefix="predict")
    limits = RequestLimits(options.max_images_per_request)
    trimmer = Trimmer().start()  # heap that large requests freed, given back once a burst of them is over
    predictor = Predictor(manager, batcher, metrics, executor, limits, trimmer)
    started = asyncio.run_coroutine_threadsafe(_start_grpc(predictor, f"{options.host}:{options.port}"),
                                               grpc_event_loop())
    grpc_server, grpc_port = started.result()
    log.info("Running gRPC ModelServer at %s:%d", options.host, grpc_port)
    rest = None
    if options.rest_api_port >= 0:
        rest = RestServer((options.host, options.rest_api_port), predictor, metrics_path,
                          options.rest_api_timeout_in_ms / 1000, options.static_dir)
        log.info("Exporting HTTP/REST API at %s:%d%s", options.host, rest.server_address[1],
                 f" (Prometheus metrics at {metrics_path})" if metrics_path else "")
        if options.static_dir:
            log.info("Drawing page at http://%s:%d/ (from %s)", options.host, rest.server_address[1],
                     options.static_dir)
    server = RunningServer(manager, batcher, grpc_server, grpc_port, rest, metrics, executor, trimmer)
    print(f"listening grpc_port={server.grpc_port} rest_port={server.rest_port}", flush=True)
    return server


def parse_args(argv: list[str] | None = None) -> ServerOptions:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for option in dataclasses.fields(ServerOptions):
        if option.type is bool:
            parser.add_argument(f"--{option.name}", type=lambda s: s.lower() in ("1", "true", "yes"),
                                nargs="?", const=True, default=option.default)
        else:
            parser.add_argument(f"--{option.name}", type=option.type, default=option.default)
    return ServerOptions(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):  # before start: a signal while starting still drains
        signal.signal(signum, lambda number, frame: stop.set())
    try:
        server = start_server(options)
    except (ValueError, OSError) as e:
        log.error("%s", e)
        return 1
    # The loaded TensorFlow graphs are millions of long-lived objects: keep the cyclic garbage collector from
    # walking them again and again while requests run (they were ~5% of the busy time under load).
    gc.collect()
    gc.freeze()
    stop.wait()
    log.info("Received signal, shutting down")
    server.stop(options.grace_period_seconds)
    log.info("Exiting cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
