"""Post-hoc calibration of a fold ensemble's probabilities, fitted on the out-of-fold predictions.

Why: the KAT fold ensemble ranks slides well but its probabilities are far from frequencies (early stopping
on AUC, dropout, few epochs: top-class probabilities of 0.3-0.7 on slides it gets right). A lab that reads
``p(2+) = 0.8`` as evidence needs that number to mean "right about 8 times in 10".

Model-agnostic: every family acts on the model's log-probabilities ``z = log p`` (equal to the logits up to a
per-slide constant, which softmax ignores), so KAT, ABMIL or any other slide model is calibrated the same way.

Families (Guo et al., 2017):
- ``temperature``: ``softmax(z / T)``, one parameter; the argmax (hence accuracy) never changes.
- ``vector``: ``softmax(w * z + b)``, one scale and one bias per class (``2C`` parameters); can fix per-class
  bias but can also change the argmax and overfit a small cohort.

Choice: both are scored by cross-validated NLL *over the CV folds* (fit on the other folds' OOF rows, score on
the fold's rows). Vector scaling is chosen only when every class has ``VECTOR_MIN_PER_CLASS`` OOF slides and
its CV NLL beats temperature scaling's by more than ``VECTOR_MARGIN_NATS``; otherwise temperature scaling.
The chosen family is then refitted on all OOF rows.
Fitting is L-BFGS (scipy) on float64 with analytic gradients from a fixed start: deterministic.

Ensembles: each fold model's probabilities are calibrated with the same map, then averaged over folds (the
map was fitted on single-model out-of-fold predictions, which is what each fold model produces on a new
slide). The uncalibrated ensemble (mean of raw fold probabilities) stays available as ``prob_uncal_*``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax

from .. import storage
from ..errors import ConfigError

CALIBRATION_FILE = "calibration.json"
METHODS = ("temperature", "vector")
VECTOR_MARGIN_NATS = 0.02     # mean NLL per slide vector scaling must win by (CV) to be chosen
VECTOR_MIN_PER_CLASS = 20     # ... and only with at least this many OOF slides of every class (2C parameters)
LOG_EPS = 1e-12               # floor of probabilities before the log (a hard 0 would be -inf)
MAX_ITER = 500
LOG_T_BOUND = float(np.log(20.0))   # T in [1/20, 20]: perfectly separated OOF data would drive T to 0


@dataclass
class Calibration:
    """A fitted calibration map; ``apply`` turns raw probabilities [..., C] into calibrated ones."""

    method: str                                   # temperature | vector | none
    temperature: float = 1.0                      # temperature scaling: z / T
    scale: list[float] = field(default_factory=list)   # vector scaling: w (per class)
    bias: list[float] = field(default_factory=list)    # vector scaling: b (per class)
    fit: dict[str, Any] = field(default_factory=dict)  # how it was chosen (CV NLLs, OOF before/after)

    def apply(self, probs: np.ndarray) -> np.ndarray:
        p = np.asarray(probs, dtype=np.float64)
        if self.method == "none":
            return p.copy()
        z = np.log(np.clip(p, LOG_EPS, 1.0))
        if self.method == "temperature":
            out = z / self.temperature
        elif self.method == "vector":
            out = z * np.asarray(self.scale) + np.asarray(self.bias)
        else:
            raise ConfigError(f"unknown calibration method {self.method!r} (one of {METHODS} or none)")
        return np.exp(log_softmax(out, axis=-1))

    def apply_ensemble(self, fold_probs: np.ndarray) -> np.ndarray:
        """``[F, ..., C]`` raw per-fold probabilities -> calibrated ensemble ``[..., C]`` (mean over folds)."""
        return self.apply(np.asarray(fold_probs, dtype=np.float64)).mean(axis=0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "") -> "Calibration":
        try:
            cal = cls(**data)
        except TypeError as exc:
            raise ConfigError(f"{source}: invalid calibration record: {exc}") from None
        if cal.method not in METHODS + ("none",):
            raise ConfigError(f"{source}: unknown calibration method {cal.method!r}")
        return cal


IDENTITY = Calibration(method="none")


# ------------------------------------------------------------------------------------------ fitting
def _nll_and_grad_temperature(theta: np.ndarray, z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean NLL of softmax(z * a) with a = exp(theta[0]) (= 1/T; log-parametrised so T stays > 0)."""
    a = float(np.exp(theta[0]))
    logp = log_softmax(z * a, axis=1)
    n = len(y)
    nll = -logp[np.arange(n), y].mean()
    p = np.exp(logp)
    onehot = np.eye(z.shape[1])[y]
    grad_a = ((p - onehot) * z).sum() / n
    return float(nll), np.array([grad_a * a])


def _nll_and_grad_vector(theta: np.ndarray, z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    c = z.shape[1]
    w, b = theta[:c], theta[c:]
    logp = log_softmax(z * w + b, axis=1)
    n = len(y)
    nll = -logp[np.arange(n), y].mean()
    d = (np.exp(logp) - np.eye(c)[y]) / n
    return float(nll), np.concatenate([(d * z).sum(axis=0), d.sum(axis=0)])


def fit_map(method: str, probs: np.ndarray, labels: np.ndarray) -> Calibration:
    """Fit one family by L-BFGS on the mean NLL (deterministic: fixed start, float64, analytic gradient)."""
    z = np.log(np.clip(np.asarray(probs, dtype=np.float64), LOG_EPS, 1.0))
    y = np.asarray(labels, dtype=np.int64)
    c = z.shape[1]
    if method == "temperature":
        res = minimize(_nll_and_grad_temperature, np.zeros(1), args=(z, y), jac=True, method="L-BFGS-B",
                       bounds=[(-LOG_T_BOUND, LOG_T_BOUND)], options={"maxiter": MAX_ITER})
        return Calibration(method="temperature", temperature=float(np.exp(-res.x[0])))
    if method == "vector":
        res = minimize(_nll_and_grad_vector, np.concatenate([np.ones(c), np.zeros(c)]), args=(z, y), jac=True,
                       method="L-BFGS-B", bounds=[(0.0, 150.0)] * c + [(-50.0, 50.0)] * c,
                       options={"maxiter": MAX_ITER})
        return Calibration(method="vector", scale=[float(v) for v in res.x[:c]],
                           bias=[float(v) for v in res.x[c:]])
    raise ConfigError(f"unknown calibration method {method!r} (one of {METHODS})")


def mean_nll(probs: np.ndarray, labels: np.ndarray) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), LOG_EPS, 1.0)
    y = np.asarray(labels, dtype=np.int64)
    return float(-np.log(p[np.arange(len(y)), y]).mean())


def cv_nll(method: str, probs: np.ndarray, labels: np.ndarray, folds: np.ndarray) -> float | None:
    """NLL of ``method`` fitted on the other folds' rows and scored on each fold's rows (pooled mean)."""
    uniq = np.unique(folds)
    if len(uniq) < 2:
        return None
    losses = np.empty(len(labels))
    for k in uniq:
        held = folds == k
        cal = fit_map(method, probs[~held], labels[~held])
        p = cal.apply(probs[held])
        losses[held] = -np.log(np.clip(p[np.arange(held.sum()), labels[held]], LOG_EPS, 1.0))
    return float(losses.mean())


def fit_calibration(probs: np.ndarray, labels: np.ndarray, folds: np.ndarray, *, method: str = "auto",
                    margin: float = VECTOR_MARGIN_NATS, n_bins: int = 10) -> Calibration:
    """Fit the calibration of a CV run on its OOF predictions (``folds``: the CV fold of each row).

    ``method``: ``auto`` (temperature unless vector scaling wins CV NLL by ``margin``), ``temperature``,
    ``vector`` or ``none``. The returned map's ``fit`` records the CV NLLs, the choice and OOF ECE/Brier/NLL
    before and after (in-sample for the refit map: optimistic, the test set is the honest check).
    """
    from ..reports.calibration import calibration_summary

    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    folds = np.asarray(folds)
    if len(y) == 0:
        raise ConfigError("calibration needs out-of-fold predictions, got none")
    scores = {m: cv_nll(m, p, y, folds) for m in METHODS} if method == "auto" else {}
    if method == "auto":
        t_nll, v_nll = scores["temperature"], scores["vector"]
        enough = int(np.bincount(y, minlength=p.shape[1]).min()) >= VECTOR_MIN_PER_CLASS
        chosen = ("vector" if enough and t_nll is not None and v_nll is not None and v_nll < t_nll - margin
                  else "temperature")
    else:
        chosen = method
    cal = IDENTITY if chosen == "none" else fit_map(chosen, p, y)
    after = cal.apply(p)
    before_cal, after_cal = calibration_summary(y, p, n_bins), calibration_summary(y, after, n_bins)
    cal.fit = {
        "requested": method, "chosen": chosen, "margin_nats": margin,
        "vector_min_per_class": VECTOR_MIN_PER_CLASS, "cv_nll": scores,
        "n_oof": int(len(y)), "n_bins": int(n_bins),
        "oof_before": {"ece": before_cal["ece"], "brier": before_cal["brier"], "nll": mean_nll(p, y)},
        "oof_after": {"ece": after_cal["ece"], "brier": after_cal["brier"], "nll": mean_nll(after, y)},
    }
    return Calibration(**{**asdict(cal), "fit": cal.fit})


def save_calibration(run_url: str, cal: Calibration) -> str:
    url = storage.join(run_url, CALIBRATION_FILE)
    storage.write_text_atomic(url, json.dumps(cal.to_dict(), indent=2, sort_keys=True) + "\n")
    return url


def load_calibration(run_url: str) -> Calibration:
    """The run's calibration map; the identity for a run trained before calibration existed."""
    url = storage.join(run_url, CALIBRATION_FILE)
    if not storage.exists(url):
        return IDENTITY
    try:
        data = json.loads(storage.read_text(url))
    except ValueError as exc:
        raise ConfigError(f"{url}: not valid JSON: {exc}") from None
    return Calibration.from_dict(data, url)
