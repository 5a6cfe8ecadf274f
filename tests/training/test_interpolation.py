"""A retrained version keeps a share of the champion's weights (WiSE-FT), except where that
would keep a superseded concept or mix weights that do not line up."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification

from training.interpolation import WEIGHTS, champion_share, keep
from training.pyfunc import META_FILE

LABELS = ["billing", "security", "technical"]


def _classifier(folder, seed: int, labels=LABELS, hidden: int = 16):
    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=len(labels)))
    model.save_pretrained(folder)
    (folder / META_FILE).write_text(json.dumps({"kind": "classification", "labels": labels}))
    return folder


def test_the_retrained_weights_move_back_towards_the_champion_unless_it_costs_held_out_rows(
        tmp_path):
    champion, tuned = _classifier(tmp_path / "champion", 0), _classifier(tmp_path / "tuned", 1)
    before, theirs = load_file(tuned / WEIGHTS), load_file(champion / WEIGHTS)
    assert champion_share(0.4, {}, tuned, champion, LABELS) == 0.4
    # mixed, it would get one more validation row wrong: the fine-tune's weights stay
    worse = lambda w: 6 if torch.equal(w["classifier.weight"], before["classifier.weight"]) \
        else 7  # noqa: E731
    assert keep(tuned, champion, 0.4, worse) == 0.0
    assert all(torch.equal(v, before[k]) for k, v in load_file(tuned / WEIGHTS).items())
    # as good (or better): mixed
    assert keep(tuned, champion, 0.4, lambda w: 6) == 0.4
    after = load_file(tuned / WEIGHTS)
    assert after.keys() == before.keys()
    for name, value in after.items():
        assert torch.allclose(value, 0.6 * before[name] + 0.4 * theirs[name], atol=1e-6), name
    assert not torch.equal(after["classifier.weight"], before["classifier.weight"])
    # still a model folder that loads and answers
    logits = BertForSequenceClassification.from_pretrained(tuned)(
        input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, len(LABELS))


@pytest.mark.parametrize("case", ["concept shift", "labels reordered", "another head",
                                  "no champion folder", "share 0"])
def test_no_share_is_kept_where_the_champion_does_not_line_up_or_holds_an_old_concept(
        tmp_path, case):
    champion = _classifier(tmp_path / "champion", 0,  # another head: same names, other shapes
                           LABELS[::-1] if case == "labels reordered" else LABELS,
                           hidden=32 if case == "another head" else 16)
    tuned = _classifier(tmp_path / "tuned", 1)
    notes = {"concept_shift": "account -> security (12 rows)"} if case == "concept shift" else {}
    source = None if case == "no champion folder" else champion
    weight = 0.0 if case == "share 0" else 0.4
    assert champion_share(weight, notes, tuned, source, LABELS) == 0.0
