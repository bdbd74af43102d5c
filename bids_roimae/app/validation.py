"""BIDS validation of the input dataset before any step runs."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

from bids_roimae.app.context import RunContext
from bids_roimae.errors import ValidationFailed
from bids_roimae.io.discovery import find_derivatives

log = logging.getLogger("bids_roimae")


def validate_bids(ctx: RunContext) -> None:
    """Run the BIDS validator on a raw BIDS_DIR (not on a derivatives-only input).

    Raises
    ------
    ValidationFailed
        The validator reported errors (exit 16).
    """
    if ctx.skip_validation:
        return
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
