"""The audit report without a host: report.json's fields from hand-made clusters, settings and scores, the files'
pixels, the HTML's embedded images, the score bands against hand-picked scores, identical bytes on a second make, and
bad combinations refused."""
import base64
import hashlib
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from finextract_core.clustering import ClusterResult
from finextract_core.embeddings import Embeddings
from finextract_core.metrics import metrics_from_similarity
from finextract_core.report import (BAND_COLOURS, HTML_NAME, JSON_NAME, SUMMARY_NAME, make_report, panel, score_band,
                                    write_report)
from finextract_core.run_settings import RunSettings

SETTINGS = RunSettings(mode="finextract", guidance_scale=5.0, k=0.0, seed=3, steps=20, sampler="ddim",
                       scheduler="ddim_uniform", denoise=1.0, latent_shape=(4, 8, 8), candidates=4, first_candidate=0,
                       noise="per-candidate-noise-v2", model_family="SD15", fine_tune="base + LoRA (shared weights)",
                       pack_version="0.1.0")
CLUSTERS = ClusterResult(method="ranked_cliques", n_candidates=4, n_clusters=2, min_clique_size=1, threshold=0.5,
                         background=0.1, ranked_by="memorisation score", centres=(2, 0), members=((1, 2), (0, 3)),
                         sizes=(2, 2), mean_similarities=(0.9, 0.8), scores=(0.61, 0.25), tightness=(0.9, 0.8),
                         separation=(0.8, 0.5), notes=("a note",))
# Colours that are whole bytes, so the PNGs hold them exactly.
EXTRACTED_COLOURS = [(200, 20, 20), (20, 40, 220)]
REFERENCE_COLOURS = [(250, 0, 0), (0, 0, 250), (0, 250, 0)]
# Best match of each reference: 0.75 (above both thresholds), 0.65 (above the loose one only), 0.2 (below).
SIMILARITY = np.array([[0.75, 0.1], [0.3, 0.65], [0.2, 0.1]])


def solid(colours, size=8) -> torch.Tensor:
    return torch.stack([torch.tensor(c, dtype=torch.float32).div(255).expand(size, size, 3) for c in colours])


def extracted_embeddings(model_id="sscd_test", preset="paper") -> Embeddings:
    return Embeddings(np.eye(2), model_id, preset)


def scored_report(**changes):
    scores = metrics_from_similarity(SIMILARITY, (0.6, 0.7), model_id="sscd_test", preset="paper")
    arguments = dict(extracted=solid(EXTRACTED_COLOURS), settings=SETTINGS, clusters=CLUSTERS,
                     extracted_embeddings=extracted_embeddings(),
                     models=[{"role": "pretrained", "file": "base.safetensors", "folder": "checkpoints", "bytes": 12,
                              "sha256": "ab" * 32}],
                     references=solid(REFERENCE_COLOURS, 12), scores=scores,
                     reference_names=["red.png", "blue.png", "green.png"])
    return make_report(**{**arguments, **changes})


def pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as picture:
        return np.asarray(picture.convert("RGB"))


def test_bands_follow_a_esr_exceeds():
    thresholds = (0.6, 0.7)
    assert [score_band(s, thresholds) for s in (0.71, 0.7, 0.65, 0.6, -0.2)] == [
        "strict", "loose", "loose", "below", "below"]
    assert score_band(0.99, ()) == "below", "without thresholds nothing is extracted"


def test_report_json_holds_the_typed_values():
    report = scored_report()
    content = json.loads(report.files[JSON_NAME])
    assert content == report.content
    assert content["sampling"] == SETTINGS.to_dict() and content["sampling"]["latent_shape"] == [4, 8, 8]
    assert content["clustering"]["centres"] == [2, 0] and content["clustering"]["notes"] == ["a note"]
    assert content["embedder"] == {"model_id": "sscd_test", "preset": "paper", "dim": 2}
    assert content["metrics"]["AS"] == pytest.approx((0.75 + 0.65 + 0.2) / 3)
    assert content["metrics"]["A-ESR"] == {"0.6": pytest.approx(2 / 3), "0.7": pytest.approx(1 / 3)}
    assert [(row["name"], row["best_match"], row["score"]) for row in content["references"]] == [
        ("red.png", 0, 0.75), ("blue.png", 1, 0.65), ("green.png", 0, 0.2)]
    assert report.headline == "AS 0.533, A-ESR>0.6: 0.67, A-ESR>0.7: 0.33"
    for entry, colour in zip(content["extracted"], EXTRACTED_COLOURS):
        png = report.files[entry["file"]]
        assert entry["sha256"] == hashlib.sha256(png).hexdigest() and entry["cluster_size"] == 2
        assert (pixels(png) == colour).all()
    assert [entry["memorisation_score"] for entry in content["extracted"]] == [0.61, 0.25]
    page = report.files[HTML_NAME].decode()
    assert "likeliest memorised first" in page and "biggest cluster first" not in page
    assert "memorisation score 0.6100" in page and "memorisation score 0.2500" in page
    assert sorted(report.files) == ["extracted_00.png", "extracted_01.png", HTML_NAME, JSON_NAME, SUMMARY_NAME]


def test_summary_draws_each_reference_its_match_and_its_band():
    report = scored_report()
    summary = pixels(report.files[SUMMARY_NAME])
    cell, header = 160, 70
    assert summary.shape == (header + 3 * cell, 2 * cell + 360, 3)
    # Best score first: red (0.75, strict), blue (0.65, loose), green (0.2, below); each beside extracted #0/#1/#0.
    for row, (reference, match, band) in enumerate([(0, 0, "strict"), (1, 1, "loose"), (2, 0, "below")]):
        top = header + row * cell
        assert (summary[top + 80, 80] == REFERENCE_COLOURS[reference]).all()
        assert (summary[top + 80, cell + 80] == EXTRACTED_COLOURS[match]).all()
        assert tuple(summary[top + 94, 2 * cell + 25]) == BAND_COLOURS[band], f"score bar of row {row}"


def test_html_is_self_contained_and_embeds_the_files():
    report = scored_report()
    page = report.files[HTML_NAME].decode("utf-8")
    assert "<script" not in page and "default-src 'none'" in page and "not a proof" in page
    assert "<b>AS 0.5333</b>" in page and "red.png" in page and "0.6500" in page
    embedded = [base64.b64decode(data) for data in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)]
    for name in ("extracted_00.png", "extracted_01.png", SUMMARY_NAME):
        assert report.files[name] in embedded, f"{name} is not the picture the page shows"


def test_same_inputs_same_bytes_and_a_report_without_references():
    assert scored_report().files == scored_report().files
    plain = make_report(solid(EXTRACTED_COLOURS), SETTINGS, CLUSTERS, extracted_embeddings(), [])
    assert plain.content["metrics"] is None and plain.content["references"] == []
    assert plain.headline == "2 extracted images, no references" and plain.thresholds == []
    summary = pixels(plain.files[SUMMARY_NAME])
    assert (summary[40 + 80, 80] == EXTRACTED_COLOURS[0]).all() and (summary[40 + 80, 160 + 80] ==
                                                                     EXTRACTED_COLOURS[1]).all()


def test_panel_gives_each_score_its_band_and_colour():
    shown = panel(scored_report(), "finextract/audit")
    assert [(row["band"], row["colour"]) for row in shown["scores"]] == [
        ("strict", "#008c00"), ("loose", "#c87800"), ("below", "#b40000")]
    assert shown["thresholds"] == ["0.6", "0.7"] and shown["subfolder"] == "finextract/audit"
    assert shown["clusters"] == [{"filename": "extracted_00.png", "size": 2, "score": 0.61},
                                 {"filename": "extracted_01.png", "size": 2, "score": 0.25}]


def test_write_report_replaces_a_previous_one(tmp_path):
    (tmp_path / "extracted_05.png").write_bytes(b"from a run with more clusters")
    (tmp_path / "notes.txt").write_text("the user's own file")
    report = scored_report()
    assert write_report(str(tmp_path), report) == str(tmp_path / HTML_NAME)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*report.files, "notes.txt"])
    for name, data in report.files.items():
        assert (tmp_path / name).read_bytes() == data


def test_inconsistent_inputs_are_refused_with_what_to_connect():
    with pytest.raises(ValueError, match="connect both references and scores"):
        scored_report(scores=None)
    with pytest.raises(ValueError, match="3 extracted images and 2 embeddings for 2 clusters"):
        scored_report(extracted=solid([*EXTRACTED_COLOURS, (1, 2, 3)]))
    with pytest.raises(ValueError, match="scores are of 3 references but 2 reference images"):
        scored_report(references=solid(REFERENCE_COLOURS[:2]))
    with pytest.raises(ValueError, match="the scores compare sscd_test/preset paper.*sscd_other/preset paper"):
        scored_report(extracted_embeddings=extracted_embeddings("sscd_other"))
