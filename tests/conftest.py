import pytest


@pytest.fixture(scope="session")
def easy_vqa_dir(tmp_path_factory) -> str:
    """The real easy-VQA dataset, built once per test session (~15 s)."""
    from fednano_jax.data.easy_vqa_builder import prepared_builder

    data_dir = str(tmp_path_factory.mktemp("easy_vqa"))
    prepared_builder(data_dir)
    return data_dir
