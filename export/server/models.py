"""The model registry: which versions of which models are loaded, and their life cycle.

For every ``tensorflow`` model a poll thread lists ``base_path`` every
``file_system_poll_wait_seconds`` and:

1. treats numeric sub-folders as versions; a version is *ready* once it holds
   ``saved_model.pb`` (or ``.pbtxt``) and its files (names, sizes, mtimes) did not
   change between two polls, so half-copied versions are never loaded (writing
   into a temporary folder and renaming it is still the safest way to publish);
2. applies the version policy (latest N / all / specific) to the ready versions
   that did not fail to load;
3. loads the aspired versions that are not loaded yet, then retires loaded
   versions that are no longer aspired -- only after at least one aspired version
   is available, or when nothing is left to serve (no aspired version and none
   being written): availability preserving, as TF Serving's default policy. So
   copying v2 in and deleting v1 at once never leaves the model without a version.

Requests take a reference on a version (:meth:`ModelRegistry.acquire`); a retired
version leaves the serving map at once (new requests go to the new version) but
is unloaded only when its last in-flight request released it. A version that
fails to load is reported by :meth:`ModelRegistry.status` with its error, is not
retried until its files change, and never affects other versions or models.

With batching on, every loaded version is batched with the server's parameters;
with ``per_model_batching`` (TF Serving's ``--enable_per_model_batching_parameters``)
a SavedModel version is batched with its own ``<version>/batching_params.pbtxt``
and not batched without one, as in TF Serving. That file is read before the
model loads: a malformed one fails this version's load (INVALID_ARGUMENT naming
the file, in :meth:`ModelRegistry.status`) like any load error.

Example::

    >>> from export.server.config import ServedModelConfig
    >>> registry = ModelRegistry([ServedModelConfig("m", "/tmp/no-such-models")], poll_wait_seconds=1)
    >>> registry.start()
    >>> registry.acquire("m")
    Traceback (most recent call last):
    ...
    export.server.errors.ServingError: Servable not found for request: Latest(m)
    >>> registry.close()
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

from export.server.config import (
    PYTHON_PLATFORM,
    ServedModelConfig,
    check_python_module_allowed,
    load_per_model_batching_parameters,
    python_factory_spec,
)
from export.server.errors import ServingError
from export.server.servable import SavedModelServable, Servable
from export.server.source import list_versions, snapshot

logger = logging.getLogger(__name__)

# A model whose version folders stay without saved_model.pb this many polls is reported as failed
# (e.g. a base path that is no model folder, such as /proc): health no longer waits for it.
STALLED_POLLS = 10

# ModelVersionStatus.State values (get_model_status.proto).
START, LOADING, AVAILABLE, UNLOADING, END = "START", "LOADING", "AVAILABLE", "UNLOADING", "END"


@dataclasses.dataclass
class VersionRecord:
    """Life-cycle state of one version: ``state`` in START/LOADING/AVAILABLE/UNLOADING/END."""

    version: int
    state: str = START
    error: Optional[ServingError] = None
    servable: Optional[Servable] = None
    refcount: int = 0
    failed_snapshot: Optional[tuple] = None


@dataclasses.dataclass
class _Model:
    config: ServedModelConfig
    records: Dict[int, VersionRecord] = dataclasses.field(default_factory=dict)
    serving: Dict[int, VersionRecord] = dataclasses.field(default_factory=dict)
    snapshots: Dict[int, Optional[tuple]] = dataclasses.field(default_factory=dict)
    warned_missing: bool = False
    removed: bool = False
    error: Optional[str] = None  # why the base path cannot be served from (the model serves nothing)
    stalled_polls: int = 0  # polls in a row with version folders but none a complete SavedModel


class ServableHandle:
    """A reference on one loaded version; use as a context manager (released on exit)."""

    def __init__(self, registry: "ModelRegistry", record: VersionRecord):
        self._registry, self._record = registry, record
        self.servable: Servable = record.servable

    def __enter__(self) -> Servable:
        return self.servable

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self._record is not None:
            self._registry._release(self._record)
            self._record = None


def _spec_text(name: str, version: Optional[int]) -> str:
    return f"Latest({name})" if version is None else f"Specific({name}, {version})"


class ModelRegistry:
    """Loads, serves and retires model versions (see the module docstring).

    Args:
        configs: ``Sequence[ServedModelConfig]``.
        poll_wait_seconds: ``float``, polling period of base paths, default 1.
        batch_scheduler: optional ``BatchScheduler`` attached to every loaded servable.
        per_model_batching: ``bool``, batch each SavedModel version with the parameters of
            its ``batching_params.pbtxt`` (unbatched without one); default False.
        context: passed to Python (composite) servable factories; the serving core.
        loader: ``callable(name, version, path) -> Servable``, default ``SavedModelServable``.
        allowed_python_modules: ``Sequence[str]``, the modules python servables may come from
            (PERMISSION_DENIED ``ServingError`` for any other, before it is imported); default none.

    The platforms of ``configs`` are the only ones :meth:`reload_config` accepts later.
    """

    def __init__(
        self,
        configs: Sequence[ServedModelConfig],
        poll_wait_seconds: float = 1.0,
        batch_scheduler=None,
        context=None,
        loader: Callable[[str, int, str], Servable] = SavedModelServable,
        per_model_batching: bool = False,
        allowed_python_modules: Sequence[str] = (),
    ):
        self.allowed_python_modules = tuple(allowed_python_modules)
        for config in configs:
            check_python_module_allowed(config, self.allowed_python_modules)
        self.platforms = frozenset(c.platform for c in configs)  # loaded at start-up: reload keeps to them
        self.poll_wait_seconds = float(poll_wait_seconds)
        self.batch_scheduler = batch_scheduler
        self.per_model_batching = per_model_batching
        self.context = context
        self._loader = loader
        self._cond = threading.Condition()
        self._models: Dict[str, _Model] = {}
        self._stop = threading.Event()
        self._poll_lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._unloaders: List[threading.Thread] = []
        self._set_configs(configs)

    # --- life cycle -----------------------------------------------------------------
    def start(self, wait_seconds: float = 0.2) -> None:
        """Load what is on disk now (two polls ``wait_seconds`` apart), then poll in the background."""
        self._settle(wait_seconds)
        self._thread = threading.Thread(target=self._poll_loop, name="tfrec-model-poller", daemon=True)
        self._thread.start()

    def close(self, timeout: Optional[float] = None) -> None:
        """Stop polling and unload every version once its in-flight requests finished."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._cond:
            for model in self._models.values():
                for record in list(model.serving.values()):
                    self._begin_retire(model, record)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in list(self._unloaders):
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def reload_config(self, configs: Sequence[ServedModelConfig], wait_seconds: float = 0.2) -> None:
        """Switch to a new model list: new models load (returns once the versions on disk now
        are loaded), removed ones retire, others update in place (policy, labels).

        ``ServingError`` PERMISSION_DENIED, before anything changes or is imported, for a
        platform not loaded at start-up or a python module not allowed.
        """
        for config in configs:
            if config.platform not in self.platforms:
                raise ServingError.permission_denied(
                    f"model {config.name!r}: platform {config.platform!r} was not loaded at start-up; "
                    f"a reload may only use {', '.join(sorted(self.platforms)) or 'no platform'}"
                )
            check_python_module_allowed(config, self.allowed_python_modules)
        with self._poll_lock:
            self._set_configs(configs)
        self._settle(wait_seconds)

    def _settle(self, wait_seconds: float) -> None:
        # A version loads once two polls saw the same files: poll twice, a short time apart.
        self.poll_once()
        time.sleep(min(wait_seconds, self.poll_wait_seconds))
        self.poll_once()

    def _set_configs(self, configs: Sequence[ServedModelConfig]) -> None:
        names = [c.name for c in configs]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"illegal to list model(s) {duplicated} multiple times in config list")
        with self._cond:
            wanted = {c.name: c for c in configs}
            for name, model in list(self._models.items()):
                new = wanted.get(name)
                if new is None or (new.base_path, new.platform) != (model.config.base_path, model.config.platform):
                    model.removed = True
                    for record in list(model.serving.values()):
                        self._begin_retire(model, record)
                    del self._models[name]
            for name, config in wanted.items():
                if name in self._models:
                    self._models[name].config = config
                else:
                    self._models[name] = _Model(config)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_wait_seconds):
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - polling must survive anything
                logger.exception("model poll failed")

    def poll_once(self) -> None:
        """One pass over every model: load new versions, retire old ones."""
        with self._poll_lock:
            with self._cond:
                models = list(self._models.values())
            for model in models:
                if self._stop.is_set() or model.removed:
                    continue
                try:
                    if model.config.platform == PYTHON_PLATFORM:
                        self._load_python(model)
                    else:
                        self._poll_model(model)
                except Exception:  # noqa: BLE001 - one model's failure never stops the others
                    logger.exception("polling model %s failed", model.config.name)

    # --- polling one model ------------------------------------------------------------
    def _poll_model(self, model: _Model) -> None:
        config = model.config
        try:
            on_disk = list_versions(config.base_path)
        except OSError as err:  # unreadable: this model serves nothing, the others go on
            message = f"cannot read base path of model {config.name}: {err.strerror or type(err).__name__}"
            if model.error != message:
                logger.error("%s (%s)", message, config.base_path)
            model.error = message
            return
        if model.error and not model.stalled_polls:
            model.error = None
        if on_disk is None:
            if not model.warned_missing:
                logger.warning("base path %s of model %s does not exist (yet); polling", config.base_path, config.name)
                model.warned_missing = True
            on_disk = {}
        ready, pending = set(), set()
        for version, path in on_disk.items():
            record = model.records.get(version)
            if record is not None and record.state in (LOADING, AVAILABLE):
                ready.add(version)
                continue
            files = snapshot(path)
            previous = model.snapshots.get(version)
            model.snapshots[version] = files
            if files is None or files != previous:
                pending.add(version)  # being written (or just appeared): wait for a stable poll
                continue
            if record is not None and record.error is not None and record.failed_snapshot == files:
                continue  # failed to load and unchanged since: do not retry
            ready.add(version)
        for version in list(model.snapshots):
            if version not in on_disk:
                del model.snapshots[version]

        if pending and not ready and not model.serving:
            model.stalled_polls += 1
            if model.stalled_polls >= STALLED_POLLS and model.error is None:
                model.error = (f"no version folder of the base path of model {config.name} holds a complete "
                               f"SavedModel after {STALLED_POLLS} polls")
                logger.error("%s (%s)", model.error, config.base_path)
        else:
            model.stalled_polls = 0
            model.error = None
        aspired = set(config.version_policy.select(ready))
        for version in sorted(aspired - set(model.serving), reverse=True):
            if self._stop.is_set():
                return
            self._load(model, version, on_disk[version])
        with self._cond:
            # Availability preserving: retire only once an aspired version serves, or when
            # nothing is left to serve (no aspired and no half-written version on disk).
            available_aspired = aspired & set(model.serving)
            if available_aspired or not (aspired or pending):
                for version, record in list(model.serving.items()):
                    if version not in aspired:
                        self._begin_retire(model, record)

    def _load(self, model: _Model, version: int, path: str) -> None:
        name = model.config.name
        with self._cond:
            record = VersionRecord(version, state=LOADING)
            model.records[version] = record
        logger.info("loading %s version %d from %s", name, version, path)
        started = time.monotonic()
        try:
            batching = self._version_batching(name, version, path)
            servable = self._loader(name, version, path)
            warmed = servable.warm_up() if hasattr(servable, "warm_up") else 0
            if warmed:
                logger.info("%s version %d: %d warm-up requests replayed", name, version, warmed)
            if batching is not None:
                servable.attach_batching(self.batch_scheduler, batching)
        except Exception as err:  # noqa: BLE001 - a broken version must not stop the server
            error = ServingError.from_exception(err)
            logger.error("loading %s version %d failed: %s", name, version, error.message)
            with self._cond:
                record.state, record.error = END, error
                record.failed_snapshot = model.snapshots.get(version)
            return
        with self._cond:
            if model.removed:
                record.state = END
                servable.close()
                return
            record.servable, record.state = servable, AVAILABLE
            model.serving[version] = record
        logger.info("loaded %s version %d in %.2fs", name, version, time.monotonic() - started)

    def _version_batching(self, name: str, version: int, path: str):
        """The ``BatchingOptions`` to batch the version at ``path`` with, or ``None`` (unbatched)."""
        if self.batch_scheduler is None:
            return None
        if not self.per_model_batching:
            return self.batch_scheduler.options
        try:
            options = load_per_model_batching_parameters(path)
        except ValueError as err:  # a malformed file; its path leads the message
            raise ServingError.invalid_argument(f"per-model batching parameters: {err}") from None
        if options is None:
            logger.info("%s version %d has no batching_params.pbtxt: not batched (per-model batching)", name, version)
        else:
            logger.info("%s version %d is batched with its batching_params.pbtxt: %s", name, version, options)
        return options

    def _load_python(self, model: _Model) -> None:
        if model.records:
            return
        config = model.config
        record = VersionRecord(1, state=LOADING)
        with self._cond:
            model.records[1] = record
        try:
            check_python_module_allowed(config, self.allowed_python_modules)  # before any import
            module_name, attr, options = python_factory_spec(config.base_path)
            factory = getattr(importlib.import_module(module_name), attr)
            servable = factory(config.name, self.context, **options)
            if not isinstance(servable, Servable):
                raise TypeError(f"{config.base_path} returned {type(servable).__name__}, expected a PythonServable")
            if self.batch_scheduler is not None:
                servable.attach_batching(self.batch_scheduler)
        except Exception as err:  # noqa: BLE001
            error = ServingError.from_exception(err)
            logger.error("creating python model %s from %s failed: %s", config.name, config.base_path, error.message)
            with self._cond:
                record.state, record.error = END, error
            return
        with self._cond:
            record.servable, record.state = servable, AVAILABLE
            model.serving[1] = record

    # --- retiring -------------------------------------------------------------------
    def _begin_retire(self, model: _Model, record: VersionRecord) -> None:
        """Take ``record`` out of serving now; unload it when its last request finishes. Holds ``_cond``."""
        model.serving.pop(record.version, None)
        if record.state != AVAILABLE:
            return
        record.state = UNLOADING
        thread = threading.Thread(
            target=self._finish_retire, args=(model.config.name, record), name="tfrec-unload", daemon=True
        )
        self._unloaders = [t for t in self._unloaders if t.is_alive()] + [thread]
        thread.start()

    def _finish_retire(self, name: str, record: VersionRecord) -> None:
        with self._cond:
            while record.refcount > 0:
                self._cond.wait()
        logger.info("unloading %s version %d", name, record.version)
        try:
            if record.servable is not None:
                record.servable.close()
        finally:
            with self._cond:
                record.servable, record.state = None, END

    # --- requests -------------------------------------------------------------------
    def resolve_label(self, name: str, label: str) -> int:
        with self._cond:
            model = self._models.get(name)
            labels = model.config.version_labels if model else {}
        if label not in labels:
            raise ServingError.invalid_argument(f"Unrecognized servable version label: {label}")
        return labels[label]

    def acquire(self, name: str, version: Optional[int] = None, label: Optional[str] = None) -> ServableHandle:
        """A reference on version ``version`` (or the one ``label`` names, or the latest) of ``name``."""
        if not name:
            raise ServingError.invalid_argument("ModelSpec has no name specified.")
        if label:
            if version is not None:
                raise ServingError.invalid_argument(
                    f"Both model version ({version}) and model version label ({label}) cannot be supplied."
                )
            version = self.resolve_label(name, label)
        with self._cond:
            model = self._models.get(name)
            record = None
            if model is not None and model.serving:
                record = model.serving.get(version) if version is not None else model.serving[max(model.serving)]
            if record is None:
                raise ServingError.not_found(f"Servable not found for request: {_spec_text(name, version)}")
            record.refcount += 1
        return ServableHandle(self, record)

    def _release(self, record: VersionRecord) -> None:
        with self._cond:
            record.refcount -= 1
            if record.refcount == 0:
                self._cond.notify_all()

    # --- status ---------------------------------------------------------------------
    def status(self, name: str, version: Optional[int] = None, label: Optional[str] = None) -> List[VersionRecord]:
        """Version records of ``name`` (highest first), as GetModelStatus reports them."""
        if not name:
            raise ServingError.invalid_argument("Missing model name in request.")
        if label:
            version = self.resolve_label(name, label)
        with self._cond:
            model = self._models.get(name)
            records = dict(model.records) if model else {}
            if version is not None:
                if version not in records:
                    raise ServingError.not_found(f"Could not find version {version} of model {name}")
                return [dataclasses.replace(records[version])]
            if not records:
                raise ServingError.not_found(f"Could not find any versions of model {name}")
            return [dataclasses.replace(records[v]) for v in sorted(records, reverse=True)]

    def model_errors(self) -> Dict[str, str]:
        """``{model: why}`` for models that serve nothing because of an error: an unreadable base
        path, version folders that never hold a SavedModel, or every version failing to load."""
        with self._cond:
            errors = {}
            for name, m in self._models.items():
                if m.error:
                    errors[name] = m.error
                elif not m.serving and m.records and all(r.error is not None for r in m.records.values()):
                    errors[name] = "every version failed to load (see the model's status)"
            return errors

    def model_names(self) -> List[str]:
        with self._cond:
            return sorted(self._models)

    def version_states(self) -> dict:
        """``{(model, state): count}`` for the metrics gauge."""
        with self._cond:
            counts = {}
            for name, model in self._models.items():
                for record in model.records.values():
                    counts[(name, record.state)] = counts.get((name, record.state), 0) + 1
            return counts

    def is_available(self, name: str, version: Optional[int] = None) -> bool:
        """Whether ``name`` (at ``version``, or any version) is being served now."""
        with self._cond:
            model = self._models.get(name)
            return bool(model and (model.serving if version is None else version in model.serving))

    def wait_until_available(self, name: str, version: Optional[int] = None, timeout: float = 30.0) -> bool:
        """Block until ``name`` (at ``version``, or any version) is served; for tests and scripts."""
        deadline = time.monotonic() + timeout
        while not self.is_available(name, version):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True
