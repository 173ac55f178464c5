"""Model-free signals: text heuristics on hand cases, exact + MinHash near-duplicate clusters."""

from __future__ import annotations

import random

import numpy as np
from frugalray.data.signals import (
    _shingle_hashes,
    degenerate_reason,
    duplicate_clusters,
    garbage_ratio,
    heuristic_scores,
    lsh_bands,
    minhash_signatures,
    normalize_text,
    repetition_ratio,
)


def test_heuristics_on_hand_cases():
    assert garbage_ratio("The answer is 42.") == 0.0
    assert garbage_ratio("Yes, (roughly) 3/4 of it - about 75%!") == 0.0
    assert garbage_ratio("#~&#~&") == 1.0
    assert garbage_ratio("qXzKpLmN") == 1.0  # case flips inside a word
    assert garbage_ratio("ok #~") == 0.5  # 2 of 4 non-space characters
    assert garbage_ratio("   ") == 1.0
    assert repetition_ratio("one two three four five six seven eight") == 0.0
    assert repetition_ratio("la la la la la la la la la la") > 0.8
    assert degenerate_reason("Q?", "...!!") == "empty"
    assert degenerate_reason("Q?", "buy now buy now buy now buy now buy now") == "repetitive"
    assert degenerate_reason("Q?", "aaaaaaaaaaaaaaaaaaaa") == "repetitive"
    assert degenerate_reason("Name a color.", "name a COLOR") == "copies_prompt"
    assert degenerate_reason("Name a color.", "Blue.") == ""
    scores = heuristic_scores("Name a color.", "Blue.")
    assert scores == {"prompt_chars": 13, "response_chars": 5, "garbage_ratio": 0.0, "repetition_ratio": 0.0,
                      "degenerate_reason": ""}


def test_normalization_keeps_operators_and_drops_spacing_case_punctuation():
    assert normalize_text("What is  8 + 3?") == normalize_text("what is 8 + 3") == "what is 8 + 3"
    assert normalize_text("What is 8 + 3?") != normalize_text("What is 8 - 3?")
    assert normalize_text("What is 8 * 3?") != normalize_text("What is 8 + 3?")


def _jaccard(a: str, b: str, n: int = 3) -> float:
    sa, sb = set(_shingle_hashes(a, n)), set(_shingle_hashes(b, n))
    return len(sa & sb) / len(sa | sb)


def test_minhash_estimates_jaccard_and_is_batch_independent():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(300)]
    base = [rng.choice(vocab) for _ in range(200)]
    texts = [" ".join(base)]
    for k in (10, 40, 100):  # replace k words: a range of similarities
        edited = list(base)
        for pos in rng.sample(range(len(base)), k):
            edited[pos] = rng.choice(vocab)
        texts.append(" ".join(edited))
    sig = minhash_signatures(texts, num_perm=256, seed=3)
    for j in range(1, len(texts)):
        estimate = float(np.mean(sig[0] == sig[j]))
        assert abs(estimate - _jaccard(texts[0], texts[j])) < 0.1
    # A signature depends on the text only, not on the rest of its batch.
    assert (minhash_signatures(texts[2:3], num_perm=256, seed=3)[0] == sig[2]).all()
    assert not (minhash_signatures(texts[:1], num_perm=256, seed=4)[0] == sig[0]).all()
    bands, rows = lsh_bands(128, 0.7)
    assert bands * rows == 128


def test_duplicate_clusters_on_hand_made_near_duplicates():
    story = ("The quick brown fox jumps over the lazy dog while the farmer watches from the porch and "
             "drinks his coffee slowly in the morning sun before the long day of work in the fields begins.")
    texts = [
        story,                                                   # 0: representative
        "Something entirely different about planets, orbits and the physics of gravity in space today.",
        story.upper().replace(" ", "  "),                        # 2: exact after normalization
        story.replace("coffee", "tea"),                          # 3: near (one word)
        story.replace("fields", "meadows") + " Indeed.",          # 4: near (one word, one added)
        story.replace("morning sun", "evening light").replace("quick", "fast").replace("porch", "barn"),  # 5
        "What is 8 + 3? Reply with only the number.\n11",       # 6
        "What is 8 - 3? Reply with only the number.\n5",        # 7: same template, different question
    ]
    info = duplicate_clusters(texts, threshold=0.7, num_perm=128, seed=0)
    # 5 shares about 60% of its shingles with the story: below the threshold, its own cluster.
    assert [i.dup_cluster for i in info] == [0, 1, 0, 0, 0, 5, 6, 7]
    assert [i.dup_kind for i in info] == ["none", "none", "exact", "near", "near", "none", "none", "none"]
    assert info[0].dup_cluster_size == 4 and info[1].dup_cluster_size == 1
    assert info[0].dup_hash == info[2].dup_hash != info[3].dup_hash
    # threshold 1: exact (normalized) duplicates only.
    exact_only = duplicate_clusters(texts, threshold=1.0)
    assert [i.dup_cluster for i in exact_only] == [0, 1, 0, 3, 4, 5, 6, 7]
    assert _jaccard(texts[0], texts[5]) < 0.65
    assert _jaccard(texts[0], texts[4]) > 0.75
