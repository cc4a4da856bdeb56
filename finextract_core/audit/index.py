"""The audit's index: one row per model (index.json, index.csv, index.html), the models that were extracted ranked
by the evidence against the references, then the models skipped and why.

Every file is a function of the rows alone (keys sorted, numbers rounded, no timestamps, rows in a fixed order), so
the same run over the same inputs writes the same bytes, also after a kill and a resume.
"""

from __future__ import annotations

import csv
import html
import io
import json
import os

SCHEMA = "finextract.audit-index/1"
INDEX_FILES = ("index.html", "index.csv", "index.json")
DIGITS = 4


def ranked(rows: list[dict]) -> list[dict]:
    """Extracted models first, by references passing the strict then the loose threshold, then the best score;
    skipped models after them, by name."""
    done = [row for row in rows if row["status"] == "done"]
    skipped = [row for row in rows if row["status"] != "done"]
    done.sort(key=lambda r: (-r["passes_strict"], -r["passes_loose"], -r["best"], r["model"]))
    skipped.sort(key=lambda r: r["model"])
    return done + skipped


def index_content(rows: list[dict], references: list[str], thresholds: tuple[float, float], progress: str) -> dict:
    return {"schema": SCHEMA, "progress": progress, "references": sorted(references),
            "thresholds": {"loose": thresholds[0], "strict": thresholds[1]}, "models": ranked(rows)}


def _number(value) -> str:
    return "" if value is None else f"{value:.{DIGITS}f}"


def _csv_text(content: dict) -> str:
    references = content["references"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    loose, strict = content["thresholds"]["loose"], content["thresholds"]["strict"]
    writer.writerow(["rank", "model", "status", f"passes_{loose:g}", f"passes_{strict:g}", "best", "prescreen",
                     "base", "caption", "caption_source", "n0", "n0_source", "lora_keys_loaded", "reason",
                     "report", *references])
    for rank, row in enumerate(content["models"], 1):
        leads = row.get("evidence", {})
        done = row["status"] == "done"
        writer.writerow([rank if done else "", row["model"], row["status"], row.get("passes_loose", ""),
                         row.get("passes_strict", ""), _number(row.get("best")), _number(row.get("prescreen")),
                         row.get("base") or "", leads.get("caption", ""), leads.get("caption_source", ""),
                         leads.get("n0", ""), leads.get("n0_source", ""), leads.get("lora_keys_loaded", ""),
                         row.get("reason", ""), row.get("report", ""),
                         *[_number(row.get("scores", {}).get(name)) for name in references]])
    return out.getvalue()


def _band(score, thresholds: dict) -> str:
    if score is None:
        return ""
    if score >= thresholds["strict"]:
        return ' class="strict"'
    return ' class="loose"' if score >= thresholds["loose"] else ""


STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #ccc;padding:.3em .5em;text-align:left;vertical-align:top;font-size:.9em}
th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}.strict{background:#f4a6a6}
.loose{background:#f9dd9c}.small{color:#666;font-size:.85em}"""


def _html_text(content: dict) -> str:
    e = html.escape
    thresholds = content["thresholds"]
    references = content["references"]
    done = [row for row in content["models"] if row["status"] == "done"]
    skipped = [row for row in content["models"] if row["status"] != "done"]
    parts = [f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>FineXtract audit</title><style>{STYLE}"
             "</style></head><body><h1>FineXtract audit: which models reproduce these references</h1>",
             f"<p>{e(content['progress'])}. Best similarity of each reference to any image extracted from each model "
             f"(cells at or above {thresholds['loose']:g} are shaded, {thresholds['strict']:g} darker). Models are "
             "ranked by how many references pass each threshold, then by the best score. A high score says the "
             "model reproduces an image close to that reference; the evidence columns are leads from the file's "
             "metadata, which anyone can edit.</p>"]
    head = "".join(f"<th>{e(name)}</th>" for name in references)
    parts.append(f"<table><tr><th>#</th><th>model</th><th>passes {thresholds['loose']:g}</th><th>passes "
                 f"{thresholds['strict']:g}</th><th>best</th><th>pre-screen</th>{head}<th>evidence</th></tr>")
    for rank, row in enumerate(done, 1):
        leads = row.get("evidence", {})
        cells = "".join(f"<td class=\"num\"><span{_band(row['scores'].get(name), thresholds)}>"
                        f"{e(_number(row['scores'].get(name)))}</span></td>" for name in references)
        lead_text = "<br>".join(e(f"{key}: {leads[key]}") for key in sorted(leads))
        parts.append(f"<tr><td>{rank}</td><td><a href=\"{e(row['report'])}\">{e(row['model'])}</a><div class=\"small\">"
                     f"base {e(row.get('base') or '')}</div></td><td class=\"num\">{row['passes_loose']}</td>"
                     f"<td class=\"num\">{row['passes_strict']}</td><td class=\"num\">{e(_number(row['best']))}</td>"
                     f"<td class=\"num\">{e(_number(row.get('prescreen')))}</td>{cells}"
                     f"<td class=\"small\">{lead_text}</td></tr>")
    parts.append("</table>")
    if skipped:
        parts.append("<h2>Models not extracted</h2><table><tr><th>model</th><th>status</th><th>why</th></tr>")
        parts.extend(f"<tr><td>{e(row['model'])}</td><td>{e(row['status'])}</td><td>{e(row.get('reason', ''))}</td>"
                     "</tr>" for row in skipped)
        parts.append("</table>")
    parts.append("<p class=\"small\">What this does not prove: a low score does not show a model was not trained on "
                 "a reference (the extraction can miss), and a high one is a strong lead to look at the extracted "
                 "images in the model's report, not a verdict.</p></body></html>\n")
    return "".join(parts)


def write_index(folder: str, content: dict) -> None:
    """index.json, index.csv and index.html in ``folder``, each replaced atomically."""
    texts = {"index.json": json.dumps(content, sort_keys=True, indent=2) + "\n", "index.csv": _csv_text(content),
             "index.html": _html_text(content)}
    for name, text in texts.items():
        path = os.path.join(folder, name)
        with open(path + ".tmp", "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
