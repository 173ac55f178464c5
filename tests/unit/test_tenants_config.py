"""Tenant config (budgets, key variables, names) and key resolution, without Ray."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from frugalray.config import ConfigError, StrictModel, parse_config
from frugalray.serve.config import api_key_digest
from frugalray.serve.tenants import TenantBudget, TenantConfig, tenant_key_digests, tenant_name_problems

SECRET = "sk-live-0123456789abcdef"


class _Serve(StrictModel):
    """Stands in for ServeConfig's `tenants` field, so errors carry their full path."""

    tenants: dict[str, TenantConfig]


def _problems(data: dict) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(_Serve, {"tenants": data})
    return str(err.value)


def test_a_budget_parses_from_yaml_with_a_default_hourly_window():
    cfg = parse_config(_Serve, yaml.safe_load("""
        tenants:
          acme: {api_key_env: ACME_KEY, budget: {flops: 1e18, completion_tokens: 20000}}
          daily: {api_key_env: DAILY_KEY, budget: {completion_tokens: 5000, window_s: 86400}}
          free: {api_key_env: FREE_KEY}
    """))
    acme = cfg.tenants["acme"].budget
    assert acme.flops == 1e18 and acme.completion_tokens == 20000 and acme.window_s == 3600
    assert cfg.tenants["daily"].budget.flops is None and cfg.tenants["daily"].budget.window_s == 86400
    assert cfg.tenants["free"].budget is None


def test_a_budget_without_any_limit_is_refused_naming_it():
    msg = _problems({"acme": {"api_key_env": "ACME_KEY", "budget": {"window_s": 60}}})
    assert "tenants.acme.budget:" in msg
    assert "set flops and/or completion_tokens, or drop budget for an unlimited tenant" in msg


@pytest.mark.parametrize("field,value", [
    ("flops", 0), ("flops", -1e12), ("flops", float("inf")), ("completion_tokens", 0),
    ("completion_tokens", -5), ("window_s", 0), ("window_s", -3600),
])
def test_zero_negative_or_infinite_limits_are_refused_naming_the_field(field, value):
    budget = {"flops": 1e15, "completion_tokens": 100, field: value}
    msg = _problems({"acme": {"api_key_env": "ACME_KEY", "budget": budget}})
    assert f"tenants.acme.budget.{field}:" in msg


def test_typos_are_errors_with_a_suggestion():
    msg = _problems({"acme": {"api_key_env": "ACME_KEY", "budget": {"flop": 1e15}}})
    assert "tenants.acme.budget.flop: unknown key; remove it" in msg
    assert "tenants.acme.api_key_env: required" in _problems({"acme": {"budget": {"flops": 1.0}}})


def test_api_key_env_must_be_a_variable_name_and_a_pasted_key_is_not_echoed():
    msg = _problems({"acme": {"api_key_env": SECRET}})
    assert "tenants.acme.api_key_env: Value error, must be an environment variable name" in msg
    assert SECRET not in msg
    assert "1BAD" not in _problems({"acme": {"api_key_env": "1BAD"}})
    assert "tenants.acme.api_key_env:" in _problems({"acme": {"api_key_env": 5}})


def test_tenant_names_follow_the_served_model_name_rule():
    assert tenant_name_problems({"acme": 1, "team.b_2-x": 1}) == []
    problems = tenant_name_problems({"bad name": 1, "-dash": 1, "ok": 1})
    assert [p.split(":")[0] for p in problems] == ["tenants.bad name", "tenants.-dash"]
    assert "letters, digits, '.', '_' or '-'" in problems[0]


def _tenants(**envs: str) -> dict[str, TenantConfig]:
    return {name: TenantConfig(api_key_env=env) for name, env in envs.items()}


def test_key_digests_map_each_key_to_its_tenant():
    tenants = _tenants(acme="ACME_KEY", free="FREE_KEY")
    digests = tenant_key_digests(tenants, {"ACME_KEY": SECRET, "FREE_KEY": "other-key"})
    # The same digest as the single-key ingress, so one comparison serves both.
    assert digests == {api_key_digest(SECRET): "acme", api_key_digest("other-key"): "free"}
    assert tenant_key_digests({}, {}) == {}


def test_unset_or_empty_key_variables_are_all_named():
    tenants = _tenants(acme="ACME_KEY", free="FREE_KEY", ok="OK_KEY")
    with pytest.raises(ConfigError) as err:
        tenant_key_digests(tenants, {"FREE_KEY": "", "OK_KEY": SECRET})
    assert len(err.value.problems) == 2
    assert err.value.problems[0].startswith("tenants.acme.api_key_env: environment variable ACME_KEY is not set")
    assert err.value.problems[1].startswith("tenants.free.api_key_env: environment variable FREE_KEY")
    assert SECRET not in str(err.value)


def test_tenants_sharing_a_key_are_refused_naming_both():
    tenants = _tenants(acme="ACME_KEY", beta="BETA_KEY", gamma="ACME_KEY", solo="SOLO_KEY")
    with pytest.raises(ConfigError) as err:
        tenant_key_digests(tenants, {"ACME_KEY": SECRET, "BETA_KEY": SECRET, "SOLO_KEY": "mine"})
    (problem,) = err.value.problems
    assert problem.startswith("tenants.acme.api_key_env and tenants.beta.api_key_env and tenants.gamma.api_key_env:")
    assert "ACME_KEY, BETA_KEY hold the same key" in problem
    assert SECRET not in str(err.value) and api_key_digest(SECRET) not in str(err.value)
    with pytest.raises(ConfigError, match="all read ACME_KEY"):
        tenant_key_digests(_tenants(a="ACME_KEY", b="ACME_KEY"), {"ACME_KEY": SECRET})


def test_no_tenant_field_holds_the_key_itself():
    cfg = TenantConfig(api_key_env="ACME_KEY", budget=TenantBudget(flops=1.0))
    assert "ACME_KEY" in repr(cfg)  # the variable's name, which is not a secret
    with pytest.raises(ValidationError, match="api_key"):
        TenantConfig(api_key_env="ACME_KEY", api_key=SECRET)  # no field can hold the key itself
