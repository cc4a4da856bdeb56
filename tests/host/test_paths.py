"""Path confinement in-process on the real host: where each folder input of the pack may point (nodes/paths.py), and
that the nodes refuse the rest before they read or write anything. Through a real server: test_paths_server.py.

Expected paths are built here from ComfyUI's own folders (folder_paths), not from the helper's output.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def paths(host):
    return host.module("nodes.paths")


@pytest.fixture(scope="module")
def folders(host):
    """ComfyUI's output and input folders, as real paths."""
    output = os.path.realpath(host.folder_paths.get_output_directory())
    input_ = os.path.realpath(host.folder_paths.get_input_directory())
    os.makedirs(output, exist_ok=True)
    os.makedirs(input_, exist_ok=True)
    return {"output": output, "input": input_}


def rules(paths):
    return {"bank": paths.BANK_FOLDER, "references": paths.REFERENCE_FOLDER, "report": paths.REPORT_FOLDER}


def test_relative_paths_go_under_comfyuis_own_folders(paths, folders):
    assert paths.resolve_folder(paths.BANK_FOLDER, "finextract/bank") == os.path.join(folders["output"], "finextract",
                                                                                      "bank")
    assert paths.resolve_folder(paths.REFERENCE_FOLDER, " my_references ") == os.path.join(folders["input"],
                                                                                          "my_references")
    assert paths.resolve_folder(paths.REPORT_FOLDER, "a\\b") == os.path.join(folders["output"], "a", "b")
    # '..' that stays inside is harmless; an absolute path inside the folder is accepted as it is.
    assert paths.resolve_folder(paths.BANK_FOLDER, "x/../y") == os.path.join(folders["output"], "y")
    inside = os.path.join(folders["input"], "refs")
    assert paths.resolve_folder(paths.REFERENCE_FOLDER, inside) == inside
    # References may be the input folder itself (what Load Image lists); a bank or a report needs a folder of its own.
    assert paths.resolve_folder(paths.REFERENCE_FOLDER, ".") == folders["input"]
    for rule in (paths.BANK_FOLDER, paths.REPORT_FOLDER):
        with pytest.raises(paths.FolderRefused, match="output folder itself: name a folder inside it"):
            paths.resolve_folder(rule, ".")


@pytest.mark.parametrize("kind", ["bank", "references", "report"])
def test_traversal_absolute_and_lookalike_paths_are_refused(paths, folders, kind, tmp_path):
    rule = rules(paths)[kind]
    root = folders[rule.comfy_folder]
    for value in ("../escape", "a/../../escape", "..\\..\\escape", str(tmp_path), "/", root + "-lookalike",
                  os.path.join(root, "..", os.path.basename(root) + "-lookalike")):
        with pytest.raises(paths.FolderRefused) as refused:
            paths.resolve_folder(rule, value)
        message = str(refused.value)
        assert message.startswith(f"{rule.input_name} '{value}' is outside ComfyUI's {rule.comfy_folder} folder "
                                  f"({root})"), message
        if kind == "report":
            assert "FINEXTRACT_ALLOWED_FOLDERS" not in message, "reports have no opt-in: say nothing of one"
        else:
            assert f"under '{rule.registered_key}'" in message and "FINEXTRACT_ALLOWED_FOLDERS" in message, message
        assert paths.validate_folder(rule, value) == message, "validate_inputs answers with the same message"
    for value, words in (("", "is empty"), ("  ", "is empty"), ("a\0b", "NUL character")):
        with pytest.raises(paths.FolderRefused, match=words):
            paths.resolve_folder(rule, value)
    assert paths.validate_folder(rule, None) is True, "a value from a link is checked when the node runs"
    assert not os.path.exists(os.path.join(os.path.dirname(root), "escape"))


def test_a_symbolic_link_out_of_the_folder_is_refused(paths, folders, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    link = os.path.join(folders["input"], f"test-paths-link-{os.getpid()}")
    os.symlink(outside, link)
    try:
        with pytest.raises(paths.FolderRefused, match="is outside ComfyUI's input folder"):
            paths.resolve_folder(paths.REFERENCE_FOLDER, os.path.basename(link))
        with pytest.raises(paths.FolderRefused, match="is outside ComfyUI's input folder"):
            paths.resolve_folder(paths.REFERENCE_FOLDER, os.path.join(os.path.basename(link), "sub"))
    finally:
        os.remove(link)


def test_the_owners_opt_ins_allow_other_folders(host, paths, folders, tmp_path, monkeypatch):
    allowed, registered, other = tmp_path / "allowed", tmp_path / "registered", tmp_path / "other"
    for folder in (allowed, registered, other):
        folder.mkdir()
    for key in ("finextract_banks", "finextract_references"):  # none registered yet (other tests' are kept aside)
        monkeypatch.setitem(host.folder_paths.folder_names_and_paths, key, ([], set()))
    variable = paths.ALLOWED_FOLDERS_VARIABLE
    # The environment variable: absolute folders, os.pathsep-separated; a relative entry is ignored.
    monkeypatch.setenv(variable, os.pathsep.join(["relative/ignored", str(allowed), ""]))
    for rule in (paths.BANK_FOLDER, paths.REFERENCE_FOLDER):
        assert paths.resolve_folder(rule, str(allowed / "sub")) == str(allowed / "sub")
        with pytest.raises(paths.FolderRefused, match=rf"or a folder the server's owner allowed \({allowed}\)"):
            paths.resolve_folder(rule, str(other))
    with pytest.raises(paths.FolderRefused):
        paths.resolve_folder(paths.BANK_FOLDER, os.path.join(os.getcwd(), "relative", "ignored"))
    with pytest.raises(paths.FolderRefused, match="is outside ComfyUI's output folder"):
        paths.resolve_folder(paths.REPORT_FOLDER, str(allowed / "report"))  # reports stay in output
    monkeypatch.delenv(variable)
    # extra_model_paths.yaml: ComfyUI adds each key's folders with add_model_folder_path; the pack's keys count.
    monkeypatch.setitem(host.folder_paths.folder_names_and_paths, "finextract_references", ([str(registered)], set()))
    assert paths.resolve_folder(paths.REFERENCE_FOLDER, str(registered)) == str(registered)
    with pytest.raises(paths.FolderRefused):
        paths.resolve_folder(paths.BANK_FOLDER, str(registered))  # registered for references, not for banks
    with pytest.raises(paths.FolderRefused):
        paths.resolve_folder(paths.REFERENCE_FOLDER, str(allowed))


def write_images(folder, count: int = 2) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(folder / f"secret{i}.png")


def test_the_nodes_refuse_before_they_read_or_write(host, paths, folders, tmp_path):
    nodes = host.nodes.NODE_CLASS_MAPPINGS
    outside = tmp_path / "private"
    write_images(outside)
    load = nodes["FineXtractLoadReferenceImages"]
    message = load.validate_inputs(folder=str(outside))
    assert isinstance(message, str) and "outside ComfyUI's input folder" in message
    with pytest.raises(paths.FolderRefused, match="outside ComfyUI's input folder"):
        load.execute(str(outside), 16)
    with pytest.raises(paths.FolderRefused, match="outside ComfyUI's input folder"):
        load.execute("../" * 12 + str(outside).lstrip("/"), 16)
    # Inside input/ the same images load, with their names.
    inside = os.path.join(folders["input"], f"test-paths-{os.getpid()}")
    write_images(type(tmp_path)(inside))
    try:
        assert load.validate_inputs(folder=os.path.basename(inside)) is True
        images, names = load.execute(os.path.basename(inside), 16).args
        assert images.shape == (2, 16, 16, 3) and names == "secret0.png\nsecret1.png"
        assert torch.equal(images[1], torch.full((16, 16, 3), 40 / 255))
    finally:
        for name in os.listdir(inside):
            os.remove(os.path.join(inside, name))
        os.rmdir(inside)
    with pytest.raises(FileNotFoundError, match="reference folder 'not-there' does not exist .*create it"):
        load.execute("not-there", 16)

    # The Candidate Bank checks its folder before it touches a model: no model is given here at all.
    bank = nodes["FineXtractCandidateBank"]
    target = tmp_path / "bank"
    for value in (str(target), "../" * 12 + str(target).lstrip("/")):
        with pytest.raises(paths.FolderRefused, match="bank_folder .* is outside ComfyUI's output folder"):
            bank.execute(*[None] * 18, value)
        message = bank.validate_inputs(sscd_model=None, bank_folder=value)
        assert isinstance(message, str) and message.startswith("bank_folder"), message
    assert not target.exists()

    for report in (nodes["FineXtractAuditReportV2"], nodes["FineXtractAuditReport"]):
        message = report.validate_inputs(folder_prefix="../../report", pretrained_file=None, fine_tuned_file=None,
                                         lora_file=None)
        assert isinstance(message, str) and message.startswith("folder_prefix '../../report' is outside"), message
        assert report.validate_inputs(folder_prefix="finextract/report", pretrained_file="(none)",
                                      fine_tuned_file="(none)", lora_file="(none)") is True
