"""Scoring generations with an EXTERNAL reward model given by path, in its own text format.
(A reward model trained by `demoalign rft` reads training token ids: methods.reward_model.)"""

from __future__ import annotations

import torch


def reward_text(template: str, prompt: str, response: str) -> str:
    """`template` with {prompt} and {response} filled in (braces inside the texts are left
    alone)."""
    before, after = template.split("{response}")
    return before.replace("{prompt}", prompt) + response + after.replace("{prompt}", prompt)


@torch.no_grad()
def reward_scores(
    model, tokenizer, texts: list[str], batch_size: int = 16, max_length: int = 1024
) -> list[float]:
    """One score per text, from an EXTERNAL reward model given by path (its own text format via
    `reward_template`). Rows are right-padded and transformers pools at each row's last non-pad
    token, so a text that itself ends in the pad id (pad = EOS tokenizers) is pooled one token
    earlier. A reward model trained by `demoalign rft` is scored on training token ids by
    `rft.RewardScorer` instead; this function is not meant for it."""
    device = next(model.parameters()).device
    ids = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    pad = tokenizer.pad_token_id
    out: list[float] = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        width = max(len(r) for r in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, row in enumerate(chunk):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention[i, : len(row)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
        out += logits[:, 0].float().tolist()
    return out
