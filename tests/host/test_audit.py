"""finextract-audit end to end on the lab's demo world, through a real ComfyUI server the command starts: a models
folder with the DreamBooth fine-tune and the LoRA of the reference photos (with kohya metadata), a fine-tune of other
images, the LoRA without metadata, a LoRA of another family, a truncated file and a file that is not a model; a
references folder with the fine-tuning photos and unrelated images. Then the same command again (nothing is redone,
the same bytes), and a run killed while a bank fills, resumed, giving the same index."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from safetensors import safe_open

from fixtures.audit_inputs import N0, build_inputs
from fixtures.audit_runs import bank_shards, start_and_wait_for_a_bank_batch
from tools.host.comfy_server import REPO_ROOT, ComfyServer, read_host_env

SETTINGS = ["--candidates-per-image", "8", "--max-candidates", "20", "--steps", "8", "--batch-size", "4",
            "--prescreen"]
INDEX_FILES = ("index.html", "index.csv", "index.json")


def audit_command(inputs: dict, out: str) -> list[str]:
    host = read_host_env()
    return [sys.executable, "-m", "finextract_core.audit", "--models", inputs["models"], "--references",
            inputs["references"], "--bases", inputs["bases"], "--out", out, "--comfyui", host["FINEXTRACT_COMFYUI"],
            "--python", host.get("FINEXTRACT_PYTHON", sys.executable), "--comfy-arg=--cpu",
            "--workflow-builder", "lab.audit_world:WorldBuilder", *SETTINGS]


def audit_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1")


def run_audit(inputs: dict, out: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(audit_command(inputs, out) + list(extra), capture_output=True, text=True, timeout=900,
                          cwd=REPO_ROOT, env=audit_env())


def index_bytes(out: str) -> dict[str, bytes]:
    return {name: open(os.path.join(out, name), "rb").read() for name in INDEX_FILES}


@pytest.fixture(scope="module")
def inputs(host, tmp_path_factory):  # host: the server's ComfyUI comes from the same bootstrap
    return build_inputs(str(tmp_path_factory.mktemp("audit-inputs")))


@pytest.fixture(scope="module")
def first_run(inputs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("audit-out"))
    done = run_audit(inputs, out)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return out, done.stdout, index_bytes(out)


def test_index_ranks_the_fine_tunes_of_the_photos_and_says_why_the_others_were_skipped(inputs, first_run):
    out, stdout, _ = first_run
    index = json.load(open(os.path.join(out, "index.json")))
    rows = {row["model"]: row for row in index["models"]}
    assert sorted(rows) == ["notes.txt", "others_dreambooth.safetensors", "photos_dreambooth.safetensors",
                            "photos_lora.safetensors", "photos_lora_no_metadata.safetensors",
                            "sdxl_lora.safetensors", "truncated.safetensors"]
    done = [row["model"] for row in index["models"] if row["status"] == "done"]
    assert {"others_dreambooth.safetensors", "photos_dreambooth.safetensors", "photos_lora.safetensors"} <= set(done)
    # Without metadata the LoRA gets the default N0 = 10, too many clusters for its 20 candidates for some
    # clustering methods: then the index carries the clustering's own message, and the run goes on.
    no_metadata = rows["photos_lora_no_metadata.safetensors"]
    assert no_metadata["status"] == "done" or "FineXtractCliqueClusterV2" in no_metadata["reason"], no_metadata
    # The fine-tune of the photos scores higher on the photos than the fine-tune of other images, which scores
    # highest on its own images; the index ranks it above.
    photo_best = {name: max(rows[name]["scores"][p] for p in inputs["photos"]) for name in done}
    other_best = {name: max(s for r, s in rows[name]["scores"].items() if r not in inputs["photos"]) for name in done}
    assert photo_best["photos_dreambooth.safetensors"] > photo_best["others_dreambooth.safetensors"] + 0.1, photo_best
    assert other_best["others_dreambooth.safetensors"] > photo_best["others_dreambooth.safetensors"], other_best
    assert done[0] == "photos_dreambooth.safetensors"
    # Evidence leads: the caption and N0 from the kohya keys, the defaults without metadata, the LoRA's keys.
    assert rows["photos_lora.safetensors"]["evidence"]["caption"] == "a sks photo"
    assert rows["photos_lora.safetensors"]["evidence"]["n0"] == N0
    assert rows["photos_lora_no_metadata.safetensors"]["evidence"]["n0_source"] == "default"
    lora_keys = len(safe_open(os.path.join(inputs["models"], "photos_lora.safetensors"), "pt").keys())
    assert rows["photos_lora.safetensors"]["evidence"]["lora_keys_loaded"] == f"{lora_keys}/{lora_keys}"
    # Each score is the report's: the best cosine of the reference to any extracted image.
    report = json.load(open(os.path.join(out, rows["photos_dreambooth.safetensors"]["report"].replace(
        "report.html", "report.json"))))
    assert {r["name"]: round(r["score"], 6) for r in report["references"]} == \
        rows["photos_dreambooth.safetensors"]["scores"]
    assert report["clustering"]["n_candidates"] == 2 * 8
    # The bad inputs, each with its reason.
    assert rows["truncated.safetensors"]["status"] == "unreadable"
    assert "cut short" in rows["truncated.safetensors"]["reason"]
    assert rows["notes.txt"]["status"] == "unreadable"
    assert "not a safetensors file" in rows["notes.txt"]["reason"]
    assert rows["sdxl_lora.safetensors"]["status"] == "no base"
    assert "takes 0 of" in rows["sdxl_lora.safetensors"]["reason"]
    # The pre-screen's score beside the extraction: the DreamBooth fine-tunes moved further from the base than the
    # weak LoRA.
    prescreen = {name: rows[name]["prescreen"] for name in done}
    assert all(score > 0 for score in prescreen.values()), prescreen
    assert prescreen["photos_dreambooth.safetensors"] > prescreen["photos_lora.safetensors"], prescreen
    html = open(os.path.join(out, "index.html")).read()
    assert "<script" not in html and "http" not in html
    assert "model 4/4" in stdout


def test_a_second_run_skips_finished_models_and_writes_the_same_bytes(inputs, first_run):
    out, _, first = first_run
    again = run_audit(inputs, out)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    done = [row for row in json.loads(first["index.json"])["models"] if row["status"] == "done"]
    assert again.stdout.count("finished in an earlier run") == len(done)
    assert index_bytes(out) == first


def test_a_running_server_given_by_url_writes_the_same_index(inputs, first_run, tmp_path):
    """--server URL: a ComfyUI started by its owner, not by the command, listing the models, bases and references
    in its own extra_model_paths.yaml (as docs/audit.md tells a user to) and saving into the audit's folder."""
    _, _, first = first_run
    out = str(tmp_path / "out")
    os.makedirs(out)
    folders = tmp_path / "owner_paths.yaml"
    folders.write_text(f"owner:\n  base_path: {tmp_path}\n  loras: {inputs['models']}\n"
                       f"  checkpoints: |\n    {inputs['bases']}\n    {inputs['models']}\n"
                       f"  diffusion_models: |\n    {inputs['bases']}\n    {inputs['models']}\n"
                       f"  finextract_references: {inputs['references']}\n")
    options = ("--output-directory", out, "--extra-model-paths-config", str(folders))
    with ComfyServer(str(tmp_path / "comfy"), options=options) as server:
        command = audit_command(inputs, out)
        at = command.index("--comfyui")
        command[at:at + 5] = ["--server", server.url]  # no ComfyUI, Python or server arguments of its own
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO_ROOT, env=audit_env())
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "starting ComfyUI" not in done.stdout
    assert not os.path.exists(os.path.join(out, "server.json"))
    assert index_bytes(out) == first


def test_a_run_killed_while_a_bank_fills_resumes_to_the_same_index(inputs, first_run, tmp_path):
    _, _, first = first_run
    out = str(tmp_path / "killed")
    process = start_and_wait_for_a_bank_batch(audit_command(inputs, out), out, audit_env())
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    kept = bank_shards(out)
    assert len(os.listdir(os.path.join(out, "state"))) < 3
    resumed = run_audit(inputs, out)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    after = bank_shards(out)
    assert {path: after.get(path) for path in kept} == kept  # the batches made before the kill were kept, not redone
    assert index_bytes(out) == first


def test_a_server_that_dies_mid_run_is_started_again_and_its_prompt_queued_again(inputs, first_run, tmp_path):
    _, _, first = first_run
    out = str(tmp_path / "server-killed")
    process = start_and_wait_for_a_bank_batch(audit_command(inputs, out), out, audit_env())
    with open(os.path.join(out, "server.json")) as f:
        server = json.load(f)
    os.killpg(server["pid"], signal.SIGKILL)  # the server the audit started, and its children
    stdout, _ = process.communicate(timeout=900)
    assert process.returncode == 0, stdout[-4000:]
    assert "ComfyUI went away" in stdout and "starting it again" in stdout
    assert index_bytes(out) == first


def test_models_below_the_prescreen_threshold_are_skipped_with_their_score(inputs, tmp_path):
    done = run_audit(inputs, str(tmp_path / "out"), "--prescreen-threshold", "1000")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rows = {row["model"]: row for row in json.load(open(tmp_path / "out" / "index.json"))["models"]}
    below = sorted(name for name, row in rows.items() if row["status"] == "below pre-screen")
    assert below == ["others_dreambooth.safetensors", "photos_dreambooth.safetensors", "photos_lora.safetensors",
                     "photos_lora_no_metadata.safetensors"]
    assert "< --prescreen-threshold 1000" in rows["photos_lora.safetensors"]["reason"]
    assert rows["photos_lora.safetensors"]["evidence"]["prescreen"] > 0
    assert not (tmp_path / "out" / "banks").exists()


def test_an_empty_reference_folder_stops_the_run_before_any_model(inputs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = run_audit({**inputs, "references": str(empty)}, str(tmp_path / "out"))
    assert done.returncode == 2
    assert "holds no images" in done.stderr and "no model was run" in done.stderr
    assert not (tmp_path / "out" / "server.json").exists()
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
