"""The MoE scaling table and plot of the spiking language model, from finished runs.

Collects the runs of the study (each folder holds a finished run's ``result.json``): the
dense spiking LM as the E = 1 point, the sweep's MoE runs (``<sweep>/E<E>_k<k>/seed<s>``) and,
for reference, the ANN twins; prints one Markdown table (mean ± std over seeds) and writes the
plot of validation bits per byte and energy per token against the number of experts.

    # the runs (2-core CPU: about 5 minutes each)
    spiking-moe-train --config experiments/configs/lm_dense_snn.toml --seeds 0,1 --out runs/lm/dense
    spiking-moe-sweep --config experiments/configs/lm_moe.toml --experts 4,8,16 --k 1 --seeds 0,1 --out runs/lm/sweep
    spiking-moe-train --config experiments/configs/lm_ann.toml --seeds 0,1 --out runs/lm/ann
    spiking-moe-train --config experiments/configs/lm_ann.toml --seeds 0,1 --out runs/lm/ann_moe16 --set model.moe.num_experts=16
    # the table and plot
    python experiments/lm_scaling.py --dense runs/lm/dense/seed[0-9]* --sweep runs/lm/sweep \\
        --ann runs/lm/ann/seed[0-9]* --ann-moe runs/lm/ann_moe16/seed[0-9]* --plot lm_scaling.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from spiking_moe.config import ModelConfig
from spiking_moe.experiment import finished_result, summarize, summary_table
from spiking_moe.plotting import plot_sweep


def _summary(folders: list[Path], label: str, **keys) -> dict:
    results = [finished_result(f) for f in folders]
    missing = [str(f) for f, r in zip(folders, results, strict=True) if r is None]
    if missing:
        sys.exit(f"no finished run (result.json) in {missing}")
    return {"label": label, **keys, **summarize(results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", nargs="+", type=Path, required=True, help="dense SNN runs")
    parser.add_argument("--sweep", type=Path, required=True, help="sweep folder (E<E>_k<k>/seed*)")
    parser.add_argument("--ann", nargs="*", type=Path, default=[], help="dense ANN runs")
    parser.add_argument("--ann-moe", nargs="*", type=Path, default=[], help="routed ANN runs")
    parser.add_argument("--plot", type=Path, help="PNG to write")
    parser.add_argument("--profile", default="cmos45")
    args = parser.parse_args()

    rows = [_summary(args.dense, "dense SNN", num_experts=1, k=1, model="dense SNN")]
    for folder in sorted(args.sweep.glob("E*_k*"), key=lambda p: int(p.name[1:].split("_")[0])):
        num_experts, k = (int(part[1:]) for part in folder.name.split("_"))
        seeds = sorted(p for p in folder.glob("seed*") if p.is_dir()) or [folder]
        rows.append(
            _summary(seeds, f"E={num_experts}", num_experts=num_experts, k=k, model="spiking MoE")
        )
    snn_rows = list(rows)
    if args.ann:
        rows.append(_summary(args.ann, "ANN", num_experts=1, k=1, model="ANN (dense FFN)"))
    if args.ann_moe:
        # Read through the config class: runs of any version (flat or nested keys) read alike.
        moe = ModelConfig.from_dict(
            json.loads((args.ann_moe[0] / "config.json").read_text())["model"]
        ).moe
        rows.append(
            _summary(
                args.ann_moe,
                "ANN MoE",
                num_experts=moe.num_experts,
                k=moe.k,
                model="ANN (routed)",
            )
        )
    print(summary_table(rows, leading=(("model", "model"), ("num_experts", "E"))))
    if args.plot:
        plot_sweep(snn_rows, args.plot, profile=args.profile)


if __name__ == "__main__":
    main()
