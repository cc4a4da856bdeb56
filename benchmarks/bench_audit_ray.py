"""finextract-audit of the same 8 demo-world models (benchmarks/bench_audit.py's) three ways, side by side in one
run: the single-machine command, --ray local with 1 worker, --ray local with 2 workers. Prints figures; asserts
nothing.

    python -m benchmarks.bench_audit_ray [--models 8] [--candidates-per-image 20] [--steps 10] [--bank-range 16]

For each way: the seconds until every worker's ComfyUI answers (start-up, paid once per run), the seconds of the
audit's work after that (LoRA fit, pre-screen, banks, extraction), and the whole wall time. Ray's overhead is shown
twice: per Ray task (a group of jobs sent to a worker), the driver's wait for it less the worker's own time for it;
and per model, the 1-worker Ray run's work less the single-machine run's, divided by the models. Each ComfyUI runs
one thread (OMP_NUM_THREADS=1), so with 2 workers each has a core of its own only when the machine has 2 idle cores:
the load (uptime) is printed before and after.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

from benchmarks.bench_audit import audit_options, uptime
from fixtures.audit_inputs import build_bench_models, build_inputs
from tools.host.comfy_server import read_host_env


def timed_audit(arguments: list[str]) -> dict:
    """One audit, as Audit.run does it, with its start-up and its work timed apart."""
    from finextract_core.audit import command
    from finextract_core.hashing import FileHashes

    opts = command.parser().parse_args(arguments)
    audit = command.Audit(opts)
    audit.references = command.references_in(opts.references)
    os.makedirs(os.path.join(audit.out, "state"), exist_ok=True)
    files = command.model_files(opts.models)
    jobs = audit.plan(files, audit.builder.bases(opts.bases), FileHashes(None))
    began = time.monotonic()
    workers = audit.workers(sorted({root for root, _ in files}))
    ready = time.monotonic()
    try:
        audit.extract_all(workers, jobs)
    finally:
        done = time.monotonic()
        overheads = list(getattr(workers, "overheads", []))
        workers.close()
    extracted = sum(row["status"] == "done" for row in audit.rows.values())
    return {"start": ready - began, "work": done - ready, "wall": done - began, "overheads": overheads,
            "extracted": extracted, "models": len(jobs)}


def main() -> None:
    parser = audit_options(__doc__)
    parser.add_argument("--bank-range", type=int, default=16)
    opts = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # each ComfyUI one thread: a worker per core

    root = tempfile.mkdtemp(prefix="bench-audit-ray-")
    inputs = build_inputs(root)
    models = build_bench_models(os.path.join(root, "bench_models"), opts.models)
    host = read_host_env()
    common = ["--models", models, "--references", inputs["references"], "--bases", inputs["bases"],
              "--comfyui", host["FINEXTRACT_COMFYUI"], "--python", host["FINEXTRACT_PYTHON"], "--comfy-arg=--cpu",
              "--workflow-builder", "lab.audit_world:WorldBuilder", "--candidates-per-image",
              str(opts.candidates_per_image), "--steps", str(opts.steps), "--batch-size", str(opts.batch_size),
              "--bank-range", str(opts.bank_range)]
    ways = {"single machine": [], "ray, 1 worker": ["--ray", "local", "--workers", "1"],
            "ray, 2 workers": ["--ray", "local", "--workers", "2"]}
    print(f"machine: {os.cpu_count()} cores; load before: {uptime()}")
    print(f"{opts.models} models, N = {opts.candidates_per_image} x N0 candidates, {opts.steps} steps, batches of "
          f"{opts.batch_size}, bank ranges of {opts.bank_range} with 2 workers, 32 px world, CPU, 1 thread each")
    results = {}
    for name, extra in ways.items():
        out = os.path.join(root, "out-" + name.replace(" ", "").replace(",", "-"))
        results[name] = timed_audit([*common, "--out", out, *extra])
        print(f"  {name}: done ({uptime()})", flush=True)
    print(f"  {'way':<16} {'start-up':>9} {'work':>8} {'wall':>8} {'models':>7} {'Ray tasks':>10} {'per task':>9}")
    for name, r in results.items():
        per_task = f"{statistics.mean(r['overheads']):.3f}" if r["overheads"] else "-"
        print(f"  {name:<16} {r['start']:8.1f}s {r['work']:7.1f}s {r['wall']:7.1f}s {r['extracted']:>3}/"
              f"{r['models']:<3} {len(r['overheads']) or '-':>10} {per_task:>8}s")
    single, one, two = results["single machine"], results["ray, 1 worker"], results["ray, 2 workers"]
    tasks = one["overheads"] + two["overheads"]
    print(f"Ray's overhead per task: mean {statistics.mean(tasks):.3f} s, at most {max(tasks):.3f} s "
          "(target < 2 s per job)")
    print(f"Ray's overhead per model, 1 worker against the single machine: "
          f"{(one['work'] - single['work']) / single['models']:+.2f} s")
    print(f"2 workers against 1 (work after start-up): {one['work'] / two['work']:.2f}x; wall: "
          f"{one['wall'] / two['wall']:.2f}x; against the single machine: {single['work'] / two['work']:.2f}x "
          "(target >= 1.5x with a core per worker)")
    print(f"load after: {uptime()}")


if __name__ == "__main__":
    main()
