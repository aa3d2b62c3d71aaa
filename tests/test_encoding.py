"""Encoding: prompt cut from the left keeping BOS, response cut to fit, labels on the response."""

from conftest import CharTokenizer
from demoalign.data import Example
from demoalign.encoding import Encoder, Tokenized, collate
from demoalign.logprobs import IGNORE_INDEX


def test_prompt_cut_from_the_left_keeping_bos_and_response_cut_to_fit():
    enc = Encoder(CharTokenizer(), "plain", max_length=10, max_prompt_length=4)
    t = enc.encode(Example("abcdef", "xyz"))
    # plain renders "abcdef\n": BOS + 7 chars, cut from the left to BOS + last 3 ("ef\n").
    assert t.prompt_ids == [1, ord("e"), ord("f"), ord("\n")]
    assert t.response_ids == [ord("x"), ord("y"), ord("z"), 2], "the response keeps its EOS"
    long = enc.encode(Example("ab", "0123456789"))
    assert len(long.prompt_ids) + len(long.response_ids) == 10
    assert long.response_ids == [ord(c) for c in "012345"], "cut from the right to fit max_length"
    assert enc.counts.as_dict() == {
        "prompts_truncated": 1,
        "responses_truncated": 1,
        "sequences": 2,
    }


def test_collate_labels_only_the_response():
    batch = collate([Tokenized([5, 6], [7, 2]), Tokenized([5], [2])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2], [5, 2, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, IGNORE_INDEX, 7, 2],
        [IGNORE_INDEX, 2, IGNORE_INDEX, IGNORE_INDEX],
    ]
