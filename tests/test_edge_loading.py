"""A split-step client loads NanoEdge alone (`Family.edge`) from the files a full run reads: the arrays of the full
load's `edge/` entries and its adapters' structure, and never a decoder tensor (a spy records every tensor read)."""

import jax
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

torch = pytest.importorskip("torch", reason="the checkpoints are written with transformers' PyTorch models")
transformers = pytest.importorskip("transformers")

from fednano_jax.backbone import cache, pretrain  # noqa: E402
from fednano_jax.backbone.family import family_of  # noqa: E402
from fednano_jax.backbone.family.minigpt4 import minigpt4_config  # noqa: E402
from fednano_jax.backbone.from_checkpoint import VISION_SIDE, attach_vision_tower  # noqa: E402
from fednano_jax.backbone.pretrained import _hf_layout, load_pretrained  # noqa: E402
from fednano_jax.config import load_config_file, read  # noqa: E402
from fednano_jax.data.tokenizer import add_image_token  # noqa: E402
from fednano_jax.errors import WeightsError  # noqa: E402
from fednano_jax.models.mllm import AdapterConfig  # noqa: E402
from fednano_jax.weights import gguf_llama, safetensors_hf, torch_pth  # noqa: E402
from fednano_jax.weights.fill import flatten  # noqa: E402
from fednano_jax.weights.names import part_entries, sources  # noqa: E402
from test_backbone_from_checkpoint import experiment_config, save_llama_with_tokenizer  # noqa: E402
from test_minigpt4_models import LLM_VOCAB, minigpt4_files  # noqa: E402, F401 (a module fixture)
from test_pretrained import VOCAB, save_llama, save_llava, write_gguf  # noqa: E402


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """The names of every tensor read: safetensors' get_tensor and get_slice, and each tensor a .pth yields."""
    names = []
    real_open, real_pth = safetensors_hf.safe_open, torch_pth.iter_pth

    class Spy:
        def __init__(self, *args, **kwargs):
            self._file = real_open(*args, **kwargs)

        def __enter__(self):
            self._file.__enter__()
            return self

        def __exit__(self, *exc):
            return self._file.__exit__(*exc)

        def __getattr__(self, attribute):  # keys(), metadata(): no tensor
            return getattr(self._file, attribute)

        def get_tensor(self, name):
            names.append(name)
            return self._file.get_tensor(name)

        def get_slice(self, name):
            names.append(name)
            return self._file.get_slice(name)

    def iter_pth(path, keep=None):
        for name, array in real_pth(path, keep):
            names.append(name)
            yield name, array

    monkeypatch.setattr(safetensors_hf, "safe_open", Spy)
    monkeypatch.setattr(torch_pth, "iter_pth", iter_pth)
    return names


def save_word_tokenizer(directory, size: int):
    """A word-level tokenizer of exactly `size` tokens (the LLM's vocabulary), saved beside the checkpoint."""
    from tokenizers import Tokenizer, models

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, size)}}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")), pad_token="<pad>", unk_token="<unk>",
        bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(directory)
    return tokenizer


def decoder_sources(table) -> set[str]:
    """The checkpoint names only the server's decoder reads (a tied LM head's embeddings are the edge's)."""
    return sources({k: v for k, v in table.items() if k.startswith("server/")}) - sources(part_entries(table, "edge"))


def parameters(state) -> dict:
    return {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(state)).items()}


def assert_edge_of(edge, full):
    """`Family.edge` gives `Family.backbone`'s NanoEdge, its model config and its tokenizer."""
    (_, frozen, adapters, tokenizer, mcfg), (_, full_frozen, full_adapters, full_tokenizer, full_mcfg) = edge, full
    assert_same_nanoedge(frozen, adapters, full_frozen, full_adapters)
    assert mcfg == full_mcfg and len(tokenizer) == len(full_tokenizer)


def assert_same_nanoedge(frozen, adapters, full_frozen, full_adapters):
    """The edge load is the full load's `edge/` entries, array for array, with the full model's adapters' tree."""
    ours, theirs = parameters(frozen), parameters(full_frozen)
    assert set(ours) == {k for k in theirs if k.startswith("edge/")} and "server" not in nnx.to_pure_dict(frozen)
    for name, value in ours.items():
        np.testing.assert_array_equal(value, theirs[name], err_msg=name)
    assert jax.tree.structure(nnx.to_pure_dict(adapters)) == jax.tree.structure(nnx.to_pure_dict(full_adapters))
    assert jax.tree.map(np.shape, nnx.to_pure_dict(adapters)) == jax.tree.map(np.shape,
                                                                             nnx.to_pure_dict(full_adapters))


def assert_read_only_the_edge(reads: list[str], table):
    decoder = decoder_sources(table)
    assert decoder and any("layers." in name for name in decoder)  # the table names the decoder's tensors
    assert not decoder & set(reads), sorted(decoder & set(reads))[:5]
    assert set(reads) == sources(part_entries(table, "edge"))  # and every edge tensor, each once
    assert len(reads) == len(set(reads))


def assert_server_half_reads_only_the_decoder(family, exp, reads: list[str], table, full):
    """`Family.server_half` (the split-step server's part) reads the decoder's tensors alone, each once, and holds
    `Family.backbone`'s decoder, array for array."""
    from fednano_jax.models.mllm import merge_model

    reads.clear()
    server = parameters(nnx.state(family.server_half(exp, None)))
    vision = sources(part_entries(table, "edge")) - sources(part_entries(table, "server"))
    assert vision and not vision & set(reads), sorted(vision & set(reads))[:5]
    assert set(reads) == sources(part_entries(table, "server")) and len(reads) == len(set(reads))
    want = parameters(nnx.state(merge_model(*full[:3]).server))
    assert set(server) == set(want)
    for name, value in server.items():
        np.testing.assert_array_equal(value, want[name], err_msg=name)


def llava_experiment(directory):
    config = load_config_file("configs/easyvqa_tiny.py")
    config.model.family, config.model.path, config.model.dtype = "llava", str(directory), "float32"
    return read(config, run=False)


def test_a_client_reads_a_llava_directorys_nanoedge_and_no_decoder_tensor_and_the_server_the_reverse(tmp_path, reads):
    save_llava(tmp_path)
    save_word_tokenizer(tmp_path, VOCAB)
    exp = llava_experiment(tmp_path)
    family = family_of(exp)
    assert family.name == "llava"
    edge = family.edge(exp)
    _, table, _ = _hf_layout(str(tmp_path), np.float32, AdapterConfig())
    assert_read_only_the_edge(reads, table)
    full = family.backbone(exp, None)
    assert_edge_of(edge, full)
    assert_server_half_reads_only_the_decoder(family, exp, reads, table, full)


def minigpt4_experiment(files):
    config = load_config_file("configs/easyvqa_minigpt4_tiny.py")
    del config.model["llm"]  # the shapes come from the files
    config.model.vision.update(image_size=28, patch_size=14, hidden_size=176, intermediate_size=64, num_layers=2,
                               num_heads=2)
    config.model.path, config.model.dtype = str(files["root"] / "vicuna"), "float32"
    config.model.minigpt4 = ConfigDict(dict(projection=str(files["root"] / "pretrained_minigpt4.pth"),
                                            vision=files["eva_pth"], qformer=files["blip2_pth"]))
    return read(config, run=False)


def test_a_client_reads_minigpt4s_nanoedge_and_no_vicuna_decoder_tensor_and_the_server_the_reverse(minigpt4_files,
                                                                                                   reads):
    f = minigpt4_files
    save_word_tokenizer(f["root"] / "vicuna", LLM_VOCAB)
    exp = minigpt4_experiment(f)
    family = family_of(exp)
    assert family.name == "minigpt4"
    edge = family.edge(exp)
    _, table, _ = minigpt4_config(str(f["root"] / "vicuna"), f["eva_pth"], f["blip2_pth"])
    table.update({"edge/connector/linear/kernel": ("llama_proj.weight", ""),
                  "edge/connector/linear/bias": ("llama_proj.bias", "")})
    assert_read_only_the_edge(reads, table)
    assert "t5_proj.weight" not in reads  # BLIP-2's other tensors stay unread too
    assert edge[4].embed_vocab_size == LLM_VOCAB + 1  # the embeddings grown by the `<image>` row
    full = family.backbone(exp, None)
    assert_edge_of(edge, full)
    assert_server_half_reads_only_the_decoder(family, exp, reads, table, full)


def test_a_client_of_a_text_only_llm_reads_its_embeddings_and_the_cached_aligned_tower(tmp_path, reads):
    save_llama_with_tokenizer(tmp_path / "llm", save_word_tokenizer(tmp_path / "words", 40))
    exp = experiment_config(tmp_path / "llm", tmp_path / "cache")
    family = family_of(exp)
    assert family.name == "llama_text"
    with pytest.raises(WeightsError, match=r"run python -m fednano_jax.main with this config once"):
        family.edge(exp)
    # What a full run caches after aligning: the vision side (here a fresh one, shifted so it cannot pass for
    # a fresh one) and the tokenizer with `<image>`.
    loaded = load_pretrained(str(tmp_path / "llm"), dtype="float32")
    tokenizer = loaded.tokenizer
    mcfg = family.with_vision_tower(exp, loaded.config.llm, add_image_token(tokenizer), len(tokenizer))
    _, fresh, _ = attach_vision_tower(loaded, mcfg, exp.pretrain.seed)
    aligned = {k: v + 1 for k, v in flatten(nnx.to_pure_dict(fresh)).items() if k.startswith(VISION_SIDE)}
    cache.save_backbone(pretrain.cache_dir(exp), aligned, tokenizer)
    reads.clear()
    edge = family.edge(exp)
    _, table, _ = _hf_layout(str(tmp_path / "llm"), np.float32, AdapterConfig())
    assert_read_only_the_edge(reads, table)
    for name, value in aligned.items():
        np.testing.assert_array_equal(parameters(edge[1])[name], value, err_msg=name)
    assert_edge_of(edge, family.backbone(exp, None))


def test_a_client_of_the_tiny_config_reads_the_stored_backbones_edge_and_the_server_its_decoder():
    from flax import nnx

    from fednano_jax.models.mllm import merge_model

    exp = read(load_config_file("configs/easyvqa_tiny.py"), run=False)
    family = family_of(exp)
    full = family.backbone(exp, None)
    assert_edge_of(family.edge(exp), full)
    server = nnx.to_pure_dict(nnx.state(family.server_half(exp, None)))
    want = nnx.to_pure_dict(nnx.state(merge_model(*full[:3]).server))
    assert jax.tree.structure(server) == jax.tree.structure(want)
    jax.tree.map(np.testing.assert_array_equal, server, want)


def test_a_gguf_llms_nanoedge_dequantizes_only_its_embeddings(tmp_path, monkeypatch):
    """A tied LM head shares the embeddings: they are the edge's, and the only tensor a client dequantizes."""
    path = tmp_path / "tiny.gguf"
    write_gguf(path, save_llama(tmp_path / "hf", tie_word_embeddings=True), "Q8_0")
    dequantized, real = [], gguf_llama._dequantize
    monkeypatch.setattr(gguf_llama, "_dequantize", lambda tensor: dequantized.append(tensor.name) or real(tensor))
    edge = load_pretrained(str(path), dtype="float32", part="edge")
    assert dequantized == ["token_embd.weight"]
    full = load_pretrained(str(path), dtype="float32")
    assert_same_nanoedge(edge.frozen, edge.adapters, full.frozen, full.adapters)
