"""Probe heads saved with a model, and SaneForPropertyPrediction under transformers.Trainer."""

import re

import numpy as np
import pytest
import torch
from sklearn.metrics import r2_score
from transformers import Trainer, TrainingArguments

from sane_hf import (
    ProbeHeads,
    SaneConfig,
    SaneForPropertyPrediction,
    embed,
    fit_probe_heads,
    with_labels,
)
from sane_hf.downstream.features import HEAD_FEATURE_SETS
from sane_hf.downstream.probe_heads import split_head_inputs
from sane_hf.downstream.probing import probe_zoo
from sane_hf.downstream.property_prediction import LabelStandardization, predict_properties
from synthetic_zoo import TOKENSIZE


def test_probe_heads_round_trip_and_predict_like_the_fitted_probes(zoo, sane, tmp_path):
    heads = fit_probe_heads(
        sane, zoo, properties=["test_acc", "epoch", "activation"], units={"epoch": "epochs"}
    )
    report = probe_zoo(
        sane,
        zoo,
        properties=["test_acc", "epoch", "activation"],
        baselines=(),
        feature_sets=HEAD_FEATURE_SETS,
        progress=False,
    )
    assert heads.names == ["test_acc", "epoch", "activation"]
    assert [h.kind for h in heads.heads] == ["ridge", "ridge", "logistic"]
    assert heads.heads[0].unit == "fraction correct"
    heads.save_pretrained(tmp_path)
    loaded = ProbeHeads.from_pretrained(tmp_path)
    test = embed(sane, zoo["test"], progress=False)
    inputs = split_head_inputs(sane, zoo["test"], loaded)
    predicted, reloaded = heads.predict(inputs), loaded.predict(inputs)
    for name in heads.names:
        assert np.array_equal(predicted[name], reloaded[name]), name
    assert set(predicted["activation"]) <= {"tanh", "relu"}
    # the shipped head gives the fitted probe's test score back
    r2 = r2_score(test.properties["test_acc"], predicted["test_acc"])
    assert r2 == pytest.approx(loaded.heads[0].test_score, abs=1e-9)
    assert list(loaded.test_scores()) == [
        "R^2 test_acc (shipped probe head, test split)",
        "R^2 epoch (shipped probe head, test split)",
        "accuracy activation (shipped probe head, test split)",
    ]
    # each head reads the feature set with the best validation score, and says which
    for head in loaded.heads:
        best = max(
            (r for r in report.results if r.property == head.name),
            key=lambda r: r.validation_score,
        )
        assert (head.features, head.validation_score) == (best.features, best.validation_score)
    first = loaded.heads[0]
    with pytest.raises(ValueError, match=rf"reads {re.escape(first.features)} features \[M, "):
        first.predict(np.zeros((2, 5)))


def test_probe_heads_missing_files_say_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no probe heads"):
        ProbeHeads.from_pretrained(tmp_path)


def test_with_labels_standardizes_and_refuses_bad_properties(zoo):
    train, scale = with_labels(zoo["train"], ["test_acc", "epoch"])
    labels = np.asarray(train["labels"])
    assert labels.shape == (len(zoo["train"]), 2)
    np.testing.assert_allclose(labels.mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(labels.std(0), 1, atol=1e-5)
    np.testing.assert_allclose(
        scale.to_units(labels)[:, 1], np.asarray(zoo["train"]["epoch"]), atol=1e-5
    )
    test, same = with_labels(zoo["test"], ["test_acc", "epoch"], standardization=scale)
    assert same is scale and len(test) == len(zoo["test"])
    with pytest.raises(ValueError, match="'val_acc' is missing or not finite in row 0"):
        with_labels(zoo["train"], ["val_acc"])
    with pytest.raises(ValueError, match="'activation' is not numeric"):
        with_labels(zoo["train"], ["activation"])


def test_trainer_trains_a_few_steps_and_predicts_in_units(zoo, tmp_path):
    torch.manual_seed(0)
    config = SaneConfig.from_preset("tiny", tokensize=TOKENSIZE, num_labels=1)
    model = SaneForPropertyPrediction(config)
    train, scale = with_labels(zoo["train"], ["test_acc"])
    test, _ = with_labels(zoo["test"], ["test_acc"], standardization=scale)
    scale.save_to(model.config)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=test)
    result = trainer.train()
    assert np.isfinite(result.training_loss)
    prediction = trainer.predict(test)
    assert isinstance(prediction.predictions, np.ndarray)  # not a tuple: embeddings are ignored
    assert prediction.predictions.shape == (len(test), 1)
    in_units = scale.to_units(prediction.predictions)

    model.save_pretrained(tmp_path / "model")
    reloaded = SaneForPropertyPrediction.from_pretrained(tmp_path / "model")
    assert LabelStandardization.from_config(reloaded.config) == scale
    rows = test[:]
    direct = predict_properties(reloaded, rows["tokens"], rows["positions"])
    np.testing.assert_allclose(direct["test_acc"], in_units[:, 0], rtol=1e-4, atol=1e-5)


def test_auto_model_for_sequence_classification_builds_the_property_head():
    from transformers import AutoModelForSequenceClassification

    config = SaneConfig.from_preset("tiny", tokensize=TOKENSIZE, num_labels=3)
    model = AutoModelForSequenceClassification.from_config(config)
    assert type(model) is SaneForPropertyPrediction and model.head.out_features == 3
    shipped = SaneConfig.from_pretrained("checkpoints/sane-cnn-mnist")
    assert shipped.auto_map["AutoModelForSequenceClassification"].endswith(
        "SaneForPropertyPrediction"
    )
