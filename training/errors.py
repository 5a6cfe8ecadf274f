"""Typed errors of the platform: each is one clear message for the user, never a traceback."""


class LLMOpsError(Exception):
    """Base of every error a user can cause; the CLI prints it on one line and exits non-zero."""

    exit_code = 2


class UnknownName(LLMOpsError, KeyError):
    """A task, dataset or scenario name that does not exist."""

    def __init__(self, kind: str, name: str, known: list[str]):
        super().__init__(f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(known))}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class BaseMismatch(LLMOpsError):
    """A LoRA adapter met a base other than the one it was trained on."""

    status = 409  # over HTTP: the configuration conflicts, the request itself is fine


class InvalidData(LLMOpsError, ValueError):
    """A dataset that cannot train or evaluate a model (empty, or missing a label)."""


class RegistryUnavailable(LLMOpsError, ConnectionError):
    """The MLflow tracking server cannot be reached; nothing was registered."""

    exit_code = 3


class TrainingFailed(LLMOpsError, RuntimeError):
    """The distributed fine-tune did not finish; nothing was registered."""

    exit_code = 4
