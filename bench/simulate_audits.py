"""Sampled audits simulated over a network of 10^2 to 10^4 nodes, for a range of audit rates.

The simulation (``tests/verify/audit_sim.py``: discrete events, colluding validators, honest
hardware noise from the calibration table) runs once per rate with convicted nodes removed and
once with them kept (the repeated game ``proofmesh posp`` solves). Reports time to catch each
cheater, false convictions, audit overhead, and each cheated answer's net gain beside the closed
form ``C - p q (R + S)``; prints a table, writes ``bench/results/audits.json`` and a plot
``bench/results/audits.png``.

    python -m bench.simulate_audits [--nodes 1000] [--rates 0.005,0.01,0.02,0.05,0.1,0.2] [--hours 48]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.report import RESULTS
from tests.verify.audit_sim import SimConfig, simulate

def _plot(rows: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [r["config"]["audit_rate"] for r in rows["removal"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(rates, [r["mean_hours_to_catch"] or float("nan") for r in rows["removal"]], "o-")
    ax1.set(xscale="log", yscale="log", xlabel="audit rate p", ylabel="mean hours to catch a cheater",
            title="time to catch (cheaters leave when caught)")
    ax2.plot(rates, [r["gain_per_cheated_answer"] for r in rows["repeated"]], "o", label="simulated")
    ax2.plot(rates, [r["closed_form_gain"] for r in rows["repeated"]], "-", label="C - p q (R + S)")
    ax2.axhline(0, color="grey", lw=0.8)
    p_min = rows["repeated"][0]["closed_form_min_audit_rate"]
    if p_min:
        ax2.axvline(p_min, color="red", ls="--", lw=0.8, label=f"posp rate {p_min:.3g}")
    ax2.set(xscale="log", xlabel="audit rate p", ylabel="net gain per cheated answer", title="does cheating pay?")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--cheater-share", type=float, default=0.05)
    ap.add_argument("--cheat-rate", type=float, default=1.0)
    ap.add_argument("--validators", type=int, default=1)
    ap.add_argument("--hours", type=float, default=48.0)
    ap.add_argument("--rates", default="0.005,0.01,0.02,0.05,0.1,0.2")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    base = dict(nodes=args.nodes, cheater_share=args.cheater_share, cheat_rate=args.cheat_rate,
                validators=args.validators, hours=args.hours, seed=args.seed)
    rates = [float(r) for r in args.rates.split(",")]
    rows = {mode: [simulate(SimConfig(**base, audit_rate=p, keep_convicted=mode == "repeated")) for p in rates]
            for mode in ("removal", "repeated")}
    print(f"{args.nodes} nodes, {args.cheater_share:.0%} cheating on {args.cheat_rate:.0%} of answers, "
          f"{args.validators} validator(s) per audit, {args.hours:g} h")
    print(f"{'p':>7}{'caught':>9}{'mean h':>9}{'false conv':>11}{'overhead':>10}{'gain sim':>10}{'gain closed':>12}")
    for removal, repeated in zip(rows["removal"], rows["repeated"]):
        mean_h = removal["mean_hours_to_catch"]
        print(f"{removal['config']['audit_rate']:>7.3f}{removal['cheaters_caught']:>5}/{removal['cheaters']:<3}"
              f"{mean_h if mean_h is not None else float('nan'):>9.2f}{removal['false_convictions']:>11}"
              f"{removal['audit_overhead']:>10.2%}{repeated['gain_per_cheated_answer'] or float('nan'):>10.3f}"
              f"{repeated['closed_form_gain']:>12.3f}")
    print(f"posp least audit rate: {rows['repeated'][0]['closed_form_min_audit_rate']}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "audits.json").write_text(json.dumps(rows, indent=1))
    _plot(rows, RESULTS / "audits.png")
    print(f"wrote {RESULTS / 'audits.json'} and {RESULTS / 'audits.png'}")


if __name__ == "__main__":
    main()
