"""Group statistics over participants' region tables: rankings and group differences.

Pure functions on the stacked per-run region tables that
:func:`bids_roimae.reports.run_derivatives.read_region_tables` returns (one row per run and
region, with ``subject``, ``index``, ``name``, ``system`` and the value columns); no I/O.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd


def _participant_means(tables: pd.DataFrame, value: str) -> pd.DataFrame:
    """Participants x regions: ``value`` averaged over each participant's runs."""
    return tables.pivot_table(index="subject", columns="index", values=value, aggfunc="mean")


def _region_meta(tables: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in ("name", "system") if c in tables]
    return tables.drop_duplicates("index").set_index("index")[cols]


def region_ranking(tables: pd.DataFrame, value: str) -> pd.DataFrame:
    """Group mean and SD over participants of a per-region value, ranked (1 = largest).

    Parameters
    ----------
    tables : DataFrame
        Stacked run tables (:func:`read_region_tables`).
    value : str
        Column to summarise, e.g. ``mean_abs`` or ``embedding_shift``.
    """
    per = _participant_means(tables, value)
    out = _region_meta(tables).reindex(per.columns)
    out["mean"] = per.mean(axis=0)
    out["sd"] = per.std(axis=0, ddof=1) if len(per) > 1 else 0.0
    out["n_participants"] = per.notna().sum(axis=0)
    out["rank"] = out["mean"].rank(ascending=False, method="min").astype("Int64")
    return out.reset_index().sort_values("rank", na_position="last", ignore_index=True)


def system_ranking(tables: pd.DataFrame, value: str) -> pd.DataFrame:
    """Rank functional systems: per participant the mean over the system's regions, then
    group mean and SD over participants."""
    per = _participant_means(tables, value)
    systems = _region_meta(tables).reindex(per.columns)["system"].fillna("unknown")
    per_system = per.T.groupby(systems.replace("", "unknown").to_numpy()).mean().T
    out = pd.DataFrame({"system": per_system.columns,
                        "mean": per_system.mean(axis=0).to_numpy(),
                        "sd": (per_system.std(axis=0, ddof=1) if len(per) > 1
                               else per_system.mean(axis=0) * 0).to_numpy(),
                        "n_regions": systems.value_counts().reindex(per_system.columns)
                        .to_numpy()})
    out["rank"] = out["mean"].rank(ascending=False, method="min").astype("Int64")
    return out.sort_values("rank", ignore_index=True)


def system_tables(tables: pd.DataFrame, value: str) -> pd.DataFrame:
    """Per run, the mean of ``value`` over each system's regions, laid out as stacked region
    tables whose ``index``, ``name`` and ``system`` are the system, so that the region
    functions (e.g. :func:`group_difference`) compare systems."""
    system = (tables["system"].fillna("unknown").replace("", "unknown")
              if "system" in tables else "unknown")
    keys = [c for c in ("subject", "run_key") if c in tables]
    out = tables.assign(system=system).groupby(keys + ["system"], as_index=False)[value].mean()
    out["index"] = out["system"]
    out["name"] = out["system"]
    return out


def group_difference(tables: pd.DataFrame, value: str, groups: pd.Series
                     ) -> Optional[pd.DataFrame]:
    """Per-region comparison of diagnostic groups.

    Two groups: Welch's t-test and Cohen's d of the second group minus the first (e.g.
    ``dx=1/2/3`` minus ``dx=0``: patients minus controls, positive when higher);
    more groups: one-way ANOVA. Benjamini-Hochberg ``q`` over regions; ``rank`` 1 = the
    smallest p. ``None`` when fewer than two groups have at least two participants.

    Parameters
    ----------
    groups : Series
        Group label per participant (index: label without ``sub-``). A categorical series
        gives the group order (the reference group first); otherwise sorted order.
    """
    from scipy import stats

    per = _participant_means(tables, value)
    order = ([str(c) for c in groups.cat.categories]
             if isinstance(groups.dtype, pd.CategoricalDtype) else None)
    labels = groups.reindex(per.index.astype(str)).dropna().astype(str)
    counts = labels.value_counts()
    enough = set(counts[counts >= 2].index)
    names = [g for g in order if g in enough] if order else sorted(enough)
    if len(names) < 2:
        return None
    samples = [per.loc[labels.index[labels == g]] for g in names]
    out = _region_meta(tables).reindex(per.columns)
    for g, sample in zip(names, samples):
        out[f"mean_{g}"] = sample.mean(axis=0)
        out[f"n_{g}"] = sample.notna().sum(axis=0)
    if len(names) == 2:
        b, a = samples
        test = stats.ttest_ind(a, b, axis=0, equal_var=False, nan_policy="omit")
        pooled = np.sqrt((a.var(axis=0, ddof=1) + b.var(axis=0, ddof=1)) / 2)
        out["statistic"] = np.asarray(test.statistic, float)
        out["cohen_d"] = ((a.mean(axis=0) - b.mean(axis=0)) / pooled.replace(0, np.nan))
        out["test"] = f"Welch t ({names[1]} - {names[0]})"
    else:
        test = stats.f_oneway(*[s.to_numpy() for s in samples], axis=0)
        out["statistic"] = np.asarray(test.statistic, float)
        out["test"] = "one-way ANOVA"
    p = np.asarray(test.pvalue, float)
    out["p"] = p
    q = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = stats.false_discovery_control(p[ok])
    out["q"] = q
    out["rank"] = out["p"].rank(method="min").astype("Int64")
    return out.reset_index().sort_values("rank", na_position="last", ignore_index=True)


__all__ = ["group_difference", "region_ranking", "system_ranking", "system_tables"]
