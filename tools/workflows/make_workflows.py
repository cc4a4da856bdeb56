"""Writes the pack's example workflows (workflows/*.json, the graph editor's format) from the compact specs below.

Widget order, defaults, output slots and link types come from the /object_info of a real ComfyUI server started
here, so the files open as graphs exactly as ComfyUI would have saved them. Run after changing a spec or a node:

    .host/venv/bin/python -m tools.workflows.make_workflows
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

from ..host.comfy_server import REPO_ROOT, ComfyServer
from .workflow_api import is_widget, ordered_inputs, widget_value_count

WORKFLOWS_DIR = os.path.join(REPO_ROOT, "workflows")
SSCD_FILE = "sscd_disc_large.torchscript.pt"
SSCD_URL = "https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_large.torchscript.pt"
BASE_FILE = "v1-5-pruned-emaonly.safetensors"
DREAMBOOTH_FILE = "my_dreambooth.safetensors"
LORA_FILE = "my_lora.safetensors"
NO_FILE = "(none)"  # the Audit Report's entry for a model file that has no role in the attack
N0 = 10  # the fine-tuning set's size; the paper samples N = 50 x N0 candidates

SSCD_NOTE = f"""SSCD FILE (needed by every 'SSCD Embed' node)
Download {SSCD_URL}
into ComfyUI/models/sscd/ (create the folder), then press 'r' in the graph to refresh the lists.
The file is read as weights only; no code in it is run."""

OUTPUTS_NOTE = """WHAT THE OUTPUTS MEAN
Clique Cluster picks N0 images, one per group of mutually similar candidates (biggest group first): those are the
images the attack claims the model was fine-tuned on. The cluster size says how often the model produced that image.
The Audit Report node writes report.html, summary.png, the extracted images and report.json (SHA-256 of the model
files, every sampler setting, embedder, clustering) into output/<folder_prefix>/, and shows a link to the report.
Re-running with the same inputs writes the same bytes. A similarity is not a proof of training-set membership."""


def defaults_note(kind: str) -> str:
    scale, k = ("3.0", "-0.02") if kind == "dreambooth" else ("5.0", "0.0")
    return f"""PAPER DEFAULTS (FineXtract, ICML 2025)
{kind}: w' (guidance_scale) = {scale}, k = {k}; DDIM, 50 steps, 512 x 512 for SD 1.x.
N0 = the number of fine-tuning images (Clique Cluster n0); candidates N = 50 x N0 (Empty Latent batch_size).
All N candidates are one batch: if they do not fit your GPU, lower batch_size (fewer candidates per image make the
clusters less reliable). Over-saturated or speckled candidates: lower w'."""


def node(key: str, class_type: str, title: str, widgets: dict | None = None, **links: str) -> dict:
    """One node of a spec: ``links`` map an input name to '<node key>.<output name>'."""
    return {"key": key, "type": class_type, "title": title, "widgets": widgets or {}, "links": links}


def dreambooth_models() -> list[dict]:
    return [
        node("pretrained", "CheckpointLoaderSimple", "Pretrained checkpoint", {"ckpt_name": BASE_FILE}),
        node("fine_tuned", "CheckpointLoaderSimple", "Fine-tuned checkpoint (DreamBooth)",
             {"ckpt_name": DREAMBOOTH_FILE}),
        node("caption", "CLIPTextEncode", "Training caption", {"text": "sks style"}, clip="fine_tuned.CLIP"),
        node("empty", "CLIPTextEncode", "Empty prompt", {"text": ""}, clip="pretrained.CLIP"),
    ]


def lora_models() -> list[dict]:
    return [
        node("pretrained", "CheckpointLoaderSimple", "Base checkpoint", {"ckpt_name": BASE_FILE}),
        node("fine_tuned", "LoraLoaderModelOnly", "LoRA under audit", {"lora_name": LORA_FILE, "strength_model": 1.0},
             model="pretrained.MODEL"),
        node("caption", "CLIPTextEncode", "Training caption", {"text": "sks style"}, clip="pretrained.CLIP"),
        node("empty", "CLIPTextEncode", "Empty prompt", {"text": ""}, clip="pretrained.CLIP"),
    ]


def model_files(kind: str) -> dict:
    """The report's file-name widgets, matching the loaders above."""
    if kind == "dreambooth":
        return {"pretrained_file": BASE_FILE, "fine_tuned_file": DREAMBOOTH_FILE, "lora_file": NO_FILE}
    return {"pretrained_file": BASE_FILE, "fine_tuned_file": NO_FILE, "lora_file": LORA_FILE}


def attack(kind: str, mode: str = "finextract", suffix: str = "", label: str = "FineXtract") -> list[dict]:
    """Sampler -> decode -> SSCD -> clusters -> report for one guidance mode, on the nodes keyed pretrained,
    fine_tuned, caption, empty and latent."""
    scale, k = (3.0, -0.02) if kind == "dreambooth" else (5.0, 0.0)
    if mode == "cfg":
        scale = 3.0
    return [
        node(f"sample{suffix}", "FineXtractModelGuidanceSampler", f"Sampler: {label}",
             {"mode": mode, "guidance_scale": scale, "k": k, "seed": 0, "steps": 50, "sampler_name": "ddim",
              "scheduler": "ddim_uniform", "denoise": 1.0},
             fine_tuned="fine_tuned.MODEL", pretrained="pretrained.MODEL", positive="caption.CONDITIONING",
             negative="empty.CONDITIONING", latent_image="latent.LATENT"),
        node(f"decode{suffix}", "VAEDecode", f"Decode: {label}", samples=f"sample{suffix}.LATENT", vae="pretrained.VAE"),
        node(f"embed{suffix}", "FineXtractSSCDEmbed", f"SSCD embed: {label}", {"sscd_model": SSCD_FILE},
             images=f"decode{suffix}.IMAGE"),
        node(f"cluster{suffix}", "FineXtractCliqueCluster", f"Clique cluster: {label}", {"n0": N0},
             candidates=f"decode{suffix}.IMAGE", embeddings=f"embed{suffix}.embeddings"),
        node(f"report{suffix}", "FineXtractAuditReport", f"Audit report: {label}",
             {"folder_prefix": f"finextract/{kind}{suffix}", **model_files(kind)},
             extracted=f"cluster{suffix}.extracted", extracted_embeddings=f"cluster{suffix}.extracted_embeddings",
             clusters_json=f"cluster{suffix}.clusters_json", run_settings=f"sample{suffix}.run_settings"),
    ]


def candidates() -> dict:
    return node("latent", "EmptyLatentImage", "Candidates: N = 50 x N0",
                {"width": 512, "height": 512, "batch_size": 50 * N0})


def with_references(kind: str) -> list[dict]:
    """The attack plus the user's own images: metrics against them, and a report that shows both side by side."""
    nodes = [*(dreambooth_models() if kind == "dreambooth" else lora_models()), candidates(), *attack(kind)]
    report = nodes[-1]
    report["widgets"]["folder_prefix"] = f"finextract/{kind}_audit"
    report["links"].update(references="references.images", metrics_json="metrics.metrics_json",
                           reference_names="references.file_names")
    return nodes + [
        node("references", "FineXtractLoadReferenceImages", "My reference images",
             {"folder": "/full/path/to/my/images", "size": 512}),
        node("reference_embed", "FineXtractSSCDEmbed", "SSCD embed: my images", {"sscd_model": SSCD_FILE},
             images="references.images"),
        node("metrics", "FineXtractExtractionMetrics", "Extraction metrics",
             references="references.images", reference_embeddings="reference_embed.embeddings",
             extracted="cluster.extracted", extracted_embeddings="cluster.extracted_embeddings"),
    ]


def recovered_caption() -> list[dict]:
    """The DreamBooth attack with the caption recovered from the weights (Caption Inverter -> CLIPTextEncode)."""
    nodes = dreambooth_models()
    nodes[2:3] = [
        node("inverter", "FineXtractCaptionInverter", "Caption Inverter: recover the training caption",
             {"max_words": 3, "iterations": 1000, "restarts": 4, "seed": 0},
             pretrained="pretrained.MODEL", fine_tuned="fine_tuned.MODEL", clip="fine_tuned.CLIP"),
        node("caption", "CLIPTextEncode", "Recovered caption", {"text": ""}, clip="fine_tuned.CLIP",
             text="inverter.caption"),
    ]
    nodes += [candidates(), *attack("dreambooth")]
    nodes[-1]["widgets"]["folder_prefix"] = "finextract/dreambooth_recovered_caption"
    return nodes


SPECS = {
    "finextract_dreambooth": {
        "notes": [f"""FINEXTRACT ON A DREAMBOOTH CHECKPOINT
Pretrained checkpoint: the model the fine-tune started from (for example {BASE_FILE}).
Fine-tuned checkpoint: the DreamBooth checkpoint under audit (models/checkpoints).
Training caption: the prompt it was fine-tuned with (for example 'sks style', 'a photo of sks dog').
In the Audit Report node pick the same two files from its lists: it records their SHA-256.""",
                  defaults_note("dreambooth"), SSCD_NOTE, OUTPUTS_NOTE],
        "nodes": [*dreambooth_models(), candidates(), *attack("dreambooth")],
    },
    "finextract_lora": {
        "notes": [f"""FINEXTRACT ON A LORA
Base checkpoint: the model the LoRA was trained on (for example {BASE_FILE}); it is the 'pretrained' model.
LoRA under audit (models/loras): applied to the base, it is the 'fine-tuned' model. The sampler keeps the two
branches apart although ComfyUI shares the base weights.
Training caption: the LoRA's trigger prompt. Pick the base and LoRA files in the Audit Report node's lists.""",
                  defaults_note("lora"), SSCD_NOTE, OUTPUTS_NOTE],
        "nodes": [*lora_models(), candidates(), *attack("lora")],
    },
    "finextract_vs_baselines": {
        "notes": ["""FINEXTRACT AND ITS BASELINES, SIDE BY SIDE
Three samplers on the same models, candidates and seed: FineXtract (w' = 3.0, k = -0.02), CFG on the fine-tuned
model (w' = 3.0) and direct text-to-image (the caption alone). Each gets its own clusters and report
(output/finextract/dreambooth_<mode>/). With references, add Extraction Metrics per branch (see the audit workflow):
the paper finds FineXtract's clusters closer to the training images than either baseline's.""",
                  defaults_note("dreambooth"), SSCD_NOTE, OUTPUTS_NOTE],
        "nodes": [*dreambooth_models(), candidates(),
                  *attack("dreambooth", "finextract", "_finextract", "FineXtract"),
                  *attack("dreambooth", "cfg", "_cfg", "CFG baseline"),
                  *attack("dreambooth", "direct", "_direct", "direct baseline")],
    },
    "finextract_recover_caption": {
        "notes": ["""FINEXTRACT WHEN THE TRAINING CAPTION IS UNKNOWN
The paper's Appendix A: Caption Inverter reads how the fine-tune changed the cross-attention key/value projections
and searches the prompt those changes answer to most. Its caption feeds the 'Recovered caption' encoder, then the
attack runs as in 'finextract_dreambooth'. It recovers words (a rare identifier such as 'sks', a subject), not the
exact caption: read its ranked captions and tokens (shown on the node) and, if you recognise a better prompt, type
it into a CLIPTextEncode instead. For a LoRA: load the base in both roles and put LoraLoaderModelOnly on the
fine-tuned side, as in 'finextract_lora'.
Caption Inverter defaults: max_words 3 (the paper: 3 and 7), iterations 1000 per restart (the paper), 4 restarts;
measured 0.5-1.9 s per iteration for SD 1.x's CLIP-L on a busy 2-core CPU (minutes to half an hour for 1000),
far faster on a GPU. Same seed, same caption.""",
                  defaults_note("dreambooth"), SSCD_NOTE, OUTPUTS_NOTE],
        "nodes": recovered_caption(),
    },
    "finextract_audit_my_images": {
        "notes": ["""AUDIT A LORA AGAINST MY OWN IMAGES
My reference images: the full path of a folder with your images (png, jpg, webp); each is centre-cropped square.
The LoRA attack runs as in 'finextract_lora'; Extraction Metrics then finds, for each of your images, the closest
extracted image. AS = mean of those best SSCD similarities; A-ESR = share of your images whose best similarity
exceeds 0.6 (loose) or 0.7 (strict), the paper's thresholds. The report puts each of your images beside its match.
For a DreamBooth checkpoint, replace the LoRA loader by a second checkpoint loader (see 'finextract_dreambooth').""",
                  defaults_note("lora"), SSCD_NOTE, OUTPUTS_NOTE],
        "nodes": with_references("lora"),
    },
}


def _depths(spec_nodes: list[dict]) -> dict[str, int]:
    """Column of each node: one right of its deepest input, so links run left to right."""
    by_key = {n["key"]: n for n in spec_nodes}
    depth: dict[str, int] = {}

    def visit(key: str) -> int:
        if key not in depth:
            sources = [source.split(".")[0] for source in by_key[key]["links"].values()]
            depth[key] = 1 + max((visit(s) for s in sources), default=-1)
        return depth[key]

    for key in by_key:
        visit(key)
    return depth


def widget_default(input_spec: list):
    """The value a new node of this type starts with (a combo's first option when it declares no default)."""
    options = input_spec[1] if len(input_spec) > 1 else {}
    if "default" in options:
        return options["default"]
    choices = input_spec[0] if isinstance(input_spec[0], list) else options.get("options", [])
    return choices[0] if choices else None


def _node_height(n_slots: int, n_widgets: int) -> int:
    return 40 + 22 * n_slots + 26 * n_widgets


def build_workflow(spec: dict, object_info: dict) -> dict:
    """The editor-format workflow of one spec: notes in a column on the left, nodes in columns by depth."""
    nodes, links = [], []
    depth = _depths(spec["nodes"])
    ids = {n["key"]: index + 1 + len(spec["notes"]) for index, n in enumerate(spec["nodes"])}
    types_by_key = {n["key"]: n["type"] for n in spec["nodes"]}
    column_bottom: dict[int, int] = {}
    note_y = 0
    for index, text in enumerate(spec["notes"]):
        height = 40 + 17 * (text.count("\n") + 1)
        nodes.append({"id": index + 1, "type": "Note", "pos": [0, note_y], "size": [520, height], "flags": {},
                      "order": index, "mode": 0, "inputs": [], "outputs": [], "properties": {},
                      "widgets_values": [text], "color": "#432", "bgcolor": "#653"})
        note_y += height + 30
    outputs_by_key = {}
    for order, spec_node in enumerate(spec["nodes"], start=len(spec["notes"])):
        info = object_info[spec_node["type"]]
        node_id = ids[spec_node["key"]]
        unknown = set(spec_node["widgets"]) | set(spec_node["links"])
        inputs, values = [], []
        for name, input_spec in ordered_inputs(info):
            unknown.discard(name)
            entry = {"name": name, "type": "COMBO" if isinstance(input_spec[0], list) else input_spec[0], "link": None}
            if is_widget(input_spec):
                entry["widget"] = {"name": name}
                values.append(spec_node["widgets"].get(name, widget_default(input_spec)))
                if widget_value_count(input_spec) == 2:
                    values.append("fixed")  # reproducible: the seed never changes behind the user's back
            if name in spec_node["links"]:
                source_key, output_name = spec_node["links"][name].split(".")
                source_info = object_info[types_by_key[source_key]]
                source_slot = source_info["output_name"].index(output_name)
                link_type = source_info["output"][source_slot]
                if link_type != entry["type"]:
                    raise TypeError(f"{spec_node['key']}.{name} takes {entry['type']}, {source_key}.{output_name} "
                                    f"gives {link_type}")
                link_id = len(links) + 1
                links.append([link_id, ids[source_key], source_slot, node_id, len(inputs), link_type])
                outputs_by_key.setdefault(source_key, {}).setdefault(source_slot, []).append(link_id)
                entry["link"] = link_id
            inputs.append(entry)
        if unknown:
            raise KeyError(f"{spec_node['type']} has no inputs {sorted(unknown)}")
        column = depth[spec_node["key"]]
        n_sockets = sum(1 for entry in inputs if "widget" not in entry)
        height = _node_height(max(n_sockets, len(info["output"])), len(values))
        y = column_bottom.get(column, 0)
        column_bottom[column] = y + height + 40
        nodes.append({
            "id": node_id, "type": spec_node["type"], "title": spec_node["title"],
            "pos": [600 + 380 * column, y], "size": [340, height], "flags": {}, "order": order, "mode": 0,
            "inputs": inputs, "outputs": [], "properties": {"Node name for S&R": spec_node["type"]},
            "widgets_values": values,
        })
    for spec_node, entry in zip(spec["nodes"], nodes[len(spec["notes"]):]):
        key = spec_node["key"]
        info = object_info[entry["type"]]
        entry["outputs"] = [{"name": name, "type": kind, "links": outputs_by_key.get(key, {}).get(slot, []),
                             "slot_index": slot}
                            for slot, (name, kind) in enumerate(zip(info["output_name"], info["output"]))]
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {"ds": {"scale": 0.7, "offset": [40, 40]}}, "version": 0.4}


def main() -> int:
    with tempfile.TemporaryDirectory() as base, ComfyServer(base, lab=False) as server:
        object_info = server.get("/object_info")
    os.makedirs(WORKFLOWS_DIR, exist_ok=True)
    for name, spec in SPECS.items():
        path = os.path.join(WORKFLOWS_DIR, f"{name}.json")
        with open(path, "w") as f:
            json.dump(build_workflow(spec, object_info), f, indent=2)
            f.write("\n")
        print(f"wrote {os.path.relpath(path, REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
