"""Evaluation: metrics from a confusion matrix, plots."""

from .metrics import ClassificationReport, ConfusionMatrix, classification_report, topk_accuracy

__all__ = ["ClassificationReport", "ConfusionMatrix", "classification_report", "topk_accuracy"]
