"""Ground-truth labels from human review, checked against the inference log: the request must
have been logged and the label must belong to the label set of the model that answered it.
Accepted labels join the log by request id (`monitoring.log.with_feedback`) for drift checks
and retraining. `pending` is the queue of answers that wait for a label, the most useful
first: where the loop asks for labels instead of a fixed random share."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from datetime import datetime
from typing import NamedTuple

import numpy as np
import pandas as pd

from monitoring.config import LabelQueueConfig
from monitoring.log import FEEDBACK, INFERENCE, SHADOW, by_generator, read, with_feedback
from training.errors import LLMOpsError

# labelled requests before an accuracy counts: a drift window's, or each side of a canary's
MIN_LABELS = 30
# confidently wrong answers (beyond three standard errors of chance) before the label queue
# asks about their neighbours
MIN_CONTRADICTIONS = 3
# the neighbours (in its group) whose mean similarity makes an answer typical (`_typical`)
TYPICAL_NEIGHBOURS = 20


class UnknownRequest(LLMOpsError):
    """Feedback for a request id the inference log does not hold (yet: logs are written about
    once per `flush_interval_s`)."""

    status = 404


class InvalidLabel(LLMOpsError):
    status = 422


class Label(NamedTuple):
    """One reviewer's label for text `item` of `request_id`, given by `tenant`: a label for a
    classifier's answer, or the corrected text (`correction`) of a generator's."""

    request_id: str
    item: int
    label: str | None
    tenant: str
    correction: str | None = None


def feedback_rows(log_uri: str, labels_of, labels: Sequence[Label]) -> list[dict | LLMOpsError]:
    """The feedback record of each label, or its typed error in its place: one read of the log
    checks a whole batch (a reviewing team sends labels in bursts; the log is many segments).
    `labels_of(model, version)` returns a model version's label set. Only a label's own
    tenant's requests can be labelled: another tenant's request is as unknown as one never
    made."""
    logged = read(log_uri, INFERENCE, request_ids={lab.request_id for lab in labels})
    answers: dict[tuple, dict] = {}  # the latest record per item and kind of answer
    for r, text in zip(logged.itertuples(index=False), by_generator(logged)):
        answers.setdefault((r.request_id, r.item, r.tenant), {})[bool(text)] = r
    return [_checked(_answer(answers.get((lab.request_id, lab.item, lab.tenant), {}), lab),
                     lab, labels_of) for lab in labels]


def _answer(kinds: dict, lab: Label):
    """The answer `lab` is for: a correction's is the one given as text (a generator's), a
    label's the other (a moderated post rewritten has both); else whichever there is, for
    `_checked` to say what it takes."""
    wanted = lab.correction is not None
    return kinds.get(wanted, kinds.get(not wanted))


def feedback_row(log_uri: str, labels_of, request_id: str, item: int, label: str,
                 tenant: str) -> dict:
    """The feedback record for one label, or its typed error raised."""
    [row] = feedback_rows(log_uri, labels_of, [Label(request_id, item, label, tenant)])
    if isinstance(row, LLMOpsError):
        raise row
    return row


def _checked(record, lab: Label, labels_of) -> dict | LLMOpsError:
    if record is None:
        return UnknownRequest(f"no logged request {lab.request_id!r} with item {lab.item}; "
                              f"feedback can only label answered requests")
    if record.model is None or record.outcome != "ok":
        return InvalidLabel(f"request {lab.request_id!r} did not get a prediction to label")
    labels = labels_of(record.model, record.model_version)
    row = {"request_id": lab.request_id, "item": lab.item, "tenant": record.tenant}
    if not labels:  # a generator: its answer is text, corrected as text
        if lab.correction is None:
            return InvalidLabel(f"{record.model} answers with text, not a label: send the "
                                f"answer as it should have been, as `correction`")
        return row | {"label": None, "correction": lab.correction}
    if lab.correction is not None:
        return InvalidLabel(f"{record.model} answers with a label: send one of "
                            f"{', '.join(labels)} as `label`, not a correction")
    if lab.label not in labels:
        return InvalidLabel(f"label {lab.label!r} is not one of {record.model}'s labels: "
                            f"{', '.join(labels)}")
    return row | {"label": lab.label, "correction": None}


def correction_scores(rows: pd.DataFrame) -> np.ndarray:
    """Each corrected generator answer's token-level F1 against its correction (`output` and
    `correction` columns; none without them)."""
    from training.evaluate import token_f1s  # sklearn: not on the feedback app's path

    if not {"correction", "output"} <= set(rows.columns):
        return np.array([])
    corrected = rows[rows.correction.notna() & rows.output.notna()]
    return token_f1s(corrected.output, corrected.correction)


def feedback_scores(rows: pd.DataFrame) -> np.ndarray:
    """How right each answer with feedback was: a classifier's 1 or 0 against its label, a
    generator's token-level F1 against its correction."""
    labelled = rows[rows.label.notna()] if "label" in rows else rows.iloc[:0]
    return np.concatenate([(labelled.prediction == labelled.label).to_numpy(float),
                           correction_scores(rows)])


def pending(log_uri: str, tenant: str, limit: int, config: LabelQueueConfig,
            model: str | None = None, since: datetime | None = None,
            drift_onset: Callable[[str, str], datetime | None] | None = None,
            held: Collection[tuple[str, int, str]] = frozenset()) -> list[dict]:
    """The answers of `tenant` (of `model`, if given) that wait for a label (a classifier's) or
    a correction (a generator's: its `output`, ranked as a classifier's answer is, by its
    confidence, with its finish reason as its label), the most useful first: where the
    champion and a shadowing challenger disagree; then, once labels show
    the model confidently wrong more often than its confidence allows (a concept shift: the
    moved region is answered with confidence, so doubt never points there), the answers whose
    nearest labelled one is such a mistake, spread over that region (`contradiction`), in turn
    with a second label beside each such mistake no other label backs (`second`); then the
    least confident (calibrated confidence: a conformal set of several labels comes first);
    taken in turn from each predicted label so no label is starved. `explore` of the page is
    spread over the rest (`_cover`; half of it over the labels of the confident mistakes, once
    there are such, `_moved`): a new product's intents answered with confidence, or a moved
    region no label has reached yet, are asked about without waiting for doubt. Each item
    says why it was chosen. `since` limits the answers listed, not the labelled ones that point
    the queue; `drift_onset(model, version)` those (`_current`). The answers `held` (request
    id, item, model: leased to another reviewer) are left out, and counted as known where the
    rest is spread."""
    log = read(log_uri, INFERENCE, last=config.window, shadow=True, tenant=tenant,
               outcome="ok", model=model)
    # a classifier's answers (a label and its posterior) and a generator's (its text)
    log = log[log.prediction.notna() & (log.posterior.notna() | log.output.notna())]
    if log.empty or limit < 1:
        return []
    log = log.assign(said=log.output.where(log.output.notna(), log.prediction))  # judged
    shadow = log[log.variant == SHADOW].set_index(["request_id", "item", "model"]).said
    answers = with_feedback(
        log[log.variant != SHADOW].drop_duplicates(["request_id", "item", "model"], keep="last"),
        read(log_uri, FEEDBACK, request_ids=set(log.request_id), tenant=tenant))
    given = answers.label.notna() | answers.correction.notna()
    labelled, answers = _current(answers[given], drift_onset), answers[~given]
    if since is not None:
        at = pd.Timestamp(since)
        answers = answers[answers.ts >= (at if at.tzinfo else at.tz_localize("UTC"))]
    is_held = np.array([k in held for k in zip(answers.request_id, answers.item, answers.model)],
                       dtype=bool)
    leased, answers = answers[is_held], answers[~is_held]
    if answers.empty:  # all labelled or leased, or none since: nothing to rank
        return []
    other = [shadow.get(k) for k in zip(answers.request_id, answers.item, answers.model)]
    disagree = np.array([o is not None and o != p for o, p in zip(other, answers.said)])
    wrong = confident_mistakes(labelled, config.confident)
    similar, seconds = _near(answers, labelled, wrong)
    near = ~disagree & ~np.isnan(similar)
    second = near & ~np.isnan(seconds)  # a disagreement keeps its reason
    # a mistake's second opinion and the spread over its region take turns
    spread = np.where(second, 2 * seconds, 2 * _spread(answers, labelled, near, limit) + 1)
    answers = answers.assign(rank=np.where(disagree, 0, np.where(near, 1, 2)),
                             order=np.where(near, spread, answers.confidence),
                             reason=np.where(disagree, "disagreement", np.where(
                                 second, "second", np.where(near, "contradiction", "uncertain"))))
    ranked = answers.sort_values(["rank", "order"])
    explore = round(min(limit, len(ranked)) * config.explore)
    useful = interleave(ranked, limit - explore)
    rest = ranked.drop(index=useful.index)
    moved = _cover(_moved(rest, wrong), pd.concat([labelled, leased, useful]), -(-explore // 2))
    drawn = pd.concat([moved, _cover(rest.drop(index=moved.index),
                                     pd.concat([labelled, leased, useful, moved]),
                                     explore - len(moved))]).assign(reason="coverage")
    page = pd.concat([useful, drawn])
    return [{"request_id": r.request_id, "item": int(r.item), "ts": r.ts.isoformat(),
             "model": r.model, "model_version": r.model_version, "prediction": r.prediction,
             "confidence": None if pd.isna(r.confidence) else round(float(r.confidence), 4),
             "reason": r.reason, "text": r.text, "output": r.output}
            for r in page.itertuples(index=False)]


def _current(labelled: pd.DataFrame,
             drift_onset: Callable[[str, str], datetime | None] | None) -> pd.DataFrame:
    """The labelled answers that describe the traffic now: of a model version whose drift the
    loop is handling (`drift_onset`, `training.registry.Registry.drift_onset`), those answered
    since the drift's onset. Earlier labels describe the traffic before it, and the retrain
    learns from none of them: counted, they kept the queue from asking about a concept
    shift's phrasings labelled before the shift (an offline replay with an earlier run's
    labels in the window left moved phrasings of 0.6-1% of the tickets with no label, none
    without them; docs/closed-loop.md)."""
    if drift_onset is None or labelled.empty:
        return labelled
    keep = np.ones(len(labelled), bool)
    for (name, version), rows in labelled.groupby(["model", "model_version"]).indices.items():
        onset = drift_onset(name, str(version))
        if onset is not None:
            keep[rows] = (labelled.ts.iloc[rows] >= pd.Timestamp(onset)).to_numpy()
    return labelled[keep]


def confident_mistakes(labelled: pd.DataFrame, confident: float) -> pd.DataFrame:
    """The labelled answers at `confident` or more that the label contradicts, when there are
    more of them than their confidence allows beyond three standard errors of chance (else
    none: the few a calibrated model gets wrong at any confidence are not a region)."""
    sure = labelled[labelled.confidence >= confident]
    wrong = sure[sure.prediction != sure.label]
    c = sure.confidence.to_numpy(float)
    expected, sd = (1 - c).sum(), np.sqrt((c * (1 - c)).sum())
    return wrong if len(wrong) >= MIN_CONTRADICTIONS and len(wrong) > expected + 3 * sd \
        else wrong.iloc[:0]


def _moved(rest: pd.DataFrame, wrong: pd.DataFrame) -> pd.DataFrame:
    """The answers of `rest` with the model version and prediction of a confident mistake: half
    the coverage spreads over them. A reorganisation moves phrasings of a label that lie far
    apart in meaning, and the labels near the first mistakes do not reach them; spread over
    every label, the coverage put three labels of four where nothing had moved and left
    moved phrasings of 1-2% of the traffic without a label (the retrain kept their old
    answer). Only half: all of it there found no move that had no mistake yet."""
    keys = ["model", "model_version", "prediction"]
    made = set(zip(*(wrong[k] for k in keys)))
    return rest[np.array([k in made for k in zip(*(rest[k] for k in keys))], dtype=bool)]


def _near(answers: pd.DataFrame, labelled: pd.DataFrame,
          wrong: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per answer, where the labelled answer nearest to it (same model version, same
    prediction; the model's own logged embedding, cosine) is a confidently wrong one, its
    similarity to it (NaN elsewhere): the region a concept shift moved, found from its first
    labels and bounded by the labels that confirm the model around it. And per answer, where
    it is asked as a lone mistake's second label, that mistake's turn (NaN elsewhere): a
    mistake is alone when its nearest labelled answer says another label and no later label
    has been its nearest's second; its second is the closest answer of those nearest to it.
    One label cannot tell a move from an annotator's mistake, and a concept shift's rarer
    phrasings got one each: the retrain retires the replay rows one label moved
    (`training/contradiction.py`), and one wrong label decided a phrasing in two of seven loop
    runs (docs/closed-loop.md)."""
    near, seconds, turn = np.full(len(answers), np.nan), np.full(len(answers), np.nan), 0
    if wrong.empty:
        return near, seconds
    keys = ["model", "model_version", "prediction"]
    seeds = set(zip(wrong.request_id, wrong.item))
    for key, group in labelled[labelled.embedding.notna()].groupby(keys):
        is_wrong = np.array([k in seeds for k in zip(group.request_id, group.item)])
        mine = np.flatnonzero((answers[keys] == pd.Series(key, index=keys)).all(axis=1)
                              & answers.embedding.notna())
        if not is_wrong.any() or not len(mine):
            continue
        known = _unit(group.embedding)
        sims = _unit(answers.embedding.iloc[mine]) @ known.T
        nearest = sims.argmax(axis=1)
        hit = is_wrong[nearest]
        near[mine[hit]] = sims[hit, nearest[hit]]
        between = known @ known.T
        np.fill_diagonal(between, -np.inf)
        neighbour, said = between.argmax(axis=1), group.label.to_numpy()
        seconded = np.zeros(len(group), bool)
        seconded[neighbour[group.ts.to_numpy() > group.ts.to_numpy()[neighbour]]] = True
        alone = is_wrong & ~seconded & ((said[neighbour] != said) | (len(group) == 1))
        for w in np.flatnonzero(alone):
            members = np.flatnonzero(nearest == w)
            if len(members):
                seconds[mine[members[sims[members, w].argmax()]]] = turn
                turn += 1
    return near, seconds


def _spread(answers: pd.DataFrame, labelled: pd.DataFrame, near: np.ndarray,
            k: int) -> np.ndarray:
    """An order of the `near` answers that spreads a page's asks over the region (per model
    version, `_farthest_first` from the labelled ones); asking closest-first spent the labels
    on the first mistakes' neighbours and left the region's extent unknown. Answers beyond the
    first `k` of a version follow, closest to a labelled one first."""
    order = np.zeros(len(answers))
    keys = ["model", "model_version"]
    at = np.flatnonzero(near)
    for key, members in answers.iloc[at].groupby(keys).indices.items():
        idx = at[members]
        cand = _unit(answers.embedding.iloc[idx])
        best = _nearest(cand, _unit(_of(labelled, key).embedding))  # near: one labelled at least
        order[idx] = k + 1 - best
        order[idx[_farthest_first(cand, best, k)]] = range(min(k, len(idx)))
    return order


def _cover(rest: pd.DataFrame, known: pd.DataFrame, n: int) -> pd.DataFrame:
    """`n` answers of `rest` spread over it: per model version (in proportion to its answers),
    the most typical answer of each of its largest groups that no `known` answer (labelled or
    already on the page) is in (`_typical`). A uniform draw asks in proportion to traffic, so a
    new sub-intent of a twentieth of it got a label or two per page, too few to learn it from,
    while its answers' confidence hid it from doubt."""
    rest = rest[rest.embedding.notna()]
    n, keys, picks = min(n, len(rest)), ["model", "model_version"], []
    groups = sorted(rest.groupby(keys), key=lambda kv: -len(kv[1]))
    for key, group in groups:
        k = min(n - len(picks), -(-n * len(group) // len(rest)))
        picks += list(group.index[_typical(_unit(group.embedding),
                                           _unit(_of(known, key).embedding), k)])
    return rest.loc[picks]


def _typical(cand: np.ndarray, known: np.ndarray, k: int) -> list[int]:
    """`k` rows of `cand` (unit vectors): k-means over them and the `known` rows into as many
    groups as known rows and `k`; from each of the `k` largest groups without a known row, its
    most typical row (the closest to its `TYPICAL_NEIGHBOURS` nearest in the group); then
    farthest-first where fewer groups are free. On a budget of labels the typical rows teach
    more (TypiClust, Hacohen et al., ICML 2022): farthest-first (k-center) spent the queue's
    coverage on outliers, tickets with typos or two requests in one, and a new intent's
    phrasing of 3% of the traffic got no label in 160."""
    from sklearn.cluster import KMeans

    if k < 1 or not len(cand):
        return []
    known = known.reshape(-1, cand.shape[1])
    points = np.vstack([known, cand])
    distinct = len(np.unique(points, axis=0))  # repeated texts: no more groups than points
    group = KMeans(min(len(known) + k, distinct), n_init=1, random_state=0).fit(points).labels_
    taken, mine = set(group[:len(known)]), group[len(known):]
    sizes = np.bincount(mine, minlength=group.max() + 1)
    free = [g for g in np.argsort(-sizes, kind="stable") if sizes[g] and g not in taken][:k]
    chosen = []
    for g in free:
        members = np.flatnonzero(mine == g)
        sims = np.sort(cand[members] @ cand[members].T, axis=1)[:, -TYPICAL_NEIGHBOURS:]
        chosen.append(int(members[sims.mean(axis=1).argmax()]))
    if len(chosen) < k:
        best = _nearest(cand, np.vstack([known, cand[chosen]]))
        best[chosen] = np.inf
        chosen += _farthest_first(cand, best, k - len(chosen))
    return chosen


def _farthest_first(cand: np.ndarray, best: np.ndarray, k: int) -> list[int]:
    """Greedy k-center: `k` rows of `cand` (unit vectors), each next the one least like every
    row before it (`best`: each row's highest similarity to the rows already known)."""
    best, chosen = best.copy(), []
    for _ in range(min(k, len(cand))):
        j = int(np.argmin(best))
        chosen.append(j)
        best = np.maximum(best, cand @ cand[j])
        best[j] = np.inf
    return chosen


def _nearest(cand: np.ndarray, known: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Each row's highest cosine similarity to a `known` row (-1 where none is known), in
    chunks (a full window against as many labels would be one 100 MB matrix)."""
    if not len(known):
        return np.full(len(cand), -1.0)
    return np.concatenate([(cand[i:i + chunk] @ known.T).max(axis=1)
                           for i in range(0, len(cand), chunk)] or [np.zeros(0)])


def _of(rows: pd.DataFrame, key: tuple) -> pd.DataFrame:
    """The rows of one (model, model version) with an embedding."""
    return rows[(rows.model == key[0]) & (rows.model_version == key[1])
                & rows.embedding.notna()]


def _unit(vectors: pd.Series) -> np.ndarray:
    if vectors.empty:
        return np.zeros((0, 1), np.float32)
    m = np.stack(vectors.to_numpy()).astype(np.float32)
    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)


def interleave(ranked: pd.DataFrame, n: int) -> pd.DataFrame:
    """The first `n` rows of `ranked` taken in turn from each predicted label (each label's
    own order kept; the label with the most useful row first)."""
    turn = ranked.groupby("prediction", sort=False).cumcount()
    order = ranked.assign(_turn=turn.to_numpy(), _rank=range(len(ranked)))
    return order.sort_values(["_turn", "_rank"]).head(max(n, 0)).drop(columns=["_turn", "_rank"])
