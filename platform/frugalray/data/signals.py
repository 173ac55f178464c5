"""Model-free row signals: cheap text heuristics and duplicate clusters (pure Python + numpy).

Heuristics (`heuristic_scores`), per row, on the response:
- `prompt_chars`, `response_chars`: lengths in characters;
- `garbage_ratio`: the fraction of non-space characters that are symbols outside ordinary
  sentence punctuation, or that sit in an alphabetic word no language writes (case flipping
  inside the word, or 5+ letters without a vowel). Prose and numbers score 0; random
  keyboard noise scores near 1;
- `repetition_ratio`: 1 - distinct/total over word 3-grams (words when there are fewer
  than 3 n-grams): a looping response scores near 1;
- `degenerate_reason`: "" for a usable response, else `empty` (no letter or digit),
  `repetitive` (repetition_ratio > 0.5 over 8+ words, or one character filling most of a
  long response) or `copies_prompt` (the response is the prompt, normalized).

Verifier (`answer_correct`), for verifiable tasks with a reference answer: 1.0 when the
answer stated in the response (the one answer rule, `frugalray.examples.answers`: "11",
"The answer is 11.", "2 + 9 = 11" all state 11) equals the reference's, 0.0 when it differs
or none is stated, None when the row has no reference (null, empty or NaN). A reference with
no number in it ("Paris") must equal the whole response up to case, spacing and edge
punctuation (`answers.states_answer`). The pass-rate scorer (`difficulty.pass_rate_of`)
applies this same check to sampled completions.

Duplicates (`duplicate_clusters`): rows whose normalized text (NFKC, lower case, words and
symbols, no sentence punctuation or spacing)
is equal are exact duplicates; rows whose MinHash-estimated Jaccard similarity of word
n-gram shingles reaches `threshold` are near duplicates. LSH banding proposes candidate
pairs, each candidate is confirmed by its signature agreement, and union-find joins them
into clusters. The representative of a cluster is its first row in input order, and the
cluster id is the representative's position, so ids are stable for a given input order.
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from frugalray.examples.answers import states_answer

_WORD = re.compile(r"\w+")
# Words and symbols other than sentence punctuation: "8 + 3" and "8 - 3" must stay different.
_TOKEN = re.compile(r"\w+|[^\w\s.,;:!?'\"()\[\]-]|(?<=\s)-(?=\s*\d)")
_SENTENCE_PUNCT = set(".,;:!?'\"()-[]/%$+=*<>")
_VOWELS = set("aeiouyAEIOUY")

HEURISTIC_COLUMNS = ("prompt_chars", "response_chars", "garbage_ratio", "repetition_ratio", "degenerate_reason")
DEDUP_COLUMNS = ("dup_hash", "dup_cluster", "dup_cluster_size", "dup_kind")


def normalize_text(text: str) -> str:
    """NFKC, lower case, words and symbols without sentence punctuation, single spaces:
    what exact-duplicate hashing and shingling compare."""
    return " ".join(_TOKEN.findall(unicodedata.normalize("NFKC", text).lower()))


def _unwordlike(word: str) -> bool:
    if not word.isalpha() or len(word) < 3:
        return False
    inner = word[1:]
    case_flips = not (word.isupper() or word.islower() or (word[0].isupper() and inner.islower()))
    return case_flips or (len(word) >= 5 and not (set(word) & _VOWELS))


def garbage_ratio(text: str) -> float:
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return 1.0
    bad = sum(1 for c in chars if not c.isalnum() and c not in _SENTENCE_PUNCT)
    bad += sum(len(w) for w in _WORD.findall(text) if _unwordlike(w))
    return min(1.0, bad / len(chars))


def repetition_ratio(text: str, n: int = 3) -> float:
    words = _WORD.findall(text.lower())
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)] if len(words) >= 2 * n else words
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def degenerate_reason(prompt: str, response: str) -> str:
    if not any(c.isalnum() for c in response):
        return "empty"
    words = _WORD.findall(response)
    stripped = "".join(response.split())
    top_char_share = max(stripped.count(c) for c in set(stripped)) / len(stripped)
    if (len(words) >= 8 and repetition_ratio(response) > 0.5) or (len(stripped) >= 16 and top_char_share > 0.6):
        return "repetitive"
    if prompt and normalize_text(prompt) == normalize_text(response):
        return "copies_prompt"
    return ""


def heuristic_scores(prompt: str, response: str) -> dict[str, Any]:
    return {
        "prompt_chars": len(prompt),
        "response_chars": len(response),
        "garbage_ratio": garbage_ratio(response),
        "repetition_ratio": repetition_ratio(response),
        "degenerate_reason": degenerate_reason(prompt, response),
    }


def answer_correct(response: str | None, reference: Any) -> float | None:
    """1.0 / 0.0: does the response state the reference answer; None without a reference."""
    if reference is None or isinstance(reference, bool):
        return None
    if isinstance(reference, float) and not math.isfinite(reference):
        return None  # a missing cell read back from Parquet/pandas as NaN
    text = str(reference).strip()
    if not text:
        return None
    # A reference written as "The answer is 11" is read like a response.
    return 1.0 if states_answer(response, text) else 0.0


# -- duplicates ------------------------------------------------------------------------------------


def example_text(prompt: str, response: str) -> str:
    return f"{prompt}\n{response}"


def text_hash(text: str) -> str:
    """16 hex digits of BLAKE2b over the normalized text."""
    return hashlib.blake2b(normalize_text(text).encode(), digest_size=8).hexdigest()


def _shingle_hashes(text: str, ngram: int) -> list[int]:
    words = normalize_text(text).split()
    grams = [" ".join(words[i : i + ngram]) for i in range(len(words) - ngram + 1)] or [" ".join(words)]
    return [int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") for g in set(grams)]


def _mix64(z):
    """SplitMix64's finalizer on a uint64 array (wrapping arithmetic): a strong 64-bit mixer."""
    import numpy as np

    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def minhash_signatures(texts: list[str], num_perm: int = 128, ngram: int = 3, seed: int = 0):
    """(len(texts), num_perm) uint64 MinHash signatures of word n-gram shingles.

    The k-th hash function is mix64(shingle_hash XOR key_k) with seeded 64-bit keys, so a
    signature depends only on the text, num_perm, ngram and seed, not on the batch it was
    computed in.
    """
    import numpy as np

    keys = np.random.default_rng(seed).integers(0, np.iinfo(np.uint64).max, size=num_perm, dtype=np.uint64)
    out = np.empty((len(texts), num_perm), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for row, text in enumerate(texts):
            x = np.array(_shingle_hashes(text, ngram), dtype=np.uint64)[:, None]
            out[row] = _mix64(x ^ keys[None, :]).min(axis=0)
    return out


def lsh_bands(num_perm: int, threshold: float) -> tuple[int, int]:
    """(bands, rows per band), bands * rows == num_perm, whose S-curve midpoint (1/b)^(1/r)
    is closest to the threshold (slightly below it: a candidate is still confirmed after)."""
    options = [(b, num_perm // b) for b in range(1, num_perm + 1) if num_perm % b == 0]
    return min(options, key=lambda br: abs((1 / br[0]) ** (1 / br[1]) - (threshold - 0.05)))


@dataclass
class DuplicateInfo:
    dup_hash: str
    dup_cluster: int  # position of the cluster's representative (its first row)
    dup_cluster_size: int
    dup_kind: str  # "none" (a representative or a unique row), "exact" or "near"

    def as_dict(self) -> dict[str, Any]:
        return {
            "dup_hash": self.dup_hash,
            "dup_cluster": self.dup_cluster,
            "dup_cluster_size": self.dup_cluster_size,
            "dup_kind": self.dup_kind,
        }


def duplicate_clusters(
    texts: list[str], threshold: float = 0.7, num_perm: int = 128, ngram: int = 3, seed: int = 0, signatures=None
) -> list[DuplicateInfo]:
    """Exact + MinHash-LSH near-duplicate clusters, one `DuplicateInfo` per text, in order."""
    import numpy as np

    n = len(texts)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)  # the earliest row stays the root

    hashes = [text_hash(t) for t in texts]
    first_with_hash: dict[str, int] = {}
    for i, h in enumerate(hashes):
        union(first_with_hash.setdefault(h, i), i)

    if threshold < 1.0 and n > 1:
        sig = signatures if signatures is not None else minhash_signatures(texts, num_perm, ngram, seed)
        bands, rows = lsh_bands(sig.shape[1], threshold)
        for band in range(bands):
            buckets: dict[bytes, list[int]] = {}
            for i in range(n):
                buckets.setdefault(sig[i, band * rows : (band + 1) * rows].tobytes(), []).append(i)
            for members in buckets.values():
                for pos, j in enumerate(members[1:], start=1):
                    for i in members[:pos]:  # confirm a candidate by its estimated Jaccard
                        if find(i) != find(j) and float(np.mean(sig[i] == sig[j])) >= threshold:
                            union(i, j)
    roots = [find(i) for i in range(n)]
    sizes: dict[int, int] = {}
    for r in roots:
        sizes[r] = sizes.get(r, 0) + 1
    return [
        DuplicateInfo(
            dup_hash=hashes[i],
            dup_cluster=roots[i],
            dup_cluster_size=sizes[roots[i]],
            dup_kind="none" if roots[i] == i else ("exact" if hashes[i] == hashes[roots[i]] else "near"),
        )
        for i in range(n)
    ]
