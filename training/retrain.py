"""The training set of a retrain on drift, and the evaluation gate that decides whether the
retrained challenger may replace the champion.

Training rows: the labelled recent requests (texts from the inference log, labels from feedback;
the part not held out, repeated `recent_repeats` times, fewer as they age, less the labels their
own phrasing's labels call a mistake: `training/noise.py`) plus a replay sample
of the champion's own training rows, so the new version learns the new traffic without
forgetting the old. Where the feedback contradicts replayed or golden rows (a concept shift),
the replayed rows take the label their region moved to (or are retired) and the golden rows
are retired (`training/contradiction.py`; `training/teacher.py` gives the relabelling a second
opinion).
The gate scores champion and challenger on the same two holdouts: the held-out labelled recent
requests, and the champion's golden set less its retired rows, which the new version keeps as
its own (a versioned golden set).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime

import numpy as np
import pandas as pd

from training.config import GateConfig, RetrainConfig
from training.contradiction import MIN_SIMILARITY, Contradictions, embed, nearest_rows, resolve
from training.errors import InvalidData
from training.evaluate import GENERATION_METRIC, score
from training.noise import label_mistakes
from training.teacher import Judge, decidable, refine

RECENT, ORIGINAL = "recent", "original"
PRE_DRIFT = "pre-drift"  # the labelled requests from before a drift's onset
PROVENANCE = ("intent", "scenario")


def retraining_data(recent: pd.DataFrame, reference: pd.DataFrame, golden: pd.DataFrame,
                    config: RetrainConfig, seed: int = 0,
                    teacher: Callable[[pd.DataFrame], Judge | None] | None = None,
                    onset: datetime | None = None):
    """A `TaskData` (`scenario` "retrain") with holdouts `recent` and `original` (`retraining_plan`,
    then its `judge(teacher)` and `data`)."""
    plan = retraining_plan(recent, reference, golden, config, seed, onset)
    return plan.data(plan.judge(teacher) if teacher else None)


def retraining_plan(recent: pd.DataFrame, reference: pd.DataFrame, golden: pd.DataFrame,
                    config: RetrainConfig, seed: int = 0, onset: datetime | None = None) -> Plan:
    """The retraining set up to the teacher's second opinion (`Plan`). `onset` (when the drift
    began): the labels of requests before it are checked against those since, as the replay
    is (a concept shift supersedes them: they would outvote the new concept where it moved),
    only the labels since count towards `min_labelled` and the holdout, and the requests since
    are the traffic the version is retrained to serve (`served`, `_served`)."""
    unlabelled, share = _unlabelled(recent, onset, config.served_rows)
    labelled = recent.dropna(subset=["text", "label"]).reset_index(drop=True)
    rows = labelled[["text", "label"]].assign(_copies=copies(labelled, config))
    answers = labelled.prediction.astype(str).to_numpy() if "prediction" in labelled else None
    before = (pd.to_datetime(labelled.ts, utc=True) < pd.to_datetime(onset, utc=True)).to_numpy() \
        if onset is not None and "ts" in labelled else np.zeros(len(rows), bool)
    earlier, recent = rows[before], rows[~before].reset_index(drop=True)
    if len(recent) < config.min_labelled:
        raise InvalidData(f"{len(recent)} labelled recent requests"
                          + (f" since the drift began ({onset:%Y-%m-%d %H:%M:%S})" if onset
                             else "") + f"; a retrain needs {config.min_labelled} "
                          "(send feedback labels: POST /v1/feedback)")
    # the replay keeps its provenance (`intent`, `scenario`) where the reference has it: the
    # support pipeline picks its resolved tickets from the serving router's training data
    kept = ["text", "label"] + [c for c in PROVENANCE if c in reference.columns]
    replay = reference[kept].sample(n=min(config.replay_rows, len(reference)), random_state=seed)
    order = np.random.default_rng(seed).permutation(len(recent))
    n_holdout = max(1, round(len(recent) * config.recent_holdout_share))
    if config.resolve_contradictions and answers is not None:
        order = _evidence_last(recent, answers[~before], order, n_holdout, replay)
    holdout, learn = recent.iloc[order[:n_holdout]], recent.iloc[order[n_holdout:]]
    notes = {}
    if config.drop_label_mistakes:
        mistaken, mistakes = label_mistakes(learn, holdout)
        learn, notes = learn[~mistaken], {"label_mistakes": mistakes} if mistakes else {}
    tables = {"replay": replay, "golden": golden, PRE_DRIFT: earlier}
    resolved, found = tables, Contradictions()
    if config.resolve_contradictions:
        resolved, found = resolve(learn[["text", "label"]], tables, relabel={"replay"}
                                  if config.contradicted_replay == "relabel" else (),
                                  traffic=() if unlabelled is None else unlabelled.text)
        notes |= {k: v for k, v in (("suspected_moves", found.suspected),
                                    ("thin_moves", found.thin)) if v}
        if found:
            notes |= {"contradictions": found.to_dict(), "concept_shift": found.summary()}
        else:
            resolved = tables
    notes["labelled"] = len(recent)  # since the onset
    return Plan(config, seed, learn, holdout, tables, resolved, found, notes,
                _served(unlabelled, holdout, share, config.served_rows, seed))


@dataclass
class Plan:
    """A classifier's retraining set decided but for the teacher's second opinion on the
    relabelled replay: `notes` say what the contradiction check found (the controller waits
    for labels on them), `judge(teacher)` fits the teacher, and `data(judged)` builds the set
    without checking again."""

    config: RetrainConfig
    seed: int
    learn: pd.DataFrame  # the labelled rows learnt from
    holdout: pd.DataFrame
    tables: dict[str, pd.DataFrame]  # replay, golden and pre-drift rows as they were
    resolved: dict[str, pd.DataFrame]  # less (or relabelled where) the labels contradict them
    found: Contradictions
    notes: dict
    served: pd.DataFrame | None

    def judge(self, teacher: Callable[[pd.DataFrame], Judge | None]
              ) -> tuple[Judge, list[str]] | None:
        """`teacher` (the labelled rows learnt from -> a judge, `training/teacher.fit`) fitted
        on this plan's rows where it may decide something (a fine-tune, not a lookup), with the
        labels it learnt; else None. A plan of the same drift built later, on the labels that
        came while it was fitted, may take it (`data`)."""
        labels = list(self.learn.label.astype(str))
        if not (self.found and self.config.contradicted_replay == "relabel"
                and decidable(self.found.pairs, labels)):
            return None
        judge = teacher(self.learn[["text", "label"]])
        return None if judge is None else (judge, labels)

    def data(self, judged: tuple[Judge, list[str]] | None = None):
        """The `TaskData`; `judged` (`judge`) gives a second opinion on the replay rows a
        concept shift relabelled, between labels it learnt."""
        from training.taskdata import TaskData

        config, tables, notes = self.config, dict(self.resolved), dict(self.notes)
        if judged and self.found:  # (`judge` fits none where the replay is retired)
            relabelled = tables["replay"]
            before = self.tables["replay"].loc[relabelled.index]  # less the rows it retired
            refined, n = refine(list(before.text), list(before.label.astype(str)),
                                list(relabelled.label), self.found.pairs, *judged, self.learn)
            tables["replay"] = relabelled.assign(label=refined)
            notes["teacher_relabelled"] = n
        # where the concept moved, recent labels judge: a golden row of a moved label that was
        # not found contradicted may still be, so the no-forgetting check skips them
        golden = tables["golden"]
        original = golden[~golden.label.astype(str).isin(self.found.sources)]
        train, validation = _mix(tables["replay"], pd.concat(
            [self.learn.assign(**{RECENT: True}), tables[PRE_DRIFT]]), config, self.seed)
        return TaskData(train=train, validation=validation,
                        holdouts={RECENT: self.holdout[["text", "label"]].reset_index(drop=True),
                                  ORIGINAL: original[["text", "label"]].reset_index(drop=True)},
                        scenario="retrain", golden=golden.reset_index(drop=True), notes=notes,
                        served=self.served)


def generation_retraining_data(recent: pd.DataFrame, reference: pd.DataFrame,
                               golden: pd.DataFrame, config: RetrainConfig, seed: int = 0,
                               onset: datetime | None = None):
    """A generator's `TaskData` (`scenario` "retrain"): its answers' corrections since `onset`
    (`text` -> `rewrite`; the part not held out, repeated by recency as a classifier's labels
    are) beside a replay of the champion's training rows; holdouts `recent` (the corrections
    held out) and `original` (its golden set). A correction is the answer wanted, so nothing
    contradicts it the way a moved label does: the latest correction of a request wins."""
    from training.taskdata import TaskData

    corrected = recent.dropna(subset=["text", "correction"])
    if onset is not None and "ts" in corrected:
        corrected = corrected[pd.to_datetime(corrected.ts, utc=True)
                              >= pd.to_datetime(onset, utc=True)]
    if len(corrected) < config.min_labelled:
        raise InvalidData(f"{len(corrected)} corrected answers"
                          + (f" since the drift began ({onset:%Y-%m-%d %H:%M:%S})" if onset
                             else "") + f"; a retrain needs {config.min_labelled} (send "
                          "corrections: POST /v1/feedback with `correction`)")
    rows = corrected.assign(rewrite=corrected.correction).reset_index(drop=True)
    order = np.random.default_rng(seed).permutation(len(rows))
    n_holdout = max(1, round(len(rows) * config.recent_holdout_share))
    holdout, learn = rows.iloc[order[:n_holdout]], rows.iloc[order[n_holdout:]]
    replay = reference[["text", "rewrite"]].sample(n=min(config.replay_rows, len(reference)),
                                                   random_state=seed)
    train, validation = _mix(replay, learn[["text", "rewrite"]].assign(
        _copies=copies(learn, config), **{RECENT: True}), config, seed)
    pairs = ["text", "rewrite"]
    return TaskData(train=train, validation=validation,
                    holdouts={RECENT: holdout[pairs].reset_index(drop=True),
                              ORIGINAL: golden[pairs].reset_index(drop=True)},
                    scenario="retrain", golden=golden.reset_index(drop=True),
                    notes={"labelled": len(rows)})


def _unlabelled(recent: pd.DataFrame, onset: datetime | None, n: int
                ) -> tuple[pd.DataFrame | None, float]:
    """The newest `n` unlabelled requests (their texts) since the drift's `onset`, and the
    labelled share of the requests since. The newest: the onset is a window's start, and the
    first drifted window began in clean traffic (a random draw since it held a fifth of clean
    rows, and their descriptors read as drift). None without an onset (a manual retrain)."""
    if onset is None or not n or not {"ts", "label", "text"} <= set(recent.columns):
        return None, 0.0
    ts = pd.to_datetime(recent.ts, utc=True)
    since = (ts >= pd.to_datetime(onset, utc=True)) & recent.text.notna()
    rows = recent[since & recent.label.isna()]
    if rows.empty:
        return None, 0.0
    newest = rows.assign(_ts=ts).sort_values("_ts", kind="stable").tail(n)
    return newest[["text"]].reset_index(drop=True), 1 - len(rows) / int(since.sum())


def _served(unlabelled: pd.DataFrame | None, holdout: pd.DataFrame, share: float, n: int,
            seed: int) -> pd.DataFrame | None:
    """What the retrained version will answer, never trained on, profiled as its drift
    reference (`training/job.py`): `unlabelled` requests with held-out labelled ones in the
    labelled `share` of the traffic since the onset (up to `n` rows, fewer where the holdout is
    short of that share). Held-out rows alone are mostly replay: against them a new product's
    traffic read as drift again once its retrained version served it. Unlabelled rows alone
    leave out the requests the queue picked for a label, the champion's doubts: a new product's
    retrained version was less sure of all its traffic than of its unlabelled requests (mean
    confidence 0.968, 1.3% under 0.9, against 0.972 and 0.1%), and read as drift again."""
    if unlabelled is None:
        return None
    want = round(n * share)
    k = min(len(holdout), want)
    u = min(len(unlabelled), n - k if k == want else round(k * (1 - share) / share))
    return pd.concat([unlabelled.tail(u), holdout[["text"]].sample(n=k, random_state=seed)],
                     ignore_index=True)


def _evidence_last(recent: pd.DataFrame, answers: np.ndarray, order: np.ndarray, n: int,
                   replay: pd.DataFrame) -> np.ndarray:
    """`order` with `n` rows to hold out first: the labels that contradict the champion's
    answer (`answers`) up to their share of all (the gate must see the move to pass the
    challenger: a holdout of only confirming labels rejected a right one, +0.004), each next
    from the move with the most learnt labels left behind it, the other labels in `order`.
    Held out, a label moves nothing, and the contradiction check relabels a replay row from two
    labels or more among whose nearest rows it is (`nearest_rows`), retires it on one: a label
    is held out only where half the replay rows it votes to move keep two votes or more (its
    phrasing's; the edges of its nearest differ from label to label), and each label of its
    move near it (the same answer and label, within cosine `MIN_SIMILARITY`) keeps two learnt.
    Near labels of other phrasings are no stand-in for votes: a password phrasing's two labels,
    both held out for the password labels near them, left its 7 replay rows `account`. A label
    whose closest other label (within `MIN_SIMILARITY`) says another is never held out: its
    phrasing's labels disagree, and held out it left an annotator's mistake to decide it."""
    labels = recent.label.astype(str).to_numpy()
    contradicts = labels != answers
    moved = np.flatnonzero(contradicts)
    if not len(moved):
        return order
    every = embed(list(recent.text))
    e, said, was = every[moved], labels[moved], answers[moved]
    same = said[:, None] == said[None, :]
    near = (e @ e.T >= MIN_SIMILARITY) & same & (was[:, None] == was[None, :])
    closest = e @ every.T
    closest[np.arange(len(moved)), moved] = -1
    other = closest.argmax(axis=1)  # each one's closest other label, any answer
    torn = (closest[np.arange(len(moved)), other] >= MIN_SIMILARITY) & (labels[other] != said)
    replayed = replay.label.astype(str).to_numpy()
    votes = np.zeros((len(moved), len(replay)), bool)  # label x replay row it votes to move
    for j, rows in enumerate(nearest_rows(e @ embed(list(replay.text)).T)):
        votes[j, rows[replayed[rows] != said[j]]] = True
    rank = np.empty(len(recent), int)
    rank[order] = np.arange(len(order))
    count, learnt, held = near.sum(axis=1), np.ones(len(moved), bool), []
    most = np.iinfo(int).max
    for _ in range(min(len(moved), round(n * len(moved) / len(recent)))):
        left = np.flatnonzero(learnt & ~torn)
        if not len(left):
            break
        # each one's support: the fewest learnt labels any label near it would keep, and the
        # votes half the rows it votes for keep at least
        row_votes = (same[left] & learnt).astype(int) @ votes
        support = np.minimum(np.where(near[left] & learnt, count, most).min(axis=1), [
            np.percentile(v[on], 50, method="lower") if on.any() else most
            for v, on in zip(row_votes, votes[left])])
        top = np.lexsort((rank[moved[left]], -support))[0]
        if support[top] < 3:  # it would leave a move under two labels learnt
            break
        best = left[top]
        held.append(moved[best])
        learnt[best] = False
        count[near[best]] -= 1
    others = [x for x in order if not contradicts[x]][:n - len(held)]
    first = set(held) | set(others)
    return np.array([x for x in order if x in first] + [x for x in order if x not in first],
                    dtype=int)


def calibration_rows(data, share: float | None) -> tuple[pd.DataFrame, np.ndarray | None]:
    """The rows a version is calibrated on (`training/calibration.py`) and their weights: its
    validation rows; a retrain's also its recent holdout, the labelled requests since the drift
    (in validation, column `recent`) together weighing `share` of them (weighted conformal:
    after a drift the version serves traffic like those, and calibrated on the replay alone it
    answered 0.79-0.84 of a new product's tickets, right on every one). Never trained on;
    temperature and conformal sets change no answer's label, so the gate reads the holdout as
    before."""
    if data.scenario != "retrain" or share is None or RECENT not in data.holdouts:
        return data.validation, None
    rows = pd.concat([data.validation, data.holdouts[RECENT].assign(**{RECENT: True})],
                     ignore_index=True)
    recent = rows[RECENT].eq(True).to_numpy()
    if recent.all() or not recent.any():
        return rows, None
    return rows, np.where(recent, share / recent.sum(), (1 - share) / (~recent).sum())


def copies(recent: pd.DataFrame, config: RetrainConfig) -> np.ndarray:
    """Each labelled recent row's repeats in the training set: `recent_repeats` for the newest
    requests, halving with each `recency_half_life_s` their request (`ts`) is older (where the
    feedback disagrees with itself, the concept now outweighs what it was), never under once;
    all alike without request times or a half-life."""
    if config.recency_half_life_s is None or "ts" not in recent or recent.empty:
        return np.full(len(recent), config.recent_repeats)
    ts = pd.to_datetime(recent.ts, utc=True)
    age = (ts.max() - ts).dt.total_seconds().to_numpy()
    return np.maximum(1, np.rint(config.recent_repeats * 0.5 ** (age / config.recency_half_life_s))
                      ).astype(int)


def _mix(replay: pd.DataFrame, learn: pd.DataFrame, config: RetrainConfig, seed: int
         ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The training and validation rows of the replay and the labelled rows learnt from (each
    with its `_copies`). Validation is drawn by text before the repeats, so no text sits on both
    sides, neither a row's copies nor a text sent twice (validation calibrates the version's
    confidence and is its drift reference): a validation text's other rows are not trained on."""
    rows = pd.concat([replay.assign(_copies=1), learn], ignore_index=True).sample(
        frac=1.0, random_state=seed)
    n_val = min(config.validation_rows, int(rows._copies.sum()) // 5)
    validation = rows.drop_duplicates("text").iloc[:n_val]
    fit = rows[~rows.text.isin(validation.text)]
    train = fit.loc[fit.index.repeat(fit._copies)].sample(frac=1.0, random_state=seed)
    return (train.drop(columns="_copies").reset_index(drop=True),
            validation.drop(columns="_copies").reset_index(drop=True))



@dataclass
class GateResult:
    promote: bool
    reason: str
    metric: str
    champion: dict[str, float]
    challenger: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)


def gate(champion: dict[str, float], challenger: dict[str, float], config: GateConfig,
         metric: str | None = None) -> GateResult:
    """Scores per holdout (`recent`, `original`) of `metric` (the configured one) -> the
    decision and why, in one line."""
    metric = metric or config.metric
    gain = challenger[RECENT] - champion[RECENT]
    loss = champion[ORIGINAL] - challenger[ORIGINAL]
    if gain < config.margin:
        reason = (f"{metric} on recent traffic {challenger[RECENT]:.4f} vs the champion's "
                  f"{champion[RECENT]:.4f}: a gain of {gain:+.4f}, below the margin "
                  f"{config.margin}")
    elif loss > config.tolerance:
        reason = (f"{metric} on the original holdout fell {loss:.4f} (from "
                  f"{champion[ORIGINAL]:.4f} to {challenger[ORIGINAL]:.4f}), over the "
                  f"tolerance {config.tolerance}")
    else:
        reason = (f"{metric} on recent traffic {gain:+.4f} (>= {config.margin}), on the "
                  f"original holdout {-loss:+.4f} (tolerance {config.tolerance})")
    return GateResult(gain >= config.margin and loss <= config.tolerance, reason, metric,
                      {k: round(v, 4) for k, v in champion.items()},
                      {k: round(v, 4) for k, v in challenger.items()})


def fallback_gate(champion: dict[str, float], student: dict[str, float], metric: str,
                  margin: float) -> GateResult:
    """The gate of a distilled student (the peak fallback): on every holdout it may lose at
    most `margin` of `metric` to the champion it learned from; it need not beat it."""
    losses = {h: champion[h] - student[h] for h in champion}
    worst = max(losses, key=losses.get)
    verdict = "within" if losses[worst] <= margin else "over"
    reason = (f"{metric}: the student's largest loss to the champion is {losses[worst]:+.4f} "
              f"(on {worst}: {student[worst]:.4f} vs {champion[worst]:.4f}), {verdict} the "
              f"margin {margin}")
    return GateResult(losses[worst] <= margin, reason, metric,
                      {k: round(v, 4) for k, v in champion.items()},
                      {k: round(v, 4) for k, v in student.items()})


def gate_metric(kind: str, config: GateConfig) -> str:
    """What a gate compares: classifiers the configured metric, generators `GENERATION_METRIC`."""
    return config.metric if kind == "classification" else GENERATION_METRIC


def evaluate_pair(champion_model, challenger_model, holdouts: dict[str, pd.DataFrame],
                  config: GateConfig) -> GateResult:
    """Both models scored on the same holdouts, then `gate` by `gate_metric`."""
    metric = gate_metric(champion_model.meta["kind"], config)
    return gate({name: score(champion_model, df, metric) for name, df in holdouts.items()},
                {name: score(challenger_model, df, metric) for name, df in holdouts.items()},
                config, metric)
