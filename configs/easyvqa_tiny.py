"""FedNano on easy-VQA with a small pretrained MLLM: the default experiment, CPU-sized.

Run: python -m fednano_jax.main --config=configs/easyvqa_tiny.py [--config.fed.rounds=3]
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    config = ConfigDict()
    config.name = "easyvqa_tiny"
    config.seed = 0  # federated randomness: question sample, partition, shuffling, dropout

    config.data = ConfigDict()
    config.data.dir = "~/.cache/fednano_jax/tfds"  # easy-VQA is built here from the PyPI package
    config.data.pretrain_images = 2000  # training images held aside for backbone pretraining only
    config.data.train_examples = 2000  # federated training questions (0 = all)
    config.data.test_examples = 600  # federated test questions from the official test split (0 = all)
    config.data.partition = "dirichlet"  # or iid, pathological, size_skew, natural (fednano_jax/data/partition.py)
    config.data.dirichlet_alpha = 1.0  # dirichlet: non-IID skew over question categories (smaller: more skewed)
    config.data.min_client_size = 1  # dirichlet: redraw until every client has this many training examples
    config.data.categories_per_client = 2  # pathological: categories each client holds
    config.data.size_exponent = 1.0  # size_skew: client k's share is proportional to (k + 1) ** -exponent
    config.data.natural_key = "subject"  # natural: ScienceQA subject or grade, IconQA subtask
    config.data.stream_images = False  # True: the image table stays on the host, each step fetches its images

    config.model = ConfigDict()
    config.model.dtype = "float32"
    config.model.remat = "none"  # per decoder layer: "none", "full" or "dots" (see models/llama.py)
    # Decoder layers per iteration of the layer scan: 1 compiles one layer's program (deep models); the layer count
    # unrolls it, which XLA runs faster on this two-layer decoder (docs/benchmarks.md). The same numbers either way.
    config.model.scan_unroll = 2
    config.model.connector = "mlp2x_gelu"
    config.model.vision = ConfigDict(dict(
        image_size=64, patch_size=16, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
        feature_layer=-2))
    config.model.llm = ConfigDict(dict(
        hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
        rope_theta=10000.0, rms_norm_eps=1e-5))
    config.model.adapter = ConfigDict(dict(rank=16, alpha=32.0, image=True, text=True))
    # Heterogeneous ranks: e.g. (16, 8, 4), cycled over the clients (models/adapter_ranks.py); () = all at `rank`.
    config.model.adapter.client_ranks = ()
    # The decoder's first layers, run frozen by each client after NanoEdge: the wire then carries the hidden states
    # after them instead of the embeddings (the same model and gradients; 0 = FedNano's split, the embeddings).
    config.model.client_layers = 0

    config.pretrain = ConfigDict()
    config.pretrain.seed = 0  # the backbone: held-aside images, initialisation, batch order
    config.pretrain.steps = 1000
    config.pretrain.caption_repeats = 4  # each held-aside image's caption, repeated
    config.pretrain.questions_per_image = 3  # text-only QA examples per held-aside image
    config.pretrain.batch_size = 64
    config.pretrain.learning_rate = 2e-3
    config.pretrain.warmup_steps = 50
    config.pretrain.weight_decay = 0.01
    config.pretrain.cache_dir = "~/.cache/fednano_jax/pretrained"
    config.pretrain.shipped = True  # use the backbone in fednano_jax/backbone/shipped when these settings match

    config.fed = ConfigDict()
    config.fed.methods = ("fedavg", "fednano")
    config.fed.num_clients = 5
    config.fed.clients_per_round = 0  # cohort sampled each round; 0 = every client
    # "fixed": that many clients, drawn anew each round; "poisson": each client independently at rate
    # clients_per_round / num_clients, in cohort_capacity slots (0: the expected cohort + 3 std; a larger draw is
    # truncated); "cyclic": the clients split into num_clients / clients_per_round groups that take turns
    config.fed.cohort_sampling = "fixed"
    config.fed.cohort_capacity = 0
    config.fed.dropout = 0.0  # probability that a sampled client never reports in a round
    config.fed.rounds = 5
    config.fed.local_epochs = 1
    config.fed.batch_size = 8
    config.fed.optimizer = "adamw"
    config.fed.learning_rate = 1e-3
    config.fed.weight_decay = 0.0  # AdamW's decoupled weight decay (0: Adam)
    config.fed.fisher_floor = 1e-6  # FedNano / FedNano-EF: floor on the diagonal Fisher
    config.fed.fisher_examples = 0  # FedNano: examples of its first epoch the Fisher pass uses (0 = all)
    config.fed.fisher_example_weights = True  # FedNano: weight each client's Fisher by its examples |D_k| (Eq. 1)
    config.fed.prox_mu = 0.01  # FedProx: weight of mu/2 * ||adapters - global||^2
    config.fed.dpa_local_epochs = 1  # FedDPA-F: local fine-tuning of the local adapter after the rounds
    config.fed.dpa_instances = 5  # FedDPA-F: local training inputs compared with each test input
    config.fed.dpa_max_weight = 0.5  # FedDPA-F: largest weight the local adapter can get
    config.fed.server_optimizer = "none"  # or avgm, adagrad, adam, yogi: a step along the round's pseudo-gradient
    # its step size (optax's betas and epsilon); 0: the optimizer's own, avgm 1, adagrad 0.1, adam and yogi 0.01
    config.fed.server_learning_rate = 0.0
    config.fed.server_momentum = 0.9  # avgm's momentum
    config.fed.rank_aggregation = "masked"  # client_ranks: each rank slice over its holders, or HetLoRA's "zero_pad"
    # Client-level DP (DP-FedAvg, fednano_jax/privacy/dp.py): each client's update clipped to clip_norm, the
    # sums noised with noise_multiplier * clip_norm * the largest client's weight; epsilon at delta per round
    # from dp-accounting. FedNano rescales its Fisher to mean one per leaf and releases FedAvg's sum and the
    # Fisher's corrections to both sums of Eq. 1 (fednano_jax/privacy/dp.py).
    config.fed.dp = ConfigDict(dict(
        enabled=False, clip_norm=1.0, noise_multiplier=1.0, delta=1e-5,
        noise="auto",  # who adds the noise: "central" (the server), "distributed" (each client its share);
                       # "auto": distributed under fed.secure_aggregation, central otherwise
        fisher_noise_share=0.1,  # FedNano: the share of the noise budget its two Fisher corrections get
        fisher_mean_square=16.0,  # FedNano: its Fisher (mean one per leaf) clipped to this mean square
        target_epsilon=0.0,  # > 0: solve noise_multiplier for this epsilon over fed.rounds
        adaptive=False, target_quantile=0.5, clip_learning_rate=0.2,  # adaptive clipping (Andrew et al. 2021)
        count_stddev=0.0,  # adaptive: noise of the clipped count (0: clients_per_round / 20)
        accountant="rdp",  # or "pld"
        mechanism="gaussian",  # or "ftrl": DP-FTRL's BandMF noise, correlated over rounds (fed.cohort_sampling="cyclic")
        ftrl_bands=0))  # ftrl: BandMF's bands (0: the cycle, num_clients / clients_per_round)
    # Secure aggregation (Bonawitz et al. 2017, fednano_jax/privacy/secagg.py): the server sees masked uploads
    # and their sum only; threshold: the survivors needed to unmask (0: a majority of the cohort).
    config.fed.labels_on_client = False  # True: the server returns answer logits, the client computes the loss
    config.fed.wire_noise = 0.0  # std of Gaussian noise on the embeddings clients send the server (training)
    config.fed.secure_aggregation = False
    config.fed.secagg_threshold = 0
    config.fed.mode = "vmap"  # or "sequential": same adapters, one client at a time
    config.fed.client_chunk = 0  # clients each device trains at once (the rest wait their turn); 0 = all
    config.fed.pack_clients = True  # small clients one after another in a vmap lane: less padding, same adapters
    config.fed.pack_padding = 0.1  # packing: the most lanes whose padded steps stay within this share

    config.mesh = ConfigDict()  # devices: clients x model (-1 = the rest); see fednano_jax/parallel/mesh.py
    config.mesh.clients = -1  # the cohort is spread over this axis (padded with masked dummies if not divisible)
    config.mesh.model = 1  # backbone axis
    config.mesh.backbone = "replicated"  # or "fsdp": large frozen matrices sharded over the model axis
    config.mesh.fsdp_min_size = 2**20  # fsdp: matrices with fewer elements stay replicated
    # JAX on the CPU: 0 keeps XLA's one device of all cores; -1 makes a device of each core, so the clients train
    # on all cores at once (the README's first command; float rounding, and so the tables, move a little)
    config.mesh.cpu_devices = 0

    config.checkpoint = ConfigDict()
    config.checkpoint.every_rounds = 1  # server state + metrics to <workdir>/checkpoints/<method>; 0 = off
    config.checkpoint.keep = 3

    config.eval = ConfigDict()
    config.eval.batch_size = 200
    config.eval.max_new_tokens = 4
    config.eval.every_rounds = 1  # 0: evaluate after the last round only
    return config
