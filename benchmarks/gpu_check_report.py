"""Reading the parts' results and writing ``summary.json`` and ``summary.md`` for benchmarks/gpu_check.py.

Pure file reading and formatting (no torch), so a part that crashed half-way still gets its row.
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional


def pytest_result(junit_xml: Path) -> Optional[dict]:
    """Counts, failing tests (with the first line of their message) and skip reasons from pytest's JUnit XML."""
    if not junit_xml.exists():
        return None
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    failures, skips = [], set()
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
            skips.add(outcome.get("message", ""))
        else:
            counts["failed" if outcome.tag == "failure" else "errors"] += 1
            failures.append({"test": name, "message": (outcome.get("message") or "").splitlines()[:1]})
    return {**counts, "failures": failures, "skip_reasons": sorted(skips)}


def nccl_result(run_dir: Path) -> Optional[dict]:
    """Iterations, images/s and the ranks' parameter agreement from a run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("kind") == "train"]
    final = next((r for r in rows if r.get("kind") == "final"), {})
    return {"iterations": train[-1]["iter"] if train else 0,
            "images_per_s": [round(r["images_per_s"], 1) for r in train],
            "last_loss": train[-1]["loss"] if train else None, "ranks_in_sync": final.get("ranks_in_sync")}


def write_summary(out: Path, summary: dict) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text("\n".join(markdown(summary)) + "\n")


def markdown(summary: dict) -> list[str]:
    env = summary.get("env")
    lines = [f"# gpu-check {summary['started']}", "", _machine(env), "",
             f"Total {summary['seconds']:.0f} s of a {summary['budget_s']:.0f} s budget.", "",
             "| part | status | seconds | what | result |", "|---|---|---|---|---|"]
    for r in summary["parts"]:
        seconds = f"{r['seconds']:.0f}" if "seconds" in r else ""
        result = r.get("reason") or _brief(r)
        lines.append(f"| {r['name']} | {r['status']} | {seconds} | {r['what']} | {result} |")
    lines += _table(summary, "bench-step", "## Training step (bench_step.py)",
                    "| variant | device | preset | batch | crop | ms/step | images/s | peak MB | first step s |",
                    _step_row)
    lines += _table(summary, "bench-loss", "## CAC loss (bench_loss.py)",
                    "| device | n | N | conf | plain ms | ours ms | plain peak MB | ours peak MB |",
                    lambda name, row: _loss_row(row))
    failing = [r for r in summary["parts"] if r["status"] in ("failed", "timeout")]
    for r in failing:
        lines += ["", f"## {r['name']}: {r['status']} (log: {r.get('log')})", "", "```"] + r.get("tail", []) + ["```"]
    return lines


def _table(summary: dict, prefix: str, title: str, header: str, row) -> list[str]:
    """A section with one table row per result of the parts whose name starts with ``prefix`` (none: nothing)."""
    parts = [r for r in summary["parts"] if r["name"].startswith(prefix) and r.get("result")]
    if not parts:
        return []
    separator = "|" + "---|" * (header.count("|") - 1)
    return ["", title, "", header, separator] + [row(r["name"], result) for r in parts for result in r["result"]]


def _step_row(name: str, s: dict) -> str:
    first = f"{s['first_step_s']:.1f}" if s.get("first_step_s") is not None else ""
    return (f"| {name.removeprefix('bench-step-')} | {s['device']} | {s['preset']} | {s['batch']} | {s['crop']} | "
            f"{s['ms_per_step']:.0f} | {s['images_per_s']:.1f} | {s['peak_mb']:.0f} | {first} |")


def _machine(env: Optional[dict]) -> str:
    if env is None:
        return "**Machine:** the torch probe failed (see env.log)."
    if not env.get("cuda"):
        return (f"**CUDA: not available** (torch {env['torch']}, torch.cuda.is_available() is False): only the "
                "CPU parts ran; the CUDA parts are listed as skipped.")
    devices = "; ".join(f"{d['name']} ({d['memory_gib']} GiB, sm {d['capability']})" for d in env["devices"])
    return (f"**Machine:** {env['device_count']} GPU(s): {devices}; torch {env['torch']}, CUDA {env['cuda_build']}, "
            f"cuDNN {env['cudnn']}, NCCL {env['nccl']}.")


def _brief(record: dict) -> str:
    """One cell: what the part measured, or why it has nothing."""
    result = record.get("result")
    if record["name"] == "env" and result:
        return "CUDA available" if result.get("cuda") else "CUDA not available"
    if record["name"] == "cuda-tests" and result:
        text = f"{result['passed']} passed, {result['failed']} failed, {result['errors']} errors, " \
               f"{result['skipped']} skipped"
        if result["skip_reasons"]:
            text += f" ({'; '.join(result['skip_reasons'])})"
        return text
    if record["name"].startswith("bench-step") and result:
        return "; ".join(f"{s['images_per_s']:.1f} images/s, peak {s['peak_mb']:.0f} MB" for s in result)
    if record["name"].startswith("bench-loss") and result:
        return f"{len(result)} rows (table below)"
    if record["name"] == "nccl-2gpu" and result:
        return f"{result['iterations']} iterations, ranks in sync: {result['ranks_in_sync']}"
    return record.get("result_error") or ("see the log" if record["status"] != "ok" else "")


def _loss_row(row: dict) -> str:
    plain, fast = row.get("plain", {}), row.get("fast", {})

    def cell(r, key, fmt):
        return format(r[key], fmt) if key in r else r.get("error", "")
    return (f"| {row['device']} | {row['n']} | {row['N']} | {row['scenario']} | {cell(plain, 'ms', '.0f')} | "
            f"{cell(fast, 'ms', '.0f')} | {cell(plain, 'peak_mb', '.0f')} | {cell(fast, 'peak_mb', '.0f')} |")
