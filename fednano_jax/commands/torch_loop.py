"""The PyTorch baseline of the benchmark: the same MLLM and NanoAdapters, a round run the way PyTorch
federated frameworks run it.

The backbone is transformers' `LlavaForConditionalGeneration` built from our model
config (CLIP vision tower cut after the feature layer, as ours computes no later layer;
mlp2x_gelu projector; LLaMA decoder), frozen; the two NanoAdapters are the only
parameters with gradients. A round loops clients in Python; each client loads the
global adapters, makes a fresh AdamW, and for each step takes its batch from the host
dataset, runs forward, backward and `optimizer.step()`, then copies its adapters out
as its upload. Eager PyTorch, as those frameworks run; or the same loop with the loss under `torch.compile`
(the benchmark's `torch_compile` mode).

Needs torch (requirements-test.txt); nothing else in fednano_jax imports this module.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers
from flax import nnx
from torch import nn

from fednano_jax.errors import ConfigError
from fednano_jax.data.batches import gather_batch
from fednano_jax.models.llama import LlamaDecoder
from fednano_jax.models.mllm import MllmConfig
from fednano_jax.models.vision import VisionConfig

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ADAPTERS = {"image": "adapter_image", "text": "adapter_text"}  # torch name -> our NanoEdge attribute
# fed.optimizer -> the torch optimizer with the settings of simulation.OPTIMIZERS
OPTIMIZERS = {"adamw": lambda params, fed: torch.optim.AdamW(params, lr=fed.learning_rate,
                                                              weight_decay=fed.weight_decay),
              "adam": lambda params, fed: torch.optim.Adam(params, lr=fed.learning_rate),
              "sgd": lambda params, fed: torch.optim.SGD(params, lr=fed.learning_rate)}


def unsupported(mcfg: MllmConfig) -> str | None:
    """Why transformers' LLaVA cannot mirror this model, or None."""
    v, t = mcfg.vision, mcfg.llm
    if not isinstance(v, VisionConfig) or mcfg.connector != "mlp2x_gelu" or mcfg.decoder is not LlamaDecoder:
        return ("The PyTorch loop mirrors LLaVA-1.5: it needs a vision tower and model.connector='mlp2x_gelu', "
                f"the tower CLIP's and the decoder LLaMA's (got vision={type(v).__name__ if v else 'none'}, "
                f"connector={mcfg.connector!r}, decoder={mcfg.decoder.__name__}).")
    if mcfg.embed_vocab_size not in (None, t.vocab_size):
        return ("The PyTorch loop needs one vocabulary for the embeddings and the LM head; this model embeds "
                f"{mcfg.embed_vocab_size} ids and predicts {t.vocab_size}.")
    return None


def hf_llava_config(mcfg: MllmConfig) -> transformers.LlavaConfig:
    """transformers' LLaVA of the same shapes, its vision tower holding only the layers ours computes."""
    v, t = mcfg.vision, mcfg.llm
    if why := unsupported(mcfg):
        raise ConfigError(why)
    vision = transformers.CLIPVisionConfig(
        image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size, num_hidden_layers=v.layers_used, num_attention_heads=v.num_heads,
        layer_norm_eps=v.layer_norm_eps, hidden_act=v.activation)
    text = transformers.LlamaConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
        head_dim=t.resolved_head_dim, rope_theta=t.rope_theta, rms_norm_eps=t.rms_norm_eps,
        tie_word_embeddings=False, max_position_embeddings=4096)
    return transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=mcfg.image_token_id,
                                    vision_feature_layer=-1, vision_feature_select_strategy=v.select_strategy,
                                    projector_hidden_act="gelu", tie_word_embeddings=False)


class TorchNanoAdapter(nn.Module):
    """`x + (alpha / r) * up(down(x))`, float32 master weights cast to the activations' dtype."""

    def __init__(self, dim: int, rank: int, alpha: float):
        super().__init__()
        self.down = nn.Parameter(torch.zeros(dim, rank))
        self.up = nn.Parameter(torch.zeros(rank, dim))
        self.scale = alpha / rank

    def forward(self, x):
        return x + self.scale * ((x @ self.down.to(x.dtype)) @ self.up.to(x.dtype))


class TorchFedNanoModel(nn.Module):
    """Frozen LLaVA plus NanoAdapters on the projected image tokens (A_I) and the text embeddings (A_T)."""

    def __init__(self, mcfg: MllmConfig, llava: transformers.LlavaForConditionalGeneration):
        super().__init__()
        self.llava = llava.requires_grad_(False)
        a, d = mcfg.adapter, mcfg.llm.hidden_size
        enabled = {"image": a.image, "text": a.text}
        self.adapters = nn.ModuleDict({name: TorchNanoAdapter(d, a.rank, a.alpha)
                                       for name, on in enabled.items() if on})
        v = mcfg.vision
        self.register_buffer("mean", torch.tensor(v.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(v.image_std).view(1, 3, 1, 1), persistent=False)
        self.image_token_id = mcfg.image_token_id

    def _adapt(self, name, x):
        return self.adapters[name](x) if name in self.adapters else x

    def image_features(self, images_uint8):
        """uint8 [B, H, W, 3] -> adapted image tokens [B, N, D] (CLIP normalisation, as our tower does)."""
        pixels = (images_uint8.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std
        pixels = pixels.to(self.llava.dtype)
        # The tower holds only the layers up to the feature layer, so its last hidden state (before CLIP's
        # post-layernorm, which only the pooled output gets) is that layer's.
        hidden = self.llava.model.vision_tower(pixels).last_hidden_state
        if self.llava.config.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]
        return self._adapt("image", self.llava.model.multi_modal_projector(hidden))

    def logits(self, input_ids, attention_mask, images_uint8):
        embeds = self._adapt("text", self.llava.model.get_input_embeddings()(input_ids))
        is_image = (input_ids == self.image_token_id).unsqueeze(-1)
        features = self.image_features(images_uint8).to(embeds.dtype)
        embeds = embeds.masked_scatter(is_image, features)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.llava.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask.long(),
                                                 position_ids=positions).last_hidden_state
        return self.llava.lm_head(hidden)

    def loss(self, batch: dict):
        """Mean negative log-likelihood of the answer tokens (our `mean_answer_nll`)."""
        logits = self.logits(batch["input_ids"], batch["attention_mask"], batch["images"])
        log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        picked = log_probs.gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        mask = batch["loss_mask"][:, 1:].float()
        return -(picked * mask).sum() / mask.sum().clamp(min=1.0)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def random_model(mcfg: MllmConfig, device: torch.device, seed: int = 0, compiled: bool = False) -> TorchFedNanoModel:
    """The frozen backbone with transformers' random initialisation, made on the device in the model dtype
    (a 7B bf16 backbone never exists in float32 on the host). `compiled`: its loss (forward, and so backward)
    under `torch.compile` (TorchInductor), the rest of the loop as it is."""
    torch.manual_seed(seed)
    with torch.device(device):
        llava = transformers.LlavaForConditionalGeneration._from_config(hf_llava_config(mcfg),
                                                                         dtype=TORCH_DTYPES[mcfg.llm.dtype])
        model = TorchFedNanoModel(mcfg, llava)
    if compiled:
        model.loss = torch.compile(model.loss)
    return model


def adapters_from_jax(adapters) -> dict[str, torch.Tensor]:
    """Our adapter state as the torch model's `adapters` state dict."""
    edge = nnx.to_pure_dict(adapters)["edge"]
    return {f"{name}.{part}": torch.from_numpy(np.array(edge[ours][part], np.float32))
            for name, ours in ADAPTERS.items() if ours in edge for part in ("down", "up")}


def host_dataset(data: dict) -> dict[str, np.ndarray]:
    """The benchmark's dataset as host arrays (a PyTorch Dataset's storage)."""
    return {key: np.asarray(value) for key, value in data.items()}


def host_batch(data: dict[str, np.ndarray], rows: np.ndarray, valid: np.ndarray, device: torch.device) -> dict:
    """One step's batch, gathered on the host (by our `gather_batch`, on numpy arrays) and moved to the device,
    as a DataLoader delivers it."""
    batch = gather_batch(data, rows, valid)
    batch["input_ids"] = batch["input_ids"].astype(np.int64)  # torch indexes with int64
    return {key: torch.from_numpy(np.ascontiguousarray(value)).to(device) for key, value in batch.items()}


def client_update(model: TorchFedNanoModel, start: dict[str, torch.Tensor], data: dict[str, np.ndarray],
                  rows: np.ndarray, valid: np.ndarray, fed) -> tuple[dict, list[float]]:
    """One client's local training: rows, valid [steps, batch] -> (uploaded adapters on the host, losses);
    `fed`: the config's optimizer, learning_rate and weight_decay."""
    device = next(model.adapters.parameters()).device
    model.adapters.load_state_dict(start)
    optimizer = OPTIMIZERS[fed.optimizer](model.adapters.parameters(), fed)
    losses = []
    for step_rows, step_valid in zip(rows, valid):
        if not step_valid.any():
            continue
        loss = model.loss(host_batch(data, step_rows, step_valid, device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    upload = {name: value.detach().to("cpu", copy=True) for name, value in model.adapters.state_dict().items()}
    return upload, losses


def run_round(model: TorchFedNanoModel, start: dict[str, torch.Tensor], data: dict[str, np.ndarray],
              rows: np.ndarray, valid: np.ndarray, fed) -> list[dict]:
    """Every client's update from the global adapters, one client after another."""
    return [client_update(model, start, data, rows[k], valid[k], fed)[0]
            for k in range(rows.shape[0])]


# ------------------------------------------------------------------ pfl-style: the cohort over worker processes
_WORKER: dict = {}  # a worker process's model, dataset and settings, made once by _start_worker


def _start_worker(mcfg: MllmConfig, data: dict, fed, seed: int) -> None:
    torch.set_num_threads(1)  # one core each: the workers, not the threads, use the machine
    _WORKER.update(model=random_model(mcfg, torch.device("cpu"), seed), data=data, fed=fed)


def _worker_round(start: dict, rows: np.ndarray, valid: np.ndarray) -> list[dict]:
    return run_round(_WORKER["model"], start, _WORKER["data"], rows, valid, _WORKER["fed"])


class WorkerRounds:
    """A round as pfl-research runs one in PyTorch: the cohort split over `workers` processes (one per core), each
    looping its clients on one thread with the same model, the uploads gathered in cohort order. Each worker builds
    the model once (the same seed, so the same weights); `close()` stops them."""

    def __init__(self, mcfg: MllmConfig, data: dict[str, np.ndarray], fed, workers: int, seed: int = 0,
                 timeout_s: float = 3600.0):
        import concurrent.futures
        import multiprocessing

        import types

        # What the loop reads of the federation's settings (the whole record holds read-only mappings, not pickled).
        fed = types.SimpleNamespace(optimizer=fed.optimizer, learning_rate=fed.learning_rate,
                                    weight_decay=fed.weight_decay)
        self.workers, self.timeout_s = workers, timeout_s
        self.pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                           initializer=_start_worker, initargs=(mcfg, data, fed, seed))

    def __call__(self, start: dict, rows: np.ndarray, valid: np.ndarray) -> list[dict]:
        parts = [part for part in np.array_split(np.arange(len(rows)), self.workers) if len(part)]
        futures = [self.pool.submit(_worker_round, start, rows[part], valid[part]) for part in parts]
        return [upload for future in futures for upload in future.result(timeout=self.timeout_s)]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
