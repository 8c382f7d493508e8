"""The experiment config as frozen, typed records: every setting's default and its own checks, in one place.

An ml_collections config is read once, at the edge (`config.read`), into an `Experiment`: one record per section
(`Data`, `Model` with its `Adapter`, `Pretrain`, `Fed` with its `Dp`, `Mesh`, `Checkpoint`, `Eval`). A key the
config lacks takes the default declared here; a key no record declares is an error. Each record checks its own
values when it is built and raises `ConfigError` with one sentence naming the setting and what was expected.
Checks that need the code's registries (a backbone family, the methods, the dataset formats' builders) run at the
edge, in `config.py`. A method's own hyperparameters (FedProx's `prox_mu`, ...) are records the method declares
(`Method.Hyperparameters`); they are read from the `fed` section too and kept in `Fed.hyperparameters`.

Code below the edge reads attributes (`experiment.fed.rounds`), never `config.get(key, default)`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from types import MappingProxyType
from typing import Any, Mapping

from ml_collections import ConfigDict, FrozenConfigDict

from fednano_jax.errors import ConfigError

# The names each implementing table is keyed by (a test checks each table names exactly these).
OPTIMIZERS = ("adamw", "adam", "sgd")  # the clients' (federated/client.make_optimizer)
MODES = ("vmap", "sequential")
NO_SERVER_OPTIMIZER = "none"
SERVER_OPTIMIZERS = ("avgm", "adagrad", "adam", "yogi")  # federated/server_optimizer.OPTIMIZERS
MASKED, ZERO_PAD = "masked", "zero_pad"
RANK_AGGREGATIONS = (MASKED, ZERO_PAD)  # models/adapter_ranks.py
AUTO, CENTRAL, DISTRIBUTED = "auto", "central", "distributed"
NOISE_PLACEMENTS = (AUTO, CENTRAL, DISTRIBUTED)  # privacy/dp.py
ACCOUNTANTS = ("rdp", "pld")  # privacy/accountant.py
GAUSSIAN, FTRL = "gaussian", "ftrl"
DP_MECHANISMS = (GAUSSIAN, FTRL)  # privacy/dp.py: DP-FedAvg's independent noise, or DP-FTRL's correlated noise
FIXED, POISSON, CYCLIC = "fixed", "poisson", "cyclic"
COHORT_SAMPLINGS = (FIXED, POISSON, CYCLIC)  # federated/schedule.py
PARTITIONS = ("dirichlet", "iid", "pathological", "size_skew", "natural")  # data/partition.py
DEFAULT_DATASET = "easyvqa"
DATASET_FORMATS = {"easyvqa": ("official",), "scienceqa": ("official", "parquet"), "iconqa": ("official",)}
REMAT_POLICIES = ("none", "full", "dots")  # models/llama.REMAT_POLICIES
DEFAULT_TEMPLATE = "llava"  # data/prompts.TEMPLATES
BACKBONE_LAYOUTS = ("replicated", "fsdp")  # parallel/mesh.py


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _frozen(value):
    """A free-form sub-section (a backbone family's shapes or files) as an immutable mapping; None stays None."""
    if isinstance(value, (ConfigDict, dict)):
        return FrozenConfigDict(value)
    return value


def plain(value):
    """A setting's value as plain Python (dicts, tuples, scalars) for JSON and fingerprints."""
    if isinstance(value, FrozenConfigDict):
        return value.as_configdict().to_dict()
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, Record):
        return value.as_dict()
    if dataclasses.is_dataclass(value):  # a method's hyperparameters
        return dataclasses.asdict(value)
    return value


class Record:
    """A frozen section: `read(section, path)` from a ConfigDict, `as_dict()` back (None-valued fields left out,
    as a config without them would have had)."""

    @classmethod
    def read(cls, section, path: str, **extra):
        section = section if section is not None else ConfigDict()
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in extra]
        _known_keys(section, names, path)
        values = {}
        for name in names:
            if name not in section:
                continue
            kind = hints[name]
            is_record = isinstance(kind, type) and issubclass(kind, Record)
            values[name] = kind.read(section[name], f"{path}.{name}") if is_record else _frozen(section[name])
        return cls(**values, **extra)

    def as_dict(self) -> dict:
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}

    def _set(self, name: str, value) -> None:  # normalising a value in __post_init__ of a frozen record
        object.__setattr__(self, name, value)


def _known_keys(section, names, path: str) -> None:
    """A key no record declares is a mistake (a typo in a config file): one sentence naming the closest key."""
    for key in section.keys():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {path}.{close[0]}?" if close else f"{path} holds {sorted(names)}."
            raise ConfigError(f"Unknown setting {path}.{key}; {hint}")


def _names(value) -> tuple[str, ...]:
    """A tuple in the file, or "a,b" on the command line."""
    items = [value] if isinstance(value, str) else list(value)
    return tuple(part.strip() for item in items for part in str(item).split(",") if part.strip())


def parse_client_ranks(value) -> tuple[int, ...]:
    """model.adapter.client_ranks as a tuple of ints: a tuple in the file, "16,8,4" or 16 on the command line."""
    if value is None or value == "" or value == ():
        return ()
    if isinstance(value, int):
        return (value,)
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        return tuple(int(str(part).strip()) for part in parts if str(part).strip())
    except ValueError:
        raise ConfigError(f"model.adapter.client_ranks must be ranks like 16,8,4, got {value!r}.") from None


# ------------------------------------------------------------------------------------------------------ data
@dataclasses.dataclass(frozen=True)
class Data(Record):
    name: str = DEFAULT_DATASET
    dir: str = "~/.cache/fednano_jax/tfds"  # where tfds builds easy-VQA
    root: str | None = None  # ScienceQA / IconQA: the directory holding the dataset's files
    format: str | None = None  # its layout (DATASET_FORMATS); None: "official"
    pretrain_images: int = 2000  # easy-VQA: training images held aside for backbone pretraining only
    pretrain_examples: int = 0  # ScienceQA / IconQA: training examples held aside for pretraining
    train_examples: int = 0  # federated training questions (0: all)
    test_examples: int = 0  # federated test questions (0: all)
    partition: str = "dirichlet"
    dirichlet_alpha: float = 1.0
    min_client_size: int = 1
    categories_per_client: int = 2
    size_exponent: float = 1.0
    natural_key: str = "subject"
    stream_images: bool = False

    def __post_init__(self):
        require(self.name in DATASET_FORMATS, f"data.name must be one of {sorted(DATASET_FORMATS)}, got {self.name!r}.")
        if self.name != DEFAULT_DATASET:  # data.root is checked for a run (config.validate): shapes need none
            require(self.data_format in DATASET_FORMATS[self.name],
                    f"data.format must be one of {list(DATASET_FORMATS[self.name])} for {self.name}, "
                    f"got {self.format!r}.")
        for key in ("pretrain_examples", "train_examples", "test_examples"):
            require(getattr(self, key) >= 0, f"data.{key} must be non-negative (0 = all), got {getattr(self, key)}.")
        require(self.partition in PARTITIONS, f"data.partition must be one of {list(PARTITIONS)}, got {self.partition!r}.")
        require(self.dirichlet_alpha > 0, f"data.dirichlet_alpha must be positive, got {self.dirichlet_alpha}.")
        require(self.min_client_size >= 1, f"data.min_client_size must be at least 1, got {self.min_client_size}.")
        require(self.categories_per_client >= 1,
                f"data.categories_per_client must be at least 1, got {self.categories_per_client}.")
        require(self.size_exponent >= 0, f"data.size_exponent must be non-negative, got {self.size_exponent}.")

    @property
    def data_format(self) -> str:
        return self.format or "official"


# ----------------------------------------------------------------------------------------------------- model
@dataclasses.dataclass(frozen=True)
class Adapter(Record):
    rank: int = 16
    alpha: float = 32.0
    image: bool = True  # A_I on the image tokens
    text: bool = True  # A_T on the text tokens
    client_ranks: tuple[int, ...] = ()  # heterogeneous ranks cycled over the clients (models/adapter_ranks.py)

    def __post_init__(self):
        self._set("client_ranks", parse_client_ranks(self.client_ranks))
        require(self.rank > 0, f"model.adapter.rank must be a positive integer, got {self.rank}.")
        require(self.alpha > 0, f"model.adapter.alpha must be positive, got {self.alpha}.")
        require(self.image or self.text, "At least one of model.adapter.image and model.adapter.text must be True.")
        require(all(1 <= r <= self.rank for r in self.client_ranks),
                f"model.adapter.client_ranks must be ranks between 1 and model.adapter.rank={self.rank}, "
                f"got {self.client_ranks}.")


def require_client_layers(client_layers, decoder_layers: int | None = None) -> None:
    """model.client_layers: a count from 0 to the decoder's layers (where they are known)."""
    most = "the decoder's number of layers" if decoder_layers is None else f"the decoder's {decoder_layers} layers"
    require(isinstance(client_layers, int) and not isinstance(client_layers, bool) and client_layers >= 0
            and (decoder_layers is None or client_layers <= decoder_layers),
            f"model.client_layers must be a whole number from 0 to {most}, got {client_layers!r}.")


@dataclasses.dataclass(frozen=True)
class Model(Record):
    """The backbone. `family` selects its registry entry (backbone/family/); the free-form sections (`vision`,
    `llm`, `qformer`, `minigpt4`) are that family's, checked by it at the edge."""

    family: str | None = None  # None: the family the other keys describe (backbone/family.derived_family)
    dtype: str = "float32"
    remat: str = "none"
    connector: str = "mlp2x_gelu"
    prompt: str | None = None  # a data/prompts.TEMPLATES name; None: DEFAULT_TEMPLATE
    path: str | None = None  # a checkpoint (Hugging Face directory or .gguf)
    vocab_size: int | None = None  # a checkpoint's vocabulary, for shape-only commands
    vision: Any = None
    llm: Any = None
    qformer: Any = None
    minigpt4: Any = None
    adapter: Adapter = Adapter()
    client_layers: int = 0  # the decoder's first layers, run frozen by each client: the wire carries their output
    scan_unroll: int = 1  # decoder layers per iteration of the layer scan: how the program runs, not what it computes

    def __post_init__(self):
        require(self.remat in REMAT_POLICIES, f"model.remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}.")
        require(isinstance(self.scan_unroll, int) and not isinstance(self.scan_unroll, bool) and self.scan_unroll >= 1,
                f"model.scan_unroll must be a whole number of decoder layers, at least 1, got {self.scan_unroll!r}.")
        require_client_layers(self.client_layers)

    @property
    def template(self) -> str:
        return self.prompt or DEFAULT_TEMPLATE


# -------------------------------------------------------------------------------------------------- pretrain
@dataclasses.dataclass(frozen=True)
class Pretrain(Record):
    seed: int = 0
    steps: int = 1000
    caption_repeats: int = 1
    questions_per_image: int = 3
    batch_size: int = 64
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    cache_dir: str = "~/.cache/fednano_jax/pretrained"
    shipped: bool = False  # use the backbone in backbone/shipped when these settings match

    def __post_init__(self):
        require(self.steps >= 0, f"pretrain.steps must be non-negative, got {self.steps}.")


# ------------------------------------------------------------------------------------------------------- fed
@dataclasses.dataclass(frozen=True)
class Dp(Record):
    """Client-level DP (privacy/dp.py)."""

    enabled: bool = False
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    noise: str = AUTO  # who adds the noise; auto: distributed under secure aggregation, central otherwise
    fisher_noise_share: float = 0.1  # FedNano: the share of the noise budget its two Fisher corrections get
    fisher_mean_square: float = 16.0  # FedNano: its Fisher (mean one per leaf) clipped to this mean square
    target_epsilon: float = 0.0  # > 0: solve noise_multiplier for this epsilon over fed.rounds
    adaptive: bool = False  # adaptive clipping (Andrew et al. 2021)
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    count_stddev: float = 0.0  # adaptive: noise of the clipped count (0: the cohort / 20)
    accountant: str = "rdp"
    mechanism: str = GAUSSIAN  # DP-FedAvg (fresh noise each round) or DP-FTRL (BandMF noise, correlated over rounds)
    ftrl_bands: int = 0  # ftrl: the bands of BandMF's matrix (0: the cycle of fed.cohort_sampling='cyclic')

    def __post_init__(self):
        if not self.enabled:
            return
        require(self.mechanism in DP_MECHANISMS,
                f"fed.dp.mechanism must be one of {list(DP_MECHANISMS)}, got {self.mechanism!r}.")
        require(self.ftrl_bands >= 0, f"fed.dp.ftrl_bands must be 0 (the cycle) or a positive count, got "
                f"{self.ftrl_bands}.")
        require(self.mechanism == FTRL or self.ftrl_bands == 0,
                "fed.dp.ftrl_bands applies only to fed.dp.mechanism='ftrl'; leave it at 0.")
        if self.mechanism == FTRL:
            require(not self.adaptive, "fed.dp.adaptive does not apply to fed.dp.mechanism='ftrl' (its clipped "
                    "count would be one more release to account); use a fixed fed.dp.clip_norm.")
            require(self.noise != DISTRIBUTED, "fed.dp.mechanism='ftrl' adds its correlated noise on the server; "
                    "set fed.dp.noise='central' (distributed shares of it are not implemented).")
        require(self.clip_norm > 0, f"fed.dp.clip_norm must be positive, got {self.clip_norm}.")
        require(self.accountant in ACCOUNTANTS,
                f"fed.dp.accountant must be one of {list(ACCOUNTANTS)}, got {self.accountant!r}.")
        require(self.noise in NOISE_PLACEMENTS,
                f"fed.dp.noise must be one of {list(NOISE_PLACEMENTS)}, got {self.noise!r}.")
        require(self.target_epsilon >= 0, f"fed.dp.target_epsilon must be non-negative (0: use "
                f"fed.dp.noise_multiplier), got {self.target_epsilon}.")
        require(0 < self.target_quantile < 1, f"fed.dp.target_quantile must be in (0, 1), got {self.target_quantile}.")
        require(0 < self.fisher_noise_share < 1,
                f"fed.dp.fisher_noise_share must be in (0, 1), got {self.fisher_noise_share}.")
        require(self.fisher_mean_square >= 1, f"fed.dp.fisher_mean_square must be at least 1 (a mean-one Fisher's "
                f"mean square), got {self.fisher_mean_square}.")


# The server optimizers' own step sizes, where fed.server_learning_rate is 0: Reddi et al. (2021) tune FedAdam
# and FedYogi near 1e-2 and FedAdagrad near 1e-1; FedAvgM keeps FedAvg's step of 1.
DEFAULT_SERVER_LEARNING_RATES = {"avgm": 1.0, "adagrad": 0.1, "adam": 0.01, "yogi": 0.01}


def automatic_capacity(expected: int, num_clients: int) -> int:
    """Poisson cohorts' slots: the expected cohort plus three standard deviations of its size. A larger draw (about
    one round in 700) is truncated to a random subset, which the accountant's truncated event accounts for."""
    q = expected / num_clients
    return min(num_clients, expected + math.ceil(3 * math.sqrt(expected * (1 - q))))


@dataclasses.dataclass(frozen=True)
class Fed(Record):
    """The federation and its rounds. Methods' own hyperparameters: `hyperparameters[name]`."""

    methods: tuple[str, ...] = ("fedavg", "fednano")
    num_clients: int = 5
    clients_per_round: int = 0  # 0: every client; under poisson sampling the expected cohort
    cohort_sampling: str = FIXED  # fixed-size cohorts, each client independently (poisson), or groups in turn (cyclic)
    cohort_capacity: int = 0  # poisson: the round program's client slots, a larger draw truncated (0: automatic)
    dropout: float = 0.0  # probability that a sampled client never reports in a round
    rounds: int = 5
    local_epochs: int = 1
    batch_size: int = 8
    optimizer: str = "adamw"
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    server_optimizer: str = NO_SERVER_OPTIMIZER
    server_learning_rate: float = 0.0  # 0: the server optimizer's own (DEFAULT_SERVER_LEARNING_RATES)
    server_momentum: float = 0.9  # avgm
    rank_aggregation: str = MASKED
    dp: Dp = Dp()
    labels_on_client: bool = False  # the server returns answer logits, the client computes the loss
    wire_noise: float = 0.0  # std of Gaussian noise on the embeddings clients send the server (training)
    secure_aggregation: bool = False
    secagg_threshold: int = 0  # survivors needed to unmask (0: a majority of the cohort)
    mode: str = "vmap"
    client_chunk: int = 0  # clients each device trains at once (0: all)
    pack_clients: bool = False  # small clients one after another in a vmap lane
    pack_padding: float = 0.1  # packing: the most lanes whose padded steps stay within this share
    hyperparameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # method name -> its record

    def __post_init__(self):
        self._set("methods", _names(self.methods))
        self._set("hyperparameters", MappingProxyType(dict(self.hyperparameters)))
        require(len(self.methods) > 0, "fed.methods must name at least one method.")
        require(self.num_clients >= 1, f"fed.num_clients must be at least 1, got {self.num_clients}.")
        require(self.rounds >= 1, f"fed.rounds must be at least 1, got {self.rounds}.")
        require(0 <= self.clients_per_round <= self.num_clients,
                f"fed.clients_per_round must be between 0 (all) and fed.num_clients={self.num_clients}, "
                f"got {self.clients_per_round}.")
        require(0.0 <= self.dropout < 1.0, f"fed.dropout must be a probability in [0, 1), got {self.dropout}.")
        require(self.local_epochs >= 1, f"fed.local_epochs must be at least 1, got {self.local_epochs}.")
        require(self.batch_size >= 1, f"fed.batch_size must be at least 1, got {self.batch_size}.")
        require(self.learning_rate > 0, f"fed.learning_rate must be positive, got {self.learning_rate}.")
        require(self.optimizer in OPTIMIZERS,
                f"fed.optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}.")
        require(self.weight_decay >= 0, f"fed.weight_decay must be non-negative, got {self.weight_decay}.")
        require(self.mode in MODES, f"fed.mode must be one of {list(MODES)}, got {self.mode!r}.")
        require(self.client_chunk >= 0,
                f"fed.client_chunk must be 0 (every client at once) or a positive count, got {self.client_chunk}.")
        require(0.0 <= self.pack_padding < 1.0, f"fed.pack_padding must be a share in [0, 1), got {self.pack_padding}.")
        choices = [NO_SERVER_OPTIMIZER, *sorted(SERVER_OPTIMIZERS)]
        require(self.server_optimizer in choices,
                f"fed.server_optimizer must be one of {choices}, got {self.server_optimizer!r}.")
        require(self.server_learning_rate >= 0, f"fed.server_learning_rate must be positive, or 0 for the server "
                f"optimizer's own default, got {self.server_learning_rate}.")
        require(0.0 <= self.server_momentum < 1.0, f"fed.server_momentum must be in [0, 1), got {self.server_momentum}.")
        require(self.rank_aggregation in RANK_AGGREGATIONS,
                f"fed.rank_aggregation must be one of {list(RANK_AGGREGATIONS)}, got {self.rank_aggregation!r}.")
        require(self.wire_noise >= 0, f"fed.wire_noise must be a non-negative std, got {self.wire_noise}.")
        self._check_cohort_sampling()
        if self.secure_aggregation:
            require(0 <= self.secagg_threshold <= self.cohort_size, f"fed.secagg_threshold must be between 0 "
                    f"(a majority) and the cohort size {self.cohort_size}, got {self.secagg_threshold}.")

    @classmethod
    def read(cls, section, path: str, declared: Mapping[str, type] | None = None):
        """`declared`: method name -> its hyperparameters' record class; their fields are read from this section."""
        declared = declared or {}
        own = {f.name for f in dataclasses.fields(cls)} - {"hyperparameters"}
        method_keys = {f.name for record in declared.values() for f in dataclasses.fields(record)}
        section = section if section is not None else ConfigDict()
        _known_keys(section, sorted(own | method_keys), path)
        hyperparameters = {name: record(**{f.name: _frozen(section[f.name]) for f in dataclasses.fields(record)
                                           if f.name in section})
                           for name, record in declared.items()}
        fed_only = ConfigDict({k: section[k] for k in section.keys() if k not in method_keys - own})
        return super().read(fed_only, path, hyperparameters=hyperparameters)

    @property
    def cohort_size(self) -> int:
        """The round program's client slots: the cohort, or under poisson sampling its capacity."""
        if self.cohort_sampling == POISSON:
            return self.cohort_capacity or automatic_capacity(self.clients_per_round, self.num_clients)
        return self.expected_cohort

    @property
    def expected_cohort(self) -> int:
        return self.clients_per_round or self.num_clients

    @property
    def cycle(self) -> int:
        """cyclic sampling: the rounds between a client's turns (the groups the clients are split into)."""
        return self.num_clients // self.expected_cohort

    def _check_cohort_sampling(self) -> None:
        sampling = self.cohort_sampling
        require(sampling in COHORT_SAMPLINGS,
                f"fed.cohort_sampling must be one of {list(COHORT_SAMPLINGS)}, got {sampling!r}.")
        require(sampling == FIXED or 0 < self.clients_per_round < self.num_clients,
                f"fed.cohort_sampling={sampling!r} needs fed.clients_per_round between 1 and fed.num_clients - 1 "
                f"(the expected cohort), got {self.clients_per_round}.")
        require(sampling == POISSON or self.cohort_capacity == 0,
                "fed.cohort_capacity applies only to fed.cohort_sampling='poisson'; leave it at 0.")
        if sampling == POISSON:
            require(self.cohort_capacity == 0 or self.clients_per_round <= self.cohort_capacity <= self.num_clients,
                    f"fed.cohort_capacity must be 0 (automatic) or between fed.clients_per_round="
                    f"{self.clients_per_round} and fed.num_clients={self.num_clients}, got {self.cohort_capacity}.")
            require(not self.secure_aggregation, "fed.cohort_sampling='poisson' runs a cohort of varying size in "
                    "fixed client slots, which secure aggregation's threshold does not model; use 'fixed'.")
        if sampling == CYCLIC:
            require(self.num_clients % self.clients_per_round == 0,
                    f"fed.cohort_sampling='cyclic' splits the clients into equal groups, so fed.num_clients="
                    f"{self.num_clients} must be a multiple of fed.clients_per_round={self.clients_per_round}.")
        if self.dp.enabled and self.dp.mechanism == FTRL:
            require(sampling == CYCLIC, "fed.dp.mechanism='ftrl' needs a minimum separation between a client's "
                    "turns: set fed.cohort_sampling='cyclic'.")
            require(not self.secure_aggregation, "fed.dp.mechanism='ftrl' adds its noise on the server, after the "
                    "sum: it does not run under fed.secure_aggregation.")
            require(self.dp.ftrl_bands <= self.cycle, f"fed.dp.ftrl_bands must be at most the cycle "
                    f"(fed.num_clients / fed.clients_per_round = {self.cycle}), got {self.dp.ftrl_bands}.")
        if self.dp.enabled and self.dp.accountant == "rdp":
            require(sampling != POISSON, "fed.cohort_sampling='poisson' truncates a draw beyond "
                    "fed.cohort_capacity, which only the PLD accountant accounts for: set fed.dp.accountant='pld'.")

    @property
    def effective_server_learning_rate(self) -> float:
        """fed.server_learning_rate, or the server optimizer's own where it is 0."""
        if self.server_learning_rate > 0:
            return self.server_learning_rate
        return DEFAULT_SERVER_LEARNING_RATES[self.server_optimizer]

    def of(self, method_name: str, record: type):
        """The hyperparameters of a method (its declared record), defaults where the section has none."""
        return self.hyperparameters[method_name] if method_name in self.hyperparameters else record()

    def as_dict(self) -> dict:
        out = super().as_dict()
        hyperparameters = out.pop("hyperparameters")
        for values in hyperparameters.values():
            out.update(values)
        return out


# ------------------------------------------------------------------------------------ mesh, checkpoint, eval
@dataclasses.dataclass(frozen=True)
class Mesh(Record):
    """Devices as clients x model (parallel/mesh.py): all on the clients axis, the backbone replicated."""

    clients: int = -1  # -1: the devices the model axis leaves
    model: int = 1
    backbone: str = "replicated"  # or "fsdp": large frozen matrices sharded over the model axis
    fsdp_min_size: int = 2**20
    cpu_devices: int = 0  # JAX on the CPU: 0 XLA's own (one device of all cores), n devices, -1 one per core

    def __post_init__(self):
        require(self.backbone in BACKBONE_LAYOUTS,
                f"mesh.backbone must be one of {list(BACKBONE_LAYOUTS)}, got {self.backbone!r}.")
        require(isinstance(self.cpu_devices, int) and not isinstance(self.cpu_devices, bool) and self.cpu_devices >= -1,
                f"mesh.cpu_devices must be 0 (XLA's own), a number of devices or -1 (one per CPU core), "
                f"got {self.cpu_devices!r}.")


@dataclasses.dataclass(frozen=True)
class Checkpoint(Record):
    every_rounds: int = 1  # 0: off
    keep: int = 3

    def __post_init__(self):
        require(self.every_rounds >= 0, f"checkpoint.every_rounds must be non-negative, got {self.every_rounds}.")
        require(self.keep >= 1, f"checkpoint.keep must be at least 1, got {self.keep}.")


@dataclasses.dataclass(frozen=True)
class Eval(Record):
    batch_size: int = 200
    max_new_tokens: int = 4
    every_rounds: int = 1  # 0: after the last round only

    def __post_init__(self):
        require(self.batch_size >= 1, f"eval.batch_size must be at least 1, got {self.batch_size}.")
        require(self.every_rounds >= 0, f"eval.every_rounds must be non-negative, got {self.every_rounds}.")


@dataclasses.dataclass(frozen=True)
class Experiment(Record):
    name: str = "experiment"
    seed: int = 0  # federated randomness: question sample, partition, shuffling, dropout
    data: Data = Data()
    model: Model = Model()
    pretrain: Pretrain = Pretrain()
    fed: Fed = Fed()
    mesh: Mesh = Mesh()
    checkpoint: Checkpoint = Checkpoint()
    eval: Eval = Eval()

    @classmethod
    def read(cls, config, path: str = "config", declared: Mapping[str, type] | None = None):
        """`config`: an ml_collections ConfigDict; `declared`: the methods' hyperparameter records."""
        require(isinstance(config, ConfigDict), f"An experiment config is an ml_collections ConfigDict, "
                f"got {type(config).__name__}.")
        _known_keys(config, [f.name for f in dataclasses.fields(cls)], path)
        values = {name: config[name] for name in ("name", "seed") if name in config}
        for name in ("data", "model", "pretrain", "mesh", "checkpoint", "eval"):
            values[name] = typing.get_type_hints(cls)[name].read(config.get(name), name)
        values["fed"] = Fed.read(config.get("fed"), "fed", declared)
        return cls(**values)

    def replace(self, **sections) -> "Experiment":
        """A copy with some sections' fields replaced: `replace(fed={"methods": ("fedavg",)})`."""
        return dataclasses.replace(self, **{name: dataclasses.replace(getattr(self, name), **fields)
                                            for name, fields in sections.items()})
