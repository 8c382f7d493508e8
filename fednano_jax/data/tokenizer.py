"""A word-level tokenizer trained on the task's own texts (no hub download).

Special tokens take ids 0..4 in SPECIAL_TOKENS order; <image> is a single token marking where
the image features are spliced into the sequence.
"""

import os
from collections.abc import Iterable

import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

PAD = "<pad>"
UNK = "<unk>"
BOS = "<s>"
EOS = "</s>"
IMAGE = "<image>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, IMAGE)


def _train_word_level(texts: Iterable[str], lowercase: bool) -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    if lowercase:
        tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainer=trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS)))
    return tokenizer


def build_tokenizer(texts: Iterable[str], lowercase: bool = True) -> transformers.PreTrainedTokenizerFast:
    """Words (lowercased unless told not to: option letters must keep their case) and punctuation marks as
    tokens; encoding adds no BOS/EOS (callers do)."""
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=_train_word_level(texts, lowercase),
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=[IMAGE],
        clean_up_tokenization_spaces=True,  # decode joins "shape ?" back into "shape?"
    )


def add_image_token(tokenizer) -> int:
    """The id of `<image>`, added as a special token if the tokenizer lacks it (a checkpoint's LLM tokenizer)."""
    if IMAGE not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE]})
    return tokenizer.convert_tokens_to_ids(IMAGE)


def save_tokenizer(tokenizer: transformers.PreTrainedTokenizerFast, directory: str) -> None:
    tokenizer.save_pretrained(directory)


def load_tokenizer(directory: str) -> transformers.PreTrainedTokenizerFast:
    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        raise ValueError(f"Expected a tokenizer saved by save_tokenizer in {directory!r}, found none.")
    return transformers.PreTrainedTokenizerFast.from_pretrained(directory, local_files_only=True)
