"""Analytics settings (environment: CONSENT_LEDGER_ANALYTICS_*)."""

from __future__ import annotations

from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class AnalyticsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONSENT_LEDGER_ANALYTICS_", extra="ignore")

    k: int = Field(
        default=10, ge=2, description="k-anonymity: no aggregate row describing fewer than k customers is output."
    )
    horizon_weeks: int = Field(default=52, ge=1, description="Horizon of expected purchases and lifetime value.")
    churn_days: int = Field(
        default=90, ge=7, description="A customer has churned if they make no order in this many days."
    )
    rules_sample: int = Field(
        default=200_000,
        ge=1_000,
        description="Baskets mined for frequent itemsets (the rules found are recounted on all).",
    )
    min_support: float = Field(default=0.01, gt=0, lt=1, description="Minimum itemset support for rules.")
    time_zone: str = Field(
        default="UTC",
        description="The business's time zone (IANA name): purchase days, recency and `as_of` are counted in it."
        " Times that carry a zone are converted to it; times without one are taken as already in it.",
    )
    currency: str = Field(
        default="EUR", min_length=1, description="The currency of the amounts, as the report names it."
    )

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r} (an IANA name such as Europe/Berlin)") from exc
        return value

    margin: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="Share of revenue that is profit: lifetime value is margin times expected revenue (1: revenue).",
    )
    discount_rate: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="Annual rate at which future value is discounted to today (each week's purchases).",
    )
    churn_active_only: bool = Field(
        default=False,
        description="Churn risk only for customers active at the cutoff (an order in the churn_days before it).",
    )


@lru_cache
def get_settings() -> AnalyticsSettings:
    return AnalyticsSettings()
