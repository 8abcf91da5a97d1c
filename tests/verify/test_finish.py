"""Stop handling as it streams (``verify.finish.StopChecker``): partial matches held back, the
earliest completed stop string cuts, and the streamed text equals the whole-text rule.
"""

from __future__ import annotations

import random

from verify.finish import StopChecker


def test_stop_checker_holds_back_partial_matches():
    sc = StopChecker(stop=["STOP", "\n\n"])
    assert sc.feed_text("Hello ST") == ("Hello ", False)
    assert sc.feed_text("ART") == ("START", False)
    assert sc.feed_text(" end\n") == (" end", False)
    assert sc.feed_text("\nafter") == ("", True)
    assert sc.feed_text("more") == ("", True)
    assert sc.flush() == ""
    sc2 = StopChecker(stop=["xyz"])
    assert sc2.feed_text("abcx") == ("abc", False)
    assert sc2.flush() == "x"


def test_stop_string_split_over_chunks_and_overlapping_prefixes():
    sc = StopChecker(stop=["aab"])
    assert [sc.feed_text(c) for c in "aaab"] == [("", False), ("", False), ("a", False), ("", True)]
    sc = StopChecker(stop=["abc"])
    assert sc.feed_text("xxab") == ("xx", False)
    assert sc.feed_text("cyy") == ("", True)
    # The earliest completed stop string cuts, whichever is listed first.
    sc = StopChecker(stop=["world", "lo"])
    assert sc.feed_text("hello world") == ("hel", True)
    # No stop strings: everything passes straight through.
    sc = StopChecker()
    assert sc.feed_text("abc") == ("abc", False) and sc.flush() == ""


def test_stop_checker_against_a_whole_text_reference():
    rng = random.Random(0)
    stops = ["aba", "\n\n", "bb"]
    for _ in range(300):
        text = "".join(rng.choice("ab\nc") for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        chunks = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        sc = StopChecker(stop=stops)
        out, hit = "", False
        for chunk in chunks:
            emitted, hit = sc.feed_text(chunk)
            out += emitted
            if hit:
                break
        out += sc.flush()
        positions = [text.find(s) for s in stops if s in text]
        assert hit == bool(positions)
        assert out == (text[: min(positions)] if positions else text)


def test_stop_tokens():
    sc = StopChecker(stop_token_ids=[7, 9])
    assert sc.check_token(7) and sc.check_token(9)
    assert not sc.check_token(8)
    assert not StopChecker().check_token(0)
