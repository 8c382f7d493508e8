"""The one error a user's checkpoint can cause."""


class WeightsError(ValueError):
    """A checkpoint is missing, of an unsupported kind, or does not match its config."""
