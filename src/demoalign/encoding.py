"""Token ids, response-only labels, truncation and padding.

A sequence is prompt ids followed by response ids (the response's EOS included). The prompt is
cut from the LEFT to `max_prompt_length` (its end, next to the response, matters most); the
response is then cut from the right to fit `max_length`. Cuts are counted, never silent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .logprobs import IGNORE_INDEX
from .templates import render_prompt, response_text


@dataclass
class TruncationCounts:
    prompts_cut: int = 0
    responses_cut: int = 0
    total: int = 0

    def as_dict(self, prefix: str = "") -> dict:
        return {
            f"{prefix}prompts_truncated": self.prompts_cut,
            f"{prefix}responses_truncated": self.responses_cut,
            f"{prefix}sequences": self.total,
        }


@dataclass
class Tokenized:
    prompt_ids: list[int]
    response_ids: list[int]


@dataclass
class Encoder:
    """Encodes examples with one template and one set of length limits."""

    tokenizer: object
    template: str
    max_length: int
    max_prompt_length: int
    counts: TruncationCounts = field(default_factory=TruncationCounts)

    def prompt_ids(self, example) -> list[int]:
        text = render_prompt(example, self.tokenizer, self.template)
        # A chat template writes its own special tokens; named templates let the tokenizer add
        # its usual ones (none for GPT-2/NeoX).
        add_special = self.template != "chat"
        ids = self.tokenizer(text, add_special_tokens=add_special)["input_ids"]
        if len(ids) > self.max_prompt_length:
            # Cut from the left, but keep a leading BOS: Llama-style models lean on it.
            bos = self.tokenizer.bos_token_id
            head = ids[:1] if bos is not None and ids[0] == bos else []
            ids = head + ids[len(head) :][-(self.max_prompt_length - len(head)) :]
            self.counts.prompts_cut += 1
        return ids

    def response_ids(self, response: str) -> list[int]:
        ids = self.tokenizer(response_text(response, self.template), add_special_tokens=False)[
            "input_ids"
        ]
        return ids + [self.tokenizer.eos_token_id]

    def fit(self, prompt_ids: list[int], response_ids: list[int]) -> Tokenized:
        room = self.max_length - len(prompt_ids)
        if room < 1:
            raise ValueError(
                f"max_length={self.max_length} leaves no room for a response after a prompt of "
                f"{len(prompt_ids)} tokens; raise max_length or lower max_prompt_length"
            )
        self.counts.total += 1
        if len(response_ids) > room:
            response_ids = response_ids[:room]
            self.counts.responses_cut += 1
        return Tokenized(prompt_ids, response_ids)

    def encode(self, example) -> Tokenized:
        return self.fit(self.prompt_ids(example), self.response_ids(example.response))


def collate(items: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are -100 on prompt and padding positions."""
    width = max(len(t.prompt_ids) + len(t.response_ids) for t in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for row, t in enumerate(items):
        seq = t.prompt_ids + t.response_ids
        input_ids[row, : len(seq)] = torch.tensor(seq)
        attention[row, : len(seq)] = 1
        labels[row, len(t.prompt_ids) : len(seq)] = torch.tensor(t.response_ids)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
