"""The embedded TF-Serving-compatible model server, for machines without Docker, tests and CI.

    python -m serving.server --model_name=mnist --model_base_path=models/mnist --port=8500 --rest_api_port=8501

Flags mirror tensorflow_model_server (both `--flag=value` and `--flag value`); `--help` lists each with its default.
Strict as tensorflow_model_server or stricter, before anything loads (exit status 2, the flags named):
- a boolean is true or false (any case), 1 or 0, or the flag alone for true, as tensorflow_model_server's parser
  reads it; anything else (`--enable_batching=ture`) is refused.
- a flag it does not know is refused, and so is an abbreviation (tensorflow_model_server prints "unknown
  argument" and its usage, then starts anyway).
- refused like tensorflow_model_server: `--batching_parameters_file` without `--enable_batching`; neither
  `--model_base_path` nor `--model_config_file`.
- refused where tensorflow_model_server lets them through: the same `--port` and `--rest_api_port` (it logs an
  error and serves no REST); a port out of range; a negative `--file_system_poll_wait_seconds`,
  `--max_num_load_retries`, `--tensorflow_intra_op_parallelism` (TensorFlow aborts on it), `--grace_period_seconds`
  or `--max_images_per_request`; `--rest_api_timeout_in_ms` not above 0; a `--static_dir` that is not a directory.
  start_server() refuses the same for servers started in-process (ValueError).
Differences, all deliberate:
- Port 0 binds a free port (tensorflow_model_server reads `--rest_api_port=0` as "no REST"; use -1 for that).
  Once listening the server prints `listening grpc_port=N rest_port=M`; in-process, start_server() returns
  the bound ports.
- `--model_config_file`: a base_path that does not exist as given is looked up relative to the current
  directory with its leading "/" dropped, so serving/models.config (base_path /models/mnist, the container's
  path) also works from the repo root. `--model_base_path`, if given too, replaces the base_path of the model
  named `--model_name` (or of the only model in the file); tensorflow_model_server ignores both flags then.
- `--host` (not in tensorflow_model_server) chooses the address to bind, 0.0.0.0 by default.
- gRPC and REST requests are limited to MAX_MESSAGE_BYTES (16 MB): larger gRPC messages get
  RESOURCE_EXHAUSTED, larger REST bodies 413, before anything is allocated for them.
- `--rest_api_timeout_in_ms` bounds each socket read of a REST connection (a stalled client frees its thread).
- `--file_system_poll_wait_seconds=0` loads the versions once at start and never polls again.
- HandleReloadConfigRequest and `--model_config_file_poll_wait_seconds` (serving/models.py, ModelManager.reload):
  a config refused for a label on a version that is not serving changes nothing (tensorflow_model_server keeps
  the new config without loading its models); the file is applied only when it has changed (tensorflow_model_
  server reloads it every time, to the same effect); GetModelStatus for a removed model is NOT_FOUND
  (tensorflow_model_server still lists its versions as END).
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
- `--access_log_file` (not in tensorflow_model_server): one JSON line for each Predict, metadata and status
  request, gRPC and REST (serving/access_log.py); "-" writes them to stdout; off by default.
- `--ssl_config_file` (TLS on the gRPC port only, REST stays plain HTTP, as in tensorflow_model_server) is read and
  checked before anything loads: a file that does not parse, no server_key or server_cert, client_verify without
  custom_ca, a path where PEM text belongs, or PEM that grpc cannot use (a key that is not the certificate's)
  stops the server (exit status 1, the file and the problem named). tensorflow_model_server reads it once the
  models have loaded, aborts on a file that does not parse and leaves the rest to grpc.
"""

import argparse
import asyncio
import dataclasses
import gc
import logging
import math
import re
import signal
import sys
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import tensorflow as tf

from serving import configs
from serving.access_log import AccessLog
from serving.batching import Batcher, BatchingOptions
from serving.errors import ServingError
from serving.grpc_service import add_services
from serving.health import ModelHealth
from serving.limits import DEFAULT_MAX_IMAGES, RequestLimits
from serving.memory import DEFAULT_ARENAS, Trimmer, limit_arenas
from serving.metrics import Metrics
from serving.models import Model, ModelManager, check_model_config
from serving.predict import Predictor
from serving.rest import MAX_BODY_BYTES, RestServer
from serving.static import DEFAULT_STATIC_DIR

log = logging.getLogger("serving")

MAX_MESSAGE_BYTES = MAX_BODY_BYTES
PREDICT_THREADS = 64  # calls the batcher does not take (all, without batching) run on this many threads at most
DEFAULT_METRICS_PATH = "/monitoring/prometheus/metrics"


OWN_FLAG = "[This server's own flag, not tensorflow_model_server's.] "


@dataclass
class ServerOptions:
    """The server's settings: each field is the flag of the same name, its metadata's help the flag's --help."""

    port: int = field(default=8500, metadata={"help": (
        "Port of the gRPC API. 0 binds a free port and prints it (tensorflow_model_server refuses 0).")})
    rest_api_port: int = field(default=8501, metadata={"help": (
        "Port of the HTTP/REST API, not the same as --port. 0 binds a free port and prints it, -1 serves no REST "
        "(tensorflow_model_server: 0 serves no REST, and that is its default).")})
    model_name: str = field(default="default", metadata={"help": (
        "Name the model of --model_base_path is served under. With --model_config_file: the entry whose "
        "base_path --model_base_path replaces.")})
    model_base_path: str = field(default="", metadata={"help": (
        "Directory of the model's numbered versions (<dir>/1/saved_model.pb, ...). This or --model_config_file "
        "is required. Given with --model_config_file it replaces the base_path of the entry named --model_name, "
        "or of the file's only entry (tensorflow_model_server ignores it then).")})
    model_config_file: str = field(default="", metadata={"help": (
        "A ModelServerConfig text proto: the models to serve, their version policies and labels. A base_path in "
        "it that does not exist is also looked up relative to the current directory, without its leading /.")})
    model_config_file_poll_wait_seconds: float = field(default=0.0, metadata={"help": (
        "Seconds between reads of --model_config_file: when it has changed, its models are served from then on, "
        "as after a HandleReloadConfigRequest (added ones loaded, removed ones unloaded once their requests "
        "end); 0 reads it once, at start. Only with --model_config_file.")})
    enable_batching: bool = field(default=False, metadata={"help": (
        "Batch concurrent requests to a model together.")})
    batching_parameters_file: str = field(default="", metadata={"help": (
        "A BatchingParameters text proto used instead of the default batching parameters. "
        "Only with --enable_batching.")})
    file_system_poll_wait_seconds: float = field(default=1.0, metadata={"help": (
        "Seconds between looks for new model versions on disk (fractions allowed); 0 looks once, at start.")})
    max_num_load_retries: int = field(default=5, metadata={"help": (
        "How many times a version that failed to load is tried again, on later looks; 0 tries it once.")})
    load_retry_interval_micros: int = field(default=60_000_000, metadata={"help": (
        "Microseconds at least between tries to load a version; negative does not wait.")})
    monitoring_config_file: str = field(default="", metadata={"help": (
        "A MonitoringConfig text proto; with prometheus_config enabled the REST port serves Prometheus metrics "
        "at its path.")})
    ssl_config_file: str = field(default="", metadata={"help": (
        "An SSLConfig text proto: the gRPC port serves TLS with its server_key and server_cert (PEM text, not "
        "paths); with client_verify it serves only clients with a certificate signed by its custom_ca. The REST "
        "port stays plain HTTP, as in tensorflow_model_server: put a TLS-terminating proxy in front of it. "
        "Empty: no TLS.")})
    rest_api_timeout_in_ms: int = field(default=30000, metadata={"help": (
        "Milliseconds a REST connection may take for each read before it is closed; more than 0.")})
    tensorflow_intra_op_parallelism: int = field(default=0, metadata={"help": (
        "Threads TensorFlow may use inside one op; 0 lets TensorFlow choose.")})
    tensorflow_inter_op_parallelism: int = field(default=0, metadata={"help": (
        "TensorFlow ops that may run at once; 0 lets TensorFlow choose. Negative: TF Serving runs a session's "
        "ops on the calling thread; TensorFlow 2, in this server, then uses its default pool.")})
    host: str = field(default="0.0.0.0", metadata={"help": OWN_FLAG + (
        "Address both ports are bound to.")})
    grace_period_seconds: float = field(default=10.0, metadata={"help": OWN_FLAG + (
        "At SIGTERM or SIGINT, seconds the requests in flight get to finish before the server exits.")})
    static_dir: str = field(default=DEFAULT_STATIC_DIR, metadata={"help": OWN_FLAG + (
        "Directory of the drawing page, served at / on the REST port; empty: no page.")})
    max_images_per_request: int = field(default=DEFAULT_MAX_IMAGES, metadata={"help": OWN_FLAG + (
        "Most images one request may hold (more: INVALID_ARGUMENT, REST 400); 0 turns the bound off.")})
    access_log_file: str = field(default="", metadata={"help": OWN_FLAG + (
        "File the access log is appended to: one JSON line for each Predict, metadata and status request (time, "
        "model, version, API, status, latency, batch size, client; never the request's body); - for stdout; "
        "empty: no access log.")})
    malloc_arena_max: int = field(default=DEFAULT_ARENAS, metadata={"help": OWN_FLAG + (
        "Most malloc arenas glibc may make (mallopt M_ARENA_MAX, as MALLOC_ARENA_MAX), set before the server's "
        "threads start: each arena keeps free memory of its own between the chunks in use (docs/fuzzing.md); "
        "0: glibc's default, 8 a CPU.")})


# What 0 means for the flags that refuse a negative value.
NOT_NEGATIVE = {
    "file_system_poll_wait_seconds": "0 looks for versions once, at start",
    "model_config_file_poll_wait_seconds": "0 reads the config once, at start",
    "max_num_load_retries": "0 tries a load once",
    "tensorflow_intra_op_parallelism": "0 lets TensorFlow choose; TensorFlow aborts on a negative one",
    "grace_period_seconds": "0 stops at once",
    "max_images_per_request": "0 turns the bound off",
    "malloc_arena_max": "0 keeps glibc's default",
}


def option_errors(options: ServerOptions) -> list[str]:
    """Why these options cannot start a server, each naming its flags; empty if they can.

    tensorflow_model_server refuses the first two at start too. The same --port and --rest_api_port it takes
    and serves no REST; ports out of range and the negative values here it passes on to fail later or mean
    nothing (a negative intra-op pool aborts TensorFlow).
    """
    errors = []
    if not options.model_base_path and not options.model_config_file:
        errors.append("give --model_base_path (with --model_name) or --model_config_file")
    if options.batching_parameters_file and not options.enable_batching:
        errors.append("--batching_parameters_file is set without --enable_batching")
    if options.model_config_file_poll_wait_seconds > 0 and not options.model_config_file:
        errors.append("--model_config_file_poll_wait_seconds is set without --model_config_file")
    if options.port > 0 and options.port == options.rest_api_port:
        errors.append(f"--port and --rest_api_port are both {options.port}: REST needs a port of its own")
    if not 0 <= options.port <= 65535:
        errors.append(f"--port={options.port} is not a port: 1 to 65535, or 0 for a free one")
    if not -1 <= options.rest_api_port <= 65535:
        errors.append(f"--rest_api_port={options.rest_api_port} is not a port: 1 to 65535, 0 for a free one "
                      "or -1 for no REST")
    for name, zero in NOT_NEGATIVE.items():
        if (value := getattr(options, name)) < 0:
            errors.append(f"--{name}={value} is negative ({zero})")
    if options.rest_api_timeout_in_ms <= 0:
        errors.append(f"--rest_api_timeout_in_ms={options.rest_api_timeout_in_ms}: a timeout is more than 0")
    if options.static_dir and not Path(options.static_dir).is_dir():
        errors.append(f"--static_dir={options.static_dir}: not a directory")
    return errors


def _resolve_base_path(base_path: str) -> Path:
    path = Path(base_path)
    if not path.exists() and path.is_absolute() and Path(base_path.lstrip("/")).exists():
        return Path(base_path.lstrip("/"))
    return path


def read_model_config(options: ServerOptions) -> configs.ModelServerConfig:
    """--model_config_file as the server applies it: --model_base_path, if given too, replaces the base_path of
    the entry named --model_name (or of the only entry). ValueError if it cannot be read or served."""
    config = configs.read_text_proto(options.model_config_file, configs.ModelServerConfig)
    entries = config.model_config_list.config
    if not entries:
        raise ValueError(f"{options.model_config_file}: no model_config_list entries")
    for entry in entries:
        if options.model_base_path and (entry.name == options.model_name or len(entries) == 1):
            entry.base_path = options.model_base_path
    try:
        check_model_config(list(entries))
    except ServingError as e:
        raise ValueError(f"{options.model_config_file}: {e.message}") from None
    return config


def build_models(options: ServerOptions) -> list[Model]:
    if not options.model_config_file:
        if not options.model_base_path:
            raise ValueError("Give --model_base_path (with --model_name) or --model_config_file")
        return [Model(options.model_name, _resolve_base_path(options.model_base_path))]
    return [Model(entry.name, _resolve_base_path(entry.base_path), entry.model_version_policy,
                  dict(entry.version_labels)) for entry in read_model_config(options).model_config_list.config]


def _metrics_path(options: ServerOptions) -> str | None:
    if not options.monitoring_config_file:
        return None
    prometheus = configs.read_text_proto(options.monitoring_config_file, configs.MonitoringConfig).prometheus_config
    return (prometheus.path or DEFAULT_METRICS_PATH) if prometheus.enable else None


@dataclass(frozen=True)
class GrpcTls:
    """What --ssl_config_file puts on the gRPC port."""

    credentials: grpc.ServerCredentials
    client_verify: bool

    def __str__(self) -> str:
        return "TLS, client certificates required" if self.client_verify else "TLS"


def read_ssl_config(path: str, host: str = "127.0.0.1") -> GrpcTls:
    """--ssl_config_file as tensorflow_model_server applies it: the key and certificate pair, custom_ca as the
    roots client certificates are verified against, client_verify forcing clients to present one.

    ValueError naming the file and each problem when grpc could not serve TLS with it: read before anything
    loads, so that a bad file stops the server at once rather than after the models have loaded (where
    tensorflow_model_server reads it).
    """
    def refuse(*problems: str) -> ValueError:
        return ValueError(f"--ssl_config_file={path}: " + "; ".join(problems))

    try:
        config = configs.read_text_proto(path, configs.SSLConfig)
    except OSError as e:
        raise refuse(f"cannot read it: {e.strerror or e}") from None
    except ValueError as e:
        raise refuse(f"not an SSLConfig text proto ({str(e).removeprefix(f'{path}: ')})") from None
    problems = [f"no {name}: TLS needs the server's private key and certificate"
                for name in ("server_key", "server_cert") if not getattr(config, name)]
    if config.client_verify and not config.custom_ca:
        problems.append("client_verify is true but custom_ca is empty: client certificates are verified against "
                        "custom_ca, the CA that signs them")
    # The usual slip: a path where the PEM text itself belongs.
    problems += [f"{name} is not PEM text (it holds the PEM itself, '-----BEGIN ...', not a file's path)"
                 for name in ("server_key", "server_cert", "custom_ca")
                 if getattr(config, name) and "-----BEGIN " not in getattr(config, name)]
    if problems:
        raise refuse(*problems)
    credentials = grpc.ssl_server_credentials(
        [(config.server_key.encode(), config.server_cert.encode())],
        root_certificates=config.custom_ca.encode() or None, require_client_auth=config.client_verify)
    if not _credentials_usable(credentials, host):
        raise refuse("grpc cannot use its PEM: server_key is not server_cert's key, or a key or certificate in it "
                     "is damaged (grpc's error log names which)")
    return GrpcTls(credentials, config.client_verify)


def _credentials_usable(credentials: grpc.ServerCredentials, host: str) -> bool:
    """Whether grpc takes these credentials. It reads the PEM, and checks that the key is the certificate's, only
    when a port is added with them: so they are tried on a server that is never started, on a free port of the
    host the real one will bind (a failure there is theirs, not the address's)."""
    executor = futures.ThreadPoolExecutor(max_workers=1)  # never given work: the probe never starts
    probe = grpc.server(executor)
    try:
        return bool(probe.add_secure_port(f"{host}:0", credentials))
    except RuntimeError:
        return False
    finally:
        probe.stop(None)
        executor.shutdown(wait=False)


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


async def _start_grpc(predictor: Predictor, address: str, credentials: grpc.ServerCredentials | None = None
                      ) -> tuple[grpc.aio.Server, int, ModelHealth]:
    """The gRPC server on address, with TLS when credentials are given (read_ssl_config), else plaintext."""
    message_limits = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    server = grpc.aio.server(options=message_limits)
    health = add_services(server, predictor)
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if not port:
        raise OSError(f"Could not bind gRPC to {address}")
    await server.start()
    return server, port, health


class RunningServer:
    def __init__(self, manager: ModelManager, batcher: Batcher | None, grpc_server: grpc.aio.Server, grpc_port: int,
                 rest: RestServer | None, metrics: Metrics, executor: futures.Executor | None = None,
                 trimmer: Trimmer | None = None, access_log: AccessLog | None = None,
                 health: ModelHealth | None = None) -> None:
        self.manager, self.batcher, self.metrics, self.trimmer = manager, batcher, metrics, trimmer
        self.access_log = access_log
        self.grpc_server, self.grpc_port, self.health = grpc_server, grpc_port, health
        self._executor = executor
        self.rest = rest
        self.rest_port = rest.server_address[1] if rest else None
        self._rest_thread = None
        if rest:
            self._rest_thread = threading.Thread(target=rest.serve_forever, name="rest", daemon=True)
            self._rest_thread.start()

    async def _stop_grpc(self, grace_seconds: float) -> None:
        if self.health:  # NOT_SERVING for Watch streams and probes before the drain begins
            await self.health.shutdown()
        await self.grpc_server.stop(grace_seconds)

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish (at most grace_seconds), release everything."""
        log.info("Stopping: no new connections, draining in-flight requests (grace %.0f s)", grace_seconds)
        grpc_done = asyncio.run_coroutine_threadsafe(self._stop_grpc(grace_seconds), grpc_event_loop())
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
        if self.access_log:
            self.access_log.close()  # the lines of the drained requests written
        log.info("Stopped")


def start_server(options: ServerOptions) -> RunningServer:
    if errors := option_errors(options):
        raise ValueError("; ".join(errors))
    tls = read_ssl_config(options.ssl_config_file, options.host) if options.ssl_config_file else None
    _set_tf_threads(options)
    models = build_models(options)
    metrics_path = _metrics_path(options)
    access_log = AccessLog(options.access_log_file)  # opened before the models load: a bad path fails at once
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
                           options.load_retry_interval_micros / 1e6, _resolve_base_path)
    manager.start()
    log.info("Models loaded; polling every %s s", options.file_system_poll_wait_seconds or "never (disabled)")
    if options.model_config_file and options.model_config_file_poll_wait_seconds > 0:
        manager.watch_config(lambda: read_model_config(options), options.model_config_file_poll_wait_seconds)
        log.info("Reading %s every %g s for changes", options.model_config_file,
                 options.model_config_file_poll_wait_seconds)

    # Where a call the batcher does not take runs (every call without batching): threads that live as long as
    # the server, never a REST connection's own (TensorFlow keeps state for each thread that ever ran it).
    executor = futures.ThreadPoolExecutor(PREDICT_THREADS, thread_name_prefix="predict")
    limits = RequestLimits(options.max_images_per_request)
    trimmer = Trimmer().start()  # heap that large requests freed, given back once a burst of them is over
    predictor = Predictor(manager, batcher, metrics, executor, limits, trimmer, access_log)
    started = asyncio.run_coroutine_threadsafe(
        _start_grpc(predictor, f"{options.host}:{options.port}", tls.credentials if tls else None),
        grpc_event_loop())
    grpc_server, grpc_port, health = started.result()
    log.info("Running gRPC ModelServer at %s:%d%s", options.host, grpc_port, f" ({tls})" if tls else "")
    rest = None
    if options.rest_api_port >= 0:
        rest = RestServer((options.host, options.rest_api_port), predictor, metrics_path,
                          options.rest_api_timeout_in_ms / 1000, options.static_dir)
        log.info("Exporting HTTP/REST API at %s:%d%s", options.host, rest.server_address[1],
                 f" (Prometheus metrics at {metrics_path})" if metrics_path else "")
        if options.static_dir:
            log.info("Drawing page at http://%s:%d/ (from %s)", options.host, rest.server_address[1],
                     options.static_dir)
    server = RunningServer(manager, batcher, grpc_server, grpc_port, rest, metrics, executor, trimmer, access_log,
                           health)
    print(f"listening grpc_port={server.grpc_port} rest_port={server.rest_port}", flush=True)
    return server


def _boolean(value: str) -> bool:
    """A boolean as tensorflow_model_server's flag parser spells it: true or false in any case, 1 or 0."""
    if value.lower() == "true" or value == "1":
        return True
    if value.lower() == "false" or value == "0":
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not a boolean: true or false (any case), 1 or 0, "
                                     "or the flag alone for true")


def _integer(value: str) -> int:
    if not re.fullmatch(r"\s*[+-]?[0-9]+\s*", value):  # int() would also take "1_000" and other digits
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer")
    return int(value)


def _number(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"{value!r} is not a number")
    return number


FLAG_TYPES = {bool: (_boolean, "true|false"), int: (_integer, "int"), float: (_number, "float"), str: (str, "string")}


def _shown(default: object) -> str:
    """A default as tensorflow_model_server's --help shows it: --flag=false, --flag="", --flag=8500."""
    if isinstance(default, bool):
        return str(default).lower()
    return f'"{default}"' if isinstance(default, str) else str(default)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serving.server", description=__doc__.split("\n")[0], allow_abbrev=False,
        usage="%(prog)s (--model_base_path=DIR | --model_config_file=FILE) [--flag=value ...]; --help lists them",
        epilog="Flags are given as --flag=value or --flag value. Differences from tensorflow_model_server: at the "
               "top of serving/server.py.")
    for option in dataclasses.fields(ServerOptions):
        parse, metavar = FLAG_TYPES[option.type]
        text = f"{option.metadata['help']} (default: {_shown(option.default)})".replace("%", "%%")
        if option.type is bool:  # the flag alone means true
            parser.add_argument(f"--{option.name}", type=parse, nargs="?", const=True, default=option.default,
                                metavar=metavar, help=text)
        else:
            parser.add_argument(f"--{option.name}", type=parse, default=option.default, metavar=metavar, help=text)
    return parser


def parse_args(argv: list[str] | None = None) -> ServerOptions:
    """The flags as ServerOptions; exits with status 2 on a flag it does not know or a value of the wrong type.
    Whether they fit together is option_errors'."""
    return ServerOptions(**vars(_parser().parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    options = ServerOptions(**vars(parser.parse_args(argv)))
    if errors := option_errors(options):
        parser.error("; ".join(errors))  # exit status 2, before anything loads
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if limit_arenas(options.malloc_arena_max):  # not in start_server: in-process servers share their host's heap
        log.info("malloc arenas: at most %d", options.malloc_arena_max)
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
