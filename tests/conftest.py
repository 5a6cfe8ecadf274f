"""Shared fixtures: one real Ray instance per session, tiny model configs, a fresh registry."""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.runtime import PLATFORM_ENV, apply_platform_env
from cluster.settings import Settings

os.environ["RAY_AUTH_MODE"] = "disabled"
# No Ray API starts a Ray of its own here: after the session's `ray.shutdown()` the routers of
# the Serve handles this process holds still push metrics, and each push would start a fresh
# local Ray (in a daemon thread, at exit, where it can hang the interpreter)
os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
# The Serve handles this process holds report their load to the autoscaler every second, not
# Serve's 10 s: the autoscaling test sees its scale-up and its scale-down that much sooner
os.environ["RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "1"
apply_platform_env()

TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 64}
TINY_GPT2 = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 96}
TINY_LLAMA = {"model_type": "llama", "num_hidden_layers": 1, "num_attention_heads": 4,
              "num_key_value_heads": 2, "hidden_size": 64, "intermediate_size": 128,
              "max_position_embeddings": 96}


@functools.cache
def _migrated_mlflow_store() -> Path:
    """An empty MLflow SQLite store with its schema created: MLflow's migrations take about 2 s
    per new store, once per session here, then each test's data dir starts from a copy."""
    from mlflow import MlflowClient

    folder = Path(tempfile.mkdtemp(prefix="mlflow-schema-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    return folder / "mlflow.db"


def tiny_settings(data_dir, tracking_uri: str | None = None, **training) -> Settings:
    """Settings whose tasks train in seconds: scratch models, a few hundred rows; an empty
    registry (without `tracking_uri`, the SQLite store under `data_dir`)."""
    if tracking_uri is None and not (Path(data_dir) / "mlflow.db").exists():
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_migrated_mlflow_store(), Path(data_dir) / "mlflow.db")
    classifier = {"model": {"source": "scratch", "architecture": TINY_BERT, "max_length": 48},
                  "train_size": 192, "holdout_size": 48, "golden_size": 48, "epochs": 2,
                  "batch_size": 16, "learning_rate": 1e-3}
    tasks = {
        "support-router": {**classifier, "holdouts": ["base", "new-product"],
                           "model": {**classifier["model"], "freeze_embeddings": True}},
        "moderation": {**classifier, "holdouts": ["base"]},
        "rewriter": {"model": {"source": "scratch", "architecture": TINY_GPT2, "max_length": 64,
                               "tokenizer_vocab_size": 400},
                     "train_size": 96, "holdout_size": 24, "golden_size": 32, "epochs": 1,
                     "holdouts": ["base"]},
        "support-reply": {"model": {"source": "scratch", "architecture": TINY_GPT2,
                                    "max_length": 96, "tokenizer_vocab_size": 1000},
                          "train_size": 400, "holdout_size": 24, "golden_size": 32, "epochs": 1,
                          "holdouts": ["base"]},
        # the advisor's intents, from the bundled encoder's first layer: questions are read
        # right from a few hundred rows (tests/serve_apps/test_advisor.py asks real ones)
        "advisor-intent": {**classifier, "train_size": 400,
                           "model": {"source": "all-MiniLM-L6-v2", "max_length": 48,
                                     "architecture": {"num_hidden_layers": 1},
                                     "freeze_embeddings": True}},
    }
    return Settings.model_validate({
        "data_dir": str(data_dir),
        "ray": {"include_dashboard": False},
        "registry": {"tracking_uri": tracking_uri},
        "training": {"workers": 2, "max_failures": 2, "tasks": tasks, **training},
        # tests step their controllers themselves (test_controller.py starts the loop's actors);
        # a retrain on one worker: distribution is tested by the fine-tunes themselves
        "controller": {"autostart": False, "retrain_workers": 1},
    })


HEAVY = {"torch", "transformers", "deepspeed", "peft", "mlflow", "evidently"}


def imported_by(code: str) -> set[str]:
    """The top-level packages a fresh interpreter holds after running `code`."""
    code = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {m.split(".")[0] for m in json.loads(proc.stdout)}


@contextlib.contextmanager
def running(stop: threading.Event, *targets: Callable[[], None], join_s: float = 60):
    """Each target in a daemon thread for the block, then `stop` set and the threads joined,
    however the block ends: a failed test once left its load thread spinning through the rest
    of the session, and at exit the interpreter waited for it until CI's kill limit."""
    threads = [threading.Thread(target=target, daemon=True) for target in targets]
    for t in threads:
        t.start()
    try:
        yield threads
    finally:
        stop.set()
        for t in threads:
            t.join(join_s)


def wait_for(what: str, check: Callable, timeout_s: float = 60, every_s: float = 0.25,
             detail: Callable[[], object] = lambda: ""):
    """Poll `check` until it returns something truthy, and return that: tests wait for a state,
    never for a fixed time. Fails the test naming `what` (and `detail()`) after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what} {detail()}")
        time.sleep(every_s)
    return value


def free_port() -> int:
    """A loopback port nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_runtest_logreport(report):
    """A failure is printed when it happens too, not only in the summary: a Ray process that
    takes the interpreter down at exit would otherwise take the report with it."""
    if report.failed:
        print(f"\nFAILED {report.nodeid} ({report.when})\n{report.longreprtext[-6000:]}",
              file=sys.stderr, flush=True)


# How long the test process may take to exit once its tests and fixtures are done
EXIT_GRACE_S = 60


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """A test process that does not exit within EXIT_GRACE_S of its last teardown prints every
    thread's stack and exits with the session's status: a thread left behind (a library's, at
    exit) once kept CI's session alive until its kill limit, with no sign of where."""
    def give_up():
        os.write(2, f"\nthe test process did not exit {EXIT_GRACE_S} s after its session; "
                    "its threads:\n".encode())
        faulthandler.dump_traceback(sys.__stderr__, all_threads=True)
        os._exit(int(exitstatus))

    watchdog = threading.Timer(EXIT_GRACE_S, give_up)
    watchdog.daemon = True
    watchdog.start()
    # Were the interpreter stuck where no Python thread runs: stacks, then exit 1
    faulthandler.dump_traceback_later(2 * EXIT_GRACE_S, exit=True, file=sys.__stderr__)


def pytest_collection_modifyitems(items):
    """The tests on the shared serving stack (`platform`) after the others, whose Ray Train
    workers and replicas would find its replicas holding the session's CPUs; tests marked
    `own_ray` start Ray clusters of their own (stopping the session's): last."""
    items.sort(key=lambda item: (item.get_closest_marker("own_ray") is not None,
                                 "platform" in item.fixturenames))


@dataclass(frozen=True)
class RaySession:
    address: str
    dashboard: str


@pytest.fixture(scope="session")
def ray_session() -> RaySession:
    """One local Ray instance for the whole test session: 2 logical CPUs, like CI, and 2 logical
    GPUs so GPU placement and autoscaling can be checked without a GPU (nothing runs CUDA)."""
    import ray

    ctx = ray.init(num_cpus=2, num_gpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                   _node_ip_address="127.0.0.1",  # as the platform's local head (cluster/runtime)
                   log_to_driver=True, runtime_env={"env_vars": dict(PLATFORM_ENV)})
    yield RaySession(ray.get_runtime_context().gcs_address, f"http://{ctx.dashboard_url}")
    ray.shutdown()


@pytest.fixture(scope="session")
def platform(ray_session, tmp_path_factory):
    """The serving stack tests/serve_apps/test_serving_*.py share (`serving_stack.py`): set up
    once, torn down with the session."""
    from serving_stack import up

    yield from up(ray_session, tmp_path_factory)


@pytest.fixture
def loop(ray_session, tmp_path):
    """The closed loop's stack of tests/cluster/test_controller.py and test_loop.py
    (`loop_stack.py`): a router champion (v1), a worse challenger (v2), the loop's settings on
    the session's Ray and their controller."""
    from loop_stack import build

    return build(ray_session, tmp_path)


@pytest.fixture
def settings(tmp_path) -> Settings:
    return tiny_settings(tmp_path / "state")


@pytest.fixture
def registry(settings):
    from training.registry import Registry

    return Registry(settings.registry, settings.data_dir)


def advisor_registry(tmp_path_factory, name: str) -> tuple[Path, Settings, object]:
    """A module's own folder (`name`), settings and registry, with the advisor's intent
    classifier trained quickly and registered as its champion (`models:/advisor-intent/1`)."""
    from training.registry import Registry

    root = tmp_path_factory.mktemp(name)
    settings = tiny_settings(root / "state")
    registry = Registry(settings.registry, settings.data_dir)
    register_quick(settings, registry, "advisor-intent", epochs=4, lr=1e-3)
    return root, settings, registry


def register_quick(settings: Settings, registry, task: str, epochs: int = 6, seed: int = 0,
                   lr: float = 3e-3):
    """A tiny model trained in-process (plain PyTorch, seconds) and registered as a new version:
    serving tests need registered models, not a distributed fine-tune. The training is seeded,
    so the same task settings, epochs, seed and rate give the same model: it is trained once a
    session (unless it starts from a registered version) and each call registers a copy."""
    import tempfile
    import time

    from training.job import make_spec, register_model_dir
    from training.taskdata import build_task_data

    started = time.perf_counter()
    data = build_task_data(settings.training, task)
    spec = make_spec(settings.training, registry, task, data)
    key = json.dumps([settings.training.task(task).model_dump(mode="json"),
                      settings.training.seed, epochs, seed, lr], sort_keys=True)
    trained = _QUICK.get(key) or _train_quick(spec, epochs, seed, lr)
    if not spec.model.source.startswith("models:/"):  # a registered source: this registry's
        _QUICK[key] = trained
    with tempfile.TemporaryDirectory(prefix=f"quick-{task}-") as folder:
        shutil.copytree(trained, folder, dirs_exist_ok=True)  # registering writes into it
        return register_model_dir(settings.training, registry, task, data, Path(folder),
                                  spec.labels, history=[], ds_config={}, started=started)


_QUICK: dict[str, Path] = {}  # register_quick's models of this session, by what trained them


def _train_quick(spec, epochs: int, seed: int, lr: float) -> Path:
    """`spec`'s model trained `epochs` times over its rows in this process, saved in a folder
    of the session's."""
    import torch

    from training.models import build_model, collate, encode_causal_lm, encode_classification

    torch.manual_seed(seed)
    model = build_model(spec.model, spec.kind, spec.labels, spec.tokenizer)
    if spec.kind == "classification":
        rows = encode_classification(spec.tokenizer, spec.train_inputs, spec.train_targets,
                                     spec.model.max_length)
    else:
        rows = encode_causal_lm(spec.tokenizer, spec.train_inputs, spec.train_targets,
                                spec.model.max_length)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(epochs):
        for i in range(0, len(rows), 16):
            loss = model(**collate(rows[i:i + 16], spec.tokenizer.pad_token_id)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    folder = Path(tempfile.mkdtemp(prefix="quick-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    model.eval().save_pretrained(folder)
    spec.tokenizer.save_pretrained(folder)
    return folder


def log_record(i: int, **extra) -> dict:
    """An inference log record of request `r{i}` (a support router's answer), `extra` on top."""
    from monitoring.log import now
    from training.features import DESCRIPTORS

    return {"request_id": f"r{i}", "item": 0, "ts": now(), "tenant": "default",
            "application": "support", "model": "support-router", "model_version": "1",
            "variant": "champion", "stages": {"router": "support-router/1"},
            **dict.fromkeys(DESCRIPTORS, 1.0), "embedding": [0.0] * 4, "prediction": "billing",
            "confidence": 0.9, "latency_ms": 3.0, "outcome": "ok", **extra}


ROOT = Path(__file__).resolve().parents[1]  # the repository
MONITORING = ROOT / "monitoring"


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana" / "llmops.json").read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])] + [
        a["expr"] for a in dashboard["annotations"]["list"]]


def referenced_metrics(prefix: str) -> set[str]:
    """Metric names starting with `prefix` that the Grafana dashboard and the alert rules use."""
    import re

    import yaml

    rules = yaml.safe_load((MONITORING / "prometheus" / "alerts.yml").read_text())
    exprs = dashboard_exprs() + [r["expr"] for g in rules["groups"] for r in g["rules"]]
    return {m for e in exprs for m in re.findall(rf"\b{prefix}[a-z_]+\b", e)}


def exposed(name: str, lines: list[str]) -> bool:
    """Whether a scrape (exposition lines) has a sample of the metric."""
    return any(line.startswith((name + "{", name + " ")) for line in lines)


@pytest.fixture(scope="module")
def tiny_lm():
    """A 1-layer GPT-2 with random weights and the bundled encoder's tokenizer (no EOS token,
    so it generates until stopped)."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from serve_apps.model import LoadedModel
    from training.config import BUNDLED_ENCODER
    from training.models import resolve_source
    from training.refs import ModelIdentity

    tokenizer = AutoTokenizer.from_pretrained(resolve_source(BUNDLED_ENCODER))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=8192,
                                       n_embd=16, n_layer=1, n_head=2)).eval()
    return LoadedModel(ModelIdentity("lm", "1"), model, tokenizer, {"kind": "generator"})


def tiny_llama_folder(folder: Path, settings: Settings) -> Path:
    """A local Hugging Face folder with a tiny Llama (random weights) and a tokenizer trained on
    the rewriter's corpus: what a user's own base model folder looks like."""
    from training.config import ModelSpec
    from training.models import build_model, train_bpe_tokenizer
    from training.taskdata import build_task_data

    data = build_task_data(settings.training, "rewriter")
    tokenizer = train_bpe_tokenizer(list(data.train.text) + list(data.train.rewrite), 400)
    spec = ModelSpec(source="scratch", architecture=TINY_LLAMA)
    build_model(spec, "causal-lm", [], tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def lora_adapter(base_dir: Path, base: str, folder: Path, seed: int = 0, **lora) -> Path:
    """A PEFT LoRA adapter (on q/v, rank 4, `lora` on top) over the model in `base_dir`, random
    as `seed` draws it, recorded as trained on `base` as a fine-tune records it, and saved with
    the base's tokenizer in `folder`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", **lora))
    adapter.peft_config["default"].base_model_name_or_path = base
    adapter.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(folder)
    return folder
