"""finextract-audit: which of these models reproduce my images? Many models against a folder of references,
through a real ComfyUI server, into one index.

    finextract-audit --models DIR_OR_FILE... --references DIR --bases DIR --out DIR
                     [--server URL | --comfyui DIR --python PYTHON] [--candidates-per-image 50] [--steps 50]

For each model: its evidence (finextract_core.evidence), the base it fits among --bases (refused, with the reason,
when none does), the pack's bank-first extraction (Candidate Bank, Clique Cluster, Extracted Images) with metrics
against the references and the model's audit report; then OUT/index.{html,csv,json}. A finished model is kept in
OUT/state/ under (model SHA-256, base SHA-256, settings), so the same command again skips it, and a killed run
resumes the model in flight from its bank. Models are grouped by base (the server keeps the base loaded across
them) and the references are embedded once (same node, same inputs: ComfyUI's cache).

With --ray auto (a running Ray cluster) or --ray local [--workers N], the same run over one ComfyUI worker per GPU
(audit.ray_cluster, docs/scale-out.md), with the same index.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass

from .. import comfy_client
from ..evidence import read_evidence
from ..evidence_header import EvidenceError
from ..hashing import FileHashes
from ..images import IMAGE_SUFFIXES, image_names
from .index import index_content, write_index
from .workflow import (LOOSE, STRICT, ExtractionSettings, ModelFile, bank_range_prompt, extraction_prompt, load_builder,
                       lora_fit_prompt, prescreen_prompt, with_defaults)

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FITTING_KINDS = ("lora", "lycoris", "checkpoint", "unet")
PROMPT_ATTEMPTS = 3  # a prompt is queued again after the server went away, at most this often
RECONNECT_SECONDS = 120.0  # how long a server given with --server may stay away before the run stops


class AuditError(RuntimeError):
    """Stops the run before any model (an empty reference folder, no server)."""


@dataclass
class Job:
    """One model to extract, once its base is chosen."""

    model: ModelFile
    evidence: dict
    base: object
    caption: str
    n0: int
    key: str
    row: dict  # the index row's evidence leads so far
    prescreen: float | None = None


def references_in(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise AuditError(f"--references '{folder}' is not a folder: give the folder of your reference images")
    names = image_names(folder)
    if not names:
        raise AuditError(f"--references '{folder}' holds no images ({', '.join(IMAGE_SUFFIXES)}): nothing to "
                         "compare the models with, so no model was run")
    return names


def model_files(paths: list[str]) -> list[tuple[str, str]]:
    """(root, path) of every file under the --models folders and of each file given, sorted, hidden files left out:
    files that are not models are listed too, so the index says why they were skipped."""
    found = []
    for given in paths:
        given = os.path.abspath(given)
        if os.path.isfile(given):
            found.append((os.path.dirname(given), given))
            continue
        if not os.path.isdir(given):
            raise AuditError(f"--models '{given}' is neither a file nor a folder")
        for root, dirs, files in os.walk(given, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found.extend((given, os.path.join(root, f)) for f in sorted(files) if not f.startswith("."))
    return sorted(set(found), key=lambda item: item[1])


def settings_key(evidence_sha256: str, base_sha256: str, builder: str, caption: str, n0: int,
                 settings: ExtractionSettings) -> str:
    value = {"model": evidence_sha256, "base": base_sha256, "builder": builder, "caption": caption, "n0": n0,
             "settings": settings.__dict__}
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def evidence_leads(evidence: dict) -> dict:
    """What the index shows of a model's evidence: where its caption, N0 and base came from."""
    caption, n0, base = evidence["caption"], evidence["n0"], evidence["base"]
    leads = {"kind": evidence["kind"]["value"], "caption": caption.get("value") or "",
             "caption_source": ",".join(s for s in caption.get("sources", []) if s) or "none (empty prompt)",
             "n0": n0["value"], "n0_source": n0["source"]}
    if base.get("name"):
        leads["base_recorded"] = base["name"]["value"]
    return leads


class Server:
    """The ComfyUI server the run uses: one it started (restarted when it dies) or one given by URL (waited for
    when it goes away).

    A server it starts writes into ``out`` (the reports and banks, which the index links to) and keeps in ``home``
    what no two servers on one machine may share: its log, its extra_model_paths.yaml, its temp folder (ComfyUI
    empties it at start-up), its input and user folders; its port is a free one. The models, the custom nodes and
    the ComfyUI tree are shared."""

    def __init__(self, opts, out: str, builder, roots: list[str], log, home: str | None = None):
        home = home or out
        self.log = log
        self.process = None
        self.object_info: dict = {}
        if opts.server:
            self.client = comfy_client.ComfyClient(opts.server)
            if not self.client.ready():
                raise AuditError(f"no ComfyUI answers at {opts.server}: start it, or leave --server out to let the "
                                 "audit start one")
            return
        comfy_root = opts.comfyui or comfy_client.find_comfyui(PACK_ROOT)
        if not comfy_root:
            raise AuditError("this pack is not inside a ComfyUI's custom_nodes: give --comfyui DIR (the folder "
                             "with ComfyUI's main.py), or --server URL")
        config = write_server_config(home, comfy_root, builder, roots, opts.bases, opts.references)
        self.state_file = os.path.join(home, "server.json")
        comfy_client.stop_recorded_server(self.state_file)
        own = {}
        for kind in ("temp", "input", "user"):
            own[kind] = os.path.join(home, "server", kind)
            os.makedirs(own[kind], exist_ok=True)
        arguments = ["--output-directory", out, "--temp-directory", own["temp"], "--input-directory", own["input"],
                     "--user-directory", own["user"], "--extra-model-paths-config", config,
                     "--database-url", "sqlite:///:memory:", *opts.comfy_arg]
        self.process = comfy_client.ComfyProcess(comfy_root, opts.python, arguments,
                                                 os.path.join(home, "comfyui.log"))
        self.config = config
        self.start()

    def start(self) -> None:
        self.log(f"starting ComfyUI from {self.process.comfy_root} on 127.0.0.1 (log: {self.process.log_path})")
        self.client = self.process.start()
        comfy_client.record_server(self.state_file, self.process, self.config)

    def recover(self, error: Exception) -> None:
        """After the server went away: started again when it is ours, waited for when it is not."""
        if self.process is not None:
            self.log(f"ComfyUI went away ({error}); starting it again")
            self.process.stop()
            self.start()
            return
        self.log(f"ComfyUI at {self.client.url} went away ({error}); waiting up to {RECONNECT_SECONDS:.0f} s")
        deadline = time.monotonic() + RECONNECT_SECONDS
        while time.monotonic() < deadline:
            if self.client.ready():
                return
            time.sleep(2)
        raise AuditError(f"ComfyUI at {self.client.url} did not come back within {RECONNECT_SECONDS:.0f} s")

    def node_info(self, prompt: dict) -> dict:
        """The server's /object_info for the prompt's node classes (fetched once each)."""
        for kind in {node["class_type"] for node in prompt.values()} - set(self.object_info):
            answer = self.client.get(f"/object_info/{kind}")
            if kind not in answer:
                raise AuditError(f"the ComfyUI server has no node {kind}: is the pack (and the workflow builder's "
                                 "nodes) installed in it?")
            self.object_info[kind] = answer[kind]
        return self.object_info

    def run(self, prompt: dict, on_progress=None) -> dict:
        """The prompt's history entry, queued again (the bank resumes) each time the server goes away."""
        for attempt in range(PROMPT_ATTEMPTS):
            try:
                alive = self.process.alive if self.process is not None else None
                queued = self.client.queue(with_defaults(prompt, self.node_info(prompt)))
                return self.client.wait(queued, on_progress=on_progress, alive=alive)
            except comfy_client.ServerUnavailable as error:
                if attempt == PROMPT_ATTEMPTS - 1:
                    raise
                self.recover(error)
        raise AssertionError("unreachable")

    def view_json(self, subfolder: str, name: str) -> dict:
        return json.loads(self.client.view(name, subfolder))

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def write_server_config(home: str, comfy_root: str, builder, roots: list[str], bases: str, references: str) -> str:
    """extra_model_paths.yaml for the server the audit starts: the models and bases folders in ComfyUI's model
    lists, the references folder registered for Load Reference Images (the pack reads folders outside ComfyUI's
    input only where the server's owner, here the audit, registered them: docs/security.md), and the pack (when it is not in that ComfyUI's custom_nodes) and the builder's node folders loaded after
    ComfyUI's own."""
    server = os.path.join(home, "server")
    node_folders = []
    if comfy_client.find_comfyui(PACK_ROOT) != os.path.abspath(comfy_root):
        node_folders.append(("custom_nodes", os.path.basename(PACK_ROOT), PACK_ROOT))
    node_folders.extend(("nodes_after_pack", name, folder) for name, folder in builder.custom_node_folders)
    for parent, name, target in node_folders:
        link = os.path.join(server, parent, name)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if os.path.islink(link) and os.readlink(link) != target:
            os.remove(link)
        if not os.path.lexists(link):
            os.symlink(target, link)
    folders = {"custom_nodes": sorted({os.path.join(server, parent) for parent, _, _ in node_folders},
                                      key=lambda p: p.endswith("nodes_after_pack")),
               "loras": roots, "checkpoints": [os.path.abspath(bases), *roots],
               "diffusion_models": [os.path.abspath(bases), *roots],
               "finextract_references": [os.path.abspath(references)]}
    lines = ["finextract_audit:", f"  base_path: {json.dumps(server)}"]
    for kind, paths in folders.items():
        if paths:
            lines.append(f"  {kind}: |")
            lines.extend(f"    {path}" for path in paths)
    path = os.path.join(home, "extra_model_paths.yaml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def log_line(started: float, message: str, worker: str = "") -> None:
    """One progress line, its time counted from the run's start (a wall-clock time, which the workers share)."""
    print(f"[audit {time.time() - started:5.0f} s{' ' + worker if worker else ''}] {message}", flush=True)


def settings_of(opts) -> ExtractionSettings:
    return ExtractionSettings(opts.candidates_per_image, opts.max_candidates, opts.steps, opts.seed, opts.batch_size)


def state_path(out: str, job: Job) -> str:
    """Where a finished model's index row is kept (the next run skips the model)."""
    return os.path.join(out, "state", f"{job.key}.json")


def bank_folder(job: Job) -> str:
    """The model's Candidate Bank, relative to the server's output folder (every worker writes its ranges there)."""
    return f"banks/{job.key}"


def bank_ranges(candidates: int, size: int, batch_size: int) -> list[tuple[int, int]]:
    """(first candidate, count) ranges that cover 0 .. candidates - 1, each a whole number of bank batches: the
    bank then holds the batches one prompt over the whole range makes, so no candidate's rounding depends on the
    split."""
    size = max(1, -(-size // batch_size)) * batch_size
    return [(first, min(size, candidates - first)) for first in range(0, candidates, size)]


def split_evenly(items: list, weight_of, parts: int) -> list[list]:
    """``items`` in at most ``parts`` contiguous groups of about equal weight."""
    total = sum(weight_of(item) for item in items)
    groups, group, done = [], [], 0
    for item in items:
        group.append(item)
        done += weight_of(item)
        if len(groups) < parts - 1 and done * parts >= total * (len(groups) + 1):
            groups.append(group)
            group = []
    return groups + ([group] if group else [])


def base_groups(items: list, base_of, weight_of, workers: int) -> list[list]:
    """Items (kept in order) grouped by base, so that a worker keeps one base loaded over a whole group: each
    base's items in contiguous groups, as many as its share of the work keeps workers busy (at least one); the
    heaviest groups first, so the run does not end waiting on one big group."""
    by_base: dict = {}
    for item in items:
        by_base.setdefault(base_of(item), []).append(item)
    total = sum(weight_of(item) for item in items) or 1
    groups = []
    for members in by_base.values():
        weight = sum(weight_of(item) for item in members)
        groups.extend(split_evenly(members, weight_of, max(1, -(-workers * weight // total))))
    return sorted(groups, key=lambda group: -sum(weight_of(item) for item in group))


class RowMaker:
    """What the run and each worker share: the index rows they make (``rows``) and their progress lines (``log``)."""

    rows: dict[str, dict]

    def log(self, message: str) -> None:
        raise NotImplementedError

    def skip(self, name: str, status: str, reason: str, leads: dict | None = None) -> None:
        """The index row of a model that is not extracted, with the reason, logged."""
        self.rows[name] = {"model": name, "status": status, "reason": reason, "evidence": leads or {}}
        self.log(f"{name}: {status}: {reason}")


class AuditWorker(RowMaker):
    """What one ComfyUI server does for the audit, a group of jobs at a time: read LoRAs' keys against their base,
    pre-screen, fill index ranges of banks, extract. The single-machine command has one (LocalWorkers); a Ray
    cluster has one in each actor (audit.ray_cluster). Each call returns the index rows it made."""

    def __init__(self, opts, roots: list[str], started: float, name: str = ""):
        self.opts = opts
        self.out = os.path.abspath(opts.out)
        self.started = started
        self.name = name
        self.builder = load_builder(opts.workflow_builder)
        self.settings = settings_of(opts)
        self.rows: dict[str, dict] = {}
        home = os.path.join(self.out, "workers", name) if name else self.out
        self.server = Server(opts, self.out, self.builder, roots, self.log, home)

    def log(self, message: str) -> None:
        log_line(self.started, message, self.name)

    def made_rows(self) -> dict[str, dict]:
        rows, self.rows = self.rows, {}
        return rows

    def screen(self, jobs: list[Job]) -> tuple[list[Job], dict[str, dict]]:
        """The jobs that go on to extraction (with their LoRA fit and pre-screen score), and the rows of those
        that do not."""
        kept = self.fit_loras(jobs)
        if self.opts.prescreen:
            kept = self.prescreen(kept)
        return kept, self.made_rows()

    def fit_loras(self, jobs: list[Job]) -> list[Job]:
        """A LoRA runs only where its base takes every key of it that the base can be asked about (ComfyUI's own
        key maps, through the Model Evidence node): a LoRA that half-applies would be audited as another model."""
        kept = []
        for job in jobs:
            if not job.model.is_lora:
                kept.append(job)
                continue
            graph = self.builder.model_graph(job.model, job.base, job.caption)
            entry = self.server.run(lora_fit_prompt(graph, job.model))
            error = comfy_client.execution_error(entry)
            if error:
                self.skip(job.model.name, "failed", f"reading its keys against {job.base.name}: {error}", job.row)
                continue
            fit = entry["outputs"]["evidence"]["finextract_evidence"][0]["base_fit"]
            job.row["lora_keys_loaded"] = f"{fit['keys_loaded']}/{fit['keys_checked']}"
            if not fit["keys_checked"] or fit["keys_loaded"] < fit["keys_checked"]:
                self.skip(job.model.name, "no base", f"{job.base.name} takes {fit['keys_loaded']} of the LoRA's "
                          f"{fit['keys_checked']} keys: it was trained on another base", job.row)
                continue
            kept.append(job)
        return kept

    def prescreen(self, jobs: list[Job]) -> list[Job]:
        kept = []
        for job in jobs:
            graph = self.builder.model_graph(job.model, job.base, job.caption)
            entry = self.server.run(prescreen_prompt(graph, self.builder, self.opts.prescreen_samples, self.opts.seed))
            error = comfy_client.execution_error(entry)
            if error:
                self.skip(job.model.name, "failed", f"pre-screen: {error}", job.row)
                continue
            job.prescreen = round(float(entry["outputs"]["prescreen"]["finextract_prescreen"][0]["score"]), 6)
            if job.prescreen < self.opts.prescreen_threshold:
                self.skip(job.model.name, "below pre-screen",
                          f"pre-screen score {job.prescreen:.4f} < --prescreen-threshold "
                          f"{self.opts.prescreen_threshold:g}", {**job.row, "prescreen": job.prescreen})
                continue
            self.log(f"{job.model.name}: pre-screen {job.prescreen:.4f}")
            kept.append(job)
        return kept

    def extraction(self, job: Job) -> tuple[dict, str]:
        """The model's whole prompt, and its report's folder under the output folder."""
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in job.model.name)[:80]
        report_prefix = f"reports/{slug}-{job.key[:8]}"
        graph = self.builder.model_graph(job.model, job.base, job.caption)
        prompt = extraction_prompt(graph, self.builder, job.model, self.opts.references, job.n0, self.settings,
                                   bank_folder(job), report_prefix)
        return prompt, report_prefix

    def bank_progress(self, job: Job) -> "BankProgress":
        return BankProgress(os.path.join(self.out, bank_folder(job)), self.settings.candidates(job.n0), self.log,
                            job.model.name)

    def fill(self, ranges: list[tuple[Job, int, int]]) -> dict[str, dict]:
        """Candidates first .. first + count - 1 of each model into its bank (the bank node alone). A range that
        fails is left to the model's extraction, which generates what is missing and reports the error."""
        for job, first, count in ranges:
            prompt = bank_range_prompt(self.extraction(job)[0], first, count)
            span = f"candidates {first}-{first + count - 1} of {self.settings.candidates(job.n0)}"
            self.log(f"{job.model.name}: {span} into its bank")
            error = comfy_client.execution_error(self.server.run(prompt, on_progress=self.bank_progress(job)))
            if error:
                self.log(f"{job.model.name}: {span}: {error}")
        return self.made_rows()

    def extract(self, numbered: list[tuple[int, int, Job]]) -> dict[str, dict]:
        """Each model's extraction, metrics and report, ``(number, total, job)`` as the progress names it. The
        bank resumes: what an earlier run or other workers' ranges made is not generated again."""
        for number, total, job in numbered:
            self.extract_one(job, number, total)
        return self.made_rows()

    def extract_one(self, job: Job, number: int, total: int) -> None:
        name = job.model.name
        state = state_path(self.out, job)
        if os.path.exists(state):
            with open(state) as f:
                self.rows[name] = json.load(f)
            self.log(f"model {number}/{total} {name}: finished in an earlier run")
            return
        candidates = self.settings.candidates(job.n0)
        prompt, report_prefix = self.extraction(job)
        self.log(f"model {number}/{total} {name} on {job.base.name}: N = {candidates} candidates, N0 = {job.n0}, "
                 f"caption {job.caption!r}")
        entry = self.server.run(prompt, on_progress=self.bank_progress(job))
        error = comfy_client.execution_error(entry)
        if error:
            self.skip(name, "failed", error, job.row)
            return
        report = self.server.view_json(report_prefix, "report.json")
        scores = {row["name"]: round(float(row["score"]), 6) for row in report["references"]}
        row = {"model": name, "status": "done", "base": job.base.name, "evidence": job.row,
               "report": f"{report_prefix}/report.html", "scores": scores,
               "passes_loose": sum(s >= LOOSE for s in scores.values()),
               "passes_strict": sum(s >= STRICT for s in scores.values()),
               "best": max(scores.values(), default=0.0), "prescreen": job.prescreen,
               "candidates": candidates, "n0": job.n0}
        with open(state + ".tmp", "w") as f:
            json.dump(row, f, sort_keys=True)
        os.replace(state + ".tmp", state)
        self.rows[name] = row
        self.log(f"model {number}/{total} {name}: best {row['best']:.3f}, {row['passes_loose']} of "
                 f"{len(scores)} references pass {LOOSE:g}, report {report_prefix}/report.html")

    def stop(self) -> None:
        self.server.stop()


class LocalWorkers:
    """The single-machine run: one AuditWorker and its server, the jobs one at a time in the run's order (which
    keeps each base's models together)."""

    count = 1

    def __init__(self, opts, roots: list[str], started: float, log):
        self.worker = AuditWorker(opts, roots, started)

    def groups(self, items: list, base_of, weight_of) -> list[list]:
        return [[item] for item in items]

    def map(self, method: str, groups: list[list]):
        """Each group's result, in order."""
        for group in groups:
            yield getattr(self.worker, method)(group)

    def close(self) -> None:
        self.worker.stop()


def job_of(item) -> Job:
    """The job of a step's item: a Job, (number, total, job) or (job, first, count)."""
    if isinstance(item, Job):
        return item
    return item[2] if isinstance(item[2], Job) else item[0]


class Audit(RowMaker):
    def __init__(self, opts):
        self.opts = opts
        self.out = os.path.abspath(opts.out)
        self.started = time.time()
        self.builder = load_builder(opts.workflow_builder)
        self.settings = settings_of(opts)
        self.rows: dict[str, dict] = {}

    def log(self, message: str) -> None:
        log_line(self.started, message)

    def write_index(self, progress: str) -> None:
        write_index(self.out, index_content(list(self.rows.values()), self.references, (LOOSE, STRICT), progress))

    def workers(self, roots: list[str]):
        """The servers the run drives: one here, or a Ray cluster's (--ray; the engine is imported only then)."""
        if self.opts.ray:
            from .ray_cluster import RayWorkers

            return RayWorkers(self.opts, roots, self.started, self.log)
        return LocalWorkers(self.opts, roots, self.started, self.log)

    def run(self) -> int:
        opts = self.opts
        self.references = references_in(opts.references)
        os.makedirs(os.path.join(self.out, "state"), exist_ok=True)
        hashes = FileHashes(os.path.join(self.out, "hashes.jsonl"))
        files = model_files(opts.models)
        roots = sorted({root for root, _ in files})
        bases = self.builder.bases(opts.bases)
        if not bases:
            self.log(f"--bases '{opts.bases}' holds no base model this builder knows: every model will be skipped")
        jobs = self.plan(files, bases, hashes)
        self.write_index(f"running: {len(jobs)} models to extract")
        if jobs:
            workers = self.workers(roots)
            try:
                self.extract_all(workers, jobs)
            finally:
                workers.close()
        done = sum(row["status"] == "done" for row in self.rows.values())
        self.write_index(f"complete: {done} models extracted, {len(self.rows) - done} not")
        self.log(f"done: {self.out}/index.html ({done} models extracted, {len(self.rows) - done} not)")
        return 0

    def extract_all(self, workers, jobs: list[Job]) -> None:
        """Every model's LoRA fit and pre-screen; then, with several workers, the banks' index ranges spread over
        them; then each model's extraction. Each step goes to the workers in groups by base."""
        def base_of(item) -> str:
            return job_of(item).base.name

        def candidates_of(item) -> int:
            return self.settings.candidates(job_of(item).n0)

        screened = []
        for kept, rows in workers.map("screen", workers.groups(jobs, base_of, lambda job: 1)):
            screened.extend(kept)
            self.rows.update(rows)
        screened.sort(key=lambda job: (job.base.name, -(job.prescreen or 0.0), job.model.name))
        if workers.count > 1:  # one model's bank over many workers, and many models' evenly
            ranges = [(job, first, count) for job in screened if not os.path.exists(state_path(self.out, job))
                      for first, count in bank_ranges(self.settings.candidates(job.n0), self.opts.bank_range,
                                                      self.settings.batch_size)]
            for rows in workers.map("fill", workers.groups(ranges, base_of, lambda item: item[2])):
                self.rows.update(rows)
        numbered = [(number, len(screened), job) for number, job in enumerate(screened, 1)]
        extracted = 0
        for rows in workers.map("extract", workers.groups(numbered, base_of, candidates_of)):
            extracted += len(rows)
            self.rows.update(rows)
            self.write_index(f"running: {extracted} of {len(screened)} models extracted")

    def plan(self, files, bases, hashes) -> list[Job]:
        jobs = []
        for root, path in files:
            name = os.path.relpath(path, root).replace(os.sep, "/")
            try:
                evidence = read_evidence(path, name=name, hashes=hashes)
            except EvidenceError as error:  # its message names the file by its path: the index names it once
                self.skip(name, "unreadable", str(error).replace(path, name))
                continue
            data = evidence.to_dict()
            leads = evidence_leads(data)
            if not evidence.complete:
                self.skip(name, "unreadable", f"the file is cut short ({evidence.file_bytes} bytes, its header "
                          "promises more): download it again", leads)
                continue
            if evidence.kind.value not in FITTING_KINDS:
                self.skip(name, "unsupported", f"not a model this audit can run: {evidence.kind.note or evidence.kind.value}",
                          leads)
                continue
            model = ModelFile(path, root, name, evidence.kind.value)
            family = evidence.family.value if evidence.family else None
            fits = [(base, self.builder.fit(model, family, base)) for base in bases]
            fitting = [base for base, reason in fits if reason is None]
            if not fitting:
                why = "; ".join(f"{base.name}: {reason}" for base, reason in fits) or "no base models in --bases"
                self.skip(name, "no base", f"no base in --bases fits ({why})", leads)
                continue
            recorded = evidence.base_sha256.value if evidence.base_sha256 else None
            fitting.sort(key=lambda base: (hashes.sha256(base.path) != recorded, base.name))
            base = fitting[0]
            caption = evidence.caption.text if evidence.caption else ""
            n0 = int(evidence.n0.value)
            key = settings_key(evidence.sha256, hashes.sha256(base.path), self.builder.name, caption, n0,
                               self.settings)
            leads["base_match"] = ("recorded sha256" if recorded == hashes.sha256(base.path) else
                                   f"fits by its tensors (one of {len(fitting)})")
            jobs.append(Job(model, data, base, caption, n0, key, leads))
        return jobs


class BankProgress:
    """Called while a model's prompt runs: the bank's size on disk, and the time left at this run's pace."""

    EVERY = 10.0

    def __init__(self, folder: str, total: int, log, name: str):
        self.folder, self.total, self.log, self.name = folder, total, log, name
        self.began = time.monotonic()
        self.last = self.began
        self.first_count = None

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self.last < self.EVERY:
            return
        self.last = now
        from ..bank import BankError, CandidateBank

        try:
            count = len(CandidateBank.read(self.folder))
        except (BankError, OSError, ValueError, KeyError):
            count = 0
        if self.first_count is None:
            self.first_count = count
        made = count - self.first_count
        left = "" if made <= 0 else f", about {(self.total - count) * (now - self.began) / made:.0f} s left"
        self.log(f"  {self.name}: {count} of {self.total} candidates in the bank{left}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finextract-audit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="folders and/or files: LoRAs, checkpoints, UNets")
    p.add_argument("--references", required=True, help="folder of the reference images (your works)")
    p.add_argument("--bases", required=True, help="folder of the base checkpoints you have")
    p.add_argument("--out", required=True, help="folder for the index, the reports and the banks")
    p.add_argument("--server", help="URL of a running ComfyUI with this pack (default: start one on 127.0.0.1)")
    p.add_argument("--comfyui", help="the ComfyUI folder to start (default: the one this pack is installed in)")
    p.add_argument("--python", default=sys.executable, help="the Python that runs that ComfyUI")
    p.add_argument("--comfy-arg", action="append", default=[],
                   help="an extra argument for the ComfyUI it starts (repeat; for example --comfy-arg=--cpu)")
    p.add_argument("--workflow-builder", default="sd",
                   help="the model family's loaders: 'sd', or module:attribute of another builder")
    p.add_argument("--candidates-per-image", type=int, default=50, help="N = this x N0 candidates (the paper: 50)")
    p.add_argument("--max-candidates", type=int, default=0, help="cap on N per model (0: none)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (the paper: 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="candidates per Candidate Bank batch")
    p.add_argument("--prescreen", action="store_true", help="score each model first (a few denoiser evaluations) "
                   "and extract the likeliest memorisers first")
    p.add_argument("--prescreen-threshold", type=float, default=0.0, help="skip models scoring below this")
    p.add_argument("--prescreen-samples", type=int, default=4)
    cluster = p.add_argument_group("scale-out on a Ray cluster (pip install 'finextract[cluster]'; docs/scale-out.md)")
    cluster.add_argument("--ray", choices=("auto", "local"),
                         help="'auto': join the running Ray cluster (ray start); 'local': start one on this machine "
                         "for the run. Each worker starts its own ComfyUI server")
    cluster.add_argument("--workers", type=int, default=0,
                         help="ComfyUI workers (default: one per GPU of the cluster; on a machine without GPUs, 1)")
    cluster.add_argument("--bank-range", type=int, default=64,
                         help="candidates per Ray task when a model's bank is spread over the workers (rounded up "
                         "to whole batches)")
    return p


def main(argv: list[str] | None = None) -> int:
    opts = parser().parse_args(argv)
    if opts.ray and opts.server:
        print("finextract-audit: --ray starts a ComfyUI server on each worker: leave --server out", file=sys.stderr)
        return 2
    if opts.workers and not opts.ray:
        print("finextract-audit: --workers needs --ray local or --ray auto", file=sys.stderr)
        return 2
    try:
        return Audit(opts).run()
    except AuditError as error:
        print(f"finextract-audit: {error}", file=sys.stderr)
        return 2

