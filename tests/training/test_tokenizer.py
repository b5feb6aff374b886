"""The bundled character tokenizer: its vocabulary, exact round trips, unknown characters, chat template."""

from __future__ import annotations

import pytest

from fastpeft.training.tokenizer import CHARACTERS, SPECIAL_TOKENS, load_tokenizer


def test_vocabulary_is_the_special_tokens_then_the_characters_in_id_order(char_tokenizer):
    vocab = char_tokenizer.get_vocab()
    assert sorted(vocab, key=vocab.get) == list(SPECIAL_TOKENS + CHARACTERS) and len(char_tokenizer) == 105
    assert (char_tokenizer.pad_token_id, char_tokenizer.bos_token_id, char_tokenizer.eos_token_id) == (0, 1, 2)


def test_every_character_is_one_token_and_decodes_back(char_tokenizer):
    text = "Q: 47+38=?\nA:\t 7+8=15 write 5 carry 1; answer 85 ~{}"
    ids = char_tokenizer.encode(text)
    assert ids == [len(SPECIAL_TOKENS) + CHARACTERS.index(c) for c in text]
    assert char_tokenizer.decode(ids) == text
    assert char_tokenizer.encode("é") == [char_tokenizer.unk_token_id]


def test_chat_template(char_tokenizer):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    assert char_tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|system|>\nbe brief<|end|>\n<|user|>\n2+2?<|end|>\n<|assistant|>\n4</s>\n"
    )
    prompt = char_tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\n2+2?<|end|>\n<|assistant|>\n"


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing"))
