#!/usr/bin/env python3
"""Chooses the detector (model pair and score) by the protocol of models/README.md, from the
eval.json files of `glowwatch eval` runs against the *selection* sets only:

- negatives: Fashion-MNIST test (in-distribution data);
- `mnist_select`: MNIST rows 0-1,999 (a labelled reference OOD set; reports use rows 2,000-9,999);
- `general_mix_val`: held-out general data.

Rule, fixed before any report set was scored: among scores whose AUROC against
general_mix_val is at least 0.98 (a detector must also catch broad general images), take the
highest recall at the calibrated threshold (1 % target FPR, calibrated on held-out training rows)
on mnist_select; ties go to the higher AUROC on mnist_select.

Usage: python3 scripts/select_score.py NAME=eval.json [NAME=eval.json ...]
"""

import json
import sys

GATE = 0.98


def main() -> None:
    rows = []
    for arg in sys.argv[1:]:
        name, path = arg.split("=", 1)
        with open(path) as f:
            rep = json.load(f)
        by = {}
        for r in rep["results"]:
            by.setdefault(r["score"], {})[r["ood"]] = r
        for score, sets in by.items():
            sel, gen = sets.get("mnist_select"), sets.get("general_mix_val")
            if sel is None or gen is None:
                sys.exit(f"{path}: needs results against mnist_select and general_mix_val")
            recall = (sel.get("calibrated") or {}).get("recall")
            rows.append((name, score, gen["auroc"], sel["auroc"], recall))
    print(f"{'models':32} {'score':16} {'AUROC gen_val':>14} {'AUROC mnist_sel':>16} {'recall@cal':>11}  gate")
    for name, score, g, a, r in sorted(rows, key=lambda x: (x[0], x[1])):
        rs = "-" if r is None else f"{r:.4f}"
        print(f"{name:32} {score:16} {g:14.4f} {a:16.4f} {rs:>11}  {'pass' if g >= GATE else 'fail'}")
    ok = [x for x in rows if x[2] >= GATE and x[4] is not None]
    if not ok:
        sys.exit("no score passes the gate")
    best = max(ok, key=lambda x: (x[4], x[3]))
    print(f"\nchosen: {best[0]} / {best[1]} (recall {best[4]:.4f} on mnist_select, "
          f"AUROC {best[3]:.4f}; AUROC {best[2]:.4f} vs general_mix_val)")


if __name__ == "__main__":
    main()
