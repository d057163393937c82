"""The served models of a repository. :class:`ModelVersion` is one loaded version (its sessions from
:mod:`serving.sessions` behind one :class:`~serving.batching.DynamicBatcher`, its metadata and config in the
protocol's JSON form); :func:`load_version` builds one from ``REPO/NAME/VERSION/model.onnx``;
:class:`ModelManager` keeps the version table of every model in line with the repository on disk (polling,
the repository API's load and unload, retiring replaced versions once their queued requests finish) and
picks the version a request goes to (:meth:`ModelManager.get`). :mod:`serving.endpoints` is its only caller
on the request path; nothing here knows about HTTP.

A new version directory goes live once its ``model.onnx`` loads and checks out against ``config.pbtxt``; the
version it replaces is taken out of routing first and closed only after its queued requests finish. A version
that fails to load is logged and listed in the index, and the versions already serving keep serving. Without
a version in the URL a request goes to the highest served version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.batching import DynamicBatcher
from serving.metrics import InferenceStats, MetricsRegistry
from serving.options import ServerOptions
from serving.protocol import InferenceError, Signature
from serving.repository import (
    CONFIG_FILE,
    MODEL_FILE,
    TRITON_TO_V2,
    ConfigError,
    ModelConfig,
    available_versions,
    model_names,
    read_config,
    served_versions,
)
from serving.sessions import check_model_io, create_session, make_runner, warm_up

log = logging.getLogger("mtlib.serve")


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")


def check_model_name(name: str) -> None:
    """A model name from a request names a directory of the repository and nothing else: 1-128 of letters, digits,
    ``_``, ``.`` and ``-``, not starting with a dot (no ``..``, no ``/``), else 400."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        shown = name if isinstance(name, str) and len(name) <= 64 else f"{str(name)[:64]}..."
        raise InferenceError(
            f"invalid model name {shown!r}: 1-128 letters, digits, '_', '.' or '-', not starting with '.'", 400
        )


def _file_id(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class ModelVersion:
    """One served version: its config, sessions and batcher, and the identity of the file it came from."""

    def __init__(
        self,
        cfg: ModelConfig,
        version: int,
        sessions: list[Any],
        file_id: Any,
        stats: InferenceStats,
        inline_max_us: float = 0.0,
    ) -> None:
        self.name = cfg.name
        self.version = version
        self.version_str = str(version)
        self.cfg = cfg
        self.signature = Signature(cfg)
        self.datatypes = {t.name: t.datatype for t in cfg.outputs}
        self.file_id = file_id
        self.sessions = sessions
        self.providers = sessions[0].get_providers()
        self.stats = stats
        batching = cfg.max_batch_size > 0
        self.batcher = DynamicBatcher(
            [make_runner(s, batching) for s in sessions],
            max_batch_size=cfg.max_batch_size,
            max_queue_delay_us=cfg.max_queue_delay_microseconds,
            preferred_batch_sizes=cfg.preferred_batch_size,
            on_execution=stats.executed,
            inline_max_us=inline_max_us,
            name=f"{cfg.name}-v{version}",
        )

    def metadata(self) -> dict[str, Any]:
        sig = self.signature
        return {
            "name": self.name,
            "versions": [self.version_str],
            "platform": self.cfg.platform,
            "inputs": [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in sig.inputs.values()],
            "outputs": [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in sig.outputs.values()],
        }

    def config_json(self) -> dict[str, Any]:
        """The config in the JSON form of Triton's ``GET /v2/models/{m}/config`` (``model_config.proto``)."""
        cfg = self.cfg
        v2_to_triton = {v: k for k, v in TRITON_TO_V2.items()}

        def tensors(ts: list[Any]) -> list[dict[str, Any]]:
            return [{"name": t.name, "data_type": v2_to_triton[t.datatype], "dims": list(t.dims)} for t in ts]

        if cfg.version_policy == "all":
            policy: dict[str, Any] = {"all": {}}
        elif cfg.version_policy == "specific":
            policy = {"specific": {"versions": cfg.specific_versions}}
        else:
            policy = {"latest": {"num_versions": cfg.latest_num_versions}}
        return {
            "name": cfg.name,
            "platform": cfg.platform,
            "backend": "onnxruntime",
            "max_batch_size": cfg.max_batch_size,
            "input": tensors(cfg.inputs),
            "output": tensors(cfg.outputs),
            "dynamic_batching": {
                "preferred_batch_size": cfg.preferred_batch_size,
                "max_queue_delay_microseconds": cfg.max_queue_delay_microseconds,
            },
            "instance_group": [{"count": cfg.instance_count, "kind": cfg.instance_kind}],
            "version_policy": policy,
            "parameters": {k: {"string_value": v} for k, v in cfg.parameters.items()},
        }


def load_version(
    repository: Path, cfg: ModelConfig, version: int, options: ServerOptions, stats: InferenceStats
) -> ModelVersion:
    """Read ``REPO/NAME/VERSION/model.onnx`` once and start ``instance_count`` sessions on those bytes (so
    every instance runs the same model even if the file is replaced meanwhile). Blocking: call it off the
    event loop."""
    path = repository / cfg.name / str(version) / MODEL_FILE
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        model = f.read()
    file_id = (st.st_ino, st.st_size, st.st_mtime_ns)
    source = str(path)
    sessions = [create_session(model, cfg, options, source) for _ in range(max(cfg.instance_count, 1))]
    check_model_io(sessions[0], cfg, source)
    mv = ModelVersion(cfg, version, sessions, file_id, stats, options.inline_max_us)
    for session in sessions:
        elapsed = warm_up(session, cfg)
        if elapsed is not None:
            mv.batcher.observe(elapsed, 1)
    return mv


@dataclass
class _ModelState:
    """What the manager knows about one model directory."""

    name: str
    cfg: ModelConfig | None = None
    config_id: Any = None
    config_error: str | None = None
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    latest: ModelVersion | None = None
    broken: dict[int, tuple[Any, str]] = field(default_factory=dict)  # version -> (file id, why it failed)
    loading: set[int] = field(default_factory=set)
    unloaded: bool = False


class ModelManager:
    """The served models of a repository: loading, polling, routing, retiring.

    Routing reads (``get``) happen on the event loop without locks; every change builds the new version table
    first and then swaps it in, so a request sees either the old or the new table, never a half-built one.
    Changes are serialized by one lock.
    """

    def __init__(self, options: ServerOptions, metrics: MetricsRegistry) -> None:
        self.options = options
        self.repository = Path(options.model_repository)
        self.metrics = metrics
        self._models: dict[str, _ModelState] = {}
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self._poller: asyncio.Task[None] | None = None
        self.started = False

    # ---- routing (hot path)

    def get(self, name: str, version: str | None) -> ModelVersion:
        """The version a request for ``name`` (and ``version``, or the latest) goes to; 404 if none serves."""
        state = self._models.get(name)
        if state is None:
            raise InferenceError(f"unknown model {name!r}; the repository has {sorted(self._models)}", 404)
        if version is None:
            mv = state.latest
            if mv is None:
                raise InferenceError(f"model {name!r} is not ready: {self._why_unavailable(state)}", 404)
            return mv
        mv = state.versions.get(int(version)) if version.isdigit() else None
        if mv is None:
            served = sorted(state.versions)
            raise InferenceError(
                f"model {name!r} has no ready version {version!r}; ready versions: {served}"
                + (f" ({self._why_unavailable(state, int(version))})" if version.isdigit() else ""),
                404,
            )
        return mv

    @staticmethod
    def _why_unavailable(state: _ModelState, version: int | None = None) -> str:
        if state.unloaded:
            return "unloaded through the repository API"
        if state.config_error:
            return state.config_error
        if version is not None and version in state.broken:
            return f"version {version} failed to load: {state.broken[version][1]}"
        if version is None and state.broken:
            return "; ".join(f"version {v} failed to load: {why}" for v, (_, why) in sorted(state.broken.items()))
        if state.loading:
            return "loading"
        return "no version directory with a model.onnx that the version policy selects"

    def ready_versions(self, name: str) -> list[int]:
        """The versions of ``name`` that serve now, ascending."""
        state = self._models.get(name)
        return sorted(state.versions) if state is not None else []

    @property
    def ready(self) -> bool:
        """Every model not explicitly unloaded serves at least one version."""
        return self.started and all(s.latest is not None for s in self._models.values() if not s.unloaded)

    # ---- lifecycle

    async def start(self) -> None:
        """Load everything in the repository, then poll it every ``poll_interval_s`` (``options.polls``)."""
        await self.poll()
        self.started = True
        if self.options.polls:
            self._poller = asyncio.create_task(self._poll_forever())

    async def close(self) -> None:
        """Stop polling, let every queued request finish, release all sessions."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        async with self._lock:
            for state in self._models.values():
                self._install(state, {})
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.options.poll_interval_s)
            try:
                await self.poll()
            except Exception:  # a scan must never stop polling
                log.exception("repository scan of %s failed", self.repository)

    async def poll(self) -> None:
        """Bring every model in line with the repository on disk (new, changed and removed versions)."""
        async with self._lock:
            names = set(model_names(self.repository)) | set(self._models)
            for name in sorted(names):
                state = self._models.get(name)
                if state is not None and state.unloaded:
                    continue
                await self._sync(name)

    async def load(self, name: str) -> None:
        """Load (or reload) ``name`` now, retrying versions that failed before; 400 if no version serves."""
        check_model_name(name)
        async with self._lock:
            if not (self.repository / name / CONFIG_FILE).is_file():
                raise InferenceError(f"no model {name!r} in repository {self.repository} (no {name}/{CONFIG_FILE})")
            state = self._models.setdefault(name, _ModelState(name))
            state.unloaded = False
            state.broken.clear()
            state.config_id = None  # force a re-read of config.pbtxt
            await self._sync(name)
            if state.latest is None:
                raise InferenceError(f"failed to load model {name!r}: {self._why_unavailable(state)}", 400)

    async def unload(self, name: str) -> None:
        """Stop routing to ``name``; returns once its in-flight requests have finished."""
        check_model_name(name)
        async with self._lock:
            state = self._models.get(name)
            if state is None:
                raise InferenceError(f"unknown model {name!r}; the repository has {sorted(self._models)}", 404)
            state.unloaded = True
            retiring = self._install(state, {})
        await asyncio.gather(*retiring, return_exceptions=True)

    def index(self) -> list[dict[str, Any]]:
        """Triton's repository index: one entry per model version (state READY, LOADING or UNAVAILABLE, with
        the reason), and one per model that has no version to list."""
        out: list[dict[str, Any]] = []
        for name in sorted(set(model_names(self.repository)) | set(self._models)):
            state = self._models.get(name)
            if state is None:  # appeared after the last scan
                out.append({"name": name, "state": "UNAVAILABLE", "reason": "not loaded yet"})
                continue
            on_disk = set(available_versions(self.repository, name))
            versions = sorted(on_disk | set(state.versions) | set(state.broken) | state.loading)
            entries = []
            for v in versions:
                entry: dict[str, Any] = {"name": name, "version": str(v)}
                if v in state.versions:
                    entry["state"] = "READY"
                elif v in state.loading:
                    entry["state"] = "LOADING"
                else:
                    entry["state"] = "UNAVAILABLE"
                    if state.unloaded:
                        entry["reason"] = "unloaded"
                    elif v in state.broken:
                        entry["reason"] = f"failed to load: {state.broken[v][1]}"
                    elif state.config_error:
                        entry["reason"] = state.config_error
                    else:
                        entry["reason"] = "not selected by the version policy"
                entries.append(entry)
            if not entries:
                entries.append({"name": name, "state": "UNAVAILABLE", "reason": self._why_unavailable(state)})
            elif state.config_error and state.versions:
                entries.append({"name": name, "state": "READY", "reason": f"serving; {state.config_error}"})
            out.extend(entries)
        return out

    # ---- reconciliation

    async def _sync(self, name: str) -> None:
        state = self._models.setdefault(name, _ModelState(name))
        config_path = self.repository / name / CONFIG_FILE
        config_id = _file_id(config_path)
        if config_id is None:  # the model directory went away: stop serving it
            if state.versions:
                log.info("model %s: %s removed, unloading", name, config_path)
            self._install(state, {})
            del self._models[name]
            return
        cfg = state.cfg
        if config_id != state.config_id:
            try:
                new_cfg = read_config(self.repository, name)
                if new_cfg.max_batch_size < 0:
                    raise ConfigError(f"{config_path}: max_batch_size must be >= 0, got {new_cfg.max_batch_size}")
            except ConfigError as err:
                if state.config_error != str(err):
                    log.error("model %s: %s (still serving versions %s)", name, err, sorted(state.versions))
                state.config_error, state.config_id = str(err), config_id
                return
            state.config_error, state.config_id = None, config_id
            if new_cfg != cfg:
                cfg = state.cfg = new_cfg
        if cfg is None:
            return
        version_dir = self.repository / name
        on_disk = available_versions(self.repository, name)
        file_ids = {v: _file_id(version_dir / str(v) / MODEL_FILE) for v in on_disk}
        for v in [v for v in state.broken if state.broken[v][0] != file_ids.get(v)]:
            del state.broken[v]  # rewritten or removed: worth another try

        def current(mv: ModelVersion) -> bool:
            return mv.cfg == cfg and mv.file_id == file_ids.get(mv.version)

        table = dict(state.versions)
        loop = asyncio.get_running_loop()
        for _ in range(len(on_disk) + 1):
            wanted = served_versions(cfg, [v for v in on_disk if v not in state.broken or v in table])
            todo = [v for v in wanted if v not in state.broken and (v not in table or not current(table[v]))]
            if not todo:
                break
            for v in todo:
                state.loading.add(v)
                stats = self.metrics.stats(name, str(v))
                try:
                    mv = await loop.run_in_executor(None, load_version, self.repository, cfg, v, self.options, stats)
                except Exception as err:
                    reason = str(err) or type(err).__name__
                    state.broken[v] = (file_ids.get(v), reason)
                    kept = f"; still serving {sorted(table)}" if table else ""
                    log.error("model %s version %d failed to load: %s%s", name, v, reason, kept)
                else:
                    table[v] = mv
                    log.info("model %s version %d loaded (%s)", name, v, ", ".join(mv.providers))
                finally:
                    state.loading.discard(v)
        wanted = served_versions(cfg, [v for v in on_disk if v in table])
        self._install(state, {v: table[v] for v in wanted})

    def _install(self, state: _ModelState, table: dict[int, ModelVersion]) -> list[asyncio.Task[None]]:
        """Swap in a new version table; retire (drain, then close) every version object no longer in it."""
        old = state.versions
        state.versions = table
        state.latest = table[max(table)] if table else None
        for mv in table.values():
            mv.stats.pending = lambda b=mv.batcher: b.pending
        gone = [mv for v, mv in old.items() if table.get(v) is not mv]
        tasks = []
        for mv in gone:
            task = asyncio.get_running_loop().create_task(self._retire(mv))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            tasks.append(task)
        return tasks

    @staticmethod
    async def _retire(mv: ModelVersion) -> None:
        await mv.batcher.drain()
        mv.batcher.close()
        mv.sessions.clear()
        log.info("model %s version %d unloaded", mv.name, mv.version)
