"""Distillation, the peak fallback: a 1-layer student of a 2-layer champion trained on its soft
labels (a generator's: on its answers) with DeepSpeed on Ray Train, registered with its lineage
and aliased `fallback` by the gate; the gate's rule; the distillation loss itself."""

import pytest
import torch
from conftest import register_quick

from training.distill import DISTILLED_FROM_TAG, GATE_TAG, distill_and_register, student_model
from training.errors import InvalidData
from training.finetune import FinetuneSpec
from training.registry import CHAMPION, FALLBACK
from training.retrain import fallback_gate
from training.worker import _loss


def test_a_student_of_the_champion_is_registered_and_aliased_fallback(ray_session, settings,
                                                                      registry):
    task = settings.training.tasks["advisor-intent"]
    task.model = task.model.model_copy(update={"architecture": {"num_hidden_layers": 2}})
    task.distill = task.distill.model_copy(update={"layers": 1, "margin": 0.1, "epochs": 8,
                                                   "learning_rate": 2e-3})
    teacher = register_quick(settings, registry, "advisor-intent", epochs=4, lr=1e-3)
    result = distill_and_register(settings.training, registry, "advisor-intent",
                                  storage_path=settings.storage_path, use_gpu=False)
    assert result.teacher == teacher.version and result.job.version == teacher.version + 1
    assert result.gate.promote, result.gate.reason
    assert registry.alias_version("advisor-intent", FALLBACK) == result.job.version
    assert registry.alias_version("advisor-intent", CHAMPION) == teacher.version  # unmoved
    tags = registry.client.get_model_version("advisor-intent", str(result.job.version)).tags
    assert tags[DISTILLED_FROM_TAG] == str(teacher.version) and "margin 0.1" in tags[GATE_TAG]
    student = registry.load_model("advisor-intent", str(result.job.version))
    assert student.model.config.num_hidden_layers == 1
    assert teacher.metrics["golden"]["accuracy"] - result.job.metrics["golden"]["accuracy"] <= 0.1
    # judged on the champion's distribution: the base holdout and its golden set
    assert set(result.gate.champion) == {"base", "golden"}
    assert {"new-product", "slang"} <= set(result.job.metrics)  # measured, not gated


def test_a_generators_student_learns_the_champions_own_answers(ray_session, settings, registry):
    """Sequence-level distillation: a 1-layer student of a 2-layer generator trained on the
    champion's greedy answers to its training prompts (not the references), gated by token F1
    on the base holdout and the golden set, aliased `fallback` exactly when the gate passes."""
    import mlflow

    from training.registry import REFERENCE_FILE

    task = settings.training.tasks["rewriter"]
    task.model = task.model.model_copy(update={"architecture": {
        **task.model.architecture, "n_layer": 2}})
    task.distill = task.distill.model_copy(update={"layers": 1, "margin": 0.2, "epochs": 6,
                                                   "learning_rate": 3e-3})
    mlflow.set_tracking_uri(registry.tracking_uri)
    teacher = register_quick(settings, registry, "rewriter", epochs=8)
    result = distill_and_register(settings.training, registry, "rewriter",
                                  storage_path=settings.storage_path, use_gpu=False)
    assert result.teacher == teacher.version and result.job.version == teacher.version + 1
    champion = registry.load_model("rewriter", str(teacher.version))
    learnt = registry.run_data("rewriter", str(result.job.version), REFERENCE_FILE)
    answers = champion.predict(None, learnt[["text"]])["text"]
    assert list(learnt.rewrite) == list(answers)  # the champion's answers, not the references
    assert "token_f1" in result.gate.reason and set(result.gate.champion) == {"base", "golden"}
    fallback = registry.alias_version("rewriter", FALLBACK)
    assert (fallback == result.job.version) == result.gate.promote, result.gate.reason
    student = registry.load_model("rewriter", str(result.job.version))
    assert student.model.config.num_hidden_layers == 1


def test_distilling_needs_a_champion_and_a_whole_model(settings, registry):
    with pytest.raises(InvalidData, match="no champion to distil"):
        distill_and_register(settings.training, registry, "moderation",
                             storage_path=settings.storage_path, use_gpu=False)
    lora = settings.training.tasks["rewriter"].model_copy(update={
        "method": "lora", "model": {"source": "models:/rewriter@champion"}})
    settings.training.tasks = {**settings.training.tasks, "rewriter-lora": lora}
    with pytest.raises(InvalidData, match="LoRA adapters: its student"):
        distill_and_register(settings.training, registry, "rewriter-lora",
                             storage_path=settings.storage_path, use_gpu=False)


def test_the_fallback_gate_allows_a_bounded_loss_on_every_holdout():
    champion = {"base": 0.95, "golden": 0.97}
    passed = fallback_gate(champion, {"base": 0.93, "golden": 0.97}, "macro_f1", 0.03)
    assert passed.promote and "+0.0200 (on base" in passed.reason
    refused = fallback_gate(champion, {"base": 0.96, "golden": 0.93}, "macro_f1", 0.03)
    assert not refused.promote and "on golden" in refused.reason and "over the margin" in refused.reason


def test_the_student_keeps_the_first_layers_whatever_the_family_calls_them():
    from training.config import ModelSpec

    gpt2 = ModelSpec(source="scratch", architecture={"model_type": "gpt2", "n_layer": 4})
    assert student_model(gpt2, 2).architecture == {"model_type": "gpt2", "num_hidden_layers": 2}
    assert student_model(ModelSpec(), 2).architecture == {"num_hidden_layers": 2}


def test_the_distillation_loss_weighs_the_teachers_soft_labels_against_the_true_ones():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]], requires_grad=True)

    class Engine:
        def __call__(self, labels, **_):
            ce = torch.nn.functional.cross_entropy(logits, labels)
            return type("Out", (), {"logits": logits, "loss": ce})

    def loss(alpha, soft):
        spec = FinetuneSpec(kind="classification", model=None, tokenizer=None, labels=[],
                            train_inputs=[], train_targets=[], val_inputs=[], val_targets=[],
                            epochs=1, batch_size=2, learning_rate=1e-3, weight_decay=0,
                            warmup_ratio=0, deepspeed=None, distill_temperature=2.0,
                            distill_alpha=alpha)
        batch = {"labels": torch.tensor([0, 1]), "soft": torch.tensor(soft)}
        return _loss(Engine(), batch, "cpu", spec)

    student = torch.softmax(logits.detach() / 2, dim=-1).tolist()
    assert loss(1.0, student).item() == pytest.approx(0.0, abs=1e-6)  # already the teacher
    hard = loss(0.0, student).item()
    assert hard == pytest.approx(torch.nn.functional.cross_entropy(
        logits.detach(), torch.tensor([0, 1])).item())
    assert loss(1.0, [[0.1, 0.9], [0.9, 0.1]]).item() > 0.5  # a teacher that disagrees
