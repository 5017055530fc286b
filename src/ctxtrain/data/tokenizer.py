"""Byte-level BPE (the `tokenizers` library): trained on the corpus or loaded, saved beside the shards.

A trained tokenizer's special tokens take the first ids: <pad>=0, <bos>=1, <eos>=2, then any language tags
(`<2fr>`). A pretrained model's tokenizer (`prepare --tokenizer FOLDER`) keeps its own vocabulary and special
ids, read from the folder as transformers reads them; index.json records the special ids either way.
"""

from __future__ import annotations

import hashlib
import json
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


def tokenizer_file(path: str | Path) -> Path:
    """A tokenizer.json, or the one in a model folder."""
    p = Path(path)
    return p / "tokenizer.json" if p.is_dir() else p


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A `tokenizers` JSON file (or a model folder's tokenizer.json): ctxtrain's own or a pretrained
    model's."""
    p = tokenizer_file(path)
    if not p.is_file():
        raise UserError(f"tokenizer {p} not found; pass the tokenizer.json written by `ctxtrain prepare`, or "
                        "a model folder that holds one (ctxtrain reads the `tokenizers` format)")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise UserError(f"tokenizer {p} cannot be read ({str(e).splitlines()[0]}); pass a tokenizers JSON "
                        "file") from None


def special_ids(path: str | Path, tok: Tokenizer) -> dict:
    """pad, bos and eos of a tokenizer: ctxtrain's own (<pad>=0, <bos>=1, <eos>=2), else a model folder's as
    transformers reads them (generation_config.json, then config.json, then tokenizer_config.json's tokens).
    No pad: the eos (padding is masked in the loss). One line when no eos can be found."""
    if all(tok.token_to_id(name) == i for i, name in enumerate(SPECIALS)):
        return {"pad": PAD, "bos": BOS, "eos": EOS}
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    found: dict = {}
    for name in ("generation_config.json", "config.json"):
        try:
            config = json.loads((folder / name).read_bytes())
        except (OSError, ValueError):
            continue
        for key in ("bos", "eos", "pad"):
            value = config.get(f"{key}_token_id")
            value = value[0] if isinstance(value, list) and value else value
            if isinstance(value, int):
                found.setdefault(key, value)
    try:
        config = json.loads((folder / "tokenizer_config.json").read_bytes())
    except (OSError, ValueError):
        config = {}
    for key in ("bos", "eos", "pad"):
        token = config.get(f"{key}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and tok.token_to_id(token) is not None:
            found.setdefault(key, tok.token_to_id(token))
    if "eos" not in found:
        raise UserError(f"tokenizer {path}: no end-of-sequence id found (eos_token_id in "
                        "generation_config.json or config.json, or eos_token in tokenizer_config.json); "
                        "documents are separated by it")
    return {"pad": found.get("pad", found["eos"]), "bos": found.get("bos"), "eos": found["eos"]}


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
