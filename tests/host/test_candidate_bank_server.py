"""The Candidate Bank through a real ComfyUI server: a run cancelled with /interrupt, and a run whose server process is
killed (SIGKILL), each resumed by queueing it again, give the same bank as an uninterrupted run; a bank folder that
cannot be written is a clear error and the server goes on serving."""

from __future__ import annotations

import os
import signal
import time

import pytest

from fixtures.bank_helpers import BANK_ID, assert_same_bank, bank_prompt, shard_count, write_test_sscd
from tools.host.comfy_server import ComfyServer, execution_error
from fixtures.stand_in_models import write_stand_in_models

COUNT, BATCH, STEPS = 6, 2, 3


@pytest.fixture(scope="module")
def base(host, tmp_path_factory):  # host: tiny_models builds shapes with ComfyUI's own modules
    folder = str(tmp_path_factory.mktemp("bank-server"))
    write_stand_in_models(f"{folder}/models")
    write_test_sscd(f"{folder}/models/sscd")
    return folder


@pytest.fixture(scope="module")
def server(base):
    with ComfyServer(base) as running:
        yield running


@pytest.fixture(scope="module")
def reference(server):
    folder = os.path.join(server.base, "output", "banks", "reference")
    entry = server.run(bank_prompt(folder, COUNT, BATCH, STEPS))
    assert execution_error(entry) is None, execution_error(entry)
    return folder


def wait_for_first_shard(server, folder: str, prompt_id: str) -> None:
    deadline = time.monotonic() + 120
    while shard_count(folder) == 0:
        assert time.monotonic() < deadline, f"no batch finished in time:\n{server.log_tail()}"
        assert prompt_id not in server.get(f"/history/{prompt_id}"), "the run ended before its first batch was stored"
        time.sleep(0.1)


def test_bank_nodes_are_served_with_tooltips(server):
    info = server.get("/object_info")
    for node_id in (BANK_ID, "FineXtractExtractedImages"):
        for group in ("required", "optional"):
            for name, spec in info[node_id]["input"].get(group, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert info[BANK_ID]["output"] == ["FINEXTRACT_EMBEDDINGS", "FINEXTRACT_CANDIDATE_BANK", "STRING",
                                       "FINEXTRACT_RUN_SETTINGS"]
    assert info["FineXtractExtractedImages"]["output"] == ["IMAGE", "FINEXTRACT_EMBEDDINGS"]
    assert info["FineXtractDecodeBankCandidates"]["deprecated"] is True


def test_interrupted_run_resumes_to_the_same_bank(server, reference):
    folder = os.path.join(server.base, "output", "banks", "interrupted")
    prompt_id = server.queue(bank_prompt(folder, COUNT, BATCH, STEPS))
    wait_for_first_shard(server, folder, prompt_id)
    server.post("/interrupt", {})
    entry = server.wait(prompt_id, timeout=120)
    kinds = [kind for kind, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, kinds
    assert 1 <= shard_count(folder) < COUNT // BATCH, "the interrupt must land mid-run, after a stored batch"
    entry = server.run(bank_prompt(folder, COUNT, BATCH, STEPS))
    assert execution_error(entry) is None, execution_error(entry)
    assert_same_bank(folder, reference, COUNT)


def test_killed_server_resumes_to_the_same_bank(server, base, reference):
    folder = os.path.join(base, "output", "banks", "killed")
    with ComfyServer(base, log_path=os.path.join(base, "killed.log")) as doomed:
        prompt_id = doomed.queue(bank_prompt(folder, COUNT, BATCH, STEPS))
        wait_for_first_shard(doomed, folder, prompt_id)
        os.killpg(doomed.process.pid, signal.SIGKILL)
        doomed.process.wait()
    assert 1 <= shard_count(folder) < COUNT // BATCH, "the kill must land mid-run, after a stored batch"
    entry = server.run(bank_prompt(folder, COUNT, BATCH, STEPS))  # another server process resumes the bank
    assert execution_error(entry) is None, execution_error(entry)
    assert_same_bank(folder, reference, COUNT)


def test_unwritable_bank_folder_is_a_clear_error_and_the_server_goes_on(server, base, reference):
    blocker = os.path.join(base, "output", "not_a_folder")
    with open(blocker, "w") as handle:
        handle.write("a file where the bank's parent folder should be")
    entry = server.run(bank_prompt(os.path.join(blocker, "bank"), COUNT, BATCH, STEPS))
    message = execution_error(entry)
    assert message is not None and "Cannot write the candidate bank" in message and "bank_folder" in message, message
    entry = server.run(bank_prompt(reference, COUNT, BATCH, STEPS))  # the complete bank: nothing to generate
    assert execution_error(entry) is None, execution_error(entry)
