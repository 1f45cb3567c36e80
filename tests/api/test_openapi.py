"""The OpenAPI document tells the truth, for every operation: errors are `Problem` under
application/problem+json (422 included), 401 where credentials are checked, 413 and 503 everywhere,
`security` lists exactly the schemes whose callers may use the route, a required header is documented
required. Every operation is walked, and every operation must be in `SECURITY`: a new route cannot
slip past. (Schemathesis checks the answers against this document: tests/api/test_schemathesis.py.)"""

from __future__ import annotations

from typing import Any

import pytest

from tests.api.conftest import Service

PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
KEY, BEARER = "APIKeyHeader", "HTTPBearer"

# Who can call each operation: services by API key (a role holds the scope), customers by bearer token.
SECURITY: dict[tuple[str, str], set[str]] = {
    ("get", "/api/v1/health"): set(),
    ("get", "/livez"): set(),
    ("get", "/readyz"): set(),
    ("get", "/metrics"): set(),
    ("get", "/api/v1/dids/{did}"): set(),
    ("get", "/dids/{subject_hex}/did.json"): set(),
    ("post", "/api/v1/auth/siwe/challenge"): set(),
    ("post", "/api/v1/auth/siwe"): set(),
    ("post", "/api/v1/customers/{did}/controller/prepare"): set(),  # the claim code authenticates
    ("post", "/api/v1/customers/{did}/controller"): set(),
    ("post", "/api/v1/customers"): {KEY},
    ("delete", "/api/v1/customers/{did}"): {KEY},
    ("get", "/api/v1/customers/{did}/consents"): {KEY, BEARER},  # that customer, or the operator
    ("post", "/api/v1/customers/{did}/recovery-claims"): {KEY},  # the operator, having verified the person
    ("post", "/api/v1/customers/{did}/recovery/prepare"): set(),  # the recovery claim code authenticates
    ("post", "/api/v1/customers/{did}/recovery"): set(),
    ("post", "/api/v1/customers/{did}/recovery/complete"): set(),
    ("get", "/api/v1/customers/{did}/recovery"): {KEY, BEARER},
    ("post", "/api/v1/customers/{did}/recovery/cancel/prepare"): {BEARER},  # the current key's holder
    ("post", "/api/v1/customers/{did}/recovery/cancel"): {BEARER},
    ("get", "/api/v1/customers/{did}/keys"): {KEY, BEARER},
    ("get", "/api/v1/customers/{did}/points"): {KEY, BEARER},
    ("get", "/api/v1/customers/{did}/accesses"): {KEY, BEARER},
    ("post", "/api/v1/consents/prepare"): {BEARER},
    ("post", "/api/v1/consents"): {BEARER},
    ("post", "/api/v1/consents/batch"): {KEY},  # a forwarding back end
    ("get", "/api/v1/consents/{request_id}"): {KEY, BEARER},
    ("post", "/api/v1/points/issuances"): {KEY},
    ("post", "/api/v1/points/redemptions/prepare"): {BEARER},
    ("post", "/api/v1/points/redemptions"): {KEY},  # partners only
    ("post", "/api/v1/points/codes"): {BEARER},
    ("get", "/api/v1/points/codes"): {BEARER},
    ("delete", "/api/v1/points/codes/{code}"): {BEARER},
    ("get", "/api/v1/partners/me/redemptions"): {KEY},
    ("get", "/api/v1/audit/accesses"): {KEY},
    ("post", "/api/v1/audit/verify"): {KEY},
    ("get", "/api/v1/partners"): {KEY, BEARER},
    ("post", "/api/v1/partners"): {KEY},
    ("delete", "/api/v1/partners/{name}"): {KEY},
    ("get", "/api/v1/purposes"): {KEY, BEARER},
    ("post", "/api/v1/purposes"): {KEY},
    ("get", "/api/v1/attributes"): {KEY, BEARER},
    ("post", "/api/v1/attributes"): {KEY},
}

# Errors in another standard's format: W3C DID Resolution (its result under its media type, whatever
# the status) and did:web documents (what resolvers fetch; they read the status).
RESOLUTION = 'application/ld+json;profile="https://w3id.org/did-resolution"'
OTHER_FORMATS: dict[tuple[str, str, str], str] = {
    **{("get", "/api/v1/dids/{did}", status): RESOLUTION for status in ("400", "404", "410")},
    **{("get", "/dids/{subject_hex}/did.json", status): "application/json" for status in ("404", "410")},
}
SIGN_IN = ("post", "/api/v1/auth/siwe")  # refuses a bad signature with 401, without credentials


@pytest.fixture(scope="module")
def spec(service: Service) -> dict[str, Any]:
    response = service.client.get("/api/v1/openapi.json")
    assert response.status_code == 200, response.text
    return dict(response.json())


def _operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method, path, op) for path, item in spec["paths"].items() for method, op in item.items()]


def test_every_operation_is_in_the_security_table(spec: dict[str, Any]) -> None:
    assert {(method, path) for method, path, _ in _operations(spec)} == set(SECURITY)


def test_each_operation_lists_exactly_the_schemes_that_can_call_it(spec: dict[str, Any]) -> None:
    assert set(spec["components"]["securitySchemes"]) == {KEY, BEARER}
    assert spec["components"]["securitySchemes"][KEY]["name"] == "X-API-Key"
    for method, path, op in _operations(spec):
        schemes = [scheme for requirement in op.get("security", []) for scheme in requirement]
        assert len(schemes) == len(set(schemes)), (method, path, schemes)
        assert set(schemes) == SECURITY[(method, path)], (method, path, schemes)


def test_every_error_response_is_a_problem_under_problem_json(spec: dict[str, Any]) -> None:
    for method, path, op in _operations(spec):
        success = [op["responses"][c] for c in ("200", "201", "202") if c in op["responses"]]
        assert success, (method, path)
        assert all("schema" in media for media in success[0]["content"].values()), (method, path)
        for status, response in op["responses"].items():
            if int(status) < 400:
                continue
            other = OTHER_FORMATS.get((method, path, status))
            if other is None:
                assert response["content"] == PROBLEM, (method, path, status, response)
            else:
                assert list(response["content"]) == [other], (method, path, status, response)
                assert response["content"][other]["schema"], (method, path, status)
    assert {"Problem"} <= set(spec["components"]["schemas"])
    assert set(spec["components"]["schemas"]["Problem"]["required"]) == {"type", "title", "status", "code"}


def test_validation_errors_are_documented_as_the_problem_sent(spec: dict[str, Any]) -> None:
    """FastAPI documents its own 422 (HTTPValidationError) by default; the service sends problem+json."""
    assert not {"HTTPValidationError", "ValidationError"} & set(spec["components"]["schemas"])
    for method, path, op in _operations(spec):
        if op.get("parameters") or op.get("requestBody"):
            assert op["responses"].get("422", {}).get("content") == PROBLEM, (method, path)
        if op.get("requestBody"):  # a body that cannot be parsed: 400 (Starlette's refusal, as problem+json)
            assert op["responses"].get("400", {}).get("content") == PROBLEM, (method, path)


def test_generic_statuses_are_documented_where_they_are_sent(spec: dict[str, Any]) -> None:
    for method, path, op in _operations(spec):
        responses = op["responses"]
        assert responses["413"]["content"] == PROBLEM, (method, path)  # the body limit: every request
        assert responses["503"]["content"] == PROBLEM, (method, path)  # chain_unavailable: any route
        authenticates = bool(SECURITY[(method, path)])
        assert ("401" in responses) == (authenticates or (method, path) == SIGN_IN), (method, path)


def test_a_required_header_is_documented_required(spec: dict[str, Any]) -> None:
    def header(method: str, path: str) -> dict[str, Any]:
        params = spec["paths"][path][method].get("parameters", [])
        (found,) = [p for p in params if p["in"] == "header" and p["name"] == "Idempotency-Key"]
        return dict(found)

    assert header("post", "/api/v1/points/redemptions")["required"] is True
    assert header("post", "/api/v1/points/redemptions")["schema"]["minLength"] == 1
    assert header("post", "/api/v1/points/issuances").get("required", False) is False


@pytest.mark.parametrize(
    ("method", "path", "json", "headers", "status"),
    [
        ("get", "/api/v1/partners", None, {}, 401),
        ("post", "/api/v1/auth/siwe/challenge", {"address": "nope"}, {}, 422),
        ("post", "/api/v1/auth/siwe/challenge", b"\xff{", {"Content-Type": "application/json"}, 400),
        ("get", "/api/v1/partners", None, {"X-API-Key": "clk_unknown"}, 401),
        ("post", "/api/v1/points/redemptions", {"typed_data": {}, "signature": "0x" + "00" * 65}, "partner", 400),
        ("delete", "/api/v1/partners/no-such-partner", None, "operator", 404),
        ("get", "/api/v1/customers/did%3Aweb%3Anope/consents", None, "operator", 404),
    ],
)
def test_what_is_sent_is_what_is_documented(
    service: Service,
    spec: dict[str, Any],
    method: str,
    path: str,
    json: dict[str, Any] | bytes | None,
    headers: dict[str, str] | str,
    status: int,
) -> None:
    """A sample of real error answers: their media type and fields are the documented ones."""
    if headers == "partner":
        headers = {"X-API-Key": service.partner_key}
    elif headers == "operator":
        headers = service.operator()
    assert isinstance(headers, dict)
    body = {"content": json} if isinstance(json, bytes) else {"json": json}
    response = service.client.request(method, path, headers=headers, **body)
    assert response.status_code == status, response.text
    template = next(p for p in spec["paths"] if _matches(p, path))
    documented = spec["paths"][template][method]["responses"][str(status)]["content"]
    assert list(documented) == [response.headers["content-type"]]
    problem = spec["components"]["schemas"]["Problem"]
    body = response.json()
    assert set(problem["required"]) <= set(body), body
    assert body["status"] == status


def _matches(template: str, path: str) -> bool:
    parts, actual = template.split("/"), path.split("/")
    return len(parts) == len(actual) and all(p == a or p.startswith("{") for p, a in zip(parts, actual, strict=True))


def test_every_request_body_has_an_example_the_route_accepts_as_valid(spec: dict[str, Any]) -> None:
    """The reference shows an example of every body a route takes (none had one), and each example is
    valid for its model (an example the route would refuse at the edge teaches the wrong thing)."""
    import api.schemas

    bodies = 0
    for method, path, op in _operations(spec):
        content = op.get("requestBody", {}).get("content", {})
        if "application/json" not in content:
            continue
        bodies += 1
        schema = content["application/json"]["schema"]
        for ref in (
            [schema["$ref"]] if "$ref" in schema else [s["$ref"] for s in schema["oneOf"]]
        ):  # one body of several
            name = ref.rsplit("/", 1)[1]
            examples = spec["components"]["schemas"][name].get("examples")
            assert examples, (method, path, name)
            model = getattr(api.schemas, name)
            for example in examples:
                model.model_validate(example)
    assert bodies >= 12


def test_every_property_of_every_schema_says_what_it_is(spec: dict[str, Any]) -> None:
    """33 of 197 had a description: the reference listed names only. `api.glossary` gives a meaning per field
    name (per schema where a name means different things), beside the models' own."""
    missing = [
        f"{name}.{field}"
        for name, schema in spec["components"]["schemas"].items()
        for field, property_ in schema.get("properties", {}).items()
        if not property_.get("description")
    ]
    assert missing == []
