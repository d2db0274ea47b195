"""Byte-level BPE with DeepSeek's special tokens, chat templates and SFT loss masks.

DeepSeek-V3 uses a byte-level BPE (like GPT-2): text is turned into UTF-8 bytes, each byte is
mapped to a printable stand-in character, and merges are learned over those characters. Because
all 256 bytes are in the base alphabet, *any* string can be encoded and `decode(encode(s)) == s`.
We train the same kind of tokenizer from scratch with HF `tokenizers` (so it is fast and saved in
the format `transformers.AutoTokenizer` loads), at toy sizes for the tiny presets.

Pre-tokenization (the step that cuts text into pieces before BPE sees it):

    Digits(individual_digits=True)   every digit is its own piece, so "1234" -> 1 2 3 4. The
                                     arithmetic and countdown tasks are done digit by digit, and
                                     a merged "12" would hide the digits from the model.
    ByteLevel(use_regex=True)        GPT-2's regex split (words, spaces, punctuation) + byte map.

Special tokens (ids 0..7, in this order):

    0 <｜begin▁of▁sentence｜>  BOS        special: control tokens, dropped by
    1 <｜end▁of▁sentence｜>    EOS = pad  special: decode(skip_special_tokens=True)
    2 <｜User｜>                           special
    3 <｜Assistant｜>                      special
    4 <think>   5 </think>                 added but NOT special: the model writes them as part of
    6 <answer>  7 </answer>                its answer and the reward checks them, so decode keeps
                                           them (DeepSeek-R1 also marks <think> non-special).

The bars are U+FF5C (fullwidth vertical line) and the "underscore" is U+2581 (lower one eighth
block); the real DeepSeek tokens use exactly these characters. All eight are "added tokens": the
text is split on them before pre-tokenization, so each is one id even inside `<think>7+5=12`.

Chat template (DeepSeek-V3, spec section 9.2), no separators anywhere:

    BOS + system prompts joined by "\\n\\n" (no role marker)
        + "<｜User｜>" + user content
        + "<｜Assistant｜>" + assistant content + EOS          (for each turn)
        + "<｜Assistant｜>"                                    (generation prompt)

R1 variant (`thinking=True`, spec 9.3): the generation prompt is "<｜Assistant｜><think>\\n", and
the reasoning of PAST assistant turns (everything up to and including the last `</think>`) is cut
so it is not fed back. "Past" means before the last user message. DeepSeek's R1 template cuts
every assistant turn, even a final one with nothing after it; we keep a final answer's reasoning
because that is the SFT target (`encode_chat`). For a prompt that ends in a user turn, which is
the only case the official template was made for, the two agree. The content of an assistant
message is everything after "<｜Assistant｜>", so an R1 SFT target starts with "<think>\\n".

`encode_chat` builds ids piece by piece (BOS, role tokens, contents) so the loss mask is exact:
1 on assistant contents and the EOS that closes them (the model must learn to stop), 0 on the
prompt. Encoding pieces separately gives the same ids as encoding the rendered string, because
every content sits between added tokens and the text is split on those first.

BOS decision: tokenizer.json carries a post-processor that prepends BOS (DeepSeek's
`add_bos_token=true` behaviour), so `AutoTokenizer(dir)(text)` starts with BOS. Our `encode(text)`
adds nothing unless `add_bos=True`: training data is packed from many documents and the data code
places BOS itself. A rendered chat already starts with BOS, and transformers tokenizes chat
templates with `add_special_tokens=False`, so BOS is never doubled. The post-processor is what
counts: transformers 5 drops `add_bos_token` from tokenizer_config.json whenever a tokenizer.json
exists (and then reports `hf_tok.add_bos_token == False` while still adding BOS).

`save` writes tokenizer.json, tokenizer_config.json (with the chat template as Jinja, reading an
optional `thinking` variable: `hf_tok.apply_chat_template(msgs, thinking=True)`) and
special_tokens_map.json.

Tools (spec 9.2): `apply_chat_template(messages, tools=...)` appends the tool definitions to the system
prompt; an assistant's `tool_calls` are rendered in DeepSeek-V3's markup after its content, and `tool`
messages as `<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>...` results. The markup is text to our
small BPE vocabularies (no added tokens), so any saved tokenizer renders it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK, THINK_END, ANSWER, ANSWER_END = "<think>", "</think>", "<answer>", "</answer>"
SPECIAL_TOKENS = (BOS, EOS, USER, ASSISTANT)      # control tokens, skipped by decode
TAG_TOKENS = (THINK, THINK_END, ANSWER, ANSWER_END)  # text the model writes, kept by decode
ALL_TOKENS = SPECIAL_TOKENS + TAG_TOKENS           # ids 0..7 after `train`
MIN_VOCAB_SIZE = 256 + len(ALL_TOKENS)             # 256 byte symbols + our 8 tokens
ROLES = ("system", "user", "assistant", "tool")
# DeepSeek-V3's tool-call markup (spec 9.1-9.2). Not in our small vocabularies: BPE spells them as text.
TOOL_CALLS_BEGIN, TOOL_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN, TOOL_SEP, TOOL_CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"
TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
TOOLS_HEADER = "## Tools\nYou have access to the following tools:"
MODEL_MAX_LENGTH = 131072                          # DeepSeek-V3's tokenizer_config value
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# The same rendering as `Tokenizer.apply_chat_template`, for transformers. Every tag strips the
# whitespace before it ({%-), so the layout below never leaks into the output whatever the
# trim_blocks/lstrip_blocks settings. `thinking` and `add_generation_prompt` are template
# variables; transformers passes extra apply_chat_template kwargs into the template.
CHAT_TEMPLATE = r"""
{%- if thinking is not defined %}{%- set thinking = false %}{%- endif %}
{%- if add_generation_prompt is not defined %}{%- set add_generation_prompt = false %}{%- endif %}
{%- if tools is not defined or tools is none %}{%- set tools = [] %}{%- endif %}
{%- set ns = namespace(system='', has_system=false, last_user=-1, content='', in_outputs=false) %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {%- if ns.has_system %}{%- set ns.system = ns.system + '\n\n' %}{%- endif %}
        {%- set ns.system = ns.system + message['content'] %}
        {%- set ns.has_system = true %}
    {%- elif message['role'] == 'user' %}
        {%- set ns.last_user = loop.index0 %}
    {%- elif message['role'] != 'assistant' and message['role'] != 'tool' %}
        {{- raise_exception('nanoseek chat template: role must be one of system, user, assistant, tool') }}
    {%- endif %}
{%- endfor %}
{%- if tools %}
    {%- if ns.has_system %}{%- set ns.system = ns.system + '\n\n' %}{%- endif %}
    {%- set ns.system = ns.system + TOOLS_HEADER %}
    {%- for tool in tools %}
        {%- set f = tool['function'] if tool['function'] is defined else tool %}
        {%- set params = f['parameters'] if f['parameters'] is defined else {} %}
        {%- set ns.system = ns.system + '\n\n### ' + f['name'] + '\nDescription: ' + (f['description'] or '')
            + '\nParameters: ' + (params | tojson) %}
    {%- endfor %}
{%- endif %}
{{- '<｜begin▁of▁sentence｜>' + ns.system }}
{%- for message in messages %}
    {%- if ns.in_outputs and message['role'] != 'tool' %}
        {{- '<｜tool▁outputs▁end｜>' }}
        {%- set ns.in_outputs = false %}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {{- '<｜User｜>' + message['content'] }}
    {%- elif message['role'] == 'assistant' %}
        {%- set ns.content = message['content'] if message['content'] is string else '' %}
        {%- if thinking and loop.index0 < ns.last_user and '</think>' in ns.content %}
            {%- set ns.content = ns.content.split('</think>')[-1] %}
        {%- endif %}
        {%- if message['tool_calls'] is defined and message['tool_calls'] %}
            {%- set ns.content = ns.content + '<｜tool▁calls▁begin｜>' %}
            {%- for call in message['tool_calls'] %}
                {%- set f = call['function'] if call['function'] is defined else call %}
                {%- set args = f['arguments'] if f['arguments'] is string else (f['arguments'] | tojson) %}
                {%- if not loop.first %}{%- set ns.content = ns.content + '\n' %}{%- endif %}
                {%- set ns.content = ns.content + '<｜tool▁call▁begin｜>' + (call['type'] or 'function')
                    + '<｜tool▁sep｜>' + f['name'] + '\n```json\n' + args + '\n```<｜tool▁call▁end｜>' %}
            {%- endfor %}
            {%- set ns.content = ns.content + '<｜tool▁calls▁end｜>' %}
        {%- endif %}
        {{- '<｜Assistant｜>' + ns.content + '<｜end▁of▁sentence｜>' }}
    {%- elif message['role'] == 'tool' %}
        {{- ('\n' if ns.in_outputs else '<｜tool▁outputs▁begin｜>') + '<｜tool▁output▁begin｜>' + message['content']
            + '<｜tool▁output▁end｜>' }}
        {%- set ns.in_outputs = true %}
    {%- endif %}
{%- endfor %}
{%- if ns.in_outputs %}{{- '<｜tool▁outputs▁end｜>' }}{%- endif %}
{%- if add_generation_prompt %}
    {{- '<｜Assistant｜>' }}
    {%- if thinking %}{{- '<think>\n' }}{%- endif %}
{%- endif %}""".strip()
CHAT_TEMPLATE = CHAT_TEMPLATE.replace("TOOLS_HEADER", json.dumps(TOOLS_HEADER, ensure_ascii=False))


class Tokenizer:
    """A trained `tokenizers.Tokenizer` plus DeepSeek's tokens and chat templates."""

    def __init__(self, tok: HFTokenizer):
        missing = [t for t in ALL_TOKENS if tok.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the nanoseek tokens {missing}; build it with Tokenizer.train")
        self._tok = tok
        self._ids = {t: tok.token_to_id(t) for t in ALL_TOKENS}

    # ---------------------------------------------------------------- training
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
              show_progress: bool = False) -> Tokenizer:
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size={vocab_size}: must be >= {MIN_VOCAB_SIZE} "
                             f"(256 byte symbols + {len(ALL_TOKENS)} special tokens)")
        if min_frequency < 1:
            raise ValueError(f"min_frequency={min_frequency}: must be >= 1")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
            special_tokens=list(ALL_TOKENS),  # reserves ids 0..7, in order
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is unknown
        )
        # The trainer does not split on added tokens, so "<think>" in the corpus would waste merges
        # on "<th", "ink>". Split them out ourselves, which is what encode does before BPE.
        split = re.compile("|".join(re.escape(t) for t in ALL_TOKENS))
        tok.train_from_iterator((split.split(text) for text in texts), trainer)
        # The trainer registers all its special tokens as special; the tags must survive decode.
        # add_tokens flips their flag in the saved JSON but not in the live object's set of special
        # tokens (which decode reads), so reload from the JSON to get one consistent state.
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
        return cls(HFTokenizer.from_str(tok.to_str()))

    # ---------------------------------------------------------------- ids and text
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        # the post-processor's only special token is BOS, so add_special_tokens == add BOS
        return self._tok.encode(text, add_special_tokens=add_bos).ids

    def encode_batch(self, texts: list[str], add_bos: bool = False) -> list[list[int]]:
        """Many texts at once (the Rust side runs them in parallel)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_bos)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: list[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return self._tok.decode_batch([list(b) for b in batch], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return i

    def id_to_token(self, i: int) -> str:
        token = self._tok.id_to_token(i)
        if token is None:
            raise KeyError(f"id {i} is out of range: vocab_size is {self.vocab_size}")
        return token

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._ids[BOS]

    @property
    def eos_id(self) -> int:
        return self._ids[EOS]

    @property
    def pad_id(self) -> int:
        return self._ids[EOS]  # DeepSeek pads with EOS; padded positions are masked out anyway

    @property
    def user_id(self) -> int:
        return self._ids[USER]

    @property
    def assistant_id(self) -> int:
        return self._ids[ASSISTANT]

    @property
    def think_id(self) -> int:
        return self._ids[THINK]

    @property
    def think_end_id(self) -> int:
        return self._ids[THINK_END]

    @property
    def answer_id(self) -> int:
        return self._ids[ANSWER]

    @property
    def answer_end_id(self) -> int:
        return self._ids[ANSWER_END]

    # ---------------------------------------------------------------- chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            thinking: bool = False, tools: list[dict] | None = None) -> str:
        text = "".join(piece for piece, _ in _chat_pieces(messages, thinking, tools))
        if add_generation_prompt:
            text += ASSISTANT + (THINK + "\n" if thinking else "")
        return text

    def encode_chat(self, messages: list[dict], thinking: bool = False,
                    tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        mask: list[int] = []
        for piece, trained in _chat_pieces(messages, thinking, tools):
            piece_ids = self._tok.encode(piece, add_special_tokens=False).ids
            ids += piece_ids
            mask += [int(trained)] * len(piece_ids)
        return ids, mask

    # ---------------------------------------------------------------- files
    def save(self, path: str | Path, model_max_length: int = MODEL_MAX_LENGTH) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path / "tokenizer.json"))
        special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special_map,
            "add_bos_token": True,   # informative only (transformers 5 ignores it): see module docstring
            "add_eos_token": False,
            "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": False,  # would eat spaces before punctuation on decode
            "chat_template": CHAT_TEMPLATE,
        }
        for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
            (path / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory {path} not found (it should hold {', '.join(FILES)})")
        for name in FILES:
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} not found: a saved tokenizer holds {', '.join(FILES)}")
        try:
            tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{path / 'tokenizer.json'} is not a valid tokenizers file: {e}") from e
        for name in FILES[1:]:
            try:
                data = json.loads((path / name).read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path / name} is not valid JSON: {e}") from e
            # HF and nanoseek must agree on BOS/EOS/pad, or their encodings would differ
            for key, want in (("bos_token", BOS), ("eos_token", EOS), ("pad_token", EOS)):
                if data.get(key) != want:
                    raise ValueError(f"{path / name}: {key}={data.get(key)!r}, expected {want!r}")
        return cls(tok)


def _check_messages(messages: list[dict]) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        if "role" not in m:
            raise ValueError(f"messages[{i}] has no 'role': must be one of {', '.join(ROLES)}")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}].role={m['role']!r}: must be one of {', '.join(ROLES)}")
        calls = m.get("tool_calls")
        if calls is not None:
            if m["role"] != "assistant" or not isinstance(calls, list):
                raise ValueError(f"messages[{i}].tool_calls: only an assistant message has tool_calls, a list of "
                                 "{'type': 'function', 'function': {'name', 'arguments'}}")
            for j, c in enumerate(calls):
                f = c.get("function", c) if isinstance(c, dict) else None
                if not (isinstance(f, dict) and isinstance(f.get("name"), str)
                        and isinstance(f.get("arguments"), (str, dict))):
                    raise ValueError(f"messages[{i}].tool_calls[{j}]: must be {{'type': 'function', 'function': "
                                     "{'name': <string>, 'arguments': <JSON string or object>}}")
        if "content" not in m and not calls:
            raise ValueError(f"messages[{i}] ({m['role']}) has no 'content': it must be a string")
        if not isinstance(m.get("content"), str) and not (calls and m.get("content") is None):
            raise ValueError(f"messages[{i}].content: must be a string, got {type(m.get('content')).__name__}")


def _tools_text(tools: list[dict]) -> str:
    """The tool definitions as the system prompt's last part (DeepSeek-V3.1's layout, without its
    format instructions: a model trained on tool calls knows the markup, and `tool_choice` required or
    named constrains decoding to it; on small vocabularies the instructions alone cost ~200 tokens)."""
    parts = [TOOLS_HEADER]
    for i, t in enumerate(tools):
        f = t.get("function", t) if isinstance(t, dict) else None
        if not (isinstance(f, dict) and isinstance(f.get("name"), str)):
            raise ValueError(f"tools[{i}]: must be {{'type': 'function', 'function': {{'name': <string>, "
                             "'description': ..., 'parameters': <JSON Schema>}}}}")
        parts.append(f"\n\n### {f['name']}\nDescription: {f.get('description') or ''}\nParameters: "
                     + json.dumps(f.get("parameters", {}), ensure_ascii=False))
    return "".join(parts)


def tool_calls_text(calls: list[dict]) -> str:
    """An assistant's tool calls in DeepSeek-V3's markup (what the model writes to call them)."""
    out = []
    for c in calls:
        f = c.get("function", c)
        args = f["arguments"] if isinstance(f["arguments"], str) else json.dumps(f["arguments"], ensure_ascii=False)
        out.append(f"{TOOL_CALL_BEGIN}{c.get('type') or 'function'}{TOOL_SEP}{f['name']}\n```json\n{args}\n```"
                   f"{TOOL_CALL_END}")
    return TOOL_CALLS_BEGIN + "\n".join(out) + TOOL_CALLS_END


def _chat_pieces(messages: list[dict], thinking: bool, tools: list[dict] | None = None) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_assistant_output) pieces, without a generation prompt.
    Tool calls are assistant output; tool results (role "tool") are prompt, wrapped in the outputs markup."""
    _check_messages(messages)
    system = [m["content"] for m in messages if m["role"] == "system"] + ([_tools_text(tools)] if tools else [])
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    pieces = [(BOS, False), ("\n\n".join(system), False)]
    in_outputs = False
    for i, m in enumerate(messages):
        if in_outputs and m["role"] != "tool":
            pieces.append((TOOL_OUTPUTS_END, False))
            in_outputs = False
        if m["role"] == "user":
            pieces += [(USER, False), (m["content"], False)]
        elif m["role"] == "assistant":
            content = m.get("content") or ""
            if thinking and i < last_user:  # past turn: do not feed old reasoning back
                content = content.rsplit(THINK_END, 1)[-1]
            if m.get("tool_calls"):
                content += tool_calls_text(m["tool_calls"])
            pieces += [(ASSISTANT, False), (content, True), (EOS, True)]
        elif m["role"] == "tool":
            opener = "\n" if in_outputs else TOOL_OUTPUTS_BEGIN
            pieces.append((opener + TOOL_OUTPUT_BEGIN + m["content"] + TOOL_OUTPUT_END, False))
            in_outputs = True
    if in_outputs:
        pieces.append((TOOL_OUTPUTS_END, False))
    return pieces


# -------------------------------------------------------------------------------------------------
# any Hugging Face tokenizer, behind the same interface (for users' own models in grpo/sft/sample/eval)

class HFChatTokenizer:
    """A `transformers` tokenizer with its own chat template, EOS and specials, exposing what the R1
    trainers use from `Tokenizer`: encode/decode, bos/eos/pad ids, `apply_chat_template` and
    `encode_chat` (ids + a mask that is 1 on the assistant replies). The mask comes from rendering the
    conversation prefix by prefix with the model's own template: the characters each assistant turn
    adds are the trained ones (tokens are mapped to them by their character offsets)."""

    def __init__(self, tok):
        if tok.chat_template is None:
            raise ValueError("this tokenizer has no chat_template: the R1 trainers render prompts with it")
        if tok.eos_token_id is None:
            raise ValueError("this tokenizer has no eos_token: generation could not stop")
        if not tok.is_fast:
            raise ValueError("this is a slow (Python) tokenizer; the assistant loss mask needs a fast one's "
                             "character offsets (save the model's tokenizer.json)")
        self.hf = tok

    @property
    def stop_ids(self) -> list[int]:
        """EOS and the template's end-of-turn token (a base model's EOS is often not what ends a chat turn:
        Qwen2.5 base has eos <|endoftext|> while its template closes turns with <|im_end|>)."""
        ids = [self.hf.eos_token_id]
        msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ANSWER"}]
        try:
            text = self.hf.apply_chat_template(msgs, tokenize=False)
        except Exception:
            return ids
        after = text[text.rfind("ANSWER") + len("ANSWER"):]
        special = set(self.hf.all_special_ids) | set(self.hf.added_tokens_decoder)
        for t in self.hf.encode(after, add_special_tokens=False):
            if t in special:
                if t not in ids:
                    ids.append(t)
                break
        return ids

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False)
        return ([self.hf.bos_token_id] + ids) if add_bos and self.hf.bos_token_id is not None else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def bos_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def eos_id(self) -> int:
        return self.hf.eos_token_id

    @property
    def pad_id(self) -> int:
        return self.hf.pad_token_id if self.hf.pad_token_id is not None else self.hf.eos_token_id

    @property
    def think_end_id(self) -> int | None:
        """The id of `</think>` when the vocabulary has it as one token (R1-style templates), else None."""
        ids = self.hf.encode(THINK_END, add_special_tokens=False)
        return ids[0] if len(ids) == 1 else None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            thinking: bool = False, tools: list[dict] | None = None) -> str:
        _check_messages(messages)
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           **({"tools": tools} if tools else {}))

    def encode_chat(self, messages: list[dict], thinking: bool = False) -> tuple[list[int], list[int]]:
        _check_messages(messages)
        full = self.apply_chat_template(messages, add_generation_prompt=False)
        trained = [False] * len(full)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = 0
            if i:
                prompt = self.apply_chat_template(messages[:i], add_generation_prompt=True)
                if full.startswith(prompt):
                    start = len(prompt)
                else:    # the generation prompt is not how the reply renders (R1-distill adds "<think>\n"):
                    before = len(self.apply_chat_template(messages[:i], add_generation_prompt=False))
                    found = full.find(m["content"], before) if m["content"] else -1
                    start = found if found >= 0 else before       # train from the reply's own text
            upto = self.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
            end = len(upto)
            if not full.startswith(upto):
                raise ValueError("this chat template renders earlier turns differently once later turns follow; "
                                 "the assistant loss mask cannot be derived from it")
            trained[start:end] = [True] * (end - start)
        enc = self.hf(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        mask = [int(any(trained[a:b])) for a, b in enc["offset_mapping"]]
        return ids, mask

    def save(self, path: str | Path, model_max_length: int | None = None) -> None:
        self.hf.save_pretrained(str(path))


def load_tokenizer(path: str | Path):
    """nanoseek's tokenizer for a directory written by nanoseek (DeepSeek's specials), else the
    directory's own Hugging Face tokenizer (`AutoTokenizer`) behind the same interface."""
    path = Path(path)
    try:
        return Tokenizer.load(path)
    except (FileNotFoundError, ValueError) as ours:
        try:
            from transformers import AutoTokenizer
            hf = AutoTokenizer.from_pretrained(str(path))
        except Exception as e:
            raise ValueError(f"{path}: neither a nanoseek tokenizer ({ours}) nor one transformers can load "
                             f"({type(e).__name__}: {e})") from None
        return HFChatTokenizer(hf)
