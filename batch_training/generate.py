"""Deterministic sample transactions in the product's raw format, shaped like the real dataset.

The product replaces a retailer's system whose data we cannot ship, so demos and tests run on
this stand-in. It is calibrated (at ``factor`` 1) to that dataset's figures: 1.2 M raw rows, a
quarter of them without a customer or product id, 6,982 customers, 90.5 k distinct products,
595 k distinct (customer, product) pairs bought 1.52 times on average (sd 1.52, max ~140).
It is also built so that the recommender has something to learn, as on the real data:

- categories have Zipf-like popularity, and products within a category too;
- each customer prefers a few categories (mostly popular ones) and belongs to one of a few taste
  segments that rank the products of every category a little differently (co-purchase structure
  that crosses categories); a tenth of their picks explore the whole catalogue;
- activity per customer is log-normal (heavy-tailed), taken at evenly spaced quantiles so the
  heaviest customers, and with them the extreme statistics, do not swing from seed to seed;
- products a customer picks repeatedly, and a few others, are staples bought again; each
  customer's favourite is rebought in proportion to their activity (the ~140-times pairs).

Scaling rule: ``factor`` multiplies the customers, hence the rows, and the catalogue (at least
three products in each of the 200 categories); per-customer behaviour does not change.
``catalogue_factor`` (default: ``factor``) sizes the catalogue on its own, for the usual case of a
grocer whose range stays put while its customers grow.

Raw format (``transactions.csv`` or ``.parquet``), one row per purchase sorted by event_time:
``transaction_id, customer_id, product_id, quantity, event_time``. Every column is text, as in a
raw export: ids are blank (null) on about 25.7 % of the rows, and ~0.3 % of the rows are
deliberately bad (negative or non-numeric quantity, unparseable event_time) so the cleaning step
has each reason to count. ``products.csv`` holds ``product_id, category, name``.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd

FORMATS = ("csv", "parquet")
TRANSACTION_COLUMNS = ["transaction_id", "customer_id", "product_id", "quantity", "event_time"]
PRODUCT_COLUMNS = ["product_id", "category", "name"]


@dataclass(frozen=True)
class Shape:
    """The generator's calibrated constants (figures at factor 1)."""

    customers: int = 6_982
    categories: int = 200
    catalogue: int = 100_000           # products offered; ~90.8 k of them get bought
    min_products_per_category: int = 3
    category_zipf: float = 0.8         # popularity of the category ranked r: r ** -0.8
    category_size_power: float = 0.6   # popular categories hold more products, less than in proportion
    product_zipf: float = 1.0          # popularity of the product ranked r within its category
    taste_segments: int = 4
    segment_noise: float = 0.7         # how far a segment's ranking strays from the category's
    max_preferred_categories: int = 8  # a customer prefers 1 + Poisson(1) categories, at most this
    explore_share: float = 0.1         # share of picks from the whole catalogue by popularity
    picks_per_customer: float = 140.0  # mean product picks (before merging repeats) per customer
    activity_sigma: float = 1.0        # log-normal spread of picks per customer
    staple_share: float = 0.05         # share of once-picked products that are staples anyway
    staple_rebuys: float = 1.2         # mean extra purchases of a staple beyond its second
    staple_rebuy_shape: float = 0.4    # gamma shape of that mean across staples (lower: wider)
    favourite_rebuys: float = 0.93     # extra purchases of an average customer's favourite ...
    favourite_power: float = 1.5       # ... times (activity / mean activity) ** this
    missing_id_share: float = 1 - 902_792 / 1_215_193
    missing_split: tuple[float, float, float] = (0.85, 0.10, 0.05)  # customer, product, both blank
    bad_row_share: float = 0.003       # split evenly: negative qty, non-numeric qty, bad time
    variant_share: float = 0.12        # product codes with a letter suffix ("P085123A")
    start: str = "2025-01-01T00:00:00"
    days: int = 365


SHAPE = Shape()
NON_NUMERIC_QUANTITIES = np.array(["two", "1O", "n/a", "?"])
UNPARSEABLE_TIMES = np.array(["2025-13-45T25:61:00Z", "2025-02-30T10:00:00Z", "not a date",
                              "31/02/2025 10:00"])
QUANTITY_VALUES = np.array([1, 2, 3, 4, 6, 12, 24])
QUANTITY_WEIGHTS = np.array([0.45, 0.2, 0.1, 0.08, 0.07, 0.07, 0.03])
# Purchases per hour of day (UTC) and per weekday (Monday first), relative.
HOUR_WEIGHTS = np.array([1, 1, 1, 1, 1, 2, 4, 8, 14, 18, 20, 20, 21, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 1],
                        dtype=float)
WEEKDAY_WEIGHTS = np.array([1.0, 1.05, 1.0, 1.1, 0.9, 0.5, 0.7])
CATEGORY_NOUNS = ["Mugs", "Candles", "Lanterns", "Cushions", "Frames", "Clocks", "Bags", "Tins",
                  "Cards", "Wrap", "Ribbons", "Baskets", "Plates", "Bowls", "Glasses", "Jars",
                  "Signs", "Hooks", "Mirrors", "Lamps", "Vases", "Planters", "Throws", "Towels",
                  "Aprons", "Notebooks", "Pens", "Stickers", "Toys", "Puzzles", "Games", "Ornaments",
                  "Garlands", "Bunting", "Doorstops", "Coasters", "Trays", "Boxes", "Bottles", "Cutlery"]
CATEGORY_THEMES = ["Kitchen", "Garden", "Party", "Christmas", "Vintage", "Kids", "Bathroom",
                   "Office", "Travel", "Wedding"]
PRODUCT_ADJECTIVES = ["SMALL", "LARGE", "MINI", "JUMBO", "RETRO", "FOLK", "REGENCY", "HEART",
                      "STAR", "SPOTTY", "STRIPED", "FLORAL", "GLASS", "WOODEN", "ENAMEL", "ZINC"]
PRODUCT_COLOURS = ["WHITE", "RED", "PINK", "BLUE", "GREEN", "IVORY", "BLACK", "GOLD", "SILVER",
                   "PASTEL", "CREAM", "LILAC"]


@dataclass(frozen=True)
class Catalogue:
    """Products grouped by category: product i is in ``category_of[i]``."""

    sizes: np.ndarray        # products per category
    offsets: np.ndarray      # index of each category's first product
    category_of: np.ndarray
    category_p: np.ndarray   # category popularity (sums to 1)
    segment_order: np.ndarray  # [segment, offset + rank] -> product: each segment's ranking


@dataclass(frozen=True)
class Customers:
    preferred: np.ndarray     # [customer, slot] -> category
    slot_cdf: np.ndarray      # [customer, slot] cumulative preference (unused slots at 1)
    picks: np.ndarray         # product picks per customer
    segment: np.ndarray


def generate(factor: float = 1.0, seed: int = 42,
             catalogue_factor: float | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The (transactions, products) frames for ``factor`` times the real dataset's customers and
    ``catalogue_factor`` (default ``factor``) times its catalogue."""
    catalogue_factor = factor if catalogue_factor is None else catalogue_factor
    for name, value in (("factor", factor), ("catalogue factor", catalogue_factor)):
        if not value > 0:
            raise ValueError(f"{name} must be a positive number (1.0 = the real dataset's size), got {value!r}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng(seed)
    catalogue = _catalogue(rng, max(1, round(SHAPE.catalogue * catalogue_factor)))
    customers = _customers(rng, max(1, round(SHAPE.customers * factor)), catalogue)
    pair_customer, pair_product, counts = _purchase_pairs(rng, customers, catalogue)
    product_ids = _product_codes(rng, catalogue.category_of.size)
    customer_ids = _codes(rng, "C", customers.picks.size)
    transactions = _transactions(rng, np.repeat(pair_customer, counts), np.repeat(pair_product, counts),
                                 customer_ids, product_ids)
    return transactions, _products(rng, catalogue, product_ids)


def _catalogue(rng: np.random.Generator, n_products: int) -> Catalogue:
    ranks = np.arange(1, SHAPE.categories + 1, dtype=float)
    category_p = ranks ** -SHAPE.category_zipf
    category_p /= category_p.sum()
    share = category_p ** SHAPE.category_size_power
    sizes = np.maximum(SHAPE.min_products_per_category,
                       np.floor(share / share.sum() * n_products)).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    category_of = np.repeat(np.arange(SHAPE.categories), sizes)
    local_rank = np.arange(category_of.size) - offsets[category_of]
    segment_order = np.empty((SHAPE.taste_segments, category_of.size), dtype=np.int64)
    for segment in range(SHAPE.taste_segments):
        score = -SHAPE.product_zipf * np.log1p(local_rank) + SHAPE.segment_noise * rng.gumbel(size=category_of.size)
        segment_order[segment] = np.lexsort((-score, category_of))
    return Catalogue(sizes, offsets, category_of, category_p, segment_order)


def _customers(rng: np.random.Generator, n: int, catalogue: Catalogue) -> Customers:
    """Preferred categories (popular ones more often), their weights, activity and segment."""
    k_max = min(SHAPE.max_preferred_categories, SHAPE.categories)
    n_preferred = np.minimum(1 + rng.poisson(1.0, n), k_max)
    keys = np.log(catalogue.category_p) + rng.gumbel(size=(n, SHAPE.categories))
    preferred = np.argsort(-keys, axis=1, kind="stable")[:, :k_max]  # weighted sampling without replacement
    weights = rng.gamma(1.0, size=(n, k_max)) * (np.arange(k_max) < n_preferred[:, None])
    slot_cdf = np.cumsum(weights, axis=1) / weights.sum(axis=1, keepdims=True)
    quantiles = (rng.permutation(n) + 0.5) / n
    z = np.vectorize(NormalDist().inv_cdf, otypes=[float])(quantiles)
    sigma = SHAPE.activity_sigma
    picks = np.maximum(1, np.round(SHAPE.picks_per_customer * np.exp(sigma * z - sigma ** 2 / 2))).astype(np.int64)
    segment = rng.integers(0, SHAPE.taste_segments, n)
    return Customers(preferred, slot_cdf, picks, segment)


def _purchase_pairs(rng: np.random.Generator, customers: Customers,
                    catalogue: Catalogue) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (customer, product) pairs with their purchase counts."""
    customer = np.repeat(np.arange(customers.picks.size), customers.picks)
    slot = (rng.random(customer.size)[:, None] > customers.slot_cdf[customer]).sum(axis=1)
    category = customers.preferred[customer, np.minimum(slot, customers.preferred.shape[1] - 1)]
    explore = rng.random(customer.size) < SHAPE.explore_share
    category[explore] = rng.choice(SHAPE.categories, int(explore.sum()), p=catalogue.category_p)
    rank = _zipf_ranks(rng, catalogue.sizes[category])
    product = catalogue.segment_order[customers.segment[customer], catalogue.offsets[category] + rank]

    n_products = catalogue.category_of.size
    pair_key, picked = np.unique(customer * n_products + product, return_counts=True)
    pair_customer, pair_product = pair_key // n_products, pair_key % n_products
    staple = (picked >= 2) | (rng.random(pair_key.size) < SHAPE.staple_share)
    mean_rebuys = SHAPE.staple_rebuys * rng.gamma(SHAPE.staple_rebuy_shape, 1 / SHAPE.staple_rebuy_shape,
                                                  pair_key.size)
    counts = 1 + np.where(staple, 1 + rng.poisson(mean_rebuys), 0)
    favourite = _favourite_pairs(rng, pair_customer, picked)
    activity = customers.picks[pair_customer[favourite]] / SHAPE.picks_per_customer
    counts[favourite] += rng.poisson(SHAPE.favourite_rebuys * activity ** SHAPE.favourite_power)
    return pair_customer, pair_product, counts


def _zipf_ranks(rng: np.random.Generator, sizes: np.ndarray) -> np.ndarray:
    """A 0-based rank per draw, Zipf-distributed over 0..size-1 of that draw's category."""
    cumulative = np.cumsum(np.arange(1, sizes.max() + 1, dtype=float) ** -SHAPE.product_zipf)
    target = rng.random(sizes.size) * cumulative[sizes - 1]
    return np.minimum(np.searchsorted(cumulative, target, side="right"), sizes - 1)


def _favourite_pairs(rng: np.random.Generator, pair_customer: np.ndarray, picked: np.ndarray) -> np.ndarray:
    """Index of each customer's most-picked pair (ties broken at random)."""
    order = np.lexsort((rng.random(picked.size), -picked, pair_customer))
    first = np.r_[True, pair_customer[order][1:] != pair_customer[order][:-1]]
    return order[first]


def _codes(rng: np.random.Generator, prefix: str, n: int) -> np.ndarray:
    """``n`` distinct random codes like ``C004821`` (more digits when 6 do not leave room)."""
    width = max(6, len(str(10 * n)))
    numbers = rng.choice(10 ** width, n, replace=False)
    return np.char.add(prefix, np.char.zfill(numbers.astype(str), width))


def _product_codes(rng: np.random.Generator, n: int) -> np.ndarray:
    """Product codes like ``P085123``; a share are variants of another code plus a letter (``P085123A``)."""
    n_variants = min(round(SHAPE.variant_share * n), n // 2)
    base = _codes(rng, "P", n - n_variants)
    parents = rng.choice(base.size, n_variants, replace=False)
    letters = np.array(list("ABCDEFGHJKLMNPRSTUVW"))[rng.integers(0, 20, n_variants)]
    codes = np.concatenate([base, np.char.add(base[parents], letters)])
    return codes[rng.permutation(n)]


def _transactions(rng: np.random.Generator, customer: np.ndarray, product: np.ndarray,
                  customer_ids: np.ndarray, product_ids: np.ndarray) -> pd.DataFrame:
    """Purchase rows plus rows with blank ids and a few bad rows, sorted by time, all as text."""
    share = SHAPE.missing_id_share
    n_missing = round(customer.size * share / (1 - share))
    copied = rng.integers(0, customer.size, n_missing)
    blank = rng.choice(3, n_missing, p=SHAPE.missing_split)  # 0 customer, 1 product, 2 both
    customer_text = np.concatenate([customer_ids[customer], customer_ids[customer[copied]]]).astype(object)
    product_text = np.concatenate([product_ids[product], product_ids[product[copied]]]).astype(object)
    customer_text[customer.size:][blank != 1] = None
    product_text[customer.size:][blank != 0] = None

    n_rows = customer_text.size
    seconds = _event_seconds(rng, n_rows)
    quantity = rng.choice(QUANTITY_VALUES, n_rows, p=QUANTITY_WEIGHTS).astype(str).astype(object)
    event_time = np.char.add(np.datetime_as_string(np.datetime64(SHAPE.start, "s") + seconds, unit="s"),
                             "Z").astype(object)
    _spoil(rng, quantity, event_time, candidates=np.arange(customer.size))

    order = np.argsort(seconds, kind="stable")
    width = max(8, len(str(n_rows)))
    transaction_id = np.char.add("T", np.char.zfill(np.arange(1, n_rows + 1).astype(str), width)).astype(object)
    return pd.DataFrame({"transaction_id": transaction_id, "customer_id": customer_text[order],
                         "product_id": product_text[order], "quantity": quantity[order],
                         "event_time": event_time[order]}, columns=TRANSACTION_COLUMNS)


def _event_seconds(rng: np.random.Generator, n: int) -> np.ndarray:
    """Seconds since the start: busier on weekdays, in daytime and towards the year's end."""
    day = np.arange(SHAPE.days)
    weekday = (np.datetime64(SHAPE.start, "D").astype(np.int64) + 3 + day) % 7  # 1970-01-01 was a Thursday
    day_weights = WEEKDAY_WEIGHTS[weekday] * (1 + 0.8 * np.clip((day - 270) / 60, 0, 1))
    days = rng.choice(SHAPE.days, n, p=day_weights / day_weights.sum())
    hours = rng.choice(24, n, p=HOUR_WEIGHTS / HOUR_WEIGHTS.sum())
    return days * 86_400 + hours * 3_600 + rng.integers(0, 3_600, n)


def _spoil(rng: np.random.Generator, quantity: np.ndarray, event_time: np.ndarray,
           candidates: np.ndarray) -> None:
    """Make a few rows (with both ids) bad, one reason each, so cleaning can count every reason."""
    n_bad = max(3, round(SHAPE.bad_row_share * quantity.size))
    rows = rng.choice(candidates, min(n_bad, candidates.size), replace=False)
    negative, non_numeric, bad_time = np.array_split(rows, 3)
    quantity[negative] = np.char.add("-", quantity[negative].astype(str))
    quantity[non_numeric] = rng.choice(NON_NUMERIC_QUANTITIES, non_numeric.size)
    event_time[bad_time] = rng.choice(UNPARSEABLE_TIMES, bad_time.size)


def _products(rng: np.random.Generator, catalogue: Catalogue, product_ids: np.ndarray) -> pd.DataFrame:
    """``product_id, category, name`` for every product offered."""
    combos = np.array([f"{theme} {noun}" for theme in CATEGORY_THEMES for noun in CATEGORY_NOUNS])
    category_names = combos[rng.permutation(combos.size)[:SHAPE.categories]]
    nouns = np.char.upper(np.array([name.split(" ", 1)[1] for name in category_names]))
    n = product_ids.size
    names = np.char.add(np.char.add(rng.choice(PRODUCT_ADJECTIVES, n), " "), rng.choice(PRODUCT_COLOURS, n))
    names = np.char.add(np.char.add(names, " "), nouns[catalogue.category_of])
    return pd.DataFrame({"product_id": product_ids.astype(object),
                         "category": category_names[catalogue.category_of].astype(object),
                         "name": names.astype(object)}, columns=PRODUCT_COLUMNS)


def write(out_dir: str | Path, factor: float = 1.0, seed: int = 42, fmt: str = "csv",
          catalogue_factor: float | None = None) -> dict[str, Path]:
    """Generate and write ``transactions.<fmt>`` and ``products.csv`` into ``out_dir``."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not supported: use one of {', '.join(FORMATS)}")
    transactions, products = generate(factor, seed, catalogue_factor)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"transactions": out / f"transactions.{fmt}", "products": out / "products.csv"}
    if fmt == "csv":
        transactions.to_csv(paths["transactions"], index=False, lineterminator="\n")
    else:
        transactions.to_parquet(paths["transactions"], index=False, engine="pyarrow")
    products.to_csv(paths["products"], index=False, lineterminator="\n")
    print(summary(transactions, paths["transactions"]))
    return paths


def summary(transactions: pd.DataFrame, path: Path | None = None) -> str:
    """A few lines on what was generated."""
    complete = transactions["customer_id"].notna() & transactions["product_id"].notna()
    lines = [f"wrote {path}" if path else "generated transactions",
             f"  rows:      {len(transactions):,}",
             f"  customers: {transactions['customer_id'].nunique():,}",
             f"  products:  {transactions['product_id'].nunique():,}",
             f"  rows with a missing id: {1 - complete.mean():.1%}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m batch_training.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder to write transactions.<format> and products.csv to")
    parser.add_argument("--factor", type=float, default=1.0,
                        help="size relative to the real dataset (1.0: 1.2 M rows, 6,982 customers)")
    parser.add_argument("--catalogue-factor", type=float, default=None,
                        help="catalogue size relative to the real dataset's 100 k products (default: --factor)")
    parser.add_argument("--seed", type=int, default=42, help="same seed and factor: byte-identical files")
    parser.add_argument("--format", choices=FORMATS, default="csv", help="format of the transactions file")
    args = parser.parse_args(argv)
    try:
        write(args.out, args.factor, args.seed, args.format, args.catalogue_factor)
    except ValueError as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
