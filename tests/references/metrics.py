"""Numpy references of the agreement metrics the per-layer report prints, computed in float64."""

from __future__ import annotations

import numpy as np


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays taken as flat vectors: ``sum(a*b) / (|a| |b|)``."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.sum(a * b) / (np.sqrt(np.sum(a * a)) * np.sqrt(np.sum(b * b))))


def snr_db(ref: np.ndarray, x: np.ndarray) -> float:
    """Signal-to-noise ratio of ``x`` against ``ref`` in decibels:
    ``10 log10(sum(ref^2) / sum((ref - x)^2))``."""
    ref, x = np.asarray(ref, np.float64), np.asarray(x, np.float64)
    return float(10.0 * np.log10(np.sum(ref * ref) / np.sum((ref - x) ** 2)))
