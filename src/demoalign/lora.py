"""LoRA adapters (peft) for a policy: only the adapters train."""

from __future__ import annotations

from peft import LoraConfig, get_peft_model


def add_lora(model, config):
    """The policy with LoRA adapters (peft); only the adapters train."""
    targets = config.lora_target_modules
    targets = (
        targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    )
    return get_peft_model(
        model,
        LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=0.0,
            target_modules=targets,
            task_type="CAUSAL_LM",
        ),
    )
