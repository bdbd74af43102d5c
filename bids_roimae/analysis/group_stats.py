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
    out["q"] = _bh(p)
    out["rank"] = out["p"].rank(method="min").astype("Int64")
    return out.reset_index().sort_values("rank", na_position="last", ignore_index=True)


def complete_covariates(covariates: pd.DataFrame, subjects) -> tuple[pd.DataFrame, list[str]]:
    """Covariates of ``subjects`` with a value in every column, and the subjects without.

    Returns
    -------
    complete : DataFrame
        Rows of ``covariates`` for the subjects that have every value.
    missing : list of str
        Subjects left out (absent or with an empty covariate), sorted.
    """
    subjects = [str(s) for s in subjects]
    table = covariates.reindex(subjects)
    empty = table.isna().any(axis=1) | table.apply(
        lambda col: col.astype(str).str.strip().isin(["", "n/a", "nan"])).any(axis=1)
    return table.loc[~empty], sorted(table.index[empty])


def _design(groups: pd.Series, covariates: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """Intercept, the group indicator, numeric covariates as they are and categorical ones
    (site, sex) as indicators with the first level dropped; constant columns removed."""
    columns, names = [np.ones(len(groups))], ["intercept"]
    columns.append(groups.to_numpy(float))
    names.append("group")
    for col in covariates.columns:
        values = pd.to_numeric(covariates[col], errors="coerce")
        if values.notna().all():
            if values.std() > 0:
                columns.append((values - values.mean()).to_numpy(float))
                names.append(col)
            continue
        dummies = pd.get_dummies(covariates[col].astype(str), prefix=col, drop_first=True)
        for d in dummies.columns:
            columns.append(dummies[d].to_numpy(float))
            names.append(d)
    return np.column_stack(columns), names


def adjusted_group_difference(tables: pd.DataFrame, value: str, groups: pd.Series,
                              covariates: pd.DataFrame) -> Optional[pd.DataFrame]:
    """Per-region linear model ``value ~ group + covariates`` over participants.

    The group effect's t (second group minus the first, as :func:`group_difference`),
    two-sided p, Benjamini-Hochberg ``q`` over regions and partial effect sizes
    (``partial_eta2 = t^2 / (t^2 + df)``, ``partial_r`` with the sign of t). Participants
    without a group or a covariate value are left out (use :func:`complete_covariates`
    first to report them). ``None`` with fewer than two groups of two participants, more
    than two groups, or no residual degrees of freedom.

    Parameters
    ----------
    tables : DataFrame
        Stacked run tables.
    value : str
        Column to test.
    groups : Series
        Group label per participant (categorical: reference group first).
    covariates : DataFrame
        Per participant (index: label without ``sub-``): numeric columns enter as they
        are (centred), others as indicators.
    """
    from scipy import stats

    per = _participant_means(tables, value)
    per.index = per.index.astype(str)
    order = ([str(c) for c in groups.cat.categories]
             if isinstance(groups.dtype, pd.CategoricalDtype) else None)
    labels = groups.reindex(per.index).dropna().astype(str)
    labels = labels[labels.index.isin(covariates.index.astype(str))]
    counts = labels.value_counts()
    names = [g for g in (order or sorted(counts.index)) if counts.get(g, 0) >= 2]
    if len(names) != 2:
        return None
    labels = labels[labels.isin(names)]
    indicator = (labels == names[1]).astype(float)
    cov = covariates.copy()
    cov.index = cov.index.astype(str)
    X, _ = _design(indicator, cov.loc[labels.index])
    df = X.shape[0] - np.linalg.matrix_rank(X)
    if df < 1:
        return None
    out = _region_meta(tables).reindex(per.columns)
    for g in names:
        sample = per.loc[labels.index[labels == g]]
        out[f"mean_{g}"] = sample.mean(axis=0)
        out[f"n_{g}"] = sample.notna().sum(axis=0)
    betas, ts, ps, dfs = [], [], [], []
    xtx_inv = np.linalg.pinv(X.T @ X)
    for region in per.columns:
        y = per.loc[labels.index, region].to_numpy(float)
        ok = np.isfinite(y)
        if ok.all():
            Xr, inv, dof = X, xtx_inv, df
        else:
            Xr = X[ok]
            dof = int(ok.sum()) - np.linalg.matrix_rank(Xr)
            inv = np.linalg.pinv(Xr.T @ Xr) if dof >= 1 else None
        if inv is None or dof < 1:
            betas.append(np.nan), ts.append(np.nan), ps.append(np.nan), dfs.append(dof)
            continue
        beta = inv @ Xr.T @ y[ok]
        resid = y[ok] - Xr @ beta
        se = np.sqrt(resid @ resid / dof * inv[1, 1])
        t = beta[1] / se if se > 0 else np.nan
        betas.append(beta[1]), ts.append(t), dfs.append(dof)
        ps.append(2 * stats.t.sf(abs(t), dof) if np.isfinite(t) else np.nan)
    t, p, dof = np.asarray(ts, float), np.asarray(ps, float), np.asarray(dfs, float)
    out["beta"] = betas
    out["statistic"] = t
    out["df"] = dof
    out["partial_eta2"] = t ** 2 / (t ** 2 + dof)
    out["partial_r"] = np.sign(t) * np.sqrt(out["partial_eta2"])
    out["test"] = (f"OLS t of group ({names[1]} - {names[0]}) adjusted for "
                   f"{', '.join(map(str, covariates.columns))}")
    out["p"] = p
    out["q"] = _bh(p)
    out["rank"] = out["p"].rank(method="min").astype("Int64")
    return out.reset_index().sort_values("rank", na_position="last", ignore_index=True)


def _bh(p: np.ndarray) -> np.ndarray:
    from scipy import stats

    q = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = stats.false_discovery_control(p[ok])
    return q


#: The trained model's group difference counts when its q is below this.
CHECK_ALPHA = 0.05


def randomisation_check(real: pd.DataFrame, randomised: pd.DataFrame,
                        alpha: float = CHECK_ALPHA) -> pd.DataFrame:
    """Compare a region's group difference under the trained and a randomised classifier.

    A difference in attribution that a classifier with a *random* head also shows comes
    from the input (e.g. one group's larger fluctuation inflating |IG|) and the
    architecture, not from what the classifier learned (model randomisation check,
    Adebayo et al. 2018).

    Parameters
    ----------
    real, randomised : DataFrame
        :func:`group_difference` (or :func:`adjusted_group_difference`) tables of the same
        measure for the trained and the randomised classifier.
    alpha : float
        Significance level.

    Returns
    -------
    DataFrame
        Per region ``statistic``, ``p``, ``q`` of both and ``check``:

        ``amplitude``
            the trained model's difference is nominal (``p < alpha``, uncorrected) and
            the randomised model shows one in the same direction (``p < alpha``): the
            input explains it, so it is no evidence of what the model learned (the model
            may still use the region; attribution cannot tell);
        ``survives``
            significant for the trained model after correction (``q < alpha``) and not
            reproduced by the randomised one;
        ``randomised only``
            only the randomised model shows a difference;
        ``none``.

        Ordered by the trained model's p. Flagging from uncorrected p is deliberate: a
        region is credited to the model only when the randomised model shows nothing.
    """
    keep = [c for c in ("index", "name", "system") if c in real]
    a = real.set_index("index")
    b = randomised.set_index("index").reindex(a.index)
    out = real[keep].copy().set_index("index")
    out["statistic"] = a["statistic"]
    out["p"], out["q"] = a["p"], a["q"]
    out["random_statistic"] = b["statistic"]
    out["random_p"], out["random_q"] = b["p"], b["q"]
    real_nominal = (a["p"] < alpha).fillna(False)
    real_sig = (a["q"] < alpha).fillna(False)
    same_way = np.sign(a["statistic"]) == np.sign(b["statistic"])
    random_sig = (b["p"] < alpha).fillna(False)
    out["check"] = np.select(
        [real_nominal & random_sig & same_way, real_sig, random_sig],
        ["amplitude", "survives", "randomised only"], "none")
    return out.reset_index().sort_values("p", na_position="last", ignore_index=True)


__all__ = ["adjusted_group_difference", "complete_covariates", "group_difference",
           "randomisation_check", "region_ranking", "system_ranking", "system_tables"]
