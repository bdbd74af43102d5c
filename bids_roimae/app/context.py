"""The run context: every option a step needs, validated once and typed.

The CLI hands its parsed options to :func:`build_context`, which raises usage errors
(exit 64) and missing inputs (exit 66) before any work starts; the steps read fields,
never the raw options.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from bids_roimae.config import DEFAULT_SPACE, LEVEL_MODES, AppConfig, ConfigError, load_config
from bids_roimae.errors import MissingInputError, OutputError, UsageError, one_line
from bids_roimae.host import usable_cores
from bids_roimae.io.bids_names import check_label, check_path_component
from bids_roimae.io.derivatives import output_location_problem
from bids_roimae.io.discovery import BoldRun, discover, load_filter_file, normalise_labels

log = logging.getLogger("bids_roimae")



@dataclass
class RunContext:
    """Everything a step needs, validated."""

    bids_dir: Path
    output_dir: Path
    level: str
    mode: str
    cfg: AppConfig
    work_dir: Path
    # True when work_dir is a temporary folder made for this run (no -w): removed at its end
    work_dir_is_temporary: bool = False
    participant_labels: list[str] = field(default_factory=list)
    session_labels: list[str] = field(default_factory=list)
    task_labels: list[str] = field(default_factory=list)
    derivatives: Optional[Path] = None
    bids_filters: Optional[dict] = None
    database_dir: Optional[Path] = None
    skip_validation: bool = False
    space: str = DEFAULT_SPACE
    atlas: str = "AAL3"
    atlas_desc: Optional[str] = None
    atlas_file: Optional[Path] = None
    atlas_labels: Optional[Path] = None
    device: str = "cpu"
    nprocs: int = 1
    # pretraining
    model_name: Optional[str] = None
    resume: bool = True
    # fine-tuning and prediction
    target: Optional[str] = None
    positive: list[str] = field(default_factory=list)
    cv_group: Optional[str] = None
    pretrained: Optional[Path] = None
    model_path: Optional[Path] = None
    compare_masking: bool = False
    allow_mismatch: bool = False
    fidelity: bool = True
    randomised_check: bool = True
    # group report
    covariates: list[str] = field(default_factory=list)

    def discover(self, participant_labels: Optional[list] = None) -> list[BoldRun]:
        """BOLD runs selected by the labels and filters."""
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
                     "folds": o.get("folds"), "cv_repeats": o.get("cv_repeats"),
                     "readout": o.get("readout"), "baseline": o.get("baseline"),
                     "connectivity": o.get("connectivity")},
        "attribution": {"steps": o.get("ig_steps"),
                        "fidelity_windows": o.get("fidelity_windows"),
                        "fidelity_batch": o.get("fidelity_batch")},
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
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was given but no CUDA device is visible "
                         "(use --device cpu, or run the container with --gpus/--nv)")
    return requested


def set_threads(nthreads: Optional[int], nprocs: int) -> None:
    """Threads of this process and of its preparation workers.

    The ``nprocs`` preparation workers share the cores (spawned, they read
    ``OMP_NUM_THREADS``) while this process waits for them; training and inference run
    here alone, so they get every core, shared only with torchrun's other local ranks.
    """
    cores = usable_cores()  # a SLURM or container CPU set, not the machine's cores
    os.environ["OMP_NUM_THREADS"] = str(nthreads or max(1, cores // max(1, nprocs)))
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    torch.set_num_threads(nthreads or max(1, cores // local_ranks))


def _check_names(o: dict) -> None:
    """User-given names that become file or folder names: one plain component each."""
    try:
        if o.get("model_name") is not None:
            check_path_component("--model-name", o["model_name"])
        if o.get("atlas") is not None and not o.get("atlas_file"):
            check_label("--atlas", o["atlas"])
        if o.get("atlas_desc") is not None:
            check_label("--atlas-desc", o["atlas_desc"])
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _check_output_location(output_dir: Path, bids_dir: Path, derivatives) -> None:
    """OUTPUT_DIR must not overwrite an input or any other dataset (exit 64)."""
    # Where discovery may find fMRIPrep's outputs (it reports a missing one itself).
    inputs = [bids_dir / "derivatives" / "fmriprep"]
    if derivatives is not None:
        inputs += [Path(derivatives), Path(derivatives) / "fmriprep"]
    problem = output_location_problem(output_dir, [bids_dir, *inputs])
    if problem:
        raise UsageError(problem)


def _scratch_folder(work_dir) -> Path:
    """The work folder (``-w``), created; or a new temporary one. Exit 73 when impossible."""
    if work_dir is not None:
        work_dir = Path(work_dir).expanduser().absolute()
        try:
            work_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the work folder -w {work_dir}: "
                              f"{exc.strerror or one_line(exc)}") from exc
        return work_dir
    try:
        return Path(tempfile.mkdtemp(prefix="bids_roimae_work_")).absolute()
    except OSError as exc:  # e.g. a read-only container without a writable /tmp
        raise OutputError(f"cannot create a scratch folder in {tempfile.gettempdir()} "
                          f"({exc.strerror or one_line(exc)}): give a writable one with "
                          f"-w/--work-dir (in a read-only container, mount a tmpfs on "
                          f"/tmp)") from exc


def build_context(o: dict) -> RunContext:
    """Validate the CLI's options and build the run context.

    Parameters
    ----------
    o : dict
        The options as the click command received them (keys are parameter names).

    Raises
    ------
    UsageError
        Options that do not make sense together or are out of range (exit 64).
    MissingInputError
        BIDS_DIR or a given input file does not exist (exit 66).
    """
    setup_logging(int(o.get("verbose") or 0))
    level = o["analysis_level"]
    modes = LEVEL_MODES[level]
    mode = o.get("mode") or modes[0]
    if mode not in modes:
        other = "group" if level == "participant" else "participant"
        raise UsageError(f"--mode {mode} runs at the {other} level, not {level} "
                         f"(participant: {', '.join(LEVEL_MODES['participant'])}; "
                         f"group: {', '.join(LEVEL_MODES['group'])})")
    bids_dir = Path(o["bids_dir"]).expanduser().absolute()
    output_dir = Path(o["output_dir"]).expanduser().absolute()
    if not bids_dir.is_dir():
        raise MissingInputError(f"BIDS_DIR {bids_dir} does not exist or is not a folder")
    if output_dir.resolve() == bids_dir.resolve():
        raise UsageError("OUTPUT_DIR must differ from BIDS_DIR (outputs would be written "
                         "into the input dataset)")
    _check_names(o)
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
    _check_output_location(output_dir, bids_dir, o.get("derivatives"))
    work_dir = _scratch_folder(o.get("work_dir"))
    set_threads(o.get("omp_nthreads"), o.get("nprocs") or 1)
    return RunContext(
        bids_dir=bids_dir, output_dir=output_dir, level=level, mode=mode, cfg=cfg,
        work_dir=work_dir, work_dir_is_temporary=o.get("work_dir") is None,
        participant_labels=normalise_labels(o.get("participant_label") or [], "sub"),
        session_labels=normalise_labels(o.get("session_label") or [], "ses"),
        task_labels=normalise_labels(o.get("task_label") or [], "task"),
        derivatives=o.get("derivatives"), bids_filters=filters,
        database_dir=o.get("bids_database_dir"),
        skip_validation=bool(o.get("skip_bids_validation")),
        space=o.get("space") or DEFAULT_SPACE, atlas=o.get("atlas") or "AAL3",
        atlas_desc=o.get("atlas_desc"), atlas_file=o.get("atlas_file"),
        atlas_labels=o.get("atlas_labels"),
        device=_resolve_device(o.get("device") or "auto"), nprocs=o.get("nprocs") or 1,
        model_name=o.get("model_name"), resume=bool(o.get("resume", True)),
        target=o.get("target"), positive=[str(v) for v in o.get("positive") or ()],
        cv_group=o.get("cv_group"), pretrained=o.get("pretrained"),
        model_path=o.get("model_path"), compare_masking=bool(o.get("compare_masking")),
        allow_mismatch=bool(o.get("allow_mismatch")), fidelity=bool(o.get("fidelity", True)),
        randomised_check=bool(o.get("randomised_check", True)),
        covariates=[str(v) for v in o.get("covariates") or ()],
    )
