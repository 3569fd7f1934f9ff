"""Property prediction from model embeddings: linear probes, the s(W) and W baselines, reports.

SANE's discriminative use (paper Sec. 4.1, Table 1): pool the token latents of every model of a
zoo into one vector, then fit a *linear* probe on the training split to predict the model's
properties (test accuracy, epoch, generalization gap, hyperparameters). Probes stay linear on
purpose: the question is how much the embedding itself exposes, not what a strong regressor can
dig out of it.

Everything here follows one protocol so that SANE and its baselines are comparable:

- features are standardized with statistics of the training split only;
- numeric properties: closed-form ridge regression, the regularization ``alpha`` picked by R^2 on
  the validation split from a log grid (1e-5 .. 1e3, as the reference), R^2 reported on test;
- categorical properties (activation, init, optimizer): logistic regression, ``C`` picked by
  validation accuracy, test accuracy reported;
- numeric probes also report Kendall's tau between predicted and true test values (the rank
  measure of neural-functional work: is a better network ranked higher?);
- baselines on the same splits: ``s(W)`` (per-layer mean, variance and 1/25/50/75/99 percentiles
  of the real weights, Unterthiner et al. 2020) and the raw weights ``W`` for small models.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from sane_hf.downstream.embedding import embed
from sane_hf.downstream.features import (
    SANE,
    SANE_AND_WEIGHT_STATISTICS,
    SANE_LAYERS,
    SANE_ONLY_FEATURE_SETS,
    feature_matrices,
    latent_statistics,
    needs_token_latents,
    raw_weight_features,
    weight_statistics,
)
from sane_hf.weights.layout import real_entry_mask

if TYPE_CHECKING:
    from datasets import Dataset

SPLITS = ("train", "validation", "test")
# Panel titles: what a zoo column means, in words (other properties keep their column name).
PROPERTY_LABELS = {
    "test_acc": "test accuracy",
    "val_acc": "validation accuracy",
    "train_acc": "training accuracy",
    "epoch": "training epoch",
    "ggap": "generalization gap (train - test accuracy)",
    "lr": "learning rate",
    "weight_decay": "weight decay",
    "dropout": "dropout",
}
REGULARIZATION_GRID = tuple(10.0**exponent for exponent in range(-5, 4))  # 1e-5 .. 1e3


class _Standardizer:
    """Feature standardization with training-split statistics (constant features stay at 0)."""

    def __init__(self, train_x: np.ndarray):
        self.mean = train_x.mean(0)
        std = train_x.std(0)
        self.std = np.where(std > 0, std, 1.0)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std


def _check_features(name: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"{name}: expected features [n, d] with n={len(y)}, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: features contain NaN or inf")
    return x


class RidgeProbe:
    """Closed-form ridge regression; ``alpha`` chosen by validation R^2.

    One SVD of the standardized training features gives the solution for every ``alpha`` of the
    grid at once: ``coef(alpha) = V diag(s / (s^2 + alpha)) U^T y``.
    """

    metric = "r2"

    def __init__(self, alphas: Sequence[float] = REGULARIZATION_GRID):
        if not alphas or min(alphas) < 0:
            raise ValueError(f"alphas must be a non-empty grid of values >= 0, got {alphas}")
        self.alphas = tuple(float(a) for a in alphas)

    def fit(
        self, train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray
    ) -> RidgeProbe:
        train_y = np.asarray(train_y, dtype=np.float64)
        val_y = np.asarray(val_y, dtype=np.float64)
        train_x = _check_features("train features", train_x, train_y)
        val_x = _check_features("validation features", val_x, val_y)
        self.standardizer = _Standardizer(train_x)
        self.intercept = train_y.mean()
        u, s, vt = np.linalg.svd(self.standardizer(train_x), full_matrices=False)
        projected = u.T @ (train_y - self.intercept)  # [r]
        alphas = np.asarray(self.alphas)
        shrinkage = s / (s**2 + alphas[:, None])  # [A, r]
        coefs = (shrinkage * projected) @ vt  # [A, d]
        val_predictions = self.standardizer(val_x) @ coefs.T + self.intercept  # [n_val, A]
        from sklearn.metrics import r2_score  # here: predicting with saved probes needs no sklearn

        self.validation_scores = np.array([r2_score(val_y, p) for p in val_predictions.T])
        # the largest alpha among equally good ones: the most regularized probe that fits as well
        best = len(alphas) - 1 - int(np.argmax(self.validation_scores[::-1]))
        self.alpha = self.regularization = self.alphas[best]
        self.coef = coefs[best]
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.standardizer(np.asarray(x, dtype=np.float64)) @ self.coef + self.intercept

    def score(self, x: np.ndarray, y: np.ndarray) -> float:
        from sklearn.metrics import r2_score

        return float(r2_score(y, self.predict(x)))


class LogisticProbe:
    """Multinomial logistic regression; ``C`` (inverse regularization) chosen by validation accuracy.

    The ``C`` grid is fitted from the strongest penalty to the weakest, each fit starting from
    the previous solution (warm start: the path costs little more than one fit). On separable
    features (raw weights W: thousands of features for hundreds of checkpoints) the weakest
    penalties have no finite optimum and lbfgs stops at ``max_iter``; those fits are still
    classifiers, scored on validation like the others, and listed in ``unconverged_cs`` instead
    of raising a ConvergenceWarning per fit.
    """

    metric = "accuracy"

    def __init__(self, cs: Sequence[float] = REGULARIZATION_GRID, max_iter: int = 1000):
        self.cs = tuple(sorted(float(c) for c in cs))
        self.max_iter = max_iter

    def fit(
        self, train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray
    ) -> LogisticProbe:
        train_y, val_y = np.asarray(train_y), np.asarray(val_y)
        train_x = _check_features("train features", train_x, train_y)
        val_x = _check_features("validation features", val_x, val_y)
        self.standardizer = _Standardizer(train_x)
        train_x, val_x = self.standardizer(train_x), self.standardizer(val_x)
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        path = LogisticRegression(max_iter=self.max_iter, warm_start=True)
        classifiers, self.unconverged_cs = [], []
        for c in self.cs:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                path.set_params(C=c).fit(train_x, train_y)
            if any(issubclass(w.category, ConvergenceWarning) for w in caught):
                self.unconverged_cs.append(c)
            classifiers.append(copy.deepcopy(path))
        self.validation_scores = np.array([clf.score(val_x, val_y) for clf in classifiers])
        best = int(np.argmax(self.validation_scores))  # ties: the smallest C, the strongest penalty
        self.c = self.regularization = self.cs[best]
        self.classifier = classifiers[best]
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classifier.predict(self.standardizer(np.asarray(x, dtype=np.float64)))

    def score(self, x: np.ndarray, y: np.ndarray) -> float:
        return float((self.predict(x) == np.asarray(y)).mean())


@dataclass
class ProbeResult:
    """Test-split score of one probe (one property, one feature set)."""

    property: str
    features: str
    metric: str  # "r2" for numeric properties, "accuracy" for categorical ones
    score: float
    regularization: float  # ridge alpha or logistic C chosen on validation
    validation_score: float  # the same metric on the validation split, at that regularization
    true: np.ndarray
    predicted: np.ndarray
    probe: RidgeProbe | LogisticProbe | None = None  # the fitted probe (for shipped probe heads)
    kendall_tau: float | None = None  # test split, numeric properties only

    def to_dict(self) -> dict:
        return {
            "property": self.property,
            "features": self.features,
            "metric": self.metric,
            "score": self.score,
            "kendall_tau": self.kendall_tau,
            "regularization": self.regularization,
            "validation_score": self.validation_score,
        }


def kendall_tau(true: np.ndarray, predicted: np.ndarray) -> float:
    """Kendall's tau-b of predictions against true values (NaN when either is constant)."""
    from scipy.stats import kendalltau  # here: predicting with saved probes needs no scipy

    with warnings.catch_warnings():  # a constant input warns and returns NaN: NaN is the answer
        warnings.simplefilter("ignore")
        return float(kendalltau(true, predicted).statistic)


@dataclass
class ProbeReport:
    """All probe results plus the properties that could not be probed and why."""

    results: list[ProbeResult]
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def feature_sets(self) -> list[str]:
        return list(dict.fromkeys(r.features for r in self.results))

    @property
    def properties(self) -> list[str]:
        return list(dict.fromkeys(r.property for r in self.results))

    def score(self, property_name: str, features: str) -> float:
        return self.result(property_name, features).score

    def result(self, property_name: str, features: str) -> ProbeResult:
        for result in self.results:
            if result.property == property_name and result.features == features:
                return result
        raise KeyError(f"no result for property {property_name!r} with features {features!r}")

    def best(self, property_name: str, feature_sets: Sequence[str]) -> ProbeResult:
        """The probe of ``property_name`` with the highest *validation* score among
        ``feature_sets`` (those that were probed): the test split chooses nothing."""
        candidates = [
            r for r in self.results if r.property == property_name and r.features in feature_sets
        ]
        if not candidates:
            raise KeyError(f"no probe of {property_name!r} on any of {list(feature_sets)}")
        return max(candidates, key=lambda r: r.validation_score)

    def table(self) -> str:
        """A terminal table: one row per property, one column per feature set, and for numeric
        properties a second row with Kendall's tau."""
        feature_sets = self.feature_sets
        by_key = {(r.property, r.features): r for r in self.results}
        width = max([len("property"), *(len(p) for p in self.properties)])
        header = f"{'property':<{width}}  {'metric':<8}" + "".join(
            f"  {name:>10}" for name in feature_sets
        )
        lines = [header, "-" * len(header)]
        for name in self.properties:
            metric = next(r.metric for r in self.results if r.property == name)
            cells = "".join(
                f"  {by_key[name, f].score:>10.3f}" if (name, f) in by_key else f"  {'-':>10}"
                for f in feature_sets
            )
            lines.append(f"{name:<{width}}  {metric:<8}{cells}")
            if metric == "r2":
                taus = "".join(
                    f"  {by_key[name, f].kendall_tau:>10.3f}"
                    if (name, f) in by_key
                    else f"  {'-':>10}"
                    for f in feature_sets
                )
                lines.append(f"{'':<{width}}  {'tau':<8}{taus}")
        sane_sets = [f for f in SANE_ONLY_FEATURE_SETS if f in feature_sets]
        if len(sane_sets) > 1:
            for name in self.properties:
                best = self.best(name, sane_sets)
                lines.append(
                    f"{name}: SANE features chosen on validation: {best.features} "
                    f"(validation {best.validation_score:.3f}, test {best.score:.3f})"
                )
        lines += [f"skipped {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"results": [r.to_dict() for r in self.results], "skipped": self.skipped}

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def plot(self, path: str | Path, title: str | None = None) -> None:
        """Scatter plots of predicted vs true test values, one panel per numeric property
        titled in words, under ``title`` (what was probed: split, architecture, dataset)."""
        from matplotlib.figure import Figure  # no pyplot: renders with Agg, no global state

        regressions = [p for p in self.properties if self._metric(p) == "r2"]
        if not regressions:
            raise ValueError("no numeric property was probed: nothing to plot")
        columns = min(3, len(regressions))
        rows = math.ceil(len(regressions) / columns)
        figure = Figure(figsize=(4 * columns, 4 * rows), dpi=120)
        axes = figure.subplots(rows, columns, squeeze=False)
        for axis, name in zip(axes.flat, regressions):
            for result in (r for r in self.results if r.property == name):
                axis.scatter(
                    result.true,
                    result.predicted,
                    s=6,
                    alpha=0.5,
                    label=f"{result.features} (R² {result.score:.3f})",
                )
            low, high = axis.get_xlim()
            axis.plot([low, high], [low, high], color="black", linewidth=0.8)
            axis.set(title=PROPERTY_LABELS.get(name, name), xlabel="true", ylabel="predicted")
            axis.legend(fontsize=8)
        for axis in list(axes.flat)[len(regressions) :]:
            axis.set_visible(False)
        if title:
            figure.suptitle(title)
        figure.tight_layout()
        figure.savefig(path)

    def _metric(self, property_name: str) -> str:
        return next(r.metric for r in self.results if r.property == property_name)


def _is_categorical(values: np.ndarray) -> bool:
    return values.dtype.kind in "OUSb"


def _skip_reason(values: Mapping[str, np.ndarray]) -> str | None:
    """Why a property cannot be probed on these splits, or None when it can."""
    for split in SPLITS:
        if split not in values:
            return f"no values for split {split!r}"
    if not _is_categorical(values["train"]) and not np.isfinite(values["train"]).all():
        return "missing or non-finite values in the train split"
    if len(np.unique(values["train"])) < 2:
        return "constant on the train split"
    if len(np.unique(values["test"])) < 2 and not _is_categorical(values["test"]):
        return "constant on the test split (R^2 undefined)"
    return None


def probe_features(
    features: Mapping[str, Mapping[str, np.ndarray]],
    targets: Mapping[str, Mapping[str, np.ndarray]],
    regularization_grid: Sequence[float] = REGULARIZATION_GRID,
) -> ProbeReport:
    """Fit one linear probe per (feature set, property) and score it on the test split.

    Args:
        features: ``{feature_set_name: {split: array [n_split, d]}}`` with splits
            ``train``/``validation``/``test``, e.g. ``{"SANE": ..., "s(W)": ..., "W": ...}``.
        targets: ``{property: {split: array [n_split]}}``. Numeric arrays get a ridge probe
            (R^2), string/bool arrays a logistic probe (accuracy).
        regularization_grid: ridge alphas and logistic Cs tried on the validation split.

    Properties that cannot be probed (constant on the training split, a split missing) are
    listed in ``ProbeReport.skipped`` with the reason instead of being dropped silently.
    """
    results, skipped = [], {}
    for name, values in targets.items():
        values = {split: np.asarray(v) for split, v in values.items()}
        reason = _skip_reason(values)
        if reason is not None:
            skipped[name] = reason
            continue
        categorical = _is_categorical(values["train"])
        for feature_name, splits in features.items():
            missing = [s for s in SPLITS if s not in splits]
            if missing:
                raise ValueError(f"feature set {feature_name!r} lacks splits {missing}")
            probe = (LogisticProbe if categorical else RidgeProbe)(regularization_grid)
            probe.fit(splits["train"], values["train"], splits["validation"], values["validation"])
            result = ProbeResult(
                property=name,
                features=feature_name,
                metric=probe.metric,
                score=probe.score(splits["test"], values["test"]),
                regularization=probe.regularization,
                validation_score=float(np.max(probe.validation_scores)),
                true=values["test"],
                predicted=probe.predict(splits["test"]),
                probe=probe,
            )
            if not categorical:
                result.kendall_tau = kendall_tau(result.true, result.predicted)
            results.append(result)
    return ProbeReport(results, skipped)


BASELINES = ("s(W)", "W")
NOT_PROPERTIES = ("model_id", "seed", "file")  # identifiers, not properties of the weights


def default_properties(
    properties: Mapping[str, np.ndarray], categorical: Sequence[str]
) -> list[str]:
    """Every numeric column except identifiers, plus the given categorical columns."""
    numeric = [
        name
        for name, values in properties.items()
        if values.dtype.kind in "fiu" and name not in NOT_PROPERTIES
    ]
    return numeric + [name for name in categorical if name in properties]


def baseline_features(
    split: Dataset,
    baselines: Sequence[str] = BASELINES,
    max_raw_features: int = 50_000,
    models_per_chunk: int = 1024,
) -> dict[str, np.ndarray]:
    """``s(W)`` and ``W`` features of every row of a zoo split (normalized tokens, real values).

    ``W`` is left out (with a ``ValueError`` naming the size) when a model has more than
    ``max_raw_features`` weights.
    """
    unknown = [name for name in baselines if name not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; choose from {BASELINES}")
    if not baselines:  # nothing to read (and mixed zoos' rows differ in length)
        return {}
    rows = split.with_format("torch", columns=["tokens", "positions", "counts"])
    first = rows[0]
    mask = real_entry_mask(first["counts"].long(), first["tokens"].shape[-1])
    positions = first["positions"].long()
    features = {name: [] for name in baselines}
    for start in range(0, len(split), models_per_chunk):
        tokens = rows[start : start + models_per_chunk]["tokens"].float()
        if "s(W)" in features:
            features["s(W)"].append(weight_statistics(tokens, mask, positions).numpy())
        if "W" in features:
            features["W"].append(raw_weight_features(tokens, mask, max_raw_features).numpy())
    return {name: np.concatenate(chunks) for name, chunks in features.items()}


def probe_zoo(
    model: nn.Module,
    dataset: Mapping[str, Dataset],
    *,
    properties: Sequence[str] | None = None,
    baselines: Sequence[str] = BASELINES,
    max_raw_features: int = 50_000,
    include_layer_means: bool = False,
    feature_sets: Sequence[str] = (SANE,),
    window: int | None = None,
    halo: int | None = None,
    batch_size: int = 256,
    regularization_grid: Sequence[float] = REGULARIZATION_GRID,
    progress: bool = True,
) -> ProbeReport:
    """Probe SANE embeddings of a zoo dataset for model properties, next to the baselines.

    Args:
        model: a trained ``SaneModel`` / ``SaneEncoderModel``.
        dataset: the zoo's ``DatasetDict`` (``train``/``validation``/``test`` splits).
        properties: columns to predict; default: every numeric column (accuracies, losses,
            ``ggap``, ``epoch``, numeric hyperparameters) and the string-valued hyperparameters
            (``activation``, ``init``, ``optimizer``) as categories.
        baselines: ``"s(W)"`` and/or ``"W"``, computed on the same splits. ``W`` is skipped
            (noted in ``ProbeReport.skipped``) for models above ``max_raw_features`` weights.
        include_layer_means: also probe the concatenated per-layer mean latents ("SANE layers").
        feature_sets: the SANE feature sets to probe (`sane_hf.downstream.features`: "SANE",
            "SANE layers", "s(Z)", "SANE + s(W)"); "SANE + s(W)" is SANE next to s(W), its
            own row, not SANE alone.
        window, halo, batch_size: halo-window encoding (see ``sane_hf.embed``).
    """
    missing = [split for split in SPLITS if split not in dataset]
    if missing:
        raise ValueError(f"the zoo dataset lacks the splits {missing}")
    features: dict[str, dict[str, np.ndarray]] = {}
    targets: dict[str, dict[str, np.ndarray]] = {}
    skipped: dict[str, str] = {}
    if "W" in baselines:
        num_weights = int(np.sum(dataset["train"][0]["counts"]))
        if num_weights > max_raw_features:
            skipped["W (baseline)"] = (
                f"{num_weights} weights per model > max_raw_features={max_raw_features}"
            )
            baselines = [name for name in baselines if name != "W"]
    feature_sets = list(dict.fromkeys([*feature_sets, *([SANE_LAYERS] * include_layer_means)]))
    for split in SPLITS:
        embeddings = embed(
            model,
            dataset[split],
            window=window,
            halo=halo,
            batch_size=batch_size,
            return_token_latents=needs_token_latents(feature_sets),
            progress=progress,
        )
        weight_baselines = baseline_features(dataset[split], baselines, max_raw_features)
        weight_stats = weight_baselines.get("s(W)")
        if SANE_AND_WEIGHT_STATISTICS in feature_sets and weight_stats is None:
            weight_stats = baseline_features(dataset[split], ("s(W)",))["s(W)"]
        sane_features = feature_matrices(
            feature_sets,
            mean=embeddings.mean,
            layer_means=embeddings.layer_means,
            latent_stats=zoo_latent_statistics(embeddings, dataset[split]),
            weight_stats=weight_stats,
        )
        for name, values in {**sane_features, **weight_baselines}.items():
            features.setdefault(name, {})[split] = values
        if properties is None:
            properties = default_properties(
                embeddings.properties, _categorical_hyperparameters(dataset[split])
            )
        for name in properties:
            if name not in embeddings.properties:
                raise ValueError(
                    f"property {name!r} is not a column of the zoo; available: "
                    f"{sorted(embeddings.properties)}"
                )
            targets.setdefault(name, {})[split] = embeddings.properties[name]
    report = probe_features(features, targets, regularization_grid)
    report.skipped.update(skipped)
    return report


def zoo_latent_statistics(embeddings, split: Dataset) -> torch.Tensor | None:
    """`latent_statistics` of a zoo split's embeddings (None without token latents)."""
    if embeddings.token_latents is None:
        return None
    positions = torch.as_tensor(np.asarray(split[0]["positions"])).long()
    return latent_statistics(embeddings.token_latents, positions)


def _categorical_hyperparameters(split: Dataset) -> list[str]:
    """String-valued fields of the ``hyperparameters`` struct column (activation, init, ...)."""
    fields = split.features.get("hyperparameters")
    if not isinstance(fields, dict):
        return []
    return [
        name
        for name, feature in fields.items()
        if getattr(feature, "dtype", None) in ("string", "large_string")
    ]


__all__ = [
    "LogisticProbe",
    "ProbeReport",
    "ProbeResult",
    "RidgeProbe",
    "baseline_features",
    "default_properties",
    "probe_features",
    "probe_zoo",
]
