"""Draw the MAE-vs-scratch comparison from bench/learning_curve.py's JSON records into one PNG.

    python bench/plot_learning_curves.py    # -> bench/results/mae_vs_scratch.png

Left: MAE reconstruction loss against step for each pretraining run. Right: val COCO AP against
fine-tuning step at equal schedules, one line per (initialisation, seed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

PRETRAIN_RUNS = {"MAE 2000 steps": "pretrain_long", "MAE 6000 steps": "pretrain_6k"}
FINETUNE_RUNS = {  # label -> record names (one per seed)
    "scratch": ["finetune_scratch_equal_steps", "finetune_scratch_equal_steps_seed1"],
    "MAE 2000-step init": ["finetune_mae_equal_steps", "finetune_mae_equal_steps_seed1"],
    "MAE 6000-step init": ["finetune_mae6k_equal_steps", "finetune_mae6k_equal_steps_seed1"],
}
COLOURS = {"scratch": "tab:gray", "MAE 2000-step init": "tab:blue", "MAE 6000-step init": "tab:red",
           "MAE 2000 steps": "tab:blue", "MAE 6000 steps": "tab:red"}


def load(name: str) -> dict | None:
    path = RESULTS / f"learning_curve_{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(RESULTS / "mae_vs_scratch.png"))
    args = parser.parse_args()
    figure, (loss_axes, ap_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, name in PRETRAIN_RUNS.items():
        if (record := load(name)) is not None:
            points = record["points"]
            loss_axes.plot([p["step"] for p in points], [p["loss"] for p in points], label=label,
                           color=COLOURS[label], linewidth=1)
    loss_axes.set(xlabel="MAE step (batch 64)", ylabel="masked-patch loss (norm-pix MSE)",
                  title="MAE pretraining on the synthetic train crops")
    loss_axes.legend()
    for label, names in FINETUNE_RUNS.items():
        for seed, name in enumerate(names):
            if (record := load(name)) is None:
                continue
            evals = record["evals"]
            ap_axes.plot([e["step"] for e in evals], [e["AP"] for e in evals], marker="o",
                         linestyle="-" if seed == 0 else "--", color=COLOURS[label],
                         label=f"{label} (seed {record['args']['seed']})")
    ap_axes.set(xlabel="fine-tuning step (batch 64, same schedule)", ylabel="val COCO AP (flip test)",
                title="vitpose-tiny 128x96: MAE init vs scratch")
    ap_axes.grid(alpha=0.3)
    ap_axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
