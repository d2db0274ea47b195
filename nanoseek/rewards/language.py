"""Language consistency (DeepSeek-R1 sec. 2.3.2): the share of chain-of-thought words in the target language.

R1-Zero mixed languages inside its reasoning; R1 adds this reward to accuracy during
reasoning-oriented RL, trading a little accuracy for readable chains of thought. We approximate
"language" by script: a word is a maximal run of letters (digits, punctuation and underscores
split words and never count), and it is in the target language if every letter is in the
target script. Only the think block is scored; without one, the whole completion minus its tags.
A text with no words scores 1.0: nothing in it is in the wrong language.

Scripts: "en" = ASCII letters; "zh" = CJK ideographs. A Chinese sentence without spaces is one
word, so the reward is a rough count of language switches, not a token-accurate fraction.
"""
from __future__ import annotations

import re

from nanoseek.data.tasks import Problem, extract_think

_WORD_RE = re.compile(r"[^\W\d_]+")
_TAG_RE = re.compile(r"</?(?:think|answer)>")


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return 0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2FA1F or 0xF900 <= cp <= 0xFAFF


SCRIPTS = {"en": str.isascii, "zh": _is_cjk}


def consistency(text: str, target: str = "en") -> float:
    """Fraction of words in `text` written in the target script (1.0 if there are no words)."""
    in_script = SCRIPTS[target]
    words = _WORD_RE.findall(text)
    if not words:
        return 1.0
    return sum(all(in_script(ch) for ch in w) for w in words) / len(words)


def language_consistency_reward(target: str = "en"):
    if target not in SCRIPTS:
        raise ValueError(f"target language must be one of {', '.join(SCRIPTS)}, got {target!r}")

    def language_consistency_reward(prompts: list[str], completions: list[str], problems: list[Problem],
                                    **kw) -> list[float]:
        out = []
        for c in completions:
            think = extract_think(c)
            out.append(consistency(think if think is not None else _TAG_RE.sub(" ", c), target))
        return out

    return language_consistency_reward
