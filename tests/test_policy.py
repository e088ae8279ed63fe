"""Loading, validating and compiling policy files."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent_sdk.errors import ConfigError
from agent_sdk.names import LEVEL_RANK, TIERS
from policy_worker.policy import (
    BUILTIN_CAPABILITIES,
    Policy,
    PolicySet,
    default_policies,
    load_policies,
    parse_policies,
)

# The seed format, exactly as the design document gives it.
SEED = """\
communication_policies:
  - name: docker_to_gvisor
    source_tier: docker
    destination_tier: gvisor
    allowed_message_types: [data, event, rpc]
    security_requirements:
      encryption_required: true
      signature_required: true
      audit_logging: true
      content_filtering: true
    rate_limits:
      messages_per_second: 100
      burst_size: 200
"""
WHERE = "policies.yaml: policy 'docker_to_gvisor': "


def seed_with(**changes: Any) -> str:
    """The seed file with the first policy's fields changed (None removes one)."""
    data = yaml.safe_load(SEED)
    policy = data["communication_policies"][0]
    for key, value in changes.items():
        if value is None:
            policy.pop(key)
        else:
            policy[key] = value
    return yaml.safe_dump(data, sort_keys=False)


def config_error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_policies(text, source="policies.yaml")
    message = str(info.value)
    assert "\n" not in message, "a policy error is one line"
    return message


def test_the_seed_format_loads_unchanged() -> None:
    policies = parse_policies(SEED, source="policies.yaml")
    policy = policies.lookup("docker", "gvisor")
    assert policy is not None
    assert policy.name == "docker_to_gvisor"
    assert policy.allowed_types == {"data", "event", "rpc"}
    assert policy.encryption_min_rank == 0
    assert policy.audit_logging
    assert policy.content_filtering
    assert not policy.content_filter.rules
    assert (policy.rate, policy.burst) == (100, 200)
    assert policy.required_capabilities == BUILTIN_CAPABILITIES
    assert policies.lookup("gvisor", "docker") is None
    assert len(policies) == 1
    assert policies.get("docker_to_gvisor") is policy


def test_load_policies_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "policies.yaml"
    path.write_text(SEED)
    assert load_policies(path).lookup("docker", "gvisor") is not None


def test_errors_name_the_file_as_given(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(seed_with(source_tier="dockr"))
    with pytest.raises(ConfigError, match=f"^{path}: policy 'docker_to_gvisor': source_tier: "):
        load_policies(path)


def test_a_missing_file_is_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"^{path}: cannot read the policy file: "):
        load_policies(path)


def test_the_defaults_load_and_cover_every_pair() -> None:
    policies = default_policies()
    assert default_policies() is policies
    for src in TIERS:
        for dst in (*TIERS, "host"):
            policy = policies.lookup(src, dst)
            assert policy is not None, f"{src} -> {dst}"
            assert policy.name == f"{src}_to_{dst}"
            assert "event" in policy.allowed_types
            assert policy.audit_logging
            assert not policy.content_filtering


def test_the_defaults_keep_the_demo_paths_open() -> None:
    policies = default_policies()
    same = policies.lookup("docker", "docker")
    assert same is not None
    assert same.encryption_min_rank is None  # plaintext data docker -> docker
    for src, dst in (("docker", "gvisor"), ("gvisor", "docker")):
        policy = policies.lookup(src, dst)
        assert policy is not None
        assert "rpc" in policy.allowed_types
        assert "control" not in policy.allowed_types
        assert policy.encryption_min_rank == LEVEL_RANK["confidential"]
    inside = policies.lookup("firecracker", "firecracker")
    assert inside is not None
    assert inside.encryption_min_rank == LEVEL_RANK["confidential"]


def test_optional_fields_compile() -> None:
    text = seed_with(
        destination_tier="host",
        security_requirements={
            "encryption_min_level": "secret",
            "audit_logging": False,
            "content_filtering": True,
        },
        max_payload_bytes=1024,
        content_filter={
            "inspect_sealed": True,
            "rules": [{"name": "shout", "pattern": "^hello", "ignore_case": True}],
        },
        required_capabilities={"data": ["analytics"], "rpc": ["rpc", "extra"]},
        allow_senders=["docker.*"],
        deny_senders=["docker.bad-?", "docker.worst"],
        allow_recipients=["host.launcher", "event.news.*"],
        deny_recipients=[],
        description="for the tests",
    )
    policy = parse_policies(text).lookup("docker", "host")
    assert policy is not None
    assert policy.encryption_min_rank == LEVEL_RANK["secret"]
    assert not policy.audit_logging
    assert policy.max_payload_bytes == 1024
    assert policy.content_filter.inspect_sealed
    assert policy.content_filter.first_match(b"HELLO there") == "shout"
    assert policy.required_capabilities["data"] == ("analytics",)
    assert policy.required_capabilities["rpc"] == ("rpc", "extra")
    assert policy.required_capabilities["control"] == ("control",)
    assert policy.allow_senders is not None
    assert policy.deny_senders is not None
    assert policy.allow_senders.matches("docker.a1")
    assert not policy.allow_senders.matches("gvisor.a1")
    assert policy.deny_senders.matches("docker.bad-1")
    assert policy.deny_senders.matches("docker.worst")
    assert not policy.deny_senders.matches("docker.bad-12")
    assert policy.allow_recipients is not None
    assert policy.allow_recipients.matches("event.news.sport.today")
    assert policy.deny_recipients is not None
    assert not policy.deny_recipients.matches("host.launcher")


def test_the_default_rate_limit_applies_when_omitted() -> None:
    policy = parse_policies(seed_with(rate_limits=None)).lookup("docker", "gvisor")
    assert policy is not None
    assert (policy.rate, policy.burst) == (100, 200)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param(
            {"rate_limit": {"messages_per_second": 1, "burst_size": 1}},
            "rate_limit: unknown field; did you mean 'rate_limits'?",
            id="typo-field",
        ),
        pytest.param(
            {"security_requirements": {"encryption_requried": True}},
            "security_requirements.encryption_requried: unknown field;"
            " did you mean 'encryption_required'?",
            id="typo-nested-field",
        ),
        pytest.param(
            {"source_tier": "dockr"},
            "source_tier: unknown value 'dockr': expected 'docker', 'gvisor' or 'firecracker'",
            id="unknown-tier",
        ),
        pytest.param(
            {"destination_tier": "vm"},
            "destination_tier: unknown value 'vm': expected 'docker', 'gvisor', 'firecracker'"
            " or 'host'",
            id="unknown-destination-tier",
        ),
        pytest.param(
            {"allowed_message_types": ["data", "email"]},
            "allowed_message_types[1]: unknown value 'email'",
            id="unknown-type",
        ),
        pytest.param(
            {"allowed_message_types": []}, "allowed_message_types: must not be empty", id="no-type"
        ),
        pytest.param(
            {"rate_limits": {"messages_per_second": -5, "burst_size": 10}},
            "rate_limits.messages_per_second: must be > 0",
            id="negative-rate",
        ),
        pytest.param(
            {"rate_limits": {"messages_per_second": 0, "burst_size": 10}},
            "rate_limits.messages_per_second: must be > 0",
            id="zero-rate",
        ),
        pytest.param(
            {"rate_limits": {"messages_per_second": 10, "burst_size": 0}},
            "rate_limits.burst_size: must be >= 1",
            id="zero-burst",
        ),
        pytest.param(
            {"rate_limits": {"messages_per_second": 10}},
            "rate_limits.burst_size: required field missing",
            id="missing-burst",
        ),
        pytest.param(
            {"content_filter": {"rules": [{"name": "x", "pattern": "(unclosed"}]}},
            "content_filter.rules[0].pattern: bad regex '(unclosed': missing ),",
            id="bad-regex",
        ),
        pytest.param(
            {"security_requirements": {"signature_required": False}},
            "security_requirements.signature_required: must be true",
            id="unsigned-policy",
        ),
        pytest.param(
            {"security_requirements": {"content_filtering": False}, "content_filter": {}},
            "content_filter: its rules apply only with security_requirements.content_filtering",
            id="filter-without-filtering",
        ),
        pytest.param(
            {"allow_senders": ["dockr.*"]},
            "allow_senders: 'dockr.*': 'dockr' is not one of",
            id="bad-glob-tier",
        ),
        pytest.param(
            {"deny_recipients": ["Docker/a1"]},
            "deny_recipients: 'Docker/a1' is not an address or a glob",
            id="bad-glob",
        ),
        pytest.param(
            {"allow_senders": []},
            "allow_senders: must not be empty (omit the field to allow everyone)",
            id="empty-allow-list",
        ),
        pytest.param(
            {"max_payload_bytes": 0}, "max_payload_bytes: must be >= 1", id="zero-max-payload"
        ),
        pytest.param(
            {"security_requirements": {"audit_logging": "sometimes"}},
            "security_requirements.audit_logging: ",
            id="not-a-bool",
        ),
    ],
)
def test_each_validation_error_is_one_line_naming_file_policy_and_field(
    changes: dict[str, Any], expected: str
) -> None:
    message = config_error(seed_with(**changes))
    assert message.startswith(WHERE + expected), message


def test_duplicate_pair_names_both_policies() -> None:
    data = yaml.safe_load(SEED)
    other = copy.deepcopy(data["communication_policies"][0])
    other["name"] = "another"
    data["communication_policies"].append(other)
    message = config_error(yaml.safe_dump(data))
    assert message == (
        "policies.yaml: policy 'another': destination_tier: docker -> gvisor"
        " is already governed by policy 'docker_to_gvisor'"
    )


def test_duplicate_name() -> None:
    data = yaml.safe_load(SEED)
    other = copy.deepcopy(data["communication_policies"][0])
    other["destination_tier"] = "firecracker"
    data["communication_policies"].append(other)
    message = config_error(yaml.safe_dump(data))
    assert message == "policies.yaml: policy 'docker_to_gvisor': name: used by two policies"


def test_a_policy_without_a_name_is_named_by_index() -> None:
    message = config_error(seed_with(name=None))
    assert message == "policies.yaml: communication_policies[0]: name: required field missing"


def test_several_problems_are_still_one_line() -> None:
    message = config_error(seed_with(source_tier="x", destination_tier="y"))
    assert message.startswith(WHERE + "source_tier: unknown value 'x'")
    assert message.endswith("(and 1 more problem)")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "policies.yaml: must be a mapping with the key communication_policies, got nothing"),
        ("- 1\n", "policies.yaml: must be a mapping with the key communication_policies"),
        (
            "policies: []\n",
            "policies.yaml: policies: unknown field; expected communication_policies",
        ),
        ("{}\n", "policies.yaml: communication_policies: required field missing"),
        ("communication_policies: [\n", "policies.yaml: line 2, column 1: "),
        (SEED + "    name: again\n", "policies.yaml: line 14, column 5: duplicate key 'name'"),
    ],
)
def test_file_level_errors(text: str, expected: str) -> None:
    assert config_error(text).startswith(expected)


def test_an_empty_list_is_a_valid_deny_everything_file() -> None:
    assert len(parse_policies("communication_policies: []\n")) == 0


def test_policyset_refuses_duplicates_when_built_in_code() -> None:
    policy = Policy("p", "docker", "docker", frozenset({"data"}), rate=1, burst=1)
    twin = Policy("q", "docker", "docker", frozenset({"data"}), rate=1, burst=1)
    with pytest.raises(ConfigError, match="already governed by policy 'p'"):
        PolicySet([policy, twin], source="code")
    assert PolicySet([policy]).lookup("docker", "docker") is policy
