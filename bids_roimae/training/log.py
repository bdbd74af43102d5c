"""What pretraining records as it goes: the ``log.tsv`` table and the ``loss.png`` plot.

``log.tsv`` has one row per logged step (:data:`LOG_COLUMNS`, ``n/a`` for missing values)
and is rewritten atomically after every row; on resume, rows past the checkpoint's step
are dropped so the table matches the resumed run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from bids_roimae.io import atomic

#: ``val_skill_zero`` / ``val_skill_visible``: 1 - validation MSE / MSE of predicting zero
#: / the mean of the visible tokens of the same region (see ``training.recon_skill``).
LOG_COLUMNS = ("step", "loss", "val_loss", "lr", "tokens_per_s", "samples_per_s",
               "val_skill_zero", "val_skill_visible")


class TrainLog:
    """``log.tsv`` rows, rewritten on resume to drop steps past the checkpoint."""

    def __init__(self, path: Path, keep_until: Optional[int], enabled: bool):
        self.path, self.enabled, self.rows = path, enabled, []
        if enabled and keep_until is not None and path.is_file():
            for line in path.read_text().splitlines()[1:]:
                fields = line.split("\t")
                if fields and fields[0].isdigit() and int(fields[0]) <= keep_until:
                    # rows of a log written before a column existed: n/a in it
                    fields += ["n/a"] * (len(LOG_COLUMNS) - len(fields))
                    self.rows.append(fields[:len(LOG_COLUMNS)])
        self._flush()

    def add(self, **values) -> None:
        def fmt(v):
            if v is None or (isinstance(v, float) and not math.isfinite(v)):
                return "n/a"
            return f"{v:.6g}" if isinstance(v, float) else str(v)

        self.rows.append([fmt(values.get(c)) for c in LOG_COLUMNS])
        self._flush()

    def _flush(self) -> None:
        if self.enabled:
            text = "\t".join(LOG_COLUMNS) + "\n" + "".join("\t".join(r) + "\n" for r in self.rows)
            atomic.write_text(self.path, text, fsync=False, mkdir=False)

    def series(self, column: str) -> tuple[list, list]:
        i = LOG_COLUMNS.index(column)
        pts = [(int(r[0]), float(r[i])) for r in self.rows if r[i] != "n/a"]
        return [p[0] for p in pts], [p[1] for p in pts]


def plot_loss(log_rows: TrainLog, path: Path) -> None:
    """Train and validation loss against the step, saved as an image at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    for column, label in (("loss", "train"), ("val_loss", "validation")):
        steps, values = log_rows.series(column)
        if steps:
            ax.plot(steps, values, marker=".", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("masked reconstruction MSE")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
