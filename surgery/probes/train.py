"""A linear probe on pooled hidden states, with a seeded held-out split: two classifiers.

- `logistic` (the default): binary logistic regression with bias on standardised features, C by
  cross-validation, mapped back to raw states; row 0 is zero, row 1 the logit-difference direction.
- `paper`: Model Surgery's head (Wang et al. 2024, Eq. 1; the authors' `run_pplm_discrim_train.py`):
  a 2-class linear softmax with bias on the raw pooled state, cross-entropy, Adam (no weight decay),
  batch 16, lr 1e-4, 9 epochs (Table 14), seeded. Both rows are kept; row 1 is what the paper adds.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import SurgeryError


@dataclass
class FittedProbe:
    """Binary logistic regression in two-row softmax form (see `surgery.probes.artifact`)."""

    weight: torch.Tensor  # [2, hidden] fp32; row 1 is the undesired (positive) class (logistic: row 0 is all zeros)
    bias: torch.Tensor  # [2]
    train_accuracy: float
    test_accuracy: float
    n_train: int
    n_test: int
    c: float | None  # logistic: the inverse regularisation strength used (chosen by cross-validation when not given)
    classifier: str = "logistic"
    steps: int = 0  # paper: Adam steps taken
    init_share: float = 0.0  # paper: how much of row 1 is still its random initialisation (fit_paper_probe)


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


def fit_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    test_fraction: float = 0.2,
    seed: int = 0,
    c: float | None = None,
    max_iter: int = 2000,
) -> FittedProbe:
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
                cv = LogisticRegressionCV(Cs=C_GRID, cv=folds, max_iter=max_iter, random_state=seed).fit(
                    z[train], y[train]
                )
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


CLASSIFIERS = ("logistic", "paper")
PAPER_LR, PAPER_EPOCHS, PAPER_BATCH = 1e-4, 9, 16  # Table 14 of the paper; the authors' training script's defaults
MOSTLY_RANDOM = 0.5  # init_share above this: training moved W[1] less far than the length of its random start


def fit_paper_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    test_fraction: float = 0.2,
    seed: int = 0,
    epochs: int = PAPER_EPOCHS,
    lr: float = PAPER_LR,
    batch_size: int = PAPER_BATCH,
) -> FittedProbe:
    """The paper's probe: softmax(W h + b) over [desired, undesired] on raw states, cross-entropy, Adam (Eq. 1).

    Initialised as torch's nn.Linear (uniform in +-1/sqrt(hidden)), from `seed`. With softmax over two
    classes the gradients of W[0] and W[1] are opposite, and so are Adam's steps: W[0] + W[1] keeps its
    random initialisation, and W[1] = (W[1] - W[0]) / 2 + (W[0] + W[1]) / 2 is half the learned direction
    plus a fixed random vector. `init_share` = |W1_init| / (|W1_init| + |W1 - W1_init|) says how much of W[1]
    is still its random start (0: all learned; above 0.5 training moved it less than the start's length).
    """
    x = features.float()
    y = labels.long()
    if min(int((y == 0).sum()), int((y == 1).sum())) < 2:
        raise SurgeryError("a probe needs at least 2 examples of each class")
    train, test = split_indices(y.numpy(), test_fraction, seed)
    train_t, test_t = torch.from_numpy(train), torch.from_numpy(test)
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / x.shape[1] ** 0.5
    weight = ((torch.rand(2, x.shape[1], generator=g) * 2 - 1) * bound).requires_grad_()
    bias = ((torch.rand(2, generator=g) * 2 - 1) * bound).requires_grad_()
    initial = weight[1].detach().clone()
    optimiser = torch.optim.Adam([weight, bias], lr=lr)
    steps, threads = 0, torch.get_num_threads()
    torch.set_num_threads(1)  # batches of 16: thread hand-offs cost more than the arithmetic (50x slower on a busy CPU)
    try:
        for _ in range(epochs):
            order = train_t[torch.randperm(len(train_t), generator=g)]
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                loss = torch.nn.functional.cross_entropy(x[batch] @ weight.T + bias, y[batch])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                steps += 1
    finally:
        torch.set_num_threads(threads)
    weight, bias = weight.detach(), bias.detach()

    def accuracy(idx: torch.Tensor) -> float:
        return float(((x[idx] @ weight.T + bias).argmax(1) == y[idx]).float().mean()) if len(idx) else float("nan")

    init_share = float(initial.norm() / (initial.norm() + (weight[1] - initial).norm()))
    return FittedProbe(
        weight.clone(),
        bias.clone(),
        accuracy(train_t),
        accuracy(test_t),
        len(train),
        len(test),
        None,
        classifier="paper",
        steps=steps,
        init_share=init_share,
    )
