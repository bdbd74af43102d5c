"""Typed settings for every stage, loaded from a TOML file and command-line overrides.

One dataclass per concern; ``AppConfig`` groups them. Configuration is passed down
explicitly (no module globals). A TOML file mirrors the sections::

    [geometry]
    patch_size = 6
    [model]
    preset = "small"
    [train]
    steps = 2000
    [attribution]
    windows = 4
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


#: Template space of the model grid unless ``--space`` says otherwise.
DEFAULT_SPACE = "MNI152NLin2009cAsym"
#: TemplateFlow resolution index of the model grid (2 mm).
MODEL_RESOLUTION = 2
#: The modes each analysis level runs (BIDS-Apps: participant and group), the first one
#: being the level's default.
LEVEL_MODES = {"participant": ("prepare", "finetune", "predict", "embed"),
               "group": ("pretrain", "report")}


class ConfigError(ValueError):
    """A setting is unknown or out of range (a usage error, exit code 64)."""


def choices(section: type, name: str) -> tuple:
    """The values a ``Literal`` setting allows, e.g. ``choices(PrepConfig, "normalize")``."""
    hint = typing.get_type_hints(section)[name]
    if typing.get_origin(hint) is not Literal:
        raise TypeError(f"{section.__name__}.{name} is not a choice")
    return typing.get_args(hint)


def default(section: type, name: str) -> Any:
    """The default value of a setting, e.g. ``default(GeometryConfig, "patch_size")``."""
    for f in fields(section):
        if f.name == name:
            return f.default_factory() if f.default is MISSING else f.default
    raise KeyError(f"{section.__name__} has no setting {name!r}")


def _check_choices(section) -> None:
    """Every ``Literal`` setting of ``section`` holds one of its values."""
    prefix = {"GeometryConfig": "geometry", "PrepConfig": "prep", "MaskingConfig": "masking",
              "ModelConfig": "model", "TrainConfig": "train", "FinetuneConfig": "finetune",
              "AttributionConfig": "attribution"}[type(section).__name__]
    for f in fields(section):
        hint = typing.get_type_hints(type(section))[f.name]
        if typing.get_origin(hint) is Literal:
            allowed = typing.get_args(hint)
            if getattr(section, f.name) not in allowed:
                raise ConfigError(f"{prefix}.{f.name} must be "
                                  f"{', '.join(map(str, allowed[:-1]))} or {allowed[-1]}")


@dataclass
class GeometryConfig:
    """How a 4D BOLD window is cut into brain tokens.

    A token is ``patch_size**3`` voxels x ``temporal_patch`` frames; a window is
    ``window`` frames. ``roi_assign`` decides how patches become tokens and tokens regions:
    ``exact`` splits a patch holding several atlas regions into one token per region
    piece, so regions are voxel-exact everywhere; ``majority``, ``any`` and ``pure`` keep
    one token per patch (see :mod:`bids_roimae.core.geometry`).
    ``min_brain_fraction`` drops patches whose brain share is below it (0 keeps every
    patch that touches the brain).
    """

    patch_size: int = 6
    window: int = 20
    temporal_patch: int = 4
    roi_assign: Literal["exact", "majority", "any", "pure"] = "exact"
    min_brain_fraction: float = 0.0

    def validate(self) -> None:
        _check_choices(self)
        if self.patch_size < 1:
            raise ConfigError("geometry.patch_size must be >= 1")
        if self.temporal_patch < 1 or self.window < 1:
            raise ConfigError("geometry.window and geometry.temporal_patch must be >= 1")
        if self.window % self.temporal_patch:
            raise ConfigError(
                f"geometry.window ({self.window}) must be a multiple of "
                f"geometry.temporal_patch ({self.temporal_patch})"
            )
        if not 0.0 <= self.min_brain_fraction < 1.0:
            raise ConfigError("geometry.min_brain_fraction must be in [0, 1)")


@dataclass
class PrepConfig:
    """Per-run preprocessing before tokenisation (part of the cache key)."""

    confounds: Literal["none", "simple", "scrubbing"] = "none"
    target_tr: Optional[float] = None
    dtype: Literal["float16", "int8"] = "float16"
    # "global": percent signal change per voxel, one scale per run, so a region that
    # fluctuates twice as much stays twice as large (amplitude is signal, e.g. ALFF).
    # "voxel": z-score every voxel over time (every voxel unit variance).
    normalize: Literal["global", "voxel"] = "global"

    def validate(self) -> None:
        _check_choices(self)
        if self.target_tr is not None and self.target_tr <= 0:
            raise ConfigError("prep.target_tr must be positive")


@dataclass
class MaskingConfig:
    """Which tokens are hidden from the encoder during pretraining."""

    strategy: Literal["roi", "random"] = "roi"
    ratio: float = 0.5
    region_weighting: Literal["uniform", "size"] = "uniform"
    per_chunk: bool = False
    # "exact": ROI masks hide exactly as many tokens as random masking (the last drawn
    # region partly), so batches need no padding; "whole": whole regions only, within one
    # region of the target (padded batches). See bids_roimae.core.masking.
    roi_count: Literal["exact", "whole"] = "exact"

    def validate(self) -> None:
        _check_choices(self)
        if not 0.0 < self.ratio < 1.0:
            raise ConfigError("masking.ratio must be in (0, 1)")


@dataclass
class ModelConfig:
    """Transformer sizes. ``preset`` fills the sizes left at ``None``."""

    preset: Literal["tiny", "small", "base"] = "tiny"
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    decoder_dim: Optional[int] = None
    decoder_depth: Optional[int] = None
    decoder_heads: Optional[int] = None
    mlp_ratio: float = 4.0
    attention: Literal["divided", "joint"] = "divided"
    norm_target: bool = False
    dropout: float = 0.0

    def validate(self) -> None:
        _check_choices(self)


@dataclass
class TrainConfig:
    """Optimisation of the masked autoencoder (pretraining)."""

    steps: int = 200
    epochs: Optional[float] = None
    batch_size: int = 8
    # Peak learning rate; None takes the preset's (training.schedule.PRESET_PEAK_LR).
    lr: Optional[float] = None
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_steps: int = 20
    grad_clip: float = 1.0
    checkpoint_every: int = 100
    log_every: int = 10
    val_fraction: float = 0.1
    val_batches: int = 4
    compile: bool = False
    num_workers: int = 0
    gpu_resident: Literal["auto", "always", "never"] = "auto"

    def validate(self) -> None:
        _check_choices(self)
        if self.steps < 1 and not self.epochs:
            raise ConfigError("train.steps must be >= 1")
        if self.batch_size < 1:
            raise ConfigError("train.batch_size must be >= 1")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError("train.lr must be > 0")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError("train.val_fraction must be in [0, 1)")


@dataclass
class FinetuneConfig:
    """Supervised fine-tuning and its cross-validation."""

    strategy: Literal["linear-probe", "head", "full"] = "linear-probe"
    task_type: Literal["binary", "multiclass", "regression"] = "binary"
    folds: int = 5
    # 5 x 5 = 25 splits: enough for the corrected resampled t-test to have power on a few
    # dozen subjects, cheap with a frozen encoder (embeddings are computed once).
    cv_repeats: int = 5
    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-3
    encoder_lr: float = 1e-5
    weight_decay: float = 0.01
    windows_per_run: int = 8
    head: Literal["linear", "mlp"] = "linear"
    # How a window's encoder tokens become features (bids_roimae.model.readout): the mean
    # of all tokens, tokens pooled per atlas region with voxel weights, that plus the
    # regions' across-time correlation, or the across-time SD of the region-pooled tokens
    # before the encoder's final norm. region-sd is the default: it was at or above region
    # on every generated dataset measured, clearly so where the task is hard (README, "Does
    # the foundation model beat a connectome?"): the planted differences are in how regions
    # fluctuate, which a time average of normed tokens does not carry.
    readout: Literal["mean", "region", "region-cov", "region-sd"] = "region-sd"
    # The classical arm cross-validated on the same folds: a connectome of voxel-exact
    # region means from the token cache plus each region's SD, what a user would build
    # instead; or those region SDs alone, the stronger classical model when groups differ
    # in fluctuation (README, "Does the foundation model beat a connectome?"); or none.
    baseline: Literal["connectome", "region-sd", "none"] = "connectome"
    connectivity: Literal["correlation", "tangent"] = "correlation"

    def validate(self) -> None:
        _check_choices(self)
        if self.folds < 2:
            raise ConfigError("finetune.folds must be >= 2")
        if self.cv_repeats < 1:
            raise ConfigError("finetune.cv_repeats must be >= 1")


@dataclass
class AttributionConfig:
    """Integrated Gradients and region fidelity in ``participant --mode predict``.

    IG integrates with Gauss-Legendre points, starting at ``min_steps`` and doubling up to
    ``steps`` until every window's completeness error is under 5%; each window-step is a
    forward and backward pass, so ``windows`` (per run) bounds the cost; ``batch_size``
    window-steps share a pass (0: as many as free memory allows). Fidelity hides one region
    per (window, region) pair; ``fidelity_batch`` pairs share a forward pass (0: as many
    as free memory allows).
    """

    steps: int = 32
    min_steps: int = 4
    windows: int = 4
    fidelity_windows: int = 4
    baseline: Literal["zeros", "mean"] = "zeros"
    batch_size: int = 0
    fidelity_batch: int = 0

    def validate(self) -> None:
        _check_choices(self)
        if self.steps < 2 or self.min_steps < 2:
            raise ConfigError("attribution.steps and attribution.min_steps must be >= 2")
        if self.windows < 1 or self.fidelity_windows < 1:
            raise ConfigError("attribution.windows and fidelity_windows must be >= 1")
        if self.batch_size < 0 or self.fidelity_batch < 0:
            raise ConfigError("attribution.batch_size and fidelity_batch must be >= 0 "
                              "(0: sized from free memory)")


@dataclass
class AppConfig:
    """Every stage's settings, as passed down from the CLI."""

    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    prep: PrepConfig = field(default_factory=PrepConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    seed: int = 0

    def validate(self) -> "AppConfig":
        for section in (self.geometry, self.prep, self.masking, self.model, self.train,
                        self.finetune, self.attribution):
            section.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AppConfig":
        cfg = cls()
        apply_overrides(cfg, data, origin="dict")
        return cfg


def apply_overrides(cfg: AppConfig, data: dict[str, Any], origin: str = "config") -> AppConfig:
    """Set values from a nested mapping ``{section: {key: value}}`` on ``cfg``.

    Unknown sections or keys raise :class:`ConfigError` naming ``origin``, so a typo in a
    TOML file is never silently ignored. ``None`` values are skipped (a CLI option that
    was not given).
    """
    for section, values in data.items():
        if section == "seed":
            if values is not None:
                cfg.seed = int(values)
            continue
        if not hasattr(cfg, section) or not dataclasses.is_dataclass(getattr(cfg, section)):
            raise ConfigError(f"{origin}: unknown section [{section}]")
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: [{section}] must be a table")
        target = getattr(cfg, section)
        known = {f.name: f for f in fields(target)}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(
                    f"{origin}: unknown setting {section}.{key} "
                    f"(known: {', '.join(sorted(known))})"
                )
            if value is None:
                continue
            setattr(target, key, _coerce(getattr(target, key), value, f"{section}.{key}"))
    return cfg


def _coerce(current: Any, value: Any, name: str) -> Any:
    if isinstance(current, bool) or isinstance(value, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false")
        return value
    if isinstance(current, int) and not isinstance(current, bool):
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{name} must be an integer")
        try:
            return int(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{name} must be an integer") from exc
    if isinstance(current, float):
        try:
            return float(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{name} must be a number") from exc
    return value


def load_config(path: Optional[Path] = None, overrides: Optional[dict[str, Any]] = None
                ) -> AppConfig:
    """Build the configuration: defaults, then the TOML file, then CLI overrides."""
    cfg = AppConfig()
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"--config {path}: file not found") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"--config {path}: not valid TOML ({exc})") from exc
        apply_overrides(cfg, data, origin=str(path))
    if overrides:
        apply_overrides(cfg, overrides, origin="command line")
    return cfg.validate()
