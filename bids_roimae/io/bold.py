"""Reading BOLD NIfTI files onto the model grid.

:class:`BoldSource` streams a 4D NIfTI frame by frame as float32 (a corrupt or truncated
file fails while reading; the whole image is never held in float64).
:func:`model_grid_matrix` gathers, or resamples from another resolution of the same space,
the template-brain voxels into a ``(T, V)`` matrix after a field-of-view coverage check.
Also here: the template/geometry grid check, the run's own brain mask on the model grid and
the template space name.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Optional

import nibabel as nib
import numpy as np

from bids_roimae.config import DEFAULT_SPACE
from bids_roimae.errors import BadDataError, one_line
from bids_roimae.io.cache import brain_voxels


class BoldSource:
    """A 4D NIfTI whose frames are streamed from disk as float32.

    Reading goes straight through the (gzip) file in frame order, so the whole image is
    never held at once and a truncated or corrupt file fails while reading (the gzip CRC
    is checked by reading to the end of the stream).
    """

    def __init__(self, path):
        self.path = Path(path)
        self.name = self.path.name
        if self.path.stat().st_size == 0:
            raise BadDataError(f"{self.name}: empty file (0 bytes)")
        try:
            img = nib.load(self.path)
        except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds
            raise BadDataError(f"{self.name}: {self._damage()} ({one_line(exc)})") from exc
        if len(img.shape) != 4:
            raise BadDataError(f"{self.name}: is {len(img.shape)}D, expected 4D BOLD")
        if not nib.is_proxy(img.dataobj) or getattr(img.dataobj, "order", "F") != "F":
            raise BadDataError(f"{self.name}: not a plain NIfTI-1/2 file")
        self.shape = tuple(int(s) for s in img.shape)
        self.n_frames = self.shape[3]
        self.affine = np.asarray(img.affine, np.float64)
        self.header = img.header
        self._dtype = np.dtype(img.get_data_dtype())
        self._offset = int(img.dataobj.offset)
        self._slope = float(img.dataobj.slope)
        self._inter = float(img.dataobj.inter)

    def _damage(self) -> str:
        return ("truncated or corrupt gzip" if self.name.endswith(".gz")
                else "truncated or corrupt NIfTI")

    @property
    def header_tr(self) -> Optional[float]:
        """pixdim[4] in seconds, or None when 0/absent."""
        zooms = self.header.get_zooms()
        tr = float(zooms[3]) if len(zooms) > 3 else 0.0
        unit = self.header.get_xyzt_units()[1]
        tr /= {"msec": 1e3, "usec": 1e6}.get(unit, 1.0)
        return tr if np.isfinite(tr) and tr > 0 else None

    def on_grid(self, shape, affine) -> bool:
        return self.shape[:3] == tuple(shape) and np.allclose(self.affine, affine, atol=1e-3)

    def iter_frames(self, frames_per_chunk: int = 1):
        """Yield ``(t0, block)``; ``block`` is float32 (k, X*Y*Z), rows in Fortran order."""
        from nibabel.openers import ImageOpener

        n_vox = int(np.prod(self.shape[:3]))
        raw_dtype = self._dtype
        scaled = (self._slope, self._inter) != (1.0, 0.0)
        direct = raw_dtype == np.dtype(np.float32) and not scaled
        buf = bytearray(frames_per_chunk * n_vox * raw_dtype.itemsize)
        try:
            with ImageOpener(self.path, "rb") as fobj:
                fobj.seek(self._offset)
                for t0 in range(0, self.n_frames, frames_per_chunk):
                    k = min(frames_per_chunk, self.n_frames - t0)
                    view = memoryview(buf)[:k * n_vox * raw_dtype.itemsize]
                    got = 0
                    while got < len(view):
                        n = fobj.readinto(view[got:])
                        if not n:
                            raise EOFError(f"data end at frame {t0} of {self.n_frames}")
                        got += n
                    block = np.frombuffer(view, raw_dtype).reshape(k, n_vox)
                    if not direct:
                        block = block.astype(np.float32)
                        if scaled:
                            block *= np.float32(self._slope)
                            block += np.float32(self._inter)
                    yield t0, block
                while fobj.read(1 << 20):  # reach the gzip trailer so its CRC is checked
                    pass
        except (EOFError, OSError, zlib.error, ValueError) as exc:
            raise BadDataError(f"{self.name}: {self._damage()} ({one_line(exc)})") from exc


def model_grid_matrix(source: BoldSource, geometry, mask_img, space: str
                      ) -> tuple[np.ndarray, dict]:
    """The source's template-brain voxels on the model grid, float32 (T, V).

    Columns are the template-brain token voxels in ascending grid order
    (:func:`brain_voxels`), so each frame is gathered front to back. A source on the model
    grid is gathered frame by frame; a source on another grid of the same space (another
    resolution) is resampled frame by frame (cubic spline at the brain voxels). A grid
    whose field of view misses over 10% of the template brain is refused.
    """
    brain_flat, _ = brain_voxels(geometry)
    n_frames = source.n_frames
    out = np.empty((n_frames, brain_flat.size), np.float32)
    zooms = np.sqrt((source.affine[:3, :3] ** 2).sum(axis=0))
    info = {"source_grid": list(source.shape[:3]), "source_zooms": [float(z) for z in zooms]}
    if source.on_grid(geometry.grid_shape, geometry.affine):
        for t0, block in source.iter_frames(1):
            np.take(block, brain_flat, axis=1, out=out[t0:t0 + block.shape[0]])
        return out, dict(info, resampled=False)
    coverage = _brain_coverage(source, geometry, brain_flat)
    if coverage < 0.9:
        raise BadDataError(
            f"{source.name}: grid {source.shape[:3]} {_fmt_zooms(source.affine)} covers "
            f"{coverage:.0%} of the {space} template brain; its affine is not in the "
            f"{space} field of view")
    from scipy import ndimage

    # Cubic-spline interpolation (nilearn's "continuous") evaluated only at the template
    # brain voxels rather than over the whole model grid: the same values as
    # nilearn.image.resample_to_img there, several times faster per frame.
    to_source = np.linalg.inv(source.affine) @ geometry.affine
    ijk = np.vstack(np.unravel_index(brain_flat, geometry.grid_shape, order="F"))
    coords = to_source[:3, :3] @ ijk + to_source[:3, 3:4]  # (3, V) source voxel coords
    # Source voxels whose centre lies in the template brain: where NaN/inf is bad data
    # (elsewhere it is zeroed so it cannot spread through the spline filter).
    to_model = np.linalg.inv(to_source)
    footprint = ndimage.affine_transform(
        mask_img.get_fdata(dtype=np.float32) > 0, to_model[:3, :3], to_model[:3, 3],
        output_shape=source.shape[:3], order=0).reshape(-1, order="F")
    bad_voxels = np.zeros(footprint.shape, bool)
    frame_shape = source.shape[:3]
    for t0, block in source.iter_frames(1):
        frame = block[0]
        bad = ~np.isfinite(frame)
        if bad.any():
            bad_voxels |= bad & footprint
            frame = np.where(bad, np.float32(0), frame)
        ndimage.map_coordinates(frame.reshape(frame_shape, order="F"), coords, out[t0],
                                order=3, mode="constant", cval=0.0, prefilter=True)
    if bad_voxels.any():
        raise BadDataError(f"{source.name}: non-finite values (NaN/inf) in "
                           f"{int(bad_voxels.sum())} voxels inside the template brain")
    return out, dict(info, resampled=True, brain_coverage=round(float(coverage), 4))


def _brain_coverage(source: BoldSource, geometry, brain_flat: np.ndarray) -> float:
    """Share of template-brain voxel centres inside the source image's field of view.

    Parameters
    ----------
    source : BoldSource
        The BOLD image.
    geometry : TokenGeometry
        Model grid (shape and affine).
    brain_flat : numpy.ndarray
        Flat (Fortran-order) model-grid indices of the template-brain voxels.

    Returns
    -------
    float
        Fraction in [0, 1].
    """
    ijk = np.column_stack(np.unravel_index(brain_flat, geometry.grid_shape, order="F"))
    world = ijk @ geometry.affine[:3, :3].T + geometry.affine[:3, 3]
    inv = np.linalg.inv(source.affine)
    src = world @ inv[:3, :3].T + inv[:3, 3]
    inside = np.all((src > -0.5) & (src < np.asarray(source.shape[:3]) - 0.5), axis=1)
    return float(inside.mean())


def template_space(template_img, space: Optional[str]) -> str:
    """The template space name: ``space``, else the template's, else its file name's.

    Parameters
    ----------
    template_img : nibabel image or Template
        Template brain mask (a ``Template`` carries ``space``).
    space : str, optional
        Explicit space name; wins when given.

    Returns
    -------
    str
        ``space``, ``template_img.space``, the ``tpl-<space>`` of its file name, or
        :data:`bids_roimae.config.DEFAULT_SPACE`.
    """
    if space:
        return space
    if getattr(template_img, "space", None):
        return str(template_img.space)
    get_filename = getattr(template_img, "get_filename", None)
    found = re.match(r"tpl-([A-Za-z0-9]+)", Path(get_filename() or "").name) \
        if get_filename else None
    return found.group(1) if found else DEFAULT_SPACE


def check_template_grid(geometry, mask_img) -> None:
    """Check that the template mask lies on the geometry's grid.

    Parameters
    ----------
    geometry : TokenGeometry
        Model grid (shape and affine).
    mask_img : nibabel image
        Template brain mask.

    Raises
    ------
    ValueError
        Shape or affine differ (a programming error, not bad data).
    """
    shape = tuple(mask_img.shape[:3])
    if shape != tuple(geometry.grid_shape) or not np.allclose(mask_img.affine,
                                                              geometry.affine, atol=1e-3):
        differs = grid_difference(shape, mask_img.affine, geometry.grid_shape,
                                  geometry.affine)
        raise ValueError(f"template image grid does not match the geometry's grid: {differs}")


def outside_run_mask(run, source: BoldSource, geometry, mask_img) -> Optional[np.ndarray]:
    """Template-brain voxels outside the run's own brain mask.

    Parameters
    ----------
    run : BoldRun
        The run; ``mask_path`` ``None`` means no own mask.
    source : BoldSource
        The run's BOLD image (the mask must share its grid).
    geometry : TokenGeometry
        Model grid and token voxels.
    mask_img : nibabel image
        Template brain mask on the model grid (target of resampling).

    Returns
    -------
    numpy.ndarray or None
        bool ``(V,)`` over the template-brain token voxels, or ``None`` without a mask.

    Raises
    ------
    BadDataError
        Unreadable mask, or a grid other than the BOLD's.
    """
    if run.mask_path is None:
        return None
    mask_name = Path(run.mask_path).name
    try:
        run_mask = nib.load(run.mask_path)
        data = np.asanyarray(run_mask.dataobj)
    except Exception as exc:  # noqa: BLE001 - any reader failure is bad data
        raise BadDataError(f"{mask_name}: brain mask cannot be read "
                           f"({one_line(exc)})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.shape[:3] != source.shape[:3] or data.ndim != 3 or \
            not np.allclose(run_mask.affine, source.affine, atol=1e-3):
        differs = grid_difference(data.shape, run_mask.affine, source.shape[:3], source.affine)
        raise BadDataError(f"{Path(run.path).name}: its brain mask {mask_name} is on another "
                           f"grid than the BOLD: {differs}")
    data = (data > 0).astype(np.float32)
    if not source.on_grid(geometry.grid_shape, geometry.affine):
        from nilearn.image import resample_to_img

        resampled = resample_to_img(nib.Nifti1Image(data, source.affine), mask_img,
                                    interpolation="nearest", force_resample=True,
                                    copy_header=True)
        data = np.asanyarray(resampled.dataobj)
    flat = data.reshape(-1, order="F")
    return flat[brain_voxels(geometry)[0]] <= 0.5


def grid_difference(shape_a, affine_a, shape_b, affine_b, atol: float = 1e-3) -> str:
    """What differs between two voxel grids, in words: shape, voxel size, origin, axes.

    Only the parts that differ are named, so two grids that differ only in their origin
    do not print as two identical descriptions.
    """
    a, b = np.asarray(affine_a, float), np.asarray(affine_b, float)
    parts = []
    if tuple(shape_a) != tuple(shape_b):
        parts.append(f"shape {tuple(int(n) for n in shape_a)} vs "
                     f"{tuple(int(n) for n in shape_b)}")
    zooms_a, zooms_b = (np.sqrt((m[:3, :3] ** 2).sum(axis=0)) for m in (a, b))
    if not np.allclose(zooms_a, zooms_b, atol=atol):
        parts.append(f"voxel size {_fmt_zooms(a)} vs {_fmt_zooms(b)}")
    if not np.allclose(a[:3, :3] / zooms_a, b[:3, :3] / zooms_b, atol=atol):
        parts.append(f"axes {''.join(nib.aff2axcodes(a))} vs {''.join(nib.aff2axcodes(b))}")
    if not np.allclose(a[:3, 3], b[:3, 3], atol=atol):
        parts.append(f"origin ({', '.join(f'{v:g}' for v in a[:3, 3])}) mm vs "
                     f"({', '.join(f'{v:g}' for v in b[:3, 3])}) mm")
    return "; ".join(parts) or "affines differ"


def _fmt_zooms(affine) -> str:
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return "(" + "x".join(f"{z:g}" for z in zooms) + " mm)"
