"""The error a user's data causes: a path or file that cannot be used, said in one sentence."""


class DataError(ValueError):
    """A dataset path a user gave cannot be used."""
