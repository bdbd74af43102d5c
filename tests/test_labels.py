"""Labels from participants.tsv with the quirks of real phenotypic tables (ADHD-200)."""

import io
from types import SimpleNamespace

import pandas as pd
import pytest

from bids_roimae.analysis.labels import (
    align_labels,
    find_column,
    normalise_value,
    parse_groups,
    parse_labels,
)
from bids_roimae.errors import BadDataError, MissingInputError, UsageError

# Shaped like an ADHD-200 site table written out as participants.tsv: codes stored as
# text with stray spaces and decimals, several spellings of "missing", and a header with
# a trailing space ("Secondary Dx ").
ADHD_TSV = (
    "participant_id\tSite\tAge\tDX\tSecondary Dx \tFull2 IQ\n"
    "sub-0010001\t5\t7.29\t0\t \tN/A\n"
    "sub-0010002\t5\t8.29\t3\tODD\t-999\n"
    "sub-0010003\t5\t8.78\t 1\t \t101\n"
    "sub-0010004\t1\t8.04\t1.0\tLD\t99\n"
    "sub-0010005\t1\t12.44\t2\t \t-999\n"
    "sub-0010006\t1\tn/a\tpending\t \t110\n"
    "sub-0010007\t3\t10.1\tN/A\t \t\n"
    "sub-0010008\t3\t9.5\t-999\t \tn/a\n"
    "sub-0010009\t3\t11.0\t\t \t120\n"
    "sub-0010010\tn/a\t13.2\t0 \t \t95\n"
    "sub-0010011\t7\t14.0\t0\t \t97\n"
)


def adhd_table() -> pd.DataFrame:
    """The table as read by the app: text everywhere, index = label without sub-."""
    table = pd.read_csv(io.StringIO(ADHD_TSV), sep="\t", dtype=str, keep_default_na=False)
    table.index = pd.Index(table["participant_id"].str.removeprefix("sub-"),
                           name="participant")
    return table


def test_normalise_value_treats_numeric_strings_as_numbers():
    assert normalise_value(" 1") == normalise_value("1.0") == normalise_value(1) == "1"
    assert normalise_value("2.50") == "2.5"
    assert normalise_value(" ADHD ") == "ADHD"
    for missing in ("", " ", "n/a", "N/A", "NaN", "pending", "-999", "-999.0", None):
        assert normalise_value(missing) is None, missing
    assert normalise_value("-9") == "-9"  # a genuine negative code is kept


def test_column_lookup_ignores_case_and_surrounding_spaces():
    table = adhd_table()
    assert find_column(table.columns, "dx") == "DX"
    assert find_column(table.columns, " secondary dx") == "Secondary Dx "
    with pytest.raises(UsageError) as err:
        find_column(table.columns, "diagnosis")
    assert err.value.exit_code == 64
    assert "'DX'" in str(err.value) and "'Secondary Dx'" in str(err.value)
    assert "\n" not in str(err.value)


def test_binary_with_positive_codes_counts_each_missing_spelling():
    labels, info = parse_labels(adhd_table(), "dx", positive=["1", "2", "3"])
    assert labels.to_dict() == {"0010001": 0, "0010002": 1, "0010003": 1, "0010004": 1,
                                "0010005": 1, "0010010": 0, "0010011": 0}
    assert info["excluded"] == {"missing:-999": 1, "missing:empty": 1, "missing:n/a": 1,
                                "missing:pending": 1}
    assert info["positive"] == ["1", "2", "3"] and info["negative"] == ["0"]
    assert info["class_counts"] == {"negative": 3, "positive": 4}
    assert info["n_rows"] == 11 and info["n_kept"] == 7
    assert labels.attrs["target"] == "DX" and labels.attrs["task_type"] == "binary"


def test_positive_given_as_numbers_or_decimals_matches_text_codes():
    as_numbers, _ = parse_labels(adhd_table(), "DX", positive=[1, 2.0, " 3"])
    as_text, _ = parse_labels(adhd_table(), "DX", positive=["1", "2", "3"])
    pd.testing.assert_series_equal(as_numbers, as_text)


def test_binary_without_positive_uses_larger_of_two_numeric_codes():
    table = adhd_table()
    table["DX"] = ["0", "1", "1", " 0", "1.0", "n/a", "0", "1", "", "0", "1"]
    labels, info = parse_labels(table, "dx")
    assert info["positive"] == ["1"] and info["negative"] == ["0"]
    assert labels["0010005"] == 1 and labels["0010004"] == 0
    assert info["excluded"] == {"missing:empty": 1, "missing:n/a": 1}


def test_binary_direction_is_never_guessed():
    with pytest.raises(UsageError, match="--positive"):
        parse_labels(adhd_table(), "dx")  # four codes
    table = adhd_table()
    table["DX"] = ["ADHD", "TDC"] * 5 + ["TDC"]
    with pytest.raises(UsageError, match="--positive"):
        parse_labels(table, "dx")  # two text codes: which one is the case?
    labels, info = parse_labels(table, "dx", positive=["ADHD"])
    assert int(labels.sum()) == 5 and info["negative"] == ["TDC"]


def test_multiclass_orders_codes_numerically():
    labels, info = parse_labels(adhd_table(), "DX", task_type="multiclass")
    assert info["classes"] == ["0", "1", "2", "3"]
    assert labels["0010002"] == 3 and labels["0010004"] == 1
    assert info["class_counts"] == {"0": 3, "1": 2, "2": 1, "3": 1}
    with pytest.raises(UsageError):
        parse_labels(adhd_table(), "DX", positive=["1"], task_type="multiclass")


def test_regression_keeps_numbers_and_counts_the_rest():
    labels, info = parse_labels(adhd_table(), "full2 iq", task_type="regression")
    assert labels.dtype == float
    assert labels.to_dict() == {"0010003": 101.0, "0010004": 99.0, "0010006": 110.0,
                                "0010009": 120.0, "0010010": 95.0, "0010011": 97.0}
    assert info["excluded"] == {"missing:-999": 2, "missing:empty": 1, "missing:n/a": 2}
    table = adhd_table()
    table["Age"] = ["7", "old"] + ["7"] * 9
    with pytest.raises(BadDataError) as err:
        parse_labels(table, "age", task_type="regression")
    assert err.value.exit_code == 65


def test_one_class_left_is_bad_data():
    with pytest.raises(BadDataError) as err:
        parse_labels(adhd_table(), "DX", positive=["7"])
    assert err.value.exit_code == 65
    with pytest.raises(UsageError):
        parse_labels(adhd_table(), "DX", positive=["1"], task_type="ordinal")


def test_participant_id_column_or_index():
    table = adhd_table().reset_index(drop=True)  # labels only in participant_id
    labels, _ = parse_labels(table, "DX", positive=["1", "2", "3"])
    assert "0010002" in labels.index and not any(s.startswith("sub-") for s in labels.index)


def test_groups_drop_missing_sites():
    groups, info = parse_groups(adhd_table(), " site ")
    assert groups["0010004"] == "1" and "0010010" not in groups.index
    assert info["excluded"] == {"missing:n/a": 1} and info["n_groups"] == 4


def _entries(*subjects):
    return [SimpleNamespace(subject=s, run_key=f"sub-{s}_task-rest") for s in subjects]


def test_align_keeps_subjects_with_runs_and_counts_the_others(caplog):
    labels, _ = parse_labels(adhd_table(), "DX", positive=["1", "2", "3"])
    entries = _entries("0010001", "0010001", "0010002", "0010003", "0099999")
    kept, kept_entries, _, info = align_labels(labels, entries)
    assert list(kept.index) == ["0010001", "0010002", "0010003"]
    assert [e.subject for e in kept_entries] == ["0010001", "0010001", "0010002", "0010003"]
    assert info["counts"]["labelled_without_runs"] == 4
    assert info["runs_without_label"] == ["0099999"]
    assert kept.attrs["target"] == "DX"
    assert "have no prepared run" in caplog.text


def test_align_errors_when_nothing_or_one_class_remains():
    labels, _ = parse_labels(adhd_table(), "DX", positive=["1", "2", "3"])
    with pytest.raises(MissingInputError) as err:
        align_labels(labels, _entries("0099999"))
    assert err.value.exit_code == 66
    with pytest.raises(BadDataError):
        align_labels(labels, _entries("0010002", "0010003"))  # both positive
