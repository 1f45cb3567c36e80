"""A scope means something only if a route checks it: one granted and never checked promises a
restriction nobody enforces (`consent:read` and `customers:read` were such)."""

from __future__ import annotations

import api.main  # noqa: F401 - every router, so that every scope a route checks is recorded
from api.auth import CUSTOMER_SCOPES, ROLE_SCOPES
from api.deps import CHECKED_SCOPES


def test_every_scope_granted_is_checked_by_some_route() -> None:
    granted = set(CUSTOMER_SCOPES).union(*ROLE_SCOPES.values())
    assert granted - CHECKED_SCOPES == set()
