"""AuditReport: writes what an extraction found, and everything needed to reproduce it, into one output folder.

The folder holds report.html (self-contained: images as data URIs, no scripts), summary.png, the extracted images as
PNGs and report.json. Nothing in them depends on the time or the machine, so the same workflow with the same inputs
writes byte-identical files: two reports can be compared with a plain diff.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os

import folder_paths
import torch
from comfy_api.latest import io, ui
from PIL import Image, ImageDraw, ImageFont

from ..finextract_core import __version__
from ..finextract_core.images import png_bytes, to_pil
from .types import EMBEDDINGS

CATEGORY = "FineXtract/evaluation"
EXTRACTED_NAME = "extracted_{:02d}.png"
SUMMARY_NAME = "summary.png"
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


def _sha256_uncached(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_hashes: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str:
    """SHA-256 of a model file; re-hashing a few GB on every run would dominate a small run, so results are kept
    per (path, size, mtime)."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _hashes:
        _hashes[key] = _sha256_uncached(path)
    return _hashes[key]


NO_FILE = "(none)"
# Where each role's file can be: the folders its loaders list (a DreamBooth fine-tune can be a full checkpoint or a
# UNet in diffusion_models).
ROLE_FOLDERS = {"pretrained": ("checkpoints", "diffusion_models"), "fine_tuned": ("checkpoints", "diffusion_models"),
                "lora": ("loras",)}


def model_file_options(role: str) -> list[str]:
    """(none), then the file names the loaders of this role list, in the same spelling (with any subfolder)."""
    names = [name for folder in ROLE_FOLDERS[role] for name in folder_paths.get_filename_list(folder)]
    return [NO_FILE, *dict.fromkeys(names)]


def describe_model_file(role: str, name: str) -> dict:
    """A model file as its loader names it, with the folder it was found in, its size and SHA-256."""
    for folder in ROLE_FOLDERS[role]:
        path = folder_paths.get_full_path(folder, name)
        if path:
            return {"role": role, "file": name, "folder": folder, "bytes": os.path.getsize(path),
                    "sha256": file_sha256(path)}
    # Only reachable when the file went away after the prompt was validated against the list.
    raise FileNotFoundError(f"{role} model file '{name}' is no longer in models/{{{','.join(ROLE_FOLDERS[role])}}}: "
                            "press 'r' in the graph to refresh the file lists and pick it again")


def report_folder(prefix: str) -> tuple[str, str]:
    """(absolute folder, subfolder relative to the output directory); refuses prefixes that leave it."""
    output = os.path.abspath(folder_paths.get_output_directory())
    subfolder = os.path.normpath(prefix.strip().replace("\\", "/")).strip("/")
    folder = os.path.abspath(os.path.join(output, subfolder))
    if not subfolder or subfolder == "." or os.path.commonpath((folder, output)) != output or folder == output:
        raise ValueError(f"folder_prefix '{prefix}' must name a subfolder inside ComfyUI's output directory")
    return folder, subfolder.replace(os.sep, "/")


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _score_bar(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], score: float,
               thresholds: list[float]) -> None:
    """A horizontal bar from similarity 0 to 1 with the thresholds as vertical lines."""
    left, top, right, bottom = box
    width = right - left
    strict = max(thresholds) if thresholds else 1.0
    loose = min(thresholds) if thresholds else 1.0
    colour = (0, 140, 0) if score > strict else (200, 120, 0) if score > loose else (180, 0, 0)
    draw.rectangle(box, outline=(120, 120, 120))
    draw.rectangle((left, top, left + round(width * min(max(score, 0.0), 1.0)), bottom), fill=colour)
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


def summary_of_clusters(extracted: torch.Tensor, sizes: list[int]) -> Image.Image:
    """The extracted images in a grid, each labelled with its cluster size (no references to score against)."""
    columns = min(len(sizes), 5)
    label = 26
    grid_rows = -(-len(sizes) // columns)
    summary = Image.new("RGB", (columns * CELL, 40 + grid_rows * (CELL + label)), "white")
    draw = ImageDraw.Draw(summary)
    draw.text((8, 10), "extracted images (cluster centres, biggest cluster first); no references given",
              fill="black", font=_font(14))
    for index, size in enumerate(sizes):
        left, top = (index % columns) * CELL, 40 + (index // columns) * (CELL + label)
        summary.paste(to_pil(extracted[index]).resize((CELL, CELL), Image.BICUBIC), (left, top))
        draw.text((left + 6, top + CELL + 4), f"#{index}: {size} candidates", fill="black", font=_font(14))
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
    parts.append("<h2>Extracted images (cluster centres, biggest cluster first)</h2><table><tr>")
    for entry, png in zip(report["extracted"], extracted_pngs):
        parts.append(f"<td><img class='cell' alt='extracted' src='{_data_uri(png)}'><br>#{entry['index']}: "
                     f"{entry['cluster_size']} candidates<br>{escape(entry['file'])}</td>")
    parts.append("</tr></table><h2>How to reproduce this run</h2><h3>Model files</h3><table><tr><th>role</th>"
                 "<th>file</th><th>folder</th><th>bytes</th><th>SHA-256</th></tr>")
    for model in report["models"]:
        parts.append(f"<tr><td>{escape(model['role'])}</td><td>{escape(model['file'])}</td><td>"
                     f"{escape(model['folder'])}</td><td>{model['bytes']}</td><td><code>{model['sha256']}</code>"
                     "</td></tr>")
    parts.append("</table><h3>Sampling</h3><table>" + _definition_rows(report["sampling"]) + "</table>")
    parts.append("<h3>Embedder</h3><table>" + _definition_rows(report["embedder"]) + "</table>")
    clustering = {k: v for k, v in report["clustering"].items() if k != "members"}
    parts.append("<h3>Clustering</h3><table>" + _definition_rows(clustering) + "</table>")
    parts.append(f"<p>Pack: FineXtract for ComfyUI {escape(report['pack_version'])}. Every setting, hash and score is "
                 "in report.json next to this page.</p></body></html>\n")
    return "".join(parts)


def _parse_json(text: str, what: str) -> dict:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} is not JSON ({error}): connect the {what} output of the node that makes it") from error


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


class AuditReport(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FineXtractAuditReport",
            display_name="Audit Report (FineXtract)",
            category=CATEGORY,
            description="Writes report.html, summary.png, the extracted images and report.json (model hashes, sampler "
                        "settings, embedder, clustering, scores) into one subfolder of ComfyUI's output directory. "
                        "The same inputs always write the same bytes.",
            inputs=[
                io.Image.Input("extracted", tooltip="The extracted images (Clique Cluster's 'extracted')."),
                EMBEDDINGS.Input("extracted_embeddings", tooltip="Their descriptors (Clique Cluster's "
                                 "'extracted_embeddings'): the report names the embedder and preset from them."),
                io.String.Input("clusters_json", force_input=True,
                                tooltip="Clique Cluster's 'clusters_json': method, threshold and cluster sizes."),
                io.String.Input("run_settings", force_input=True,
                                tooltip="The Model Guidance Sampler's 'run_settings': mode, w', k, seed, steps, sampler."),
                io.String.Input("folder_prefix", default="finextract/report",
                                tooltip="Subfolder of ComfyUI's output directory for this report; a second run with "
                                "the same prefix replaces the report in it."),
                io.Combo.Input("pretrained_file", options=model_file_options("pretrained"), default=NO_FILE,
                               tooltip="The pretrained (base) model file: pick the entry its loader shows (listed from "
                               "checkpoints and diffusion_models). The report records its SHA-256."),
                io.Combo.Input("fine_tuned_file", options=model_file_options("fine_tuned"), default=NO_FILE,
                               tooltip="The fine-tuned model file (the DreamBooth checkpoint or UNet), as its loader "
                               "shows it. (none) for a LoRA attack, where the LoRA file below is the fine-tune."),
                io.Combo.Input("lora_file", options=model_file_options("lora"), default=NO_FILE,
                               tooltip="The LoRA under audit (models/loras), as LoraLoaderModelOnly shows it. (none) "
                               "otherwise."),
                io.Image.Input("references", optional=True,
                               tooltip="Optional reference images (Load Reference Images): the summary then shows "
                               "each reference beside its best extracted match. Needs metrics_json."),
                io.String.Input("metrics_json", optional=True, force_input=True,
                                tooltip="Extraction Metrics' 'metrics_json' for those references: AS, A-ESR and the "
                                "best match of each reference."),
                io.String.Input("reference_names", optional=True, force_input=True,
                                tooltip="Load Reference Images' 'file_names', to label the references by file."),
            ],
            is_output_node=True,
            outputs=[io.String.Output(display_name="report_path",
                                      tooltip="Full path of report.html.")],
        )

    @classmethod
    def validate_inputs(cls, pretrained_file, fine_tuned_file, lora_file) -> bool | str:
        """ComfyUI does not check V3 combo values itself: refuse a name no loader lists before anything runs."""
        for role, name in (("pretrained", pretrained_file), ("fine_tuned", fine_tuned_file), ("lora", lora_file)):
            if name is not None and name not in model_file_options(role):  # None: the value comes from a link
                return (f"{role}_file '{name}' is not in models/{{{','.join(ROLE_FOLDERS[role])}}}: pick the file its "
                        f"loader shows from the list (press 'r' to refresh it), or {NO_FILE}")
        return True

    @classmethod
    def execute(cls, extracted, extracted_embeddings, clusters_json, run_settings, folder_prefix, pretrained_file,
                fine_tuned_file, lora_file, references=None, metrics_json=None, reference_names=None) -> io.NodeOutput:
        if (references is None) != (metrics_json is None):
            raise ValueError("connect both references and metrics_json (from Extraction Metrics), or neither")
        if extracted.shape[0] != len(extracted_embeddings):
            raise ValueError("extracted and extracted_embeddings must come from the same Clique Cluster node")
        clusters = _parse_json(clusters_json, "clusters_json")
        metrics = None if metrics_json is None else _parse_json(metrics_json, "metrics_json")
        folder, subfolder = report_folder(folder_prefix)
        os.makedirs(folder, exist_ok=True)
        models = [describe_model_file(role, name) for role, name in
                  (("pretrained", pretrained_file), ("fine_tuned", fine_tuned_file), ("lora", lora_file))
                  if name != NO_FILE]

        extracted_pngs = [png_bytes(to_pil(image)) for image in extracted]
        extracted_files = [EXTRACTED_NAME.format(i) for i in range(len(extracted_pngs))]
        sizes = list(clusters["sizes"])
        report = {
            "pack_version": __version__,
            "models": models,
            "sampling": _parse_json(run_settings, "run_settings"),
            "embedder": {"model_id": extracted_embeddings.model_id, "preset": extracted_embeddings.preset,
                         "dim": extracted_embeddings.dim},
            "clustering": clusters,
            "metrics": metrics,
            "extracted": [{"index": i, "file": name, "cluster_size": size, "sha256": hashlib.sha256(png).hexdigest()}
                          for i, (name, size, png) in enumerate(zip(extracted_files, sizes, extracted_pngs))],
            "references": [],
            "meaning": MEANING,
            "not_meaning": NOT_MEANING,
        }
        reference_pngs = []
        if metrics is not None:
            names = (reference_names or "").splitlines()
            names = names if len(names) == references.shape[0] else [f"reference {i}" for i in
                                                                      range(references.shape[0])]
            rows = sorted(metrics["per_reference"], key=lambda row: (-row["score"], row["reference"]))
            report["references"] = [{**row, "name": names[row["reference"]]} for row in rows]
            thresholds = sorted(float(t) for t in metrics["A-ESR"])
            reference_pngs = [png_bytes(to_pil(image)) for image in references]
            summary = summary_with_references(references, extracted, rows, metrics, thresholds, names,
                                              extracted_embeddings.model_id)
        else:
            summary = summary_of_clusters(extracted, sizes)
        summary_png = png_bytes(summary)

        # A re-run with fewer extracted images must not leave the previous run's extra files behind.
        for name in os.listdir(folder):
            if name.startswith("extracted_") and name.endswith(".png") and name not in extracted_files:
                os.remove(os.path.join(folder, name))
        for name, png in zip(extracted_files, extracted_pngs):
            _write(os.path.join(folder, name), png)
        _write(os.path.join(folder, SUMMARY_NAME), summary_png)
        _write(os.path.join(folder, "report.json"),
               (json.dumps(report, sort_keys=True, indent=2) + "\n").encode("utf-8"))
        report_path = os.path.join(folder, "report.html")
        _write(report_path, render_html(report, summary_png, extracted_pngs, reference_pngs).encode("utf-8"))

        saved = [ui.SavedResult(name, subfolder, io.FolderType.output) for name in [SUMMARY_NAME, *extracted_files]]
        headline = (f"AS {metrics['AS']:.3f}, " + ", ".join(f"A-ESR>{t}: {r:.2f}" for t, r in
                                                          sorted(metrics["A-ESR"].items()))
                    if metrics is not None else f"{len(extracted_files)} extracted images, no references")
        panel = {
            "subfolder": subfolder, "html": "report.html", "json": "report.json", "headline": headline,
            "clusters": [{"filename": name, "size": size} for name, size in zip(extracted_files, sizes)],
            "scores": report["references"],
            "thresholds": sorted(metrics["A-ESR"]) if metrics is not None else [],
        }
        text = f"{headline}\nreport: {report_path}"
        return io.NodeOutput(report_path, ui={"images": saved, "text": [text], "finextract_report": [panel]})


NODES = [AuditReport]
