"""A chat request's tools, tool choice, response format and template variables, turned into what
the template renders, what constrains the output (a GrammarSpec) and how the answer is read back
(ChatOutput).

Tools reach the template as its `tools` variable. DeepSeek's published templates write the calls of
earlier turns but never list the available tools, so when a template does not read `tools` the tools
are described in a system message of our own, which shows the template's own call format.
`tool_choice` "none" leaves the tools out and reads no calls; "required" and a named function
constrain the answer to calls whose arguments follow the functions' schemas (dsv3.core.grammar).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from dsv3.core import grammar
from dsv3.core.errors import RequestError
from dsv3.core.tokenizer import TEMPLATE_VARIABLES
from dsv3.serve.chat_output import ChatOutput
from dsv3.serve.reasoning import THINK_END, ReasoningParser, reasoning_mode
from dsv3.serve.tool_parsers import (CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP, ToolCallFormat, ToolCallParser,
                                     detect_format)


@functools.lru_cache(maxsize=8)
def tool_format(tok) -> ToolCallFormat | None:
    """The tool-call format of a tokenizer's chat template (None: it writes no tool calls we know)."""
    if not tok.chat_template:
        return None
    return detect_format(lambda messages: tok.render_chat(messages, add_generation_prompt=False))


def tools_system_prompt(fmt: ToolCallFormat, tools: list[dict]) -> str:
    """The tools described for a template that does not list them: the layout of DeepSeek-V3.1's
    model card (a `## Tools` section after the system prompt), showing the template's own call format."""
    lines = ["## Tools", "You have access to the following tools:"]
    for t in tools:
        f = t["function"]
        lines += ["", f"### {f['name']}", f"Description: {f.get('description') or ''}", "",
                  f"Parameters: {json.dumps(f.get('parameters') or {'type': 'object'}, ensure_ascii=False)}"]
    example = fmt.call_begin("tool_call_name") + "tool_call_arguments" + fmt.call_end
    chain = ("put each further call on a new line" if fmt.separator == "\n"
             else "chain them directly without separators or spaces")
    lines += ["", "IMPORTANT: ALWAYS adhere to this exact format for tool use:",
              f"{CALLS_BEGIN}{example}{{additional_tool_calls}}{CALLS_END}", "", "Where:",
              "- `tool_call_name` must be an exact match to one of the available tools",
              "- `tool_call_arguments` must be valid JSON that strictly follows the tool's Parameters Schema",
              f"- For multiple tool calls, {chain}"]
    return "\n".join(lines)


def with_tools_described(messages: list[dict], text: str) -> list[dict]:
    """`text` appended to the system prompt: to the last system message (R1's template keeps only
    the last one; the others join them all), or as a first system message."""
    # `trusted_tail`: this text is ours, so its control-token text (the call format it shows) is encoded
    # as control tokens, while the rest of the content stays plain text (Tokenizer.chat_prompt)
    last = max((i for i, m in enumerate(messages) if m["role"] == "system"), default=None)
    if last is None:
        return [{"role": "system", "content": text, "trusted_tail": text}] + messages
    out = list(messages)
    out[last] = dict(out[last], content=f"{out[last]['content']}\n\n{text}", trusted_tail=f"\n\n{text}")
    return out


@dataclass
class ChatPlan:
    messages: list[dict]                   # for the template
    tools: list[dict] | None               # the template's `tools` variable
    template_kwargs: dict | None
    tool_format: ToolCallFormat | None     # read tool calls from the answer in this format (None: none)
    grammar: grammar.GrammarSpec | None    # what the answer must match

    def output(self, tok, prompt_text: str) -> tuple[ChatOutput, grammar.GrammarSpec | None]:
        """How to read this answer back, and its grammar, once the prompt is rendered: a prompt that
        opens the reasoning leaves the grammar waiting for `</think>`."""
        mode = reasoning_mode(tok.chat_template, prompt_text)
        spec = self.grammar
        if spec is not None and mode == "open":
            end = tok.token_id(THINK_END)
            if end is None:
                raise ChatRequestError(f"this model reasons before it answers, and its tokenizer has no single "
                                       f"{THINK_END} token to start the constraint after; send the request "
                                       f"without response_format or tool_choice", "response_format")
            spec = spec.after(end)
        tools = ToolCallParser(self.tool_format) if self.tool_format is not None else None
        return ChatOutput(ReasoningParser(mode) if mode else None, tools), spec


def _as_template_reads(message: dict) -> dict:
    """A message as DeepSeek's templates read it: an assistant turn's tool calls with their arguments
    as JSON text, and its content None when empty (V3's template writes the calls only then; clients
    send "" as often as null)."""
    if not message.get("tool_calls"):
        return message
    calls = []
    for c in message["tool_calls"]:
        f = c.get("function") or {}
        arguments = f.get("arguments", "{}")
        calls.append(dict(c, type=c.get("type", "function"), function=dict(
            f, arguments=arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False))))
    return dict(message, content=message.get("content") or None, tool_calls=calls)


class ChatRequestError(RequestError):
    """A chat request whose tools, tool_choice or response_format do not fit; `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def plan(tok, messages: list[dict], tools: list[dict] | None = None, tool_choice: str | dict | None = None,
         parallel_tool_calls: bool = True, response_format: dict | None = None,
         template_kwargs: dict | None = None) -> ChatPlan:
    """Check a chat's tools (OpenAI function tools), tool_choice ("auto", "none", "required" or
    {"type": "function", "function": {"name": ...}}) and response_format against each other and the
    template; ChatRequestError naming the field when they do not fit. `messages` are the template's
    (role, content, tool_calls, ...)."""
    messages = [_as_template_reads(m) for m in messages]
    if template_kwargs is not None:
        reserved = sorted(set(template_kwargs) & TEMPLATE_VARIABLES)
        if reserved:
            raise ChatRequestError(f"chat_template_kwargs may not set {', '.join(reserved)}: the server sets them",
                                   "chat_template_kwargs")
    tools = tools or None
    for i, t in enumerate(tools or []):
        f = t.get("function") if isinstance(t, dict) else None
        if not (t.get("type") == "function" and isinstance(f, dict) and isinstance(f.get("name"), str)
                and isinstance(f.get("parameters", {}), (dict, type(None)))):
            raise ChatRequestError(f"tools[{i}]: expected {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                                   f"\"parameters\": {{JSON schema}}}}}}, got {t!r:.80}", "tools")
    choice = tool_choice if tool_choice is not None else ("auto" if tools else "none")
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not (choice in ("auto", "none", "required") or isinstance(named, str)):
        raise ChatRequestError(f"tool_choice must be \"auto\", \"none\", \"required\" or {{\"type\": \"function\", "
                               f"\"function\": {{\"name\": ...}}}}, got {choice!r:.80}", "tool_choice")
    if choice != "none" and not tools:
        raise ChatRequestError("tool_choice needs tools: give the functions the model may call in `tools`",
                               "tool_choice")
    fmt = spec = None
    if tools and choice != "none":
        fmt = tool_format(tok)
        if fmt is None:
            raise ChatRequestError("this checkpoint's chat template writes no tool calls in a format this server "
                                   "reads (DeepSeek V3/R1's or V3.1's); send the request without tools", "tools")
        hidden = [m for m in (CALLS_BEGIN, CALL_BEGIN, SEP, CALL_END, CALLS_END) if m in tok.special_texts]
        if hidden:
            raise ChatRequestError(f"this checkpoint's tokenizer.json flags the tool-call markers special ({hidden[0]} "
                                   f"...), so decoding drops them and calls cannot be read back (DeepSeek's own "
                                   f"tokenizers do not); send the request without tools", "tools")
        names = [t["function"]["name"] for t in tools]
        twice = sorted(n for n in set(names) if names.count(n) > 1)
        if twice:
            raise ChatRequestError(f"tools: two functions share a name ({twice[0]!r})", "tools")
        if named is not None:
            if named not in names:
                raise ChatRequestError(f"tool_choice names the function {named!r}, which is not in tools "
                                       f"({', '.join(names)})", "tool_choice")
            chosen, parallel = [tools[names.index(named)]], False
        else:
            chosen, parallel = tools, parallel_tool_calls
        if choice != "auto":
            try:
                spec = fmt.grammar(chosen, parallel)
            except RequestError as e:
                raise ChatRequestError(f"tools: a function's parameters: {e}", "tools") from None
        if "tools" not in tok.template_variables:
            described = json.dumps(tools, ensure_ascii=False)
            forged = next((t for t in tok.control_texts if t in described), None)
            if forged is not None:     # the section is encoded with control tokens: none may come from the request
                raise ChatRequestError(f"tools: a function's name, description or parameters contain the control "
                                       f"token text {forged!r}; remove it", "tools")
            messages = with_tools_described(messages, tools_system_prompt(fmt, tools))
    if response_format is not None:
        try:
            answer = grammar.response_format(response_format)
        except RequestError as e:
            raise ChatRequestError(f"response_format: {e}", "response_format") from None
        if answer is not None and spec is not None:
            raise ChatRequestError("response_format and a required or named tool_choice both constrain the answer; "
                                   "give one of them", "response_format")
        spec = spec or answer
    return ChatPlan(messages, tools if choice != "none" else None, template_kwargs, fmt, spec)


def plan_request(req, tok) -> ChatPlan:
    """plan() for a validated ChatRequest (dsv3.serve.protocol)."""
    named = req.tool_choice
    return plan(tok, [m.as_template_input() for m in req.messages],
                [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None,
                named.model_dump() if hasattr(named, "model_dump") else named, req.parallel_tool_calls,
                req.response_format.model_dump(by_alias=True, exclude_none=True) if req.response_format else None,
                req.chat_template_kwargs)
