"""Tests of alignkit.layers: layer correspondence and transitions on hand-made matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignkit.layers import (
    alignment_path,
    best_match,
    first_departure,
    remapping_index,
    transition_layer,
)


def test_correspondence_on_identity():
    eye = np.eye(6)
    assert best_match(eye).tolist() == list(range(6))
    assert alignment_path(eye) == [(i, i) for i in range(6)]
    assert remapping_index(eye) == 0.0


def test_correspondence_on_shifted_band():
    n_layers = 6
    m = np.zeros((n_layers, n_layers))
    for i in range(n_layers):
        m[i, min(i + 1, n_layers - 1)] = 1.0  # base layer i looks like tuned layer i + 1
    assert best_match(m).tolist() == [1, 2, 3, 4, 5, 5]
    assert remapping_index(m) == pytest.approx(5 / 6)
    assert alignment_path(m) == [(0, 0), (0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 5)]
    rect = alignment_path(np.random.default_rng(0).random((4, 7)))
    assert rect[0] == (0, 0) and rect[-1] == (3, 6)
    steps = np.diff(np.array(rect), axis=0)
    assert ((steps >= 0) & (steps <= 1)).all() and (steps.sum(1) >= 1).all()
    with pytest.raises(ValueError, match="square"):
        remapping_index(np.zeros((3, 4)))


def test_transition_layer_on_hand_curve():
    curve = [1.0, 0.99, 0.98, 0.9, 0.6, 0.55, 0.5]
    assert transition_layer(curve) == 4  # the drop 0.9 -> 0.6 happens entering layer 4
    assert transition_layer(np.array([0.2, 0.9])) == 1
    with pytest.raises(ValueError, match="at least 2 layers"):
        transition_layer([1.0])


def test_first_departure():
    steps = [0, 100, 200, 300]
    by_step = np.array([[1.0, 1.0, 1.0], [0.99, 0.9, 1.0], [0.95, 0.85, 1.0], [0.8, 0.97, 1.0]])
    got = first_departure(steps, by_step, np.array([0.9, 0.95, 0.9]))
    assert got.tolist() == [300, 100, -1]
    assert first_departure(steps, by_step, 0.0).tolist() == [-1, -1, -1]
    with pytest.raises(ValueError, match="strictly increasing"):
        first_departure([0, 200, 100, 300], by_step, 0.9)


def test_inputs_are_checked_and_tensors_accepted():
    assert best_match(torch.eye(3)).tolist() == [0, 1, 2]
    assert transition_layer(torch.tensor([1.0, 0.5, 0.4])) == 1
    with pytest.raises(ValueError, match="non-empty 2-D"):
        best_match(np.zeros(3))
    with pytest.raises(ValueError, match="contains NaN or Inf"):
        alignment_path(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="layerwise_values contains NaN or Inf"):
        transition_layer([1.0, np.inf])
