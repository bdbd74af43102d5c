"""Attribution outputs as a BIDS derivative dataset, group summaries and HTML reports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_roimae.analysis.attribution import IGResult, integrated_gradients
from bids_roimae.analysis.fidelity import region_fidelity
from bids_roimae.analysis.group_stats import group_difference
from bids_roimae.io.atlas import Atlas
from bids_roimae.io.derivatives import write_bidsignore, write_dataset_description
from bids_roimae.io.templates import Template
from bids_roimae.reports.group_report import build_group_report
from bids_roimae.reports.participant_report import build_participant_report
from bids_roimae.reports.run_derivatives import (
    BIDSIGNORE,
    pybids_config,
    read_region_tables,
    write_run_attribution,
    write_run_fidelity,
)

sys.path.insert(0, str(Path(__file__).parent))
from test_attribution import (  # noqa: E402
    AFFINE,
    GRID,
    TinyClassifier,
    TinyMAE,
    atlas_table,
    make_geometry,
    make_mask_labels,
    make_windows,
)

SPACE = "MNI152NLin2009cAsym"
VALIDATOR = Path(sys.executable).parent / "bids-validator-deno"


def start_dataset(out: Path) -> None:
    write_dataset_description(out, source_datasets=["/data/fmriprep"])
    write_bidsignore(out, BIDSIGNORE + ["models"])  # models/: the fine-tuning stage


def source_bold(tmp_path, name, shape=GRID, affine=AFFINE):
    path = tmp_path / "src" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros(tuple(shape) + (4,), np.float32), affine), path)
    return path


def planted_ig(geometry, boost_regions=(), scale=1.0, seed=0):
    """An IG result with abs_mean ~ U(0, 1) and planted regions raised by ``scale``."""
    rng = np.random.default_rng(seed)
    values = rng.random(geometry.voxel_mask.shape) * geometry.voxel_mask
    for region in boost_regions:
        values = values + scale * ((geometry.labels == region) & geometry.voxel_mask)
    return IGResult(abs_mean=values.astype(np.float32),
                    signed_mean=(values * 0.5).astype(np.float32),
                    window_abs=np.stack([values, values]).astype(np.float32),
                    window_rms=np.ones((2,) + values.shape, np.float32),
                    output=np.ones(2), baseline_output=np.zeros(2),
                    delta=np.array([1e-4, -2e-4]), steps=32, baseline="zeros", target=0,
                    method="gausslegendre")


@pytest.fixture(scope="module")
def run_tree(tmp_path_factory):
    """One participant, two runs: one on the model grid, one on a coarser grid."""
    tmp = tmp_path_factory.mktemp("tree")
    out = tmp / "out"
    start_dataset(out)
    geometry = make_geometry()
    model = TinyClassifier(geometry.n_tokens, geometry.patch_voxels)
    mae = TinyMAE(geometry.n_tokens, geometry.patch_voxels)
    windows = make_windows(geometry, 2)
    ig = integrated_gradients(model, windows, steps=16)
    fidelity = region_fidelity(mae, windows, geometry, table=atlas_table())
    coarse = np.diag([3.0, 3.0, 3.0, 1.0])
    coarse[:3, 3] = AFFINE[:3, 3] + [-12.0, 0.0, 1.0]
    runs = {"1": source_bold(tmp, "run1.nii.gz"),
            "2": source_bold(tmp, "run2.nii.gz", (9, 12, 8), coarse)}
    written = {}
    for run, ref in runs.items():
        ents = {"subject": "01", "task": "rest", "run": run}
        res = "2" if run == "1" else None
        written[run] = {
            "ig": write_run_attribution(out, ents, ig, geometry, ref, "AAL3", atlas_table(),
                                        space=SPACE, res=res, model_meta={"Name": "tiny"},
                                        sources=["bids::sub-01/func/bold.nii.gz"]),
            "fidelity": write_run_fidelity(out, ents, fidelity, geometry, ref, "AAL3",
                                           space=SPACE, res=res)}
    return out, runs, written, ig


def test_written_maps_have_the_source_grid_and_sidecars(run_tree):
    out, runs, written, ig = run_tree
    for run, ref in runs.items():
        src = nib.load(str(ref))
        for kind, key in (("ig", "absmean"), ("ig", "signedmean"), ("fidelity", "error"),
                          ("fidelity", "shift")):
            img = nib.load(str(written[run][kind][key]))
            assert img.shape == src.shape[:3]
            np.testing.assert_allclose(img.affine, src.affine)
    name = written["1"]["ig"]["absmean"].name
    assert name == (f"sub-01_task-rest_run-1_space-{SPACE}_res-2_stat-ig_desc-absmean"
                    "_boldmap.nii.gz")
    meta = json.loads(written["1"]["ig"]["absmean"].with_suffix("").with_suffix(".json")
                      .read_text())
    assert meta["Steps"] == 16 and meta["Baseline"] == "zeros" and meta["Atlas"] == "AAL3"
    assert meta["Sources"] == ["bids::sub-01/func/bold.nii.gz"]
    assert np.isclose(meta["CompletenessMaxRelativeError"], ig.max_relative_error)
    assert "2" in meta["Resolution"]
    # The model-grid run keeps the token values exactly.
    data = np.asarray(nib.load(str(written["1"]["ig"]["absmean"])).dataobj)
    assert np.isclose(data.sum(), ig.abs_mean.sum(), rtol=1e-5)


def test_region_table_file_sums_to_the_map(run_tree):
    out, runs, written, ig = run_tree
    table = pd.read_csv(written["1"]["ig"]["table"], sep="\t", na_values="n/a",
                        keep_default_na=False)
    _, labels = make_mask_labels()
    data = np.asarray(nib.load(str(written["1"]["ig"]["absmean"])).dataobj)
    total = (table["mean_abs"] * table["n_voxels"]).sum(skipna=True)
    assert np.isclose(total, data[labels > 0].sum(), rtol=1e-4)
    assert written["1"]["ig"]["table"].name == (
        f"sub-01_task-rest_run-1_space-{SPACE}_seg-AAL3_stat-ig_bold.tsv")
    fid = read_region_tables(out, "fidelity")
    assert set(fid["run_key"]) == {"sub-01_task-rest_run-1", "sub-01_task-rest_run-2"}


def test_output_tree_passes_the_bids_validator(run_tree, tmp_path):
    out, *_ = run_tree
    assert (out / ".bidsignore").exists()
    proc = subprocess.run([str(VALIDATOR), str(out), "--ignoreWarnings"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    # Without the ignore patterns the non-schema names are reported: the check has teeth.
    bare = tmp_path / "bare"
    import shutil

    shutil.copytree(out, bare)
    (bare / ".bidsignore").unlink()
    proc = subprocess.run([str(VALIDATOR), str(bare), "--ignoreWarnings"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0


def test_pybids_queries_maps_by_entity(run_tree):
    from bids import BIDSLayout

    out, *_ = run_tree
    layout = BIDSLayout(out, validate=False, config=["bids", "derivatives", pybids_config()])
    maps = layout.get(stat="ig", desc="absmean", extension=".nii.gz")
    assert sorted(f.entities["run"] for f in maps) == [1, 2]
    tables = layout.get(stat="fidelity", suffix="bold", extension=".tsv")
    assert len(tables) == 2 and all(f.entities["segmentation"] == "AAL3" for f in tables)


def test_participant_report_is_self_contained(run_tree):
    out, *_ = run_tree
    page = build_participant_report(out, "sub-01").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("data:image/png;base64,") >= 4
    assert not re.search(r"""(src|href)=["'](https?:|//)""", page)
    assert "sub-01_task-rest_run-2" in page


# -- group ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def group_tree(tmp_path_factory):
    """Six participants; regions 2 and 5 carry more attribution in the ADHD group."""
    tmp = tmp_path_factory.mktemp("group")
    out = tmp / "out"
    start_dataset(out)
    geometry = make_geometry()
    ref = source_bold(tmp, "bold.nii.gz")
    mae = TinyMAE(geometry.n_tokens, geometry.patch_voxels)
    fidelity = region_fidelity(mae, make_windows(geometry, 1), geometry, table=atlas_table())
    dx = {}
    for i in range(6):
        label = f"{i + 1:02d}"
        adhd = i % 2 == 0
        dx[label] = "ADHD" if adhd else "TDC"
        ig = planted_ig(geometry, boost_regions=(2, 5) if adhd else (), scale=0.6, seed=i)
        ents = {"subject": label, "task": "rest", "run": "1"}
        write_run_attribution(out, ents, ig, geometry, ref, "AAL3", atlas_table(),
                              space=SPACE, res="2")
        shifted = fidelity.assign(embedding_shift=fidelity["embedding_shift"] * (1 + i))
        write_run_fidelity(out, ents, shifted, geometry, ref, "AAL3", space=SPACE, res="2")
    (out / "models" / "masking_comparison").mkdir(parents=True)
    pd.DataFrame({"masking": ["roi", "random"], "accuracy": [0.7, 0.65]}).to_csv(
        out / "models" / "masking_comparison" / "masking_comparison.tsv", sep="\t", index=False)
    mask, labels = make_mask_labels()
    mask_path, t1w_path = tmp / "mask.nii.gz", tmp / "t1w.nii.gz"
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), AFFINE), mask_path)
    nib.save(nib.Nifti1Image(mask * 100.0, AFFINE), t1w_path)
    template = Template(SPACE, 2, nib.load(str(mask_path)), mask_path, t1w_path)
    atlas = Atlas("AAL3", None, nib.Nifti1Image(labels, AFFINE), atlas_table(), "test")
    # Categorical: the reference group (TDC) first, as run_report passes trained classes.
    participants = pd.DataFrame({"dx": pd.Categorical(pd.Series(dx),
                                                      categories=["TDC", "ADHD"])})
    participants.index = list(dx)
    written = build_group_report(out, participants, atlas.name, atlas.table, template,
                                 atlas_img=atlas.img, label_column="dx")
    return out, written


def test_group_difference_ranks_planted_regions_first(group_tree):
    out, written = group_tree
    diff = pd.read_csv(written["ig_groupdiff"], sep="\t", na_values="n/a",
                       keep_default_na=False)
    assert set(diff.head(2)["index"]) == {2, 5}
    assert (diff.head(2)["statistic"] > 0).all()  # ADHD minus the reference TDC
    assert set(diff["test"]) == {"Welch t (ADHD - TDC)"}
    assert {"mean_ADHD", "mean_TDC", "p", "q", "cohen_d"} <= set(diff.columns)
    regions = pd.read_csv(written["ig_regions"], sep="\t")
    assert set(regions.head(2)["index"]) == {2, 5}  # planted also top the group mean
    systems = pd.read_csv(written["ig_systems"], sep="\t")
    assert set(systems["system"]) == {"frontal", "occipital", "cerebellum"}
    # By system: frontal and cerebellum each hold one boosted region, occipital none.
    by_system = pd.read_csv(written["ig_systemgroupdiff"], sep="\t")
    assert list(by_system.columns[:1]) == ["system"] and len(by_system) == 3
    assert set(by_system.head(2)["system"]) == {"frontal", "cerebellum"}
    assert (by_system.head(2)["statistic"] > 0).all()
    assert written["ig_systemgroupdiff"].name == "seg-AAL3_stat-ig_desc-systemgroupdiff_stats.tsv"


def test_group_maps_and_html(group_tree):
    out, written = group_tree
    mean_img = nib.load(str(written["ig_mean_map"]))
    sd_img = nib.load(str(written["ig_sd_map"]))
    assert mean_img.shape == GRID and sd_img.shape == GRID
    np.testing.assert_allclose(mean_img.affine, AFFINE)
    _, labels = make_mask_labels()
    mean = np.asarray(mean_img.dataobj)
    # Planted regions are raised by 0.6 in half of the participants: mean +0.3.
    assert mean[labels == 2].mean() - mean[labels == 1].mean() > 0.2
    assert np.asarray(sd_img.dataobj).max() > 0
    page = written["html"].read_text()
    assert "data:image/png;base64," in page and "masking_comparison.tsv" in page
    assert not re.search(r"""(src|href)=["'](https?:|//)""", page)
    fid = pd.read_csv(written["fidelity_regions"], sep="\t")
    assert {"mean", "sd", "error_mean", "error_sd", "rank"} <= set(fid.columns)
    # Shifts scale with the participant number 1..6: the group mean is 3.5x the first.
    first = read_region_tables(out, "fidelity").query("subject == '01'").set_index("index")
    row = fid.set_index("index").iloc[0]
    assert np.isclose(row["mean"], 3.5 * first.loc[row.name, "embedding_shift"], rtol=1e-4)
    assert written["fidelity_mean_map"].name == (
        f"space-{SPACE}_seg-AAL3_res-2_stat-fidelity_desc-shiftmean_boldmap.nii.gz")
    # The group difference painted per region: every voxel of a region holds its t.
    diff = pd.read_csv(written["ig_groupdiff"], sep="\t").set_index("index")
    t_img = nib.load(str(written["ig_groupdiff_map"]))
    assert t_img.shape == GRID and written["ig_groupdiff_map"].name == (
        f"space-{SPACE}_seg-AAL3_res-2_stat-ig_desc-groupdiff_boldmap.nii.gz")
    t_map = np.asarray(t_img.dataobj)
    for region in (1, 2, 5):
        np.testing.assert_allclose(t_map[labels == region], diff.loc[region, "statistic"],
                                   rtol=1e-5)
    assert not t_map[labels == 0].any()
    proc = subprocess.run([str(VALIDATOR), str(out), "--ignoreWarnings"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_group_difference_needs_two_groups():
    tables = pd.DataFrame({"subject": ["01", "02", "03"], "index": [1, 1, 1],
                           "name": ["a"] * 3, "system": ["s"] * 3, "mean_abs": [1, 2, 3]})
    assert group_difference(tables, "mean_abs", pd.Series({"01": "A", "02": "A",
                                                           "03": "B"})) is None
