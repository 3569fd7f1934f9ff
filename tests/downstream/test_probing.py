import json
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau
from sklearn.exceptions import ConvergenceWarning

from sane_hf.cli import main
from sane_hf.downstream.features import latent_statistics, raw_weight_features, weight_statistics
from sane_hf.downstream.probing import LogisticProbe, RidgeProbe, probe_features, probe_zoo
from sane_hf.models.sane.configuration_sane import SaneConfig
from sane_hf.models.sane.modeling_sane import SaneForPropertyPrediction, SaneModel
from sane_hf.weights.layout import real_entry_mask
from sane_hf.zoo.storage import save_zoo_dataset


def _splits(x, sizes=(200, 100, 100)):
    bounds = np.cumsum(sizes)[:-1]
    return dict(zip(("train", "validation", "test"), np.split(x, bounds)))


def test_weight_statistics_match_numpy_on_hand_example():
    # layer 0: one row of 5 values split over two tokens of size 3; layer 1: two rows of 2 values
    tokens = torch.tensor(
        [
            [1.0, -2.0, 3.0],
            [4.0, 0.5, 0.0],
            [7.0, 8.0, 0.0],
            [-1.0, 9.0, 0.0],
        ]
    )
    counts = torch.tensor([3, 2, 2, 2])
    positions = torch.tensor([[0, 0, 0], [1, 0, 0], [2, 1, 0], [3, 1, 1]])
    mask = real_entry_mask(counts, tokensize=3)
    features = weight_statistics(tokens, mask, positions)

    expected = []
    for layer_values in ([1.0, -2.0, 3.0, 4.0, 0.5], [7.0, 8.0, -1.0, 9.0]):
        values = np.array(layer_values)
        expected += [values.mean(), values.var()]
        expected += list(np.percentile(values, [1, 25, 50, 75, 99]))
    np.testing.assert_allclose(features.numpy(), expected, rtol=1e-6)


def test_weight_statistics_batch_equals_one_by_one():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(4, 6, 5, generator=generator)
    counts = torch.tensor([5, 2, 5, 5, 1, 3])
    mask = real_entry_mask(counts, 5)
    positions = torch.tensor([[i, layer, 0] for i, layer in enumerate([0, 0, 1, 1, 1, 2])])
    batch = weight_statistics(tokens * mask, mask, positions)
    single = torch.stack([weight_statistics(t * mask, mask, positions) for t in tokens])
    torch.testing.assert_close(batch, single)
    assert batch.shape == (4, 3 * 7)


def test_padding_does_not_enter_statistics():
    tokens = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    mask = real_entry_mask(torch.tensor([2, 1]), 3)
    positions = torch.tensor([[0, 0, 0], [1, 0, 1]])
    padded_with_junk = tokens.masked_fill(~mask, 100.0)
    torch.testing.assert_close(
        weight_statistics(tokens, mask, positions),
        weight_statistics(padded_with_junk, mask, positions),
    )


def test_raw_weight_features_drop_padding_and_respect_size_limit():
    tokens = torch.tensor([[[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]]])
    mask = real_entry_mask(torch.tensor([2, 1]), 3)
    assert raw_weight_features(tokens, mask).tolist() == [[1.0, 2.0, 3.0]]
    with pytest.raises(ValueError, match="max_features=2"):
        raw_weight_features(tokens, mask, max_features=2)


def test_real_entry_mask_rejects_counts_beyond_tokensize():
    with pytest.raises(ValueError, match="tokensize=3"):
        real_entry_mask(torch.tensor([4]), 3)


def test_ridge_probe_recovers_linear_signal():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8))
    y = x @ rng.normal(size=8) + 0.1 * rng.normal(size=400)
    xs, ys = _splits(x), _splits(y)
    probe = RidgeProbe().fit(xs["train"], ys["train"], xs["validation"], ys["validation"])
    assert probe.score(xs["test"], ys["test"]) > 0.98  # a constant predictor scores 0
    assert probe.alpha <= 1.0  # clean, plentiful data needs little shrinkage


def test_ridge_probe_regularizes_when_features_outnumber_samples():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(130, 100))
    y = x[:, 0] + 0.5 * rng.normal(size=130)
    xs, ys = _splits(x, (30, 50, 50)), _splits(y, (30, 50, 50))
    probe = RidgeProbe().fit(xs["train"], ys["train"], xs["validation"], ys["validation"])
    # with 30 samples and 100 features, a near-zero alpha interpolates noise
    assert probe.alpha >= 1.0
    assert probe.validation_scores.max() > probe.validation_scores[0]


def test_ridge_probe_on_pure_noise_picks_the_strongest_regularization():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(400, 20)), rng.normal(size=400)
    xs, ys = _splits(x), _splits(y)
    probe = RidgeProbe().fit(xs["train"], ys["train"], xs["validation"], ys["validation"])
    assert probe.alpha == 1e3


def test_logistic_probe_separates_categories():
    rng = np.random.default_rng(3)
    labels = rng.choice(np.array(["tanh", "relu", "gelu"]), size=400)
    centers = {"tanh": [2.0, 0.0], "relu": [-2.0, 0.0], "gelu": [0.0, 2.0]}
    x = np.array([centers[label] for label in labels]) + rng.normal(size=(400, 2))
    xs, ys = _splits(x), _splits(labels)
    probe = LogisticProbe().fit(xs["train"], ys["train"], xs["validation"], ys["validation"])
    assert probe.score(xs["test"], ys["test"]) > 0.8  # chance: 1/3


def test_logistic_probe_records_unconverged_fits_instead_of_warning():
    """Separable features (like raw weights: more features than checkpoints) have no finite
    optimum under weak penalties; such fits are kept and listed, without a warning per fit."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(400, 400)) * 100.0
    labels = np.where(x[:, 0] + x[:, 1] > 0, "adam", "sgd")
    xs, ys = _splits(x), _splits(labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        probe = LogisticProbe(max_iter=3).fit(
            xs["train"], ys["train"], xs["validation"], ys["validation"]
        )
    assert probe.unconverged_cs and set(probe.unconverged_cs) <= set(probe.cs)
    assert probe.score(xs["test"], ys["test"]) > 0.6  # chance: 1/2


def test_probe_features_report(tmp_path):
    rng = np.random.default_rng(4)
    signal = rng.normal(size=(400, 4))
    noise = rng.normal(size=(400, 4))
    targets = {
        "test_acc": _splits(signal @ np.array([1.0, -1.0, 0.5, 0.0]) + 0.1 * rng.normal(size=400)),
        "optimizer": _splits(np.where(signal[:, 0] > 0, "adam", "sgd")),
        "seed_zoo_lr": _splits(np.full(400, 3e-4)),
    }
    report = probe_features({"good": _splits(signal), "noise": _splits(noise)}, targets)

    assert report.score("test_acc", "good") > 0.95
    assert report.score("test_acc", "noise") < 0.1
    assert report.score("optimizer", "good") > 0.9
    assert report.skipped == {"seed_zoo_lr": "constant on the train split"}
    # the validation score the regularization was chosen by travels with each result
    good = next(r for r in report.results if (r.property, r.features) == ("test_acc", "good"))
    assert good.validation_score == max(good.probe.validation_scores) > 0.95
    table = report.table()
    assert "test_acc" in table and "good" in table and "skipped seed_zoo_lr" in table

    report.save_json(tmp_path / "probe.json")
    saved = json.loads((tmp_path / "probe.json").read_text())
    assert all(-np.inf < r["validation_score"] <= 1 for r in saved["results"])
    assert {(r["property"], r["features"]) for r in saved["results"]} == {
        ("test_acc", "good"),
        ("test_acc", "noise"),
        ("optimizer", "good"),
        ("optimizer", "noise"),
    }
    report.plot(tmp_path / "probe.png")
    assert (tmp_path / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_probe_features_rejects_missing_split():
    targets = {"test_acc": _splits(np.arange(400.0))}
    features = {"SANE": {"train": np.ones((200, 2)), "validation": np.ones((100, 2))}}
    with pytest.raises(ValueError, match="lacks splits"):
        probe_features(features, targets)


def test_property_prediction_model_loads_the_encoder_of_a_full_checkpoint(tmp_path):
    torch.manual_seed(0)
    config = SaneConfig.from_preset("tiny", tokensize=6, n_layers=1)
    SaneModel(config).save_pretrained(tmp_path)
    full = SaneModel.from_pretrained(tmp_path)
    model, info = SaneForPropertyPrediction.from_pretrained(
        tmp_path, num_labels=2, output_loading_info=True
    )
    assert [key for key in info["missing_keys"] if not key.startswith("head.")] == []
    assert not info["unexpected_keys"]
    for key, value in full.encoder.state_dict().items():
        torch.testing.assert_close(model.encoder.state_dict()[key], value)


def test_property_prediction_model_learns_a_property():
    torch.manual_seed(0)
    config = SaneConfig.from_preset("tiny", tokensize=6, n_layers=1, num_labels=1)
    model = SaneForPropertyPrediction(config)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randn(32, 10, 6, generator=generator)
    labels = tokens[:, :, 0].mean(1, keepdim=True) * 3  # a property of the weights
    index = torch.arange(10)
    positions = torch.stack([index, index // 5, index % 5], dim=-1).expand(32, -1, -1)
    attention_mask = torch.ones(32, 10, dtype=torch.bool)
    attention_mask[:, 8:] = False

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        output = model(tokens, positions, attention_mask, labels=labels)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        losses.append(output.loss.item())
    assert output.predictions.shape == (32, 1)
    assert losses[-1] < 0.3 * losses[0]
    with pytest.raises(ValueError, match="num_labels=1"):
        model(tokens, positions, labels=torch.zeros(32, 2))


def test_probe_zoo_compares_sane_with_baselines_on_the_same_splits(zoo, sane):
    grid = (1e-3, 1e-1, 1e1, 1e3)  # a coarser grid keeps the test fast
    report = probe_zoo(
        sane, zoo, include_layer_means=True, regularization_grid=grid, progress=False
    )
    assert report.feature_sets == ["SANE", "SANE layers", "s(W)", "W"]
    # the synthetic zoo encodes the epoch in the weight variance: s(W) must find it
    assert report.score("epoch", "s(W)") > 0.8
    assert report.score("test_acc", "s(W)") > 0.8
    for name in ("SANE", "SANE layers", "W"):
        assert np.isfinite(report.score("test_acc", name))
    assert report.score("activation", "SANE") >= 0.0  # categorical: logistic accuracy
    assert "val_acc" in report.skipped and "missing" in report.skipped["val_acc"]
    assert report.skipped["lr"] == "constant on the train split"
    assert "seed" not in report.properties and "model_id" not in report.properties


def test_probe_zoo_skips_the_raw_weight_baseline_for_large_models(zoo, sane):
    report = probe_zoo(sane, zoo, properties=["epoch"], max_raw_features=100, progress=False)
    assert report.feature_sets == ["SANE", "s(W)"]
    assert "max_raw_features=100" in report.skipped["W (baseline)"]
    with pytest.raises(ValueError, match="not a column"):
        probe_zoo(sane, zoo, properties=["flops"], progress=False)


def test_cli_probe_writes_table_json_and_plot(zoo, sane, tmp_path, capsys):
    sane.save_pretrained(tmp_path / "sane")
    save_zoo_dataset(zoo, tmp_path / "zoo")
    argv = ["probe", "--model", str(tmp_path / "sane"), "--dataset", str(tmp_path / "zoo")]
    argv += ["--properties", "epoch", "test_acc", "--output-dir", str(tmp_path / "out"), "--plot"]
    assert main(argv) == 0
    assert "s(W)" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert {r["features"] for r in saved["results"]} == {"SANE", "s(W)", "W"}
    assert (tmp_path / "out" / "probe.png").stat().st_size > 0


def test_latent_statistics_per_layer_match_numpy():
    latents = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[i, layer, 0] for i, layer in enumerate([0, 0, 0, 1, 1])])
    stats = latent_statistics(latents, positions).view(2, 2, 5, 3)  # [M, layer, stat, D]
    for layer, tokens in ((0, slice(0, 3)), (1, slice(3, 5))):
        values = latents[:, tokens].numpy()
        np.testing.assert_allclose(stats[:, layer, 0], values.mean(1), rtol=1e-5)
        np.testing.assert_allclose(stats[:, layer, 1], values.std(1), rtol=1e-5)
        np.testing.assert_allclose(
            stats[:, layer, 2:].permute(1, 0, 2),
            np.quantile(values, [0.1, 0.5, 0.9], axis=1),
            rtol=1e-5,
        )


def test_probe_reports_kendall_tau_and_the_sane_set_chosen_on_validation():
    rng = np.random.default_rng(0)
    y = rng.normal(size=400)
    informative = y[:, None] + 0.1 * rng.normal(size=(400, 3))
    noise = rng.normal(size=(400, 3))
    report = probe_features(
        {"SANE": _splits(noise), "SANE layers": _splits(informative)},
        {"target": _splits(y)},
    )
    best = report.best("target", ["SANE", "SANE layers"])
    assert best.features == "SANE layers"
    assert best.kendall_tau == pytest.approx(kendalltau(best.true, best.predicted).statistic)
    table = report.table()
    assert "tau" in table
    assert "target: SANE features chosen on validation: SANE layers" in table
