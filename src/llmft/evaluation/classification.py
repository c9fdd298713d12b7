"""What a classifier's predictions mean for its users, from scikit-learn's metrics: precision,
recall and F1 per class, the confusion matrix and, for two classes, the areas under the ROC and
precision-recall curves and the decision threshold that keeps the false-positive rate within a
limit ("how many good messages does it throw away?").

A two-class run's positive class is its second label (run.json's order, sorted: "spam" after
"ham", "1" after "0"); a text is positive when that class's probability reaches the threshold.

scikit-learn and matplotlib are imported where they are used: they take seconds to import, which
every llmft command would pay otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from llmft.errors import LlmftError
from llmft.rundir import RunDir

DEFAULT_MAX_FPR = 0.01
Scored = tuple[np.ndarray, np.ndarray]  # true label indices (N,), every label's probability (N, C)


def check_max_fpr(max_fpr: float) -> None:
    if not 0 < max_fpr < 1:
        raise LlmftError(f"--max-fpr must be a false-positive rate between 0 and 1, got {max_fpr}")


def check_threshold(threshold: float | None, labels: list[str]) -> None:
    """`--threshold` applies to a two-class run's positive class, as a probability."""
    if threshold is None:
        return
    if len(labels) != 2:
        raise LlmftError(f"--threshold needs a two-class run; this one has {len(labels)} classes ({', '.join(labels)})")
    if not 0 <= threshold <= 1:
        raise LlmftError(f"--threshold must be a probability between 0 and 1, got {threshold}")


def decide(probabilities: list[float], threshold: float | None = None) -> int:
    """The predicted label's index: the most probable (the first of equal ones, as argmax), or,
    with a `threshold`, the positive class when its probability reaches it."""
    if threshold is None:
        return max(range(len(probabilities)), key=probabilities.__getitem__)
    return int(probabilities[1] >= threshold)


def two_classes(labels: list[str], y_true: np.ndarray) -> bool:
    """Whether the curves apply: a two-class run, and texts of both classes."""
    return len(labels) == 2 and len(np.unique(y_true)) == 2


def classification_metrics(labels: list[str], scored: Scored) -> dict[str, Any]:
    """Accuracy, per class precision/recall/F1/support, the confusion matrix (rows: true label,
    columns: predicted) and, for two classes, ROC AUC and PR AUC (average precision)."""
    from sklearn.metrics import (
        accuracy_score, average_precision_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score,
    )

    y_true, probs = scored
    y_pred, index = probs.argmax(1), list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=index, zero_division=0)
    out: dict[str, Any] = {
        "texts": int(len(y_true)), "accuracy": float(accuracy_score(y_true, y_pred)),
        "classes": {label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                    for label, p, r, f, s in zip(labels, precision, recall, f1, support)},
        "confusion": confusion_matrix(y_true, y_pred, labels=index).tolist()}
    if two_classes(labels, y_true):
        out.update(positive=labels[1], roc_auc=float(roc_auc_score(y_true, probs[:, 1])),
                   pr_auc=float(average_precision_score(y_true, probs[:, 1])))
    return out


def threshold_for_fpr(y_true: np.ndarray, scores: np.ndarray, max_fpr: float) -> float | None:
    """The lowest threshold whose false-positive rate stays within `max_fpr` (the most recall the
    limit allows); None when only calling nothing positive does."""
    from sklearn.metrics import roc_curve

    fpr, _, thresholds = roc_curve(y_true, scores, drop_intermediate=False)
    within = np.flatnonzero(fpr <= max_fpr)[-1]
    return None if np.isinf(thresholds[within]) else float(thresholds[within])


def rates_at(y_true: np.ndarray, scores: np.ndarray, threshold: float | None) -> tuple[float, float]:
    """(false-positive rate, recall) when a score at or above `threshold` is positive."""
    positive = scores >= threshold if threshold is not None else np.zeros(len(scores), dtype=bool)
    return float(positive[y_true == 0].mean()), float(positive[y_true == 1].mean())


def fpr_threshold(chosen_on: str, chooser: Scored, evaluated: Scored, max_fpr: float) -> dict[str, Any]:
    """The threshold for `max_fpr` chosen on `chooser`'s texts, and its rates on `evaluated`'s."""
    threshold = threshold_for_fpr(chooser[0], chooser[1][:, 1], max_fpr)
    fpr, recall = rates_at(evaluated[0], evaluated[1][:, 1], threshold)
    return {"max_fpr": max_fpr, "threshold": threshold, "chosen_on": chosen_on, "fpr": fpr, "recall": recall}


def classification_report(name: str, labels: list[str], evaluated: Scored, chooser: Scored | None = None,
                          max_fpr: float = DEFAULT_MAX_FPR) -> dict[str, Any]:
    """The metrics of `evaluated` (called `name`), with the `max_fpr` threshold chosen on the
    validation split's `chooser` when both have two classes."""
    report = {"evaluated": name, **classification_metrics(labels, evaluated)}
    if chooser is not None and "positive" in report and two_classes(labels, chooser[0]):
        report["threshold"] = fpr_threshold("validation", chooser, evaluated, max_fpr)
    return report


def plot_report(labels: list[str], evaluated: Scored, name: str, run: RunDir) -> list[Path]:
    """The confusion matrix of `evaluated` (called `name`) in `run` (confusion.png/.pdf) and,
    for two classes, its ROC and precision-recall curves (roc, pr)."""
    from sklearn.metrics import (
        ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay, average_precision_score, confusion_matrix,
        precision_recall_curve, roc_auc_score, roc_curve,
    )

    from llmft.plots import plot_display

    y_true, probs = evaluated
    matrix = confusion_matrix(y_true, probs.argmax(1), labels=list(range(len(labels))))
    paths = plot_display(ConfusionMatrixDisplay(matrix, display_labels=labels), f"Confusion matrix: {name}",
                         run.plot("confusion"), size=max(4.5, 0.6 * len(labels) + 2), colorbar=False,
                         values_format="d")
    if two_classes(labels, y_true):
        scores = probs[:, 1]
        fpr, tpr, _ = roc_curve(y_true, scores)
        precision, recall, _ = precision_recall_curve(y_true, scores)
        paths += plot_display(RocCurveDisplay(fpr=fpr, tpr=tpr, roc_auc=roc_auc_score(y_true, scores), name=labels[1]),
                              f"ROC curve: {name}", run.plot("roc"), plot_chance_level=True)
        paths += plot_display(PrecisionRecallDisplay(precision=precision, recall=recall, name=labels[1],
                                                     average_precision=average_precision_score(y_true, scores)),
                              f"Precision-recall curve: {name}", run.plot("pr"))
    return paths


def report_lines(report: dict[str, Any]) -> list[str]:
    """The report as a user reads it: a table per class, the confusion matrix, the areas and the threshold."""
    width = max(12, *(len(label) + 2 for label in report["classes"]))
    lines = [f"{report['evaluated']} ({report['texts']:,} texts): accuracy {report['accuracy']:.2%}",
             f"{'class':{width}}{'precision':>11}{'recall':>9}{'F1':>9}{'texts':>8}"]
    lines += [f"{label:{width}}{m['precision']:>11.2%}{m['recall']:>9.2%}{m['f1']:>9.2%}{m['support']:>8,}"
              for label, m in report["classes"].items()]
    lines.append("confusion matrix (rows: true label, columns: predicted):")
    lines.append(" " * width + "".join(f"{label:>{width}}" for label in report["classes"]))
    lines += [f"{label:{width}}" + "".join(f"{n:>{width},}" for n in row)
              for label, row in zip(report["classes"], report["confusion"])]
    if "positive" in report:
        lines.append(f"ROC AUC {report['roc_auc']:.4f} | PR AUC (average precision) {report['pr_auc']:.4f} "
                     f"(positive class: {report['positive']})")
    if "threshold" in report:
        t = report["threshold"]
        chosen = ("no threshold does (nothing would be positive)" if t["threshold"] is None else
                  f"threshold {t['threshold']:.6g} (classify predict --threshold {t['threshold']:.6g})")
        lines.append(f"at most {t['max_fpr']:.1%} false positives on the {t['chosen_on']} split: {chosen}; on "
                     f"{report['evaluated']}: {t['fpr']:.2%} false positives, recall {t['recall']:.2%}")
    return lines
