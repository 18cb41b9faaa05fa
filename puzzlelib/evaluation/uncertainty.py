"""Uncertainty of stage 06's numbers: how well a model knows when it is wrong, and how sure the
retention estimate is. Pure numpy, no model and no files.

What it does: turns multiple-choice scores into probabilities (``softmax``); calibration
(``reliability`` bins, ``ece``); selective prediction (``risk_coverage``, ``aurc``, ``optimal_aurc``,
and E-AURC = AURC − optimal inside ``uncertainty_metrics``, with Brier score and NLL); the paired
bootstrap 95 % interval of mean-accuracy retention (``bootstrap_retention``).
Reads: arrays of confidences / probabilities and 0/1 correctness. Writes: nothing.
Leaves out: where the scores come from (``evaluation.evaluate_model``), which tasks count and the
comparison table (``evaluation.summarize``), and plotting (``evaluation/plots.py``).
"""

from __future__ import annotations

import math

import numpy as np

# ------------------------------------------------------------------ uncertainty metrics (pure)

def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax: the choice scores of a sample as probabilities over its choices."""
    s = np.asarray(scores, dtype=float)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _bin_index(confidence: np.ndarray, bins: int) -> np.ndarray:
    # Bin b holds confidences in (b/bins, (b+1)/bins]; 0 goes to the first bin.
    return np.clip(np.ceil(np.asarray(confidence) * bins).astype(int) - 1, 0, bins - 1)


def reliability(confidence, correct, bins: int = 10) -> list[dict]:
    """Per equal-width confidence bin: count, mean confidence, accuracy (empty bins left out)."""
    conf, ok = np.asarray(confidence, float), np.asarray(correct, float)
    idx = _bin_index(conf, bins)
    return [{"lo": b / bins, "hi": (b + 1) / bins, "count": int((idx == b).sum()),
             "confidence": float(conf[idx == b].mean()), "accuracy": float(ok[idx == b].mean())}
            for b in range(bins) if (idx == b).any()]


def ece(confidence, correct, bins: int = 10) -> float:
    """Expected calibration error: Σ_bins |bin|/n · |accuracy(bin) − mean confidence(bin)|."""
    n = len(confidence)
    return float(sum(r["count"] / n * abs(r["accuracy"] - r["confidence"])
                     for r in reliability(confidence, correct, bins)))


def risk_coverage(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    """The risk–coverage curve of "answer only when confidence ≥ t", at every distinct t.

    Returns (coverage, risk), highest threshold first. Tied confidences enter together: a
    threshold cannot accept half of a tie.
    """
    conf, err = np.asarray(confidence, float), 1.0 - np.asarray(correct, float)
    order = np.argsort(-conf, kind="stable")
    conf, err = conf[order], err[order]
    last = np.r_[np.nonzero(np.diff(conf))[0], len(conf) - 1]  # the end of each tie group
    k = last + 1
    return k / len(conf), np.cumsum(err)[last] / k


def aurc(confidence, correct) -> float:
    """Area under the risk–coverage curve (step integral; lower is better). Without ties it equals
    the mean over k = 1..n of the error rate among the k most confident answers."""
    cov, risk = risk_coverage(confidence, correct)
    return float(np.sum(np.diff(np.r_[0.0, cov]) * risk))


def optimal_aurc(correct) -> float:
    """AURC of a perfect ranking (every right answer more confident than every wrong one): what a
    model with this accuracy could reach. E-AURC = AURC − this isolates the ranking quality."""
    ok = np.asarray(correct, float)
    n = len(ok)
    e = int(round(n - ok.sum()))
    k = np.arange(1, n + 1)
    return float(np.mean(np.maximum(0, k - (n - e)) / k))


def uncertainty_metrics(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> dict:
    """Accuracy, mean confidence, ECE, AURC, optimal AURC, E-AURC, Brier score and NLL of one
    model on one multiple-choice task, from its choice probabilities [n, choices]."""
    probs, labels = np.asarray(probs, float), np.asarray(labels, int)
    pred, conf = probs.argmax(1), probs.max(1)
    ok = (pred == labels).astype(float)
    onehot = np.eye(probs.shape[1])[labels]
    a, a_opt = aurc(conf, ok), optimal_aurc(ok)
    return {"accuracy": float(ok.mean()), "mean_confidence": float(conf.mean()), "ece": ece(conf, ok, bins),
            "aurc": a, "aurc_optimal": a_opt, "e_aurc": a - a_opt,
            "brier": float(((probs - onehot) ** 2).sum(1).mean()),
            "nll": float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())}


def bootstrap_retention(parent: dict[str, np.ndarray], child: dict[str, np.ndarray], iters: int = 1000,
                        seed: int = 0) -> tuple[float, float]:
    """Paired bootstrap 95 % interval of mean-accuracy retention (child mean / parent mean).

    ``parent`` / ``child``: per task, 0/1 correctness per sample, the same samples in the same order.
    Each resample draws the same sample indices for both models, so what the two share (an easy
    sample is easy for both) cancels, as it does in the point estimate.
    """
    if iters <= 0:
        return math.nan, math.nan
    rng = np.random.default_rng([seed, 0xB007])
    mp, mc = np.zeros(iters), np.zeros(iters)
    for t in parent:
        p, c = np.asarray(parent[t], float), np.asarray(child[t], float)
        idx = rng.integers(0, len(p), size=(iters, len(p)))
        mp += p[idx].mean(1) / len(parent)
        mc += c[idx].mean(1) / len(parent)
    ratio = mc / np.where(mp > 0, mp, np.nan)
    lo, hi = np.nanpercentile(ratio, [2.5, 97.5])
    return float(lo), float(hi)
