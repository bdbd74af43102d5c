"""Template and atlas loading from pre-populated caches, offline failures, resampling."""

from __future__ import annotations

import functools
import http.server
import logging
import threading
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_roimae.errors import MissingInputError
from bids_roimae.io import atlas as atlas_mod
from bids_roimae.io import templates as templates_mod
from bids_roimae.io.atlas import (
    aal3_systems,
    fetch_main,
    fetch_resources,
    load_atlas,
    resample_labels,
)
from bids_roimae.io.templates import load_template

SPACE = "MNI152NLin2009cAsym"
SYSTEMS = {"frontal", "parietal", "temporal", "occipital", "limbic", "insula", "thalamus",
           "subcortical", "cerebellum", "vermis"}


def _offline(monkeypatch, tmp_path):
    """Empty caches and a proxy that refuses every connection (as with no network)."""
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "tf_empty"))
    monkeypatch.setenv("NILEARN_DATA", str(tmp_path / "nl_empty"))
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)


def _write_labels(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.int16), affine), path)
    return path


# -- template -------------------------------------------------------------------------

def test_load_template_uses_the_cached_files(resources):
    template = load_template()
    assert template.space == SPACE and template.resolution == 2
    assert template.mask_img.shape == (13, 17, 11)
    np.testing.assert_allclose(template.mask_img.affine, resources.affine)
    assert template.mask_path.parent == resources.templateflow_home / f"tpl-{SPACE}"
    assert template.t1w_path is not None and template.t1w_path.stat().st_size > 0
    mask = np.asarray(template.mask_img.dataobj) > 0
    assert 0 < mask.sum() < mask.size


def test_template_is_downloaded_into_an_empty_cache(resources, tmp_path, monkeypatch):
    """A file missing from the cache comes from TemplateFlow's store (a local server here)."""
    served = resources.templateflow_home
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setattr(templates_mod, "TEMPLATEFLOW_S3",
                            f"http://127.0.0.1:{server.server_address[1]}")
        for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        home = tmp_path / "tf_new"
        monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
        template = load_template()
    finally:
        server.shutdown()
        server.server_close()
    assert template.mask_path == home / f"tpl-{SPACE}" / template.mask_path.name
    assert template.mask_img.shape == (13, 17, 11)
    assert not list(home.rglob("*.part"))


# -- atlases from each source ---------------------------------------------------------

def test_aal3_from_the_nilearn_cache_layout(resources):
    atlas = load_atlas()
    assert atlas.name == "AAL3" and atlas.source == "nilearn:aal_3v2"
    assert atlas.img.shape == (11, 15, 9)  # its own grid, not the template's
    assert list(atlas.table.columns) == ["index", "name", "system"]
    assert len(atlas.table) == 29
    row = atlas.table.set_index("name").loc["Hippocampus_L"]
    assert row["index"] == 41 and row["system"] == "limbic"
    assert atlas.table.set_index("name").loc["Cerebellum_Crus1_R", "system"] == "cerebellum"
    assert set(atlas.table["system"]) <= SYSTEMS


def test_aal3_resampled_onto_the_template_grid(resources):
    """The atlas grid is x-flipped and cropped: left regions must land at x < 0 mm."""
    template, atlas = load_template(), load_atlas()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may vanish on an aligned grid
        labels, vanished = resample_labels(atlas, template.mask_img)
    assert labels.shape == (13, 17, 11) and labels.dtype == np.int32
    assert vanished == []
    brain = np.asarray(template.mask_img.dataobj) > 0
    assert np.array_equal(labels > 0, brain)  # the parcellation covers the brain
    assert set(np.unique(labels[brain]).tolist()) == set(atlas.table["index"])
    ijk = np.argwhere(labels == 41)  # Hippocampus_L
    x_mm = nib.affines.apply_affine(template.mask_img.affine, ijk)[:, 0]
    assert (x_mm < 0).all()


def test_templateflow_atlas_by_name_and_desc(resources, tmp_path, monkeypatch):
    home = tmp_path / "tf"
    grid = np.zeros((13, 17, 11), dtype=np.int16)
    grid[2:6, 3:9, 2:6], grid[7:11, 3:9, 2:6] = 1, 2
    name = f"tpl-{SPACE}_res-02_atlas-Toy_desc-2Parcels_dseg.nii.gz"
    _write_labels(home / f"tpl-{SPACE}" / name, grid, resources.affine)
    (home / f"tpl-{SPACE}" / f"tpl-{SPACE}_atlas-Toy_desc-2Parcels_dseg.tsv").write_text(
        "index\tname\tcolor\n1\t7Networks_LH_Vis_1\t#781180\n2\t7Networks_RH_Default_1\t#cd3e4e\n")
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    atlas = load_atlas("Toy", desc="2Parcels")
    assert atlas.name == "Toy" and atlas.desc == "2Parcels"
    assert atlas.source.startswith("templateflow:") and "res-02" in atlas.source
    assert atlas.table["name"].tolist() == ["7Networks_LH_Vis_1", "7Networks_RH_Default_1"]
    assert atlas.table["system"].tolist() == ["Vis", "Default"]


def test_templateflow_atlas_falls_back_to_1mm(resources, tmp_path, monkeypatch):
    home = tmp_path / "tf"
    fine = np.zeros((26, 34, 22), dtype=np.int16)
    fine[4:12, 6:18, 4:12], fine[14:22, 6:18, 4:12] = 3, 4
    affine_1mm = resources.affine.copy()
    affine_1mm[:3, :3] = np.eye(3)
    _write_labels(home / f"tpl-{SPACE}" / f"tpl-{SPACE}_res-01_atlas-Toy_dseg.nii.gz",
                  fine, affine_1mm)
    template = load_template()
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    atlas = load_atlas("Toy")
    assert "res-01" in atlas.source and atlas.img.shape == (26, 34, 22)
    assert atlas.table["name"].tolist() == ["region-3", "region-4"]  # no TSV anywhere
    labels, vanished = resample_labels(atlas, template.mask_img)
    assert labels.shape == (13, 17, 11) and vanished == []
    assert set(np.unique(labels).tolist()) == {0, 3, 4}


def test_atlas_file_with_labels(resources, tmp_path):
    data = np.zeros((9, 12, 7), dtype=np.int16)
    data[1:4, 2:6, 1:3], data[5:8, 2:6, 1:3], data[2:4, 8:10, 4:6] = 5, 7, 9
    path = _write_labels(tmp_path / "myatlas.nii.gz", data, np.diag([3.0, 3.0, 3.0, 1.0]))
    labels_tsv = tmp_path / "labels.tsv"
    labels_tsv.write_text("index\tname\tsystem\n5\tleft_blob\tlimbic\n7\tright_blob\tcerebellum\n")
    atlas = load_atlas(atlas_file=path, labels_file=labels_tsv)
    assert atlas.name == "myatlas" and atlas.source == str(path)
    table = atlas.table.set_index("index")
    assert table.loc[5, "name"] == "left_blob" and table.loc[7, "system"] == "cerebellum"
    assert table.loc[9, "name"] == "region-9" and table.loc[9, "system"] == ""  # unlisted


def test_atlas_file_same_stem_tsv_or_region_names(tmp_path):
    data = np.zeros((5, 6, 4), dtype=np.int16)
    data[1:3, 1:3, 1:3], data[3:5, 3:6, 1:3] = 2, 11
    path = _write_labels(tmp_path / "parc.nii.gz", data, np.eye(4))
    assert load_atlas(atlas_file=path).table["name"].tolist() == ["region-2", "region-11"]
    (tmp_path / "parc.tsv").write_text("index\tname\n2\tfirst\n11\tsecond\n")
    atlas = load_atlas(atlas_file=path)
    assert atlas.table["name"].tolist() == ["first", "second"]
    assert atlas.table["index"].dtype.kind == "i" and atlas.names() == {2: "first", 11: "second"}


def test_atlas_file_missing_is_a_missing_input(tmp_path):
    with pytest.raises(MissingInputError, match="--atlas-file"):
        load_atlas(atlas_file=tmp_path / "absent.nii.gz")


# -- offline with empty caches --------------------------------------------------------

@pytest.mark.parametrize("call, names", [
    (lambda: load_template(), "desc-brain_mask"),
    (lambda: load_atlas(), "AAL3v1"),
    (lambda: load_atlas("Schaefer2018", desc="400Parcels7Networks"), "Schaefer2018"),
], ids=["template", "aal3", "templateflow-atlas"])
def test_offline_empty_cache_is_one_line_missing_input(call, names, tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path)
    with pytest.raises(MissingInputError) as info:
        call()
    message = str(info.value)
    assert info.value.exit_code == 66
    assert "\n" not in message and names in message
    assert "bids_roimae-fetch" in message and "TEMPLATEFLOW_HOME / NILEARN_DATA" in message
    leftovers = [p for p in (tmp_path / "tf_empty").rglob("*") if p.is_file()]
    assert leftovers == []  # no empty or partial file that would later look cached


def test_empty_cached_files_are_missing_not_used(resources, tmp_path, monkeypatch):
    """0-byte files (TemplateFlow placeholders, interrupted downloads) are not inputs."""
    _offline(monkeypatch, tmp_path)
    tpl = tmp_path / "tf_empty" / f"tpl-{SPACE}"
    tpl.mkdir(parents=True)
    (tpl / f"tpl-{SPACE}_res-02_desc-brain_mask.nii.gz").touch()
    with pytest.raises(MissingInputError, match="could not be downloaded"):
        load_template()
    aal = tmp_path / "nl_empty" / "aal_3v2" / "AAL3"
    aal.mkdir(parents=True)
    (aal / "AAL3v1.nii").touch()
    (aal / "AAL3v1.xml").write_text(
        (resources.nilearn_data / "aal_3v2" / "AAL3" / "AAL3v1.xml").read_text())
    with pytest.raises(MissingInputError, match="is empty"):
        load_atlas()


def test_unknown_templateflow_atlas_is_named(tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path)
    with pytest.raises(MissingInputError, match="does not provide"):
        load_atlas("NoSuchAtlas", desc="x")


# -- resampling -----------------------------------------------------------------------

def test_downsampling_keeps_integer_labels_and_names_a_vanished_region(resources, caplog):
    """A 1 mm atlas onto the 2 mm grid: a 1-voxel region between 2 mm centres vanishes."""
    fine = np.zeros((26, 34, 22), dtype=np.float32)  # float storage, integer values
    fine[4:14, 6:20, 4:14] = 45.0
    fine[14:24, 6:20, 4:14] = 46.0
    fine[9, 25, 11] = 116.0  # odd voxel index: between two 2 mm voxel centres
    affine_1mm = resources.affine.copy()
    affine_1mm[:3, :3] = np.eye(3)  # voxel 2k of this grid is voxel k of the template
    atlas = atlas_mod.Atlas("fine", None, nib.Nifti1Image(fine, affine_1mm),
                            pd.DataFrame({"index": [45, 46, 116],
                                          "name": ["Amygdala_L", "Amygdala_R", "Vermis_6"],
                                          "system": ["limbic", "limbic", "vermis"]}),
                            "test")
    with caplog.at_level(logging.WARNING, logger="bids_roimae.io.atlas"):
        with pytest.warns(UserWarning, match="Vermis_6"):
            labels, vanished = resample_labels(atlas, load_template().mask_img)
    assert vanished == [116]
    assert "Vermis_6" in caplog.text
    assert labels.dtype == np.int32 and labels.shape == (13, 17, 11)
    assert set(np.unique(labels).tolist()) == {0, 45, 46}
    assert labels[2, 3, 2] == 45 and labels[7, 3, 2] == 46  # 1 mm (4, 6, 4) and (14, 6, 4)


# -- AAL3 systems table ---------------------------------------------------------------

def test_systems_table_covers_every_aal3_label(resources):
    table = aal3_systems()
    assert table["index"].tolist() == list(range(1, 171))
    assert table["name"].is_unique and set(table["system"]) == SYSTEMS
    by_name = table.set_index("name")["system"]
    expected = {"Precentral_L": "frontal", "OFCpost_R": "frontal", "Angular_L": "parietal",
                "Fusiform_R": "temporal", "Lingual_L": "occipital",
                "Cingulate_Ant_L": "limbic", "ACC_pre_R": "limbic", "Amygdala_R": "limbic",
                "Insula_L": "insula", "Thalamus_L": "thalamus", "Thal_PuM_R": "thalamus",
                "N_Acc_L": "subcortical", "Raphe_M": "subcortical", "VTA_R": "subcortical",
                "Cerebellum_10_R": "cerebellum", "Vermis_1_2": "vermis"}
    assert {name: by_name[name] for name in expected} == expected
    synthetic = load_atlas().table  # every synthetic region is a real AAL3 label
    merged = synthetic.merge(table, on=["index", "name"], suffixes=("", "_ref"))
    assert len(merged) == len(synthetic) and (merged["system"] == merged["system_ref"]).all()


# -- pre-fetching ---------------------------------------------------------------------

def test_fetch_resources_lists_cached_files(resources):
    paths = fetch_resources()
    names = [p.name for p in paths]
    assert names[0] == f"tpl-{SPACE}_res-02_desc-brain_mask.nii.gz"
    assert names[1] == f"tpl-{SPACE}_res-02_T1w.nii.gz" and names[2] == "AAL3v1.nii"
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)


def test_fetch_command_prints_paths_or_exits_66(resources, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as done:
        fetch_main([])
    assert done.value.code == 0
    assert "AAL3v1.nii" in capsys.readouterr().out
    _offline(monkeypatch, tmp_path)
    with pytest.raises(SystemExit) as done:
        fetch_main(["--atlas", "AAL3"])
    captured = capsys.readouterr()
    assert done.value.code == 66
    assert len(captured.err.strip().splitlines()) == 1 and "desc-brain_mask" in captured.err
