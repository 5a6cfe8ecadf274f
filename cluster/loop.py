"""The closed loop as it runs on a cluster, beside the Serve applications: a controller actor
per monitored model (`cluster/controller.py`) and the monitor (`monitoring/monitor.py`), each a
named, detached Ray actor on the head (`monitoring/singleton.py`: the Actors tab of the Ray
dashboard shows them by name, and Ray restarts one whose process dies). `llmops up` starts them
(each an opt-out: `controller.autostart`, `monitoring.monitor.autostart`), `llmops down` stops
them, `llmops status` reports them without a Ray driver of its own."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from cluster.controller import Controller, Refused
from cluster.settings import Settings
from cluster.state import ControllerState, StateStore
from monitoring.singleton import NAMESPACE, singleton
from training.errors import LLMOpsError
from training.registry import Registry

log = logging.getLogger(__name__)
MONITOR = "monitor"


def actor_name(model: str) -> str:
    return f"controller-{model}"


class ControllerActor:
    """A controller as a detached Ray actor (it resumes from the stored state after a restart).
    Manual commands run on the actor between steps, never beside one; reads of the stored
    state and events (`READS`) are answered beside a step, as the state file is replaced whole
    and an event line appended whole, so the demo's traffic, which follows the state, does not
    wait on a step that fits a teacher."""

    READS = ("state", "events")

    def __init__(self, settings_json: str, model: str):
        self.controller = Controller(Settings.model_validate_json(settings_json), model)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        """A step as soon as the actor starts (after `up`, or a restart mid-retrain or
        mid-canary, the loop goes on at once), then one every `interval_s`."""
        interval = self.controller.settings.controller.interval_s
        while True:
            with self.lock:
                if self.stopping.is_set():
                    return
                try:
                    self.controller.step()
                except Exception:
                    log.exception("%s: step failed; retrying", self.controller.model)
            if self.stopping.wait(interval):
                return

    def call(self, method: str, *args):
        """`step`, `state`, `events`, `promote`, `rollback` or `retrain_now` (a Refused error
        comes back as its message, so the caller can raise it again)."""
        if method in self.READS:
            return self._answer(method, *args)
        with self.lock:
            return self._answer(method, *args)

    def _answer(self, method: str, *args):
        try:
            result = getattr(self.controller, method)(*args)
        except Refused as exc:
            return {"refused": str(exc)}
        return result.model_dump() if isinstance(result, ControllerState) else result

    def stop(self) -> None:
        """Returns once no step runs, and no further one will."""
        with self.lock:
            self.stopping.set()


class MonitorActor:
    """The monitor as a detached Ray actor: its checks and /metrics server run in a thread;
    `stop` returns after the check in progress."""

    def __init__(self, settings_json: str):
        from monitoring.monitor import Monitor

        settings = Settings.model_validate_json(settings_json)
        self.monitor = Monitor(Registry(settings.registry, settings.data_dir), settings.log_uri,
                               settings.monitoring, settings.metrics_dir)
        self.stopping = threading.Event()
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.monitor.run(self.stopping)
        except Exception as exc:  # a port in use, say: reported by `status`, not retried
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("the monitor stopped")

    def status(self) -> dict:
        """Whether it runs (waiting, just after a start, until /metrics is served or the
        start failed), why not, and when each model was last checked."""
        deadline = time.monotonic() + 30
        while not (self.monitor.listening or self.error) and self.thread.is_alive() \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        return {"running": self.thread.is_alive() and self.monitor.listening,
                "error": self.error, "checked_at": dict(self.monitor.checked_at)}

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=600)


def portable(settings: Settings) -> Settings:
    """The settings with absolute paths, for processes that run elsewhere (actors, jobs)."""
    out = settings.model_copy(deep=True)
    out.data_dir = Path(settings.data_dir).resolve()
    out.registry.tracking_uri = Registry(settings.registry, settings.data_dir).tracking_uri
    return out


def _actor(settings: Settings, name: str, cls, *args, start: bool = False):
    """The actor `name` on the running cluster (started with `start` from `cls(settings as
    `portable` makes them, as JSON, *args)`), or None."""
    import ray

    from cluster import runtime

    if not runtime.join(settings.ray, settings.monitoring.logging):
        if start:
            raise LLMOpsError("no Ray cluster is running (start the platform with `llmops up`)")
        return None
    if start:
        return singleton(cls, name, portable(settings).model_dump_json(), *args,
                         retry_calls=False)
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def actor(settings: Settings, model: str, start: bool = False):
    """The model's controller actor (started with `start`), or None."""
    return _actor(settings, actor_name(model), ControllerActor, model, start=start)


def monitor(settings: Settings, start: bool = False):
    """The monitor's actor (started with `start`), or None."""
    return _actor(settings, MONITOR, MonitorActor, start=start)


def start(settings: Settings) -> dict:
    """What `llmops up` starts: a controller per `controller.models` (each resumes from its
    stored state) and the monitor, each unless its autostart is off; the monitor's status."""
    import ray

    controllers = list(settings.controller.models) if settings.controller.autostart else []
    for model in controllers:
        actor(settings, model, start=True)
    handle = monitor(settings, start=True) if settings.monitoring.monitor.autostart else None
    return {"controllers": controllers,
            "monitor": ray.get(handle.status.remote()) if handle is not None else None}


def stop_all(settings: Settings) -> dict:
    """What `llmops down` stops: every configured model's controller and the monitor that
    run."""
    return {"controllers": [m for m in settings.controller.models if stop(settings, m)],
            "monitor": _halt(monitor(settings))}


def stop(settings: Settings, model: str) -> bool:
    """Stop the model's controller actor between two steps (its state stays in the store, and
    the next start resumes it); False when none was running."""
    return _halt(actor(settings, model))


def _halt(handle) -> bool:
    """Ask the actor to stop (it returns once its work in progress is done), then end it;
    False when there was none."""
    import ray

    if handle is None:
        return False
    ray.get(handle.stop.remote(), timeout=600)
    ray.kill(handle)
    return True


def alive(settings: Settings) -> set[str]:
    """Names of the platform's actors that are alive, asked of the dashboard's state API (no
    Ray driver: a status answers in about a second); empty when no dashboard answers."""
    from ray.util.state import list_actors

    try:
        return {a.name for a in list_actors(
            address=settings.dashboard_address, filters=[("state", "=", "ALIVE")], limit=10_000,
            timeout=5, raise_on_missing_output=False) if a.ray_namespace == NAMESPACE}
    except Exception:  # no dashboard answers: no cluster, so nothing runs
        return set()


def statuses(settings: Settings, models: list[str], events: int,
             running: set[str] | None = None) -> dict:
    """Each model's state and latest transitions as its store holds them (None: the loop never
    ran), and whether its actor is alive (`running`: as `alive` gives it)."""
    running = alive(settings) if running is None else running
    store = StateStore(settings.controller_uri)
    out = {}
    for model in models:
        state = store.load(model)
        out[model] = {"running": actor_name(model) in running, "namespace": NAMESPACE,
                      "state": state.model_dump() if state else None,
                      "events": store.events(model)[-events:] if events else []}
    return out


def status(settings: Settings) -> dict:
    """The loop's actors as `llmops status` shows them: each controller, and the monitor."""
    running, cfg = alive(settings), settings.monitoring.monitor
    return {"controllers": statuses(settings, settings.controller.models, 0, running),
            "monitor": {"running": MONITOR in running,
                        "metrics": f"http://{cfg.host}:{cfg.port}/metrics"}}


def control(settings: Settings, model: str, method: str, *args) -> dict | list:
    """A controller method, on the model's actor when one runs (so it never races the loop),
    else here."""
    import ray

    handle = actor(settings, model)
    if handle is None:
        registry = Registry(settings.registry, settings.data_dir)
        registry.check()
        result = getattr(Controller(settings, model, registry), method)(*args)
        return result.model_dump() if isinstance(result, ControllerState) else result
    result = ray.get(handle.call.remote(method, *args))
    if isinstance(result, dict) and "refused" in result:
        raise Refused(result["refused"])
    return result
