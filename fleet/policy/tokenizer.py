"""The policy's word-level tokenizer: instructions -> fixed-length int64 id arrays, no downloads.

The vocabulary holds every word any simulator may say, novel ones included: their embeddings exist
but are never trained in pretraining, as a web-pretrained VLM knows words robot data never used.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

from fleet.embodiments import EMBODIMENTS

PAD = "[PAD]"
UNK = "[UNK]"
_WORD = re.compile(r"[a-z]+")
_CACHE_LIMIT = 4096  # instructions repeat across a fleet; caching their encodings skips the regex

# Instruction words of all four tasks plus the held-out ("novel") colours, shapes and objects.
DEFAULT_WORDS: tuple[str, ...] = tuple(
    (
        # verbs, prepositions, fillers
        "pick up the lift bar with both arms hand over object drive go to marker grasp a an and "
        # colours
        "red green blue yellow purple orange cyan magenta white black pink brown gray "
        # shapes (franka)
        "cube sphere cylinder cone star ring triangle "
        # objects (leap hand)
        "ball apple pen pencil marble bottle mug key card egg coin screwdriver block can disk"
    ).split()
)


def tokenize(text: str) -> list[str]:
    """Lowercase and split on every non-letter: "Pick up the RED cube!" -> ["pick", "up", "the", "red", "cube"]."""
    return _WORD.findall(text.lower())


class Vocabulary:
    """Word <-> id map: [PAD]=0, [UNK]=1, the embodiment tokens [EMB_<NAME>], then instruction words.

    Embodiment tokens contain brackets and capitals, so no instruction text can ever produce one;
    the model looks them up by `token_id(spec.token)`.
    """

    pad_id = 0
    unk_id = 1

    def __init__(self, words: Sequence[str]) -> None:
        words = tuple(words)
        if len(words) < 2 or words[0] != PAD or words[1] != UNK:
            raise ValueError(f"Vocabulary: words must start with {PAD!r}, {UNK!r}; got {list(words[:2])}")
        ids: dict[str, int] = {}
        for i, w in enumerate(words):
            if not isinstance(w, str) or not w:
                raise ValueError(f"Vocabulary: entry {i} must be a non-empty str, got {w!r}")
            if w in ids:
                raise ValueError(f"Vocabulary: word {w!r} appears twice (ids {ids[w]} and {i})")
            ids[w] = i
        self.words: tuple[str, ...] = words
        self._ids = ids
        self._cache: dict[tuple[str, int], np.ndarray] = {}

    @classmethod
    def build(cls, words: Iterable[str], embodiments: Iterable[str] | None = None) -> Vocabulary:
        """Specials, one [EMB_<NAME>] per embodiment (default: the registry's), then `words` deduplicated in order.

        Each entry of `words` is tokenized, so "pick up" adds two words and punctuation is dropped.
        """
        if embodiments is None:
            embodiments = list(EMBODIMENTS)
        out = [PAD, UNK] + [f"[EMB_{name.upper()}]" for name in embodiments]
        seen = set(out)
        for entry in words:
            for w in tokenize(entry):
                if w not in seen:
                    seen.add(w)
                    out.append(w)
        return cls(out)

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: object) -> bool:
        return word in self._ids

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and other.words == self.words

    def __hash__(self) -> int:
        return hash(self.words)

    def token_id(self, token: str) -> int:
        """Id of a word or special token; [UNK] for anything unknown."""
        return self._ids.get(token, self.unk_id)

    def encode(self, text: str, max_len: int = 16) -> np.ndarray:
        """(max_len,) int64 ids, unknown words -> [UNK], padded with [PAD]=0, truncated past max_len."""
        key = (text, max_len)
        hit = self._cache.get(key)
        if hit is None:
            ids = [self._ids.get(w, self.unk_id) for w in tokenize(text)][:max_len]
            hit = np.zeros(max_len, dtype=np.int64)
            hit[: len(ids)] = ids
            hit.flags.writeable = False  # shared by every caller that encodes the same text
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = hit
        return hit

    def decode(self, ids: Iterable[int]) -> str:
        """Words of `ids` joined by spaces, padding dropped (for logs and tests)."""
        return " ".join(self.words[int(i)] for i in ids if int(i) != self.pad_id)

    def to_dict(self) -> dict:
        """{"words": [...]}: the full id order, stored in checkpoint metadata."""
        return {"words": list(self.words)}

    @classmethod
    def from_dict(cls, d: dict) -> Vocabulary:
        if not isinstance(d, dict) or not isinstance(d.get("words"), list):
            raise ValueError("Vocabulary.from_dict: expected {'words': [str, ...]}")
        return cls(d["words"])


def default_vocabulary(embodiments: Iterable[str] | None = None) -> Vocabulary:
    """DEFAULT_WORDS united with the simulators' `fleet.sim.INSTRUCTION_WORDS` when that module provides it."""
    words = list(DEFAULT_WORDS)
    try:  # lazy: the sim package is optional for the policy, and importing it pulls in gymnasium
        from fleet.sim import INSTRUCTION_WORDS

        words += list(INSTRUCTION_WORDS)
    except (ImportError, AttributeError):
        pass
    return Vocabulary.build(words, embodiments)
