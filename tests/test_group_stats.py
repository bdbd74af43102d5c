"""Group statistics with covariates and the randomised-model check, on hand-built tables."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bids_roimae.analysis.group_stats import (
    adjusted_group_difference,
    complete_covariates,
    group_difference,
    randomisation_check,
)


def stacked(per_subject: dict) -> pd.DataFrame:
    """Run tables from ``{subject: {region index: value}}`` (one run per subject)."""
    rows = [{"subject": s, "run_key": f"sub-{s}_run-1", "index": r, "name": f"R{r}",
             "system": "sys", "value": v}
            for s, regions in per_subject.items() for r, v in regions.items()]
    return pd.DataFrame(rows)


def test_without_covariates_the_linear_model_is_students_t():
    rng = np.random.default_rng(0)
    subjects = [f"{i:02d}" for i in range(13)]
    groups = pd.Series(pd.Categorical(["ctl" if i < 6 else "adhd" for i in range(13)],
                                      categories=["ctl", "adhd"]), index=subjects)
    values = {s: {1: rng.normal() + (g == "adhd"), 2: rng.normal()}
              for s, g in groups.items()}
    table = adjusted_group_difference(stacked(values), "value", groups,
                                      pd.DataFrame({"c": 1.0}, index=subjects))
    row = table.set_index("index").loc[1]
    a = [values[s][1] for s in subjects if groups[s] == "adhd"]
    b = [values[s][1] for s in subjects if groups[s] == "ctl"]
    student = stats.ttest_ind(a, b)  # a constant covariate drops out of the model
    assert row["statistic"] == pytest.approx(student.statistic)
    assert row["p"] == pytest.approx(student.pvalue)
    assert row["df"] == 11
    assert row["partial_eta2"] == pytest.approx(student.statistic ** 2
                                                / (student.statistic ** 2 + 11))
    assert row["beta"] == pytest.approx(np.mean(a) - np.mean(b))


def test_a_confounded_difference_disappears_once_adjusted():
    # Patients are older, and the value only follows age: Welch finds a group difference,
    # the model with age does not.
    rng = np.random.default_rng(1)
    n = 40
    subjects = [f"{i:02d}" for i in range(n)]
    patient = np.arange(n) % 2 == 1
    age = rng.normal(10, 1, n) + 3 * patient
    site = np.where(np.arange(n) % 3 == 0, "A", "B")
    groups = pd.Series(pd.Categorical(np.where(patient, "adhd", "ctl"),
                                      categories=["ctl", "adhd"]), index=subjects)
    values = {s: {1: 0.8 * age[i] + rng.normal(scale=0.5), 2: rng.normal() + 2 * patient[i]}
              for i, s in enumerate(subjects)}
    covariates = pd.DataFrame({"age": age, "site": site}, index=subjects)
    plain = group_difference(stacked(values), "value", groups).set_index("index")
    adjusted = adjusted_group_difference(stacked(values), "value", groups,
                                         covariates).set_index("index")
    assert plain.loc[1, "p"] < 1e-4 and adjusted.loc[1, "p"] > 0.05
    assert adjusted.loc[2, "q"] < 0.05 and adjusted.loc[2, "statistic"] > 0  # a real one
    assert adjusted.loc[1, "df"] == n - 4  # intercept, group, age, site B
    assert "adjusted for age, site" in adjusted.loc[1, "test"]


def test_missing_covariates_name_the_subjects():
    covariates = pd.DataFrame({"age": [10, None, 12, 9], "sex": ["F", "M", "", "M"]},
                              index=["01", "02", "03", "04"])
    complete, missing = complete_covariates(covariates, ["01", "02", "03", "04", "05"])
    assert list(complete.index) == ["01", "04"]
    assert missing == ["02", "03", "05"]


def test_randomisation_check_flags_differences_the_random_model_also_shows():
    rng = np.random.default_rng(2)
    subjects = [f"{i:02d}" for i in range(30)]
    patient = np.arange(30) % 2 == 1
    groups = pd.Series(pd.Categorical(np.where(patient, "adhd", "ctl"),
                                      categories=["ctl", "adhd"]), index=subjects)
    # Region 1: patients fluctuate more, so |IG| is larger under any model (amplitude).
    # Region 2: only the trained model attributes more to it in patients.
    # Region 3: nothing. Region 4: the trained model's difference is weak (nominal p
    # only), the randomised one's strong: still amplitude. Region 5: opposite directions.
    real, rand = {}, {}
    for i, s in enumerate(subjects):
        real[s] = {1: rng.normal() + 2 * patient[i], 2: rng.normal() + 2 * patient[i],
                   3: rng.normal(), 4: 0.1 * i + 0.9 * patient[i] + rng.normal(scale=0.05),
                   5: rng.normal() + 2 * patient[i]}
        rand[s] = {1: rng.normal() + 2 * patient[i], 2: rng.normal(), 3: rng.normal(),
                   4: rng.normal() + 3 * patient[i], 5: rng.normal() - 2 * patient[i]}
    check = randomisation_check(group_difference(stacked(real), "value", groups),
                                group_difference(stacked(rand), "value", groups))
    verdict = check.set_index("index")["check"]
    assert verdict[1] == "amplitude" and verdict[2] == "survives" and verdict[3] == "none"
    assert verdict[5] == "survives"
    row = check.set_index("index").loc[4]
    assert row["p"] < 0.05 and verdict[4] == "amplitude"
    assert list(check.columns[:3]) == ["index", "name", "system"]


def test_mean_framewise_displacement_skips_the_first_frame(tmp_path):
    from bids_roimae.io.run_files import mean_framewise_displacement

    path = tmp_path / "sub-01_task-rest_desc-confounds_timeseries.tsv"
    path.write_text("global_signal\tframewise_displacement\n1\tn/a\n2\t0.1\n3\t0.3\n")
    assert mean_framewise_displacement(path) == pytest.approx(0.2)
    (tmp_path / "other.tsv").write_text("global_signal\n1\n")
    assert np.isnan(mean_framewise_displacement(tmp_path / "other.tsv"))
