"""The helpers that replaced duplicated code (issue 26): one OLS, one percentile interval, one
distinct-number-list parser, one CSV-table reader, one table of method and regressor names."""
import math
from pathlib import Path

import numpy as np
import pytest

from bias_begets_bias.cli import InputError, parse_distinct_numbers
from bias_begets_bias.utils import read_csv_table
from statistical_auditing.from_scratch.sampling import METHOD_NAMES, X_VARIANTS
from statistical_auditing.core.stats import ols, percentile_interval

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "results" / "experiment"


def test_ols_by_hand():
    # x = 0..3, y = 0, 1, 1, 2: S_xx = 5, S_xy = 3, S_yy = 2 -> b = 0.6, a = 1 - 0.6 * 1.5 = 0.1,
    # r^2 = 9 / 10.
    assert ols([0, 1, 2, 3], [0, 1, 1, 2]) == pytest.approx((0.6, 0.1, 0.9))
    # A constant y lies on a flat line that explains nothing: r^2 = 0, not 0 / 0.
    assert ols([0, 1, 2], [4, 4, 4]) == (0.0, 4.0, 0.0)


def test_ols_constant_x_has_no_slope():
    assert all(math.isnan(v) for v in ols([2, 2, 2], [0, 1, 2]))


def test_percentile_interval_by_hand():
    # 0, 1, ..., 100: the 5th and 95th percentiles are 5 and 95.
    assert percentile_interval(np.arange(101), 0.90) == pytest.approx((5.0, 95.0))
    # 0..4 at 50%: the 25th percentile sits at position 0.25 * 4 = 1, the 75th at 3.
    assert percentile_interval([4, 0, 3, 1, 2], 0.5) == (1.0, 3.0)


def test_parse_distinct_numbers_keeps_first_occurrences_in_order():
    assert parse_distinct_numbers("3, 1,3,2", "k_list", int) == [3, 1, 2]
    assert parse_distinct_numbers("0.5,1,0.5,1.0", "alphas") == [0.5, 1.0]
    with pytest.raises(InputError, match=r"^--timesteps: .*item 2 is empty"):
        parse_distinct_numbers("1,,2", "timesteps", int)


def test_read_csv_table(tmp_path):
    table = tmp_path / "t.csv"
    assert read_csv_table(table, missing_ok=True) == []
    with pytest.raises(InputError, match="cannot read a CSV table"):
        read_csv_table(table)
    table.write_text("word,n\nnurse,4\n")
    assert read_csv_table(table, ("word", "n")) == [{"word": "nurse", "n": "4"}]
    with pytest.raises(InputError, match=r"t\.csv: expected the columns word, successes \(missing successes\)"):
        read_csv_table(table, ("word", "successes"))
    table.write_text("word,n\nnurse,4,9\n")
    with pytest.raises(InputError, match=r"t\.csv: a row has more cells than the header"):
        read_csv_table(table, missing_ok=True)


def test_method_and_regressor_texts_are_those_the_committed_reports_print():
    # The audit and the pooled report name each regressor differently; both texts must stay what
    # the committed reports hold, or a regenerated report would differ from them.
    audit = (COMMITTED / "runs" / "w2v-jl0" / "audit" / "report.md").read_text()
    pooled = (COMMITTED / "report.md").read_text()
    for texts in X_VARIANTS.values():
        assert f"| {texts.run} |" in audit
        assert f"| {texts.pooled} |" in pooled
    assert f"| {METHOD_NAMES['scoredecomp']} |" in pooled
