"""The character-level tokenizer that ships with fastpeft (``fastpeft/data/char_tokenizer.json``).

It lets the embedded job and the tests run with no downloads. The file is a ``tokenizers`` JSON
(a BPE model with no merges, so every character is one token), loaded through transformers'
``PreTrainedTokenizerFast``: everything downstream (padding, offsets, chat templates, ``decode``)
goes through the ordinary Hugging Face tokenizer API.

Vocabulary: 8 special tokens, then ``\\n``, ``\\t`` and printable ASCII (105 ids); anything else maps
to ``<unk>``. Chat template::

    <|system|>\\n{content}<|end|>\\n   <|user|>\\n{content}<|end|>\\n   <|assistant|>\\n{content}</s>\\n
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# the bundled file's vocabulary, in id order (tests/training/test_tokenizer.py checks the file against it)
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
CHARACTERS = ("\n", "\t") + tuple(chr(i) for i in range(32, 127))
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] not in ('system', 'user', 'assistant') %}"
    "{{ raise_exception('unknown chat role ' ~ m['role'] ~ '; the bundled template knows system, user, assistant') }}"
    "{% endif %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}"
    # transformers renders with trim_blocks, so each newline sits before a tag, never after one
    "{% if m['role'] == 'assistant' %}{{ eos_token }}\n{% else %}<|end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# the source tree has training/ beside fastpeft/; an installed wheel has fastpeft/training/
_CANDIDATES = (
    Path(__file__).resolve().parents[1] / "fastpeft" / "data" / "char_tokenizer.json",
    Path(__file__).resolve().parents[1] / "data" / "char_tokenizer.json",
)


def tokenizer_file() -> Path:
    """Where the bundled tokenizer JSON is (the first candidate if none exists)."""
    return next((p for p in _CANDIDATES if p.exists()), _CANDIDATES[0])


def load_char_tokenizer(padding_side: str = "right") -> Any:
    """The bundled character tokenizer as a ``PreTrainedTokenizerFast`` with its chat template."""
    from transformers import PreTrainedTokenizerFast

    path = tokenizer_file()
    if not path.exists():
        raise FileNotFoundError(f"the bundled tokenizer {path} is missing; reinstall fastpeft")
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(path),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side=padding_side,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def load_tokenizer(path: str | None, padding_side: str = "right") -> Any:
    """A tokenizer from a local directory (``AutoTokenizer``), or the bundled one when ``path`` is None.

    A tokenizer without a pad token gets its EOS token as pad (labels mask padding anyway).
    """
    if path is None:
        return load_char_tokenizer(padding_side)
    from transformers import AutoTokenizer

    if not Path(path).exists():
        raise FileNotFoundError(f"tokenizer path {path!r} does not exist")
    tok = AutoTokenizer.from_pretrained(path, padding_side=padding_side)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer at {path!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok
