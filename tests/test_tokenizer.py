"""Tokenizer: special ids, digit splitting, round trips, chat templates, loss masks, HF parity."""
import json
import random
import subprocess
import sys

import pytest

from nanoseek.tokenizer import (ALL_TOKENS, ANSWER, ANSWER_END, ASSISTANT, BOS, EOS, THINK, THINK_END,
                                USER, Tokenizer)

WORDS = "the quick brown fox jumps over lazy dog so we add carry and then answer is sum of digits".split()


def corpus(n=300, seed=0):
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        texts.append(f"{a}+{b}=?")
        texts.append(f"{THINK}7+5=12, 4+8+1=13, 3+2+1=6, so {a + b}{THINK_END}{ANSWER}{a + b}{ANSWER_END}")
        texts.append(" ".join(rng.choices(WORDS, k=8)) + ".")
    texts += ["Привет, мир! Сложи числа.", "你好世界，一加一等于二。", "Grüße aus Köln, ça va? Ελληνικά"] * 20
    return texts


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(corpus(), vocab_size=400)


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tok.save(path)
    return path


CHAT = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "347+285=?"},
    {"role": "assistant", "content": f"{THINK}\n7+5=12</think>wait{THINK_END}So 632"},
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2=?"},
    {"role": "assistant", "content": f"{THINK}\n2+2=4{THINK_END}{ANSWER}4{ANSWER_END}"},
]


def test_special_tokens_ids_and_characters(tok):
    assert [tok.token_to_id(t) for t in ALL_TOKENS] == list(range(8))
    assert [tok.id_to_token(i) for i in range(8)] == list(ALL_TOKENS)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.user_id, tok.assistant_id) == (0, 1, 1, 2, 3)
    assert (tok.think_id, tok.think_end_id, tok.answer_id, tok.answer_end_id) == (4, 5, 6, 7)
    # exact code points: U+FF5C fullwidth bar, U+2581 lower one eighth block
    assert BOS == "<\uff5cbegin\u2581of\u2581sentence\uff5c>" and EOS == "<\uff5cend\u2581of\u2581sentence\uff5c>"
    assert USER == "<\uff5cUser\uff5c>" and ASSISTANT == "<\uff5cAssistant\uff5c>"
    assert 264 < tok.vocab_size <= 400


def test_tags_are_one_id_even_when_glued(tok):
    ids = tok.encode("<think>7+5=12</think>")
    assert ids[0] == tok.think_id and ids[-1] == tok.think_end_id
    assert tok.decode(ids[1:-1]) == "7+5=12"
    for i, t in enumerate(ALL_TOKENS):
        ids = tok.encode(f"so{t}12x")
        assert ids.count(i) == 1, t
        assert ids == tok.encode("so") + [i] + tok.encode("12x")
    # training splits the corpus on the tags too, so no merges are wasted on pieces of them
    learned = [tok.id_to_token(i) for i in range(8, tok.vocab_size)]
    assert not [v for v in learned if len(v) > 1 and ("<" in v or ">" in v or "think" in v)]


def test_digits_are_never_merged(tok):
    ids = tok.encode("1234")
    assert [tok.id_to_token(i) for i in ids] == ["1", "2", "3", "4"]
    ids = tok.encode("x=90210 and 347+285=632")
    assert sum(tok.id_to_token(i).isdigit() for i in ids) == 14
    # the corpus is full of numbers, yet no learned token holds two digits
    vocab = [tok.id_to_token(i) for i in range(tok.vocab_size)]
    assert max(sum(c.isdigit() for c in v) for v in vocab) == 1
    assert any(len(v) > 2 for v in vocab)  # ... while merges did happen


def random_text(rng):
    ranges = [(0x20, 0x7E), (0x09, 0x0A), (0xA0, 0x24F), (0x400, 0x4FF), (0x300, 0x36F),
              (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0xE000, 0xF8FF), (0x10000, 0x10FFFF)]
    parts = []
    for _ in range(rng.randint(0, 30)):
        lo, hi = rng.choice(ranges)
        parts.append(chr(rng.randint(lo, hi)) * rng.choice([1, 1, 1, 3]))
        if rng.random() < 0.05:
            parts.append(rng.choice([THINK, THINK_END, ANSWER, ANSWER_END, "  ", "\n\n"]))
    return "".join(parts)


def test_round_trip_random_unicode(tok):
    rng = random.Random(1)
    for _ in range(300):
        s = random_text(rng)
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert tok.encode(s, add_bos=True) == [tok.bos_id] + ids
    assert tok.decode(tok.encode("")) == ""


def test_decode_drops_control_tokens_keeps_tags(tok):
    body = "<think>7+5=12</think><answer>12</answer>"
    ids = [tok.bos_id] + tok.encode(body) + [tok.eos_id]
    assert tok.decode(ids) == body
    assert tok.decode(ids, skip_special_tokens=False) == BOS + body + EOS
    assert tok.decode([tok.user_id, tok.assistant_id]) == ""


def test_chat_template_v3(tok):
    want = (f"{BOS}You are helpful.\n\nBe brief."
            f"{USER}347+285=?{ASSISTANT}{THINK}\n7+5=12</think>wait{THINK_END}So 632{EOS}"
            f"{USER}2+2=?{ASSISTANT}{THINK}\n2+2=4{THINK_END}{ANSWER}4{ANSWER_END}{EOS}")
    assert tok.apply_chat_template(CHAT, add_generation_prompt=False) == want
    prompt = CHAT[:5]
    assert tok.apply_chat_template(prompt) == want[:want.rindex(ASSISTANT)] + ASSISTANT
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == f"{BOS}{USER}hi{ASSISTANT}"


def test_chat_template_r1_strips_past_reasoning(tok):
    # the first answer is past (a user turn follows): cut up to and including its LAST </think>
    want = (f"{BOS}You are helpful.\n\nBe brief."
            f"{USER}347+285=?{ASSISTANT}So 632{EOS}"
            f"{USER}2+2=?{ASSISTANT}{THINK}\n2+2=4{THINK_END}{ANSWER}4{ANSWER_END}{EOS}")
    assert tok.apply_chat_template(CHAT, add_generation_prompt=False, thinking=True) == want
    prompt = CHAT[:5]
    assert tok.apply_chat_template(prompt, thinking=True) == (
        want[:want.rindex(ASSISTANT)] + f"{ASSISTANT}{THINK}\n")
    # an assistant turn without reasoning is left alone
    no_think = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}]
    assert tok.apply_chat_template(no_think, thinking=True) == f"{BOS}{USER}a{ASSISTANT}b{EOS}{USER}c{ASSISTANT}{THINK}\n"


@pytest.mark.parametrize("thinking", [False, True])
def test_encode_chat_mask_marks_assistant_outputs(tok, thinking):
    ids, mask = tok.encode_chat(CHAT, thinking=thinking)
    # piecewise encoding == encoding the rendered string
    assert ids == tok.encode(tok.apply_chat_template(CHAT, add_generation_prompt=False, thinking=thinking))
    assert len(mask) == len(ids) and set(mask) == {0, 1} and mask[0] == 0
    runs, run = [], []
    for i, m in zip(ids, mask):
        if m:
            run.append(i)
        elif run:
            runs, run = runs + [run], []
    runs += [run] if run else []
    first = "So 632" if thinking else CHAT[2]["content"]
    assert [tok.decode(r, skip_special_tokens=False) for r in runs] == [first + EOS, CHAT[5]["content"] + EOS]
    prompt_text = tok.decode([i for i, m in zip(ids, mask) if not m], skip_special_tokens=False)
    assert prompt_text == f"{BOS}You are helpful.\n\nBe brief.{USER}347+285=?{ASSISTANT}{USER}2+2=?{ASSISTANT}"


def test_save_load_same_ids(tok, saved):
    assert sorted(p.name for p in saved.iterdir()) == ["special_tokens_map.json", "tokenizer.json",
                                                       "tokenizer_config.json"]
    tok2 = Tokenizer.load(saved)
    assert tok2.vocab_size == tok.vocab_size
    for s in corpus(20, seed=5) + ["Grüße 你好 🙂 <think>1</think>"]:
        assert tok2.encode(s) == tok.encode(s) and tok2.encode(s, add_bos=True) == tok.encode(s, add_bos=True)
    assert tok2.encode_chat(CHAT, thinking=True) == tok.encode_chat(CHAT, thinking=True)
    assert tok2.decode(tok.encode(f"{THINK}x{THINK_END}"), skip_special_tokens=True) == f"{THINK}x{THINK_END}"


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}},
         {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]
TOOL_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "21C"},
    {"role": "assistant", "content": "<think>both</think>Paris 18C, Rome 21C."},
    {"role": "user", "content": "Thanks"},
]


def test_chat_template_tools(tok):
    text = tok.apply_chat_template(TOOL_CHAT, tools=TOOLS)
    want = (f"{BOS}Be brief.\n\n## Tools\nYou have access to the following tools:\n\n### get_weather\n"
            'Description: Weather in a city.\nParameters: {"type": "object", "properties": {"city": {"type": '
            '"string"}}, "required": ["city"]}\n\n### now\nDescription: \nParameters: {"type": "object", '
            '"properties": {}}'
            f"{USER}Weather in Paris and Rome?"
            f"{ASSISTANT}<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
            '{"city": "Paris"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n'
            '```json\n{"city": "Rome"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>' + EOS +
            "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>18C<｜tool▁output▁end｜>\n<｜tool▁output▁begin｜>21C"
            "<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
            f"{ASSISTANT}<think>both</think>Paris 18C, Rome 21C.{EOS}{USER}Thanks{ASSISTANT}")
    assert text == want
    ids, mask = tok.encode_chat(TOOL_CHAT[:3], tools=TOOLS)      # the calls are trained, the tools prompt is not
    trained = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert trained.startswith("<｜tool▁calls▁begin｜>") and trained.endswith(f"<｜tool▁calls▁end｜>{EOS}")
    assert "## Tools" not in trained


def test_transformers_autotokenizer_parity(tok, saved):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(saved))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert len(hf) == tok.vocab_size
    texts = corpus(10, seed=7) + ["Grüße 你好 🙂", "  two  spaces\n\nand 1234", "<think>7+5=12</think>"]
    for s in texts:
        assert hf(s)["input_ids"] == tok.encode(s, add_bos=True)  # HF adds BOS by default, like DeepSeek
        assert hf(s, add_special_tokens=False)["input_ids"] == tok.encode(s)
        ids = tok.encode(s, add_bos=True) + [tok.eos_id]
        for skip in (True, False):
            assert hf.decode(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip)
    convs = [(CHAT, None), (CHAT[:5], None), ([{"role": "user", "content": "hi"}], None), (CHAT[1:3], None),
             (TOOL_CHAT, TOOLS), (TOOL_CHAT[:3], TOOLS), (TOOL_CHAT[1:2], TOOLS)]
    for msgs, tools in convs:
        for thinking in (False, True):
            for gen in (False, True):
                want = tok.apply_chat_template(msgs, add_generation_prompt=gen, thinking=thinking, tools=tools)
                got = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, thinking=thinking,
                                             tools=tools)
                assert got == want, (msgs, thinking, gen)
    # thinking is off unless passed, and tokenize=True does not add a second BOS
    assert hf.apply_chat_template(CHAT[:5], tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(CHAT[:5])
    out = hf.apply_chat_template(CHAT[:5], tokenize=True, add_generation_prompt=True, thinking=True)
    ids = out["input_ids"] if hasattr(out, "keys") else out  # transformers 5 returns a BatchEncoding
    assert ids == tok.encode(tok.apply_chat_template(CHAT[:5], thinking=True))
    assert ids.count(tok.bos_id) == 1


def test_bad_inputs_raise_clear_errors(tok, saved, tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size=263: must be >= 264"):
        Tokenizer.train(["abc"], vocab_size=263)
    bad = [dict(m) for m in CHAT]
    bad[2]["role"] = "bot"
    with pytest.raises(ValueError, match=r"messages\[2\]\.role='bot': must be one of system, user, assistant"):
        tok.apply_chat_template(bad)
    with pytest.raises(ValueError, match=r"messages\[1\] \(user\) has no 'content'"):
        tok.encode_chat([CHAT[0], {"role": "user"}])
    with pytest.raises(ValueError, match=r"messages\[0\]\.content: must be a string, got NoneType"):
        tok.apply_chat_template([{"role": "assistant", "content": None}])
    with pytest.raises(ValueError, match=r"messages\[0\] has no 'role'"):
        tok.apply_chat_template([{"content": "hi"}])
    with pytest.raises(ValueError, match=r"messages\[1\]\.role='function': must be one of"):
        tok.apply_chat_template([CHAT[1], {"role": "function", "content": "42"}])
    with pytest.raises(ValueError, match=r"messages\[0\]\.tool_calls\[0\]: must be"):
        tok.encode_chat([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]}])
    with pytest.raises(ValueError, match=r"messages\[0\]\.tool_calls: only an assistant"):
        tok.encode_chat([{"role": "user", "content": "", "tool_calls": []}])
    with pytest.raises(ValueError, match=r"tools\[0\]: must be"):
        tok.apply_chat_template(CHAT[1:2], tools=[{"type": "function"}])
    with pytest.raises(ValueError, match=r"non-empty list"):
        tok.encode_chat([])
    with pytest.raises(KeyError, match="not in the vocabulary"):
        tok.token_to_id("<nope>")
    with pytest.raises(KeyError, match="out of range"):
        tok.id_to_token(10**6)

    with pytest.raises(FileNotFoundError, match="tokenizer directory"):
        Tokenizer.load(tmp_path / "missing")
    for name, corrupt in [("tokenizer_config.json", None), ("tokenizer.json", "{not json"),
                          ("tokenizer_config.json", "{not json"), ("special_tokens_map.json", '{"bos_token": "<s>"}')]:
        d = tmp_path / f"{name}-{corrupt is None}"
        d.mkdir()
        for f in saved.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        if corrupt is None:
            (d / name).unlink()
        else:
            (d / name).write_text(corrupt)
        with pytest.raises((FileNotFoundError, ValueError), match=name.replace(".", r"\.")):
            Tokenizer.load(d)


def test_import_graph_has_no_torch():
    code = ("import sys, nanoseek.tokenizer; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('nanoseek.model')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_saved_config_is_what_hf_needs(saved):
    config = json.loads((saved / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (BOS, EOS, EOS)
    assert config["clean_up_tokenization_spaces"] is False and "thinking" in config["chat_template"]
    tokenizer_json = json.loads((saved / "tokenizer.json").read_text(encoding="utf-8"))
    specials = {t["content"]: t["special"] for t in tokenizer_json["added_tokens"]}
    assert specials == {BOS: True, EOS: True, USER: True, ASSISTANT: True,
                        THINK: False, THINK_END: False, ANSWER: False, ANSWER_END: False}


def test_hf_chat_tokenizer_think_end_id(tok, saved):
    """An HF tokenizer exposes </think>'s id when its vocabulary has it as one token (the server's
    structured output waits for it after R1-style reasoning), else None."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as RawTokenizer, models, pre_tokenizers, trainers

    from nanoseek.tokenizer import HFChatTokenizer
    hf = transformers.AutoTokenizer.from_pretrained(str(saved))
    assert HFChatTokenizer(hf).think_end_id == tok.think_end_id
    raw = RawTokenizer(models.BPE(unk_token="[UNK]"))          # a vocabulary without the tag as a token
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(["plain text </think> here " * 20], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["[UNK]", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_raw = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>")
    hf_raw.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}<think>\n"
    assert len(hf_raw.encode("</think>", add_special_tokens=False)) > 1
    assert HFChatTokenizer(hf_raw).think_end_id is None
