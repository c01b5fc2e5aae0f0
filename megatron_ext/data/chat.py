"""Chat conversations -> token ids plus a per-token 'train on this' mask (SFT).

The conversation is rendered with the tokenizer's own chat template, one message at a time: the
text a message adds to the rendering is tokenized as one piece, and only what an assistant
message adds after the generation prompt (its content and end-of-turn marker) becomes a target.
The model learns to answer and to stop, never to predict the user's words or the template's
headers.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

from megatron_ext.errors import UserError

ROLES = ("system", "user", "assistant", "tool")


class ChatFormatError(UserError):
    pass


def check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError(f"{where}: 'messages' must be a non-empty list of "
                              "{\"role\": ..., \"content\": ...} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) \
                or message.get("role") not in ROLES:
            raise ChatFormatError(f"{where}: message {i} must be an object with a 'role' in "
                                  f"{ROLES} and a string 'content', got {message!r:.120}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatFormatError(f"{where}: no assistant message, so nothing to train on")


def _plain_render(messages: Sequence[dict], add_generation_prompt: bool) -> str:
    """Fallback for tokenizers without a template (e.g. a bare SentencePiece model)."""
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages)
    return text + ("Assistant: " if add_generation_prompt else "")


def render(tokenizer, messages: Sequence[dict], add_generation_prompt: bool,
           use_template: bool) -> str:
    if not use_template:
        return _plain_render(messages, add_generation_prompt)
    return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def tokenize_conversation(tokenizer, messages: Sequence[dict], use_template: bool = True
                          ) -> Tuple[List[int], List[bool]]:
    """(token ids, is_target per token) for one conversation."""
    ids: List[int] = []
    targets: List[bool] = []
    rendered = ""

    def extend(text: str, target: bool) -> None:
        nonlocal rendered
        if not text.startswith(rendered):
            raise ChatFormatError(
                "the chat template does not render conversations prefix by prefix (an earlier "
                "message changed when a later one was added); use --no-chat-template")
        piece = tokenizer.tokenize(text[len(rendered):]) if len(text) > len(rendered) else []
        ids.extend(piece)
        targets.extend([target] * len(piece))
        rendered = text

    for k, message in enumerate(messages):
        if message["role"] == "assistant" and k > 0:
            # The generation prompt (e.g. "<|im_start|>assistant\n") is context, not a target.
            extend(render(tokenizer, messages[:k], True, use_template), False)
        extend(render(tokenizer, messages[:k + 1], False, use_template),
               message["role"] == "assistant")
    return ids, targets
