"""Byte-level BPE (the `tokenizers` library): trained on the corpus or loaded, saved beside the shards.

Special tokens take the first ids: <pad>=0, <bos>=1, <eos>=2, then any language tags (`<2fr>`), so
every prepared dataset agrees on them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ctxtrain.errors import UserError

SPECIALS = ["<pad>", "<bos>", "<eos>"]
PAD, BOS, EOS = 0, 1, 2


def lang_tag(lang: str) -> str:
    """Target-language tag prepended to translation sources (Johnson et al., 2017)."""
    return f"<2{lang}>"


def train_bpe(texts: Iterable[str], vocab_size: int, extra_specials: list[str] = (),
              length: int | None = None) -> Tokenizer:
    """Train a byte-level BPE on texts; deterministic for the same texts in the same order."""
    if vocab_size < 256 + len(SPECIALS) + len(extra_specials):
        raise UserError(f"--vocab-size {vocab_size}: a byte-level BPE needs at least "
                        f"{256 + len(SPECIALS) + len(extra_specials)}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIALS + list(extra_specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=length)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"tokenizer {p} not found; pass the tokenizer.json written by `ctxtrain prepare`")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise UserError(f"tokenizer {p} cannot be read ({str(e).splitlines()[0]}); pass a tokenizers JSON "
                        "file") from None
    for i, name in enumerate(SPECIALS):
        if tok.token_to_id(name) != i:
            raise UserError(f"tokenizer {p}: special token {name} must have id {i}; train one with `ctxtrain "
                            "prepare`")
    return tok


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
