"""Errors a user can fix. Each message is one line: what went wrong, where, and how to fix it."""


class PersonaLiveError(Exception):
    """Base class; entry scripts print the message and exit with code 2."""


class ConfigError(PersonaLiveError):
    """A config value is unknown, of the wrong type, or inconsistent with another."""


class WeightsNotFoundError(PersonaLiveError):
    """A weights file or folder is missing."""


class CheckpointError(PersonaLiveError):
    """A weights file is unreadable, unsafe, truncated, or has wrong keys or shapes."""


class NoFaceError(PersonaLiveError):
    """No face was found where one is needed."""


class ImageReadError(PersonaLiveError):
    """An image file is missing or cannot be decoded."""


class VideoReadError(PersonaLiveError):
    """A video file is missing, cannot be decoded, or has no frames."""


class ServerBusyError(PersonaLiveError):
    """Every stream slot of the server is taken."""


class BackendUnavailableError(PersonaLiveError):
    """An optional backend (xformers, CUDA, TensorRT, ONNX Runtime) was asked for but cannot run here."""


def reason(error: BaseException, limit: int = 160) -> str:
    """A one-line cause for a message built from any exception: the first non-blank line of its text (at most
    `limit` characters), or its type name when the text is empty or blank."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:limit] if lines else type(error).__name__
