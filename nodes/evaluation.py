"""Metrics against reference images: AS, A-ESR, a per-reference table and a side-by-side grid; and a folder loader."""

from __future__ import annotations

import os

import torch
from comfy_api.latest import io
from PIL import Image, ImageDraw

from ..finextract_core import metrics
from ..finextract_core.images import from_pil, load_image_folder, to_pil
from ..finextract_core.report import BAND_COLOURS, score_band
from .embedding import require_images
from .paths import REFERENCE_FOLDER, resolve_folder, validate_folder
from .types import EMBEDDINGS, EXTRACTION_SCORES

CATEGORY = "FineXtract/evaluation"
LOOSE, STRICT = metrics.DEFAULT_ESR_THRESHOLDS


def comparison_grid(references: torch.Tensor, extracted: torch.Tensor, result: metrics.ExtractionScores,
                    thresholds: tuple[float, float], cell: int = 256) -> torch.Tensor:
    """One row per reference, best score first: reference | best extracted match | score, coloured by its band."""
    order = sorted(range(len(result.best_score)), key=lambda i: -result.best_score[i])
    rows = []
    for i in order:
        score = result.best_score[i]
        row = Image.new("RGB", (3 * cell, cell), "white")
        for column, tensor in enumerate((references[i], extracted[result.best_match[i]])):
            row.paste(to_pil(tensor).resize((cell, cell), Image.BICUBIC), (column * cell, 0))
        draw = ImageDraw.Draw(row)
        draw.text((2 * cell + 12, cell // 2 - 20), f"{score:.3f}", fill=BAND_COLOURS[score_band(score, thresholds)],
                  font_size=cell // 6)
        draw.text((2 * cell + 12, cell // 2 + 30), f"ref {i} / match {result.best_match[i]}", fill="black")
        rows.append(from_pil(row))
    return torch.cat(rows, dim=0).unsqueeze(0)


class ExtractionMetrics(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FineXtractExtractionMetrics",
            display_name="Extraction Metrics (FineXtract)",
            category=CATEGORY,
            description="How close the extracted images are to reference images (the training set, or an artist's "
                        "own images): AS and A-ESR as in the paper, per-reference best matches, and a grid.",
            inputs=[
                io.Image.Input("references", tooltip="Reference images (Load Reference Images)."),
                EMBEDDINGS.Input("reference_embeddings", tooltip="Their descriptors (same model and preset as below)."),
                io.Image.Input("extracted", tooltip="The extracted images (Extracted Images)."),
                EMBEDDINGS.Input("extracted_embeddings", tooltip="Their descriptors."),
                io.Float.Input("loose_threshold", default=LOOSE, min=0.0, max=1.0, step=0.01,
                               tooltip="A-ESR counts a reference as extracted when its best similarity exceeds this "
                               f"({LOOSE} in the paper)."),
                io.Float.Input("strict_threshold", default=STRICT, min=0.0, max=1.0, step=0.01,
                               tooltip=f"The strict A-ESR threshold ({STRICT} in the paper)."),
            ],
            outputs=[
                io.Float.Output(display_name="AS"),
                io.Float.Output(display_name="A_ESR_loose"),
                io.Float.Output(display_name="A_ESR_strict"),
                io.String.Output(display_name="table_csv"),
                io.String.Output(display_name="metrics_json", tooltip="The scores as JSON, to read."),
                io.Image.Output(display_name="grid"),
                EXTRACTION_SCORES.Output(display_name="scores", tooltip="The scores, for the Audit Report."),
            ],
        )

    @classmethod
    def execute(cls, references, reference_embeddings, extracted, extracted_embeddings, loose_threshold,
                strict_threshold) -> io.NodeOutput:
        require_images(references, "references")
        require_images(extracted, "extracted")
        if references.shape[0] != len(reference_embeddings) or extracted.shape[0] != len(extracted_embeddings):
            raise ValueError("each image batch must come with the embeddings of that same batch, in the same order")
        result = metrics.extraction_metrics(reference_embeddings, extracted_embeddings,
                                            (loose_threshold, strict_threshold))
        rates = result.extraction_success_rates
        grid = comparison_grid(references, extracted, result, (loose_threshold, strict_threshold))
        return io.NodeOutput(result.average_similarity, rates[float(loose_threshold)], rates[float(strict_threshold)],
                             result.to_csv(), result.to_json(), grid, result)


class LoadReferenceImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FineXtractLoadReferenceImages",
            display_name="Load Reference Images (FineXtract)",
            category=CATEGORY,
            description="Every image in a folder inside ComfyUI's input folder, centre-cropped to a square, sorted by "
                        "file name.",
            inputs=[
                io.String.Input("folder", default=REFERENCE_FOLDER.example,
                                tooltip="A folder of reference images inside ComfyUI's input folder: my_references "
                                "for input/my_references (folders elsewhere only where the server's owner allowed "
                                "them)."),
                io.Int.Input("size", default=512, min=16, max=4096, tooltip="Side of the square each image is "
                             "cropped and resized to (SSCD's paper preset then takes 224 px)."),
            ],
            outputs=[io.Image.Output(display_name="images"), io.String.Output(display_name="file_names")],
        )

    @classmethod
    def validate_inputs(cls, folder) -> bool | str:
        return validate_folder(REFERENCE_FOLDER, folder)

    @classmethod
    def execute(cls, folder, size) -> io.NodeOutput:
        path = resolve_folder(REFERENCE_FOLDER, folder)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"reference folder '{folder}' does not exist ({path}): create it and put the "
                                    "reference images in it (or upload them to that subfolder of ComfyUI's input "
                                    "folder)")
        images, names = load_image_folder(path, size)
        return io.NodeOutput(images, "\n".join(names))


NODES = [ExtractionMetrics, LoadReferenceImages]
