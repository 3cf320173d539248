"""Prompt text -> token ids: the chat template, in one place for generate.py, bench.py and users."""

from __future__ import annotations


def encode(tokenizer, prompt: str, chat: bool = True, history: list[dict] | None = None) -> list[int]:
    """Token ids of `prompt` as the next user turn after `history` (the tokenizer's chat template,
    ending with the assistant's turn opener), or of the raw text when chat=False."""
    if chat:
        messages = (history or []) + [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(prompt).input_ids
