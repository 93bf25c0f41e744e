"""GPT-2 byte-level BPE, built with tiktoken from a local ``encoder.json`` + ``vocab.bpe``.

tiktoken's Rust BPE is ~10x faster than the pure-Python encoder of GPT-2 / microsoft/LoRA
(``examples/NLG/src/encoder.py``) and gives the same ids: in GPT-2 the id of every merged token is
256 + its line in ``vocab.bpe``, so "lowest merge rank first" and "lowest token id first" pick the
same merges. :func:`_mergeable_ranks` checks that property instead of assuming it.

Nothing here touches the network: the files are read from disk (see :mod:`jt_lora.io.assets`).
"""

from __future__ import annotations

import functools
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import tiktoken

from jt_lora.io.assets import find_asset

EOS_TOKEN = "<|endoftext|>"
EOS_TOKEN_ID = 50256
# GPT-2's pre-tokenizer (contractions, letters, numbers, other symbols, whitespace runs) in the
# possessive form tiktoken uses for speed; it splits text exactly like the original
# r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+".
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def _byte_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes map to themselves; the other 68 (control, space, soft hyphen ...) map to
    chr(256), chr(257), ... in byte order. encoder.json and vocab.bpe are written in these characters.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _mergeable_ranks(encoder_json: Path, vocab_bpe: Path) -> Dict[bytes, int]:
    """Token bytes -> id, validated against the merge list so tiktoken's BPE equals GPT-2's."""
    with open(encoder_json, encoding="utf-8") as f:
        encoder = json.load(f)
    with open(vocab_bpe, encoding="utf-8") as f:
        lines = f.read().split("\n")
    # First line is "#version: 0.2"; the file ends with a newline.
    merges = [tuple(line.split()) for line in lines[1:] if line.strip()]

    char_to_byte = {c: b for b, c in _byte_to_unicode().items()}
    ranks = {}
    for token, idx in encoder.items():
        if token == EOS_TOKEN:
            continue
        try:
            ranks[bytes(char_to_byte[c] for c in token)] = idx
        except KeyError as e:
            raise ValueError(f"{encoder_json}: token {token!r} has a character outside GPT-2's byte alphabet") from e

    n_bytes = 256
    for i, pair in enumerate(merges):
        if len(pair) != 2:
            raise ValueError(f"{vocab_bpe}:{i + 2}: expected two symbols per merge, got {pair!r}")
        if encoder.get(pair[0] + pair[1]) != n_bytes + i:
            raise ValueError(
                f"{vocab_bpe}:{i + 2}: merge {pair} does not produce token id {n_bytes + i} in {encoder_json}; "
                "these files are not a GPT-2 style vocabulary that tiktoken can reproduce exactly"
            )
    if sorted(ranks.values()) != list(range(n_bytes + len(merges))):
        raise ValueError(f"{encoder_json}: ids are not 0..{n_bytes + len(merges) - 1} (256 bytes + one per merge)")
    if encoder.get(EOS_TOKEN) != EOS_TOKEN_ID or len(ranks) != EOS_TOKEN_ID:
        raise ValueError(f"{encoder_json}: expected {EOS_TOKEN} = {EOS_TOKEN_ID} after {EOS_TOKEN_ID} BPE tokens")
    return ranks


class GPT2Tokenizer:
    """GPT-2 BPE with the interface the rest of jt_lora codes against.

    ``encode`` treats ``<|endoftext|>`` in the text as plain characters, exactly like the reference
    encoder (which has no notion of special tokens); pass ``allow_special=True`` to map it to id 50256.

    Args:
        vocab_dir: directory holding ``encoder.json`` and ``vocab.bpe``.
    """

    eos_token_id = EOS_TOKEN_ID
    bos_token_id = EOS_TOKEN_ID  # GPT-2 and LoRA use <|endoftext|> for both.
    eos_token = EOS_TOKEN

    def __init__(self, vocab_dir: Path):
        self.vocab_dir = Path(vocab_dir)
        ranks = _mergeable_ranks(self.vocab_dir / "encoder.json", self.vocab_dir / "vocab.bpe")
        self.encoding = tiktoken.Encoding(
            name=f"gpt2-local:{self.vocab_dir}",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={EOS_TOKEN: EOS_TOKEN_ID},
            explicit_n_vocab=EOS_TOKEN_ID + 1,
        )
        self.vocab_size = self.encoding.n_vocab  # 50257

    def encode(self, text: str, allow_special: bool = False) -> List[int]:
        """Token ids of ``text``; ``<|endoftext|>`` stays plain text unless ``allow_special``."""
        if allow_special:
            return self.encoding.encode(text, allowed_special="all")
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Iterable[str], num_threads: int = 8, allow_special: bool = False) -> List[List[int]]:
        """Encode many texts; same ids as :meth:`encode`, in order.

        Each distinct text is encoded once (E2E repeats every MR for each of its ~8 references), and
        large batches are split into one contiguous chunk per thread: tiktoken releases the GIL while
        encoding, and a chunk per thread avoids the per-text task overhead of
        ``tiktoken.Encoding.encode_batch``, which was 3x slower than a plain loop in our measurements.
        """
        texts = list(texts)
        unique = list(dict.fromkeys(texts))
        encode = functools.partial(self.encode, allow_special=allow_special)
        n_threads = max(1, min(num_threads, os.cpu_count() or 1, len(unique) // 1000))
        if n_threads == 1:
            ids = [encode(t) for t in unique]
        else:
            size = -(-len(unique) // n_threads)
            chunks = [unique[i : i + size] for i in range(0, len(unique), size)]
            with ThreadPoolExecutor(n_threads) as pool:
                ids = [x for part in pool.map(lambda chunk: [encode(t) for t in chunk], chunks) for x in part]
        if len(unique) == len(texts):
            return ids
        by_text, first, out = dict(zip(unique, ids)), {}, []
        for i, t in enumerate(texts):
            if t in first:  # a repeat gets a copy, so mutating one result never changes another
                out.append(list(out[first[t]]))
            else:
                first[t] = i
                out.append(by_text[t])
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; invalid UTF-8 from a partial character becomes U+FFFD (as in GPT-2)."""
        return self.encoding.decode([int(i) for i in ids], errors="replace")

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"GPT2Tokenizer(vocab_dir={str(self.vocab_dir)!r}, vocab_size={self.vocab_size})"


@functools.lru_cache(maxsize=None)
def _load_cached(vocab_dir: str) -> GPT2Tokenizer:
    return GPT2Tokenizer(Path(vocab_dir))


def load_tokenizer(vocab_dir: Optional[str] = None) -> GPT2Tokenizer:
    """The GPT-2 tokenizer for ``vocab_dir`` (built once per directory, then cached).

    Args:
        vocab_dir: directory with ``encoder.json`` and ``vocab.bpe``; None looks up the ``gpt2-vocab``
            asset (``$JT_LORA_DATA``, project ``data/``, ``../shared/data``).

    Raises:
        FileNotFoundError: the directory or one of its two files is missing.
    """
    explicit = None if vocab_dir is None else Path(vocab_dir) / "encoder.json"
    # Look up the file, not the folder: an empty gpt2-vocab/ left by a failed download must not
    # hide a complete copy further down the search order.
    path = find_asset("gpt2-vocab/encoder.json", explicit=explicit).parent
    if not (path / "vocab.bpe").is_file():
        raise FileNotFoundError(f"{path / 'vocab.bpe'} not found (a GPT-2 vocab directory needs encoder.json and vocab.bpe)")
    return _load_cached(str(path))
