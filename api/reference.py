"""Reference data: purposes and attribute categories named by the Fideslang taxonomy (data uses and
data categories, https://ethyca.github.io/fideslang/), seeded on first start and extended by the operator."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.models import AttributeRow, PurposeRow
from api.schemas import PurposePublic
from ledger.eip712 import purpose_id
from ledger.types import AttributeMask

# The GDPR art. 6(1) bases a purpose can rest on: the article, and what it means for the customer. Only
# a consent purpose is the customer's to grant and withdraw; the portal shows the others without a switch.
LEGAL_BASES = {
    "consent": ("GDPR art. 6(1)(a), consent", "Only with your consent, which you can give or withdraw at any time."),
    "contract": ("GDPR art. 6(1)(b), contract", "Needed to provide the service you signed up for."),
    "legal_obligation": ("GDPR art. 6(1)(c), legal obligation", "Required by law, for example tax records."),
    "legitimate_interests": (
        "GDPR art. 6(1)(f), legitimate interests",
        "Used in our legitimate interests, weighed against yours; you can object to it by contacting us.",
    ),
}

# Fideslang data uses, with their legal basis.
DEFAULT_PURPOSES = [
    ("marketing.communications.email", "E-mail marketing", "Sending you offers and news by e-mail.", "consent"),
    ("marketing.communications.sms", "SMS marketing", "Sending you offers and news by text message.", "consent"),
    (
        "marketing.advertising.first_party.targeted",
        "Targeted advertising",
        "Choosing which of our own adverts you see, from what you buy and browse.",
        "consent",
    ),
    (
        "analytics.reporting",
        "Analytics reporting",
        "Counting and comparing purchases in reports that name no one.",
        "consent",
    ),
    ("personalize.content", "Personalised content", "Choosing the offers and content you see to suit you.", "consent"),
    (
        "essential.service",
        "Essential service",
        "Providing the service you asked for: your account, orders and points.",
        "contract",
    ),
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
        session.add_all(PurposeRow(key=k, name=n, description=d, legal_basis=b) for k, n, d, b in DEFAULT_PURPOSES)
    if session.scalar(select(AttributeRow).limit(1)) is None:
        session.add_all(AttributeRow(bit=i, key=k, name=n) for i, (k, n) in enumerate(DEFAULT_ATTRIBUTES))


def purpose_public(row: PurposeRow) -> PurposePublic:
    basis = row.legal_basis or "consent"
    article, meaning = LEGAL_BASES[basis]
    return PurposePublic(
        key=row.key,
        id="0x" + bytes(purpose_id(row.key)).hex(),
        name=row.name,
        description=row.description,
        legal_basis=basis,  # type: ignore[arg-type]
        legal_basis_article=article,
        legal_basis_description=meaning,
    )


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
