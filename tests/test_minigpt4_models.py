"""MiniGPT-4's vision side against transformers' reference: EVA ViT-g (HF `Blip2VisionModel`) and the
Q-Former (HF `Blip2QFormerModel` with BLIP-2's query tokens), tiny random configs, weights moved by our
name tables through the loader's `fill_state`."""

import os

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fednano_jax.models.eva_vit import EvaVisionTower, EvaVitConfig  # noqa: E402
from fednano_jax.models.qformer import QFormer, QFormerConfig  # noqa: E402
from fednano_jax.weights.fill import fill_state  # noqa: E402
from fednano_jax.backbone.family.minigpt4 import eva_vit_hf_table, qformer_table  # noqa: E402

VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, image_size=28,
              patch_size=7, layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu")
QFORMER = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
               encoder_hidden_size=48, cross_attention_frequency=2, layer_norm_eps=1e-12, hidden_act="gelu")


def tensors(model, extra=()):
    with torch.no_grad():
        for p in model.parameters():  # HF initialises biases and norms trivially: make every weight count
            p.add_(0.05 * torch.randn_like(p))
    named = {name: value.detach().numpy() for name, value in model.state_dict().items()}
    return list(named.items()) + list(extra)


def test_eva_vit_matches_blip2_vision_model():
    torch.manual_seed(0)
    hf = transformers.Blip2VisionModel(transformers.Blip2VisionConfig(**VISION)).eval()
    weights = tensors(hf)
    config = EvaVitConfig(image_size=28, patch_size=7, hidden_size=48, intermediate_size=96, num_layers=3,
                          num_heads=4, layer_norm_eps=1e-6, ln_vision_eps=1e-6)  # HF: one eps for both
    model = nnx.eval_shape(lambda: EvaVisionTower(config, nnx.Rngs(0)))
    graphdef, abstract = nnx.split(model)
    state = fill_state(abstract, eva_vit_hf_table("", "", 3), weights, np.float32, "a BLIP-2 vision model")
    pixels = np.random.default_rng(1).normal(size=(2, 3, 28, 28)).astype(np.float32)
    with torch.no_grad():
        expected = hf(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    got = nnx.merge(graphdef, state)(pixels.transpose(0, 2, 3, 1))
    assert got.shape == (2, 17, 48)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_qformer_matches_blip2_qformer_model_with_its_query_tokens():
    torch.manual_seed(0)
    hf = transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig(**QFORMER)).eval()
    query_tokens = np.random.default_rng(2).normal(size=(1, 5, 32)).astype(np.float32)
    weights = tensors(hf, [("query_tokens", query_tokens)])
    config = QFormerConfig(hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64, encoder_hidden_size=48,
                           cross_attention_frequency=2, num_query_tokens=5)
    model = nnx.eval_shape(lambda: QFormer(config, nnx.Rngs(0)))
    graphdef, abstract = nnx.split(model)
    state = fill_state(abstract, qformer_table("", "", 3, 2), weights, np.float32, "a BLIP-2 Q-Former")
    image_embeds = np.random.default_rng(3).normal(size=(2, 17, 48)).astype(np.float32)
    with torch.no_grad():
        expected = hf(query_embeds=torch.from_numpy(query_tokens).expand(2, -1, -1),
                      encoder_hidden_states=torch.from_numpy(image_embeds)).last_hidden_state.numpy()
    got = nnx.merge(graphdef, state)(image_embeds)
    assert got.shape == (2, 5, 32)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def lavis_vision_names(name: str) -> str:
    """HF BLIP-2 vision names -> LAVIS eva_vit_g.pth names (the inverse of HF's converter)."""
    for hf, lavis in (("embeddings.class_embedding", "cls_token"), ("embeddings.position_embedding", "pos_embed"),
                      ("embeddings.patch_embedding", "patch_embed.proj"), ("encoder.layers.", "blocks."),
                      ("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("self_attn.projection", "attn.proj"),
                      ("self_attn.qkv", "attn.qkv")):
        name = name.replace(hf, lavis)
    return name


def write_lavis(directory, vision_weights: dict, qformer_weights: dict, query_tokens) -> tuple[str, str]:
    """HF BLIP-2 weights -> LAVIS's eva_vit_g.pth (bare keys) and BLIP-2 .pth ({'model': ...}: ln_vision,
    Qformer.bert.*, query_tokens, and an extra the loader ignores), written with torch.save."""
    eva = {}
    for name, value in vision_weights.items():
        if name.endswith("self_attn.qkv.bias"):
            third = value.shape[0] // 3
            eva[name.replace("self_attn.qkv.bias", "attn.q_bias").replace("encoder.layers.", "blocks.")] = value[:third]
            eva[name.replace("self_attn.qkv.bias", "attn.v_bias").replace("encoder.layers.", "blocks.")] = value[2 * third:]
        elif not name.startswith("post_layernorm"):
            eva[lavis_vision_names(name)] = value
    blip2 = {"query_tokens": query_tokens, "t5_proj.weight": np.zeros((2, 2), np.float32),  # an extra, ignored
             "ln_vision.weight": vision_weights["post_layernorm.weight"],
             "ln_vision.bias": vision_weights["post_layernorm.bias"]}
    for name, value in qformer_weights.items():
        name = name.replace("layernorm.", "embeddings.LayerNorm.").replace("attention.attention.", "attention.self.")
        blip2["Qformer.bert." + name.replace("crossattention.attention.", "crossattention.self.")] = value
    paths = os.path.join(directory, "eva_vit_g.pth"), os.path.join(directory, "blip2.pth")
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in eva.items()}, paths[0])
    torch.save({"model": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in blip2.items()}}, paths[1])
    return paths


def test_lavis_checkpoints_load_to_the_same_modules(tmp_path):
    """eva_vit_g.pth and a BLIP-2 .pth written from the HF reference's weights, read weights-only, give the
    HF outputs."""
    import itertools

    from fednano_jax.backbone.family.minigpt4 import eva_vit_lavis_table
    from fednano_jax.weights.torch_pth import iter_pth

    torch.manual_seed(0)
    vision = transformers.Blip2VisionModel(transformers.Blip2VisionConfig(**VISION)).eval()
    qformer = transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig(**QFORMER)).eval()
    query_tokens = np.random.default_rng(2).normal(size=(1, 5, 32)).astype(np.float32)
    write_lavis(tmp_path, dict(tensors(vision)), dict(tensors(qformer)), query_tokens)

    def tensors_of(*files):
        return itertools.chain.from_iterable(iter_pth(str(tmp_path / f)) for f in files)

    eva_config = EvaVitConfig(image_size=28, patch_size=7, hidden_size=48, intermediate_size=96, num_layers=3,
                              num_heads=4, layer_norm_eps=1e-6, ln_vision_eps=1e-6)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: EvaVisionTower(eva_config, nnx.Rngs(0))))
    eva_state = fill_state(abstract, eva_vit_lavis_table("", 3), tensors_of("eva_vit_g.pth", "blip2.pth"),
                           np.float32, "LAVIS checkpoints")
    pixels = np.random.default_rng(1).normal(size=(2, 3, 28, 28)).astype(np.float32)
    with torch.no_grad():
        image_embeds = vision(pixel_values=torch.from_numpy(pixels)).last_hidden_state
        expected = qformer(query_embeds=torch.from_numpy(query_tokens).expand(2, -1, -1),
                           encoder_hidden_states=image_embeds).last_hidden_state.numpy()
    got_embeds = nnx.merge(graphdef, eva_state)(pixels.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(got_embeds, image_embeds.numpy(), rtol=1e-4, atol=1e-5)
    q_config = QFormerConfig(hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64, encoder_hidden_size=48,
                             cross_attention_frequency=2, num_query_tokens=5)
    q_graphdef, q_abstract = nnx.split(nnx.eval_shape(lambda: QFormer(q_config, nnx.Rngs(0))))
    q_state = fill_state(q_abstract, qformer_table("Qformer.bert.", "", 3, 2, lavis=True), tensors_of("blip2.pth"), np.float32, "blip2.pth")
    np.testing.assert_allclose(nnx.merge(q_graphdef, q_state)(got_embeds), expected, rtol=1e-4, atol=1e-5)


def test_a_pth_that_is_not_a_state_dict_is_one_sentence(tmp_path):
    from fednano_jax.errors import WeightsError
    from fednano_jax.weights.torch_pth import iter_pth

    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match=r"holds a list; expected a state dict"):
        list(iter_pth(str(tmp_path / "list.pth")))
    with pytest.raises(WeightsError, match="no such file"):
        list(iter_pth(str(tmp_path / "missing.pth")))


# ------------------------------------------------ load_minigpt4: the whole model, chained as MiniGPT-4 chains it
# LAVIS files carry no config: their head counts follow from EVA-CLIP's head size 88 and BERT's 64.
CHAIN_VISION = dict(hidden_size=176, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                    patch_size=14, layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu")
CHAIN_QFORMER = dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                     encoder_hidden_size=176, cross_attention_frequency=2, layer_norm_eps=1e-12, hidden_act="gelu")
QUERIES, LLM_VOCAB = 5, 96  # not MiniGPT-4's 32: the count must come from the checkpoint's query_tokens


@pytest.fixture(scope="module")
def minigpt4_files(tmp_path_factory):
    """Tiny random checkpoints in both layouts, and the PyTorch reference chain built from the same weights:
    Blip2VisionModel -> Blip2QFormerModel(query_tokens) -> nn.Linear (llama_proj) -> LlamaForCausalLM."""
    root = tmp_path_factory.mktemp("minigpt4")
    torch.manual_seed(0)
    blip2 = transformers.Blip2ForConditionalGeneration(transformers.Blip2Config(
        vision_config=CHAIN_VISION, qformer_config=CHAIN_QFORMER, num_query_tokens=QUERIES,
        text_config=transformers.OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                           num_attention_heads=2, word_embed_proj_dim=16).to_dict())).eval()
    with torch.no_grad():
        for p in blip2.parameters():
            p.add_(0.05 * torch.randn_like(p))
    blip2.save_pretrained(root / "blip2-hf")
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=LLM_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=128, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    llama.save_pretrained(root / "vicuna")
    llama_proj = torch.nn.Linear(CHAIN_QFORMER["hidden_size"], 64)
    torch.save({"model": {"llama_proj.weight": llama_proj.weight.detach().clone(),
                          "llama_proj.bias": llama_proj.bias.detach().clone()}}, root / "pretrained_minigpt4.pth")
    named = lambda module: {k: v.detach().numpy() for k, v in module.state_dict().items()}  # noqa: E731
    eva_pth, blip2_pth = write_lavis(root, named(blip2.vision_model), named(blip2.qformer),
                                     blip2.query_tokens.detach().numpy())
    return dict(root=root, blip2=blip2, llama=llama, llama_proj=llama_proj, eva_pth=eva_pth, blip2_pth=blip2_pth)


def reference_embeds(files, pixels, before, after, ln_vision_eps):
    """MiniGPT-4's encode_img and prompt wrap: [embed(before), llama_proj(Q-Former(ln_vision(EVA(image)))),
    embed(after)]."""
    blip2 = files["blip2"]
    blip2.vision_model.post_layernorm.eps = ln_vision_eps  # LAVIS: blocks 1e-6, ln_vision 1e-5; HF: one eps
    with torch.no_grad():
        image = blip2.vision_model(pixel_values=torch.from_numpy(pixels)).last_hidden_state
        queries = blip2.qformer(query_embeds=blip2.query_tokens.expand(len(pixels), -1, -1),
                                encoder_hidden_states=image).last_hidden_state
        projected = files["llama_proj"](queries)
        embed = files["llama"].get_input_embeddings()
        return torch.cat([embed(torch.from_numpy(before)), projected, embed(torch.from_numpy(after))], dim=1)


@pytest.mark.parametrize("layout", ["lavis", "hf"])
def test_minigpt4_logits_and_greedy_tokens_match_the_pytorch_chain(minigpt4_files, layout):
    from fednano_jax import load_minigpt4

    f = minigpt4_files
    vision, qformer = (f["eva_pth"], f["blip2_pth"]) if layout == "lavis" else (str(f["root"] / "blip2-hf"), None)
    model = load_minigpt4(str(f["root"] / "vicuna"), str(f["root"] / "pretrained_minigpt4.pth"), vision, qformer,
                          dtype="float32")
    assert model.num_image_tokens == QUERIES and model.image_token_id == LLM_VOCAB
    rng = np.random.default_rng(4)
    before, after = rng.integers(3, LLM_VOCAB, (2, 4)), rng.integers(3, LLM_VOCAB, (2, 6))
    before[:, 0] = 1
    pixels = rng.normal(size=(2, 3, 28, 28)).astype(np.float32)
    embeds = reference_embeds(f, pixels, before, after, 1e-5 if layout == "lavis" else 1e-6)
    ids = np.concatenate([before, np.full((2, QUERIES), model.image_token_id), after], axis=1)
    with torch.no_grad():
        expected = f["llama"](inputs_embeds=embeds).logits.numpy()
        reference_tokens = f["llama"].generate(inputs_embeds=embeds, attention_mask=torch.ones(ids.shape, dtype=torch.long),
                                               max_new_tokens=6, do_sample=False, eos_token_id=-1,
                                               pad_token_id=0).numpy()
    np.testing.assert_allclose(np.asarray(model.logits(ids, pixels)), expected, atol=1e-4, rtol=1e-4)
    ours = model.generate(ids, pixels, max_new_tokens=6, eos_token_id=LLM_VOCAB, pad_token_id=0)
    np.testing.assert_array_equal(ours, reference_tokens[:, -6:])


def test_minigpt4_files_that_do_not_fit_are_one_sentence(minigpt4_files, tmp_path):
    from fednano_jax import load_minigpt4
    from fednano_jax.errors import WeightsError

    f = minigpt4_files
    vicuna, proj = str(f["root"] / "vicuna"), str(f["root"] / "pretrained_minigpt4.pth")
    with pytest.raises(WeightsError, match="qformer=None needs vision to be a Hugging Face BLIP-2 directory"):
        load_minigpt4(vicuna, proj, f["eva_pth"])
    with pytest.raises(WeightsError, match="expected a .pth or .safetensors file"):
        load_minigpt4(vicuna, str(tmp_path / "missing.pth"), f["eva_pth"], f["blip2_pth"])
    with pytest.raises(WeightsError, match="the Q-Former's query LayerNorm"):  # the EVA file given as the Q-Former
        load_minigpt4(vicuna, proj, f["eva_pth"], f["eva_pth"])
    torch.save({"model": {"llama_proj.weight": torch.zeros(64, 7), "llama_proj.bias": torch.zeros(64)}},
               tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match=r"'llama_proj.weight'.*has shape \(64, 7\)"):
        load_minigpt4(vicuna, str(tmp_path / "wrong.pth"), f["eva_pth"], f["blip2_pth"])


def test_converted_safetensors_load_as_the_pth_files_do(minigpt4_files, tmp_path):
    """`python -m fednano_jax.convert_pth` once, then load_minigpt4 needs no torch: the same logits."""
    import subprocess
    import sys

    from conftest import ROOT
    from fednano_jax import load_minigpt4

    f = minigpt4_files
    projection = str(f["root"] / "pretrained_minigpt4.pth")
    result = subprocess.run([sys.executable, "-m", "fednano_jax.convert_pth",
                             f"--pth={f['eva_pth']},{f['blip2_pth']},{projection}", f"--out_dir={tmp_path}"],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["blip2.safetensors", "eva_vit_g.safetensors",
                                            "pretrained_minigpt4.safetensors"]
    vicuna = str(f["root"] / "vicuna")
    from_pth = load_minigpt4(vicuna, projection, f["eva_pth"], f["blip2_pth"], dtype="float32")
    converted = load_minigpt4(vicuna, str(tmp_path / "pretrained_minigpt4.safetensors"),
                              str(tmp_path / "eva_vit_g.safetensors"), str(tmp_path / "blip2.safetensors"),
                              dtype="float32")
    rng = np.random.default_rng(7)
    ids = np.concatenate([[[1, 5, 6]], np.full((1, QUERIES), LLM_VOCAB), [[7, 8]]], axis=1)
    pixels = rng.normal(size=(1, 3, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(converted.logits(ids, pixels)), np.asarray(from_pth.logits(ids, pixels)))


def test_an_experiment_runs_on_minigpt4s_files(minigpt4_files, easy_vqa_dir, tmp_path):
    """model.path (a LLaMA directory with its tokenizer) and model.minigpt4 (LAVIS .pth files): the dry run
    reads their metadata, and a round of FedNano runs on the loaded model (random weights: no accuracy)."""
    import subprocess
    import sys

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    from conftest import ROOT

    f = minigpt4_files
    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.normalizer, words.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    words.train_from_iterator(["###Human: <Img></Img> what shape is in the image? ###Assistant: circle red yes no"],
                              trainer=trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", unk_token="<unk>",
                                                     bos_token="<s>", eos_token="</s>")
    vicuna = tmp_path / "vicuna"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=2, eos_token_id=3,
        pad_token_id=0)).save_pretrained(vicuna)
    tokenizer.save_pretrained(vicuna)
    config = tmp_path / "minigpt4_files.py"
    config.write_text(f'''
import runpy
from ml_collections import ConfigDict

def get_config():
    config = runpy.run_path({os.path.join(ROOT, "configs", "easyvqa_minigpt4_tiny.py")!r})["get_config"]()
    del config.model["llm"]  # the shapes come from the files
    config.model.vision = ConfigDict(dict(image_size=28, patch_size=14, hidden_size=176, intermediate_size=64,
                                          num_layers=2, num_heads=2))
    config.model.path = {str(vicuna)!r}
    config.model.minigpt4 = ConfigDict(dict(projection={str(f["root"] / "pretrained_minigpt4.pth")!r},
                                            vision={f["eva_pth"]!r}, qformer={f["blip2_pth"]!r}))
    return config
''')
    flags = [f"--config={config}", f"--config.data.dir={easy_vqa_dir}", f"--workdir={tmp_path / 'run'}",
             "--config.fed.rounds=1", "--config.fed.methods=fednano", "--config.data.train_examples=100",
             "--config.data.test_examples=40", "--config.eval.batch_size=40", "--config.fed.num_clients=2"]

    def main(*extra):
        return subprocess.run([sys.executable, "-m", "fednano_jax.main", *flags, *extra], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=600)

    dry = main("--dry_run")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert f"Backbone: the checkpoint at {vicuna}" in dry.stdout and f"{QUERIES} image tokens" in dry.stdout
    run = main("--config.eval.max_new_tokens=2")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "FedNano" in (tmp_path / "run" / "results.md").read_text()
