"""A linear probe: logistic regression (with bias) on pooled hidden states, with a seeded held-out split."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from surgery.errors import SurgeryError


@dataclass
class FittedProbe:
    """Binary logistic regression in two-row softmax form (see `probes.artifact`)."""

    weight: torch.Tensor  # [2, hidden] fp32; row 1 is the undesired (positive) class, row 0 is all zeros
    bias: torch.Tensor  # [2]
    train_accuracy: float
    test_accuracy: float
    n_train: int
    n_test: int
    c: float  # the inverse regularisation strength used (chosen by cross-validation when not given)


def split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded train/test indices; every class keeps at least one example on each side."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in (0, 1):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_test = int(round(test_fraction * len(idx)))
        n_test = min(max(n_test, 1), len(idx) - 1) if test_fraction > 0 else 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.concatenate(train), np.concatenate(test)


C_GRID = np.logspace(-4, 2, 7)


def fit_probe(features: torch.Tensor, labels: torch.Tensor, test_fraction: float = 0.2, seed: int = 0,
              c: float | None = None, max_iter: int = 2000) -> FittedProbe:
    """Fit on the train split, score on the held-out split; `labels` 1 = undesired class.

    Features are standardised for the fit (hidden states carry a few huge dimensions that stall lbfgs)
    and the coefficients mapped back, so the saved probe reads raw hidden states: w = w_s / sd,
    b = b_s - sum(w_s * mean / sd). With c None, C is chosen by 5-fold cross-validation on the train split.
    """
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

    x = features.double().numpy()
    y = labels.numpy().astype(int)
    if min((y == 0).sum(), (y == 1).sum()) < 2:
        raise SurgeryError("a probe needs at least 2 examples of each class")
    train, test = split_indices(y, test_fraction, seed)
    mean, sd = x[train].mean(0), x[train].std(0)
    sd[sd == 0] = 1.0
    z = (x - mean) / sd
    if c is None:
        folds = int(min(5, (y[train] == 0).sum(), (y[train] == 1).sum()))
        if folds >= 2:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # sklearn 1.8's notice about renaming fitted attributes
                cv = LogisticRegressionCV(Cs=C_GRID, cv=folds, max_iter=max_iter, random_state=seed).fit(z[train], y[train])
            c = float(cv.C_[0])
        else:
            c = 1.0
    clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed).fit(z[train], y[train])
    w_std = clf.coef_[0]
    w = torch.tensor(w_std / sd, dtype=torch.float32)
    b = float(clf.intercept_[0] - (w_std * mean / sd).sum())
    weight = torch.stack([torch.zeros_like(w), w])  # softmax([0, w·h + b])[1] = sigmoid(w·h + b): the same classifier
    bias = torch.tensor([0.0, b], dtype=torch.float32)
    test_acc = float(clf.score(z[test], y[test])) if len(test) else float("nan")
    return FittedProbe(weight, bias, float(clf.score(z[train], y[train])), test_acc, len(train), len(test), c)
