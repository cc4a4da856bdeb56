"""Where the folders a prompt names may be: inside ComfyUI's own folders, unless the server's owner allows more.

Whoever can post a prompt to a server chooses every string input of it, so a folder input must never reach the rest
of the server's disk: the Candidate Bank writes into its folder, Load Reference Images reads a folder and shows its
images to whoever posted the prompt, and the Audit Report writes a report folder. Each folder input has a rule here:
relative paths go under ComfyUI's folder for it (output or input), and any path, once resolved (``..`` collapsed,
symbolic links followed), must lie inside that folder, inside a folder the owner registered for it in
extra_model_paths.yaml, or inside a folder listed in the FINEXTRACT_ALLOWED_FOLDERS environment variable. Both
opt-ins are set where the server runs, never by a prompt (ComfyUI's user settings are written through its HTTP API,
so they are no place for this). docs/security.md describes what a prompt can reach.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import folder_paths

LOG = logging.getLogger("finextract")
# os.pathsep-separated absolute folders that every rule with a registered_key also accepts.
ALLOWED_FOLDERS_VARIABLE = "FINEXTRACT_ALLOWED_FOLDERS"
SECURITY_DOC = "docs/security.md in the FineXtract pack"


class FolderRefused(ValueError):
    """A folder input that names a place outside the folders its rule allows."""


@dataclass(frozen=True)
class FolderRule:
    """What one folder input may name."""

    input_name: str
    contents: str  # what the folder holds, for messages ("the candidate bank")
    comfy_folder: str  # "output" or "input": where relative paths go
    example: str  # a relative path to suggest
    registered_key: str | None  # the extra_model_paths.yaml key of further folders; None: ComfyUI's folder only
    may_be_comfy_folder: bool  # whether the ComfyUI folder itself (rather than a folder inside it) is accepted

    def comfy_root(self) -> str:
        directory = (folder_paths.get_output_directory() if self.comfy_folder == "output"
                     else folder_paths.get_input_directory())
        return os.path.realpath(directory)

    def extra_roots(self) -> list[str]:
        """The owner's folders for this rule: extra_model_paths.yaml's, then the environment variable's."""
        if self.registered_key is None:
            return []
        registered = folder_paths.folder_names_and_paths.get(self.registered_key, ([], set()))[0]
        return [os.path.realpath(folder) for folder in [*registered, *allowed_by_environment()]]


BANK_FOLDER = FolderRule("bank_folder", "the candidate bank", "output", "finextract/bank", "finextract_banks",
                         may_be_comfy_folder=False)
REFERENCE_FOLDER = FolderRule("folder", "the reference images", "input", "my_references", "finextract_references",
                              may_be_comfy_folder=True)
# The graph shows a report through ComfyUI's /view, which serves only its own folders: reports stay in output.
REPORT_FOLDER = FolderRule("folder_prefix", "the report", "output", "finextract/report", None,
                           may_be_comfy_folder=False)


def allowed_by_environment() -> list[str]:
    folders = []
    for entry in os.environ.get(ALLOWED_FOLDERS_VARIABLE, "").split(os.pathsep):
        entry = os.path.expanduser(entry.strip())
        if not entry:
            continue
        if not os.path.isabs(entry):
            LOG.warning("finextract: %s entry '%s' is not an absolute path; it is ignored", ALLOWED_FOLDERS_VARIABLE,
                        entry)
            continue
        folders.append(entry)
    return folders


def _inside(path: str, root: str) -> bool:
    path, root = os.path.normcase(path), os.path.normcase(root)
    return os.path.commonpath((path, root)) == root


def resolve_folder(rule: FolderRule, value: str) -> str:
    """The real absolute path ``value`` names under ``rule``, or FolderRefused saying where the folder may be."""
    text = value.strip().replace("\\", "/")
    comfy_root = rule.comfy_root()
    if not text:
        raise FolderRefused(f"{rule.input_name} is empty: name a folder for {rule.contents} inside ComfyUI's "
                            f"{rule.comfy_folder} folder, for example {rule.example} ({comfy_root}/{rule.example})")
    if "\0" in text:
        raise FolderRefused(f"{rule.input_name} contains a NUL character: name a folder for {rule.contents} such as "
                            f"{rule.example}")
    path = os.path.realpath(os.path.join(comfy_root, os.path.expanduser(text)))
    if _inside(path, comfy_root):
        if path == comfy_root and not rule.may_be_comfy_folder:
            raise FolderRefused(f"{rule.input_name} '{value}' is ComfyUI's {rule.comfy_folder} folder itself: name a "
                                f"folder inside it for {rule.contents}, for example {rule.example}")
        return path
    extra_roots = rule.extra_roots()
    if any(_inside(path, root) for root in extra_roots):
        return path
    raise FolderRefused(_outside_message(rule, value, comfy_root, extra_roots))


def _outside_message(rule: FolderRule, value: str, comfy_root: str, extra_roots: list[str]) -> str:
    where = f"ComfyUI's {rule.comfy_folder} folder ({comfy_root})"
    if extra_roots:
        where += " or a folder the server's owner allowed (" + ", ".join(dict.fromkeys(extra_roots)) + ")"
    if rule.comfy_folder == "input":
        advice = (f"put {rule.contents} in a folder inside ComfyUI's input folder (for example "
                  f"{comfy_root}/{rule.example}, or upload them to a subfolder of input) and give its name "
                  f"({rule.example})")
    else:
        advice = f"give a folder inside it (a relative path such as {rule.example} goes under it)"
    message = f"{rule.input_name} '{value}' is outside {where}: {advice}."
    if rule.registered_key is not None:
        message += (f" To use folders elsewhere, the server's owner can register them in extra_model_paths.yaml "
                    f"under '{rule.registered_key}', or list them in the {ALLOWED_FOLDERS_VARIABLE} environment "
                    f"variable (see {SECURITY_DOC}).")
    return message


def validate_folder(rule: FolderRule, value: str | None) -> bool | str:
    """For a node's validate_inputs: True, or why ``value`` is refused. None (a value that comes from a link) is
    checked when the node runs."""
    if value is None:
        return True
    try:
        resolve_folder(rule, value)
    except FolderRefused as error:
        return str(error)
    return True
