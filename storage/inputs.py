"""The text-to-token rule both stages follow, and the index's `inputs` section that records it.

    spec = InputSpec.build(prompt_field="q", response_field="a", max_length=2048)
    encode = TextEncoder(tokenizer, spec)          # stage one (teacher) and stage two (student) alike
    item = encode(row)                             # Encoded | Skipped

Stage one turns each dataset row into teacher tokens and supervised positions with it; stage two
re-tokenizes the cached (or source) text with the student's tokenizer by the same rule. One
definition, so a student of another tokenizer is trained on the positions the teacher scored.

Supervision (position t of a sequence is the prediction of token t+1):
- `text`: every t in [0, T-1). The text is tokenized as the tokenizer does by default
  (`add_special_tokens=True`, so a BOS where the model family uses one).
- `prompt_response`, `prompt_format="plain"` (the default): prompt tokens (`add_special_tokens=True`)
  + response tokens (no special tokens) + EOS. Supervised: the t whose next token is a response
  token (EOS included), i.e. t in [len(prompt_ids) - 1, T - 1). Prompt and response are tokenized
  separately, so the response's first token is the same whatever the prompt ends with.
- `prompt_response`, `prompt_format="chat"`: the pair is the chat [user: prompt, assistant: response]
  and follows the chat rule (an instruct model scores its own format).
- `chat`: the conversation rendered ONCE with the tokenizer's chat template (`tools` passed along;
  every message key such as `tool_calls` or `reasoning_content` reaches the template), tokenized
  without adding special tokens (what `apply_chat_template(tokenize=True)` does). Supervised: the t
  whose next token lies in an assistant turn of that rendering. Turn i starts where the rendering
  of messages[:i] with the generation prompt stops agreeing with the full rendering (after the
  assistant header; a prefilled `<think>` the template adds to generation prompts is kept in the
  header when the turn has it too), and ends after the template's end-of-turn text (learned by
  rendering a two-message probe, e.g. `<|im_end|>\\n`), which is supervised. Templates that rewrite
  earlier turns (reasoning models drop the thinking of turns before the last query) are rendered
  as the model sees the whole conversation, so such conversations are kept. An assistant message
  that opens a conversation has nothing to condition on; it is not supervised.

Chat rendering options (`ChatOptions`, recorded in the index's `inputs` section where they change
the tokens): `template`, Jinja text that replaces the tokenizer's chat template (`--chat-template
FILE`), and `kwargs`, extra template variables (`--chat-template-kwargs enable_thinking=false`), both
passed to `apply_chat_template` in every rendering, the end-of-turn probe included.

Truncation policy (`max_length`): keep the first `max_length` tokens, cut the end; such rows
are counted as truncated. A row left with no supervised position is skipped.

Rows are skipped and counted, never silently, for the reasons in `SKIP_REASONS`. Stored text
(`Encoded.texts`) is the source text the kept tokens cover: in text and plain prompt/response mode
cut at the last kept token's end; a chat as JSON (`encode_chat`), whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from logitcache.storage.errors import CacheIndexError, ConfigError, InvalidDataError

__all__ = ["KINDS", "PROMPT_FORMATS", "STORED_FIELDS", "SKIP_REASONS", "ChatOptions", "InputSpec", "TextEncoder",
           "Encoded", "Skipped", "validate_inputs", "encode_chat", "decode_chat", "kind_of_row"]

KINDS = ("text", "prompt_response", "chat")
PROMPT_FORMATS = ("plain", "chat")
# Stored text-field names per input kind: fixed names, so stage two need not know the source columns.
STORED_FIELDS = {"text": ("text",), "prompt_response": ("prompt", "response"), "chat": ("messages",)}
SUPERVISION = {"text": "all", "prompt_response": "response", "chat": "assistant"}
SKIP_REASONS = {
    "missing": "the field is absent or null",
    "not_string": "the field is not a string (chat: not a list of {role, content} messages)",
    "empty": "the field is an empty string (chat: an empty conversation)",
    "too_short": "fewer than 2 tokens, so nothing to predict",
    "no_assistant": "a chat with no assistant message after the first message",
    "template_mismatch": "the chat template failed, or renders earlier messages differently in the whole chat",
    "no_supervised": "truncation to max_length left no supervised position",
}
# Probe conversation that reveals a template's end-of-turn text (see `_end_of_turn`).
_PROBE_REPLY = "Paris."
_PROBE = [{"role": "user", "content": "What is the capital of France?"},
          {"role": "assistant", "content": _PROBE_REPLY}]


# apply_chat_template's own parameters (and the conversation): a template variable of one of these names
# would be taken by transformers as that parameter, not reach the template.
_RESERVED_TEMPLATE_KWARGS = frozenset((
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs"))


@dataclass(frozen=True)
class ChatOptions:
    """How chats are rendered besides the tokenizer's defaults.

    Attributes:
        template: Jinja text replacing the tokenizer's chat template (`--chat-template FILE`), or None.
        kwargs: extra template variables (`--chat-template-kwargs KEY=VALUE`), e.g. {"enable_thinking": False}.
    """

    template: str | None = None
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.template is not None and (not isinstance(self.template, str) or not self.template.strip()):
            raise ConfigError("--chat-template: the template file is empty")
        check_template_kwargs(self.kwargs)

    @classmethod
    def load(cls, template_file: str | None = None, kwargs: dict | None = None, *,
             storage_options: dict | None = None) -> "ChatOptions":
        """Read `--chat-template FILE` (a local path or fsspec URL) and take `--chat-template-kwargs`.

        Raises:
            ConfigError: the file cannot be read, or a kwarg is not a template variable name.
        """
        template = None
        if template_file is not None:
            import fsspec

            try:
                with fsspec.open(str(template_file), "r", encoding="utf-8", **(storage_options or {})) as f:
                    template = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"--chat-template {template_file}: cannot read it ({e.__class__.__name__}: "
                                  f"{e})") from None
        return cls(template, dict(kwargs or {}))

    @classmethod
    def from_index(cls, inputs: dict) -> "ChatOptions":
        """The options a cache's chats were rendered with (none for caches written before they existed)."""
        return cls(inputs.get("chat_template"), dict(inputs.get("chat_template_kwargs") or {}))

    def __bool__(self) -> bool:
        return self.template is not None or bool(self.kwargs)

    def describe(self) -> dict:
        """The index's keys for these options; none when unset, so older caches fingerprint the same."""
        out = {}
        if self.template is not None:
            out["chat_template"] = self.template
        if self.kwargs:
            out["chat_template_kwargs"] = dict(self.kwargs)
        return out


def check_template_kwargs(kwargs) -> None:
    """Refuse `--chat-template-kwargs` that cannot reach a template as variables.

    Raises:
        ConfigError: not a mapping, a key that is not an identifier, or one of apply_chat_template's
            own parameters.
    """
    if not isinstance(kwargs, dict):
        raise ConfigError(f"--chat-template-kwargs: expected KEY=VALUE pairs (in YAML a mapping), got "
                          f"{type(kwargs).__name__}")
    for key, value in kwargs.items():
        if not (isinstance(key, str) and key.isidentifier()):
            raise ConfigError(f"--chat-template-kwargs {key!r}: a template variable name must be an identifier")
        if key in _RESERVED_TEMPLATE_KWARGS:
            raise ConfigError(f"--chat-template-kwargs {key}: {key!r} is a parameter of apply_chat_template, not "
                              f"a template variable (logitcache sets it)")
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--chat-template-kwargs {key}: the value must be JSON (a string, number, "
                              f"boolean, null, list or mapping), got {type(value).__name__}") from None


@dataclass(frozen=True)
class InputSpec:
    """What a row holds and how it becomes a sequence.

    Attributes:
        kind: "text", "prompt_response" or "chat".
        columns: stored name -> source column, e.g. {"prompt": "question", "response": "answer"}; a
            chat may also map "tools" (a column of tool schemas passed to the template).
        max_length: keep at most this many tokens per sequence (the start); None: no limit.
        prompt_format: prompt/response only: "plain" (the default) or "chat" (through the template).
        chat: the chat template and template variables (`ChatOptions`); used where a template is.
    """

    kind: str
    columns: dict
    max_length: int | None
    prompt_format: str = "plain"
    chat: ChatOptions = ChatOptions()

    @classmethod
    def build(cls, *, text_field: str | None = None, prompt_field: str | None = None,
              response_field: str | None = None, messages_field: str | None = None, tools_field: str | None = None,
              prompt_format: str = "plain", max_length: int | None,
              chat: ChatOptions | None = None) -> "InputSpec":
        """Pick the input kind from which fields are given; exactly one kind must be.

        Raises:
            ConfigError: no kind, several kinds, half of prompt/response, a bad prompt format,
                max_length < 2, or chat options for inputs that use no template.
        """
        given = [name for name, value in (("--text-field", text_field), ("--prompt-field", prompt_field),
                                          ("--response-field", response_field),
                                          ("--messages-field", messages_field)) if value]
        if bool(prompt_field) != bool(response_field):
            raise ConfigError("--prompt-field and --response-field go together (response-only supervision); "
                              f"got only {given}")
        if text_field and not prompt_field and not messages_field:
            spec = cls("text", {"text": text_field}, max_length)
        elif prompt_field and not text_field and not messages_field:
            spec = cls("prompt_response", {"prompt": prompt_field, "response": response_field}, max_length,
                       prompt_format)
        elif messages_field and not text_field and not prompt_field:
            columns = {"messages": messages_field, **({"tools": tools_field} if tools_field else {})}
            spec = cls("chat", columns, max_length)
        else:
            raise ConfigError(
                "choose one input kind: --text-field F (plain text), --prompt-field P --response-field R, "
                f"or --messages-field M (chat); got {given or 'none'}")
        if tools_field and spec.kind != "chat":
            raise ConfigError("--tools-field goes with --messages-field (tool schemas for the chat template)")
        if prompt_format not in PROMPT_FORMATS:
            raise ConfigError(f"--prompt-format {prompt_format!r}: expected one of {', '.join(PROMPT_FORMATS)}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
            raise ConfigError(f"--max-length={max_length!r} must be an integer >= 2")
        if chat:
            if not spec.uses_template:
                raise ConfigError("--chat-template/--chat-template-kwargs render chats: they go with --messages-field "
                                  "or --prompt-format chat")
            spec = cls(spec.kind, spec.columns, spec.max_length, spec.prompt_format, chat)
        return spec

    @classmethod
    def for_row(cls, row: dict, *, max_length: int | None = None, prompt_format: str = "plain",
                chat: ChatOptions | None = None, where: str = "row") -> "InputSpec":
        """The spec of a row that uses the stored field names ("messages", "prompt"/"response", "text").

        Raises:
            InvalidDataError: the row has none of them.
        """
        kind = kind_of_row(row)
        if kind is None:
            raise InvalidDataError(f"{where}: needs a 'messages' list, string 'prompt' and 'response' fields, or a "
                                   f"string 'text' field; got keys {sorted(row)}")
        columns = {name: name for name in STORED_FIELDS[kind]}
        if kind == "chat" and row.get("tools") is not None:
            columns["tools"] = "tools"
        return cls(kind, columns, max_length, prompt_format if kind == "prompt_response" else "plain",
                   chat or ChatOptions())

    @classmethod
    def from_index(cls, inputs: dict, *, max_length: int | None = None) -> "InputSpec":
        """The rule a cache was written with, over its stored field names (for re-tokenizing its text)."""
        kind = inputs["kind"]
        columns = {name: name for name in STORED_FIELDS[kind]}
        if kind == "chat" and "tools" in (inputs.get("columns") or {}):
            columns["tools"] = "tools"
        return cls(kind, columns, max_length, inputs.get("prompt_format", "plain"), ChatOptions.from_index(inputs))

    @property
    def stored_fields(self) -> tuple[str, ...]:
        """Names of the text fields each sequence keeps in the cache."""
        return STORED_FIELDS[self.kind]

    @property
    def uses_template(self) -> bool:
        return self.kind == "chat" or self.prompt_format == "chat"

    def describe(self) -> dict:
        """The index's `inputs` section (also fingerprinted)."""
        out = {"kind": self.kind, "columns": dict(self.columns), "stored_fields": list(self.stored_fields),
               "supervision": SUPERVISION[self.kind], "max_length": self.max_length, "truncation": "keep_start",
               "append_eos": self.kind == "prompt_response" and self.prompt_format == "plain"}
        if self.kind == "prompt_response":
            out["prompt_format"] = self.prompt_format
        return {**out, **self.chat.describe()}


def kind_of_row(row: dict) -> str | None:
    """The input kind a row with stored field names holds, or None."""
    if row.get("messages") is not None:
        return "chat"
    if isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
        return "prompt_response"
    if isinstance(row.get("text"), str):
        return "text"
    return None


def validate_inputs(inputs, text_fields, where: str) -> None:
    """Check an index's `inputs` section and `text_fields` against the format.

    Raises:
        CacheIndexError: naming the field and what was expected.
    """
    def require(cond: bool, msg: str) -> None:
        if not cond:
            raise CacheIndexError(f"{where}: {msg}")

    require(isinstance(inputs, dict), "section 'inputs' is missing or not an object")
    kind = inputs.get("kind")
    require(kind in KINDS, f"inputs.kind must be one of {KINDS}, got {kind!r}")
    allowed = STORED_FIELDS[kind]
    stored = inputs.get("stored_fields", [])
    require(isinstance(stored, list) and all(f in allowed for f in stored),
            f"inputs.stored_fields must be a list of {list(allowed)} for kind {kind!r}, got {stored!r}")
    require(isinstance(text_fields, list) and all(f in allowed for f in text_fields),
            f"text_fields must be a list of {list(allowed)} for inputs.kind {kind!r}, got {text_fields!r}")
    columns = inputs.get("columns", {})
    keys = set(allowed) | ({"tools"} if kind == "chat" else set())
    require(isinstance(columns, dict) and set(columns) <= keys and all(isinstance(v, str) for v in columns.values()),
            f"inputs.columns must map {sorted(keys)} to column names, got {columns!r}")
    max_length = inputs.get("max_length")
    require(max_length is None or (isinstance(max_length, int) and not isinstance(max_length, bool)
                                   and max_length >= 2), f"inputs.max_length must be an int >= 2, got {max_length!r}")
    fmt = inputs.get("prompt_format", "plain")
    require(fmt in PROMPT_FORMATS, f"inputs.prompt_format must be one of {PROMPT_FORMATS}, got {fmt!r}")
    template = inputs.get("chat_template")
    require(template is None or (isinstance(template, str) and template.strip()),
            f"inputs.chat_template must be the template's text, got {type(template).__name__}")
    try:
        check_template_kwargs(inputs.get("chat_template_kwargs") or {})
    except ConfigError as e:
        raise CacheIndexError(f"{where}: inputs.chat_template_kwargs: {e}") from None


def encode_chat(messages: list[dict], tools: list | None = None) -> str:
    """A conversation as stored text: JSON of the messages, or of {messages, tools} when tools are given."""
    return json.dumps(messages if tools is None else {"messages": messages, "tools": tools}, ensure_ascii=False)


def decode_chat(text: str) -> tuple[list[dict], list | None]:
    """Inverse of `encode_chat`: (messages, tools or None).

    Raises:
        InvalidDataError: not a stored conversation.
    """
    try:
        value = json.loads(text)
    except ValueError as e:
        raise InvalidDataError(f"stored chat is not JSON ({e})") from None
    if isinstance(value, dict) and isinstance(value.get("messages"), list):
        return value["messages"], value.get("tools")
    if isinstance(value, list):
        return value, None
    raise InvalidDataError(f"stored chat must be a JSON list of messages or {{messages, tools}}; got "
                           f"{type(value).__name__}")


@dataclass
class Encoded:
    """One row as a token sequence.

    Attributes:
        token_ids: (T,) token ids, T <= max_length.
        positions: (P,) int32 supervised t, 0 <= t < T-1, ascending.
        texts: stored text fields (see `InputSpec.stored_fields`).
        truncated: the row was cut to max_length.
    """

    token_ids: list[int]
    positions: np.ndarray
    texts: dict
    truncated: bool


@dataclass
class Skipped:
    """A row that yields no sequence: `reason` is a key of `SKIP_REASONS`, `field` the source column.

    `token_ids` holds the row's tokens when it had some (no supervised position), else None.
    """

    reason: str
    field: str
    detail: str = ""
    token_ids: list[int] | None = None

    def error(self, row: int, hint: str | None = None) -> InvalidDataError:
        """The error `--strict` raises for this row; `hint` replaces the default advice."""
        if hint is None:
            hint = (f" (--strict is on; without it such rows are skipped and counted as skipped_{self.reason})")
        return InvalidDataError(f"DATA row {row}: field {self.field!r}: {self.detail or SKIP_REASONS[self.reason]}"
                                f"{hint}")


class TextEncoder:
    """Turns rows into `Encoded` sequences by the module's rule.

    Args:
        tokenizer: a Hugging Face tokenizer; a fast one (token offsets) for chats and for cutting
            stored text at truncation.
        spec: the input kind, columns, max_length and prompt format.

    Raises:
        ConfigError: chat data (or the chat prompt format) without a chat template, or a chat with a
            tokenizer that is not fast.
    """

    def __init__(self, tokenizer, spec: InputSpec):
        if spec.uses_template and not (spec.chat.template or getattr(tokenizer, "chat_template", None)):
            what = "--messages-field" if spec.kind == "chat" else "--prompt-format chat"
            raise ConfigError(f"{what} needs a tokenizer with a chat template; "
                              f"{getattr(tokenizer, 'name_or_path', '') or 'this one'} has none (give one with "
                              f"--chat-template FILE)")
        if spec.uses_template and not getattr(tokenizer, "is_fast", False):
            raise ConfigError(f"the tokenizer {type(tokenizer).__name__} is not a fast tokenizer; chat data needs "
                              "token offsets (a tokenizer.json)")
        self.tokenizer, self.spec = tokenizer, spec
        self._eot = None

    def __call__(self, row: dict) -> Encoded | Skipped:
        """Encode one row (a dict of its columns)."""
        if self.spec.kind == "text":
            return self._text(row)
        if self.spec.kind == "prompt_response":
            return self._prompt_response(row)
        return self._chat(row)

    # --- the three kinds -----------------------------------------------------------------------

    def _field(self, row: dict, name: str) -> str | Skipped:
        column = self.spec.columns[name]
        value = row.get(column)
        if value is None:
            return Skipped("missing", column)
        if not isinstance(value, str):
            return Skipped("not_string", column, f"expected a string, got {type(value).__name__}")
        if not value:
            return Skipped("empty", column)
        return value

    def _encode(self, text: str, special: bool) -> tuple[list[int], list[tuple[int, int]] | None]:
        fast = getattr(self.tokenizer, "is_fast", False)
        enc = self.tokenizer(text, add_special_tokens=special, return_offsets_mapping=fast)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]] if fast else None

    def _text(self, row: dict) -> Encoded | Skipped:
        text = self._field(row, "text")
        if isinstance(text, Skipped):
            return text
        ids, offsets = self._encode(text, True)
        if len(ids) < 2:
            return Skipped("too_short", self.spec.columns["text"], token_ids=ids)
        kept = len(ids) if self.spec.max_length is None else min(len(ids), self.spec.max_length)
        truncated = kept < len(ids)
        stored = _cut(text, offsets, kept) if truncated else text
        return Encoded(ids[:kept], np.arange(kept - 1, dtype=np.int32), {"text": stored}, truncated)

    def _prompt_response(self, row: dict) -> Encoded | Skipped:
        prompt = self._field(row, "prompt")
        if isinstance(prompt, Skipped):
            return prompt
        response = self._field(row, "response")
        if isinstance(response, Skipped):
            return response
        if self.spec.prompt_format == "chat":
            out = self._chat_messages([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                                      None, self.spec.columns["response"])
            if isinstance(out, Encoded):
                out.texts = {"prompt": prompt, "response": response}
            return out
        prompt_ids, _ = self._encode(prompt, True)
        response_ids, offsets = self._encode(response, False)
        eos = self.tokenizer.eos_token_id
        ids = prompt_ids + response_ids + ([eos] if eos is not None else [])
        kept = len(ids) if self.spec.max_length is None else min(len(ids), self.spec.max_length)
        first = max(len(prompt_ids) - 1, 0)  # t = first predicts the first response token
        if kept - 1 <= first:
            reason = "no_supervised" if kept < len(ids) else "too_short"
            return Skipped(reason, self.spec.columns["response"], token_ids=ids[:kept])
        truncated = kept < len(ids)
        kept_response = min(max(kept - len(prompt_ids), 0), len(response_ids))
        stored = _cut(response, offsets, kept_response) if truncated else response
        return Encoded(ids[:kept], np.arange(first, kept - 1, dtype=np.int32),
                       {"prompt": prompt, "response": stored}, truncated)

    def _chat(self, row: dict) -> Encoded | Skipped:
        column = self.spec.columns["messages"]
        messages = row.get(column)
        if messages is None:
            return Skipped("missing", column)
        if isinstance(messages, str):  # stored text (stage two re-tokenizing a cache)
            try:
                messages, stored_tools = decode_chat(messages)
            except InvalidDataError as e:
                return Skipped("not_string", column, str(e))
        else:
            stored_tools = None
        problem = _check_messages(messages)
        if problem:
            return Skipped("empty" if problem == "empty" else "not_string", column, problem)
        tools = row.get(self.spec.columns["tools"]) if "tools" in self.spec.columns else stored_tools
        if isinstance(tools, str):  # a tools column kept as JSON text
            try:
                tools = json.loads(tools)
            except ValueError:
                return Skipped("not_string", self.spec.columns.get("tools", column), "tools is not JSON")
        if tools is not None and not isinstance(tools, (list, tuple)):
            return Skipped("not_string", self.spec.columns.get("tools", column),
                           f"tools must be a list of tool schemas, got {type(tools).__name__}")
        return self._chat_messages(_plain(list(messages)), _plain(list(tools)) if tools else None, column)

    def _chat_messages(self, messages: list[dict], tools: list | None, column: str) -> Encoded | Skipped:
        try:
            full = self._render(messages, False, tools)
            eot = self._end_of_turn()
            spans, end = [], 0
            for i, message in enumerate(messages):
                if message["role"] != "assistant" or i == 0:
                    continue
                context = self._render(messages[:i], False, tools)
                if not full.startswith(context) or len(context) < end:
                    return Skipped("template_mismatch", column,
                                   f"the template renders the first {i} messages differently in the whole chat")
                start = _common_prefix(self._render(messages[:i], True, tools), full)
                stop = full.find(eot, start)
                if stop < 0:
                    return Skipped("template_mismatch", column, f"assistant message {i} has no end-of-turn "
                                                                f"{eot!r} in the rendered chat")
                end = stop + len(eot)
                spans.append((start, end))
        except Exception as e:  # a template may raise anything (jinja errors, its own raise_exception)
            return Skipped("template_mismatch", column, f"the chat template failed: {e.__class__.__name__}: {e}")
        if not spans:
            return Skipped("no_assistant", column)
        ids, offsets = self._encode(full, False)
        starts = np.array([s for s, _ in offsets], dtype=np.int64)
        ends = np.array([e for _, e in offsets], dtype=np.int64)
        in_assistant = np.zeros(len(ids), dtype=bool)
        for lo, hi in spans:  # a token is the assistant's if it overlaps the turn's characters
            in_assistant |= (ends > lo) & (starts < hi)
        kept = len(ids) if self.spec.max_length is None else min(len(ids), self.spec.max_length)
        targets = np.flatnonzero(in_assistant[1:kept]) + 1  # token j is predicted at t = j - 1
        if len(targets) == 0:
            return Skipped("no_supervised", column, token_ids=ids[:kept])
        return Encoded(ids[:kept], (targets - 1).astype(np.int32), {"messages": encode_chat(messages, tools)},
                       kept < len(ids))

    def _render(self, messages: list[dict], add_generation_prompt: bool, tools: list | None) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  chat_template=self.spec.chat.template, **self.spec.chat.kwargs)

    def _end_of_turn(self) -> str:
        """The text the template puts after an assistant message's content (e.g. "<|im_end|>\\n")."""
        if self._eot is None:
            whole = self._render(_PROBE, False, None)
            at = whole.rfind(_PROBE_REPLY)
            if at < 0 or at + len(_PROBE_REPLY) == len(whole):
                raise ConfigError(f"cannot find the end of an assistant turn in the chat template's rendering "
                                  f"{whole!r}")
            self._eot = whole[at + len(_PROBE_REPLY):]
        return self._eot


def _plain(value):
    """`value` without None entries in its mappings, at any depth.

    Every message key reaches the template (tool_calls, reasoning_content, name, ...). A datasets
    Arrow column of heterogeneous messages (or tool schemas) fills each absent key with None, which
    templates read as "set" (`message.tool_calls is defined`), so Nones are dropped.
    """
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _check_messages(messages) -> str | None:
    """A description of what is wrong with a chat, or None."""
    if not isinstance(messages, (list, tuple)):
        return f"expected a list of messages, got {type(messages).__name__}"
    if not messages:
        return "empty"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return f"message {i} is not a mapping with a string 'role'"
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            return f"message {i}: content must be a string (or a list of parts), got {type(content).__name__}"
        if content is None and not m.get("tool_calls"):
            return f"message {i} has no content and no tool_calls"
    return None


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _cut(text: str, offsets: list[tuple[int, int]] | None, n: int) -> str:
    """The prefix of `text` covered by its first `n` tokens (all of it without offsets)."""
    if offsets is None:
        return text
    return text[: offsets[n - 1][1]] if n > 0 else ""
