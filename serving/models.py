"""Model versions on disk -> loaded servables, the way TF Serving's file-system source and manager do it.

A model has a base path holding integer version dirs (anything else, like `.tmp-3`, is ignored). Every poll
the version policy picks the versions to serve; each new one is loaded fully and warmed up with
`assets.extra/tf_serving_warmup_requests` before it is published, so a request never sees a half-loaded
model. Requests hold a reference to the servable they started on, so a switch never fails one in flight.
A version that fails to load is reported as END with its error and skipped (until its directory changes):
the policy then picks among the rest, so the previous version keeps serving.
"""

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import prediction_log_pb2
from tensorflow_serving.config import file_system_storage_path_source_pb2, model_server_config_pb2

from serving.errors import ServingError, status_code_from_int
from serving.tensors import check_input_names

log = logging.getLogger(__name__)

DEFAULT_SIGNATURE = "serving_default"
WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"
MAX_WARMUP_RECORDS = 1000  # TF Serving's limit
UNLOAD_DRAIN_SECONDS = 30.0

VersionPolicy = file_system_storage_path_source_pb2.FileSystemStoragePathSourceConfig.ServableVersionPolicy


def _tidy_tf_message(message: str) -> str:
    """The reason alone: without TF's "Graph execution error", node names and stack trace boilerplate."""
    head = message.split("\n\t [[")[0]
    noise = ("Graph execution error:", "Detected at node", "<stack traces unavailable>", "  ")
    lines = [line for line in head.splitlines() if line.strip() and not line.startswith(noise)]
    return " ".join(lines) or message.strip()


class Servable:
    """One loaded version of a model: its signatures and a count of requests running on it."""

    def __init__(self, name: str, version: int, path: Path) -> None:
        self.name, self.version, self.path = name, version, path
        self.loaded = tf.saved_model.load(str(path))
        self.signatures = dict(self.loaded.signatures)
        meta_graph = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes()).meta_graphs[0]
        self.signature_defs: dict[str, meta_graph_pb2.SignatureDef] = dict(meta_graph.signature_def)
        self._inflight = 0
        self._idle = threading.Condition()
        # Asked on every request and rebuilt by TensorFlow on every access: computed once.
        self._input_specs = {name: dict(fn.structured_input_signature[1]) for name, fn in self.signatures.items()}
        self._output_names = {name: sorted(fn.structured_outputs) for name, fn in self.signatures.items()}

    def input_specs(self, signature_name: str) -> dict[str, tf.TensorSpec]:
        self.function(signature_name)  # the error for an unknown signature
        return self._input_specs[signature_name or DEFAULT_SIGNATURE]

    def output_names(self, signature_name: str) -> list[str]:
        self.function(signature_name)
        return self._output_names[signature_name or DEFAULT_SIGNATURE]

    def function(self, signature_name: str) -> Callable:
        fn = self.signatures.get(signature_name or DEFAULT_SIGNATURE)
        if fn is None:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f'Serving signature key "{signature_name}" not found. '
                               f"Available: {sorted(self.signatures)}")
        return fn

    def check_inputs(self, signature_name: str, inputs: dict[str, np.ndarray]) -> int | None:
        """Validate names, dtypes and shapes against the signature.

        Returns the batch size (the shared dim 0) when the request could be merged with others, else None.
        """
        specs = self.input_specs(signature_name)
        check_input_names(specs, inputs)
        batch_sizes = set()
        for name, spec in specs.items():
            array = inputs[name]
            want = spec.dtype
            got_string = array.dtype == object or array.dtype.kind in "SU"
            if (want == tf.string) != got_string or (want != tf.string and array.dtype != want.as_numpy_dtype):
                got = "string" if got_string else tf.as_dtype(array.dtype).name if array.dtype != object else "?"
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"Expects input '{name}' to be {want.name} but {got} is provided")
            if not spec.shape.is_compatible_with(array.shape):
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"input '{name}' has shape {list(array.shape)} but the signature expects "
                                   f"{spec.shape.as_list() if spec.shape.rank is not None else 'any'} "
                                   "(None = any size)")
            if spec.shape.rank and spec.shape[0] is None and array.ndim:
                batch_sizes.add(array.shape[0])
            else:
                batch_sizes.add(None)
        return batch_sizes.pop() if len(batch_sizes) == 1 else None

    def run(self, signature_name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fn = self.function(signature_name)
        try:
            outputs = fn(**{name: tf.constant(value) for name, value in inputs.items()})
        except tf.errors.OpError as e:
            raise ServingError(status_code_from_int(e.error_code), _tidy_tf_message(e.message)) from None
        except (TypeError, ValueError) as e:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        return {name: tensor.numpy() for name, tensor in outputs.items()}

    def warm_up(self) -> int:
        path = self.path / WARMUP_FILE
        if not path.exists():
            return 0
        from serving.classify import classification_inputs  # which imports this module

        count = 0
        for record in tf.data.TFRecordDataset(str(path)).take(MAX_WARMUP_RECORDS):
            entry = prediction_log_pb2.PredictionLog.FromString(record.numpy())
            if entry.HasField("predict_log"):
                request = entry.predict_log.request
                inputs = {name: tf.make_ndarray(proto) for name, proto in request.inputs.items()}
            elif entry.HasField("classify_log"):
                request = entry.classify_log.request
                inputs = classification_inputs(self, request.model_spec.signature_name, request.input)
            else:
                continue
            self.run(request.model_spec.signature_name, inputs)
            count += 1
        return count

    @contextmanager
    def in_use(self) -> Iterator["Servable"]:
        with self._idle:
            self._inflight += 1
        try:
            yield self
        finally:
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout)


@dataclass
class VersionStatus:
    version: int
    state: str  # as in GetModelStatusResponse: START, LOADING, AVAILABLE, UNLOADING, END
    error_code: int = 0
    error_message: str = ""


def scan_versions(base_path: Path) -> dict[int, Path]:
    if not base_path.is_dir():
        return {}
    return {int(p.name): p for p in base_path.iterdir() if re.fullmatch(r"[0-9]+", p.name) and p.is_dir()}


def _fingerprint(path: Path) -> tuple[int, int]:
    pb = path / "saved_model.pb"
    return path.stat().st_mtime_ns, pb.stat().st_mtime_ns if pb.exists() else 0


@dataclass
class _Failure:
    fingerprint: tuple[int, int]
    failures: int
    at: float
    retrying: bool = False


def check_model_config(entries: list) -> None:
    """What TF Serving refuses in a ModelConfigList before it loads anything (ServerCore's
    ValidateModelConfigList and the platforms it has): raises ServingError INVALID_ARGUMENT."""
    names = set()
    for entry in entries:
        if entry.name in names:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Illegal to list model {entry.name} multiple times in config list")
        names.add(entry.name)
        if not entry.base_path:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"Expected model {entry.name} to have an absolute "
                                                                 "path or URI; got base_path()=")
        if entry.model_platform not in ("", "tensorflow"):
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Model {entry.name} requests unsupported platform {entry.model_platform}")


def _last_error(model: "Model") -> str:
    statuses = model.statuses()
    failed = [status for status in statuses if status.error_message]
    if failed:
        return failed[-1].error_message
    return "no version found under its base path" if not statuses else f"version {statuses[-1].version} " \
        f"{statuses[-1].state}"


def _without_paths(message: str, *paths: Path) -> str:
    """A load error as clients see it (GetModelStatus): the server's filesystem paths replaced by what they
    are, the log keeps them."""
    for path in paths:
        for form in {str(path.resolve()), str(path)}:
            message = message.replace(form, "<model_base_path>" if path == paths[-1] else "<version>")
    return message


@dataclass
class Model:
    name: str
    base_path: Path
    policy: VersionPolicy = field(default_factory=VersionPolicy)
    labels: dict[str, int] = field(default_factory=dict)
    _servables: dict[int, Servable] = field(default_factory=dict)
    _status: dict[int, VersionStatus] = field(default_factory=dict)
    # TF Serving's --max_num_load_retries and --load_retry_interval_micros: a version that fails to load (its
    # variables still being copied, say) is tried again this many times, this long apart, on later polls
    max_load_retries: int = 5
    load_retry_interval_seconds: float = 60.0
    _failed: dict[int, "_Failure"] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _wanted(self, candidates: set[int]) -> set[int]:
        which = self.policy.WhichOneof("policy_choice")
        if which == "all":
            return set(candidates)
        if which == "specific":
            return candidates & set(self.policy.specific.versions)
        return set(sorted(candidates)[-max(1, self.policy.latest.num_versions):])

    def poll(self) -> None:
        on_disk = scan_versions(self.base_path)
        now = time.monotonic()
        for version in list(self._failed):
            failure = self._failed[version]
            if version not in on_disk or _fingerprint(on_disk[version]) != failure.fingerprint:
                del self._failed[version]  # changed on disk: a fresh start, with its own retries
            elif failure.failures <= self.max_load_retries and now - failure.at >= self.load_retry_interval_seconds:
                failure.retrying = True
        if not on_disk and not self._servables:
            log.warning("No versions of servable %s found under base path %s", self.name, self.base_path)
        while True:
            waiting = {v for v, failure in self._failed.items() if not failure.retrying}
            wanted = self._wanted(set(on_disk) - waiting)
            missing = sorted(wanted - set(self._servables), reverse=True)
            if not missing:
                break
            for version in missing:
                self._load(version, on_disk[version])
        for version in sorted(set(self._servables) - wanted):
            self._unload(version)

    def reconfigure(self, base_path: Path, policy: VersionPolicy, labels: dict[str, int]) -> None:
        """A config reload's new base path, version policy and labels: the next poll applies them."""
        with self._lock:
            self.base_path, self.policy, self.labels = base_path, policy, labels

    def available(self, version: int | None = None) -> bool:
        """Whether this version (any version, for None) serves now."""
        with self._lock:
            return bool(self._servables) if version is None else version in self._servables

    def unload_all(self) -> None:
        """Every version unloaded, each once the requests running on it have ended (a model a reload removed)."""
        for version in sorted(self._servables):
            self._unload(version)

    def _set_status(self, version: int, state: str, code: int = 0, message: str = "") -> None:
        with self._lock:
            self._status[version] = VersionStatus(version, state, code, message)

    def _load(self, version: int, path: Path) -> None:
        log.info("Loading servable %s version %d from %s", self.name, version, path)
        self._set_status(version, "LOADING")
        started = time.monotonic()
        try:
            servable = Servable(self.name, version, path)
            warmed = servable.warm_up()
        except Exception as e:
            code = e.code.value[0] if isinstance(e, ServingError) else grpc.StatusCode.UNKNOWN.value[0]
            message = f"Failed to load servable {self.name} version {version}: {e}"
            fingerprint = _fingerprint(path) if path.exists() else (0, 0)
            previous = self._failed.get(version)
            failures = previous.failures + 1 if previous and previous.fingerprint == fingerprint else 1
            self._failed[version] = _Failure(fingerprint, failures, time.monotonic())
            retry = (f"; retrying in {self.load_retry_interval_seconds:g} s "
                     f"({failures} of {self.max_load_retries + 1} attempts)" if failures <= self.max_load_retries
                     else "; no more retries until it changes on disk")
            log.error("%s%s", message, retry)
            self._set_status(version, "END", code, _without_paths(message, path, self.base_path))
            return
        with self._lock:
            self._servables[version] = servable
            self._status[version] = VersionStatus(version, "AVAILABLE")
        log.info("Successfully loaded servable %s version %d in %.1f s (%d warmup requests)",
                 self.name, version, time.monotonic() - started, warmed)

    def _unload(self, version: int) -> None:
        with self._lock:
            servable = self._servables.pop(version)
            self._status[version] = VersionStatus(version, "UNLOADING")
        log.info("Unloading servable %s version %d", self.name, version)
        if not servable.wait_idle(UNLOAD_DRAIN_SECONDS):
            log.warning("Servable %s version %d still busy after %.0f s", self.name, version, UNLOAD_DRAIN_SECONDS)
        self._set_status(version, "END")

    def resolve(self, version: int | None = None, label: str | None = None) -> Servable:
        with self._lock:
            if label:
                if label not in self.labels:
                    raise ServingError(grpc.StatusCode.NOT_FOUND,
                                       f"Unrecognized servable version label: {label} (model {self.name})")
                version = self.labels[label]
            if version is None:
                if self._servables:
                    return self._servables[max(self._servables)]
                raise ServingError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({self.name})")
            if version in self._servables:
                return self._servables[version]
        raise ServingError(grpc.StatusCode.NOT_FOUND,
                           f"Servable not found for request: Specific({self.name}, {version})")

    def statuses(self, version: int | None = None) -> list[VersionStatus]:
        with self._lock:
            if version is None:
                return [self._status[v] for v in sorted(self._status)]
            if version in self._status:
                return [self._status[version]]
        raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find version {version} of model {self.name}")


class ModelManager:
    """The models a server serves, polled for versions on disk, and replaced as a whole by a config reload
    (HandleReloadConfigRequest, or the config file changing under --model_config_file_poll_wait_seconds)."""

    def __init__(self, models: list[Model], poll_wait_seconds: float = 1.0, max_load_retries: int = 5,
                 load_retry_interval_seconds: float = 60.0,
                 resolve_path: Callable[[str], Path] = Path) -> None:
        self.max_load_retries, self.load_retry_interval_seconds = max_load_retries, load_retry_interval_seconds
        self.resolve_path = resolve_path  # a config's base_path -> the directory (serving/server.py's rule)
        for model in models:
            self._retry_as_configured(model)
        self.models = {model.name: model for model in models}  # replaced whole, never changed in place
        self.poll_wait_seconds = poll_wait_seconds
        self._config_lock = threading.Lock()  # one poll or reload at a time
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _retry_as_configured(self, model: Model) -> None:
        model.max_load_retries, model.load_retry_interval_seconds = (self.max_load_retries,
                                                                     self.load_retry_interval_seconds)

    def poll_all(self) -> None:
        with self._config_lock:
            for model in self.models.values():
                try:
                    model.poll()
                except Exception:  # a disappearing directory mid-scan and the like: try again next poll
                    log.exception("Polling model %s failed", model.name)

    def start(self) -> None:
        self.poll_all()
        if self.poll_wait_seconds > 0:
            self._every(self.poll_wait_seconds, self.poll_all, "model-poller")

    def watch_config(self, read: Callable[[], "model_server_config_pb2.ModelServerConfig"], seconds: float) -> None:
        """Reads the config every `seconds` and reloads it when it has changed (tensorflow_model_server's
        --model_config_file_poll_wait_seconds); a config that cannot be read or applied is logged and the
        models stay as they are."""
        last = [read()]

        def check() -> None:
            try:
                config = read()
                if config != last[0]:
                    log.info("Model config changed: reloading")
                    last[0] = config
                    self.reload(config)
                    log.info("Reloaded the model config: serving %s", ", ".join(self.models) or "no model")
            except (ValueError, OSError, ServingError) as e:
                log.error("Reloading the model config failed: %s", e)
        self._every(seconds, check, "config-poller")

    def _every(self, seconds: float, action: Callable[[], None], name: str) -> None:
        def loop() -> None:
            while not self._stop.wait(seconds):
                action()
        thread = threading.Thread(target=loop, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def reload(self, config: "model_server_config_pb2.ModelServerConfig") -> None:
        """Serves the models of `config` from now on, as TF Serving's ServerCore::ReloadConfig does: models
        added are loaded and awaited, models removed are unloaded once their requests in flight have ended, the
        others keep their loaded versions and take their new base path, version policy and labels at once (a
        poll follows). Raises ServingError with TF Serving's status and message; a config it refuses changes
        nothing (TF Serving may keep part of one it refuses for its labels)."""
        kind = config.WhichOneof("config")
        if kind is None:
            log.info("Taking no action for empty config.")
            return
        if kind != "model_config_list":
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION, "Cannot transition to requested config. It is "
                               "only legal to transition from one ModelConfigList to another.")
        entries = list(config.model_config_list.config)
        check_model_config(entries)
        with self._config_lock:
            current = self.models
            for entry in entries:
                for version in sorted(entry.version_labels.values()):
                    model = current.get(entry.name)
                    if model is None or not model.available(version):
                        raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                                           f"Request to assign label to version {version} of model {entry.name}, "
                                           "which is not currently available for inference")
            models, added = {}, []
            for entry in entries:
                base_path, labels = self.resolve_path(entry.base_path), dict(entry.version_labels)
                model = current.get(entry.name)
                if model is None:
                    model = Model(entry.name, base_path, entry.model_version_policy, labels)
                    self._retry_as_configured(model)
                    added.append(model)
                    log.info("Adding model %s: base path %s", model.name, base_path)
                else:
                    model.reconfigure(base_path, entry.model_version_policy, labels)
                models[entry.name] = model
            self.models = models  # requests see the new set of models from here on
            for name, model in current.items():
                if name not in models:
                    log.info("Removing model %s", name)
                    model.unload_all()
            for model in models.values():
                model.poll()
        missing = [model for model in added if not model.available()]
        if missing:
            details = ", ".join(f"{{{model.name}: {_last_error(model)}}}" for model in missing)
            raise ServingError(grpc.StatusCode.UNKNOWN, f"{len(missing)} model(s) did not become available: "
                                                        f"{{{details}}}")

    def model(self, name: str) -> Model:
        if name not in self.models:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({name})")
        return self.models[name]

    @contextmanager
    def acquire(self, name: str, version: int | None = None, label: str | None = None) -> Iterator[Servable]:
        with self.model(name).resolve(version, label).in_use() as servable:
            yield servable
