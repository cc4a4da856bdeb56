"""The audit report: what an extraction found and everything needed to reproduce it, as report.json, a
self-contained report.html (images as data URIs, no scripts), summary.png and the extracted images as PNGs.

Nothing in a report depends on the time or the machine, so the same inputs give byte-identical files: two reports can
be compared with a plain diff. report.json's fields (docs/architecture.md lists them): pack_version, models (role,
file, folder, bytes, sha256), sampling (RunSettings.to_dict), embedder (model_id, preset, dim), clustering
(ClusterResult.to_dict), metrics (ExtractionScores.to_dict, or null without references), extracted (index, file,
cluster_size, memorisation_score, sha256), references (reference, best_match, score, name; best score first), meaning, not_meaning.

A score's band (above the strict threshold, above the loose one, or below both) and its colour are decided here once,
for the report, the metrics grid and the panel in the graph.
"""
from __future__ import annotations

import base64
import hashlib
import html
import json
import os
from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from . import __version__
from .clustering import ClusterResult
from .embeddings import Embeddings
from .images import png_bytes, to_pil
from .metrics import ExtractionScores
from .run_settings import RunSettings

EXTRACTED_NAME = "extracted_{:02d}.png"
SUMMARY_NAME = "summary.png"
JSON_NAME = "report.json"
HTML_NAME = "report.html"
CELL = 160  # pixel side of each image in the summary

MEANING = (
    "Each score is the cosine similarity between the descriptors of a reference image and its closest extracted image "
    "(SSCD copy detection in the paper; 'embedder' names the one used here): about 1 for the same picture, about 0 "
    "for unrelated ones. The paper counts a reference as extracted when its best score exceeds 0.6 (loose) or 0.7 "
    "(strict); AS is the mean best score and A-ESR the fraction of references above a threshold."
)
NOT_MEANING = (
    "A score is a similarity, not a proof. A high score says that an extracted image looks like a copy of the "
    "reference to the descriptor; it does not prove that the reference was in the fine-tuning set (the base model may "
    "have learnt a similar picture, near-duplicates exist, and descriptors can be fooled). A low score does not prove "
    "the opposite either: extraction can miss images that were used (try more candidates, another w' or caption). "
    "Without references, the cluster sizes only say how often the model produced similar images."
)


# A score's band against the A-ESR thresholds, and its colour wherever a score is drawn.
BAND_COLOURS = {"strict": (0, 140, 0), "loose": (200, 120, 0), "below": (180, 0, 0)}


def score_band(score: float, thresholds: Sequence[float]) -> str:
    """"strict" when the score exceeds every threshold, "loose" when it exceeds the lowest, else "below" (A-ESR's
    "exceeds": strictly greater)."""
    if thresholds and score > max(thresholds):
        return "strict"
    if thresholds and score > min(thresholds):
        return "loose"
    return "below"


def band_hex(band: str) -> str:
    return "#{:02x}{:02x}{:02x}".format(*BAND_COLOURS[band])


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _score_bar(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], score: float,
               thresholds: list[float]) -> None:
    """A horizontal bar from similarity 0 to 1 with the thresholds as vertical lines."""
    left, top, right, bottom = box
    width = right - left
    draw.rectangle(box, outline=(120, 120, 120))
    draw.rectangle((left, top, left + round(width * min(max(score, 0.0), 1.0)), bottom),
                   fill=BAND_COLOURS[score_band(score, thresholds)])
    for threshold in thresholds:
        x = left + round(width * threshold)
        draw.line((x, top - 6, x, bottom + 6), fill=(0, 0, 0), width=2)
        draw.text((x - 10, bottom + 8), f"{threshold:g}", fill=(0, 0, 0), font=_font(13))


def summary_with_references(references: torch.Tensor, extracted: torch.Tensor, rows: list[dict],
                            metrics: dict, thresholds: list[float], names: list[str], embedder: str) -> Image.Image:
    """reference | best extracted match | score bar, best score first, under a header with AS and A-ESR."""
    header = 70
    width = 2 * CELL + 360
    summary = Image.new("RGB", (width, header + CELL * len(rows)), "white")
    draw = ImageDraw.Draw(summary)
    rates = "   ".join(f"A-ESR > {t:g}: {metrics['A-ESR'][f'{t:g}']:.2f}" for t in thresholds)
    draw.text((10, 8), f"AS {metrics['AS']:.3f}   {rates}", fill="black", font=_font(20))
    draw.text((10, 40), f"reference | best extracted match | {embedder} similarity (a similarity, not a proof)",
              fill=(80, 80, 80), font=_font(14))
    for position, row in enumerate(rows):
        top = header + position * CELL
        summary.paste(to_pil(references[row["reference"]]).resize((CELL, CELL), Image.BICUBIC), (0, top))
        summary.paste(to_pil(extracted[row["best_match"]]).resize((CELL, CELL), Image.BICUBIC), (CELL, top))
        left = 2 * CELL + 20
        draw.text((left, top + 18), f"{row['score']:.3f}", fill="black", font=_font(26))
        draw.text((left, top + 52), f"{names[row['reference']]} / extracted #{row['best_match']}", fill="black",
                  font=_font(13))
        _score_bar(draw, (left, top + 84, width - 20, top + 104), row["score"], thresholds)
    return summary


def cluster_order(ranked_by: str) -> str:
    """How the extracted images are ordered (ClusterResult.ranked_by), in words for headings."""
    return "likeliest memorised first" if ranked_by == "memorisation score" else "biggest cluster first"


def summary_of_clusters(extracted: torch.Tensor, clusters: ClusterResult) -> Image.Image:
    """The extracted images in a grid, each labelled with its cluster's size and memorisation score (no references
    to score against)."""
    columns = min(clusters.n_clusters, 5)
    label = 44
    grid_rows = -(-clusters.n_clusters // columns)
    summary = Image.new("RGB", (columns * CELL, 40 + grid_rows * (CELL + label)), "white")
    draw = ImageDraw.Draw(summary)
    draw.text((8, 10), f"extracted images (cluster centres, {cluster_order(clusters.ranked_by)}); no references given",
              fill="black", font=_font(14))
    for index, (size, score) in enumerate(zip(clusters.sizes, clusters.scores)):
        left, top = (index % columns) * CELL, 40 + (index // columns) * (CELL + label)
        summary.paste(to_pil(extracted[index]).resize((CELL, CELL), Image.BICUBIC), (left, top))
        draw.text((left + 6, top + CELL + 4), f"#{index}: {size} candidates", fill="black", font=_font(14))
        draw.text((left + 6, top + CELL + 22), f"memorisation score {score:.3f}", fill="black", font=_font(13))
    return summary


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _definition_rows(values: dict) -> str:
    return "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(json.dumps(v, sort_keys=True))}</td></tr>"
                   for k, v in sorted(values.items()))


def render_html(report: dict, summary_png: bytes, extracted_pngs: list[bytes], reference_pngs: list[bytes]) -> str:
    escape = html.escape
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        # No scripts and no remote content: the report is safe to open anywhere, including from ComfyUI's origin.
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">",
        "<title>FineXtract audit report</title><style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;"
        "padding:0 1em}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:left;vertical-align:top}img.cell{width:160px;height:160px;image-rendering:auto}"
        ".meaning{background:#f4f7ff;border-left:4px solid #36c;padding:.5em 1em}"
        ".caveat{background:#fff7ec;border-left:4px solid #d80;padding:.5em 1em}</style></head><body>",
        "<h1>FineXtract audit report</h1>",
        f"<p class='meaning'><b>What a score means.</b> {escape(MEANING)}</p>",
        f"<p class='caveat'><b>What it does not mean.</b> {escape(NOT_MEANING)}</p>",
    ]
    base_check = report["base_check"]
    if base_check is not None and base_check["verdict"] == "different":
        parts.append(f"<p class='caveat'><b>Base model.</b> {escape(base_check['message'])}</p>")
    metrics = report["metrics"]
    if metrics is not None:
        rates = ", ".join(f"A-ESR &gt; {escape(t)}: {rate:.3f}" for t, rate in sorted(metrics["A-ESR"].items()))
        parts.append(f"<h2>Scores</h2><p><b>AS {metrics['AS']:.4f}</b>; {rates} "
                     f"({len(report['references'])} references, {len(extracted_pngs)} extracted images).</p>")
    parts.append(f"<h2>Summary</h2><img alt='summary' src='{_data_uri(summary_png)}' style='max-width:100%'>")
    if metrics is not None:
        parts.append("<h2>Per reference, best score first</h2><table><tr><th>reference</th><th>best extracted match"
                     "</th><th>similarity</th><th>beyond thresholds</th></tr>")
        for row in report["references"]:
            exceeded = ", ".join(f"&gt; {escape(t)}" for t in sorted(metrics["A-ESR"]) if row["score"] > float(t))
            parts.append(
                f"<tr><td><img class='cell' alt='reference' src='{_data_uri(reference_pngs[row['reference']])}'>"
                f"<br>{escape(row['name'])}</td><td><img class='cell' alt='match' "
                f"src='{_data_uri(extracted_pngs[row['best_match']])}'><br>extracted #{row['best_match']}</td>"
                f"<td>{row['score']:.4f}</td><td>{exceeded or 'none'}</td></tr>")
        parts.append("</table>")
    parts.append(f"<h2>Extracted images (cluster centres, {cluster_order(report['clustering']['ranked_by'])})</h2>"
                 "<table><tr>")
    for entry, png in zip(report["extracted"], extracted_pngs):
        parts.append(f"<td><img class='cell' alt='extracted' src='{_data_uri(png)}'><br>#{entry['index']}: "
                     f"{entry['cluster_size']} candidates<br>memorisation score {entry['memorisation_score']:.4f}"
                     f"<br>{escape(entry['file'])}</td>")
    parts.append("</tr></table><h2>How to reproduce this run</h2><h3>Model files</h3><table><tr><th>role</th>"
                 "<th>file</th><th>folder</th><th>bytes</th><th>SHA-256</th></tr>")
    for model in report["models"]:
        parts.append(f"<tr><td>{escape(model['role'])}</td><td>{escape(model['file'])}</td><td>"
                     f"{escape(model['folder'])}</td><td>{model['bytes']}</td><td><code>{model['sha256']}</code>"
                     "</td></tr>")
    parts.append("</table>")
    if base_check is not None:
        parts.append(f"<p>Base check ({escape(base_check['verdict'])}): {escape(base_check['message'])}</p>")
    parts.append("<h3>Sampling</h3><table>" + _definition_rows(report["sampling"]) + "</table>")
    parts.append("<h3>Embedder</h3><table>" + _definition_rows(report["embedder"]) + "</table>")
    clustering = {k: v for k, v in report["clustering"].items() if k != "members"}
    parts.append("<h3>Clustering</h3><table>" + _definition_rows(clustering) + "</table>")
    parts.append(f"<p>Pack: FineXtract for ComfyUI {escape(report['pack_version'])}. Every setting, hash and score is "
                 "in report.json next to this page.</p></body></html>\n")
    return "".join(parts)


@dataclass(frozen=True)
class AuditReport:
    """A report ready to write: report.json's content, every file's bytes by name, and a one-line headline."""

    content: dict
    files: dict[str, bytes]
    headline: str

    @property
    def extracted_files(self) -> list[str]:
        return [entry["file"] for entry in self.content["extracted"]]

    @property
    def thresholds(self) -> list[float]:
        metrics = self.content["metrics"]
        return sorted(float(t) for t in metrics["A-ESR"]) if metrics is not None else []


def make_report(extracted: torch.Tensor, settings: RunSettings, clusters: ClusterResult,
                extracted_embeddings: Embeddings, models: list[dict], references: torch.Tensor | None = None,
                scores: ExtractionScores | None = None, reference_names: Sequence[str] | None = None,
                base_check: dict | None = None) -> AuditReport:
    """The report of ``extracted`` (one image per cluster, in the clusters' order, as Extracted Images gives them),
    scored against ``references`` when ``scores`` (their Extraction Metrics) is given. ``reference_names`` label the
    references when there is one per reference; otherwise they are numbered. ``base_check``: for a LoRA, whether the
    pretrained file is the base its metadata records (evidence.BaseCheck.to_dict()); a mismatch heads the page."""
    if (references is None) != (scores is None):
        raise ValueError("connect both references and scores (from Extraction Metrics), or neither")
    if extracted.shape[0] != clusters.n_clusters or len(extracted_embeddings) != clusters.n_clusters:
        raise ValueError(f"{extracted.shape[0]} extracted images and {len(extracted_embeddings)} embeddings for "
                         f"{clusters.n_clusters} clusters: connect the extracted images made from these clusters")
    extracted_pngs = [png_bytes(to_pil(image)) for image in extracted]
    extracted_files = [EXTRACTED_NAME.format(i) for i in range(len(extracted_pngs))]
    content = {
        "pack_version": __version__,
        "models": models,
        "base_check": base_check,
        "sampling": settings.to_dict(),
        "embedder": {"model_id": extracted_embeddings.model_id, "preset": extracted_embeddings.preset,
                     "dim": extracted_embeddings.dim},
        "clustering": clusters.to_dict(),
        "metrics": None,
        "extracted": [{"index": i, "file": name, "cluster_size": size, "memorisation_score": score,
                       "sha256": hashlib.sha256(png).hexdigest()}
                      for i, (name, size, score, png) in enumerate(zip(extracted_files, clusters.sizes, clusters.scores,
                                                                       extracted_pngs))],
        "references": [],
        "meaning": MEANING,
        "not_meaning": NOT_MEANING,
    }
    reference_pngs = []
    if scores is None:
        summary = summary_of_clusters(extracted, clusters)
        headline = f"{len(extracted_files)} extracted images, no references"
    else:
        _check_scores(scores, references, extracted_embeddings)
        metrics = scores.to_dict()
        count = references.shape[0]
        names = list(reference_names) if reference_names is not None and len(reference_names) == count else [
            f"reference {i}" for i in range(count)]
        rows = sorted(metrics["per_reference"], key=lambda row: (-row["score"], row["reference"]))
        content.update(metrics=metrics, references=[{**row, "name": names[row["reference"]]} for row in rows])
        thresholds = sorted(scores.extraction_success_rates)
        reference_pngs = [png_bytes(to_pil(image)) for image in references]
        summary = summary_with_references(references, extracted, rows, metrics, thresholds, names,
                                          extracted_embeddings.model_id)
        headline = f"AS {metrics['AS']:.3f}, " + ", ".join(f"A-ESR>{t}: {r:.2f}"
                                                          for t, r in sorted(metrics["A-ESR"].items()))
    summary_png = png_bytes(summary)
    text = json.dumps(content, sort_keys=True, indent=2) + "\n"
    content = json.loads(text)  # what report.json holds (lists where the dataclasses have tuples)
    files = dict(zip(extracted_files, extracted_pngs))
    files[SUMMARY_NAME] = summary_png
    files[JSON_NAME] = text.encode("utf-8")
    files[HTML_NAME] = render_html(content, summary_png, extracted_pngs, reference_pngs).encode("utf-8")
    return AuditReport(content, files, headline)


def _check_scores(scores: ExtractionScores, references: torch.Tensor, extracted_embeddings: Embeddings) -> None:
    if len(scores.best_score) != references.shape[0]:
        raise ValueError(f"the scores are of {len(scores.best_score)} references but {references.shape[0]} reference "
                         "images are connected: connect the references the Extraction Metrics node scored")
    if max(scores.best_match) >= len(extracted_embeddings):
        raise ValueError(f"the scores match references to extracted image #{max(scores.best_match)}, but there are "
                         f"{len(extracted_embeddings)}: connect the Extraction Metrics of these extracted images")
    if (scores.model_id, scores.preset) != (extracted_embeddings.model_id, extracted_embeddings.preset):
        raise ValueError(f"the scores compare {scores.model_id}/preset {scores.preset} embeddings, the extracted "
                         f"images have {extracted_embeddings.space} ones: connect the Extraction Metrics of these "
                         "extracted images")


def write_report(folder: str, report: AuditReport) -> str:
    """Writes every file of ``report`` into ``folder`` (which must exist) and returns the path of report.html.

    Extracted images that a previous report in the same folder had and this one has not are removed, so a re-run
    with fewer clusters leaves no stale picture behind."""
    for name in os.listdir(folder):
        if name.startswith("extracted_") and name.endswith(".png") and name not in report.files:
            os.remove(os.path.join(folder, name))
    for name, data in report.files.items():
        with open(os.path.join(folder, name), "wb") as handle:
            handle.write(data)
    return os.path.join(folder, HTML_NAME)


def panel(report: AuditReport, subfolder: str) -> dict:
    """What the graph's panel shows (web/js/finextract.js): links, the gallery, and each score with its band and
    colour, so the panel colours scores by the same rule as the report."""
    thresholds = report.thresholds
    bands = [score_band(row["score"], thresholds) for row in report.content["references"]]
    return {
        "subfolder": subfolder, "html": HTML_NAME, "json": JSON_NAME, "headline": report.headline,
        "clusters": [{"filename": entry["file"], "size": entry["cluster_size"], "score": entry["memorisation_score"]}
                     for entry in report.content["extracted"]],
        "scores": [{**row, "band": band, "colour": band_hex(band)}
                   for row, band in zip(report.content["references"], bands)],
        "thresholds": sorted(report.content["metrics"]["A-ESR"]) if report.content["metrics"] is not None else [],
    }
