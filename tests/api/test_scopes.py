"""A scope means something only if a route checks it: one granted and never checked promises a
restriction nobody enforces (`consent:read` and `customers:read` were such). Scopes are `Scope`
members; the principals table keeps their names, space-separated, as before."""

from __future__ import annotations

import argparse

import api.main  # noqa: F401 - every router, so that every scope a route checks is recorded
from api.auth import CUSTOMER_SCOPES, ROLE_SCOPES, Scope, parse_scopes, stored_scopes
from api.cli import build_parser
from api.deps import CHECKED_SCOPES


def test_every_scope_granted_is_checked_by_some_route() -> None:
    granted = set(CUSTOMER_SCOPES).union(*ROLE_SCOPES.values())
    assert granted - CHECKED_SCOPES == set()


def test_every_scope_is_granted_to_some_caller_and_checked_by_some_route() -> None:
    granted = set(CUSTOMER_SCOPES).union(*ROLE_SCOPES.values())
    assert set(Scope) - granted == set(), "a scope nobody holds"
    assert set(Scope) - CHECKED_SCOPES == set(), "a scope no route checks"
    assert all(isinstance(s, Scope) for s in CHECKED_SCOPES)


def test_stored_scopes_are_their_names_and_read_back_as_scopes() -> None:
    stored = stored_scopes(ROLE_SCOPES["auditor"])
    assert stored == "audit:read reference:read"  # the stored format, unchanged
    parsed = parse_scopes(stored)
    assert parsed == ROLE_SCOPES["auditor"]
    assert all(type(s) is Scope for s in parsed)
    # A name that is no scope (retired since the row was written) grants nothing.
    assert parse_scopes("audit:read consent:read") == {Scope.AUDIT_READ}


def test_the_command_line_adds_principals_of_every_role_and_no_other() -> None:
    add = build_parser().parse_args(["principals", "add", "--role", "forwarder", "--name", "x"])
    assert add.role == "forwarder"
    roles = next(
        action.choices for action in _subcommand(build_parser(), "principals", "add")._actions if action.dest == "role"
    )
    assert set(roles or ()) == set(ROLE_SCOPES)


def _subcommand(parser: argparse.ArgumentParser, *names: str) -> argparse.ArgumentParser:
    for name in names:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser
