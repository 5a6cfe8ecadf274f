"""Concept shift in feedback: where recent labelled traffic contradicts the rows a retrain would
replay (the champion's training data) or judge by (its golden set).

Texts are compared in the bundled sentence encoder's space (all-MiniLM-L6-v2: meaning, not the
champion's own labels). First the moves (`_contradicting`): B is a move from A when at least
`MIN_PAIR_ROWS` of the labelled recent rows sitting clearly in an A region carry B, beyond
chance (`MOVE_CHANCE`) against how often the rows themselves carry B in A regions: label noise
and texts between two intents disagree at that rate, and a shifted prior moves no row out of
its region. Then the rows that moved: a row of A goes to B when its closest labelled
recent row says B, or when at least `MIN_VOTES` of the recent rows that count it among their
`K` nearest say B, more than confirm A, and its own neighbours agree with A (a mislabelled or
ambiguous row is noise, not a concept); then the region grows: a row follows when 3 of its close
same-label neighbours moved (`REGION_SIMILARITY`, `GROWTH_PASSES`). A move counts only with the
support of a region (`MIN_REGION_ROWS`, or 1% of the first table). The other tables (the golden
set) follow the first: a row goes where most of its nearest first-table rows of its label went.
Contradicted rows are retired (dropped) or, in the tables named to `resolve` as `relabel`,
given the label they moved to: the replay then teaches the new concept with all of its
phrasings instead of leaving it to the few labelled rows (a judge, the golden set, is only ever
retired: relabelled by the same inference it would judge itself). A row moved by one labelled
row alone (its closest, with no second one near it saying the same), or grown from such rows,
is retired there too: one label cannot tell a sparse move from label noise, which the label
queue over-samples (a wrong label looks like a confident mistake, the queue's cue):
relabelling after one label taught whole regions a move that never happened. The report says
which labels moved where, what each table did with its rows, and examples; the moves
suspected, not shown (too few rows yet: the loop waits for labels there, `cluster/retrain.py`);
and the moved labels' rows that recent traffic asks about and no label confirms (`_unreached`):
where labels are still needed, and what the retrain keeps under the old label unconfirmed."""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

K, MIN_VOTES, MIN_SIMILARITY, REGION_SIMILARITY, MIN_REGION_ROWS = 10, 2, 0.6, 0.6, 10
MIN_PAIR_ROWS, MIN_SHARE, GROWTH_PASSES = 4, 0.25, 4
# the chance of a pair's count with no move (`_contradicting`) under which it is a move, and
# suspected: about 0.003 and 0.03 over the 30 pairs of six labels (Bonferroni)
MOVE_CHANCE, SUSPECT_CHANCE = 1e-4, 1e-3
EXAMPLES = 3


@dataclass
class Contradictions:
    """Which labels moved where, with the rows of each table that were retired."""

    moved: dict[str, int] = field(default_factory=dict)  # "A -> B": rows of the region
    retired: dict[str, dict[str, int]] = field(default_factory=dict)  # table -> "A -> B" -> rows
    relabelled: dict[str, dict[str, int]] = field(default_factory=dict)  # likewise
    examples: dict[str, list[str]] = field(default_factory=dict)  # "A -> B" -> texts that moved
    # "A -> B" -> recent rows: a move said in an A region by too few rows, or too thin a region
    suspected: dict[str, int] = field(default_factory=dict)
    single: dict[str, int] = field(default_factory=dict)  # "A -> B": its rows one label moved
    # A (a moved label) -> its first table's rows, kept as A, that recent traffic asks about
    # and no labelled row near confirms (`_unreached`)
    unreached: dict[str, list[str]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.moved)

    @property
    def thin(self) -> dict[str, int]:
        """The moves ("A -> B": rows) that rest more on single labels than on two or more."""
        return {m: n for m, n in self.single.items() if 2 * n > self.moved.get(m, 0)}

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """The moves as (A, B), in the order found."""
        return [tuple(move.split(" -> ")) for move in self.moved]

    @property
    def sources(self) -> set[str]:
        """The labels whose meaning moved (the A of each "A -> B")."""
        return {a for a, _ in self.pairs}

    def summary(self) -> str:
        """One line for the controller's event."""
        def done(move: str) -> str:
            return ", ".join(f"{t[move]} {table} rows {what}" for what, tables in
                             (("relabelled", self.relabelled), ("retired", self.retired))
                             for table, t in tables.items() if t.get(move))

        return "; ".join(f"{move} ({done(move)})" for move in self.moved)

    def to_dict(self) -> dict:
        return {"moved": self.moved, "retired": self.retired, "relabelled": self.relabelled,
                "examples": self.examples, "suspected": self.suspected, "single": self.single,
                "unreached": {a: {"rows": len(texts), "examples": texts[:EXAMPLES]}
                              for a, texts in self.unreached.items()}}


def embed(texts: list[str]) -> np.ndarray:
    """L2-normalised sentence embeddings of the bundled encoder, each text encoded once per
    process (the newest `EMBEDDED_TEXTS` kept): while it waits for labels the controller
    checks the same replay, golden rows and labels again at every step."""
    from training.models import load_encoder, sentence_embeddings

    with _EMBEDDING:
        missing = list(dict.fromkeys(t for t in texts if t not in _EMBEDDED))
        fresh = sentence_embeddings(*load_encoder(), missing)  # none: an empty (0, width)
        if not texts:
            return fresh
        _EMBEDDED.update(zip(missing, fresh))
        for text in texts:
            _EMBEDDED.move_to_end(text)
        out = np.stack([_EMBEDDED[t] for t in texts])
        while len(_EMBEDDED) > EMBEDDED_TEXTS:
            _EMBEDDED.popitem(last=False)
        return out


EMBEDDED_TEXTS = 20_000  # about 30 MB of embeddings
_EMBEDDED: OrderedDict[str, np.ndarray] = OrderedDict()  # text -> embedding, least recent first
_EMBEDDING = threading.Lock()


def _region(labels: np.ndarray, near: np.ndarray) -> str | None:
    """The label a text's `near` rows mostly carry (70% of 3 or more), else None."""
    if len(near) < 3:
        return None
    region, n = Counter(labels[near]).most_common(1)[0]
    return region if n >= 0.7 * len(near) else None


def _disagreement(own: np.ndarray, ranked: np.ndarray,
                  rows_labels: np.ndarray) -> dict[str, Counter]:
    """Per region label A, the labels of the rows themselves that sit clearly in an A region
    (each among its own nearest, itself left out; `ranked`: each row's others, most similar
    first): how often the data disagrees with its neighbourhood with no concept shift (label
    noise, texts between two intents)."""
    out: dict[str, Counter] = {}
    for x, near in enumerate(ranked[:, :K]):
        region = _region(rows_labels, near[own[x, near] >= MIN_SIMILARITY])
        if region is not None:
            out.setdefault(region, Counter())[rows_labels[x]] += 1
    return out


def _contradicting(recent_labels: np.ndarray, neighbours: list[np.ndarray],
                   rows_labels: np.ndarray, base: dict[str, Counter]
                   ) -> tuple[set[tuple[str, str]], Counter]:
    """The moves (A, B) the recent rows make as a group: of the recent rows that sit clearly
    in an A region, at least `MIN_PAIR_ROWS` carry B, more than `MOVE_CHANCE` allows (a
    binomial tail) at the larger of two rates of B with no move: `base`, the share of B the
    rows themselves carry in A regions (label noise, texts between two intents; add-one
    smoothed), and the median share of B in the recent rows' other regions (an annotator's
    bias towards B is everywhere, a move in one place). A shifted prior moves no row out of
    its region; a moved sub-intent of a twentieth of its label's rows stands out against a
    base rate of about 1%, where a fixed share of the region's labels (a quarter, before)
    missed it. Also every pair said by 2 or more of those rows, beyond `SUSPECT_CHANCE` or by
    `MIN_SHARE` of the region's, with its count: a move before it has the rows to show it."""
    from scipy.stats import binom

    regions: dict[str, Counter] = {}
    for label, near in zip(recent_labels, neighbours):
        region = _region(rows_labels, near)
        if region is not None:
            regions.setdefault(region, Counter())[label] += 1
    kinds = len(set(rows_labels) | set(recent_labels))
    said, moves = Counter(), set()

    def elsewhere(a: str, b: str) -> float:
        shares = [by[b] / sum(by.values()) for c, by in regions.items()
                  if c not in (a, b) and sum(by.values()) >= MIN_PAIR_ROWS]
        return float(np.median(shares)) if shares else 0.0

    for a, by in regions.items():
        seen, total = base.get(a, Counter()), sum(by.values())
        for b, n in by.items():
            if b == a or n < 2:
                continue
            rate = max((seen[b] + 1) / (seen.total() + kinds), elsewhere(a, b))
            chance = binom.sf(n - 1, total, rate)
            if chance < SUSPECT_CHANCE or n >= MIN_SHARE * total:
                said[(a, b)] = n
                if n >= MIN_PAIR_ROWS and chance < MOVE_CHANCE:
                    moves.add((a, b))
    return moves, said


def nearest_rows(sims: np.ndarray) -> list[np.ndarray]:
    """Per text (`sims`: texts x a table's rows), the rows it speaks for: its `K` nearest
    within `MIN_SIMILARITY`. A labelled text votes on them, an unlabelled one asks of them."""
    return [near[sims[j, near] >= MIN_SIMILARITY]
            for j, near in enumerate(np.argsort(-sims, axis=1)[:, :K])]


def _own(rows_e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows' similarities to each other (each to itself -1) and, per row, the others,
    most similar first."""
    own = rows_e @ rows_e.T
    np.fill_diagonal(own, -1.0)
    return own, np.argsort(-own, axis=1)


def _agrees(labels: np.ndarray, ranked: np.ndarray) -> np.ndarray:
    """Per row, whether its 5 nearest rows mostly (60%) carry its label: else it is
    mislabelled or between two intents, noise rather than a concept."""
    return (labels[ranked[:, :5]] == labels[:, None]).mean(axis=1) >= 0.6


def _moves(recent_e: np.ndarray, recent_labels: np.ndarray, rows_e: np.ndarray,
           rows_labels: np.ndarray, own: np.ndarray, ranked: np.ndarray,
           agree: np.ndarray) -> tuple[np.ndarray, np.ndarray, Counter]:
    """Per row, the label it moved to (None where it did not) and whether two labelled recent
    rows or more show it (else one label alone moved it, or rows it alone moved); and the
    pairs the recent rows say (`_contradicting`). `own`, `ranked`: `_own` of the rows;
    `agree`: `_agrees` of them."""
    sims = recent_e @ rows_e.T
    neighbours = nearest_rows(sims)
    pairs, said = _contradicting(recent_labels, neighbours, rows_labels,
                                 _disagreement(own, ranked, rows_labels))
    confirm = np.zeros(len(rows_labels))
    against: list[Counter] = [Counter() for _ in rows_labels]
    for j, near in enumerate(neighbours):
        for x in near:
            if rows_labels[x] == recent_labels[j]:
                confirm[x] += 1
            elif (rows_labels[x], recent_labels[j]) in pairs:
                against[x][recent_labels[j]] += 1
    order = ranked[:, :5]
    moved = np.full(len(rows_labels), None, dtype=object)
    for x, votes in enumerate(against):
        if votes:
            label, n = votes.most_common(1)[0]
            if n >= MIN_VOTES and n > confirm[x] and agree[x]:
                moved[x] = label
    shown = moved != None  # noqa: E711 (elementwise)
    nearest = sims.argmax(axis=0)  # each row's closest labelled recent row
    for x in [x for x, m in enumerate(moved) if m is None]:
        j = nearest[x]
        if sims[j, x] >= MIN_SIMILARITY and (rows_labels[x], recent_labels[j]) in pairs:
            moved[x] = recent_labels[j]  # a move already found, said by its closest recent row
            shown[x] = ((sims[:, x] >= MIN_SIMILARITY)
                        & (recent_labels == recent_labels[j])).sum() >= MIN_VOTES
    for _ in range(GROWTH_PASSES):  # the region grows from the rows next to labelled ones
        before, was_shown = moved.copy(), shown.copy()
        for x in [x for x, m in enumerate(before) if m is None]:
            near = [y for y in order[x] if own[x, y] >= REGION_SIMILARITY
                    and rows_labels[y] == rows_labels[x]]
            label = _majority(before, near)
            if label is not None:
                moved[x] = label
                shown[x] = _majority(np.where(was_shown, before, None), near) == label
    return moved, shown, said


def _majority(moves: np.ndarray, near: list[int]) -> str | None:
    """The label 3 or more of `near` moved to, if any."""
    label, n = Counter(moves[y] for y in near if moves[y] is not None).most_common(1)[0] \
        if any(moves[y] is not None for y in near) else (None, 0)
    return label if n >= 3 else None


def _counts(labels: np.ndarray, moves: np.ndarray) -> dict[str, int]:
    """Rows per move ("A -> B")."""
    return dict(sorted(Counter(f"{a} -> {b}" for a, b in zip(labels, moves)
                               if b is not None).items()))


def _follow(rows_e: np.ndarray, rows_labels: np.ndarray, primary_e: np.ndarray,
            primary_labels: np.ndarray, primary_moves: np.ndarray) -> np.ndarray:
    """Moves of a secondary table (the golden set): a row goes where most of its nearest
    primary rows of its own label went."""
    sims = rows_e @ primary_e.T
    moved = np.full(len(rows_labels), None, dtype=object)
    for x, near in enumerate(np.argsort(-sims, axis=1)[:, :K]):
        same = [y for y in near if sims[x, y] >= MIN_SIMILARITY
                and primary_labels[y] == rows_labels[x]][:5]
        moved[x] = _majority(primary_moves, same)
    return moved


def _unreached(rows_e: np.ndarray, labels: np.ndarray, moves: np.ndarray, agree: np.ndarray,
               recent_e: np.ndarray, recent_labels: np.ndarray, traffic_e: np.ndarray,
               min_rows: int) -> dict[str, np.ndarray]:
    """Per label a move left (A), its rows kept as A that the unlabelled `traffic` still asks
    about (among the `K` nearest, within `MIN_SIMILARITY`, of `MIN_VOTES` requests) and no
    labelled recent row near confirms, where at
    least `min_rows`: a reorganisation moves a label's phrasings that lie far apart in meaning,
    and the labels find the ones near the first mistakes first. Whether these moved too only
    labels can tell, and the retrain keeps them as A: in loop runs such phrasings, 1-2% of
    the tickets each, kept their old label (0.947-0.961 of clean). A row its own neighbours
    disagree with (`agree`, `_agrees`: label noise, which no label will confirm) is not one."""
    sources = {a for a, b in zip(labels, moves) if b is not None}
    open_ = np.isin(labels, list(sources)) & (moves == None) & agree  # noqa: E711 (elementwise)
    confirmed = ((rows_e @ recent_e.T >= MIN_SIMILARITY)
                 & (labels[:, None] == recent_labels[None, :])).any(axis=1)
    sims = traffic_e @ rows_e.T
    asked = np.zeros(len(labels))
    for near in nearest_rows(sims):
        asked[near] += 1
    rows = open_ & ~confirmed & (asked >= MIN_VOTES)
    return {a: np.flatnonzero(rows & (labels == a)) for a in sorted(sources)
            if (rows & (labels == a)).sum() >= min_rows}


def resolve(recent: pd.DataFrame, tables: dict[str, pd.DataFrame],
            relabel: Collection[str] = (), traffic: Collection[str] = ()
            ) -> tuple[dict[str, pd.DataFrame], Contradictions]:
    """`tables` (each with `text` and `label`) less the rows recent labelled traffic
    contradicts, or with those rows relabelled for the tables named in `relabel`. The first
    table defines the regions: a move needs `MIN_REGION_ROWS` of its rows, or 1% of them if
    more (the other tables, such as a small golden set, follow the moves found there).
    `traffic`: the unlabelled recent requests, for the moved labels' rows no label reached."""
    if recent.empty or not tables:
        return tables, Contradictions()
    min_region_rows = max(MIN_REGION_ROWS, len(next(iter(tables.values()))) // 100)
    texts = list(recent.text)
    for df in tables.values():
        texts += list(df.text)
    embedded = embed(texts)
    recent_e, at = embedded[:len(recent)], len(recent)
    recent_labels = recent.label.astype(str).to_numpy()
    report, kept, primary = Contradictions(), {}, None
    for name, df in tables.items():
        rows_e, at = embedded[at:at + len(df)], at + len(df)
        labels = df.label.astype(str).to_numpy()
        if primary is None:  # the regions: the first table's moved rows
            own, ranked = _own(rows_e)
            agree = _agrees(labels, ranked)
            moves, shown, said = _moves(recent_e, recent_labels, rows_e, labels, own, ranked,
                                        agree)
            pairs = Counter(f"{a} -> {b}" for a, b in zip(labels, moves) if b is not None)
            accepted = {move for move, n in pairs.items() if n >= min_region_rows}
            report.suspected = {f"{a} -> {b}": n for (a, b), n in sorted(said.items())
                                if f"{a} -> {b}" not in accepted}
            moves = np.array([b if b is not None and f"{a} -> {b}" in accepted else None
                              for a, b in zip(labels, moves)], dtype=object)
            primary = rows_e, labels, moves
            if accepted and len(traffic):  # embedded only where a move was found
                report.unreached = {a: list(df.text.iloc[rows]) for a, rows in _unreached(
                    rows_e, labels, moves, agree, recent_e, recent_labels,
                    embed(list(traffic)), min_region_rows).items()}
        else:
            moves, shown = _follow(rows_e, labels, *primary), np.ones(len(df), dtype=bool)
        unshown = (moves != None) & ~shown  # noqa: E711 (elementwise)
        single = _counts(labels[unshown], moves[unshown])
        if name in relabel:  # a move one label alone shows is retired: noise or not, unknown
            kept[name] = df[~unshown].assign(label=[b if b is not None else a for a, b
                                                    in zip(df.label[~unshown], moves[~unshown])])
            report.relabelled[name] = _counts(labels[~unshown], moves[~unshown])
            report.retired[name] = single
        else:
            kept[name] = df[moves == None].reset_index(drop=True)  # noqa: E711 (elementwise)
            report.retired[name] = _counts(labels, moves)
        if not report.moved:
            report.moved, report.single = _counts(labels, moves), single
            for move in report.moved:
                report.examples[move] = [t for t, a, b in zip(df.text, labels, moves)
                                         if f"{a} -> {b}" == move][:EXAMPLES]
    return kept, report
