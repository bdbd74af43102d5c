"""One function per (analysis level, mode), and the context they share.

The CLI turns options into a :class:`RunContext` (validating them), then :func:`run`
dispatches. Each workflow returns the process exit code: 0, or the code of the first
problem when some runs were skipped (the others still finish).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from bids_roimae.config import AppConfig, ConfigError, load_config
from bids_roimae.errors import (EXIT_OK, AppError, MissingInputError, UsageError, ValidationFailed)

log = logging.getLogger("bids_roimae")

MODES = {
    "participant": ("prepare", "finetune", "predict"),
    "group": ("pretrain", "report"),
}
DEFAULT_MODE = {"participant": "prepare", "group": "pretrain"}


@dataclass
class RunContext:
    """Everything a workflow needs, validated."""

    bids_dir: Path
    output_dir: Path
    level: str
    mode: str
    cfg: AppConfig
    work_dir: Path
    participant_labels: list = field(default_factory=list)
    session_labels: list = field(default_factory=list)
    task_labels: list = field(default_factory=list)
    derivatives: Optional[Path] = None
    bids_filters: Optional[dict] = None
    database_dir: Optional[Path] = None
    skip_validation: bool = False
    space: str = "MNI152NLin2009cAsym"
    atlas: str = "AAL3"
    atlas_desc: Optional[str] = None
    atlas_file: Optional[Path] = None
    atlas_labels: Optional[Path] = None
    device: str = "cpu"
    nprocs: int = 1
    options: dict = field(default_factory=dict)

    def discover(self, participant_labels: Optional[list] = None):
        """BOLD runs selected by the labels and filters."""
        from bids_roimae.io.discovery import discover

        return discover(
            self.bids_dir, derivatives=self.derivatives,
            participant_labels=participant_labels if participant_labels is not None
            else self.participant_labels,
            session_labels=self.session_labels, task_labels=self.task_labels,
            space=self.space, bids_filters=self.bids_filters,
            database_dir=self.database_dir)


def _cli_overrides(o: dict) -> dict[str, Any]:
    """CLI options that are configuration settings, as a nested override mapping."""
    return {
        "geometry": {"patch_size": o.get("patch_size"), "window": o.get("window"),
                     "temporal_patch": o.get("temporal_patch"),
                     "roi_assign": o.get("roi_assign")},
        "prep": {"confounds": o.get("confounds"), "target_tr": o.get("target_tr"),
                 "normalize": o.get("normalize")},
        "masking": {"strategy": o.get("masking"), "ratio": o.get("mask_ratio")},
        "model": {"preset": o.get("model_preset")},
        "train": {"steps": o.get("steps"), "epochs": o.get("epochs"),
                  "batch_size": o.get("batch_size"), "lr": o.get("lr"),
                  "compile": True if o.get("compile_model") else None},
        "finetune": {"strategy": o.get("finetune_strategy"), "task_type": o.get("task_type"),
                     "folds": o.get("folds")},
        "attribution": {"steps": o.get("ig_steps"),
                        "fidelity_windows": o.get("fidelity_windows")},
        "seed": o.get("seed"),
    }


def setup_logging(verbose: int) -> None:
    """Log to stderr: progress (INFO) by default, DEBUG from ``-vv``."""
    level = logging.DEBUG if verbose >= 2 else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                           "%H:%M:%S"))
    root = logging.getLogger("bids_roimae")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was given but no CUDA device is visible "
                         "(use --device cpu, or run the container with --gpus/--nv)")
    return requested


def _set_threads(nthreads: Optional[int], nprocs: int) -> None:
    import torch

    n = nthreads or max(1, (os.cpu_count() or 1) // max(1, nprocs))
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    torch.set_num_threads(n)


def build_context(o: dict) -> RunContext:
    """Validate CLI options (usage errors exit 64, missing inputs 66)."""
    from bids_roimae.io.discovery import load_filter_file, normalise_labels

    setup_logging(int(o.get("verbose") or 0))
    level = o["analysis_level"]
    mode = o.get("mode") or DEFAULT_MODE[level]
    if mode not in MODES[level]:
        raise UsageError(f"--mode {mode} runs at the "
                         f"{'group' if level == 'participant' else 'participant'} level, "
                         f"not {level} (participant: {', '.join(MODES['participant'])}; "
                         f"group: {', '.join(MODES['group'])})")
    bids_dir = Path(o["bids_dir"]).expanduser().absolute()
    output_dir = Path(o["output_dir"]).expanduser().absolute()
    if not bids_dir.is_dir():
        raise MissingInputError(f"BIDS_DIR {bids_dir} does not exist or is not a folder")
    if output_dir.resolve() == bids_dir.resolve():
        raise UsageError("OUTPUT_DIR must differ from BIDS_DIR (outputs would be written "
                         "into the input dataset)")
    try:
        cfg = load_config(o.get("config_file"), _cli_overrides(o))
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc
    filters = load_filter_file(o["bids_filter_file"]) if o.get("bids_filter_file") else None
    if o.get("atlas_labels") and not o.get("atlas_file"):
        raise UsageError("--atlas-labels needs --atlas-file")
    for name in ("derivatives", "atlas_file", "atlas_labels", "pretrained", "model_path"):
        if o.get(name) is not None and not Path(o[name]).exists():
            raise MissingInputError(f"--{name.replace('_path', '').replace('_', '-')} "
                                    f"{o[name]} does not exist")
    if mode == "finetune" and not o.get("target"):
        raise UsageError("--mode finetune needs --target COLUMN (a participants.tsv column)")
    work_dir = o.get("work_dir")
    if work_dir is None:
        work_dir = Path(tempfile.mkdtemp(prefix="bids_roimae_work_"))
    work_dir = Path(work_dir).absolute()
    _set_threads(o.get("omp_nthreads"), o.get("nprocs") or 1)
    return RunContext(
        bids_dir=bids_dir, output_dir=output_dir, level=level, mode=mode, cfg=cfg,
        work_dir=work_dir,
        participant_labels=normalise_labels(o.get("participant_label") or [], "sub"),
        session_labels=normalise_labels(o.get("session_label") or [], "ses"),
        task_labels=normalise_labels(o.get("task_label") or [], "task"),
        derivatives=o.get("derivatives"), bids_filters=filters,
        database_dir=o.get("bids_database_dir"),
        skip_validation=bool(o.get("skip_bids_validation")), space=o.get("space"),
        atlas=o.get("atlas"), atlas_desc=o.get("atlas_desc"),
        atlas_file=o.get("atlas_file"), atlas_labels=o.get("atlas_labels"),
        device=_resolve_device(o.get("device") or "auto"), nprocs=o.get("nprocs") or 1,
        options=o,
    )


def validate_bids(ctx: RunContext) -> None:
    """Run the BIDS validator on a raw BIDS_DIR (not on a derivatives-only input)."""
    if ctx.skip_validation:
        return
    from bids_roimae.io.discovery import find_derivatives

    if find_derivatives(ctx.bids_dir, ctx.derivatives).resolve() == ctx.bids_dir.resolve():
        log.info("BIDS_DIR is the fMRIPrep derivatives folder: raw BIDS validation does "
                 "not apply")
        return
    exe = shutil.which("bids-validator-deno") or str(
        Path(sys.executable).with_name("bids-validator-deno"))
    if not Path(exe).exists() and shutil.which(exe) is None:
        log.warning("bids-validator-deno is not installed: BIDS validation skipped "
                    "(pip install bids-validator-deno, or pass --skip-bids-validation)")
        return
    cmd = [exe, str(ctx.bids_dir), "--ignoreWarnings", "--ignoreNiftiHeaders"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        log.error("BIDS validation of %s failed:\n%s", ctx.bids_dir, tail)
        raise ValidationFailed(f"{ctx.bids_dir} is not a valid BIDS dataset (details "
                               "above); fix it or pass --skip-bids-validation")


def run(ctx: RunContext) -> int:
    """Dispatch to the workflow of ``(ctx.level, ctx.mode)``."""
    from bids_roimae.app import steps

    table = {
        ("participant", "prepare"): steps.run_prepare,
        ("group", "pretrain"): steps.run_pretrain,
        ("participant", "finetune"): steps.run_finetune,
        ("participant", "predict"): steps.run_predict,
        ("group", "report"): steps.run_report,
    }
    log.info("bids_roimae %s level, mode %s: %s -> %s", ctx.level, ctx.mode, ctx.bids_dir,
             ctx.output_dir)
    validate_bids(ctx)
    code = table[(ctx.level, ctx.mode)](ctx)
    return EXIT_OK if code is None else code


def exit_code_for(failures: list) -> int:
    """The exit code when some runs failed: that of the first failure (0 if none)."""
    for _, err in failures:
        if isinstance(err, AppError):
            return err.exit_code
    return 1 if failures else EXIT_OK
