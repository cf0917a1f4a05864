"""Convergence study from recorded per-round histories (no inference).

    python -m launch.sweep --records=WORKDIR[,WORKDIR2,...] --out=DIR \
        [--thresholds=0.80:0.99:0.01,0.995] [--t=0.99]

--records takes evaluation workdirs, folders holding cases.json (searched
recursively) or cases.json / cases.csv files; records of several methods
(e.g. RSTN and the stage-wise baseline) are told apart by their `method`
field. Writes DIR/sweep.csv and DIR/{sweep,round_dsc,inter_dsc}.png, plus
DIR/comparison_<a>_vs_<b>.png when two methods share cases, and prints the
table. Thresholds above 1 mean "never stop" (the last round).
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from . import app
from stnjax.eval import summaries
from stnjax.eval import plots, report
from stnjax.eval.records import read_records
from stnjax.checks import InputError

_RECORDS = flags.DEFINE_list(
    "records", None, "Evaluation workdirs, folders or cases.json/.csv files.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output folder for sweep.csv and the PNGs.",
                           required=True)
_THRESHOLDS = flags.DEFINE_string(
    "thresholds", "0.80:0.99:0.01,0.995,0.999",
    "Comma-separated thresholds t and start:stop:step ranges (stop included).")
_T = flags.DEFINE_float("t", summaries.MAIN_THRESHOLD,
                        "Threshold of the per-case method comparison plot.")


def main(argv: list[str]) -> None:
    app.no_arguments(argv)
    try:
        records = read_records(*_RECORDS.value)
        rows = summaries.sweep(records, summaries.parse_thresholds(_THRESHOLDS.value))
        out = Path(_OUT.value)
        csv_path = summaries.write_sweep_csv(rows, out / summaries.SWEEP_CSV)
        pngs = plots.write_plots(records, rows, out, _T.value)
    except (InputError, OSError) as e:
        raise SystemExit(f"launch.sweep: {e}") from None
    methods = sorted({r.method for r in records})
    print(f"{len(records)} records, methods {', '.join(methods)}")
    print(report.format_sweep(rows))
    for p in [csv_path, *pngs]:
        print(f"wrote {p}")


def run() -> None:
    """The `stnjax-sweep` console command (same as `python -m launch.sweep`)."""
    app.run(main)


if __name__ == "__main__":
    run()
