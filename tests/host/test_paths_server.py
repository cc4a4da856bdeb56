"""Path confinement through real ComfyUI servers on 127.0.0.1: prompts whose bank folder or reference folder leaves
ComfyUI's folders are refused (at validation, or when the value arrives through a link, when the node runs) with
nothing written or shown, and the server goes on serving; a second server whose owner allowed other folders (the
FINEXTRACT_ALLOWED_FOLDERS variable, and a folder registered in extra_model_paths.yaml) reads and writes there.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
from PIL import Image

from fixtures.bank_helpers import BANK_ID, bank_prompt, shard_count, validation_errors, write_test_sscd
from fixtures.stand_in_models import write_stand_in_models
from tools.host.comfy_server import EXTRA_PATHS, ComfyServer, execution_error

ALLOWED_FOLDERS_VARIABLE = "FINEXTRACT_ALLOWED_FOLDERS"  # the pack's (nodes/paths.py), as a server's owner types it
LOAD_REFERENCES = "FineXtractLoadReferenceImages"


def write_images(folder: str, count: int = 2) -> None:
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        Image.fromarray(np.full((8, 8, 3), 60 * i, dtype=np.uint8)).save(os.path.join(folder, f"image{i}.png"))


@pytest.fixture(scope="module")
def place(host, tmp_path_factory):  # host: the stand-in models are built with ComfyUI's own modules
    """A server base with the stand-in models and reference images inside input/, and folders outside it."""
    root = tmp_path_factory.mktemp("paths-server")
    base, outside = str(root / "base"), str(root / "outside")
    write_stand_in_models(f"{base}/models")
    write_test_sscd(f"{base}/models/sscd")
    write_images(os.path.join(base, "input", "my_references"))
    write_images(os.path.join(outside, "private"))
    write_images(os.path.join(outside, "registered"))
    return {"base": base, "outside": outside}


@contextlib.contextmanager
def started(server: ComfyServer, allowed: str | None = None):
    """The server running, started with FINEXTRACT_ALLOWED_FOLDERS set to ``allowed`` (or unset)."""
    saved = os.environ.pop(ALLOWED_FOLDERS_VARIABLE, None)
    if allowed is not None:
        os.environ[ALLOWED_FOLDERS_VARIABLE] = allowed
    try:
        server.__enter__()
    finally:
        os.environ.pop(ALLOWED_FOLDERS_VARIABLE, None)
        if saved is not None:
            os.environ[ALLOWED_FOLDERS_VARIABLE] = saved
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(place):
    with started(ComfyServer(place["base"], lab=False)) as running:
        yield running


def references_prompt(folder) -> dict:
    """Load Reference Images previewed to whoever posted the prompt (``folder``: a value, or a link)."""
    return {"refs": {"class_type": LOAD_REFERENCES, "inputs": {"folder": folder, "size": 16}},
            "preview": {"class_type": "PreviewImage", "inputs": {"images": ["refs", 0]}}}


def string_node(value: str) -> dict:
    return {"class_type": "PrimitiveString", "inputs": {"value": value}}


def previews(entry: dict) -> list[dict]:
    return [image for output in entry.get("outputs", {}).values() for image in output.get("images", [])]


def assert_still_serving(server: ComfyServer) -> None:
    """A good prompt still runs: the references in input/ are loaded and previewed."""
    entry = server.run(references_prompt("my_references"), timeout=120)
    assert execution_error(entry) is None, execution_error(entry)
    assert len(previews(entry)) == 2


def test_bank_folders_outside_output_are_refused_and_nothing_is_written(server, place):
    output = os.path.join(place["base"], "output")
    traversal = "../../escaped-bank"
    absolute = os.path.join(place["outside"], "absolute-bank")
    for value in (traversal, absolute):
        errors = validation_errors(server, bank_prompt(value, 2, 2, 2))
        assert errors and all(error["type"] == "custom_validation_failed" for error in errors), errors
        assert any(f"bank_folder '{value}' is outside ComfyUI's output folder" in error["details"]
                   and "extra_model_paths.yaml" in error["details"] for error in errors), errors
        assert_still_serving(server)
    # The same folder given through a link reaches the node unchecked by validation; the node refuses it.
    linked = bank_prompt(["folder", 0], 2, 2, 2)
    linked["folder"] = string_node(absolute)
    message = execution_error(server.run(linked, timeout=300))
    assert message is not None and message.startswith(f"{BANK_ID}: bank_folder '{absolute}' is outside"), message
    assert not os.path.exists(absolute)
    assert not os.path.exists(os.path.normpath(os.path.join(output, traversal)))
    assert_still_serving(server)


def test_reference_folders_outside_input_are_refused_and_nothing_is_shown(server, place):
    private = os.path.join(place["outside"], "private")
    for value in (private, "../" * 16 + private.lstrip("/"), "../../outside/private"):
        errors = validation_errors(server, references_prompt(value))
        assert any(f"folder '{value}' is outside ComfyUI's input folder" in error["details"]
                   and "put the reference images in a folder inside ComfyUI's input folder" in error["details"]
                   for error in errors), errors
        assert_still_serving(server)
    linked = references_prompt(["folder", 0])
    linked["folder"] = string_node(private)
    entry = server.run(linked, timeout=120)
    message = execution_error(entry)
    assert message is not None and message.startswith(f"{LOAD_REFERENCES}: folder '{private}' is outside"), message
    assert previews(entry) == [], "no image of the refused folder may reach whoever posted the prompt"
    assert_still_serving(server)


def test_the_owners_opt_ins_are_honoured(server, place):
    """A second server on the same base: FINEXTRACT_ALLOWED_FOLDERS names one outside folder and
    extra_model_paths.yaml registers another for references; the first server (no opt-in) still refuses both."""
    allowed = os.path.join(place["outside"], "private")
    registered = os.path.join(place["outside"], "registered")
    opted_in = ComfyServer(place["base"], lab=False, log_path=os.path.join(place["base"], "opted-in.log"))
    with open(os.path.join(opted_in.base, EXTRA_PATHS), "a") as handle:  # ComfyServer wrote the file; add to it
        handle.write(f"owner_folders:\n  base_path: {place['outside']}\n  finextract_references: registered\n")
    with started(opted_in, allowed=allowed):
        for folder in (allowed, registered):
            entry = opted_in.run(references_prompt(folder), timeout=120)
            assert execution_error(entry) is None, execution_error(entry)
            assert len(previews(entry)) == 2
        bank = os.path.join(allowed, "bank")
        entry = opted_in.run(bank_prompt(bank, 2, 2, 2), timeout=300)
        assert execution_error(entry) is None, execution_error(entry)
        assert shard_count(bank) == 1, "the bank is written where the owner allowed it"
        # Registered for references only: a bank there is still refused.
        errors = validation_errors(opted_in, bank_prompt(os.path.join(registered, "bank"), 2, 2, 2))
        assert any("bank_folder" in error["details"] and "is outside" in error["details"] for error in errors)
    for folder in (allowed, registered):
        assert validation_errors(server, references_prompt(folder))
    assert_still_serving(server)
