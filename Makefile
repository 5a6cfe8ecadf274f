# make demo: set up and run the main job.  make test: set up and run the tests.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
LLMOPS  = $(VENV)/bin/llmops
STAMP   = $(VENV)/.installed
SUDO    = $(shell [ "$$(id -u)" = 0 ] || echo sudo)

export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
export MLFLOW_DISABLE_TELEMETRY = true
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER = 0
export TOKENIZERS_PARALLELISM = false
export RAY_AUTH_MODE = disabled
export PYTHONUNBUFFERED = 1
# the install compiles no module of any package (torch, transformers and ray ship thousands never
# imported here); Python compiles what is imported on first use and keeps it
unexport PYTHONDONTWRITEBYTECODE
# (the local head binds the dashboard to 127.0.0.1; see cluster.yaml for a shared cluster)

.PHONY: install demo test lint bench bench-env manifests clean

# uv installs the pinned set about 8x faster than pip (docs/performance.md); it reads no pip.conf,
# so pip's configured sources and constraints are handed over; pip stays the fallback
define PIP_SOURCES
import os, shlex, subprocess, sys
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
flags = ["--index-strategy", "unsafe-best-match"]  # as pip: the best version over every index
for key, _, value in (line.partition("=") for line in out.splitlines()):
    name = key.rsplit(".", 1)[-1]
    for v in value.strip("'\"").split():
        local = v.removeprefix("file://")
        if name in ("index-url", "extra-index-url", "find-links", "constraint") and (
                "://" in local or os.path.exists(local)):
            flags += [f"--{name}", v]
print(shlex.join(flags))
endef
export PIP_SOURCES

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet uv==0.13.8 && \
	  $(VENV)/bin/uv pip install --quiet --python $(PY) $$($(PY) -c "$$PIP_SOURCES") -e '.[dev]' \
	  || $(PY) -m pip install --quiet --no-compile --upgrade-strategy only-if-needed -e '.[dev]'
	@# promtool (Debian's prometheus package) runs the alert rules' unit tests
	command -v promtool >/dev/null || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  $(SUDO) apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
	@# DeepSpeed compiles its CPU communication op on first use (about 50 s): once, here
	$(PY) -c "from deepspeed.accelerator import get_accelerator as a; \
	  a().create_op_builder('ShareMemCommBuilder').load()" >/dev/null 2>&1
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(LLMOPS) demo
	@echo "the platform is still up: llmops status, llmops controller status, llmops down"

# The linter, then the tests on the session's Ray, then (in a process of their own) the ones that
# start Ray clusters of their own: several nodes, the fake autoscaler, the GPU smoke test.
# (Two sessions side by side, each on a Ray of its own, took longer on 2 cores: docs/testing.md)
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -m "not own_ray"
	$(PY) -m pytest -m own_ray

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The KubeRay manifests, generated from cluster.yaml and cluster/config/llmops.yaml
manifests: $(STAMP)
	$(LLMOPS) kuberay

bench: $(STAMP)
	$(PY) bench/train.py --json
	$(PY) bench/serve.py --json
	$(PY) bench/swap.py --json
	$(PY) bench/drift.py --json
	$(PY) bench/governance.py --json
	$(PY) bench/soak.py --json   # 30 minutes of steady mixed load: memory slope per process
	$(PY) bench/loop.py --json   # on the demo's stack: trains the champions if absent

# The BentoML peer of bench/serve.py. BentoML pins another OpenTelemetry than Ray and MLflow,
# so it gets an environment of its own that sees the platform's packages behind its own.
bench-env: $(STAMP)
	test -x .venv-bento/bin/python || $(PYTHON) -m venv .venv-bento
	echo "import site; site.addsitedir('$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')')" \
	  > "$$(.venv-bento/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/llmops.pth"
	.venv-bento/bin/python -m pip install --quiet bentoml==1.4.40

clean:
	$(VENV)/bin/ray stop --force >/dev/null 2>&1 || true
	rm -rf .llmops
