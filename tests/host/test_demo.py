"""The main job (lab/demo.py) end to end, in a reduced setting: a demo world built from scratch (few training
steps), both example workflows on it through a real ComfyUI server, the audit reports scored against the fine-tuning
photos; then a second run that takes the world from the cache and writes the same reports."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from lab.demo import REFERENCES, demo_world_spec
from lab.world.similarity import highpass_embeddings
from tools.host.comfy_server import REPO_ROOT

REDUCED = ["--n0", "2", "--steps", "2", "--pretraining-steps", "4", "--fine-tune-steps", "3"]
FILES = ["extracted_00.png", "extracted_01.png", "report.html", "report.json", "summary.png"]


def run_demo(out: str, cache: str) -> str:
    done = subprocess.run([sys.executable, "-m", "lab.demo", "--out", out, "--cache", cache, *REDUCED],
                          capture_output=True, text=True, timeout=900, cwd=REPO_ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def pixels(path: str) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float64) / 255).movedim(-1, 0)


@pytest.fixture(scope="module")
def demo(host, tmp_path_factory):  # host: the ComfyUI server comes from the same bootstrap
    out, cache = str(tmp_path_factory.mktemp("demo-out")), str(tmp_path_factory.mktemp("demo-cache"))
    first = run_demo(out, cache)
    reports = {case: open(os.path.join(out, case, "report.json"), "rb").read() for case in ("dreambooth", "lora")}
    return out, cache, first, reports


def test_demo_builds_the_world_and_leaves_scored_reports(demo):
    out, cache, stdout, _ = demo
    world = os.path.join(cache, demo_world_spec(4).digest())
    assert "demo world: building" in stdout
    assert sorted(name.split("-")[0] for name in os.listdir(os.path.join(world, "finetunes"))) == ["dreambooth", "lora"]
    assert f"done: extracted images and audit reports in {out}/dreambooth and {out}/lora" in stdout
    references = os.path.join(out, "comfy", "input", REFERENCES)
    assert sorted(os.listdir(references)) == ["astronaut.png", "brick.png"]  # scikit-image's first two, by name
    for case, fine_tune_role in (("dreambooth", "fine_tuned"), ("lora", "lora")):
        folder = os.path.join(out, case)
        assert sorted(os.listdir(folder)) == FILES
        report = json.load(open(os.path.join(folder, "report.json")))
        assert report["embedder"]["model_id"].startswith("world_highpass")
        assert report["clustering"]["n_candidates"] == 100 and report["sampling"]["steps"] == 2
        # The report hashes the world's own files, reached through ComfyUI's model lists.
        models = {m["role"]: m for m in report["models"]}
        assert sorted(models) == sorted(["pretrained", fine_tune_role])
        assert models["pretrained"]["sha256"] == sha256(os.path.join(world, "pretrained.safetensors"))
        (tuned,) = [name for name in os.listdir(os.path.join(world, "finetunes")) if name.startswith(case)]
        assert models[fine_tune_role]["sha256"] == sha256(os.path.join(world, "finetunes", tuned))
        if case == "lora":  # kohya's LoRA with conv layers: a 3x3 kernel's factors beside the attention ones
            with safe_open(os.path.join(world, "finetunes", tuned), "pt") as handle:
                shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}
            assert shapes["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"][2:] == [3, 3]
            assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_down.weight" in shapes
        # AS recomputed from the PNGs left behind: each photo's best cosine to any extracted image, averaged.
        photos = highpass_embeddings(torch.stack([pixels(os.path.join(references, n)) for n in
                                                  ("astronaut.png", "brick.png")])).vectors
        extracted = highpass_embeddings(torch.stack([pixels(os.path.join(folder, f"extracted_0{i}.png"))
                                                     for i in range(2)])).vectors
        best = (photos @ extracted.T).max(axis=1)
        assert report["metrics"]["AS"] == pytest.approx(float(best.mean()), abs=0.02)  # PNGs are 8-bit
        assert {row["name"] for row in report["references"]} == {"astronaut.png", "brick.png"}


def world_files(cache: str) -> dict[str, int]:
    """Every file of the cached worlds and its modification time: a rebuilt file gets a new one."""
    return {os.path.join(folder, name): os.stat(os.path.join(folder, name)).st_mtime_ns
            for folder, _, names in os.walk(cache) for name in names}


def test_second_run_reuses_the_world_and_writes_the_same_reports(demo):
    out, cache, _, reports = demo
    built = world_files(cache)
    second = run_demo(out, cache)
    assert "demo world: reusing" in second and "demo world: building" not in second
    assert world_files(cache) == built, "the cached world or its fine-tunes were written again"
    for case, first in reports.items():
        assert open(os.path.join(out, case, "report.json"), "rb").read() == first
