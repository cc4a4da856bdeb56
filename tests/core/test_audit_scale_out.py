"""The audit's scale-out pieces that need no server: the banks' index ranges (whole batches), the groups by base
the workers take, the bank-only prompt of a range, and that the command without --ray never imports Ray."""

import json
import os
import subprocess
import sys

from finextract_core.audit.command import bank_ranges, base_groups
from finextract_core.audit.workflow import (ExtractionSettings, ModelFile, SDBuilder, bank_range_prompt,
                                            extraction_prompt)
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bank_ranges_cover_every_candidate_once_in_whole_batches():
    assert bank_ranges(20, 8, 4) == [(0, 8), (8, 8), (16, 4)]
    assert bank_ranges(20, 6, 4) == [(0, 8), (8, 8), (16, 4)]  # 6 rounds up to two batches of 4
    assert bank_ranges(3, 64, 8) == [(0, 3)]
    assert bank_ranges(6900, 64, 8)[-1] == (6848, 52) and len(bank_ranges(6900, 64, 8)) == 108
    for total, size, batch in [(37, 5, 3), (100, 64, 8), (1, 1, 1)]:
        covered = [i for first, count in bank_ranges(total, size, batch) for i in range(first, first + count)]
        assert covered == list(range(total))
        assert all(first % batch == 0 for first, _ in bank_ranges(total, size, batch))


def test_one_base_is_split_over_the_workers_and_small_bases_stay_whole():
    one_base = [("a", i) for i in range(8)]
    assert base_groups(one_base, lambda item: item[0], lambda item: 1, 2) == [one_base[:4], one_base[4:]]
    assert base_groups(one_base, lambda item: item[0], lambda item: 1, 1) == [one_base]
    # Three bases over 2 workers: 6 of 10 units on base a get ceil(2 * 6 / 10) = 2 groups, b and c one each
    # (ceil(0.4) = 1); heaviest first, ties in the bases' order.
    items = [("a", i) for i in range(6)] + [("b", 0), ("b", 1), ("c", 0), ("c", 1)]
    groups = base_groups(items, lambda item: item[0], lambda item: 1, 2)
    assert groups == [items[0:3], items[3:6], items[6:8], items[8:10]]
    # Weights: one heavy item gets a group of its own.
    weighted = [("a", 30), ("a", 10), ("a", 10), ("a", 10)]
    assert base_groups(weighted, lambda item: item[0], lambda item: item[1], 2) == [weighted[:1], weighted[1:]]


def test_a_range_prompt_is_the_bank_and_what_it_reads_for_that_range():
    builder = SDBuilder()
    model = ModelFile("/m/lora.safetensors", "/m", "lora.safetensors", "lora")
    base = type("Base", (), {"name": "base.safetensors"})()
    graph = builder.model_graph(model, base, "a photo")
    prompt = extraction_prompt(graph, builder, model, "/refs", 2, ExtractionSettings(), "banks/k", "reports/r")
    ranged = bank_range_prompt(prompt, 16, 8)
    assert sorted(ranged) == ["bank", "base", "fine_tuned", "latent", "negative", "positive"]
    assert ranged["bank"]["inputs"]["first_candidate"] == 16 and ranged["bank"]["inputs"]["num_candidates"] == 8
    assert {k: v for k, v in ranged["bank"]["inputs"].items() if k not in ("first_candidate", "num_candidates")} == \
        {k: v for k, v in prompt["bank"]["inputs"].items() if k not in ("first_candidate", "num_candidates")}
    assert prompt["bank"]["inputs"]["first_candidate"] == 0 and prompt["bank"]["inputs"]["num_candidates"] == 100


def test_the_command_without_ray_does_not_import_ray(tmp_path):
    models, references, bases = tmp_path / "models", tmp_path / "references", tmp_path / "bases"
    for folder in (models, references, bases):
        folder.mkdir()
    (models / "notes.txt").write_text("not a model\n")
    Image.new("RGB", (8, 8)).save(references / "a.png")
    code = ("import sys; from finextract_core.audit import command; "
            f"code = command.main(['--models', {str(models)!r}, '--references', {str(references)!r}, "
            f"'--bases', {str(bases)!r}, '--out', {str(tmp_path / 'out')!r}]); "
            "print('RAY' if 'ray' in sys.modules else 'NO RAY', code)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "NO RAY 0"
    rows = json.load(open(tmp_path / "out" / "index.json"))["models"]
    assert [row["status"] for row in rows] == ["unreadable"]
