"""The errors a user's input causes, each said in one sentence, and the label a command prints before it.

Commands catch exactly these (`LABELS`) and print `<label>: <sentence>` instead of a traceback.
"""


class ConfigError(ValueError):
    """A config value a user set is impossible."""


class MeshError(ConfigError):
    """A mesh shape the devices cannot form."""


class DataError(ValueError):
    """A dataset path a user gave cannot be used."""


class WeightsError(ValueError):
    """A checkpoint is missing, of an unsupported kind, or does not match its config."""


class CheckpointMismatch(ValueError):
    """A round checkpoint was written by a run with other settings."""


class SplitStepError(RuntimeError):
    """A request of the split link (a step, a decoding) that the split-step server refused or could not be reached
    for."""


class ClientProcessError(RuntimeError):
    """A client process (`main --split_server`) that could not start, or a round that no client finished."""


LABELS = {ConfigError: "Config error", MeshError: "Config error", DataError: "Data error",
          WeightsError: "Checkpoint error", CheckpointMismatch: "Checkpoint error",
          ClientProcessError: "Client error", SplitStepError: "Split link error"}


def label_of(error: Exception) -> str:
    return next(label for kind, label in LABELS.items() if isinstance(error, kind))
