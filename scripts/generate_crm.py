"""A realistic synthetic CRM export, seeded and reproducible.

Writes, into OUT_DIR:
- `customers.csv`: one row per customer: PII (e-mail, phone, name), demographics, and the consent
  preferences the customer would give (used by tests and the demo to grant consent);
- `orders.csv`: the CRM's order export, one row per order, with the customer's PII and demographics
  repeated (as CRM exports are): timestamp, amount, channel and the basket's products;
- `mapping.toml`: which column is which (PII fields, attribute categories) for `bridge export`;
- with `--sqlite`, `crm.db` holding the same two tables (a SQLAlchemy-reachable source).

Customers differ by segment, so the models have something real to find (and cannot win by
restating their own assumptions):
- demographics matter: the age band sets the purchase rate, how long a customer stays, the spend,
  the channel and the themes bought (families buy baby goods, 65+ bake and shop in store); the
  region scales spend (London most);
- lifetimes are not BG/NBD's: a customer may lapse at any time (a per-segment hazard), and a fifth
  of those who lapse come back after a gap for a second spell;
- seasonality: purchases peak in December (and barbecue goods in summer), December baskets cost more;
- acquisition grows over the four years (more recent customers than old ones);
- products: themed baskets (co-purchase rules exist) plus a long tail of 240 products bought now
  and then, with Zipf popularity;
- free orders (vouchers, 0.00) and refunds (a later row with the order's id and a negative amount,
  whole or half the order), as real exports hold them; `returns=False` (`--no-returns`) leaves them out;
- dissatisfaction: after a refund a customer often (DISSATISFIED) leaves within a few weeks, behaviour
  a purchase-only model (BG/NBD) cannot see, as real customers have it.
`textbook=True` (`--textbook`) draws the old population instead (purchases exactly BG/NBD and spend
exactly Gamma-Gamma, no returns), for tests that check a fit recovers the parameters it was drawn from.
Order times are UTC instants (`timestamp[s, UTC]`) spread over the whole day.

Usage: python scripts/generate_crm.py OUT_DIR [--rows N] [--seed S] [--sqlite] [--no-returns] [--textbook]
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
THEMED = sorted({p for items in THEMES.values() for p in items})
TAIL_KINDS = [
    "spice",
    "sauce",
    "snack",
    "tea",
    "cheese",
    "soap",
    "candle",
    "magazine",
    "battery",
    "card",
    "plant",
    "toy",
]
TAIL = [f"{kind} no. {i}" for kind in TAIL_KINDS for i in range(1, 21)]  # the long tail: 240 products
PRODUCTS = THEMED + TAIL
# Per age band: purchase-rate multiplier, lapse hazard (per year, mean), spend multiplier, the themes
# bought more and the preferred channel. (Refunds add lapses of their own, see DISSATISFIED: the hazards
# were lowered with them, so about as many customers are long gone as before.)
AGE_EFFECTS: dict[str, tuple[float, float, float, tuple[str, ...], str]] = {
    "18-24": (0.75, 0.8, 0.7, ("movie night", "barbecue"), "app"),
    "25-34": (1.0, 0.45, 0.9, ("baby", "healthy"), "app"),
    "35-44": (1.4, 0.25, 1.2, ("baby", "breakfast"), "web"),
    "45-54": (1.25, 0.22, 1.25, ("pasta night", "cleaning"), "web"),
    "55-64": (1.0, 0.18, 1.1, ("baking", "pasta night"), "store"),
    "65+": (0.8, 0.12, 1.0, ("baking", "breakfast"), "store"),
}
REGION_SPEND = {"London": 1.35, "South East": 1.15, "Scotland": 0.95, "Wales": 0.9, "North West": 0.95}
SEASON_PEAK = 1.4  # the highest seasonal purchase-rate multiplier (December)
FREE_SHARE, REFUND_SHARE = 0.02, 0.04  # of orders (unless returns=False)
DISSATISFIED = 0.8  # the chance a refund makes the customer leave (within a few weeks)
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


def make_orders_textbook(rng: np.random.Generator, customers: Customers, first_order: int) -> pa.Table:
    """Purchases exactly BG/NBD and spend exactly Gamma-Gamma (r 1.5, alpha 1/0.12, a 0.9, b 9)."""
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
    chosen = _baskets(rng, theme_pref[who], np.zeros(len(who)), tail=False)
    channel = (rng.random((m, 1)) > channel_pref[who].cumsum(axis=1)).sum(axis=1).clip(max=len(CHANNELS) - 1)
    return _table(customers, who, when, amount, chosen, channel, np.arange(first_order, first_order + m))


def _season(week: np.ndarray) -> np.ndarray:
    """The purchase-rate multiplier at `week` (from 1 January): 1.4 in mid-December, 0.6 in mid-June."""
    result: np.ndarray = 1.0 + 0.4 * np.cos(2 * np.pi * ((week % 52.18) - 50.0) / 52.18)
    return result


def make_orders(rng: np.random.Generator, customers: Customers, first_order: int, *, returns: bool = True) -> pa.Table:
    n = len(customers.ids)
    age = np.searchsorted(np.array(AGE_BANDS), customers.age_band)  # AGE_BANDS is sorted
    effects = [AGE_EFFECTS[band] for band in AGE_BANDS]
    rate_mult, hazard_mean, spend_mult = (np.array([e[i] for e in effects])[age] for i in range(3))
    region_mult = np.array([REGION_SPEND.get(r, 1.0) for r in customers.region.tolist()])
    rate = rng.gamma(shape=1.5, scale=0.12, size=n) * rate_mult  # purchases per week while active
    # Lapse at any time (not only after a purchase, as BG/NBD has it), at a per-segment hazard.
    hazard = rng.gamma(shape=2.0, scale=hazard_mean / 2.0, size=n) / 52.0  # per week
    first_week = WEEKS * 0.97 * rng.random(n) ** 0.6  # acquisition grows over the years
    lapse = first_week + rng.exponential(1.0 / hazard)
    comes_back = rng.random(n) < 0.2
    back = np.where(comes_back, lapse + rng.exponential(26.0, n), np.inf)
    final = np.where(comes_back, back + rng.exponential(1.0 / hazard), lapse)
    value_scale = rng.gamma(shape=4.0, scale=1.0 / 120.0, size=n) / (spend_mult * region_mult)

    who_parts, when_parts = [np.arange(n)], [first_week]
    t = first_week.copy()
    alive = np.ones(n, dtype=bool)
    while alive.any():
        idx = np.flatnonzero(alive)
        step = t[idx] + rng.exponential(1.0 / (rate[idx] * SEASON_PEAK))
        gone = ((step >= lapse[idx]) & ~comes_back[idx]) | (step >= final[idx])
        jump = ~gone & (step >= lapse[idx]) & (step < back[idx])  # lapsed: the next order is the return
        step = np.where(jump, back[idx], step)
        gone |= step >= WEEKS
        bought = ~gone & (jump | (rng.random(len(idx)) < _season(step) / SEASON_PEAK))  # thinning
        who_parts.append(idx[bought])
        when_parts.append(step[bought])
        t[idx] = step
        alive[idx] = ~gone
    who, when = np.concatenate(who_parts), np.concatenate(when_parts)
    order = np.lexsort((who, when))
    who, when = who[order], when[order]
    m = len(who)
    december = (when % 52.18) >= 47.8
    spend = rng.gamma(shape=6.0, scale=1.0 / value_scale[who]) / 6.0 * np.where(december, 1.2, 1.0)
    amount = np.round(spend + 1.0, 2)  # in pence: a refund of half is a whole number of pence too

    concentration = np.full((n, len(THEMES)), 0.4)
    theme_names = list(THEMES)
    for a, band in enumerate(AGE_BANDS):
        for theme in AGE_EFFECTS[band][3]:
            concentration[age == a, theme_names.index(theme)] = 2.0
    theme_pref = rng.gamma(concentration)
    theme_pref /= theme_pref.sum(axis=1, keepdims=True)
    chosen = _baskets(rng, theme_pref[who], when, tail=True)
    favourite = np.array([CHANNELS.index(AGE_EFFECTS[band][4]) for band in AGE_BANDS])[age]
    channel = np.where(rng.random(m) < 0.6, favourite[who], rng.integers(0, len(CHANNELS), m))
    order_id = np.arange(first_order, first_order + m)
    if returns:
        amount[rng.random(m) < FREE_SHARE] = 0.0  # a voucher paid for it
        refunded = np.flatnonzero((rng.random(m) < REFUND_SHARE) & (amount > 0))
        refund_when = when[refunded] + rng.exponential(1.0, len(refunded))  # about a week later
        keep = refund_when < WEEKS
        refunded, refund_when = refunded[keep], refund_when[keep]
        # Dissatisfaction: after a refund, a customer often leaves within a few weeks (a hazard BG/NBD,
        # which sees purchases only, cannot see). Their later orders, and the refunds of those, go.
        leaves = rng.random(len(refunded)) < DISSATISFIED
        quits = np.full(n, np.inf)
        np.minimum.at(quits, who[refunded[leaves]], refund_when[leaves] + rng.exponential(3.0, int(leaves.sum())))
        stays = when < quits[who]
        refunded, refund_when = refunded[stays[refunded]], refund_when[stays[refunded]]
        kept = np.flatnonzero(stays)
        renumber = np.cumsum(stays) - 1
        refunded = renumber[refunded]
        who, when, amount, chosen, channel = who[kept], when[kept], amount[kept], chosen[kept], channel[kept]
        order_id = order_id[kept]
        share = np.where(rng.random(len(refunded)) < 0.7, 1.0, 0.5)
        who = np.concatenate([who, who[refunded]])
        when = np.concatenate([when, refund_when])
        amount = np.concatenate([amount, -np.round(amount[refunded] * share, 2)])
        chosen = np.concatenate([chosen, chosen[refunded]])
        channel = np.concatenate([channel, channel[refunded]])
        order_id = np.concatenate([order_id, order_id[refunded]])
        order = np.lexsort((who, when))
        who, when, amount, chosen = who[order], when[order], amount[order], chosen[order]
        channel, order_id = channel[order], order_id[order]
    return _table(customers, who, when, amount, chosen, channel, order_id)


def _baskets(rng: np.random.Generator, preference: np.ndarray, when: np.ndarray, *, tail: bool) -> np.ndarray:
    """(order x product) bool: a theme drawn from the customer's preferences, most of its products and
    a few others; barbecue more in summer; with `tail`, now and then products of the long tail."""
    m = len(preference)
    weights = preference.copy()
    if tail:
        summer = np.cos(2 * np.pi * ((when % 52.18) - 28.0) / 52.18)  # 1 in mid-July
        weights[:, list(THEMES).index("barbecue")] *= np.exp(1.2 * summer)
        weights /= weights.sum(axis=1, keepdims=True)
    theme = (rng.random((m, 1)) > weights.cumsum(axis=1)).sum(axis=1).clip(max=len(THEMES) - 1)
    theme_items = [np.array([PRODUCTS.index(p) for p in items]) for items in THEMES.values()]
    probability = np.full((m, len(THEMED)), 0.03)
    for k, items in enumerate(theme_items):
        rows = np.flatnonzero(theme == k)
        probability[np.ix_(rows, items)] = 0.65
    chosen = np.zeros((m, len(PRODUCTS)), dtype=bool)
    chosen[:, : len(THEMED)] = rng.random((m, len(THEMED))) < probability
    empty = ~chosen.any(axis=1)
    chosen[np.flatnonzero(empty), [theme_items[k][0] for k in theme[empty].tolist()]] = True
    if tail:
        extra = rng.poisson(0.5, m)
        zipf = 1.0 / np.arange(1, len(TAIL) + 1)
        rows = np.repeat(np.arange(m), extra)
        picks = rng.choice(len(TAIL), len(rows), p=zipf / zipf.sum())
        chosen[rows, len(THEMED) + picks] = True
    return chosen


def _table(
    customers: Customers,
    who: np.ndarray,
    when: np.ndarray,
    amount: np.ndarray,
    chosen: np.ndarray,
    channel: np.ndarray,
    order_id: np.ndarray,
) -> pa.Table:
    names = np.array(PRODUCTS)
    baskets = [";".join(names[row]) for row in chosen]
    seconds = (when * 7 * 86400).astype(np.int64)
    timestamps = pa.array(int(START.timestamp()) + seconds, pa.int64()).cast(pa.timestamp("s", tz="UTC"))
    return pa.table(
        {
            "order_id": order_id,
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
    rows: int | None,
    seed: int,
    block_customers: int = 20_000,
    *,
    customers: int | None = None,
    returns: bool = True,
    textbook: bool = False,
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
        orders = (
            make_orders_textbook(rng, people, next_order)
            if textbook
            else make_orders(rng, people, next_order, returns=returns)
        )
        if orders.num_rows:  # refunds repeat their order's id: the next block's ids follow the largest
            next_order = int(pc.max(orders.column("order_id")).as_py()) + 1
        if rows is not None:
            orders = orders.slice(0, rows - made)
        buyers = set(orders.column("customer_id").to_pylist())
        table = people.table()
        table = table.filter(pa.array([c in buyers for c in table.column("customer_id").to_pylist()]))
        yield table, orders
        made += orders.num_rows
        next_customer += size


RELEASED = ["order_id", "order_ts", "amount", "products", "channel", "age_band", "gender", "region"]


def released(
    customers: int,
    seed: int,
    *,
    purpose: str = "analytics.reporting",
    returns: bool = True,
    textbook: bool = False,
) -> Iterator[pa.Table]:
    """What `bridge export` releases when every customer consented to every mapped column, in blocks:
    for analytics' tests and benchmarks, without a chain (the bridge itself is tested and measured
    on one). DIDs are made from the CRM's customer id; no PII column is included."""
    from crm_bridge.mapping import Mapping
    from crm_bridge.release import ReleaseInfo

    columns = dict(Mapping.parse(tomllib.loads(MAPPING)).columns)
    info = ReleaseInfo(partner="0x" + "00" * 19 + "01", purpose=purpose, request_id="0x" + "00" * 32, columns=columns)
    for _people, orders in generate(None, seed, customers=customers, returns=returns, textbook=textbook):
        did = pc.binary_join_element_wise("did:web:crm.example:c", orders.column("customer_id").cast(pa.string()), "")
        table = pa.table({"did": did, **{c: orders.column(c) for c in RELEASED}})
        yield table.replace_schema_metadata(info.metadata())


def write(
    out_dir: Path, rows: int, seed: int, *, sqlite: bool = False, returns: bool = True, textbook: bool = False
) -> dict[str, int]:
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
        for customers, orders in generate(rows, seed, returns=returns, textbook=textbook):
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
    parser.add_argument(
        "--returns",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="free orders (0.00) and refunds (negative amounts), as real exports hold (default); --no-returns:"
        " every order paid and kept",
    )
    parser.add_argument("--textbook", action="store_true", help="purchases exactly BG/NBD, spend Gamma-Gamma")
    args = parser.parse_args(argv)
    counts = write(args.out_dir, args.rows, args.seed, sqlite=args.sqlite, returns=args.returns, textbook=args.textbook)
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
