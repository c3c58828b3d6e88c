"""Voxel classifiers fitted with scikit-learn, stored as plain arrays, evaluated without it.

A fitted scikit-learn estimator is usually saved with pickle (or joblib), and loading a pickle
runs whatever code it names: a model directory shared between labs would be a way to run code
on the receiving machine. skops restricts what a file may load but still rebuilds Python
objects from the file and ties the model to the scikit-learn version that wrote it. The
classifiers here are instead exported to their parameters, which the model's
``weights.safetensors`` stores as tensors (safetensors holds arrays and a JSON header, nothing
executable), and evaluated by the few lines below, which read nothing but those arrays:

- ``hgb``: :class:`~sklearn.ensemble.HistGradientBoostingClassifier` (binary log-loss). Each
  tree's nodes (feature, threshold, missing-value side, children, leaf value) and the baseline;
  the raw prediction is the baseline plus each tree's leaf value in the trees' order, then the
  logistic function, as scikit-learn computes it (identical numbers; tested).
- ``logistic``: :class:`~sklearn.preprocessing.StandardScaler` then
  :class:`~sklearn.linear_model.LogisticRegression`: means, scales, coefficients, intercept.

Both add a stored ``logit_offset`` to the raw prediction: the prior correction of a classifier
fitted on a class-balanced sample of voxels (see :func:`prior_offset`).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import expit

CLASSIFIERS = ("hgb", "logistic")

_NODE_FIELDS = ("feature_idx", "num_threshold", "missing_go_to_left", "left", "right",
                "is_leaf", "value")


def fit_classifier(kind: str, features: np.ndarray, labels: np.ndarray, seed: int = 0,
                   sample_weight: np.ndarray | None = None):
    """Fit a scikit-learn classifier of ``kind`` on ``(n, F)`` float64 features.

    ``hgb``: 200 trees of at most 31 leaves, learning rate 0.1, L2 regularisation 1, no early
    stopping (every run fits the same trees). ``logistic``: standardised features, L2 (C = 1).
    """
    if kind == "hgb":
        from sklearn.ensemble import HistGradientBoostingClassifier

        classifier = HistGradientBoostingClassifier(
            max_iter=200, learning_rate=0.1, max_leaf_nodes=31, l2_regularization=1.0,
            early_stopping=False, random_state=seed)
    elif kind == "logistic":
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        classifier = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
    else:
        raise ValueError(f"classifier must be one of {CLASSIFIERS}, not {kind!r}")
    fit_options = {}
    if sample_weight is not None:
        key = "sample_weight" if kind == "hgb" else "logisticregression__sample_weight"
        fit_options[key] = sample_weight
    classifier.fit(np.asarray(features, dtype=np.float64), np.asarray(labels, dtype=bool),
                   **fit_options)
    return classifier


def export_classifier(kind: str, classifier) -> dict[str, torch.Tensor]:
    """The fitted parameters as named tensors (float64 / int64), nothing else.

    Raises
    ------
    ValueError
        A classifier of another kind, or one with categorical features or several outputs.
    """
    if kind == "hgb":
        if classifier.n_trees_per_iteration_ != 1 or classifier._preprocessor is not None:
            raise ValueError("only binary gradient boosting on numerical features is exported")
        trees = [predictors[0].nodes for predictors in classifier._predictors]
        sizes = np.array([len(nodes) for nodes in trees], dtype=np.int64)
        nodes = np.concatenate(trees)
        tensors = {f"node_{name}": torch.from_numpy(
            nodes[name].astype(np.float64 if name in ("num_threshold", "value") else np.int64))
            for name in _NODE_FIELDS}
        tensors["tree_sizes"] = torch.from_numpy(sizes)
        tensors["baseline"] = torch.tensor(
            np.asarray(classifier._baseline_prediction, dtype=np.float64).ravel())
        return tensors
    if kind == "logistic":
        scaler, logistic = classifier[0], classifier[-1]
        return {"mean": torch.from_numpy(np.asarray(scaler.mean_, np.float64)),
                "scale": torch.from_numpy(np.asarray(scaler.scale_, np.float64)),
                "coef": torch.from_numpy(np.asarray(logistic.coef_, np.float64)),
                "intercept": torch.from_numpy(np.asarray(logistic.intercept_, np.float64))}
    raise ValueError(f"classifier must be one of {CLASSIFIERS}, not {kind!r}")


def raw_prediction(kind: str, tensors: dict[str, torch.Tensor], features: np.ndarray,
                   chunk: int = 65536) -> np.ndarray:
    """The classifier's log-odds of ``(n, F)`` features from exported parameters (float64)."""
    features = np.asarray(features, dtype=np.float64)
    if kind == "logistic":
        scaled = (features - tensors["mean"].numpy()) / tensors["scale"].numpy()
        return (scaled @ tensors["coef"].numpy().T + tensors["intercept"].numpy()).ravel()
    if kind != "hgb":
        raise ValueError(f"classifier must be one of {CLASSIFIERS}, not {kind!r}")
    node = {name: tensors[f"node_{name}"].numpy() for name in _NODE_FIELDS}
    leaf = node["is_leaf"].astype(bool)
    missing_left = node["missing_go_to_left"].astype(bool)
    sizes = tensors["tree_sizes"].numpy()
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    out = np.empty(len(features), dtype=np.float64)
    for begin in range(0, len(features), chunk):
        x = features[begin:begin + chunk]
        rows = np.arange(len(x))
        raw = np.full(len(x), tensors["baseline"].numpy()[0])
        for start in starts:
            current = np.full(len(x), start, dtype=np.int64)
            active = ~leaf[current]
            while active.any():
                at = current[active]
                value = x[rows[active], node["feature_idx"][at]]
                left = np.where(np.isnan(value), missing_left[at],
                                value <= node["num_threshold"][at])
                current[active] = start + np.where(left, node["left"][at], node["right"][at])
                active = ~leaf[current]
            raw += node["value"][current]
        out[begin:begin + chunk] = raw
    return out


def predict_probability(kind: str, tensors: dict[str, torch.Tensor], features: np.ndarray,
                        logit_offset: float = 0.0) -> np.ndarray:
    """Probability of the positive class from exported parameters (and a prior correction)."""
    return expit(raw_prediction(kind, tensors, features) + logit_offset)


def prior_offset(sample_prevalence: float, population_prevalence: float) -> float:
    """Log-odds correction of a classifier fitted on a sample with another class balance.

    A classifier of a sample in which positives make up ``sample_prevalence`` estimates the
    posterior of that sample; shifting its log-odds by ``logit(population) - logit(sample)``
    gives the posterior where positives make up ``population_prevalence`` (the same
    class-conditional distributions, other priors).

    >>> round(prior_offset(0.5, 0.01), 4)
    -4.5951
    """
    def logit(p: float) -> float:
        p = min(max(p, 1e-12), 1 - 1e-12)
        return float(np.log(p / (1 - p)))

    return logit(population_prevalence) - logit(sample_prevalence)
