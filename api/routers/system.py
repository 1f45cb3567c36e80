"""Liveness and what the service is connected to."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from api.runtime import Runtime

router = APIRouter(tags=["system"])


class ContractPublic(BaseModel):
    name: str
    address: str
    deploy_block: int


class HealthPublic(BaseModel):
    status: str = Field(description="ok when the chain answers")
    backend: str
    chain_id: int
    block_number: int
    contracts: list[ContractPublic]


@router.get("/health", response_model=HealthPublic)
def health(request: Request) -> HealthPublic:
    runtime: Runtime = request.app.state.runtime
    assert runtime.backend is not None
    assert runtime.deployment is not None
    return HealthPublic(
        status="ok",
        backend=runtime.chain_backend,
        chain_id=runtime.deployment.chain_id,
        block_number=runtime.backend.w3.eth.block_number,
        contracts=[
            ContractPublic(name=name, address=c.address, deploy_block=c.block_number)
            for name, c in runtime.deployment.contracts.items()
        ],
    )
