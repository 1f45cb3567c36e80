"""Identity fixtures: keys and peppers made per test, a vault on a real SQLite file and on PostgreSQL."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from identity.keys import StaticKeyProvider
from identity.pseudonym import PepperRing, Pseudonymizer
from identity.vault import Base, Vault, make_engine


@pytest.fixture
def ring() -> PepperRing:
    return PepperRing({1: os.urandom(32)}, current=1)


@pytest.fixture
def pseudonymizer(ring: PepperRing) -> Pseudonymizer:
    return Pseudonymizer(ring)


@pytest.fixture
def keys() -> StaticKeyProvider:
    return StaticKeyProvider({"k1": os.urandom(32)}, "k1")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'identity.db'}"
    url: str = request.getfixturevalue("postgres_url")
    engine = make_engine(url)
    Base.metadata.drop_all(engine)
    engine.dispose()
    return url


@pytest.fixture
def vault(database_url: str, keys: StaticKeyProvider, pseudonymizer: Pseudonymizer) -> Iterator[Vault]:
    engine = make_engine(database_url)
    vault = Vault(engine, keys, pseudonymizer)
    vault.create_schema()
    yield vault
    engine.dispose()
