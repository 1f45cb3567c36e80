"""The consent filter of a release (`crm_bridge.bridge.permitted`), over a real read model in SQLite."""

from __future__ import annotations

import time
from pathlib import Path

from crm_bridge.bridge import permitted
from ledger.consent import ConsentReader, ConsentState
from ledger.store import create_schema, make_engine, sessions

PARTNER = "0x" + "ab" * 20
OTHER = "0x" + "cd" * 20
PURPOSE = bytes(range(32))


def test_a_release_carries_what_each_customer_permits_and_no_erased_customer(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'service.db'}")
    create_schema(engine)
    alice, bob, carol, dave = (bytes([n]) * 32 for n in (1, 2, 3, 4))
    expired = int(time.time()) - 60
    with sessions(engine).begin() as session:
        for subject, partner, attributes, valid_until in (
            (alice, PARTNER, 0b101, 0),
            (bob, PARTNER, 0b011, 0),
            (carol, PARTNER, 0b001, expired),  # lapsed
            (dave, OTHER, 0b111, 0),  # another partner's
        ):
            session.add(
                ConsentState(
                    subject=subject,
                    partner=partner,
                    purpose=PURPOSE,
                    attributes=str(attributes),
                    valid_until=valid_until,
                    block_number=1,
                    tx_hash="0x" + "00" * 32,
                )
            )
    consents = ConsentReader(engine)
    assert permitted(consents, PARTNER, PURPOSE) == {alice: 0b101, bob: 0b011}
    assert permitted(consents, PARTNER, PURPOSE, erased={bob}) == {alice: 0b101}
    assert permitted(consents, PARTNER, bytes(32)) == {}  # another purpose
    engine.dispose()
