"""What evaluation.suite writes: a row per checkpoint in suite.json, and suite.md for people.

    suite.md    rows = checkpoints, columns = domains ("text->image MRR / R@10", `*` = trained
                on that domain), a held-out mean MRR column, a compact image->text MRR table,
                and "MRR relative to zero-shot" when a row is named `zeroshot` (or its
                config.json says "zeroshot": true)
    suite.json  every number per domain per checkpoint, the domains' pools, training datasets,
                each checkpoint's image / text backbone key (null: not fully frozen)
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from evaluation.domains import Domain, trained_datasets
from evaluation.report import markdown_table
from evaluation.retrieval import IMAGE_TO_TEXT, TEXT_TO_IMAGE, EvalResult

log = logging.getLogger("evaluation")

SUITE_JSON = "suite.json"
SUITE_MD = "suite.md"
SEEN_MARK = "*"
UNKNOWN_MARK = "?"
ZEROSHOT_NAME = "zeroshot"
SUMMARY_T2I = ("MRR", "R@1", "R@10", "num_queries", "num_candidates")


# --- suite.json ------------------------------------------------------------------------------------

def is_zeroshot(name: str, config: dict) -> bool:
    return name == ZEROSHOT_NAME or config.get("zeroshot") is True


def checkpoint_row(name: str, path: str, config: dict) -> dict:
    """A checkpoint's row before any evaluation (its config.json says what it trained on)."""
    datasets, origin = trained_datasets(config)
    return {"name": name, "checkpoint": str(Path(path).expanduser().resolve()),
            "model_id": config.get("model_id"), "zeroshot": is_zeroshot(name, config),
            "trained_on": datasets, "trained_on_from": origin,
            "image_backbone": None, "text_backbone": None, "domains": {}}


def summarize(result: EvalResult) -> dict:
    t2i = result.directions[TEXT_TO_IMAGE].metrics
    i2t = result.directions[IMAGE_TO_TEXT].metrics
    return {
        TEXT_TO_IMAGE: {key: t2i[key] for key in SUMMARY_T2I},
        IMAGE_TO_TEXT: {"MRR": i2t["MRR"], "num_queries": i2t["num_queries"], "num_candidates": i2t["num_candidates"]},
        "num_images_evaluated": len(result.samples),
        "skipped_images": len(result.skipped_images),
        "metrics": {name: dict(direction.metrics) for name, direction in result.directions.items()},
        "notes": list(result.notes),
    }


def record(row: dict, domain: Domain, entry: dict) -> None:
    """A checkpoint's summary on a domain into its row; the domain's pool comes from the first one."""
    t2i = entry[TEXT_TO_IMAGE]
    pool = {"num_queries": t2i["num_queries"], "num_candidates": t2i["num_candidates"]}
    if not domain.pool:
        domain.pool = pool
    elif domain.pool != pool:
        entry["notes"].append(f"pool {pool} differs from the first checkpoint's {domain.pool}")
    row["domains"][domain.name] = entry
    log.info("%s on %s (%s): text->image MRR %.4f R@1 %.4f R@10 %.4f (%d x %d), image->text MRR %.4f",
             row["name"], domain.name, domain.split, t2i["MRR"], t2i["R@1"], t2i["R@10"],
             t2i["num_queries"], t2i["num_candidates"], entry[IMAGE_TO_TEXT]["MRR"])


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def mark_held_out(row: dict, available: list[Domain]) -> None:
    """Order the row's domains as configured; mark each seen in training or not (None: unknown) and
    average the text->image MRR of the held-out ones."""
    row["domains"] = {d.name: row["domains"][d.name] for d in available if d.name in row["domains"]}
    trained = row["trained_on"]
    evaluated = [d for d in available if d.name in row["domains"]]
    for domain in evaluated:
        seen = None if trained is None else bool(domain.aliases & set(trained))
        row["domains"][domain.name]["seen_in_training"] = seen
    row["seen_domains"] = [d.name for d in evaluated if row["domains"][d.name]["seen_in_training"]]
    held_out = [] if trained is None else [d.name for d in evaluated if d.name not in row["seen_domains"]]
    row["held_out_domains"] = held_out if trained is not None else None
    row["held_out_mean_MRR"] = _mean([row["domains"][d][TEXT_TO_IMAGE]["MRR"] for d in held_out])


def relative_to_zeroshot(rows: list[dict], domains: list[Domain]) -> dict | None:
    """Per domain, every other row's text->image MRR divided by the zero-shot row's."""
    reference = next((row for row in rows if row["zeroshot"]), None)
    if reference is None:
        return None
    ratios: dict[str, dict[str, float | None]] = {}
    for domain in domains:
        base = reference["domains"][domain.name][TEXT_TO_IMAGE]["MRR"]
        ratios[domain.name] = {
            row["name"]: (row["domains"][domain.name][TEXT_TO_IMAGE]["MRR"] / base if base > 0 else None)
            for row in rows if row is not reference}
    return {"reference": reference["name"], "MRR_ratio": ratios}


def suite_payload(split: str, ks, domains: list[Domain], rows: list[dict]) -> dict:
    """What suite.json holds, once every row is evaluated (held-out marks and ratios added)."""
    available = [d for d in domains if d.available]
    for row in rows:
        mark_held_out(row, available)
    return {
        "split": split, "ks": list(ks),
        "domains": {d.name: d.to_dict() for d in domains},
        "checkpoints": rows,
        "relative_to_zeroshot": relative_to_zeroshot(rows, available),
    }


# --- suite.md --------------------------------------------------------------------------------------

def _cell(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _short(text: str, limit: int = 90) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _mark(entry: dict) -> str:
    seen = entry.get("seen_in_training")
    return SEEN_MARK if seen else UNKNOWN_MARK if seen is None else ""


def _numeric(header: list[str]) -> list[str]:
    """Alignment of a table whose first column names the row and the others hold numbers."""
    return ["---"] + ["---:"] * (len(header) - 1)


def suite_markdown(payload: dict) -> str:
    domains = payload["domains"]
    rows = payload["checkpoints"]
    header = ["checkpoint"] + [f"{name} MRR / R@10" for name in domains] + ["held-out mean MRR"]
    info = ["*split · queries × candidates*"]
    for domain in domains.values():
        info.append(f"{domain['split']} · {domain['num_queries']} × {domain['num_candidates']}"
                    if domain["status"] == "ok" else f"not available: {_short(domain['reason'])}")
    table = [info + [""]]
    for row in rows:
        cells = [row["name"]]
        for name in domains:
            entry = row["domains"].get(name)
            if entry is None:
                cells.append("n/a")
                continue
            t2i = entry[TEXT_TO_IMAGE]
            cells.append(f"{_cell(t2i['MRR'])} / {_cell(t2i['R@10'])}{_mark(entry)}")
        held_out = row["held_out_domains"]
        cells.append("–" if not held_out else f"{_cell(row['held_out_mean_MRR'])} ({len(held_out)})")
        table.append(cells)
    lines = [f"# Multi-domain retrieval suite — split {payload['split']}", "",
             "Text → image retrieval on each domain: one query per distinct caption, ranked against every "
             "image of the domain's split (every image carrying the caption is relevant). Cell: MRR / R@10.", "",
             markdown_table(header, table, _numeric(header)), "",
             f"`{SEEN_MARK}` the checkpoint was trained on this domain (its config.json); "
             f"`{UNKNOWN_MARK}` its training data is unknown; no mark: held out. "
             "Held-out mean MRR: mean over the available domains the checkpoint did not train on "
             "(how many in parentheses). n/a: the domain's data is not available."]
    unavailable = {name: d["reason"] for name, d in domains.items() if d["status"] != "ok"}
    if unavailable:
        lines += ["", "Not available:", ""] + [f"- **{name}**: {reason}" for name, reason in unavailable.items()]
    lines += image_to_text_section(payload)
    lines += relative_section(payload)
    lines += ["", "## Checkpoints", "",
              markdown_table(["name", "model id", "trained on", "checkpoint"],
                             [[row["name"], f"`{row['model_id']}`", _trained_label(row), f"`{row['checkpoint']}`"]
                              for row in rows])]
    return "\n".join(lines) + "\n"


def image_to_text_section(payload: dict) -> list[str]:
    """A compact table of image->text MRR (rows = checkpoints, columns = available domains)."""
    rows = payload["checkpoints"]
    available = [name for name, d in payload["domains"].items() if d["status"] == "ok"]
    if not available or not rows:
        return []
    info = ["*queries × candidates*"]
    for name in available:
        entry = next((row["domains"][name][IMAGE_TO_TEXT] for row in rows if name in row["domains"]), None)
        info.append("" if entry is None else f"{entry['num_queries']} × {entry['num_candidates']}")
    table = [info]
    for row in rows:
        cells = [row["name"]]
        for name in available:
            entry = row["domains"].get(name)
            cells.append("n/a" if entry is None else f"{_cell(entry[IMAGE_TO_TEXT]['MRR'])}{_mark(entry)}")
        table.append(cells)
    header = ["checkpoint"] + available
    return ["", "## Image → text MRR", "",
            "One query per image, ranked against the domain's distinct captions (each of its captions is "
            "relevant). Marks as above.", "",
            markdown_table(header, table, _numeric(header))]


def relative_section(payload: dict) -> list[str]:
    """Every other row's text->image MRR as a multiple of the zero-shot row's (none without one)."""
    relative = payload.get("relative_to_zeroshot")
    if not relative or not relative["MRR_ratio"]:
        return []
    available = list(relative["MRR_ratio"])
    others = [row["name"] for row in payload["checkpoints"] if row["name"] != relative["reference"]]
    if not others:
        return []
    ratio_rows = [[name] + [("–" if relative["MRR_ratio"][d][name] is None
                             else f"{relative['MRR_ratio'][d][name]:.2f}×") for d in available]
                  for name in others]
    header = ["checkpoint"] + available
    return ["", f"## MRR relative to zero-shot (`{relative['reference']}` = 1.00×)", "",
            markdown_table(header, ratio_rows, _numeric(header))]


def _trained_label(row: dict) -> str:
    if row["trained_on"] is None:
        return "unknown"
    label = ", ".join(row["trained_on"]) or "nothing (zero-shot)"
    return label + (" (inferred from its reader)" if row["trained_on_from"] == "data" else "")


def write_suite(payload: dict, output_dir: str | Path) -> dict[str, Path]:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = {SUITE_JSON: output_dir / SUITE_JSON, SUITE_MD: output_dir / SUITE_MD}
    written[SUITE_JSON].write_text(json.dumps(payload, indent=2, allow_nan=False, default=str) + "\n")
    written[SUITE_MD].write_text(suite_markdown(payload), encoding="utf-8")
    return written
