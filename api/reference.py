"""Reference data: purposes and attribute categories named by the Fideslang taxonomy (data uses and
data categories, https://ethyca.github.io/fideslang/), seeded on first start and extended by the operator."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.models import AttributeRow, PurposeRow
from ledger.eip712 import purpose_id
from ledger.types import AttributeMask

# Fideslang data uses.
DEFAULT_PURPOSES = [
    ("marketing.communications.email", "E-mail marketing", "Sending marketing e-mails."),
    ("marketing.communications.sms", "SMS marketing", "Sending marketing text messages."),
    ("marketing.advertising.first_party.targeted", "Targeted advertising", "First-party targeted advertising."),
    ("analytics.reporting", "Analytics reporting", "Aggregate analysis and reporting."),
    ("personalize.content", "Personalised content", "Personalising content and offers."),
    ("essential.service", "Essential service", "Providing the service the customer asked for."),
]

# Fideslang data categories; the position is the attribute's bit in a consent's bitmask.
DEFAULT_ATTRIBUTES = [
    ("user.contact.email", "E-mail address"),
    ("user.contact.phone_number", "Phone number"),
    ("user.name", "Name"),
    ("user.contact.address", "Postal address"),
    ("user.demographic", "Demographic data"),
    ("user.behavior.purchase_history", "Purchase history"),
    ("user.behavior.browsing_history", "Browsing history"),
    ("user.location", "Location"),
]


def seed(session: Session) -> None:
    if session.scalar(select(PurposeRow).limit(1)) is None:
        session.add_all(PurposeRow(key=k, name=n, description=d) for k, n, d in DEFAULT_PURPOSES)
    if session.scalar(select(AttributeRow).limit(1)) is None:
        session.add_all(AttributeRow(bit=i, key=k, name=n) for i, (k, n) in enumerate(DEFAULT_ATTRIBUTES))


class Catalogue:
    """Lookups between names and on-chain values (loaded per request: the tables are small)."""

    def __init__(self, session: Session) -> None:
        from api.models import Partner

        partners = list(session.scalars(select(Partner)))
        self.partners = {p.address: p.name for p in partners}  # every partner, retired ones too: for names
        self.retired = {p.address for p in partners if p.retired_at is not None}
        self.purposes = {row.key: row for row in session.scalars(select(PurposeRow))}
        self.purpose_by_id = {bytes(purpose_id(k)): k for k in self.purposes}
        self.attributes = {row.key: row.bit for row in session.scalars(select(AttributeRow))}
        self.attribute_by_bit = {bit: key for key, bit in self.attributes.items()}
        self.attribute_mask = AttributeMask(sum(1 << bit for bit in self.attribute_by_bit))  # every bit it names

    def partner(self, name_or_address: str, *, retired: bool = False) -> str | None:
        """The address of the partner so named or addressed; a retired one only with `retired` (to
        look up what it did, not to do anything new with it)."""
        for address, name in self.partners.items():
            if name_or_address in (name, address) or name_or_address.lower() == address.lower():
                return address if retired or address not in self.retired else None
        return None

    def mask(self, keys: list[str]) -> tuple[AttributeMask, list[str]]:
        """Bitmask of attribute keys, and the unknown keys."""
        unknown = [k for k in keys if k not in self.attributes]
        return AttributeMask(sum(1 << self.attributes[k] for k in set(keys) if k in self.attributes)), unknown

    def names(self, mask: int) -> list[str]:
        return [self.attribute_by_bit.get(bit, f"bit{bit}") for bit in range(mask.bit_length()) if mask >> bit & 1]

    def purpose_key(self, purpose: bytes) -> str:
        return self.purpose_by_id.get(bytes(purpose), "0x" + bytes(purpose).hex())
