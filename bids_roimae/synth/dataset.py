"""The built-in example: a small BIDS dataset with fMRIPrep derivatives and a planted effect.

``bids_roimae-synth OUT --n-subjects 12`` writes a raw BIDS root (tiny raw BOLD stubs,
``participants.tsv`` with ADHD-200 diagnosis codes) and ``derivatives/fmriprep`` named as
fMRIPrep names its outputs (preprocessed BOLD and brain mask in
``space-MNI152NLin2009cAsym_res-2``, ``desc-confounds_timeseries.tsv`` + ``.json``).

The signal model (network time courses, region and voxel signals, site effects, the
planted ADHD effect) and the confounds table live in :mod:`bids_roimae.synth.signal`.
**Planted group difference**: in ADHD subjects (dx 1, 2, 3) every planted region
(default ``Hippocampus_L`` and ``Cerebellum_Crus1_R``) has amplitude ``a_r = 1 +
2 effect_size`` and coupling to its home network ``c (1 - effect_size)`` (default
``effect_size`` 0.5: 2x amplitude, coupling 0.7 -> 0.35; the region's total variance
stays ``a_r^2``); ``effect="amplitude"`` or ``"coupling"`` plants only one of the two.
Nothing else differs between groups; sites are balanced across groups. In a 6-subject,
40-frame example the log amplitude of a planted region's mean
signal differs by ~0.6 between groups, other regions by < 0.35. BOLD values are rounded
to int16 (as scanners write).

Grid and atlas come from :func:`bids_roimae.io.templates.load_template` and
:func:`bids_roimae.io.atlas.load_atlas` (the app's own fetch code): real
MNI152NLin2009cAsym + AAL3 when cached, otherwise
:func:`bids_roimae.synth.resources.write_synthetic_resources` lays out a synthetic template
and AAL3-like atlas in ``OUT/sourcedata/`` and the dataset uses those (export the printed
variables to run the app on it).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import nibabel as nib
import numpy as np
import pandas as pd

from bids_roimae import __version__
from bids_roimae.config import DEFAULT_SPACE
from bids_roimae.errors import MissingInputError
from bids_roimae.io.atlas import resample_labels
from bids_roimae.synth.resources import template_and_atlas
from bids_roimae.synth.signal import (
    COUPLING,
    EFFECTS,
    SignalGrid,
    confounds_table,
    planted_factors,
    simulate_run,
)

RESOLUTION = {"2": "TemplateFlow resolution 2 (2 mm isotropic)"}
DEFAULT_PLANTED = ("Hippocampus_L", "Cerebellum_Crus1_R")
#: On a full atlas (AAL3: 166 regions in the brain) two planted regions are too few for a
#: connectome to find among 13,695 connections (accuracy at chance on 24 subjects); ten
#: limbic and cerebellar regions (~6% of the atlas) give the connectome baseline about 0.8.
DEFAULT_PLANTED_FULL = DEFAULT_PLANTED + (
    "Hippocampus_R", "ParaHippocampal_L", "ParaHippocampal_R", "Amygdala_L", "Amygdala_R",
    "Cerebellum_Crus1_L", "Cerebellum_6_L", "Cerebellum_6_R")
#: Atlases with at least this many regions in the brain get ``DEFAULT_PLANTED_FULL``.
FULL_ATLAS_REGIONS = 60
DX_LEVELS = {"0": "Typically developing control", "1": "ADHD-Combined",
             "2": "ADHD-Hyperactive/Impulsive", "3": "ADHD-Inattentive"}


# -- writing --------------------------------------------------------------------------

def _save_nifti(data: np.ndarray, affine: np.ndarray, path: Path, tr: Optional[float] = None):
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, 4)  # 4 = MNI152 space
    img.set_qform(affine, 4)
    img.header.set_xyzt_units("mm", "sec")
    if tr is not None:
        img.header.set_zooms(tuple(img.header.get_zooms()[:3]) + (float(tr),))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")


def _to_volume(grid: SignalGrid, values: np.ndarray) -> np.ndarray:
    """Scatter brain-voxel rows (V, T) into an int16 (X, Y, Z, T) volume, zero outside."""
    vol = np.zeros(grid.shape + (values.shape[1],), dtype=np.int16, order="F")
    vol.reshape(-1, values.shape[1], order="F")[grid.flat] = np.rint(values)  # a view
    return vol


def _planted_ids(planted, table: pd.DataFrame, present: np.ndarray) -> list[int]:
    by_name = dict(zip(table["name"], table["index"].astype(int)))
    if planted is None and present.size >= FULL_ATLAS_REGIONS and all(
            by_name.get(n) in set(present.tolist()) for n in DEFAULT_PLANTED_FULL):
        planted = list(DEFAULT_PLANTED_FULL)
    if planted is None:
        planted = [n for n in DEFAULT_PLANTED if by_name.get(n) in set(present.tolist())]
        if len(planted) < len(DEFAULT_PLANTED):  # another atlas: first limbic + cerebellar
            rows = table[table["index"].isin(present)]
            planted = [int(rows[rows["system"] == s]["index"].iloc[0])
                       for s in ("limbic", "cerebellum") if (rows["system"] == s).any()]
    ids = [int(p) if str(p).isdigit() else by_name.get(str(p), -1) for p in planted]
    bad = [p for p, i in zip(planted, ids) if i not in set(present.tolist())]
    if bad or not ids:
        raise ValueError(f"planted regions {bad or planted} are not regions of the atlas in "
                         f"the brain mask")
    return ids


def _assign_participants(n_subjects: int, n_sites: int, rng) -> pd.DataFrame:
    """Half ADHD (subtypes 1, 2, 3 in turn), sites balanced within each group."""
    n_adhd = n_subjects // 2
    is_adhd = rng.permutation(np.arange(n_subjects) < n_adhd)
    dx, site = [], []
    counts = {True: 0, False: 0}
    for flag in is_adhd:
        k = counts[bool(flag)]
        counts[bool(flag)] += 1
        dx.append(str(1 + k % 3) if flag else "0")
        site.append(f"site{chr(ord('A') + k % n_sites)}")
    width = max(2, len(str(n_subjects)))
    return pd.DataFrame({
        "participant_id": [f"sub-{i + 1:0{width}d}" for i in range(n_subjects)],
        "dx": dx, "site": site, "age": np.round(rng.uniform(7, 21, n_subjects), 2),
        "sex": rng.choice(["M", "F"], n_subjects, p=[0.7, 0.3])})


def make_dataset(out: Path, *, n_subjects: int = 12, n_frames: int = 60, tr: float = 2.0,
                 seed: int = 0, sessions: int = 1, runs: int = 1,
                 tasks: Sequence[str] = ("rest",), planted_regions=None,
                 effect_size: float = 0.5, space: str = DEFAULT_SPACE,
                 n_sites: int = 2, n_jobs: int = 1, effect: str = "both") -> dict:
    """Write the example dataset (raw BIDS root + ``derivatives/fmriprep``).

    Parameters
    ----------
    out : path
        BIDS root to create.
    n_subjects, n_frames, tr, sessions, runs, tasks
        Size of the dataset; every subject has ``sessions x tasks x runs`` BOLD runs of
        ``n_frames`` frames on the template grid ``(X, Y, Z)``.
    seed : int
        Everything is reproducible from it (also with ``n_jobs > 1``).
    planted_regions : sequence of str or int, optional
        Atlas region names or indices whose dynamics differ in ADHD subjects (default: on
        a full atlas such as AAL3, the ten limbic and cerebellar regions of
        ``DEFAULT_PLANTED_FULL``; on a small atlas Hippocampus_L and Cerebellum_Crus1_R;
        else the first limbic and cerebellar ones).
    effect_size : float in [0, 1)
        ADHD amplitude factor ``1 + 2 effect_size``, coupling factor ``1 - effect_size``.
    space : str
        Template space of the derivatives.
    n_sites : int
        Acquisition sites (own intensity offset and scale), balanced across groups.
    n_jobs : int
        Runs written in parallel threads (numpy and gzip release the GIL).
    effect : {"both", "amplitude", "coupling"}
        Plant the amplitude change, the coupling change, or both.

    Returns
    -------
    dict
        Manifest: paths, grid, planted regions (index, name, system), effect, ADHD and
        control subjects, resources used (also written to ``code/synth_manifest.json``).
    """
    if not 0.0 <= effect_size < 1.0:
        raise ValueError("effect_size must be in [0, 1)")
    planted_factors(effect, effect_size)  # an unknown effect fails before any work
    from threadpoolctl import threadpool_limits


    # Small BLAS calls run faster on one thread than contending for busy cores.
    with threadpool_limits(limits=1, user_api="blas"):
        return _make_dataset(Path(out).absolute(), n_subjects, n_frames, tr, seed, sessions,
                             runs, tuple(tasks), planted_regions, effect_size, space, n_sites,
                             max(1, int(n_jobs)), __version__, effect)


def _write_run(job: dict, grid: SignalGrid, out: Path, fmriprep: Path, space: str) -> str:
    """Simulate one run and write its raw stub and fMRIPrep-named derivatives."""
    ents, rel, tr, task, rng = job["ents"], job["rel"], job["tr"], job["task"], job["rng"]
    data, motion = simulate_run(grid, rng, job["n_frames"], tr, job["adhd"],
                                 job["effect_size"], job["site_scale"], job["site_offset"],
                                 job["effect"])
    stub = rng.integers(0, 1000, (6, 7, 5, job["n_frames"])).astype(np.int16)
    _save_nifti(stub, np.diag([3.0, 3.0, 3.0, 1.0]), out / rel / f"{ents}_bold.nii.gz", tr)
    _write_json(out / rel / f"{ents}_bold.json", {"RepetitionTime": tr, "TaskName": task})
    prefix = f"{fmriprep / rel / ents}_space-{space}_res-2"
    bold = Path(f"{prefix}_desc-preproc_bold.nii.gz")
    _save_nifti(_to_volume(grid, data), grid.affine, bold, tr)
    _write_json(Path(f"{prefix}_desc-preproc_bold.json"), {
        "RepetitionTime": tr, "SkullStripped": True, "TaskName": task,
        "Resolution": RESOLUTION, "Sources": [f"bids::{rel.as_posix()}/{ents}_bold.nii.gz"]})
    _save_nifti(grid.brain.astype(np.uint8), grid.affine, Path(f"{prefix}_desc-brain_mask.nii.gz"))
    _write_json(Path(f"{prefix}_desc-brain_mask.json"), {"Type": "Brain", "Resolution": RESOLUTION,
                                                         "RawSources": [bold.name]})
    _save_nifti(_to_volume(grid, data.mean(1, keepdims=True))[..., 0], grid.affine,
                Path(f"{prefix}_boldref.nii.gz"))
    table, meta = confounds_table(grid, data, motion, tr, rng)
    conf = fmriprep / rel / f"{ents}_desc-confounds_timeseries.tsv"
    table.to_csv(conf, sep="\t", index=False, na_rep="n/a", float_format="%.8g")
    _write_json(conf.with_suffix(".json"), meta)
    return str(bold)


def _make_dataset(out, n_subjects, n_frames, tr, seed, sessions, runs, tasks,
                  planted_regions, effect_size, space, n_sites, n_jobs, version,
                  effect) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    template, atlas, used = template_and_atlas(out, space)
    labels, _ = resample_labels(atlas, template.mask_img)
    brain = np.asarray(template.mask_img.dataobj) > 0
    planted = _planted_ids(planted_regions, atlas.table, np.unique(labels[brain & (labels > 0)]))
    grid = SignalGrid(template, labels, atlas.table, planted, rng)
    participants = _assign_participants(n_subjects, n_sites, rng)
    site_names = sorted(participants["site"].unique())
    fmriprep = out / "derivatives" / "fmriprep"
    jobs = []
    for s_idx, row in participants.iterrows():
        site_i = site_names.index(row["site"])
        for ses in (range(1, sessions + 1) if sessions > 1 else [None]):
            for t_idx, task in enumerate(tasks):
                for run in (range(1, runs + 1) if runs > 1 else [None]):
                    sub = row["participant_id"]
                    ents = "_".join([sub] + ([f"ses-{ses}"] if ses else []) + [f"task-{task}"]
                                    + ([f"run-{run}"] if run else []))
                    jobs.append(dict(
                        ents=ents, rel=Path(sub, *([f"ses-{ses}"] if ses else []), "func"),
                        tr=tr, task=task, n_frames=n_frames, adhd=row["dx"] != "0",
                        effect_size=effect_size, effect=effect,
                        site_scale=1.0 + 0.3 * site_i,
                        site_offset=150.0 * site_i,
                        rng=np.random.default_rng([seed, s_idx, ses or 0, t_idx, run or 0])))
    with ThreadPoolExecutor(max_workers=n_jobs) as pool:
        written = list(pool.map(lambda job: _write_run(job, grid, out, fmriprep, space), jobs))

    names = atlas.names()
    systems = dict(zip(atlas.table["index"].astype(int), atlas.table["system"]))
    amp, coupled = planted_factors(effect, effect_size)
    changes = ([f"signal amplitude is x{amp:g}"] if amp != 1.0 else []) + (
        [f"coupling to their home network drops from {COUPLING:g} to {coupled:g}"]
        if coupled != COUPLING else [])
    effect_info = {
        "effect": effect, "effect_size": effect_size, "amplitude_factor": amp,
        "coupling_control": COUPLING, "coupling_adhd": coupled,
        "description": (f"In ADHD subjects (dx 1-3) the planted regions' "
                        f"{' and their '.join(changes) or 'signal is unchanged'}; "
                        f"nothing else differs between groups.")}
    manifest = {
        "bids_dir": str(out), "fmriprep_dir": str(fmriprep), "space": space,
        "grid_shape": list(grid.shape), "tr": tr, "n_frames": n_frames,
        "atlas": {"name": atlas.name, "source": atlas.source}, "resources": used,
        "planted_regions": [{"index": i, "name": names[i], "system": systems[i]}
                            for i in planted],
        "effect": effect_info,
        "adhd_subjects": participants.loc[participants["dx"] != "0", "participant_id"].tolist(),
        "control_subjects": participants.loc[participants["dx"] == "0",
                                             "participant_id"].tolist(),
        "sites": site_names, "bold_files": written, "seed": seed}
    _write_metadata(out, fmriprep, participants, manifest, version)
    return manifest


def _write_metadata(out: Path, fmriprep: Path, participants: pd.DataFrame, manifest: dict,
                    version: str) -> None:
    """Dataset descriptions, participants table + sidecar, README and the manifest."""
    generator = {"Name": "bids_roimae-synth", "Version": version}
    _write_json(out / "dataset_description.json", {
        "Name": "bids_roimae synthetic example", "BIDSVersion": "1.9.0", "DatasetType": "raw",
        "License": "CC0", "Authors": ["bids_roimae-synth"], "GeneratedBy": [generator]})
    _write_json(fmriprep / "dataset_description.json", {
        "Name": "fMRIPrep - fMRI PREProcessing workflow", "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "fMRIPrep", "Version": "24.1.1",
                         "CodeURL": "https://github.com/nipreps/fmriprep"},
                        dict(generator, Description="synthetic stand-in for fMRIPrep outputs")],
        "SourceDatasets": [{"URL": "bids::"}]})
    # As in real fMRIPrep outputs, confounds and boldrefs are outside the BIDS schema.
    (fmriprep / ".bidsignore").write_text("*_desc-confounds_timeseries.*\n*_boldref.nii.gz\n")
    participants.to_csv(out / "participants.tsv", sep="\t", index=False)
    _write_json(out / "participants.json", {
        "participant_id": {"Description": "Participant label"},
        "dx": {"Description": "Diagnosis, ADHD-200 coding", "Levels": DX_LEVELS},
        "site": {"Description": "Acquisition site (own intensity offset and scale)"},
        "age": {"Description": "Age at scan", "Units": "year"},
        "sex": {"Description": "Sex", "Levels": {"M": "male", "F": "female"}}})
    planted = ", ".join(f"{r['name']} ({r['index']}, {r['system']})"
                        for r in manifest["planted_regions"])
    synthetic = manifest["resources"]["synthetic"]
    (out / "README").write_text(
        "Synthetic resting-state dataset written by bids_roimae-synth (not real data).\n\n"
        f"{len(participants)} participants, sites {', '.join(manifest['sites'])}, "
        f"{manifest['n_frames']} frames at TR {manifest['tr']} s, fMRIPrep-like derivatives "
        f"in derivatives/fmriprep on the {manifest['space']} grid "
        f"{'x'.join(map(str, manifest['grid_shape']))} (atlas {manifest['atlas']['source']}"
        f"{', synthetic template and atlas in sourcedata/' if synthetic else ''}).\n\n"
        "BOLD = 10 latent network time courses (AR(1) noise convolved with a canonical HRF); "
        "each atlas region mixes its system's network, a global network and its own noise; "
        "voxels add spatially smooth and white noise, drift, motion spikes and a site "
        "offset and scale.\n\n"
        f"Planted group difference (ADHD = dx 1, 2, 3 vs controls dx 0) in {planted}: "
        f"{manifest['effect']['description']}\n\nThe full manifest is code/synth_manifest.json.\n")
    _write_json(out / "code" / "synth_manifest.json", manifest)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console script ``bids_roimae-synth OUT``: write the example dataset."""
    import click

    @click.command(name="bids_roimae-synth",
                   help="Write a synthetic BIDS dataset with fMRIPrep-like derivatives and a "
                        "planted ADHD group difference into OUT.")
    @click.argument("out", type=click.Path(file_okay=False, path_type=Path))
    @click.option("--n-subjects", default=12, show_default=True, type=click.IntRange(2))
    @click.option("--n-frames", default=60, show_default=True, type=click.IntRange(8))
    @click.option("--tr", default=2.0, show_default=True, type=click.FloatRange(0.1))
    @click.option("--seed", default=0, show_default=True, type=int)
    @click.option("--sessions", default=1, show_default=True, type=click.IntRange(1))
    @click.option("--runs", default=1, show_default=True, type=click.IntRange(1))
    @click.option("--task", "tasks", multiple=True, default=("rest",), show_default=True)
    @click.option("--planted", multiple=True, help="Region name or index (repeatable).")
    @click.option("--effect-size", default=0.5, show_default=True,
                  type=click.FloatRange(0.0, 1.0, max_open=True))
    @click.option("--effect", default="both", show_default=True,
                  type=click.Choice(list(EFFECTS)),
                  help="Planted difference: amplitude, coupling to the network, or both.")
    @click.option("--n-sites", default=2, show_default=True, type=click.IntRange(1))
    @click.option("--space", default=DEFAULT_SPACE, show_default=True)
    @click.option("--n-jobs", default=2, show_default=True, type=click.IntRange(1),
                  help="Runs written in parallel.")
    def command(out, n_subjects, n_frames, tr, seed, sessions, runs, tasks, planted,
                effect_size, effect, n_sites, space, n_jobs):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
        try:
            manifest = make_dataset(out, n_subjects=n_subjects, n_frames=n_frames, tr=tr,
                                    seed=seed, sessions=sessions, runs=runs, tasks=tasks,
                                    planted_regions=list(planted) or None,
                                    effect_size=effect_size, space=space, n_sites=n_sites,
                                    n_jobs=n_jobs, effect=effect)
        except ValueError as exc:
            raise click.UsageError(str(exc))
        except MissingInputError as exc:
            click.echo(f"bids_roimae-synth: {exc}", err=True)
            raise SystemExit(exc.exit_code)
        regions = ", ".join(r["name"] for r in manifest["planted_regions"])
        click.echo(f"wrote {len(manifest['bold_files'])} BOLD runs of {n_subjects} subjects "
                   f"to {out} (planted: {regions}; ADHD: {len(manifest['adhd_subjects'])})")
        if manifest["resources"]["synthetic"]:
            click.echo("synthetic template and atlas; before running the app:\n"
                       f"  export TEMPLATEFLOW_HOME={manifest['resources']['templateflow_home']}"
                       f"\n  export NILEARN_DATA={manifest['resources']['nilearn_data']}"
                       "\n  export TEMPLATEFLOW_AUTOUPDATE=0")

    command.main(args=list(argv) if argv is not None else None, standalone_mode=True)


__all__ = ["make_dataset", "main"]
