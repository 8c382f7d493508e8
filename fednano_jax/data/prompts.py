"""Prompt templates and tokenization into fixed-shape arrays.

Training rows are right-padded `<s>USER: <image>\\n{question} ASSISTANT: {answer}</s>`
(LLaVA-1.5), or `<s>###Human: <Img><image></Img> {question} ###Assistant: {answer}###` (MiniGPT-4,
whose answers end with its end symbol `###` rather than `</s>`), with the loss on the answer
tokens and their end only. Evaluation rows are the prompt up
to `ASSISTANT:`, left-padded so every row's last token sits in the same column and
greedy decoding writes all rows at one cache slot. The single `<image>` placeholder
is expanded to one id per image token, as LLaVA's processor does.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fednano_jax.data.tokenizer import IMAGE
from fednano_jax.settings import DEFAULT_TEMPLATE


@dataclasses.dataclass(frozen=True)
class Template:
    prompt: str  # with {image} and {question}
    image: str  # what {image} becomes in a row with an image (nothing in a text-only row)
    end: str | None = None  # the text an answer ends with; None: the tokenizer's </s>
    pad_to_square: bool = True  # image preparation: LLaVA-1.5 pads to a square, MiniGPT-4 only resizes


# MiniGPT-4 splits its prompt at `<ImageHere>` and puts the 32 query embeddings there; the placeholder is
# spelled `<image>` here for every template (the LLM sees neither: image embeddings replace it).
TEMPLATES = {"llava": Template("USER: {image}{question} ASSISTANT:", f"{IMAGE}\n"),
             "minigpt4": Template("###Human: {image}{question} ###Assistant:", f"<Img>{IMAGE}</Img> ", end="###",
                                  pad_to_square=False)}


def template_of(config) -> str:
    """config.model.prompt: the chat template a backbone was tuned with (LLaVA-1.5's unless named)."""
    name = config.model.template
    if name not in TEMPLATES:
        raise ValueError(f"model.prompt must be one of {sorted(TEMPLATES)}, got {name!r}.")
    return name


def render_prompt(question: str, has_image: bool, template: str = DEFAULT_TEMPLATE) -> str:
    t = TEMPLATES[template]
    return t.prompt.format(image=t.image if has_image else "", question=question)


def cut_at_end(text: str, template: str) -> str:
    """A decoded answer up to the template's end symbol (the text after it is the model's next turn)."""
    end = TEMPLATES[template].end
    return text.split(end)[0] if end else text


@dataclasses.dataclass(frozen=True)
class TokenizedSet:
    """Rows of token ids that point into a shared image table (images are not copied per row)."""

    input_ids: np.ndarray  # [N, T] int32
    attention_mask: np.ndarray  # [N, T] bool
    loss_mask: np.ndarray  # [N, T] bool, True on answer tokens and </s>
    image_index: np.ndarray  # [N] int32 row of the image table

    def __len__(self) -> int:
        return len(self.input_ids)


def _expand_image(ids: list[int], image_id: int, num_image_tokens: int) -> list[int]:
    out: list[int] = []
    for token in ids:
        out.extend([image_id] * num_image_tokens if token == image_id else [token])
    return out


def _encode(tokenizer, text: str, num_image_tokens: int) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return _expand_image(ids, tokenizer.convert_tokens_to_ids(IMAGE), num_image_tokens)


def bucket(length: int, multiple: int = 8) -> int:
    return -(-length // multiple) * multiple


def _answer_ids(tokenizer, answer: str, template: str) -> list[int]:
    end = TEMPLATES[template].end
    if end:  # MiniGPT-4: `answer + end_sym`, tokenized without special tokens
        return tokenizer(" " + answer + end, add_special_tokens=False).input_ids
    return tokenizer(" " + answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def tokenize_for_training(tokenizer, prompts: list[str], answers: list[str], image_index: np.ndarray,
                          num_image_tokens: int, template: str = DEFAULT_TEMPLATE) -> TokenizedSet:
    bos = tokenizer.bos_token_id
    rows, masks = [], []
    for prompt, answer in zip(prompts, answers):
        prompt_ids = [bos] + _encode(tokenizer, prompt, num_image_tokens)
        answer_ids = _answer_ids(tokenizer, answer, template)
        rows.append(prompt_ids + answer_ids)
        masks.append([False] * len(prompt_ids) + [True] * len(answer_ids))
    length = bucket(max(map(len, rows)))
    input_ids = np.full((len(rows), length), tokenizer.pad_token_id, np.int32)
    loss_mask = np.zeros((len(rows), length), bool)
    attention_mask = np.zeros((len(rows), length), bool)
    for i, (row, mask) in enumerate(zip(rows, masks)):
        input_ids[i, : len(row)] = row
        loss_mask[i, : len(row)] = mask
        attention_mask[i, : len(row)] = True
    return TokenizedSet(input_ids, attention_mask, loss_mask, np.asarray(image_index, np.int32))


def tokenize_prompts(tokenizer, prompts: list[str], image_index: np.ndarray, num_image_tokens: int) -> TokenizedSet:
    """Left-padded prompts for generation (loss_mask is all False)."""
    rows = [[tokenizer.bos_token_id] + _encode(tokenizer, p, num_image_tokens) for p in prompts]
    length = bucket(max(map(len, rows)))
    input_ids = np.full((len(rows), length), tokenizer.pad_token_id, np.int32)
    attention_mask = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row):] = row
        attention_mask[i, length - len(row):] = True
    return TokenizedSet(input_ids, attention_mask, np.zeros_like(attention_mask), np.asarray(image_index, np.int32))


# ------------------------------------------------- ScienceQA / IconQA question texts
# LLaVA-1.5's ScienceQA prompt (the ScienceQA authors' "CQM-A" input: Context, Question, Multiple options,
# then LLaVA-1.5's instruction to answer with the letter); IconQA's multiple choice uses the same lines
# without a context, fill-in-the-blank LLaVA-1.5's short-answer instruction.
OPTION_LETTERS = "ABCDEFGHIJ"
LETTER_INSTRUCTION = "Answer with the option's letter from the given choices directly."
SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."


def options_line(choices) -> str:
    if len(choices) > len(OPTION_LETTERS):
        raise ValueError(f"Expected at most {len(OPTION_LETTERS)} choices, got {len(choices)}.")
    return "Options: " + " ".join(f"({OPTION_LETTERS[i]}) {choice}" for i, choice in enumerate(choices))


def multiple_choice_question(question: str, choices, context: str | None = None) -> str:
    """'Context: ...\\nQuestion: ...\\nOptions: (A) ... (B) ...\\nAnswer with the option's letter ...'."""
    lines = [f"Context: {context}"] if context is not None else []
    return "\n".join(lines + [f"Question: {question}", options_line(choices), LETTER_INSTRUCTION])


def short_answer_question(question: str) -> str:
    return f"Question: {question}\n{SHORT_ANSWER_INSTRUCTION}"
