"""Time BIDS discovery over a large fMRIPrep-like tree.

Generates N subjects x 1 run (empty placeholder NIfTI files, real JSON sidecars, a brain
mask, confounds and a T1w-space copy, as fMRIPrep writes them), then times ``discover``
with a fresh pybids index folder and again with the saved index reused.

Targets (2-core CI machine): first < 30 s, reused < 3 s for 1,000 subjects.

Usage: python benchmarks/bench_discovery.py [--subjects 1000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from bids_roimae.io.discovery import discover

SPACE = "MNI152NLin2009cAsym"


def make_tree(root: Path, n_subjects: int) -> Path:
    """Raw root + derivatives/fmriprep with ``n_subjects`` single-run subjects."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "bench",
                                                               "BIDSVersion": "1.10.0"}))
    (root / "task-rest_bold.json").write_text(json.dumps({"RepetitionTime": 2.0}))
    deriv = root / "derivatives" / "fmriprep"
    deriv.mkdir(parents=True)
    (deriv / "dataset_description.json").write_text(json.dumps(
        {"Name": "fMRIPrep", "BIDSVersion": "1.4.0", "DatasetType": "derivative",
         "GeneratedBy": [{"Name": "fMRIPrep", "Version": "23.2.0"}]}))
    for i in range(1, n_subjects + 1):
        sub = f"sub-{i:04d}"
        func = deriv / sub / "func"
        anat = deriv / sub / "anat"
        func.mkdir(parents=True)
        anat.mkdir()
        prefix = f"{sub}_task-rest_run-1"
        for space_part in (f"_space-{SPACE}_res-2", "_space-T1w"):
            (func / f"{prefix}{space_part}_desc-preproc_bold.nii.gz").touch()
            (func / f"{prefix}{space_part}_desc-preproc_bold.json").write_text(
                '{"RepetitionTime": 2.0}')
            (func / f"{prefix}{space_part}_desc-brain_mask.nii.gz").touch()
            (func / f"{prefix}{space_part}_boldref.nii.gz").touch()
        (func / f"{prefix}_desc-confounds_timeseries.tsv").touch()
        (func / f"{prefix}_desc-confounds_timeseries.json").touch()
        (anat / f"{sub}_desc-preproc_T1w.nii.gz").touch()
        (anat / f"{sub}_desc-brain_mask.nii.gz").touch()
        (deriv / f"{sub}.html").touch()
    return root


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=1000)
    parser.add_argument("--keep", type=Path, help="build the tree here and keep it")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "bench_discovery.json")
    args = parser.parse_args(argv)

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_discovery_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        bids_dir = make_tree(work / "bids", args.subjects)
        generate_s = time.perf_counter() - t0
        database = work / "pybids_db"
        rows = []
        for label in ("first (fresh index)", "reused index", "no index folder"):
            t0, c0 = time.perf_counter(), time.process_time()
            runs = discover(bids_dir, database_dir=None if label == "no index folder" else database)
            rows.append((label, time.perf_counter() - t0, time.process_time() - c0, len(runs)))
            assert len(runs) == args.subjects and all(r.tr == 2.0 for r in runs)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"discovery over {args.subjects} subjects x 1 run (tree written in {generate_s:.1f} s)")
    print(f"{'case':<22}{'wall s':>9}{'CPU s':>9}{'runs':>7}{'target':>9}")
    targets = {"first (fresh index)": 30.0, "reused index": 3.0}
    for label, seconds, cpu, n in rows:
        target = targets.get(label)
        print(f"{label:<22}{seconds:>9.2f}{cpu:>9.2f}{n:>7}"
              f"{(f'< {target:g}' if target else '-'):>9}")
    # wall time on a shared 2-core machine depends on the load; CPU time does not
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"load average during the run: {load}")
    result = {
        "subjects": args.subjects,
        "machine": platform.platform(),
        "python": platform.python_version(),
        "load_average": load,
        "cases": [{"case": label, "wall_s": round(s, 3), "cpu_s": round(c, 3), "runs": n,
                   "target_s": targets.get(label)} for label, s, c, n in rows],
        "targets_met": all(s < targets[label] for label, s, _, _ in rows if label in targets),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
