"""The parameter and traffic accounting (paper Table 1), checked against transformers' own module sizes."""

import json
import os
import subprocess
import sys

import pytest
from ml_collections import ConfigDict

from fednano_jax.backbone import presets as model_presets
from fednano_jax.commands.accounting import parameter_counts, report, shapes_from_config
from fednano_jax.config import read
from fednano_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def experiment(model: ConfigDict, train_examples=2000):
    config = ConfigDict()
    config.name = "accounting"
    config.model = model
    config.data = ConfigDict(dict(train_examples=train_examples))
    config.fed = ConfigDict(dict(num_clients=5, batch_size=8, local_epochs=1))
    return read(config, run=False)


def hf_llava_counts(hf_config) -> dict:
    """transformers' LLaVA on the meta device (no memory): parameters per FedNano component."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        model = transformers.LlavaForConditionalGeneration(hf_config)
    size = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    vision = model.model.vision_tower
    embed = model.model.language_model.embed_tokens
    # LLaVA reads hidden_states[-2]: the tower's post_layernorm (and with it the last layer's output) is unused.
    unused = size(vision.post_layernorm)
    return {"Vision tower": size(vision) - unused, "Connector": size(model.model.multi_modal_projector),
            "Token embeddings": size(embed), "LLM": size(model) - size(vision) - size(model.model.multi_modal_projector)
            - size(embed)}


def llava15_7b_hf_config():
    transformers = pytest.importorskip("transformers")
    vision = transformers.CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                                           num_hidden_layers=24, num_attention_heads=16, projection_dim=768)
    text = transformers.LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)
    return transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000,
                                    vision_feature_layer=-2)


def test_llava15_7b_adapters_are_the_papers_1_05m_and_components_match_transformers():
    model = model_presets.llava15_7b(rank=64)
    model.path = "/nonexistent/llava-1.5-7b-hf"  # a paper config before the download: the preset shapes suffice
    counts = parameter_counts(shapes_from_config(experiment(model)))
    assert counts["NanoAdapter A_I (image tokens)"] + counts["NanoAdapter A_T (text tokens)"] == 1_048_576
    hf = hf_llava_counts(llava15_7b_hf_config())
    assert counts["Vision tower"] == hf["Vision tower"]
    assert counts["Connector"] == hf["Connector"]
    assert counts["Token embeddings"] == hf["Token embeddings"]
    assert counts["LLM (decoder, final norm, LM head)"] == hf["LLM"]


def test_minigpt4_7b_client_side_matches_transformers_blip2_modules():
    """EVA ViT-g = HF Blip2VisionModel less its zero k bias (post_layernorm is ln_vision); our Q-Former = HF Blip2QFormerModel less
    the text FFNs MiniGPT-4 removes, plus the 32 query tokens; llama_proj 768 -> 4096; Vicuna-7B's 6,738M."""
    import re

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    counts = parameter_counts(shapes_from_config(experiment(model_presets.minigpt4_7b(rank=64))))
    with torch.device("meta"):  # shapes only: no 1B-parameter allocation
        vision = transformers.Blip2VisionModel(transformers.Blip2VisionConfig(
            hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16, image_size=224,
            patch_size=14))
        qformer = transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig(encoder_hidden_size=1408))
    text_ffn = re.compile(r"encoder\.layer\.\d+\.(intermediate|output)\.")
    k_bias = 39 * 1408  # HF's qkv bias is cat(q, zeros, v): EVA has no k bias
    assert counts["EVA ViT (with ln_vision)"] == sum(p.numel() for p in vision.parameters()) - k_bias == 985_897_344
    assert counts["Q-Former (with its query tokens)"] == 32 * 768 + sum(
        p.numel() for name, p in qformer.named_parameters() if not text_ffn.search(name))
    assert counts["Connector"] == 768 * 4096 + 4096
    assert counts["Token embeddings"] + counts["LLM (decoder, final norm, LM head)"] == 6_738_415_616
    assert counts["NanoAdapter A_I (image tokens)"] + counts["NanoAdapter A_T (text tokens)"] == 1_048_576


def test_a_checkpoint_is_accounted_from_its_metadata(tmp_path):
    from test_pretrained import llava_hf_config, save_llava

    save_llava(tmp_path)
    model = ConfigDict(dict(path=str(tmp_path), dtype="float32", connector="mlp2x_gelu",
                            adapter=dict(rank=4, alpha=8.0, image=True, text=True)))
    counts = parameter_counts(shapes_from_config(experiment(model)))
    hf = hf_llava_counts(llava_hf_config())
    assert counts["Vision tower"] == hf["Vision tower"] and counts["Connector"] == hf["Connector"]
    assert counts["LLM (decoder, final norm, LM head)"] == hf["LLM"]
    assert counts["NanoAdapter A_T (text tokens)"] == 2 * 64 * 4


def test_traffic_counts_adapters_fisher_and_split_learning_activations():
    figures = report(experiment(model_presets.llava15_7b(rank=64), train_examples=100), text_tokens=64)
    traffic, rows = figures["traffic"], figures["per_client_per_round"]
    assert traffic["sequence_length"] == 576 + 64 and traffic["local_steps"] == 3  # 20 examples, batch 8
    adapter_bytes = 4 * 1_048_576
    assert rows["FedAvg"]["upload_bytes"] == adapter_bytes == rows["FedAvg"]["download_bytes"]
    assert rows["FedNano"]["upload_bytes"] == 2 * adapter_bytes  # adapters plus their diagonal Fisher
    assert rows["LocFT"]["upload_bytes"] == 0 and "Centralized" not in rows
    step = 8 * 640 * 4096 * 2  # batch x tokens x hidden x bf16 bytes
    assert rows["FedAvg"]["embeddings_up_bytes"] == 3 * step == rows["FedAvg"]["gradients_down_bytes"]
    assert rows["FedNano"]["embeddings_up_bytes"] == 3 * step + 20 * 640 * 4096 * 2  # plus the Fisher pass
    assert rows["FedNano-EF"]["embeddings_up_bytes"] == 3 * step


def test_a_vocabulary_its_data_decides_comes_from_the_stored_backbone_or_is_asked_for():
    from fednano_jax.backbone import pretrain
    from fednano_jax.config import load_config_file
    from fednano_jax.data.tokenizer import load_tokenizer
    from fednano_jax.errors import DataError

    config = read(load_config_file(os.path.join(REPO, "configs", "easyvqa_tiny.py")), run=False)
    shipped = load_tokenizer(os.path.join(pretrain.shipped_dir(config), "tokenizer"))
    assert shapes_from_config(config).llm.vocab_size == len(shipped)
    no_data = read(load_config_file(os.path.join(REPO, "configs", "scienceqa_tiny.py")), run=False)  # data.root unset, nothing stored
    with pytest.raises((ConfigError, DataError), match="--vocab_size"):
        shapes_from_config(no_data)
    assert shapes_from_config(no_data, vocab_size=77).llm.vocab_size == 77


def test_table_1_of_a_paper_config_needs_no_flag_and_counts_the_official_train_split():
    from fednano_jax.config import load_config_file

    figures = report(read(load_config_file(os.path.join(REPO, "configs", "scienceqa_llava15_7b.py")), run=False))
    assert figures["adapters"] == 1_048_576  # 2 adapters x 2 matrices x 4096 x rank 64
    assert figures["traffic"]["examples_per_client"] == 12_726 // 5
    assert "official train split (12,726" in figures["examples_per_client_source"]


def test_command_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "accounting.json"
    result = subprocess.run([sys.executable, "-m", "fednano_jax.accounting", "--config=configs/easyvqa_tiny.py",
                             "--vocab_size=64", f"--out={out}", "--config.model.client_layers=1"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Trained and uploaded (NanoAdapters)" in result.stdout and "| FedNano |" in result.stdout
    assert "| Client | NanoEdge + decoder layers 1..1 |" in result.stdout
    figures = json.loads(out.read_text())
    assert figures["adapters"] == 2 * 2 * 128 * 16  # two adapters, d=128, rank 16
    assert figures["client_share"]["client_decoder_flops"] == figures["client_share"]["server_decoder_flops"]  # 1 of 2


def test_the_clients_share_moves_k_decoder_layers_weights_and_flops_to_the_client():
    def share_at(layers):
        model = model_presets.llava15_7b(rank=64)
        model.client_layers = layers
        return report(experiment(model, train_examples=100), text_tokens=128)

    plain, two = share_at(0), share_at(2)
    layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096  # q, k, v, o; gate, up, down; the two norms
    assert plain["parameters"]["LLM (decoder, final norm, LM head)"] == 32 * layer + 4096 + 4096 * 32064
    plain, two = plain["client_share"], two["client_share"]
    assert two["client_frozen_bytes"] - plain["client_frozen_bytes"] == 2 * layer * 2  # bf16
    assert plain["server_frozen_bytes"] - two["server_frozen_bytes"] == 2 * layer * 2
    assert plain["client_decoder_flops"] == plain["client_activation_bytes"] == 0
    assert two["client_decoder_flops"] * 30 == two["server_decoder_flops"] * 2  # 2 of 32 layers on the client
    assert two["client_decoder_flops"] + two["server_decoder_flops"] == plain["server_decoder_flops"]
    with pytest.raises(ConfigError, match=r"^model.client_layers must be a whole number from 0 to the decoder's 32 "
                                          r"layers, got 33\.$"):
        share_at(33)
