"""The sample-data generator: deterministic, in the raw format, and shaped like the real dataset."""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from batch_training.generate import generate, main, write

# Figures of the real dataset the generator stands in for (at factor 1).
REAL = {
    "raw_rows": 1_215_193,
    "rows_with_ids": 902_792,
    "pairs": 595_226,
    "customers": 6_982,
    "products": 90_542,
    "pair_count_mean": 1.52,
    "pair_count_sd": 1.52,
}
REAL_MAX_PAIR_COUNT = 139
ISO_UTC = "%Y-%m-%dT%H:%M:%SZ"


def _read(path) -> pd.DataFrame:
    """A written transactions file as text, blank fields as missing (what a raw reader sees)."""
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])


def _with_ids(transactions: pd.DataFrame) -> pd.DataFrame:
    return transactions.dropna(subset=["customer_id", "product_id"])


def _statistics(transactions: pd.DataFrame) -> dict[str, float]:
    rows = _with_ids(transactions)
    per_pair = rows.groupby(["customer_id", "product_id"]).size()
    return {
        "raw_rows": len(transactions),
        "rows_with_ids": len(rows),
        "pairs": len(per_pair),
        "customers": rows["customer_id"].nunique(),
        "products": rows["product_id"].nunique(),
        "pair_count_mean": per_pair.mean(),
        "pair_count_sd": per_pair.std(),
        "pair_count_max": per_pair.max(),
    }


@pytest.fixture(scope="module")
def small() -> tuple[pd.DataFrame, pd.DataFrame]:
    return generate(factor=0.05, seed=3)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_same_seed_writes_identical_bytes_and_another_seed_differs(tmp_path, fmt):
    first = write(tmp_path / "a", factor=0.02, seed=5, fmt=fmt)
    again = write(tmp_path / "b", factor=0.02, seed=5, fmt=fmt)
    other = write(tmp_path / "c", factor=0.02, seed=6, fmt=fmt)
    assert first["transactions"].name == f"transactions.{fmt}"
    for name in ("transactions", "products"):
        assert first[name].read_bytes() == again[name].read_bytes(), name
        assert first[name].read_bytes() != other[name].read_bytes(), name


def test_columns_are_raw_text_with_well_formed_ids(small):
    transactions, products = small
    assert list(transactions.columns) == ["transaction_id", "customer_id", "product_id", "quantity", "event_time"]
    assert list(products.columns) == ["product_id", "category", "name"]
    for column in transactions.columns:
        values = transactions[column].dropna()
        assert values.map(type).eq(str).all(), column
    assert transactions["transaction_id"].is_unique
    assert transactions["customer_id"].dropna().str.fullmatch(r"C\d{6}").all()
    product_ids = transactions["product_id"].dropna()
    assert product_ids.str.fullmatch(r"P\d{6}[A-Z]?").all()
    with_letter = product_ids.str.fullmatch(r"P\d{6}[A-Z]").mean()
    assert 0.03 < with_letter < 0.3, with_letter
    assert products["product_id"].is_unique
    assert set(product_ids) <= set(products["product_id"])
    assert 150 <= products["category"].nunique() <= 250
    assert products["name"].str.len().gt(0).all()


def test_rows_are_sorted_by_time_over_a_year(small):
    transactions, _ = small
    times = pd.to_datetime(transactions["event_time"], format=ISO_UTC, errors="coerce")
    valid = times.dropna()
    assert valid.is_monotonic_increasing
    assert valid.min() < pd.Timestamp("2025-01-15") and valid.max() > pd.Timestamp("2025-12-15")
    assert (valid.max() - valid.min()) <= pd.Timedelta(days=366)


def test_a_quarter_of_rows_miss_an_id(small):
    transactions, _ = small
    missing = transactions["customer_id"].isna() | transactions["product_id"].isna()
    assert 0.23 < missing.mean() < 0.28, missing.mean()
    assert transactions["customer_id"].isna().sum() > transactions["product_id"].isna().sum() > 0


def test_bad_rows_of_every_reason_are_present_and_rare(small):
    transactions, _ = small
    rows = _with_ids(transactions)
    quantity = pd.to_numeric(rows["quantity"], errors="coerce")
    non_numeric = quantity.isna()
    negative = quantity < 0
    unparseable_time = pd.to_datetime(rows["event_time"], format=ISO_UTC, errors="coerce").isna()
    for reason, flags in [("non-numeric quantity", non_numeric), ("negative quantity", negative),
                          ("unparseable time", unparseable_time)]:
        assert flags.sum() > 0, reason
    bad_share = (non_numeric | negative | unparseable_time).mean()
    assert 0.001 <= bad_share <= 0.005, bad_share
    assert rows["quantity"].ne("").all()  # a blank quantity means 1 to the cleaning step, not bad
    assert quantity[~non_numeric & ~negative].ge(1).all()


def test_factor_scales_customers_and_rows():
    small_rows, _ = generate(factor=0.1, seed=1)
    large_rows, _ = generate(factor=0.2, seed=1)
    small_stats, large_stats = _statistics(small_rows), _statistics(large_rows)
    assert small_stats["customers"] == round(REAL["customers"] * 0.1)
    assert large_stats["customers"] == round(REAL["customers"] * 0.2)
    assert large_stats["raw_rows"] / small_stats["raw_rows"] == pytest.approx(2.0, rel=0.1)


def test_catalogue_factor_holds_the_catalogue_while_customers_grow(tmp_path):
    """The scale benchmark's fixed-catalogue runs: more customers, the same range of products."""
    main(["--out", str(tmp_path), "--factor", "0.2", "--catalogue-factor", "0.05", "--seed", "3"])
    offered = len(pd.read_csv(tmp_path / "products.csv"))
    assert offered == len(generate(factor=0.05, seed=3)[1]) < 0.5 * len(generate(factor=0.2, seed=3)[1])
    assert _statistics(_read(tmp_path / "transactions.csv"))["customers"] == round(REAL["customers"] * 0.2)


def test_factor_one_matches_the_real_dataset_within_ten_percent():
    started = time.process_time()
    transactions, _ = generate(factor=1.0, seed=42)
    assert time.process_time() - started < 30, "generation at factor 1 must stay well under a minute"
    stats = _statistics(transactions)
    off = {name: f"{stats[name]:,.3f} vs {target:,}" for name, target in REAL.items()
           if not np.isclose(stats[name], target, rtol=0.10, atol=0)}
    assert not off, off
    # The maximum is one extreme pair: only its order of magnitude is held to.
    assert REAL_MAX_PAIR_COUNT / 1.5 <= stats["pair_count_max"] <= REAL_MAX_PAIR_COUNT * 1.5


def test_command_line_writes_parquet_and_prints_a_summary(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--factor", "0.01", "--seed", "9", "--format", "parquet"]) == 0
    transactions = _read(tmp_path / "transactions.parquet")
    assert list(transactions.columns)[:3] == ["transaction_id", "customer_id", "product_id"]
    assert (tmp_path / "products.csv").exists()
    printed = capsys.readouterr().out
    assert f"rows:      {len(transactions):,}" in printed
    assert "rows with a missing id:" in printed


def test_written_csv_keeps_blank_ids_and_text_quantities(tmp_path):
    paths = write(tmp_path, factor=0.01, seed=4, fmt="csv")
    expected, _ = generate(factor=0.01, seed=4)
    pd.testing.assert_frame_equal(_read(paths["transactions"]).fillna("<blank>"), expected.fillna("<blank>"))


@pytest.mark.parametrize("argv, message", [(["--factor", "0"], "factor must be a positive number"),
                                           (["--catalogue-factor", "-1"], "catalogue factor must be a positive"),
                                           (["--seed", "-1"], "seed must be a non-negative integer"),
                                           (["--format", "xlsx"], "invalid choice")])
def test_bad_arguments_are_named(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), *argv])
    assert message in capsys.readouterr().err
