"""The one pair type: text preference pairs encoded as the training code encodes them, and the
[chosen; rejected] layout every scorer relies on."""

from __future__ import annotations

from demoalign.data import Example, Preference
from demoalign.encoding import Encoder
from demoalign.pairs import Pair, collate_pairs, encode_preference, fit_pair, pair_rows


def _encoder(tokenizer, max_length=16, max_prompt_length=8) -> Encoder:
    return Encoder(tokenizer, "plain", max_length, max_prompt_length)


def test_fit_pair_cuts_each_response_to_its_room_and_says_which_was_cut(tokenizer):
    prompt = list(range(10, 16))  # 6 tokens: room for 4 of a response under max_length 10
    pair = fit_pair(_encoder(tokenizer, 10), prompt, [1, 2, 3], [4, 5, 6, 7, 8, 9], index=3)
    assert pair == Pair(prompt, [1, 2, 3], [4, 5, 6, 7], index=3, rejected_truncated=True)


def test_encode_preference_uses_the_training_encoding_with_and_without_fit(tokenizer):
    history = (("user", "hi"), ("assistant", "hello"))
    preference = Preference(Example("Sort: c a b", "a b c " * 8, history), "c b a")
    encoder = _encoder(tokenizer)
    prompt_ids = encoder.prompt_ids(preference.example)
    whole = encode_preference(encoder, preference, fit=False, weight=2.0, kind="preference")
    assert whole.prompt_ids == prompt_ids
    assert whole.chosen_ids == encoder.response_ids(preference.example.response)
    assert whole.rejected_ids == encoder.response_ids("c b a")
    assert (whole.weight, whole.kind, whole.chosen_truncated) == (2.0, "preference", False)

    fitted = encode_preference(encoder, preference, fit=True)
    trained = encoder.encode(preference.example)  # how SFT and IRFT cut a demonstration
    assert fitted.chosen_ids == trained.response_ids != whole.chosen_ids
    assert fitted.chosen_truncated and not fitted.rejected_truncated
    assert fitted.rejected_ids == whole.rejected_ids


def test_pair_rows_put_every_chosen_response_before_every_rejected_one(tokenizer):
    pairs = [Pair([7], [1, 2], [3]), Pair([8, 9], [4], [5, 6, 0])]
    rows = [r.prompt_ids + r.response_ids for r in pair_rows(pairs)]
    assert rows == [[7, 1, 2], [8, 9, 4], [7, 3], [8, 9, 5, 6, 0]]
    batch = collate_pairs(pairs, pad_id=99)
    assert batch["input_ids"].shape == (4, 5)
    assert batch["labels"][3].tolist() == [-100, -100, 5, 6, 0]  # a sampled 0 is a label, not pad
