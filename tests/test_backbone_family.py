"""Backbones by family: `model.family` picks a registry entry; configs without it get the family their keys describe,
and naming a config's own family changes neither its resume fingerprint nor its backbone's cache key."""

import glob
import os
import subprocess
import sys

import pytest
from flax import nnx

from conftest import ROOT
from fednano_jax.backbone import pretrain
from fednano_jax.backbone.family import FAMILIES, derived_family, entry, family_name, family_of
from fednano_jax.backbone.family.base import Family
from fednano_jax.config import load_config_file, read, resume_fingerprint
from fednano_jax.errors import ConfigError
from fednano_jax.models.llama import LlamaDecoder
from fednano_jax.models.mllm import MultimodalModel

# Every config file -> the family its model section describes (from its keys, with or without model.family).
EXPECTED = {
    "easyvqa_tiny": "tiny", "scienceqa_tiny": "tiny", "iconqa_tiny": "tiny",
    "easyvqa_minigpt4_tiny": "minigpt4", "easyvqa_smollm2": "llama_text",
    "scienceqa_llava15_7b": "llava", "iconqa_llava15_7b": "llava", "memory_llava15_7b": "llava",
    "scienceqa_minigpt4_7b": "minigpt4", "iconqa_minigpt4_7b": "minigpt4",
}
UNKNOWN = "model.family must be one of ['llama_text', 'llava', 'minigpt4', 'tiny'], got 'qwen2_vl'."


def config_of(name: str):
    return load_config_file(os.path.join(ROOT, "configs", f"{name}.py"))


def records(config):
    """The config's records, as config.read makes them (without a run's checks)."""
    return read(config, run=False)


def without_family(config):
    config = config.copy_and_resolve_references()
    if "family" in config.model:
        del config.model["family"]
    return config


def test_every_config_is_covered():
    assert set(EXPECTED) == {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_registry_derives_each_configs_family_and_a_named_one_agrees(name):
    config = config_of(name)
    assert derived_family(records(config).model) == EXPECTED[name]
    assert family_name(records(config)) == family_name(records(without_family(config))) == EXPECTED[name]
    assert family_of(records(config)) is entry(EXPECTED[name]) and family_of(records(config)).name == EXPECTED[name]
    assert config.model.get("family", EXPECTED[name]) == EXPECTED[name]  # a named family is the derived one


def test_each_entry_is_its_module_and_names_the_llama_decoder():
    for name in FAMILIES:
        family = entry(name)
        assert isinstance(family, Family) and family.name == name
        assert family.decoder is LlamaDecoder  # every family of today serves a LLaMA-family LLM


@pytest.mark.parametrize("name", ["easyvqa_tiny", "easyvqa_minigpt4_tiny", "memory_llava15_7b"])
def test_naming_the_derived_family_keeps_fingerprint_and_cache_key(name):
    derived = without_family(config_of(name))
    named = derived.copy_and_resolve_references()
    named.model.family = EXPECTED[name]
    named, derived = records(named), records(derived)
    assert resume_fingerprint(named, "key") == resume_fingerprint(derived, "key")
    assert pretrain.cache_key(named) == pretrain.cache_key(derived)
    other = derived.replace(model={"family": "llama_text" if EXPECTED[name] != "llama_text" else "llava"})
    assert resume_fingerprint(other, "key") != resume_fingerprint(derived, "key")  # another family is a setting


def test_an_explicit_family_picks_its_entry_its_checks_and_its_decoder():
    config = config_of("memory_llava15_7b")
    config.model.family = "llama_text"  # the same preset shapes, read as a text-only LLaMA with a tower
    config = records(config)
    assert family_of(config).name == "llama_text"
    assert family_of(config).shapes(config) == entry("llava").shapes(config)
    tiny = config_of("easyvqa_tiny")
    tiny.model.family = "tiny"
    read(tiny)
    tiny.model.path = "~/models/llava-1.5-7b-hf"
    with pytest.raises(ConfigError, match="model.family='tiny' is pretrained here and reads no checkpoint"):
        read(tiny)
    minigpt4 = config_of("easyvqa_minigpt4_tiny")
    del minigpt4.model["prompt"]
    with pytest.raises(ConfigError, match=r"tuned with the 'minigpt4' chat template: set model.prompt='minigpt4'"):
        read(minigpt4)
    minigpt4.model.prompt = "llava"  # named: prompted otherwise, on purpose
    read(minigpt4)


def test_the_model_builds_the_decoder_its_family_names():
    class Decoder(LlamaDecoder):
        pass

    class Other(type(entry("tiny"))):
        decoder = Decoder

    config = records(config_of("easyvqa_tiny"))
    mcfg = Other().model_config(config, vocab_size=40, image_token_id=39)
    model = nnx.eval_shape(lambda: MultimodalModel(mcfg, nnx.Rngs(0)))
    assert type(model.server) is Decoder


def test_an_unknown_family_is_one_sentence():
    config = config_of("easyvqa_tiny")
    config.model.family = "qwen2_vl"
    for call in (lambda: family_of(records(config)), lambda: read(config)):
        with pytest.raises(ConfigError) as stopped:
            call()
        assert str(stopped.value) == UNKNOWN


def test_an_unknown_family_on_the_command_line_is_one_sentence():
    done = subprocess.run([sys.executable, "-m", "fednano_jax.accounting",
                           f"--config={os.path.join(ROOT, 'configs', 'memory_llava15_7b.py')}",
                           "--config.model.family=qwen2_vl"], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"Config error: {UNKNOWN}"
