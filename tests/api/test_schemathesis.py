"""Schemathesis over the whole OpenAPI document of a real service (managed anvil, uvicorn), once per
role: operator, issuer, partner, auditor (API keys), a customer (bearer token from Sign-In with
Ethereum with a bound key) and an anonymous caller. Every generated request, valid or not, must get
no server error and an answer whose media type and body the document describes for its status.

Bounded in time: `MAX_EXAMPLES` requests per operation and role, no shrinking (each failure is reported
with the request that reproduces it, as a curl command), and a wall-clock `BUDGET` per role.

Generated DIDs, partners and purposes name nothing, so part of each operation's requests name the
fixtures instead, in the path (the customer's own data, and the operator's view of it) and in the body
(`did`, `partner`, `purpose`, `attributes`: points issued to a real customer, consent prepared for a
real partner), for the checks past "no such customer" to be reached. The fixtures are
never retired: a DELETE naming one of them (DELETE /partners/{name} on the fixture partner, DELETE
/customers/{did} on the fixture customer) is not sent, so that each role's run finds the partner's key
working and the customer enrolled. Everything else it creates (customers, partners, purposes,
attributes, challenges) is throw-away.

It drives schemathesis from Python (`APIOperation.as_strategy`) rather than through its pytest plugin,
whose lazy schema (`schemathesis.pytest.from_fixture`) fails on pytest 9 (`Function._nodeid`).

Alone: `.venv/bin/python -m pytest tests/api/test_schemathesis.py -q` (`-k customer`: one role;
SCHEMATHESIS_MAX_EXAMPLES=200 in the environment for a deeper run)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from api.auth import create_principal
from tests.api.conftest import q, running_service

pytestmark = [pytest.mark.anvil, pytest.mark.slow]

# A deeper run: SCHEMATHESIS_MAX_EXAMPLES=200 (the budget grows with it).
MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "25"))
BUDGET = 3.6 * MAX_EXAMPLES  # seconds per role; measured 15-40 s for 25 examples on 2 cores busy with other work
ROLES = ("operator", "issuer", "partner", "auditor", "customer", "anonymous")
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]
Running = tuple[str, dict[str, dict[str, str]], dict[str, str], dict[str, object]]
Operation = schemathesis.APIOperation[Any, Any, Any, Any]


@dataclass(frozen=True)
class Target:
    """The running service, and what a role sends with every request."""

    base_url: str
    headers: dict[str, str]
    fixtures: dict[str, str]  # path parameters that name the fixtures: sent, but never to a DELETE
    in_body: dict[str, object]  # body fields that name them


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with running_service(Path(tmp_path_factory.mktemp("schemathesis"))) as service:
        with service.runtime.sessions() as session:
            _, issuer_key = create_principal(session, "points-issuer", "issuer")
        customer = service.new_customer()
        headers = {
            "operator": service.operator(),
            "issuer": {"X-API-Key": issuer_key},
            "partner": {"X-API-Key": service.partner_key},
            "auditor": {"X-API-Key": service.auditor_key},
            "customer": customer.headers,
            "anonymous": {},
        }
        # As sent in a path: schemathesis puts a value given to it there as it is (a DID is percent-encoded).
        fixtures = {"name": "acme", "did": q(customer.did), "subject_hex": customer.did.rsplit(":", 1)[-1]}
        in_body: dict[str, object] = {
            "did": customer.did,
            "partner": "acme",
            "purpose": "marketing.communications.email",
            "attributes": ["user.contact.email"],
        }
        yield str(service.client.base_url).rstrip("/"), headers, fixtures, in_body


@pytest.fixture(scope="module")
def api_schema(running: Running) -> schemathesis.BaseSchema:
    base_url, _, _, _ = running
    return schemathesis.openapi.from_url(f"{base_url}/api/v1/openapi.json")


def _failures(operation: Operation, target: Target) -> tuple[int, list[str]]:
    """How many requests were sent to `operation` for the role, and what schemathesis found wrong in the
    answers: one report per distinct set of failed checks (the first request that failed them, as curl)."""
    found: dict[tuple[str, ...], str] = {}
    sent = 0
    strategies = [
        operation.as_strategy(schemathesis.GenerationMode.POSITIVE),
        operation.as_strategy(schemathesis.GenerationMode.NEGATIVE),
    ]
    deleting = operation.method.upper() == "DELETE"
    known = {name: value for name, value in target.fixtures.items() if "{" + name + "}" in operation.path}
    if known and not deleting:
        strategies.append(operation.as_strategy(schemathesis.GenerationMode.POSITIVE, path_parameters=known))
    if operation.body:
        strategies.append(
            operation.as_strategy(schemathesis.GenerationMode.POSITIVE).map(lambda case: _naming(case, target.in_body))
        )
    cases = st.one_of(*strategies)

    @given(case=cases)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def run(case: schemathesis.Case[Operation]) -> None:
        if deleting and set(target.fixtures.values()) & {str(v) for v in (case.path_parameters or {}).values()}:
            return  # deleting a fixture would retire it for the roles after this one
        nonlocal sent
        sent += 1
        try:
            case.call_and_validate(base_url=target.base_url, headers=target.headers, checks=CHECKS, timeout=60)
        except FailureGroup as failure:
            found.setdefault(tuple(sorted(f.title for f in failure.exceptions)), str(failure))

    run()
    return sent, list(found.values())


def _naming(case: schemathesis.Case[Operation], fields: dict[str, object]) -> schemathesis.Case[Operation]:
    """The case with each body field named in `fields`, at any depth, set to the fixture's value."""

    def swap(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: fields.get(key, swap(value)) for key, value in node.items()}
        if isinstance(node, list):
            return [swap(value) for value in node]
        return node

    case.body = swap(case.body)
    return case


@pytest.mark.parametrize("role", ROLES)
def test_api_answers_as_documented(api_schema: schemathesis.BaseSchema, running: Running, role: str) -> None:
    base_url, headers, fixtures, in_body = running
    target = Target(base_url=base_url, headers=headers[role], fixtures=fixtures, in_body=in_body)
    started = time.monotonic()
    failures: list[str] = []
    for result in api_schema.get_all_operations():
        assert isinstance(result, Ok), result.err()  # an operation schemathesis cannot read is a failure too
        operation = result.ok()
        assert time.monotonic() - started < BUDGET, f"over the {BUDGET:.0f} s budget before {operation.label}"
        sent, found = _failures(operation, target)
        assert sent > 0, f"no request was sent to {operation.label}"
        failures += [f"{role} {operation.label}: {failure}" for failure in found]
    assert not failures, "\n\n".join(failures)
