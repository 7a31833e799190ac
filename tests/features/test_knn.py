"""Weighted k-NN (DINO): the vote is the sum of exp(similarity / T) per class over the k nearest train features."""

from __future__ import annotations

import math

import pytest
import torch

from vitkit.features import knn_predict, knn_scores

# Unit vectors in the plane with their labels; the query (1, 0) has cosine 1, 0.8, 0.6, 0, -1 with them.
TRAIN = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
LABELS = torch.tensor([0, 1, 1, 0, 2])
QUERY = torch.tensor([[1.0, 0.0]])


def test_vote_values_by_formula():
    scores = knn_scores(TRAIN, LABELS, QUERY, num_classes=3, k=3, temperature=0.5)
    expected = [math.exp(1 / 0.5), math.exp(0.8 / 0.5) + math.exp(0.6 / 0.5), 0.0]  # k=3: rows 0, 1, 2 vote
    torch.testing.assert_close(scores, torch.tensor([expected]), rtol=1e-5, atol=0)


def test_temperature_decides_between_one_close_and_two_further_neighbours():
    # T = 0.5: two neighbours of class 1 at 0.8 and 0.6 outvote the exact match of class 0 (8.27 > 7.39);
    # DINO's T = 0.07 sharpens the weights so the exact match wins (e^14.3 > e^11.4 + e^8.6).
    assert knn_predict(TRAIN, LABELS, QUERY, 3, k=3, temperature=0.5).tolist() == [1]
    assert knn_predict(TRAIN, LABELS, QUERY, 3, k=3, temperature=0.07).tolist() == [0]
    # With k = 5 the opposite vector (cosine -1) votes too, with weight exp(-1 / T).
    scores = knn_scores(TRAIN, LABELS, QUERY, 3, k=5, temperature=0.5)
    assert scores[0, 2].item() == pytest.approx(math.exp(-2.0), rel=1e-5)
    assert scores[0, 0].item() == pytest.approx(math.exp(2.0) + math.exp(0.0), rel=1e-5)


@pytest.mark.parametrize("k", [0, 6, -1])
def test_k_out_of_range_is_named(k):
    with pytest.raises(ValueError, match=rf"k={k} neighbours .* 5 train features; choose 1 <= k <= 5"):
        knn_scores(TRAIN, LABELS, QUERY, 3, k=k)


def test_bad_temperature_and_labels_are_named():
    with pytest.raises(ValueError, match="temperature=0"):
        knn_scores(TRAIN, LABELS, QUERY, 3, k=2, temperature=0)
    with pytest.raises(ValueError, match=r"labels must lie in 0..1, got 0..2"):
        knn_scores(TRAIN, LABELS, QUERY, 2, k=2)
    with pytest.raises(ValueError, match="query features have 3 dimensions but the index has 2"):
        knn_scores(TRAIN, LABELS, torch.ones(1, 3), 3, k=2)
