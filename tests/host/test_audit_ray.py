"""finextract-audit on a real local Ray cluster of CPU ComfyUI workers, on the lab's demo world (as test_audit.py):
the index of ``--ray local --workers 2`` is byte for byte the single-machine run's, and so are the banks; one model's
bank spread over two workers of a running cluster (``--ray auto``) equals the one-server bank and holds each index
once; a worker's ComfyUI killed (SIGKILL) mid-model, or the worker's actor killed, and the run still ends with the
uninterrupted index and no candidate made twice; a worker whose ComfyUI cannot start is reported and the other
finishes the run.

The tests share one Ray cluster (``ray start --head`` on 127.0.0.1, 2 CPUs), the built inputs and the single-machine
run (session fixtures); every run is the command in a subprocess, the Ray driver."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from fixtures.audit_inputs import build_inputs
from fixtures.audit_runs import start_and_wait_for_a_bank_batch
from tools.host.comfy_inprocess import host_module
from tools.host.comfy_server import REPO_ROOT, read_host_env

pytest.importorskip("ray")

SETTINGS = ["--candidates-per-image", "8", "--max-candidates", "20", "--steps", "8", "--batch-size", "4",
            "--prescreen"]
INDEX_FILES = ("index.html", "index.csv", "index.json")
# The cluster and the runs on it: every Ray process on 127.0.0.1 without a token (a test cluster on loopback),
# one thread per ComfyUI as in the single-machine run (a CPU's sums then agree bit for bit), every log line shown.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "RAY_DEDUP_LOGS": "0"}
PHOTOS_MODEL = "photos_dreambooth.safetensors"


def audit_command(models: str, inputs: dict, out: str, *extra: str) -> list[str]:
    host = read_host_env()
    return [sys.executable, "-m", "finextract_core.audit", "--models", models, "--references",
            inputs["references"], "--bases", inputs["bases"], "--out", out, "--comfyui", host["FINEXTRACT_COMFYUI"],
            "--python", host.get("FINEXTRACT_PYTHON", sys.executable), "--comfy-arg=--cpu",
            "--workflow-builder", "lab.audit_world:WorldBuilder", *SETTINGS, *extra]


def run_env(cluster: str | None = None) -> dict:
    env = {**os.environ, **RAY_ENV}
    if cluster:
        env["RAY_ADDRESS"] = cluster
    return env


def run_audit(command: list[str], cluster: str | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT, env=run_env(cluster))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done


def index_bytes(out: str) -> dict[str, bytes]:
    return {name: open(os.path.join(out, name), "rb").read() for name in INDEX_FILES}


def bank_contents(out: str) -> dict:
    """Each bank under OUT/banks: its indices, how many rows its shards store, its latents and embeddings."""
    bank_module = host_module("finextract_core.bank")
    banks = {}
    for key in sorted(os.listdir(os.path.join(out, "banks"))):
        bank = bank_module.CandidateBank.read(os.path.join(out, "banks", key))
        indices = sorted(bank.indices)
        banks[key] = {"indices": indices, "stored_rows": bank.stored_rows, "latents": bank.latents(indices),
                      "embeddings": bank.embeddings(indices).vectors}
    return banks


def assert_same_banks(found: dict, wanted: dict) -> None:
    import numpy as np
    import torch

    assert sorted(found) == sorted(wanted)
    for key, bank in found.items():
        assert bank["indices"] == wanted[key]["indices"], key
        assert bank["stored_rows"] == len(bank["indices"]), f"{key}: a candidate was generated twice"
        assert torch.equal(bank["latents"], wanted[key]["latents"]), key
        assert np.array_equal(bank["embeddings"], wanted[key]["embeddings"]), key


def generated_ranges(out: str, worker: str) -> list[tuple[int, int, int]]:
    """(first, last, generated) of each bank prompt the worker's ComfyUI ran, from the bank node's log line."""
    with open(os.path.join(out, "workers", worker, "comfyui.log")) as f:
        return [(int(a), int(b), int(n)) for a, b, n in
                re.findall(r"holds \d+ of candidates (\d+)-(\d+); generating (\d+)", f.read())]


@pytest.fixture(scope="session")
def ray_inputs(host, tmp_path_factory):  # host: the servers' ComfyUI comes from the same bootstrap
    return build_inputs(str(tmp_path_factory.mktemp("ray-audit-inputs")))


@pytest.fixture(scope="session")
def single_machine(ray_inputs, tmp_path_factory):
    """The single-machine run: its index and its banks."""
    out = str(tmp_path_factory.mktemp("ray-audit-single"))
    run_audit(audit_command(ray_inputs["models"], ray_inputs, out))
    return out, index_bytes(out), bank_contents(out)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A Ray head on 127.0.0.1 with 2 CPUs, stopped at the end; its address."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    temp = f"/tmp/ray-test-{os.getpid()}"  # short: Ray's socket paths must fit in 107 characters
    ray = [sys.executable, "-m", "ray.scripts.scripts"]
    env = run_env()
    started = subprocess.run([*ray, "start", "--head", "--num-cpus", "2", "--include-dashboard", "false", "--port",
                              str(port), "--temp-dir", temp, "--disable-usage-stats"], capture_output=True, text=True,
                             timeout=120, env=env)
    assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop_processes_naming(temp)  # this cluster's processes only ('ray stop' would stop every cluster here)
        shutil.rmtree(temp, ignore_errors=True)


def stop_processes_naming(marker: str) -> None:
    """SIGKILL to every process of the cluster: those whose command line or open files name ``marker`` (the
    cluster's own temp folder; Ray's agents rename themselves, but keep their logs there open)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                named = marker.encode() in f.read()
            if not named:
                fds = f"/proc/{pid}/fd"
                named = any(os.readlink(os.path.join(fds, fd)).startswith(marker) for fd in os.listdir(fds))
            if named and int(pid) != os.getpid():
                os.kill(int(pid), signal.SIGKILL)
        except OSError:  # gone, or not ours to read
            pass


def test_ray_local_with_two_workers_writes_the_single_machine_index_and_banks(ray_inputs, single_machine,
                                                                            tmp_path):
    _, index, banks = single_machine
    out = str(tmp_path / "ray-local")
    done = run_audit(audit_command(ray_inputs["models"], ray_inputs, out, "--ray", "local", "--workers", "2",
                                   "--bank-range", "8"))
    assert index_bytes(out) == index
    assert_same_banks(bank_contents(out), banks)
    # Each worker's progress reaches the terminal under its name; both made candidates.
    for worker in ("worker-1", "worker-2"):
        assert re.search(rf"s {worker}\] .*candidates \d+-\d+ of \d+ into its bank", done.stdout), done.stdout[-3000:]
        assert any(generated for _, _, generated in generated_ranges(out, worker)), worker
    assert "Ray: " in done.stdout and "added per group" in done.stdout
    # Two servers on one machine: their own port, log, temp, input and user folders; one output folder.
    servers = [json.load(open(os.path.join(out, "workers", w, "server.json"))) for w in ("worker-1", "worker-2")]
    assert servers[0]["port"] != servers[1]["port"]
    for worker in ("worker-1", "worker-2"):
        for kind in ("temp", "input", "user"):
            assert os.path.isdir(os.path.join(out, "workers", worker, "server", kind))
    assert not os.path.exists(os.path.join(out, "comfyui.log"))


def test_one_model_bank_over_two_workers_of_a_running_cluster_equals_the_one_server_bank(
        ray_inputs, single_machine, ray_cluster, tmp_path):
    single_out, _, banks = single_machine
    out = str(tmp_path / "ray-auto")
    model = os.path.join(ray_inputs["models"], PHOTOS_MODEL)
    run_audit(audit_command(model, ray_inputs, out, "--ray", "auto", "--workers", "2", "--bank-range", "4"),
              ray_cluster)
    found = bank_contents(out)
    assert len(found) == 1
    key = next(iter(found))
    assert_same_banks(found, {key: banks[key]})
    assert found[key]["indices"] == list(range(16))
    # Each worker generated some of the four ranges of 4, and the extraction found all 16 and generated none.
    made = {w: [r for r in generated_ranges(out, w) if r[2]] for w in ("worker-1", "worker-2")}
    assert all(made.values()), made
    assert sorted(r for ranges in made.values() for r in ranges) == [(0, 3, 4), (4, 7, 4), (8, 11, 4), (12, 15, 4)]
    assert (0, 15, 0) in generated_ranges(out, "worker-1") + generated_ranges(out, "worker-2")
    single = json.load(open(os.path.join(single_out, "index.json")))
    row = [r for r in json.load(open(os.path.join(out, "index.json")))["models"] if r["model"] == PHOTOS_MODEL]
    assert row == [r for r in single["models"] if r["model"] == PHOTOS_MODEL]


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


@pytest.mark.parametrize("victim", ["server", "actor"])
def test_a_worker_killed_mid_model_loses_nothing_and_makes_nothing_twice(ray_inputs, single_machine, ray_cluster,
                                                                          tmp_path, victim):
    _, index, banks = single_machine
    out = str(tmp_path / f"killed-{victim}")
    command = audit_command(ray_inputs["models"], ray_inputs, out, "--ray", "auto", "--workers", "2",
                            "--bank-range", "8")
    process = start_and_wait_for_a_bank_batch(command, out, run_env(ray_cluster))
    with open(os.path.join(out, "workers", "worker-1", "server.json")) as f:
        server = json.load(f)
    if victim == "server":
        os.killpg(server["pid"], signal.SIGKILL)  # worker-1's ComfyUI and its children
    else:
        os.kill(parent_of(server["pid"]), signal.SIGKILL)  # the Ray actor that started that ComfyUI
    stdout, _ = process.communicate(timeout=600)
    assert process.returncode == 0, stdout[-4000:]
    if victim == "server":
        assert "ComfyUI went away" in stdout and "starting it again" in stdout
    else:
        assert stdout.count("s worker-1] starting ComfyUI") >= 2, stdout[-4000:]  # Ray started the actor again
    assert index_bytes(out) == index
    assert_same_banks(bank_contents(out), banks)  # every candidate once, as the uninterrupted run made it


def test_a_worker_whose_comfyui_cannot_start_is_reported_and_the_other_finishes(ray_inputs, single_machine,
                                                                               ray_cluster, tmp_path):
    single_out, _, _ = single_machine
    out = tmp_path / "one-broken"
    (out / "workers" / "worker-2" / "comfyui.log").mkdir(parents=True)  # its launcher cannot open its log
    model = os.path.join(ray_inputs["models"], PHOTOS_MODEL)
    done = run_audit(audit_command(model, ray_inputs, str(out), "--ray", "auto", "--workers", "2"), ray_cluster)
    assert re.search(r"worker-2: its ComfyUI could not start, going on without it: .*IsADirectoryError", done.stdout), \
        done.stdout[-4000:]
    rows = json.load(open(out / "index.json"))["models"]
    single = json.load(open(os.path.join(single_out, "index.json")))["models"]
    assert rows == [r for r in single if r["model"] == PHOTOS_MODEL]
