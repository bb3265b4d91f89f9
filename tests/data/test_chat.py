"""Chat data for --task causal-lm: the embedded ChatterBot corpus read from its YAML, the
held-out split, and the cut of a chat to --max-length (hand-worked values)."""

from __future__ import annotations

import math

import pytest

from fedpeft.data.chat import fit, load_chat_splits
from fedpeft.data.embedded import chatterbot


def test_chatterbot_pairs_come_from_alternating_turns_with_the_topic_as_label():
    ds = chatterbot()
    names = ds.features["label"].names
    assert len(names) == 21 and names[0] == "ai" and "tech_support" in names
    rows = list(zip(ds["prompt"], ds["response"], (names[i] for i in ds["label"])))
    # ai.yml's first conversation, as written in the wheel
    assert rows[0] == ("What is AI?", "Artificial Intelligence is the branch of engineering and science devoted to "
                       "constructing machines that think.", "ai")
    # conversations.yml's first conversation has 5 turns: pairs (0, 1) and (2, 3); turn 4 has no answer
    start = [p for p, _, t in rows if t == "conversations"]
    assert start[:3] == ["Good morning, how are you?", "I'm also good.", "Hello"]
    assert "Yes it is." not in [p for p, _, t in rows if t == "conversations"][:2]
    assert len(ds) == 2172  # 2,026 conversations; 2,172 user->bot exchanges


def test_the_held_out_split_is_fixed_and_keeps_every_topic():
    splits = load_chat_splits("chatterbot", 0.1, 2000)
    assert len(splits.test) == math.ceil(0.1 * 2172) and len(splits.train) + len(splits.test) == 2172
    # stratified by topic: every topic with 20+ rows holds out 10% of them (within rounding)
    for topic in range(21):
        total = list(splits.train["label"]).count(topic) + list(splits.test["label"]).count(topic)
        if total >= 20:
            assert abs(list(splits.test["label"]).count(topic) - 0.1 * total) <= 1, topic
    again = load_chat_splits.__wrapped__("chatterbot", 0.1, 2000)
    assert list(again.test["prompt"]) == list(splits.test["prompt"])


@pytest.mark.parametrize("prompt, answer, limit, expected", [
    (3, 2, 8, (3, 2)),          # fits: unchanged
    (6, 5, 8, (4, 4)),          # answer: max(8 - 6, min(5, 8 // 2)) = 4 tokens; prompt: its last 4
    (10, 1, 8, (7, 1)),         # a long prompt loses its start; the one answer token stays
    (2, 20, 8, (2, 6)),         # a long answer loses its end
])
def test_a_chat_is_cut_to_max_length_keeping_answer_tokens(prompt, answer, limit, expected):
    p, a = list(range(prompt)), list(range(100, 100 + answer))
    got_p, got_a = fit(p, a, limit)
    assert (len(got_p), len(got_a)) == expected
    assert got_p == p[len(p) - len(got_p):] and got_a == a[: len(got_a)]
    assert len(got_p) + len(got_a) <= limit
