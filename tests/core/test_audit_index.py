"""The audit's index files: ranked by the references that pass each threshold, then the best score; skipped models
after, by name; the same rows in any order give the same bytes; the HTML is self-contained and escaped."""

from __future__ import annotations

import csv
import json
import os

from finextract_core.audit.index import index_content, write_index

REFERENCES = ["b.png", "a.png"]


def done(model: str, a: float, b: float) -> dict:
    scores = {"a.png": a, "b.png": b}
    return {"model": model, "status": "done", "base": "world/pretrained.safetensors", "scores": scores,
            "passes_loose": sum(s >= 0.6 for s in scores.values()),
            "passes_strict": sum(s >= 0.7 for s in scores.values()), "best": max(a, b), "prescreen": None,
            "report": f"reports/{model}/report.html", "evidence": {"caption": "a sks photo", "n0": 2}}


ROWS = [
    done("one_strict.safetensors", 0.71, 0.1),  # 1 strict
    done("two_loose.safetensors", 0.65, 0.62),  # 0 strict, 2 loose
    done("best_but_none.safetensors", 0.59, 0.58),  # nothing passes
    done("also_one_strict.safetensors", 0.75, 0.65),  # 1 strict, 2 loose: above one_strict
    {"model": "<broken>.safetensors", "status": "unreadable", "reason": "cut short & more", "evidence": {}},
    {"model": "a_lora.safetensors", "status": "no base", "reason": "takes 0 of 8 keys", "evidence": {}},
]


def written(tmp_path, rows, name: str) -> dict[str, bytes]:
    folder = tmp_path / name
    folder.mkdir()
    write_index(str(folder), index_content(rows, REFERENCES, (0.6, 0.7), "complete"))
    return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder))}


def test_ranking_by_strict_then_loose_then_best_and_skipped_last(tmp_path):
    files = written(tmp_path, ROWS, "index")
    assert sorted(files) == ["index.csv", "index.html", "index.json"]
    content = json.loads(files["index.json"])
    assert [row["model"] for row in content["models"]] == [
        "also_one_strict.safetensors", "one_strict.safetensors", "two_loose.safetensors",
        "best_but_none.safetensors", "<broken>.safetensors", "a_lora.safetensors"]
    assert content["references"] == ["a.png", "b.png"]
    table = list(csv.DictReader(files["index.csv"].decode().splitlines()))
    assert [row["rank"] for row in table] == ["1", "2", "3", "4", "", ""]
    assert table[0]["a.png"] == "0.7500" and table[0]["passes_0.7"] == "1" and table[0]["passes_0.6"] == "2"
    assert table[4]["reason"] == "cut short & more"


def test_the_same_rows_in_any_order_give_the_same_bytes(tmp_path):
    assert written(tmp_path, ROWS, "first") == written(tmp_path, list(reversed(ROWS)), "second")


def test_html_is_self_contained_and_escaped(tmp_path):
    page = written(tmp_path, ROWS, "index")["index.html"].decode()
    assert "<script" not in page and "http" not in page and "<link" not in page
    assert "&lt;broken&gt;.safetensors" in page and "cut short &amp; more" in page
    assert 'href="reports/one_strict.safetensors/report.html"' in page
    assert '<span class="strict">0.7100</span>' in page and '<span class="loose">0.6500</span>' in page
