"""The Hugging Face model behind LOGO data construction: greedy answers, a correct/incorrect judge.

``CausalLM`` wraps one ``AutoModelForCausalLM`` folder and its tokenizer. A user message is rendered
with the tokenizer's chat template (with the generation prompt) when it has one, else as plain
``User: ...`` / ``Assistant: `` blocks (``megatron_ext.data.chat``).

``generate``: batched greedy decoding (left padding, ``max_new_tokens``, stops at the model's end
of turn / EOS); the answer is the decoded new tokens without special tokens, whitespace-stripped.

``judge``: the judge reads the question, the gold answer and a candidate answer and must answer
"correct" or "incorrect". It is asked as a constrained choice: the verdict is whichever of the two
words has the higher log-probability (summed over its tokens) as the start of the assistant's
reply: one forward pass, no sampling, no unparseable answers.
"""

from __future__ import annotations

import os
from typing import List, Sequence

import torch

from megatron_ext.data.chat import render
from megatron_ext.errors import UserError

GENERATION_PROMPT = "Answer the question according to the context below:\n\n{context}\n\n" \
                    "Question: {question}"
CONTEXT_SEPARATOR = "\n\n"
JUDGE_PROMPT = ("Decide whether the candidate answer to the question is correct, using the "
                "reference answer as the truth.\n\nQuestion: {question}\n\nReference answer: "
                "{reference}\n\nCandidate answer: {candidate}\n\nReply with one word: correct or "
                "incorrect.")
JUDGE_OPTIONS = ("correct", "incorrect")


def generation_prompt(chunks: Sequence[str], question: str) -> str:
    return GENERATION_PROMPT.format(context=CONTEXT_SEPARATOR.join(chunks), question=question)


class CausalLM:
    def __init__(self, model_dir: str, dtype: str = "auto", device: str = "auto",
                 chat_template: bool = True):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from megatron_ext.selection.ladm.loading import resolve_device, resolve_dtype

        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise UserError(f"{model_dir}: no config.json; pass a Hugging Face model folder")
        self.path = model_dir
        self.device = resolve_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=resolve_dtype(dtype, self.device)).to(self.device).eval()
        self.use_template = chat_template and getattr(self.tokenizer, "chat_template", None) \
            is not None
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None \
                else 0
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = eos if eos is not None else self.tokenizer.eos_token_id

    def prompt_ids(self, content: str) -> List[int]:
        """Token ids of a user message rendered as a prompt waiting for the assistant's reply."""
        text = render(self.tokenizer, [{"role": "user", "content": content}], True,
                      self.use_template)
        # A rendered template already holds its BOS; plain text gets the tokenizer's specials.
        return self.tokenizer(text, add_special_tokens=not self.use_template,
                              verbose=False)["input_ids"]

    @torch.no_grad()
    def generate(self, contents: Sequence[str], max_new_tokens: int) -> List[str]:
        """Greedy answers to the user messages, as one left-padded batch."""
        from transformers import GenerationConfig

        if not contents:
            return []
        prompts = [self.prompt_ids(c) for c in contents]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  pad_token_id=self.pad_id, eos_token_id=self.eos_ids)
        out = self.model.generate(input_ids=ids.to(self.device),
                                  attention_mask=mask.to(self.device), generation_config=config)
        return [self.tokenizer.decode(seq[width:], skip_special_tokens=True).strip()
                for seq in out.cpu()]

    @torch.no_grad()
    def option_logprobs(self, contents: Sequence[str], options: Sequence[str],
                        batch_size: int) -> List[List[float]]:
        """log P(option | prompt) summed over the option's tokens, per content and option."""
        option_ids = [self.tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
        jobs = [(self.prompt_ids(c), o) for c in contents for o in option_ids]
        scores: List[float] = []
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            width = max(len(p) + len(o) for p, o in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (prompt, option) in enumerate(batch):
                ids[row, :len(prompt) + len(option)] = torch.tensor(prompt + option)
                mask[row, :len(prompt) + len(option)] = 1
            logits = self.model(input_ids=ids.to(self.device),
                                attention_mask=mask.to(self.device)).logits.float().cpu()
            logp = torch.log_softmax(logits, dim=-1)
            for row, (prompt, option) in enumerate(batch):
                positions = torch.arange(len(prompt) - 1, len(prompt) + len(option) - 1)
                scores.append(float(logp[row, positions, torch.tensor(option)].sum()))
        n = len(options)
        return [scores[i:i + n] for i in range(0, len(scores), n)]

    def judge(self, items: Sequence[tuple], batch_size: int) -> List[bool]:
        """(question, reference answer, candidate) -> True when judged correct."""
        contents = [JUDGE_PROMPT.format(question=q, reference=r, candidate=c) for q, r, c in items]
        return [lp[0] > lp[1] for lp in self.option_logprobs(contents, JUDGE_OPTIONS,
                                                             batch_size)]
