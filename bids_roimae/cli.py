"""Command line: ``bids_roimae BIDS_DIR OUTPUT_DIR {participant,group} [options]``.

BIDS-Apps conventions: positional arguments first, options grouped in ``--help`` as
fMRIPrep does, list options that take several space-separated values after one flag
(``--participant_label 01 02``, how Boutiques renders lists), usage errors exit with 64,
an unknown analysis level with 17, and no traceback for a user error.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

import click

from bids_roimae import __version__, interrupt
from bids_roimae.config import (
    LEVEL_MODES,
    AttributionConfig,
    FinetuneConfig,
    GeometryConfig,
    MaskingConfig,
    ModelConfig,
    PrepConfig,
    TrainConfig,
    choices,
    default,
)
from bids_roimae.errors import (
    EXIT_FAILURE,
    EXIT_USAGE,
    AppError,
    Terminated,
    UnknownLevelError,
    one_line,
)

# Options that accept several values after one flag; expanded to repeated flags before
# click parses (click options take one value per occurrence).
MULTI_VALUE = ("--participant-label", "--participant_label", "--session-label",
               "--session_label", "--task-label", "--task_label", "--positive",
               "--covariates")


class GroupedOption(click.Option):
    """An option that knows which ``--help`` section it belongs to."""

    def __init__(self, *args, section: str = "Other options", **kwargs):
        super().__init__(*args, **kwargs)
        self.section = section


POSITIONALS = (
    ("BIDS_DIR", "The root of the input BIDS dataset, with fMRIPrep's outputs in "
                 "BIDS_DIR/derivatives/fmriprep (or --derivatives); or the fMRIPrep "
                 "derivatives folder itself. Read only."),
    ("OUTPUT_DIR", "Where the BIDS derivatives dataset is written (created if needed): token "
                   "cache, models, maps, reports. Not BIDS_DIR, and not inside the fMRIPrep "
                   "derivatives or another pipeline's dataset (BIDS_DIR/derivatives/"
                   "bids_roimae is a good choice)."),
    ("ANALYSIS_LEVEL", "participant (per subject: --mode "
                       + ", ".join(LEVEL_MODES["participant"]) + ") or group (whole "
                       "dataset: --mode " + ", ".join(LEVEL_MODES["group"]) + ")."),
)


class GroupedCommand(click.Command):
    """Prints the positional arguments, then options under section headings, in the order
    sections first appear (as fMRIPrep's ``--help`` does)."""

    def format_options(self, ctx, formatter):
        with formatter.section("Positional arguments"):
            formatter.write_dl(list(POSITIONALS))
        sections: dict[str, list] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None or isinstance(param, click.Argument):
                continue
            name = getattr(param, "section", "Other options")
            sections.setdefault(name, []).append(record)
        for name, records in sections.items():
            with formatter.section(name):
                formatter.write_dl(records)


def _opt(*decls, section, **kwargs):
    return click.option(*decls, cls=GroupedOption, section=section, show_default=True,
                        **kwargs)


def _setting(*decls, setting: tuple, section: str, help: str, **kwargs):
    """An option that overrides a configuration setting: its choices and the default
    shown in ``--help`` come from the config dataclass, so they are written once.

    The option's own default stays ``None`` (not given), so a ``--config`` file value is
    only replaced by what the user typed.
    """
    cls, name = setting
    try:
        kwargs.setdefault("type", click.Choice(list(choices(cls, name))))
    except TypeError:  # not a choice: the caller gave the type
        pass
    return _opt(*decls, default=None, section=section,
                help=f"{help} [default: {default(cls, name)}]", **kwargs)


def expand_multi_values(argv: Sequence[str]) -> list[str]:
    """Turn ``--flag a b`` into ``--flag a --flag b`` for list options.

    Values stop at the next token that starts with ``-`` or looks like a path (labels
    never contain ``/``), so ``--participant_label 01 02 /data`` keeps ``/data``.
    """
    out: list[str] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        tok = argv[i]
        flag, eq, val = tok.partition("=")
        if flag in MULTI_VALUE:
            values = [val] if eq else []
            i += 1
            while not eq and i < len(argv) and not argv[i].startswith("-") \
                    and "/" not in argv[i]:
                values.append(argv[i])
                i += 1
            if not values:
                out.append(flag)  # let click report the missing value
            for v in values:
                out.extend([flag, v])
            continue
        out.append(tok)
        i += 1
    return out


BIDS = "BIDS selection"
ATLAS = "Template and atlas"
PREP = "Preparation"
PRETRAIN = "Pretraining"
FINETUNE = "Fine-tuning and prediction"
ATTR = "Attribution"
RES = "Resources and run control"


@click.command(cls=GroupedCommand, context_settings={"help_option_names": ["-h", "--help"],
                                                      "max_content_width": 100})
@click.argument("bids_dir", type=click.Path(path_type=Path))
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.argument("analysis_level")
@_opt("--mode", type=click.Choice(["prepare", "pretrain", "finetune", "predict", "embed",
                                   "report"]),
      default=None, section="Analysis",
      help="Stage to run. participant: prepare (default), finetune, predict, embed "
           "(frozen-encoder features); group: pretrain (default), report.")
@_opt("--participant-label", "--participant_label", "participant_label", multiple=True,
      section=BIDS, help="Participants to process, with or without 'sub-'; several values "
                         "after one flag. Default: all.")
@_opt("--session-label", "--session_label", "session_label", multiple=True, section=BIDS,
      help="Sessions to process, with or without 'ses-'. Default: all.")
@_opt("--task-label", "--task_label", "task_label", multiple=True, section=BIDS,
      help="BOLD tasks to use, with or without 'task-'. Default: every task.")
@_opt("--derivatives", type=click.Path(path_type=Path), default=None, section=BIDS,
      help="fMRIPrep derivatives folder. Default: BIDS_DIR/derivatives/fmriprep, or "
           "BIDS_DIR itself when it is an fMRIPrep derivatives dataset.")
@_opt("--bids-filter-file", "--bids_filter_file", "bids_filter_file",
      type=click.Path(path_type=Path), default=None, section=BIDS,
      help="JSON file of extra BIDS filters, in fMRIPrep's format ({\"bold\": {...}}).")
@_opt("--bids-database-dir", "--bids_database_dir", "bids_database_dir",
      type=click.Path(path_type=Path), default=None, section=BIDS,
      help="Folder for a persistent pybids index, reused on later runs.")
@_opt("--skip-bids-validation", "--skip_bids_validation", "skip_bids_validation",
      is_flag=True, section=BIDS, help="Do not run the BIDS validator on BIDS_DIR.")
@_opt("--space", default="MNI152NLin2009cAsym", section=ATLAS,
      help="Template space of the fMRIPrep BOLD to use; it defines the model grid (2 mm).")
@_opt("--atlas", default="AAL3", section=ATLAS,
      help="Atlas for ROI-guided masking and region tables: AAL3 (via nilearn) or any "
           "discrete atlas TemplateFlow hosts for --space (e.g. Schaefer2018).")
@_opt("--atlas-desc", default=None, section=ATLAS,
      help="desc- entity of a TemplateFlow atlas (e.g. 400Parcels7Networks).")
@_opt("--atlas-file", type=click.Path(path_type=Path), default=None, section=ATLAS,
      help="Your own label NIfTI in --space (overrides --atlas).")
@_opt("--atlas-labels", type=click.Path(path_type=Path), default=None, section=ATLAS,
      help="TSV (index, name[, system]) for --atlas-file.")
@_setting("--roi-assign", setting=(GeometryConfig, "roi_assign"), section=ATLAS,
          help="How patches become tokens and tokens regions: exact splits a patch "
               "holding several regions into one token per region piece (voxel-exact "
               "regions); majority/any/pure keep one token per patch.")
@_setting("--confounds", setting=(PrepConfig, "confounds"), section=PREP,
          help="Confound regression with fMRIPrep's confounds.")
@_setting("--normalize", setting=(PrepConfig, "normalize"), section=PREP,
          help="Signal scaling: percent signal change with one scale per run, which keeps "
               "regional amplitude differences (global), or a z-score per voxel (voxel).")
@_opt("--target-tr", type=float, default=None, section=PREP,
      help="Resample every run to this repetition time (seconds).")
@_setting("--patch-size", type=click.IntRange(1, 32), setting=(GeometryConfig, "patch_size"),
          section=PREP, help="Spatial patch edge in voxels.")
@_setting("--window", type=click.IntRange(1, 1000), setting=(GeometryConfig, "window"),
          section=PREP, help="Frames per model window.")
@_setting("--temporal-patch", type=click.IntRange(1, 100),
          setting=(GeometryConfig, "temporal_patch"), section=PREP, help="Frames per token.")
@_setting("--masking", setting=(MaskingConfig, "strategy"), section=PRETRAIN,
          help="Masking strategy: atlas regions (roi) or random patches.")
@_setting("--mask-ratio", type=click.FloatRange(0, 1, min_open=True, max_open=True),
          setting=(MaskingConfig, "ratio"), section=PRETRAIN,
          help="Fraction of brain tokens masked.")
@_setting("--model-preset", setting=(ModelConfig, "preset"), section=PRETRAIN,
          help="Model size.")
@_setting("--steps", type=click.IntRange(1), setting=(TrainConfig, "steps"),
          section=PRETRAIN, help="Optimisation steps.")
@_opt("--epochs", type=click.FloatRange(0, min_open=True), default=None, section=PRETRAIN,
      help="Train for this many passes over the windows instead of --steps.")
@_setting("--batch-size", type=click.IntRange(1), setting=(TrainConfig, "batch_size"),
          section=PRETRAIN, help="Windows per step (per GPU under torchrun).")
@_opt("--lr", type=click.FloatRange(0, min_open=True), default=None, section=PRETRAIN,
      help="Peak learning rate (default by preset: tiny 1e-3, small and base 1.5e-4).")
@_opt("--resume/--no-resume", default=True, section=PRETRAIN,
      help="Continue from a checkpoint of the same configuration when one exists.")
@_opt("--compile", "compile_model", is_flag=True, section=PRETRAIN,
      help="Use torch.compile.")
@_opt("--model-name", default=None, section=PRETRAIN,
      help="Folder name under OUTPUT_DIR/models. Default: derived from the settings.")
@_opt("--target", default=None, section=FINETUNE,
      help="participants.tsv column to predict (matched ignoring case and spaces).")
@_opt("--positive", multiple=True, section=FINETUNE,
      help="Values of --target that form the positive class (e.g. 1 2 3 for ADHD-200 dx).")
@_setting("--task-type", setting=(FinetuneConfig, "task_type"), section=FINETUNE,
          help="Kind of target.")
@_setting("--finetune", "finetune_strategy", setting=(FinetuneConfig, "strategy"),
          section=FINETUNE,
          help="Frozen encoder + logistic regression, frozen encoder + torch head, or full "
               "fine-tuning.")
@_setting("--folds", type=click.IntRange(2), setting=(FinetuneConfig, "folds"),
          section=FINETUNE, help="Cross-validation folds (subject level).")
@_setting("--readout", setting=(FinetuneConfig, "readout"), section=FINETUNE,
          help="Encoder features: mean of all tokens, tokens pooled per atlas region "
               "(voxel-weighted), that plus the regions' across-time correlation, or the "
               "across-time SD of the region-pooled tokens before the final norm.")
@_setting("--baseline", setting=(FinetuneConfig, "baseline"), section=FINETUNE,
          help="Classical arm cross-validated on the same folds, logistic regression on "
               "voxel-exact region means: their connectome plus each region's SD, or the "
               "region SDs alone (the stronger model when groups differ in fluctuation).")
@_setting("--connectivity", setting=(FinetuneConfig, "connectivity"), section=FINETUNE,
          help="Connectivity measure of the connectome baseline.")
@_setting("--cv-repeats", type=click.IntRange(1), setting=(FinetuneConfig, "cv_repeats"),
          section=FINETUNE,
          help="Repeats of the stratified subject folds, each with another shuffle; "
               "metrics and comparisons pool all repeats x folds.")
@_opt("--cv-group", default=None, section=FINETUNE,
      help="participants.tsv column for leave-group-out CV (e.g. site).")
@_opt("--pretrained", type=click.Path(path_type=Path), default=None, section=FINETUNE,
      help="Pretrained checkpoint. Default: the one in OUTPUT_DIR/models.")
@_opt("--model", "model_path", type=click.Path(path_type=Path), default=None,
      section=FINETUNE, help="Fine-tuned model for predict (e.g. trained on another dataset).")
@_opt("--compare-masking", is_flag=True, section=FINETUNE,
      help="Fine-tune every pretrained model in OUTPUT_DIR/models on the same folds and "
           "compare them (roi vs random masking; several seeds per masking are pooled).")
@_opt("--allow-mismatch", is_flag=True, section=FINETUNE,
      help="With --compare-masking: compare pretrained models that differ in more than "
           "masking and seed (the comparison then lists what differs).")
@_opt("--covariates", multiple=True, section=ATTR,
      help="Group report: adjust region-wise group differences for these participants.tsv "
           "columns (e.g. site age sex) and 'meanfd' (mean framewise displacement from "
           "fMRIPrep's confounds), with a linear model per region. Several values after "
           "one flag. Default: plain Welch t-tests.")
@_setting("--ig-steps", type=click.IntRange(2), setting=(AttributionConfig, "steps"),
          section=ATTR,
          help="Most Integrated Gradients steps (fewer are used while the completeness "
               "check passes).")
@_opt("--fidelity/--no-fidelity", default=True, section=ATTR,
      help="Region reconstruction fidelity maps in predict.")
@_opt("--randomised-check/--no-randomised-check", default=True, section=ATTR,
      help="Also attribute with a randomised classifier head (model randomisation check): "
           "the group report marks differences that the trained model alone shows. "
           "Doubles the Integrated Gradients time.")
@_setting("--fidelity-windows", type=click.IntRange(1),
          setting=(AttributionConfig, "fidelity_windows"), section=ATTR,
          help="Windows per run for region fidelity (one region hidden per window and "
               "region: fewer is faster on a CPU, more is less noisy).")
@_setting("--fidelity-batch", type=click.IntRange(0),
          setting=(AttributionConfig, "fidelity_batch"), section=ATTR,
          help="(window, region) pairs per forward pass of region fidelity; 0 sizes it "
               "from free memory.")
@_opt("-w", "--work-dir", type=click.Path(path_type=Path), default=None, section=RES,
      help="Scratch folder. Default: a temporary folder.")
@_opt("--nprocs", type=click.IntRange(1), default=1, section=RES,
      help="Processes for preparing runs in parallel.")
@_opt("--omp-nthreads", type=click.IntRange(1), default=None, section=RES,
      help="Threads per process (torch, BLAS). Default: all cores for training and "
           "inference (divided among torchrun's local ranks), all cores / nprocs for each "
           "preparation worker.")
@_opt("--seed", type=int, default=None, section=RES, help="Random seed. [default: 0]")
@_opt("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", section=RES,
      help="Where to run the model.")
@_opt("--config", "config_file", type=click.Path(path_type=Path), default=None,
      section=RES, help="TOML file of model/training settings (sections geometry, prep, "
                        "masking, model, train, finetune).")
@_opt("-v", "--verbose", count=True, section=RES, help="More log output (-vv for debug).")
@click.version_option(__version__, "--version", prog_name="bids_roimae",
                      message="%(prog)s %(version)s")
def cli(**options):
    """Region-aware masked-autoencoder fMRI foundation model, as a BIDS-App.

    BIDS_DIR is the raw BIDS dataset (with derivatives/fmriprep) or an fMRIPrep
    derivatives folder; OUTPUT_DIR receives a BIDS derivatives dataset;
    ANALYSIS_LEVEL is participant or group.
    """
    # The app (torch, nilearn, pybids) loads only when a command runs, so --help, --version
    # and usage errors answer at once.
    from bids_roimae.app.context import build_context
    from bids_roimae.app.dispatch import run

    ctx = build_context(options)
    try:
        return run(ctx)
    finally:
        if ctx.work_dir_is_temporary:  # nothing in it is reused: the cache is in OUTPUT_DIR
            shutil.rmtree(ctx.work_dir, ignore_errors=True)


def _check_level(argv: list[str]) -> None:
    """Exit 17 for an unknown analysis level before anything else happens."""
    level = analysis_level_argument(argv)
    if level is not None and level not in LEVEL_MODES:
        raise UnknownLevelError(
            f"unknown analysis level {level!r}: choose participant or group")


def analysis_level_argument(argv: list[str]) -> Optional[str]:
    """The third positional argument (ANALYSIS_LEVEL), skipping option values."""
    takes_value = set()
    for param in cli.params:
        if isinstance(param, click.Option) and not param.is_flag and not param.count:
            takes_value.update(param.opts)
    positionals = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            positionals.extend(argv[i + 1:])
            break
        if tok.startswith("-"):
            if "=" not in tok and tok in takes_value:
                i += 1
        else:
            positionals.append(tok)
        i += 1
    return positionals[2] if len(positionals) >= 3 else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console-script entry point; returns the BIDS-Apps exit code (the script exits with it)."""
    interrupt.install()
    argv = expand_multi_values(sys.argv[1:] if argv is None else argv)
    log = logging.getLogger("bids_roimae")
    try:
        _check_level(argv)
        code = cli.main(args=argv, prog_name="bids_roimae", standalone_mode=False)
    except click.exceptions.Exit as exc:  # --help / --version
        code = exc.exit_code
    except click.exceptions.Abort:
        click.echo("bids_roimae: interrupted", err=True)
        code = EXIT_FAILURE
    except click.UsageError as exc:
        click.echo(f"bids_roimae: error: {exc.format_message()}", err=True)
        click.echo("Try 'bids_roimae --help' for the options.", err=True)
        code = EXIT_USAGE
    except click.ClickException as exc:
        click.echo(f"bids_roimae: error: {exc.format_message()}", err=True)
        code = EXIT_USAGE
    except AppError as exc:
        click.echo(f"bids_roimae: error: {one_line(exc)}", err=True)
        code = exc.exit_code
    except Terminated as exc:
        click.echo(f"bids_roimae: {one_line(exc)}", err=True)
        code = exc.exit_code
    except KeyboardInterrupt:
        click.echo("bids_roimae: interrupted", err=True)
        code = EXIT_FAILURE
    except Exception:  # a bug, not a user error: keep the traceback for the report
        log.exception("bids_roimae failed unexpectedly; please report this with the log")
        code = EXIT_FAILURE
    return 0 if code is None else int(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
