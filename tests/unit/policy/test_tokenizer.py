"""The word-level tokenizer: ids, padding, unknown words, embodiment tokens, serialization."""

import sys
import types

import numpy as np
import pytest

from fleet.embodiments import EMBODIMENTS
from fleet.policy.tokenizer import DEFAULT_WORDS, PAD, UNK, Vocabulary, default_vocabulary, tokenize


def test_tokenize_lowercases_and_splits_on_non_letters() -> None:
    assert tokenize("Pick up the RED cube!") == ["pick", "up", "the", "red", "cube"]
    assert tokenize("grasp-the  pen,2x") == ["grasp", "the", "pen", "x"]
    assert tokenize("") == []


def test_specials_and_embodiment_tokens_come_first() -> None:
    vocab = Vocabulary.build(["pick up the cube"])
    assert vocab.words[:2] == (PAD, UNK)
    assert vocab.pad_id == 0 and vocab.unk_id == 1
    for i, name in enumerate(EMBODIMENTS):
        assert vocab.token_id(EMBODIMENTS[name].token) == 2 + i
    # no text can produce an embodiment token
    assert vocab.token_id("[EMB_FRANKA]") not in vocab.encode("[EMB_FRANKA] pick").tolist()


def test_encode_round_trip_padding_and_truncation() -> None:
    vocab = default_vocabulary()
    ids = vocab.encode("Pick up the red cube", max_len=16)
    assert ids.dtype == np.int64 and ids.shape == (16,)
    assert (ids[5:] == 0).all() and (ids[:5] > 1).all()
    assert vocab.decode(ids) == "pick up the red cube"
    long = vocab.encode("lift the bar with both arms " * 5, max_len=8)
    assert long.shape == (8,) and (long > 0).all()
    assert vocab.decode(vocab.encode("drive to the blue marker", 4)) == "drive to the blue"


def test_unknown_words_map_to_unk() -> None:
    vocab = Vocabulary.build(["grasp the pen"])
    ids = vocab.encode("grasp the zebra", max_len=5)
    assert ids.tolist() == [vocab.token_id("grasp"), vocab.token_id("the"), vocab.unk_id, 0, 0]
    assert vocab.decode(ids) == f"grasp the {UNK}"


def test_encode_cache_returns_read_only_arrays() -> None:
    vocab = default_vocabulary()
    a = vocab.encode("grasp the pen")
    assert a is vocab.encode("grasp the pen")
    with pytest.raises(ValueError):
        a[0] = 5


def test_to_dict_from_dict_round_trip() -> None:
    vocab = default_vocabulary()
    again = Vocabulary.from_dict(vocab.to_dict())
    assert again == vocab and again.words == vocab.words
    text = "lift the purple bar with both arms"
    assert (again.encode(text) == vocab.encode(text)).all()


@pytest.mark.parametrize(
    "words",
    [["[UNK]", "[PAD]", "a"], ["[PAD]", "[UNK]", "a", "a"], ["[PAD]", "[UNK]", ""]],
)
def test_malformed_vocabularies_are_refused(words: list[str]) -> None:
    with pytest.raises(ValueError):
        Vocabulary.from_dict({"words": words})


def test_default_vocabulary_covers_every_task_and_novel_words() -> None:
    vocab = default_vocabulary()
    for w in DEFAULT_WORDS:
        assert w in vocab
    for w in ("magenta", "screwdriver", "cylinder", "triangle", "pencil", "mug"):
        assert w in vocab
    sim = pytest.importorskip("fleet.sim")
    for w in getattr(sim, "INSTRUCTION_WORDS", ()):
        assert w in vocab


def test_sim_words_are_united_when_present(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("fleet.sim")
    fake.INSTRUCTION_WORDS = ("wobble", "grasp")
    monkeypatch.setitem(sys.modules, "fleet.sim", fake)
    assert "wobble" in default_vocabulary()
    monkeypatch.setitem(sys.modules, "fleet.sim", types.ModuleType("fleet.sim"))  # no INSTRUCTION_WORDS
    assert "wobble" not in default_vocabulary() and "grasp" in default_vocabulary()
