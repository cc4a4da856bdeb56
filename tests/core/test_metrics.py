"""Extraction metrics against values computed by hand."""
import json

import numpy as np
import pytest

from finextract_core.embeddings import Embeddings
from finextract_core.metrics import ExtractionScores, extraction_metrics, metrics_from_similarity


def test_metrics_hand_computed_values():
    # 3 references x 2 extracted. Best per reference: 0.9 (match 1), 0.6 (match 0, exactly at the loose threshold),
    # 0.65 (match 0, tie with match 1 -> smallest index).
    similarity = np.array([[0.2, 0.9], [0.6, -0.1], [0.65, 0.65]])
    metrics = metrics_from_similarity(similarity, model_id="m", preset="paper")
    assert metrics.best_match == (1, 0, 0)
    assert metrics.best_score == pytest.approx((0.9, 0.6, 0.65))
    assert metrics.average_similarity == pytest.approx((0.9 + 0.6 + 0.65) / 3)
    # "exceeds" is strict: 0.6 does not exceed 0.6.
    assert metrics.extraction_success_rates == {0.6: pytest.approx(2 / 3), 0.7: pytest.approx(1 / 3)}
    assert metrics_from_similarity(similarity, thresholds=[0.5]).extraction_success_rates == {0.5: 1.0}


def test_metrics_table_outputs():
    metrics = metrics_from_similarity(np.array([[0.75, 0.1], [0.3, 0.62]]), model_id="sscd_disc_large",
                                      preset="paper")
    assert metrics.to_csv().splitlines() == [
        "reference,best_match,score,exceeds_0.6,exceeds_0.7",
        "0,0,0.750000,1,1",
        "1,1,0.620000,1,0",
    ]
    data = metrics.to_dict()
    assert data["AS"] == pytest.approx(0.685)
    assert data["A-ESR"] == {"0.6": 1.0, "0.7": 0.5}
    assert data["per_reference"][1] == {"reference": 1, "best_match": 1, "score": 0.62}
    assert '"model_id": "sscd_disc_large"' in metrics.to_json()


def test_metrics_from_embeddings_and_space_check():
    references = Embeddings(np.array([[1.0, 0.0], [0.0, 1.0]]), "sscd_disc_large", "paper")
    extracted = Embeddings(np.array([[0.28, 0.96]]), "sscd_disc_large", "paper")
    metrics = extraction_metrics(references, extracted)
    assert metrics.best_score == pytest.approx((0.28, 0.96))
    assert metrics.extraction_success_rates == {0.6: 0.5, 0.7: 0.5}
    other_preset = Embeddings(np.array([[0.6, 0.8]]), "sscd_disc_large", "sscd")
    with pytest.raises(ValueError, match="sscd_disc_large/preset paper .* vs sscd_disc_large/preset sscd"):
        extraction_metrics(references, other_preset)
    other_model = Embeddings(np.array([[0.6, 0.8]]), "sscd_disc_mixup", "paper")
    with pytest.raises(ValueError, match="embed both with the same model and preset"):
        extraction_metrics(references, other_model)
    with pytest.raises(ValueError, match="norm"):
        Embeddings(np.array([[3.0, 4.0]]), "m", "paper")
    with pytest.raises(ValueError, match="NaN"):
        Embeddings(np.array([[np.nan, 1.0]]), "m", "paper")


def test_embeddings_copy_what_the_caller_can_still_change_and_check_every_row():
    rows = np.eye(3, dtype=np.float32)
    embeddings = Embeddings(rows, "m", "paper")
    rows[0, 0] = 5.0  # the caller's array changes; the embeddings do not
    assert embeddings.vectors[0, 0] == 1.0 and not embeddings.vectors.flags.writeable
    # A read-only float32 array that owns its memory (what a candidate bank reads back) is kept, not copied, so a
    # bank's N rows are held once; a read-only view of a writable array is still copied.
    frozen = np.eye(3, dtype=np.float32)
    frozen.flags.writeable = False
    assert Embeddings(frozen, "m", "paper").vectors is frozen
    view = np.eye(3, dtype=np.float32)[:]
    view.flags.writeable = False
    assert Embeddings(view, "m", "paper").vectors is not view
    # Rows are checked in blocks: a bad row far past the first block is found and named by its own index.
    many = np.tile(np.eye(4, dtype=np.float32), (300, 1))
    many[1000] *= 2
    with pytest.raises(ValueError, match="row 1000 has L2 norm 2.000000"):
        Embeddings(many, "m", "paper")
    many[1000] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        Embeddings(many, "m", "paper")


def test_scores_come_back_from_their_json():
    """Extraction Metrics' metrics_json read back (the deprecated Audit Report's input) is the same scores."""
    metrics = metrics_from_similarity(np.array([[0.75, 0.1], [0.3, 0.62], [0.2, 0.1]]), thresholds=(0.5, 0.7),
                                      model_id="sscd_disc_large", preset="paper")
    assert ExtractionScores.from_dict(json.loads(metrics.to_json())) == metrics
    with pytest.raises(ValueError, match="not Extraction Metrics' scores.*connect its metrics_json"):
        ExtractionScores.from_dict({"AS": 0.5})
