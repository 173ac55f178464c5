"""Tenants of the Serve ingress: who holds which API key, and what each may spend per window.

The Serve config maps tenant names to a `TenantConfig`: the *name* of an environment
variable holding that tenant's key (the key itself never goes into YAML, reprs or error
messages) and an optional `TenantBudget` of FLOPs and/or completion tokens per rolling
window. `tenant_key_digests` resolves the keys once, at deploy time, into the digests the
ingress compares. The balances themselves live in `frugalray.serve.tenant_ledger`.

This module is imported by `frugalray.serve.config`, so it must not import it back.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from pydantic import Field, field_validator, model_validator

from frugalray.config import ConfigError, StrictModel

# Served model names follow the same rule (frugalray.serve.config._NAME).
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")
ENV_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class TenantBudget(StrictModel):
    """What one tenant may spend in any rolling window of `window_s` seconds (each limit optional)."""

    flops: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="FLOPs the tenant's requests may spend per window (usage's FLOP count); None = no FLOP limit")
    completion_tokens: int | None = Field(
        None, ge=1, description="completion tokens (summed over samples) per window; None = no token limit")
    window_s: float = Field(
        3600.0, gt=0, allow_inf_nan=False,
        description="length of the rolling window in seconds, e.g. 3600 = per hour, 86400 = per day")

    @model_validator(mode="after")
    def _some_limit(self) -> TenantBudget:
        if self.flops is None and self.completion_tokens is None:
            raise ValueError("budget: set flops and/or completion_tokens, or drop budget for an unlimited tenant")
        return self


class _Hidden(str):
    """A string whose repr never shows it: an `api_key_env` that is not a variable name may be a pasted key."""

    def __repr__(self) -> str:
        return "'<hidden: not a variable name>'"


class TenantConfig(StrictModel):
    """One tenant: the environment variable holding its API key, and its budget (None = unlimited)."""

    api_key_env: str = Field(
        description="NAME of an environment variable (on the deploying process) holding this tenant's API key; "
                    "never the key itself")
    budget: TenantBudget | None = Field(
        None, description="FLOPs and/or completion tokens per rolling window; None = unlimited (spend is still "
                          "recorded)")

    @model_validator(mode="before")
    @classmethod
    def _hide_non_names(cls, data: Any) -> Any:
        # Pydantic echoes a refused value in its error (and parse_config prints it); a value that is
        # not a variable name may be the key itself, so it is wrapped to keep it out of the message.
        if isinstance(data, dict):
            value = data.get("api_key_env")
            if isinstance(value, str) and not ENV_NAME_PATTERN.match(value):
                data = {**data, "api_key_env": _Hidden(value)}
        return data

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if not ENV_NAME_PATTERN.match(value):
            raise ValueError("must be an environment variable name (letters, digits and '_', not starting with a "
                             "digit), e.g. FRUGALRAY_KEY_ACME; export the key under that name")
        return value


def tenant_name_problems(tenants: Mapping[str, Any]) -> list[str]:
    """Problems with the tenant names themselves (the keys of the config's `tenants` mapping)."""
    return [
        f"tenants.{name}: tenant names must be letters, digits, '.', '_' or '-' (starting with a letter or digit)"
        for name in tenants if not NAME_PATTERN.match(name)
    ]


def key_digest(key: str) -> str:
    """What an ingress keeps instead of an API key (it compares digests)."""
    return hashlib.sha256(key.encode()).hexdigest()


def tenant_key_digests(tenants: Mapping[str, TenantConfig], environ: Mapping[str, str]) -> dict[str, str]:
    """sha256-hex(key) -> tenant name, reading each tenant's key from `environ`.

    Raises one ConfigError listing every tenant whose variable is unset or empty, and every
    group of tenants that hold the same key (a request could not say whose budget it spends).
    No key ever appears in a message.
    """
    problems: list[str] = []
    owners: dict[str, list[str]] = {}
    for name, tenant in tenants.items():
        key = environ.get(tenant.api_key_env)
        if not key:
            problems.append(
                f"tenants.{name}.api_key_env: environment variable {tenant.api_key_env} is not set (or empty); "
                "export it before deploying, or remove the tenant")
            continue
        owners.setdefault(key_digest(key), []).append(name)
    for names in owners.values():
        if len(names) > 1:
            fields = " and ".join(f"tenants.{n}.api_key_env" for n in names)
            variables = sorted({tenants[n].api_key_env for n in names})
            source = (f"all read {variables[0]}" if len(variables) == 1
                      else f"{', '.join(variables)} hold the same key")
            problems.append(f"{fields}: {source}; give each tenant its own key so requests charge the right budget")
    if problems:
        raise ConfigError(problems)
    return {digest: names[0] for digest, names in owners.items()}
