import re

import numpy as np
import pytest

from fednano_jax.data.partition import Partition, dirichlet_partition, dirichlet_proportions, partition_by_proportions

NUM_CATEGORIES = 6
NUM_CLIENTS = 5


def make_categories(n: int = 3000, seed: int = 0) -> list[str]:
    labels = np.random.default_rng(seed).integers(NUM_CATEGORIES, size=n)
    return [f"category_{label}" for label in labels]


def mean_total_variation(categories: list[str], parts: list[np.ndarray]) -> float:
    """Mean over non-empty clients of TV(client category histogram, global histogram)."""
    labels = np.unique(categories, return_inverse=True)[1]
    global_hist = np.bincount(labels, minlength=NUM_CATEGORIES) / len(labels)
    distances = []
    for part in filter(len, parts):
        hist = np.bincount(labels[part], minlength=NUM_CATEGORIES) / len(part)
        distances.append(0.5 * np.abs(hist - global_hist).sum())
    return float(np.mean(distances))


def test_proportions_shape_and_rows_sum_to_one():
    proportions = dirichlet_proportions(NUM_CATEGORIES, NUM_CLIENTS, 0.5, seed=3)
    assert proportions.shape == (NUM_CATEGORIES, NUM_CLIENTS)
    assert np.all(proportions >= 0)
    np.testing.assert_allclose(proportions.sum(axis=1), 1.0)
    assert not np.allclose(proportions, proportions[0])  # rows are drawn independently


@pytest.mark.parametrize("alpha", [100.0, 1.0, 0.1])
def test_every_example_in_exactly_one_client(alpha):
    categories = make_categories()
    parts = dirichlet_partition(categories, NUM_CLIENTS, alpha, seed=1)
    assert len(parts) == NUM_CLIENTS
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)  # sorted, no duplicates within a client
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(categories)))


def test_deterministic_for_a_seed_and_different_across_seeds():
    categories = make_categories()
    first = dirichlet_partition(categories, NUM_CLIENTS, 1.0, seed=7)
    again = dirichlet_partition(categories, NUM_CLIENTS, 1.0, seed=7)
    other = dirichlet_partition(categories, NUM_CLIENTS, 1.0, seed=8)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other))


def test_shuffle_within_a_category_depends_on_the_seed():
    categories = ["a"] * 1000
    halves = np.array([[0.5, 0.5]])
    first = partition_by_proportions(categories, halves, ["a"], seed=0)
    other = partition_by_proportions(categories, halves, ["a"], seed=1)
    assert [len(p) for p in first] == [len(p) for p in other] == [500, 500]
    assert not np.array_equal(first[0], other[0])
    assert not np.array_equal(first[0], np.arange(500))  # not a contiguous block


def test_skew_grows_as_alpha_shrinks():
    categories = make_categories()

    def skew(alpha: float) -> float:
        return np.mean([mean_total_variation(categories, dirichlet_partition(categories, NUM_CLIENTS, alpha, seed))
                        for seed in range(8)])

    near_iid, moderate, skewed = skew(100.0), skew(1.0), skew(0.1)
    assert near_iid < 0.1 < moderate < skewed
    assert skewed > 0.5  # most clients hold only a few categories


def test_clients_have_unequal_sizes_at_alpha_one():
    sizes = [len(p) for p in dirichlet_partition(make_categories(), NUM_CLIENTS, 1.0, seed=2)]
    assert max(sizes) - min(sizes) > 0.1 * np.mean(sizes)


def test_partition_follows_given_proportions_per_category():
    categories = ["a"] * 100 + ["b"] * 10
    proportions = np.array([[0.25, 0.75], [1.0, 0.0]])  # rows follow category_order: "b", then "a"
    parts = partition_by_proportions(categories, proportions, ["b", "a"], seed=0)
    np.testing.assert_array_equal(parts[0][parts[0] < 100], np.arange(100))
    assert np.sum(parts[0] >= 100) == 2  # floor(0.25 * 10)
    assert np.all(parts[1] >= 100) and len(parts[1]) == 8


def test_same_proportions_give_clients_matching_shares_of_two_pools():
    proportions = dirichlet_proportions(NUM_CATEGORIES, NUM_CLIENTS, 0.3, seed=4)
    order = [f"category_{i}" for i in range(NUM_CATEGORIES)]
    train, test = make_categories(6000, seed=0), make_categories(2000, seed=1)
    train_parts = partition_by_proportions(train, proportions, order, seed=0)
    test_parts = partition_by_proportions(test, proportions, order, seed=1)
    for train_part, test_part in zip(train_parts, test_parts):
        assert abs(len(train_part) / len(train) - len(test_part) / len(test)) < 0.02


@pytest.mark.parametrize("num_clients, alpha", [(0, 1.0), (-1, 1.0), (5, 0.0), (5, -0.5), (5, float("nan"))])
def test_bad_clients_or_alpha_raise(num_clients, alpha):
    with pytest.raises(ValueError, match="Expected"):
        dirichlet_partition(make_categories(50), num_clients, alpha, seed=0)
    with pytest.raises(ValueError, match="Expected"):
        dirichlet_proportions(3, num_clients, alpha, seed=0)


def test_category_missing_from_order_raises():
    with pytest.raises(ValueError, match="missing"):
        partition_by_proportions(["a", "b", "c"], np.full((2, 2), 0.5), ["a", "b"], seed=0)


def test_bad_proportions_or_order_raise():
    with pytest.raises(ValueError, match="shape"):
        partition_by_proportions(["a", "b"], np.full((3, 2), 0.5), ["a", "b"], seed=0)
    with pytest.raises(ValueError, match="sum to 1"):
        partition_by_proportions(["a", "b"], np.full((2, 2), 0.4), ["a", "b"], seed=0)
    with pytest.raises(ValueError, match="once"):
        partition_by_proportions(["a"], np.full((2, 2), 0.5), ["a", "a"], seed=0)


# ------------------------------------------------------------------ data.partition: every partitioner
def fake_splits(num_train=600, num_test=200, seed=0):
    """Splits with 6 categories of uneven sizes and ScienceQA-like metadata (subject, grade)."""
    from fednano_jax.data.pipeline import Examples, Splits

    rng = np.random.default_rng(seed)
    categories = [f"topic{i}" for i in range(6)]

    def pool(count):
        cats = list(rng.choice(categories, size=count, p=[0.3, 0.25, 0.2, 0.12, 0.08, 0.05]))
        meta = [{"subject": f"s{categories.index(c) % 3}", "grade": f"grade{rng.integers(1, 9)}"} for c in cats]
        return Examples(["q"] * count, ["a"] * count, cats, np.zeros(count, np.int32), meta)

    return Splits(np.zeros((1, 1, 1, 3), np.uint8), pool(0), pool(num_train), pool(num_test), ["q", "a"],
                  tuple(categories))


def partitioned(partition, num_clients=5, seed=0, splits=None):
    from fednano_jax.data.pipeline import client_partition

    return client_partition(splits or fake_splits(), num_clients, partition, seed)


PARTITIONERS = [Partition(), Partition("iid"), Partition("pathological", categories_per_client=2),
                Partition("size_skew", size_exponent=1.0), Partition("natural", natural_key="grade")]


@pytest.mark.parametrize("partition", PARTITIONERS, ids=lambda p: p.kind)
def test_every_partitioner_covers_every_example_once_and_is_seeded(partition):
    splits = fake_splits()
    clients = partitioned(partition, splits=splits)
    for split, pool in (("train", splits.federated_train), ("test", splits.federated_test)):
        assert sorted(np.concatenate(clients[split]).tolist()) == list(range(len(pool)))
    again, other = partitioned(partition, splits=splits), partitioned(partition, seed=1, splits=splits)
    assert all(np.array_equal(a, b) for a, b in zip(clients["train"], again["train"]))
    same_for_another_seed = all(np.array_equal(a, b) for a, b in zip(clients["train"], other["train"]))
    assert same_for_another_seed == (partition.kind == "natural")  # the dataset's own groups: no random choice


def _category_shares(splits, rows):
    cats = np.array(splits.federated_train.categories)
    return np.array([(cats[r][:, None] == np.array(splits.category_order)).mean(axis=0) for r in rows])


def test_iid_clients_follow_the_global_category_mix_and_dirichlet_ones_do_not():
    splits = fake_splits(num_train=3000)
    overall = _category_shares(splits, [np.arange(3000)])[0]
    iid = np.abs(_category_shares(splits, partitioned(Partition("iid"), splits=splits)["train"]) - overall).max()
    skewed = np.abs(_category_shares(splits, partitioned(Partition(alpha=0.1), splits=splits)["train"])
                    - overall).max()
    assert iid < 0.01 < 0.2 < skewed


def test_pathological_clients_hold_only_their_categories():
    splits = fake_splits()
    clients = partitioned(Partition("pathological", categories_per_client=2), splits=splits)["train"]
    cats = np.array(splits.federated_train.categories)
    assert [len(set(cats[rows])) for rows in clients] == [2] * 5
    with pytest.raises(ValueError, match="cannot hold all 6 categories"):
        partitioned(Partition("pathological", categories_per_client=1), splits=splits)


def test_size_skew_sizes_follow_the_power_law_and_labels_stay_mixed():
    splits = fake_splits(num_train=3000)
    clients = partitioned(Partition("size_skew", size_exponent=1.0), splits=splits)["train"]
    sizes = np.sort([len(rows) for rows in clients])[::-1]
    np.testing.assert_allclose(sizes / sizes.sum(), (1 / np.arange(1, 6)) / (1 / np.arange(1, 6)).sum(), atol=0.01)
    overall = _category_shares(splits, [np.arange(3000)])[0]
    assert np.abs(_category_shares(splits, clients[:1]) - overall).max() < 0.02  # the largest client


def test_natural_groups_stay_whole_and_a_missing_key_is_named():
    splits = fake_splits()
    clients = partitioned(Partition("natural", natural_key="grade"), splits=splits)
    for split, pool in (("train", splits.federated_train), ("test", splits.federated_test)):
        owner = {}
        for client, rows in enumerate(clients[split]):
            for row in rows:
                assert owner.setdefault(pool.meta[row]["grade"], client) == client
    with pytest.raises(ValueError, match="fewer than fed.num_clients=5"):
        partitioned(Partition("natural", natural_key="subject"), splits=splits)  # 3 subjects
    with pytest.raises(ValueError, match="data.natural_key='subtask', which this dataset's examples do not carry"):
        partitioned(Partition("natural", natural_key="subtask"), splits=splits)


def test_dirichlet_redraws_until_every_client_has_its_minimum():
    splits = fake_splits(num_train=200)
    first_draw = partitioned(Partition(alpha=0.1), splits=splits)["train"]
    assert min(len(rows) for rows in first_draw) < 20  # the first draw is not enough ...
    clients = partitioned(Partition(alpha=0.1, min_client_size=20), splits=splits)["train"]
    assert min(len(rows) for rows in clients) >= 20  # ... a redraw is
    with pytest.raises(ValueError, match="No Dirichlet"):
        partitioned(Partition(alpha=0.1, min_client_size=60), splits=splits)


@pytest.mark.parametrize("key, value, message", [
    ("partition", "shards", "data.partition must be one of ['dirichlet', 'iid', 'pathological', 'size_skew', "
                            "'natural'], got 'shards'."),
    ("min_client_size", 0, "data.min_client_size must be at least 1, got 0."),
    ("size_exponent", -1.0, "data.size_exponent must be non-negative, got -1.0."),
])
def test_a_bad_partition_setting_is_one_clear_sentence(key, value, message):
    from configs.easyvqa_tiny import get_config
    from fednano_jax.config import read
    from fednano_jax.errors import ConfigError

    config = get_config()
    config.data[key] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        read(config)
