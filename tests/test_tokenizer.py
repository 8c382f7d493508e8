import easy_vqa as easy_vqa_package
import pytest

from fednano_jax.data.tokenizer import BOS, EOS, IMAGE, PAD, UNK, build_tokenizer, load_tokenizer, save_tokenizer

PROMPT = "<image>\nwhat color is the shape?"


@pytest.fixture(scope="module")
def questions() -> list[str]:
    return easy_vqa_package.get_test_questions()[0]


@pytest.fixture(scope="module")
def tokenizer(questions):
    return build_tokenizer(questions + easy_vqa_package.get_answers())


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def test_special_tokens_take_the_first_ids(tokenizer):
    assert tokenizer.convert_tokens_to_ids([PAD, UNK, BOS, EOS, IMAGE]) == [0, 1, 2, 3, 4]
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        0, 1, 2, 3)


def test_image_is_one_token_and_punctuation_is_split_from_words(tokenizer):
    tokens = tokenizer.convert_ids_to_tokens(encode(tokenizer, PROMPT))
    assert tokens == [IMAGE, "what", "color", "is", "the", "shape", "?"]


def test_lowercases_and_maps_unknown_words_to_unk(tokenizer):
    assert encode(tokenizer, "What COLOR") == encode(tokenizer, "what color")
    assert encode(tokenizer, "zebra") == [tokenizer.unk_token_id]
    assert tokenizer.unk_token_id not in encode(tokenizer, PROMPT)


def test_every_answer_is_one_ordinary_token(tokenizer):
    for answer in easy_vqa_package.get_answers():
        ids = encode(tokenizer, answer)
        assert len(ids) == 1 and ids[0] > 4, answer


def test_encode_decode_round_trip(tokenizer, questions):
    assert tokenizer.batch_decode([encode(tokenizer, q) for q in questions]) == questions
    prompt_ids = encode(tokenizer, PROMPT)
    assert tokenizer.decode(prompt_ids) == "<image> what color is the shape?"
    assert tokenizer.decode(prompt_ids, skip_special_tokens=True) == "what color is the shape?"


def test_save_and_load_give_identical_ids(tokenizer, questions, tmp_path):
    save_tokenizer(tokenizer, str(tmp_path))
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.convert_tokens_to_ids([PAD, UNK, BOS, EOS, IMAGE]) == [0, 1, 2, 3, 4]
    texts = questions[:200] + [PROMPT, "zebra <s> </s>"]
    assert loaded(texts).input_ids == tokenizer(texts).input_ids
    assert loaded.decode(encode(loaded, PROMPT)) == tokenizer.decode(encode(tokenizer, PROMPT))


def test_load_from_a_directory_without_a_tokenizer_raises(tmp_path):
    with pytest.raises(ValueError, match="nowhere"):
        load_tokenizer(str(tmp_path / "nowhere"))
