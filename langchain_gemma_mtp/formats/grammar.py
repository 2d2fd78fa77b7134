"""Grammars for constrained output, in llguidance's Lark dialect: Gemma 4 tool calls generated from
each tool's JSON schema, calls of the JSON convention, and JSON answers (json_schema / json_object).

The text is compiled by the engine (engine/constraint.py) for the model's tokenizer; here only the
output format is known. Special tokens are written `<[id]>`, so `token(marker)` gives their ids.

Gemma 4 values follow what `formats/values.py` reads and `gemma4.to_gemma4_value` writes: strings
between `<|"|>` tokens, bare numbers, booleans and null, bare identifier keys (others quoted), no
whitespace, object keys in sorted order (the order the templates render). Text the grammar leaves
free (strings, thoughts, content) may not contain `<|` or `|>`: the output parser reads markers
from the text, so such text could open or close a region as plain characters.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import GrammarError
from .gemma4 import CHANNEL, TOOL_CALL, to_gemma4_value
from .json_calls import TOOL_CALL as JSON_TOOL_CALL
from .values import GEMMA_QUOTE

# Free text that cannot spell a marker of the Gemma 4 format (they all hold `<|` or `|>`): runs of
# `|` and `<` only where neither pair forms. Said without a complement (`~/.*(<\||\|>).*/`),
# because llguidance's lexer cannot intersect a complement with a length bound of more than a
# hundred or so characters ("too many expressions constructed").
_NO_MARKER = r"/([^<|]|\|*<+[^<|]|\|+[^<|>])*\|*<*/"
# Free text that cannot spell a marker of the JSON convention.
_NO_JSON_MARKER = r"~/(.|\n)*<(tool_call|\/tool_call|tool_response)>(.|\n)*/"
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Keywords that only annotate a schema: nothing to enforce.
_ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$comment",
        "strict",
        "deprecated",
        "readOnly",
        "writeOnly",
        "$defs",
        "definitions",
    }
)
_ENFORCED = frozenset(
    {"type", "properties", "required", "additionalProperties", "items", "enum", "const", "anyOf", "oneOf", "$ref", "nullable"}
    | {"minLength", "maxLength", "minItems", "maxItems"}
    | {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}
)
# Bounds of numbers: Gemma 4 writes numbers as JSON does, so llguidance's JSON compiler enforces them.
_NUMERIC = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
# Keywords that shape a string already: such a string is not free, and a length cap could make
# it unsatisfiable (a date-time format, a pattern with a minimum length).
_SHAPED_STRING = ("maxLength", "enum", "const", "pattern", "format")


@dataclass(frozen=True)
class OutputShape:
    """What a constrained answer must be.

    tools: the tools a call may name (empty: no calls); a call's arguments must match its tool's
    schema when the tool is marked strict (`function.strict`) or `strict` is set, else they are
    any object; calls_only: the answer is calls and nothing else (a forced
    tool_choice), else content may come first; single_call: at most one call (parallel_tool_calls
    false); json: the answer's JSON schema ({} for any JSON object), None for none; thinking: a
    thought channel may open the answer; in_thought: the prompt left one open, to be closed first;
    max_tokens: the answer's token budget, which caps free strings (`string_cap`) and a thought
    that calls or JSON must follow (`thought_cap`), None for no cap.
    """

    tools: Sequence[Mapping[str, Any]] = ()
    strict: bool = False
    calls_only: bool = False
    single_call: bool = False
    json: Mapping[str, Any] | None = None
    thinking: bool = False
    in_thought: bool = False
    max_tokens: int | None = None


def thought_cap(shape: OutputShape) -> int | None:
    """Characters a thought may take where calls or JSON must follow it: a quarter of the budget
    (a character is at least part of a token, so it is at most that many tokens), beside the half
    that free strings share (`string_cap`), so the constrained part still fits after the longest
    thought. None where the answer may end after the thought, or without a budget."""
    if shape.max_tokens is None or not (shape.calls_only or shape.json is not None):
        return None
    return max(1, shape.max_tokens // 4)


def string_cap(schema: Any, budget: int | None) -> int | None:
    """Tokens a free string of `schema` (a string with no maxLength, enum, const, pattern or
    format) may take so that a value of it fits `budget` tokens: half the budget, shared by the
    schema's free strings (an array's item counted maxItems times, once when unbounded; the
    widest option of an anyOf), the other half left for keys, punctuation and markers. None
    without a budget."""
    if budget is None:
        return None
    return max(1, budget // (2 * max(1, _free_strings(schema, schema, frozenset()))))


def _free_strings(schema: Any, root: Any, refs: frozenset[str]) -> int:
    if not isinstance(schema, Mapping):
        return 0
    ref = schema.get("$ref")
    if isinstance(ref, str):
        target = _resolve(root, ref)
        return 0 if ref in refs or target is None else _free_strings(target, root, refs | {ref})
    count = int(_free_string(schema))
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            count += max((_free_strings(o, root, refs) for o in schema[key]), default=0)
    if isinstance(schema.get("properties"), Mapping):
        count += sum(_free_strings(v, root, refs) for v in schema["properties"].values())
    times = schema.get("maxItems")
    count += _free_strings(schema.get("items"), root, refs) * (times if isinstance(times, int) and times > 0 else 1)
    return count + _free_strings(schema.get("additionalProperties"), root, refs)


def _free_string(schema: Mapping[str, Any]) -> bool:
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    return "string" in kinds and not any(k in schema for k in _SHAPED_STRING)


def _resolve(root: Any, ref: str) -> Any:
    """The local definition `#/$defs/NAME` (or `#/definitions/NAME`) names, None if none."""
    section, _, name = ref.removeprefix("#/").partition("/")
    defs = root.get(section) if isinstance(root, Mapping) and ref.startswith("#/") else None
    return defs.get(name) if isinstance(defs, Mapping) else None


# JSON's safe integers (what a double holds exactly): the bound of an integer whose schema sets none.
SAFE_INTEGER = 2**53 - 1


def bounded_strings(schema: Mapping[str, Any], budget: int | None) -> Mapping[str, Any]:
    """`schema` with a `maxLength` on each free string, for llguidance's JSON compiler (which has
    no token cap of its own): `string_cap(schema, budget)` characters (at least its minLength).
    A character is at most one token for ASCII text (every byte has a token), so an ASCII string
    keeps within the token cap. The schema's own maxLength wins. Integers with no bound of their
    own get JSON's safe range (+-SAFE_INTEGER: 16 digits at most), which a weak model would
    otherwise fill with digits to the end of the budget. None: unchanged."""
    cap = string_cap(schema, budget)
    return schema if cap is None else _cap(schema, cap)


def _cap(schema: Any, chars: int) -> Any:
    if isinstance(schema, list):
        return [_cap(s, chars) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = dict(schema)
    if _free_string(schema):
        low = schema.get("minLength")
        out["maxLength"] = max(chars, low) if isinstance(low, int) else chars
    if schema.get("type") == "integer":
        if "maximum" not in schema and "exclusiveMaximum" not in schema:
            out["maximum"] = SAFE_INTEGER
        if "minimum" not in schema and "exclusiveMinimum" not in schema:
            out["minimum"] = -SAFE_INTEGER
    for key in ("properties", "$defs", "definitions"):
        if isinstance(schema.get(key), Mapping):
            out[key] = {k: _cap(v, chars) for k, v in schema[key].items()}
    for key in ("items", "prefixItems", "additionalProperties", "anyOf", "oneOf", "allOf"):
        if key in schema:
            out[key] = _cap(schema[key], chars)
    return out


def gemma4_grammar(shape: OutputShape, token: Callable[[str], int]) -> str:
    """The grammar of a Gemma 4 answer of `shape`; GrammarError naming the schema part it cannot enforce."""
    rules = _Gemma4Rules(token, shape.max_tokens)
    calls = [rules.call(i, tool, _enforced(tool, shape)) for i, tool in enumerate(shape.tools)]
    cap = thought_cap(shape)
    lines = [f"THOUGHT: /(.|\\n){{0,{cap}}}/ & {_NO_MARKER}" if cap is not None else f"THOUGHT: /(.|\\n)*/ & {_NO_MARKER}"]
    if shape.in_thought:
        prefix = f"THOUGHT <[{token(CHANNEL.close)}]> "
    elif shape.thinking:
        prefix = f"(<[{token(CHANNEL.open)}]> THOUGHT <[{token(CHANNEL.close)}]>)? "
    else:
        prefix = ""
    body = _body(calls, shape, json_rule="json" if shape.json is not None else None)
    lines.append(f"CONTENT: /(.|\\n)+/ & {_NO_MARKER}")
    if shape.json is not None:
        lines.append(f"json: {json_part(bounded_strings(shape.json, shape.max_tokens))}")
    return "\n".join([f"start: {prefix}{body}".rstrip(), *lines, *rules.lines])


def json_convention_grammar(shape: OutputShape) -> str:
    """The grammar of an answer in the JSON tool-call convention (formats/json_calls.py), or a JSON answer."""
    calls = []
    lines = [f"CONTENT: /(.|\\n)+/ & {_NO_JSON_MARKER}"]
    for i, tool in enumerate(shape.tools):
        function = tool["function"]
        arguments = (function.get("parameters") or {"type": "object"}) if _enforced(tool, shape) else {"type": "object"}
        arguments = bounded_strings(arguments, shape.max_tokens)
        call = {
            "type": "object",
            "properties": {"name": {"const": function["name"]}, "arguments": arguments},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        lines.append(f"call_{i}: {json.dumps(JSON_TOOL_CALL.open)} {json_part(call)} {json.dumps(JSON_TOOL_CALL.close)}")
        calls.append(f"call_{i}")
    if shape.json is not None:
        lines.append(f"json: {json_part(bounded_strings(shape.json, shape.max_tokens))}")
    body = _body(calls, shape, json_rule="json" if shape.json is not None else None, separator='"\\n"?')
    return "\n".join([f"start: {body}", *lines])


def _enforced(tool: Mapping[str, Any], shape: OutputShape) -> bool:
    """Whether a tool's schema is enforced on its calls (else its arguments are any object)."""
    return shape.strict or tool["function"].get("strict") is True


def json_part(schema: Mapping[str, Any]) -> str:
    """A JSON value of `schema` ({}: any object), spaced as `json.dumps` writes it: one spelling of
    each value leaves the model no whitespace to wander in, and makes the separators jump-forward
    tokens. A schema's own `x-guidance` options win."""
    spacing = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    schema = dict(schema or {"type": "object"})
    schema["x-guidance"] = {**spacing, **(schema.get("x-guidance") or {})}
    return "%json" + json.dumps(schema)


def _body(calls: list[str], shape: OutputShape, json_rule: str | None, separator: str = "") -> str:
    """The answer after any thought: calls, CONTENT then calls, or a JSON answer (or calls instead of it)."""
    call = "(" + " | ".join(calls) + ")" if calls else None
    many = call if shape.single_call or call is None else f"({call} ({separator} {call})*)".replace("( ", "(")
    if json_rule is not None:
        return f"({many} | {json_rule})" if many else json_rule
    if shape.calls_only and many:
        return many
    return f"CONTENT? {many}?" if many else "CONTENT?"


class _Gemma4Rules:
    """Lark rules for Gemma 4 values of JSON schemas; each rule named once, `$ref`s as rules (so recursion works)."""

    def __init__(self, token: Callable[[str], int], budget: int | None = None) -> None:
        self.quote = f"<[{token(GEMMA_QUOTE)}]>"
        self.token = token
        self.budget = budget
        self.cap: int | None = None  # tokens a free string of the tool at hand may take (`string_cap`)
        self.lines: list[str] = []
        self.count = 0
        self.generic = False
        self.refs: dict[str, str] = {}
        self.root: Mapping[str, Any] = {}

    def name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}_{self.count}"

    def call(self, index: int, tool: Mapping[str, Any], strict: bool) -> str:
        function = tool["function"]
        where = f"tools[{index}].function.parameters"
        schema = function.get("parameters") if strict else None
        if schema is None:  # not strict: any arguments object
            self.any_value()
            arguments = "any_object"
        elif not isinstance(schema, Mapping) or _types(schema, where) not in (["object"], None):
            raise GrammarError(f"{where} must be an object schema (type: object), got {json.dumps(schema)[:80]}.")
        else:
            self.root, self.refs, self.cap = schema, {}, string_cap(schema, self.budget)
            arguments = self.value({**schema, "type": "object"}, where)
        rule = f"call_{index}"
        head = json.dumps("call:" + function["name"])
        self.lines.append(f"{rule}: <[{self.token(TOOL_CALL.open)}]> {head} {arguments} <[{self.token(TOOL_CALL.close)}]>")
        return rule

    # -- values -----------------------------------------------------------------------------------

    def value(self, schema: Any, where: str) -> str:
        """An expression for the values `schema` allows."""
        if schema is True or (isinstance(schema, Mapping) and not set(schema) - _ANNOTATIONS):
            return self.any_value()
        if not isinstance(schema, Mapping):
            raise GrammarError(f"{where} is {json.dumps(schema)[:80]}, which allows no value: use a schema object.")
        unknown = sorted(set(schema) - _ANNOTATIONS - _ENFORCED)
        if unknown:
            raise GrammarError(
                f"{where}.{unknown[0]}: the JSON-schema keyword {unknown[0]!r} cannot be enforced in Gemma 4's call "
                "syntax; drop it (say it in the description) or leave the tool non-strict."
            )
        if "$ref" in schema:
            return self.ref(schema["$ref"], where)
        if "const" in schema:
            return self.literal(schema["const"])
        if "enum" in schema:
            if not isinstance(schema["enum"], list) or not schema["enum"]:
                raise GrammarError(f"{where}.enum must be a non-empty list.")
            return "(" + " | ".join(self.literal(v) for v in schema["enum"]) + ")"
        for key in ("anyOf", "oneOf"):  # oneOf as anyOf: exclusive matches cannot be enforced by a grammar
            if key in schema:
                options = schema[key]
                if not isinstance(options, list) or not options:
                    raise GrammarError(f"{where}.{key} must be a non-empty list of schemas.")
                rest = {k: v for k, v in schema.items() if k != key}
                return (
                    "("
                    + " | ".join(
                        self.value({**rest, **o} if isinstance(o, Mapping) else o, f"{where}.{key}[{i}]") for i, o in enumerate(options)
                    )
                    + ")"
                )
        types = _types(schema, where) or (["object"] if "properties" in schema else ["array"] if "items" in schema else None)
        if types is None:
            return self.any_value()
        if schema.get("nullable") is True and "null" not in types:
            types = [*types, "null"]
        return "(" + " | ".join(self.typed(t, schema, where) for t in types) + ")"

    def typed(self, kind: str, schema: Mapping[str, Any], where: str) -> str:
        if kind == "string":
            return self.string(schema, where)
        bounds = {k: schema[k] for k in _NUMERIC if k in schema}
        if kind in ("integer", "number") and bounds:
            return json_part({"type": kind, **bounds})
        if kind == "integer":
            return self.terminal("INTEGER", r"/-?(0|[1-9][0-9]{0,17})/")
        if kind == "number":
            return self.terminal("NUMBER", r"/-?(0|[1-9][0-9]{0,17})(\.[0-9]{1,17})?([eE][+-]?[0-9]{1,2})?/")
        if kind == "boolean":
            return '("true" | "false")'
        if kind == "null":
            return '"null"'
        if kind == "array":
            return self.array(schema, where)
        if kind == "object":
            return self.object(schema, where)
        raise GrammarError(f"{where}.type: unknown type {kind!r}; use string, integer, number, boolean, null, array or object.")

    def terminal(self, name: str, regex: str) -> str:
        if not any(line.startswith(name + ":") for line in self.lines):
            self.lines.append(f"{name}: {regex}")
        return name

    def string(self, schema: Mapping[str, Any], where: str) -> str:
        low, high = _bounds(schema, "minLength", "maxLength", where)
        if high is None and self.cap is not None:
            high = max(self.cap, low)  # in characters, as for JSON (`bounded_strings`)
        if low == 0 and high is None:
            body = self.terminal("TEXT", f"/(.|\\n)*/ & {_NO_MARKER}")
        else:
            body = self.terminal(f"TEXT_{low}_{high}", f"/(.|\\n){{{low},{'' if high is None else high}}}/ & {_NO_MARKER}")
        return f"{self.quote} {body} {self.quote}"

    def array(self, schema: Mapping[str, Any], where: str) -> str:
        items = schema.get("items", True)
        if isinstance(items, list):
            raise GrammarError(f"{where}.items: tuple-style items (a list of schemas) cannot be enforced; use one schema for every item.")
        low, high = _bounds(schema, "minItems", "maxItems", where)
        item = self.name("item")
        self.lines.append(f"{item}: {self.value(items, where + '.items')}")
        if high == 0:
            return '"[" "]"'
        listed = item if high == 1 else f'{item} ("," {item}){{{max(low - 1, 0)},{"" if high is None else high - 1}}}'
        return f'"[" {listed} "]"' if low > 0 else f'"[" ({listed})? "]"'

    def object(self, schema: Mapping[str, Any], where: str) -> str:
        properties = schema.get("properties")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(k, str) for k in required):
            raise GrammarError(f"{where}.required must be a list of property names.")
        if properties is None and not required:
            extra = schema.get("additionalProperties", True)
            if extra is False:
                return '"{" "}"'
            member = self.name("member")
            self.lines.append(f'{member}: {self.key_any()} ":" {self.value(extra, where + ".additionalProperties")}')
            return f'"{{" ({member} ("," {member})*)? "}}"'
        if properties is not None and not isinstance(properties, Mapping):
            raise GrammarError(f"{where}.properties must be an object mapping names to schemas.")
        # Extra keys are never written (additionalProperties aside): every output still validates.
        props = dict(properties or {})
        for key in required:
            props.setdefault(key, True)
        members = [(key, props[key], key in required) for key in sorted(props)]
        exprs = [f'{self.key(key)} ":" {self.value(s, f"{where}.properties.{key}")}' for key, s, _ in members]
        return f'"{{" {self.members(exprs, [r for _, _, r in members])} "}}"'.replace("  ", " ")

    def members(self, exprs: list[str], required: list[bool]) -> str:
        """Members in order, optional ones skippable, commas between the ones written: rule
        `rest(i, lead)` is what follows from member i on, `lead` when a comma must come first."""
        rules: dict[tuple[int, bool], str] = {}

        def rest(i: int, lead: bool) -> str:
            if i == len(exprs):
                return ""
            if (i, lead) not in rules:
                here = (f'"," {exprs[i]}' if lead else exprs[i]) + " " + rest(i + 1, True)
                if required[i]:
                    expr = here.strip()
                else:
                    skip = rest(i + 1, lead)
                    expr = f"({here.strip()} | {skip})" if skip else f"({here.strip()})?"
                name = self.name("members")
                self.lines.append(f"{name}: {expr}")
                rules[(i, lead)] = name
            return rules[(i, lead)]

        return rest(0, False)

    def key(self, key: str) -> str:
        return json.dumps(key) if _IDENT.fullmatch(key) else f"{self.quote} {json.dumps(key)} {self.quote}"

    def key_any(self) -> str:
        ident = self.terminal("IDENT", r"/[A-Za-z_][A-Za-z0-9_]*/")
        text = self.terminal("KEYTEXT", r"/(.|\n)+/ & " + _NO_MARKER)
        return f"({ident} | {self.quote} {text} {self.quote})"

    def literal(self, value: Any) -> str:
        """A value written as `to_gemma4_value` writes it: text pieces around quote tokens."""
        try:
            text = to_gemma4_value(value)
        except (TypeError, ValueError) as exc:
            raise GrammarError(f"enum/const value {value!r} cannot be written as a Gemma 4 value: {exc}") from exc
        parts: list[str] = []
        for i, piece in enumerate(text.split(GEMMA_QUOTE)):
            parts += [self.quote] if i else []
            parts += [json.dumps(piece)] if piece else []
        return "(" + " ".join(parts) + ")"

    def ref(self, ref: Any, where: str) -> str:
        if not isinstance(ref, str) or not re.fullmatch(r"#/(\$defs|definitions)/[^/]+", ref):
            raise GrammarError(f"{where}.$ref {ref!r}: only local references (#/$defs/NAME or #/definitions/NAME) can be enforced.")
        if ref not in self.refs:
            section, name = ref[2:].split("/", 1)
            target = self.root.get(section, {}).get(name) if isinstance(self.root.get(section), Mapping) else None
            if target is None:
                raise GrammarError(f"{where}.$ref {ref!r} names no definition in the schema.")
            rule = self.name("ref")
            self.refs[ref] = rule
            self.lines.append(f"{rule}: {self.value(target, f'{where}({ref})')}")
        return self.refs[ref]

    def any_value(self) -> str:
        """Any Gemma 4 value (rules made once)."""
        if not self.generic:
            self.generic = True
            text = self.terminal("TEXT", f"/(.|\\n)*/ & {_NO_MARKER}")
            number = self.terminal("NUMBER", r"/-?(0|[1-9][0-9]{0,17})(\.[0-9]{1,17})?([eE][+-]?[0-9]{1,2})?/")
            self.lines += [
                f'any_value: any_object | any_array | {self.quote} {text} {self.quote} | {number} | "true" | "false" | "null"',
                'any_object: "{" (any_member ("," any_member)*)? "}"',
                f'any_member: {self.key_any()} ":" any_value',
                'any_array: "[" (any_value ("," any_value)*)? "]"',
            ]
        return "any_value"


def _types(schema: Mapping[str, Any], where: str) -> list[str] | None:
    kind = schema.get("type")
    if kind is None:
        return None
    kinds = kind if isinstance(kind, list) else [kind]
    if not kinds or not all(isinstance(k, str) for k in kinds):
        raise GrammarError(f"{where}.type must be a type name or a list of them, got {kind!r}.")
    return kinds


def _bounds(schema: Mapping[str, Any], low_key: str, high_key: str, where: str) -> tuple[int, int | None]:
    low, high = schema.get(low_key, 0), schema.get(high_key)
    for key, value in ((low_key, low), (high_key, high)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise GrammarError(f"{where}.{key} must be an int >= 0, got {value!r}.")
    if high is not None and high < low:
        raise GrammarError(f"{where}: {high_key} ({high}) is below {low_key} ({low}).")
    return low, high
