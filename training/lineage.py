"""OpenLineage run events of the model lifecycle, through the `openlineage-python` client: each
fine-tune (the data it read, the model version it registered), each drift-triggered retrain (the
log window and replay set it assembled; the fine-tune is its child run), and each change of the
version a deployment serves (a promotion, rollback or swap). The inference log is both the
deployments' output and a retrain's input, so the graph closes the loop.

Datasets are named as the platform names them: model versions `models:/NAME/VERSION` in the
registry's namespace, deployments `APP/DEPLOYMENT` in `serve`, the inference log of a model in
the log's URI, generated data `DATASET/SCENARIO` in `generator`. Events go to a JSON-lines file
(default) or an OpenLineage HTTP endpoint (Marquez); a transport that fails is logged, never
fails the step it describes."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from training.config import LineageConfig
from training.errors import LLMOpsError
from training.refs import model_name, reference

PRODUCER = "https://github.com/llmops/llmops"
_ID_SPACE = uuid.UUID("6f1c7f5e-3a52-4d0e-9a8e-1f0c2b7d9e41")  # run ids of named runs
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dataset:
    """A dataset of an event: where (`namespace`), what (`name`), how many rows, and a line
    saying which part of it (a scenario and seed, a time window)."""

    namespace: str
    name: str
    rows: int | None = None
    description: str | None = None

    def to_dict(self) -> dict:
        return {"namespace": self.namespace, "name": self.name, "rows": self.rows,
                "description": self.description}

    @classmethod
    def from_dict(cls, d: dict) -> Dataset:
        return cls(d["namespace"], d["name"], d.get("rows"), d.get("description"))


TRAIN, RETRAIN, SERVE = "train", "retrain", "serve"  # the kinds of job


def job(kind: str, model: str) -> str:
    """A job's name: its kind and the model it is about (`train.support-router`)."""
    return f"{kind}.{model}"


def retrain_run(model: str, retrain_id: str) -> tuple[str, str]:
    """(job, run id) of a drift-triggered retrain: the parent of the fine-tune it submits."""
    return job(RETRAIN, model), run_id(retrain_id)


def model_version(tracking_uri: str, name: str, version: int | str) -> Dataset:
    return Dataset(tracking_uri, reference(name, version))


def deployment(app: str, name: str) -> Dataset:
    return Dataset("serve", f"{app}/{name}")


def inference_log(log_uri: str, model: str, rows: int | None = None,
                  description: str | None = None) -> Dataset:
    return Dataset(log_uri, model, rows, description)


def run_id(key: str) -> str:
    """The run id of a run named by the platform (a retrain id): the same after a restart."""
    return str(uuid.uuid5(_ID_SPACE, key))


@dataclass
class Run:
    """A run being recorded: add what it produced to `outputs` before it ends."""

    job: str
    id: str
    outputs: list[Dataset] = field(default_factory=list)


class Lineage:
    """Emits the platform's run events to the configured transport."""

    def __init__(self, config: LineageConfig, data_dir: Path):
        self.config = config
        self.file = Path(config.file) if config.file else Path(data_dir).resolve() / \
            "lineage" / "events.jsonl"
        self._client = None

    def client(self):
        if self._client is None:
            from openlineage.client import OpenLineageClient
            from openlineage.client.transport.file import FileConfig, FileTransport
            from openlineage.client.transport.http import HttpConfig, HttpTransport
            from openlineage.client.transport.http_common import DEFAULT_RETRY_CONFIG

            if self.config.transport == "http":
                transport = HttpTransport(HttpConfig(url=self.config.url, timeout=5.0, retry={
                    **DEFAULT_RETRY_CONFIG, "total": 2, "connect": 2, "read": 2}))
            else:
                self.file.parent.mkdir(parents=True, exist_ok=True)
                transport = FileTransport(FileConfig(log_file_path=str(self.file), append=True))
            self._client = OpenLineageClient(transport=transport)
        return self._client

    def emit(self, state: str, job: str, run: str, inputs: list[Dataset] = (),
             outputs: list[Dataset] = (), parent: tuple[str, str] | None = None,
             description: str | None = None, error: str | None = None) -> None:
        """One run event (`state` START, COMPLETE or FAIL); `parent` the (job, run id) this run
        belongs to."""
        if self.config.transport == "none":
            return
        from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, RunEvent, RunState
        from openlineage.client.event_v2 import Run as OLRun
        from openlineage.client.facet_v2 import (
            documentation_job,
            error_message_run,
            parent_run,
        )

        ns = self.config.namespace
        run_facets = {}
        if parent is not None:
            run_facets["parent"] = parent_run.ParentRunFacet(
                run=parent_run.Run(runId=parent[1]), job=parent_run.Job(namespace=ns,
                                                                         name=parent[0]))
        if error:
            run_facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(
                message=error[:2000], programmingLanguage="python")
        job_facets = {"documentation": documentation_job.DocumentationJobFacet(
            description=description)} if description else {}
        event = RunEvent(
            eventType=RunState[state], eventTime=datetime.now(UTC).isoformat(),
            run=OLRun(runId=run, facets=run_facets),
            job=Job(namespace=ns, name=job, facets=job_facets), producer=PRODUCER,
            inputs=[InputDataset(namespace=d.namespace, name=d.name, facets=_facets(d),
                                 inputFacets=_statistics(d, "input")) for d in inputs],
            outputs=[OutputDataset(namespace=d.namespace, name=d.name, facets=_facets(d),
                                   outputFacets=_statistics(d, "output")) for d in outputs])
        try:
            self.client().emit(event)
        except Exception as exc:  # lineage describes a step: it never fails it
            log.warning("lineage event %s %s not sent: %s", job, state, exc)

    def deployed(self, tracking_uri: str, ref: str, deployments: list[str], reason: str) -> None:
        """The pinned `ref` (models:/NAME/VERSION) now serves in `deployments`
        ("APP/DEPLOYMENT"): a promotion, rollback or swap, as one completed run."""
        from openlineage.client.uuid import generate_new_uuid

        self.emit("COMPLETE", job(SERVE, model_name(ref)), str(generate_new_uuid()),
                  [Dataset(tracking_uri, ref)],
                  [deployment(*d.split("/", 1)) for d in deployments], description=reason)

    @contextmanager
    def run(self, job: str, inputs: list[Dataset], parent: tuple[str, str] | None = None,
            description: str | None = None, key: str | None = None) -> Iterator[Run]:
        """START now, then COMPLETE with the run's outputs, or FAIL with the error."""
        from openlineage.client.uuid import generate_new_uuid

        current = Run(job, run_id(key) if key else str(generate_new_uuid()))
        self.emit("START", job, current.id, inputs, parent=parent, description=description)
        try:
            yield current
        except BaseException as exc:
            self.emit("FAIL", job, current.id, inputs, parent=parent,
                      error=f"{type(exc).__name__}: {exc}")
            raise
        self.emit("COMPLETE", job, current.id, inputs, current.outputs, parent=parent)

    def events(self) -> list[dict]:
        """Every event of the file transport, oldest first."""
        if self.config.transport == "http":
            raise LLMOpsError("lineage goes to an HTTP endpoint (registry.lineage.url): "
                              "read it there (Marquez's UI or API)")
        if not self.file.is_file():
            return []
        return [json.loads(line) for line in self.file.read_text().splitlines() if line.strip()]


def _facets(d: Dataset) -> dict:
    from openlineage.client.facet_v2 import documentation_dataset

    return {"documentation": documentation_dataset.DocumentationDatasetFacet(
        description=d.description)} if d.description else {}


def _statistics(d: Dataset, side: str) -> dict:
    """Its row count, as the input or output statistics facet."""
    from openlineage.client.facet_v2 import (
        input_statistics_input_dataset,
        output_statistics_output_dataset,
    )

    if d.rows is None:
        return {}
    if side == "input":
        return {"inputStatistics": input_statistics_input_dataset
                .InputStatisticsInputDatasetFacet(rowCount=d.rows)}
    return {"outputStatistics": output_statistics_output_dataset
            .OutputStatisticsOutputDatasetFacet(rowCount=d.rows)}


def chain(events: list[dict], ref: str, depth: int = 8) -> dict:
    """What the events say about the model version `ref` (models:/NAME/VERSION): the run that
    trained it (its inputs, and the retrain it belonged to), where it was deployed, and the
    same for the model versions it was trained from, up to `depth` generations."""
    def named(datasets) -> set[str]:
        return {d["name"] for d in datasets or []}

    def brief(datasets) -> list[dict]:
        out = []
        for d in datasets or []:
            stats = {**(d.get("inputFacets") or {}), **(d.get("outputFacets") or {})}
            rows = next((f.get("rowCount") for f in stats.values()), None)
            doc = (d.get("facets") or {}).get("documentation", {}).get("description")
            out.append(Dataset(d["namespace"], d["name"], rows, doc).to_dict())
        return out

    def runs(job_name: str) -> dict[str, list[dict]]:
        by_run: dict[str, list[dict]] = {}
        for e in events:
            if e["job"]["name"] == job_name:
                by_run.setdefault(e["run"]["runId"], []).append(e)
        return by_run

    def summary(evs: list[dict]) -> dict:
        start = next((e for e in evs if e["eventType"] == "START"), evs[0])
        end = evs[-1]
        doc = next((e["job"].get("facets", {}).get("documentation", {}).get("description")
                    for e in evs if e["job"].get("facets", {}).get("documentation")), None)
        error = end["run"].get("facets", {}).get("errorMessage", {}).get("message")
        return {"job": end["job"]["name"], "run": end["run"]["runId"], "state": end["eventType"],
                "started": start["eventTime"], "ended": end["eventTime"] if end is not start
                else None, "description": doc, "inputs": brief(start.get("inputs")),
                "outputs": brief(end.get("outputs")), **({"error": error} if error else {})}

    name = model_name(ref)
    out: dict = {"model": ref, "trained_by": None, "retrain": None, "deployed": []}
    for evs in runs(job(TRAIN, name)).values():
        if any(ref in named(e.get("outputs")) for e in evs):
            out["trained_by"] = summary(evs)
            parent = next((e["run"]["facets"]["parent"] for e in evs
                           if e["run"].get("facets", {}).get("parent")), None)
            if parent:
                mine = runs(parent["job"]["name"]).get(parent["run"]["runId"])
                out["retrain"] = summary(mine) if mine else {"job": parent["job"]["name"],
                                                             "run": parent["run"]["runId"]}
    for evs in runs(job(SERVE, name)).values():
        if any(ref in named(e.get("inputs")) for e in evs):
            s = summary(evs)
            out["deployed"].append({"at": s["ended"] or s["started"], "why": s["description"],
                                    "deployments": [d["name"] for d in s["outputs"]]})
    sources = [d["name"] for d in (out["trained_by"] or {}).get("inputs", [])
               if d["name"].startswith("models:/") and d["name"].count("/") == 2]
    out["from"] = [chain(events, src, depth - 1) for src in sources] if depth > 1 else []
    return out
