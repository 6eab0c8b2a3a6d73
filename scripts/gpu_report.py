"""The GPU check's report: ``python scripts/gpu_report.py SCRATCH OUT`` reads what
``scripts/gpu_check.sh`` left in SCRATCH and writes OUT/report.json and OUT/report.md."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def steps(scratch: Path) -> list[dict]:
    rows = []
    for line in (scratch / "steps.tsv").read_text().splitlines():
        name, code, seconds = line.split("\t")
        rows.append({"step": name, "exit_code": int(code), "seconds": int(seconds)})
    return rows


def tests(scratch: Path) -> dict | None:
    """Counts and the failures' names from pytest's JUnit XML."""
    try:
        root = ET.parse(scratch / "tests.xml").getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}: "
              f"{(case[0].get('message') or '').splitlines()[0][:300] if len(case) else ''}"
              for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]  # fmt: skip
    return {**counts, "passed": counts["tests"] - sum(v for k, v in counts.items() if k != "tests"),
            "failed": failed}  # fmt: skip


def stage_lines(stages: dict | None) -> list[str]:
    if not stages:
        return ["- no stage report (see stages.log)"]
    lines = [f"- `{name}`: exit {r['exit_code']}, {r['seconds']} s"
             for name, r in stages["stages"].items()]  # fmt: skip
    train = stages.get("train_metrics") or {}
    if train:
        lines.append(f"- train.json: {train.get('steps')} steps, "
                     f"{train.get('images_per_second', float('nan')):,.0f} img/s over the run "
                     f"(validation, checkpoints, EMA included), final val loss "
                     f"{train.get('final_val_loss', float('nan')):.4f}")  # fmt: skip
    ev = stages.get("eval_metrics") or {}
    if ev:
        lines.append(f"- eval.json: FID {ev.get('fid', float('nan')):.2f} of "
                     f"{ev.get('num_images')} images ({ev.get('label', '')})")  # fmt: skip
    nll = stages.get("nll_metrics") or {}
    if nll:
        lines.append(f"- nll.json: {nll.get('bpd', float('nan')):.4f} +- "
                     f"{nll.get('bpd_stderr', float('nan')):.4f} bits/dim of "
                     f"{nll.get('num_images')} {nll.get('split')} images, stride "
                     f"{nll.get('stride')}")  # fmt: skip
    return lines


def main(scratch: Path, out: Path) -> None:
    report = {
        "environment": (scratch / "environment.txt").read_text()
        if (scratch / "environment.txt").exists() else "",
        "steps": steps(scratch),
        "tests": tests(scratch),
        "stages": read_json(scratch / "stages.json"),
        "bench": read_json(scratch / "bench.json"),
    }  # fmt: skip
    report["ok"] = all(s["exit_code"] == 0 for s in report["steps"])
    (out / "report.json").write_text(json.dumps(report, indent=2))
    t = report["tests"]
    md = ["# GPU check", "", "```", report["environment"].strip(), "```", "",
          "| step | exit | seconds |", "|---|---|---|",
          *[f"| {s['step']} | {s['exit_code']} | {s['seconds']} |" for s in report["steps"]],
          "", "## tests/gpu", ""]  # fmt: skip
    if t:
        md.append(f"{t['passed']} passed, {t['failures'] + t['errors']} failed, "
                  f"{t['skipped']} skipped")  # fmt: skip
        md += [f"- FAILED {name}" for name in t["failed"]]
    else:
        md.append("no result (see tests.log)")
    md += ["", "## Stages (scripts/stage_run.py)", "", *stage_lines(report["stages"]), "",
           "## Bench (benchmarks/bench_gpu.py)", ""]  # fmt: skip
    bench_md = scratch / "bench.md"
    md.append(bench_md.read_text() if bench_md.exists() else "no result (see bench.log)")
    (out / "report.md").write_text("\n".join(md) + "\n")
    print((out / "report.md").read_text())


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
