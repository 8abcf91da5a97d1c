"""Structured output as a request asks for it: ``response_format``, ``tools`` and ``tool_choice``.

One copy of these rules serves the node (what it generates) and the binding check (what a
client expects), like the rest of ``verify.binding``:

* the grammar (``verify.grammar``), which joins the sampling parameters:
  - ``tool_choice`` ``"required"`` or a named function: exactly one call,
    ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, its arguments valid against
    the function's ``parameters`` schema;
  - else ``response_format`` ``{"type": "json_object"}`` (any JSON object),
    ``{"type": "json_schema", "json_schema": {"schema": S}}`` (a document valid against ``S``),
    or the extension ``{"type": "grammar", "grammar": L}`` (a Lark grammar);
  - ``tool_choice`` ``"auto"`` (the default with tools) leaves the draw free: the model decides
    whether to call, as in vLLM and llama.cpp, and a call it writes is read back from the text;
* the tool prompt: a chat template that knows tools gets them as ``tools``; for one that does
  not (the default model's), ``with_tool_prompt`` adds the documented system text below;
* reading calls back: an answer that is, whitespace aside, nothing but ``<tool_call>`` blocks
  whose JSON names a listed function with an object of arguments is a list of tool calls
  (finish_reason ``"tool_calls"``); anything else is text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from verify.grammar import GrammarError, json_schema_grammar, lark_grammar

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_CALL_BLOCK = re.compile(r"\s*<tool_call>(.*?)</tool_call>\s*", re.DOTALL)
_ANY_OBJECT = {"type": "object"}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]

    @property
    def arguments_json(self) -> str:
        """The arguments as OpenAI serves them: a JSON string (compact, keys as the model wrote them)."""
        return json.dumps(self.arguments, ensure_ascii=False, separators=(",", ":"))


def _functions(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [t.get("function") or {} for t in body.get("tools") or [] if isinstance(t, Mapping)]


def tools_in_effect(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The function definitions the model is told about (none with ``tool_choice: "none"``)."""
    if body.get("tool_choice") == "none":
        return []
    return _functions(body)


def _call_schema(function: Mapping[str, Any]) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
            "properties": {"name": {"const": function["name"]}, "arguments": function.get("parameters") or _ANY_OBJECT}}


def _forced_functions(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The functions one of which the answer must call (empty: no call is forced)."""
    choice, functions = body.get("tool_choice"), _functions(body)
    if choice == "required":
        return functions
    if isinstance(choice, Mapping):
        name = (choice.get("function") or {}).get("name")
        named = [f for f in functions if f.get("name") == name]
        if not named:
            raise GrammarError(f"tool_choice names {name!r}, which is not among the tools")
        return named
    return []


def request_grammar(body: Mapping[str, Any]) -> str | None:
    """The canonical grammar a request's answer must follow (None: unconstrained); raises
    ``GrammarError`` for a schema or grammar the engine cannot compile."""
    if forced := _forced_functions(body):
        schema = {"anyOf": [_call_schema(f) for f in forced]} if len(forced) > 1 else _call_schema(forced[0])
        call = json.dumps({**schema, "x-guidance": {"whitespace_flexible": False}}, separators=(",", ":"), ensure_ascii=False)
        return lark_grammar(f'start: "{TOOL_CALL_OPEN}" call "{TOOL_CALL_CLOSE}"\ncall: %json {call}\n')
    fmt = body.get("response_format") or {}
    kind = fmt.get("type", "text")
    if kind == "json_object":
        return json_schema_grammar(_ANY_OBJECT)
    if kind == "json_schema":
        return json_schema_grammar((fmt.get("json_schema") or {}).get("schema") or _ANY_OBJECT)
    if kind == "grammar":
        return lark_grammar(fmt.get("grammar"))
    return None


def described(function: Mapping[str, Any]) -> dict[str, Any]:
    """What the model is told of a function: its name, description and parameters, whatever
    else (or whichever nulls) the request carried, so that node and client render it alike."""
    out: dict[str, Any] = {"name": function.get("name")}
    if function.get("description"):
        out["description"] = function["description"]
    if function.get("parameters") is not None:
        out["parameters"] = function["parameters"]
    return out


def tool_prompt(functions: Sequence[Mapping[str, Any]]) -> str:
    """The system text that describes tools to a model whose template does not know them."""
    listed = "\n".join(json.dumps(described(f), ensure_ascii=False, sort_keys=True) for f in functions)
    return ("You can call functions. To call one, answer with only "
            f'{TOOL_CALL_OPEN}{{"name": <function name>, "arguments": <arguments as a JSON object>}}{TOOL_CALL_CLOSE}. '
            f"The functions:\n{listed}")


def with_tool_prompt(messages: Sequence[Mapping[str, Any]], functions: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` with the tool prompt: appended to the first system message, or a new one first."""
    out = [dict(m) for m in messages]
    text = tool_prompt(functions)
    if out and out[0].get("role") == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{text}"
        return out
    return [{"role": "system", "content": text}, *out]


def call_text(calls: Sequence[Mapping[str, Any]]) -> str:
    """An assistant message's earlier tool calls (OpenAI ``tool_calls``) as the text the model
    wrote for them, so that a conversation renders the same whoever replays it."""
    blocks = []
    for call in calls:
        function = call.get("function") or {}
        arguments = function.get("arguments") or "{}"
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            pass  # kept as the string the client sent
        blocks.append(TOOL_CALL_OPEN + json.dumps({"name": function.get("name"), "arguments": arguments},
                                                  ensure_ascii=False) + TOOL_CALL_CLOSE)
    return "".join(blocks)


def read_tool_calls(text: str, functions: Sequence[Mapping[str, Any]]) -> list[ToolCall] | None:
    """The tool calls an answer's text makes (None: it is plain text; see the module docstring)."""
    names = {f.get("name") for f in functions}
    if not names or not text.strip():
        return None
    calls, position = [], 0
    for block in _CALL_BLOCK.finditer(text):
        if block.start() != position:
            return None
        position = block.end()
        try:
            doc = json.loads(block.group(1))
        except ValueError:
            return None
        if not (isinstance(doc, dict) and doc.get("name") in names and isinstance(doc.get("arguments"), dict)):
            return None
        calls.append(ToolCall(doc["name"], doc["arguments"]))
    return calls if calls and position == len(text) else None


__all__ = ["TOOL_CALL_CLOSE", "TOOL_CALL_OPEN", "ToolCall", "call_text", "described", "read_tool_calls", "request_grammar",
           "tool_prompt", "tools_in_effect", "with_tool_prompt"]
