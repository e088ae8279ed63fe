"""Reading a policy file's YAML, and turning validation errors into one line.

Start-up code only: a bad policy file stops ``symbi up`` with a single line
that names the file, the policy (by name, else by index) and the field, e.g.
``policies.yaml: policy 'docker_to_gvisor': rate_limits.messages_per_second:
must be > 0``. PyYAML silently keeps the last of two equal keys in a mapping;
the loader here refuses them, so a pasted-twice block is an error too.
"""

from __future__ import annotations

import difflib
from collections.abc import Hashable
from typing import Any, Final, get_args

import yaml
from pydantic import BaseModel, ValidationError

from agent_sdk.errors import ConfigError


def read_yaml(text: str, source: str) -> Any:
    """Parse ``text`` with a safe loader that refuses duplicate keys."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: {_yaml_problem(exc)}") from exc


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key repeated in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            if isinstance(key, Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        problem = " ".join(str(exc.problem or exc.context or "invalid YAML").split())
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return "invalid YAML: " + " ".join(str(exc).split())


_EXPECTED_TYPE: Final = {
    "bool_type": "true or false", "bool_parsing": "true or false",
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
    "string_type": "a string", "tuple_type": "a list", "list_type": "a list",
    "dict_type": "a mapping", "model_type": "a mapping",
}  # fmt: skip
_YAML_KIND: Final[dict[type, str]] = {
    type(None): "nothing", bool: "a boolean", int: "a number", float: "a number",
    str: "a string", list: "a list", dict: "a mapping",
}  # fmt: skip
_COMPARISONS: Final = {
    "greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"), "less_than_equal": ("le", "<="),
}  # fmt: skip


def describe_error(exc: ValidationError, data: object, source: str, root: type[BaseModel]) -> str:
    """One line for the first error: file, policy (by name or index), field, problem."""
    errors = exc.errors(include_url=False)
    # A misspelt field shows up twice, as unknown and (if required) as missing:
    # the unknown one, with its suggestion, is the more useful line.
    error = min(errors, key=lambda e: e["type"] != "extra_forbidden")
    loc = error["loc"]
    where, rest = source, loc
    if len(loc) >= 2 and loc[0] == "communication_policies" and isinstance(loc[1], int):
        where, rest = f"{source}: {_policy_label(data, loc[1])}", loc[2:]
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in rest if p != "[key]")
    line = f"{where}: {path[1:]}: " if path else f"{where}: "
    extra = len(errors) - 1
    more = f" (and {extra} more problem{'s' if extra > 1 else ''})" if extra else ""
    return line + _problem(error["type"], error, loc, root) + more


def _policy_label(data: object, index: int) -> str:
    try:
        name = data["communication_policies"][index]["name"]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        name = None
    return f"policy {name!r}" if isinstance(name, str) else f"communication_policies[{index}]"


def _problem(kind: str, error: Any, loc: tuple[int | str, ...], root: type[BaseModel]) -> str:
    ctx: dict[str, Any] = error.get("ctx") or {}
    if kind == "missing":
        return "required field missing"
    if kind == "extra_forbidden":
        model = _model_at(root, loc[:-1])
        names = list(model.model_fields) if model is not None else []
        close = difflib.get_close_matches(str(loc[-1]), names, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "expected " + " or ".join(names)
        if not close and len(names) > 2:
            hint = "expected one of " + ", ".join(names)
        return f"unknown field; {hint}"
    if kind == "literal_error":
        return f"unknown value {error['input']!r}: expected {ctx.get('expected')}"
    if kind in _COMPARISONS:
        key, op = _COMPARISONS[kind]
        limit = ctx.get(key)
        if isinstance(limit, float) and limit.is_integer():
            limit = int(limit)
        return f"must be {op} {limit}"
    if kind == "too_short":
        return "must not be empty"
    if kind == "string_pattern_mismatch":
        return f"{error['input']!r} does not match {ctx.get('pattern')}"
    if kind in _EXPECTED_TYPE:
        value = error["input"]
        scalar = isinstance(value, str | int | float) and loc
        got = repr(value) if scalar else _YAML_KIND.get(type(value), type(value).__name__)
        if not loc:
            return f"must be a mapping with the key communication_policies, got {got}"
        return f"must be {_EXPECTED_TYPE[kind]}, got {got}"
    return str(error["msg"]).removeprefix("Value error, ")


def _model_at(root: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model that the field at ``loc`` (a validation error's path) belongs in."""
    annotation: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        model = _as_model(annotation)
        if model is None or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
    return _as_model(annotation)


def _as_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, map(_as_model, get_args(annotation))), None)
