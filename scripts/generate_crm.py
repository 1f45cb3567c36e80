"""A realistic synthetic CRM export, seeded and reproducible.

Writes, into OUT_DIR:
- `customers.csv`: one row per customer: PII (e-mail, phone, name), demographics, and the consent
  preferences the customer would give (used by tests and the demo to grant consent);
- `orders.csv`: the CRM's order export, one row per order, with the customer's PII and demographics
  repeated (as CRM exports are): timestamp, amount, channel and the basket's products;
- `mapping.toml`: which column is which (PII fields, attribute categories) for `bridge export`;
- with `--sqlite`, `crm.db` holding the same two tables (a SQLAlchemy-reachable source).

The behaviour follows the models analytics fits, so they have something real to find:
- repeat purchases: each customer buys at a rate drawn from a gamma distribution and, after each
  purchase, stops being a customer with a probability drawn from a beta distribution (the Pareto/NBD
  and BG/NBD story);
- spend: each customer's mean order value is drawn from a gamma distribution and each order's value
  around it from another (the Gamma-Gamma story), so spend varies by customer, not by order alone;
- baskets: products come in themes (breakfast, pasta night, baby, ...) that are bought together;
  each order draws a theme from the customer's own preferences, so co-purchase rules exist.

Usage: python scripts/generate_crm.py OUT_DIR [--rows N] [--seed S] [--sqlite]
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

FIRST = [
    "Olivia", "Amelia", "Isla", "Ava", "Mia", "Ivy", "Lily", "Grace", "Freya", "Emily", "Noah", "Oliver",
    "George", "Arthur", "Leo", "Harry", "Oscar", "Archie", "Henry", "Jack", "Amir", "Zara", "Chen", "Priya",
    "Mateusz", "Sofia", "Lucas", "Aoife", "Siobhan", "Dylan",
]  # fmt: skip
LAST = [
    "Smith", "Jones", "Taylor", "Brown", "Williams", "Wilson", "Johnson", "Davies", "Patel", "Robinson",
    "Wright", "Thompson", "Evans", "Walker", "White", "Roberts", "Green", "Hall", "Wood", "Jackson", "Khan",
    "Nowak", "O'Brien", "Murphy", "Clarke", "Singh", "Hughes", "Edwards", "Lewis", "Okafor",
]  # fmt: skip
DOMAINS = ["example.com", "example.org", "example.net", "mail.example", "post.example"]
AGE_BANDS = ["18-24", "25-34", "35-44", "45-54", "55-64", "65+"]
AGE_WEIGHTS = [0.12, 0.24, 0.22, 0.18, 0.14, 0.10]
GENDERS = ["female", "male", "other"]
GENDER_WEIGHTS = [0.51, 0.47, 0.02]
REGIONS = ["London", "South East", "North West", "Scotland", "Wales", "West Midlands", "Yorkshire", "South West"]
CHANNELS = ["web", "app", "store"]
THEMES: dict[str, list[str]] = {
    "breakfast": ["coffee", "milk", "cereal", "bread", "butter"],
    "pasta night": ["pasta", "tomato sauce", "parmesan", "basil", "red wine"],
    "baby": ["nappies", "baby wipes", "baby food", "formula"],
    "barbecue": ["burgers", "buns", "charcoal", "ketchup", "beer"],
    "baking": ["flour", "sugar", "eggs", "butter", "vanilla"],
    "healthy": ["salad", "avocado", "quinoa", "yoghurt", "berries"],
    "cleaning": ["detergent", "bin bags", "sponges", "bleach"],
    "movie night": ["popcorn", "crisps", "cola", "chocolate"],
}
PRODUCTS = sorted({p for items in THEMES.values() for p in items})
START = datetime(2022, 1, 1, tzinfo=UTC)
WEEKS = 4 * 52  # four years of history
MAPPING = """\
# Which CRM column is which (see crm_bridge/mapping.py). Columns not named here are never released.
default_region = "GB"

[pii]
email = "email"
phone = "phone"
name = "full_name"

[columns]
order_id = "user.behavior.purchase_history"
order_ts = "user.behavior.purchase_history"
amount = "user.behavior.purchase_history"
products = "user.behavior.purchase_history"
channel = "user.behavior.purchase_history"
age_band = "user.demographic"
gender = "user.demographic"
region = "user.location"
"""


@dataclass(frozen=True)
class Customers:
    ids: np.ndarray
    email: list[str | None]
    phone: list[str | None]
    name: list[str]
    age_band: np.ndarray
    gender: np.ndarray
    region: np.ndarray
    consent_purchases: np.ndarray
    consent_demographics: np.ndarray
    consent_location: np.ndarray

    def table(self) -> pa.Table:
        return pa.table(
            {
                "customer_id": self.ids,
                "email": pa.array(self.email, pa.string()),
                "phone": pa.array(self.phone, pa.string()),
                "full_name": self.name,
                "age_band": self.age_band,
                "gender": self.gender,
                "region": self.region,
                "consent_purchases": self.consent_purchases,
                "consent_demographics": self.consent_demographics,
                "consent_location": self.consent_location,
            }
        )


def make_customers(rng: np.random.Generator, first_id: int, n: int) -> Customers:
    ids = np.arange(first_id, first_id + n)
    first = rng.choice(FIRST, n)
    last = rng.choice(LAST, n)
    domains = rng.choice(DOMAINS, n)
    # Spellings vary as in real CRMs (capitals, stray spaces); the pseudonym must not.
    styles = rng.integers(0, 4, n)
    emails: list[str | None] = []
    for i, f, la, d, style in zip(ids.tolist(), first, last, domains, styles.tolist(), strict=True):
        local = f"{f}.{la}{i}".replace("'", "")
        emails.append(
            local.lower() + "@" + d if style == 0 else f"{local}@{d.upper()}" if style == 1 else f" {local}@{d} "
        )
    phones: list[str | None] = [f"+44 7{400 + (i // 1_000_000) % 600:03d} {i % 1_000_000:06d}" for i in ids.tolist()]
    # One customer in twenty has no e-mail address (identified by phone); one in ten no phone.
    for k in np.flatnonzero(rng.random(n) < 0.05).tolist():
        emails[k] = None
    for k in np.flatnonzero(rng.random(n) < 0.10).tolist():
        if emails[k] is not None:
            phones[k] = None
    return Customers(
        ids=ids,
        email=emails,
        phone=phones,
        name=[f"{f} {la}" for f, la in zip(first, last, strict=True)],
        age_band=rng.choice(AGE_BANDS, n, p=AGE_WEIGHTS),
        gender=rng.choice(GENDERS, n, p=GENDER_WEIGHTS),
        region=rng.choice(REGIONS, n),
        consent_purchases=rng.random(n) < 0.7,
        consent_demographics=rng.random(n) < 0.5,
        consent_location=rng.random(n) < 0.3,
    )


def make_orders(rng: np.random.Generator, customers: Customers, first_order: int) -> pa.Table:
    n = len(customers.ids)
    rate = rng.gamma(shape=1.5, scale=0.12, size=n)  # purchases per week while alive
    dropout = rng.beta(0.9, 9.0, size=n)  # chance of leaving after each purchase
    value_scale = rng.gamma(shape=4.0, scale=1.0 / 120.0, size=n)  # Gamma-Gamma: per-customer mean spend
    first_week = rng.uniform(0, WEEKS * 0.75, size=n)
    theme_pref = rng.dirichlet(np.full(len(THEMES), 0.4), size=n)
    channel_pref = rng.dirichlet(np.full(len(CHANNELS), 0.7), size=n)

    customer_idx: list[np.ndarray] = []
    times: list[np.ndarray] = []
    t = first_week.copy()
    alive = np.ones(n, dtype=bool)
    first = True
    while alive.any():
        idx = np.flatnonzero(alive)
        customer_idx.append(idx)
        times.append(t[idx])
        # BG/NBD: a customer may leave after each repeat purchase (not right after the first).
        leaves = np.zeros(len(idx), dtype=bool) if first else rng.random(len(idx)) < dropout[idx]
        first = False
        t[idx] += rng.exponential(1.0 / rate[idx])
        alive[idx] = ~leaves & (t[idx] < WEEKS)
    who = np.concatenate(customer_idx)
    when = np.concatenate(times)
    order = np.lexsort((who, when))
    who, when = who[order], when[order]
    m = len(who)

    amount = np.round(rng.gamma(shape=6.0, scale=1.0 / value_scale[who]) / 6.0 * 1.0, 2) + 1.0
    cum = theme_pref[who].cumsum(axis=1)
    theme = (rng.random((m, 1)) > cum).sum(axis=1).clip(max=len(THEMES) - 1)
    channel = (rng.random((m, 1)) > channel_pref[who].cumsum(axis=1)).sum(axis=1).clip(max=len(CHANNELS) - 1)
    theme_items = [np.array([PRODUCTS.index(p) for p in items]) for items in THEMES.values()]
    probability = np.full((m, len(PRODUCTS)), 0.03)
    for k, items in enumerate(theme_items):
        rows = np.flatnonzero(theme == k)
        probability[np.ix_(rows, items)] = 0.65
    chosen = rng.random((m, len(PRODUCTS))) < probability
    empty = ~chosen.any(axis=1)
    chosen[np.flatnonzero(empty), [theme_items[k][0] for k in theme[empty].tolist()]] = True
    names = np.array(PRODUCTS)
    baskets = [";".join(names[row]) for row in chosen]
    seconds = (when * 7 * 86400).astype(np.int64)
    timestamps = pa.array(int(START.timestamp()) + seconds, pa.int64()).cast(pa.timestamp("s", tz="UTC"))
    return pa.table(
        {
            "order_id": np.arange(first_order, first_order + m),
            "customer_id": customers.ids[who],
            "email": pa.array([customers.email[i] for i in who.tolist()], pa.string()),
            "phone": pa.array([customers.phone[i] for i in who.tolist()], pa.string()),
            "full_name": pa.array([customers.name[i] for i in who.tolist()], pa.string()),
            "age_band": customers.age_band[who],
            "gender": customers.gender[who],
            "region": customers.region[who],
            "order_ts": timestamps,
            "channel": np.array(CHANNELS)[channel],
            "amount": amount,
            "products": baskets,
        }
    )


def generate(
    rows: int | None, seed: int, block_customers: int = 20_000, *, customers: int | None = None
) -> Iterator[tuple[pa.Table, pa.Table]]:
    """(customers, orders) blocks until `rows` orders are made (the last block is cut to size), or
    until `customers` customers are made (whole histories)."""
    if (rows is None) == (customers is None):
        raise ValueError("give rows or customers")
    rng = np.random.default_rng(seed)
    made, next_customer, next_order = 0, 1, 1
    while made < (rows or 0) or next_customer <= (customers or 0):
        size = block_customers if customers is None else min(block_customers, customers - next_customer + 1)
        people = make_customers(rng, next_customer, size)
        orders = make_orders(rng, people, next_order)
        if rows is not None:
            orders = orders.slice(0, rows - made)
        buyers = set(orders.column("customer_id").to_pylist())
        table = people.table()
        table = table.filter(pa.array([c in buyers for c in table.column("customer_id").to_pylist()]))
        yield table, orders
        made += orders.num_rows
        next_customer += size
        next_order += orders.num_rows


RELEASED = ["order_id", "order_ts", "amount", "products", "channel", "age_band", "gender", "region"]


def released(customers: int, seed: int, *, purpose: str = "analytics.reporting") -> Iterator[pa.Table]:
    """What `bridge export` releases when every customer consented to every mapped column, in blocks:
    for analytics' tests and benchmarks, without a chain (the bridge itself is tested and measured
    on one). DIDs are made from the CRM's customer id; no PII column is included."""
    from crm_bridge.mapping import Mapping
    from crm_bridge.release import ReleaseInfo

    columns = dict(Mapping.parse(tomllib.loads(MAPPING)).columns)
    info = ReleaseInfo(partner="0x" + "00" * 19 + "01", purpose=purpose, request_id="0x" + "00" * 32, columns=columns)
    for _people, orders in generate(None, seed, customers=customers):
        did = pc.binary_join_element_wise("did:web:crm.example:c", orders.column("customer_id").cast(pa.string()), "")
        table = pa.table({"did": did, **{c: orders.column(c) for c in RELEASED}})
        yield table.replace_schema_metadata(info.metadata())


def write(out_dir: Path, rows: int, seed: int, *, sqlite: bool = False) -> dict[str, int]:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "mapping.toml").write_text(MAPPING, encoding="utf-8")
    customers_writer: pacsv.CSVWriter | None = None
    orders_writer: pacsv.CSVWriter | None = None
    counts = {"customers": 0, "orders": 0}
    engine = None
    if sqlite:
        from sqlalchemy import create_engine

        db = out_dir / "crm.db"
        db.unlink(missing_ok=True)
        engine = create_engine(f"sqlite:///{db}")
    try:
        for customers, orders in generate(rows, seed):
            if customers_writer is None:
                customers_writer = pacsv.CSVWriter(out_dir / "customers.csv", customers.schema)
                orders_writer = pacsv.CSVWriter(out_dir / "orders.csv", orders.schema)
            assert orders_writer is not None
            customers_writer.write_table(customers)
            orders_writer.write_table(orders)
            counts["customers"] += customers.num_rows
            counts["orders"] += orders.num_rows
            if engine is not None:
                for name, table in (("customers", customers), ("orders", orders)):
                    table.to_pandas().to_sql(name, engine, if_exists="append", index=False, chunksize=10_000)
    finally:
        for writer in (customers_writer, orders_writer):
            if writer is not None:
                writer.close()
        if engine is not None:
            engine.dispose()
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--rows", type=int, default=100_000, help="orders to write (default 100,000)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--sqlite", action="store_true", help="also write crm.db (tables customers, orders)")
    args = parser.parse_args(argv)
    counts = write(args.out_dir, args.rows, args.seed, sqlite=args.sqlite)
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
