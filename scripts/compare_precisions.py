#!/usr/bin/env python3
"""Every score's AUROC per precision, side by side, from the eval-<precision>.json files of
scripts/gpu-precision.sh; marks where a precision differs from f32 at the 3rd decimal (issue 22's
"accurate mode": the fastest precision equal to f32 to 3 decimals on every score).

Usage: python3 scripts/compare_precisions.py DIR
"""
import json
import sys
from pathlib import Path

d = Path(sys.argv[1])
evals = {p.stem.removeprefix("eval-"): json.loads(p.read_text()) for p in sorted(d.glob("eval-*.json"))}
order = [p for p in ["f32", "tf32", "bf16", "bf16-all"] if p in evals]
auroc = {
    p: {(r["ood"], r["score"]): r["auroc"] for r in e["results"]} for p, e in evals.items()
}
keys = sorted(auroc[order[0]])
print("| OOD set | score | " + " | ".join(order) + " |")
print("|---|---|" + "---|" * len(order))
equal = {p: True for p in order}
for k in keys:
    base = auroc["f32"].get(k) if "f32" in auroc else None
    cells = []
    for p in order:
        v = auroc[p].get(k)
        same = base is not None and v is not None and round(v, 3) == round(base, 3)
        equal[p] &= same
        cells.append("-" if v is None else f"{v:.4f}" + ("" if same or p == "f32" else " *"))
    print(f"| {k[0]} | {k[1]} | " + " | ".join(cells) + " |")
print()
print("equal to f32 at 3 decimals on every score: " + ", ".join(p for p in order if equal[p]))
