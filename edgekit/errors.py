"""Typed errors. Every message is one line: what was wrong, the valid choices, the fix.

Only ``edgekit.cli`` turns these into printed lines and exit codes; library code raises them and the
on-device runtime never exits the process.
"""

from __future__ import annotations


class EdgekitError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 2


# --- bad input (exit 2) --------------------------------------------------------------------------
class UserInputError(EdgekitError):
    """The user asked for something that cannot be done as asked."""


class ModelNotFound(UserInputError):
    pass


class ModelFormatError(UserInputError):
    """A config.json, safetensors shard or GGUF file that cannot be read as a model."""


class UnsupportedArchitecture(UserInputError):
    pass


class UnsupportedQuantType(UserInputError):
    pass


class UnknownTarget(UserInputError):
    pass


class UnsupportedPrecision(UserInputError):
    pass


class HubUnavailable(UserInputError):
    """A hub id was given but the hub cannot be reached (offline, or no such repository)."""


class BundleError(UserInputError):
    """A bundle that is missing, malformed, tampered with, or for another target/backend."""


class OutputError(UserInputError):
    """The output cannot be written (no space left, not writable, exists)."""


# --- does not fit (exit 3) -----------------------------------------------------------------------
class DoesNotFit(EdgekitError):
    """The planner says the model does not fit the target's memory budget."""

    exit_code = 3


class BudgetExceeded(EdgekitError):
    """The runtime refused to allocate: what the bundle needs exceeds what is available."""

    exit_code = 3

    def __init__(self, message: str, *, needed_bytes: int = 0, available_bytes: int = 0,
                 max_context: int | None = None):
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes
        self.max_context = max_context


# --- runtime ------------------------------------------------------------------------------------
class GenerationError(EdgekitError):
    """Bad generation request (prompt too long, invalid sampling values) or a failed step."""


class PromptTooLong(GenerationError):
    """The rendered prompt has more characters than allowed (``limit``), found before tokenizing it."""

    def __init__(self, message: str, *, limit: int = 0):
        super().__init__(message)
        self.limit = limit


class ToolError(GenerationError):
    """A tool definition, tool choice or tool message is invalid; ``param`` names the field
    (``tools[0].function.parameters``, ``tool_choice``, ``messages[3].tool_call_id``)."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param


class BackendUnavailable(EdgekitError):
    """The requested backend (CUDA, TensorRT) is not usable on this machine."""


class GpuStepFailed(GenerationError):
    """TensorRT or CUDA failed while doing its work (engine build, a decode step): a device failure, exit 1."""

    exit_code = 1


class Cancelled(EdgekitError):
    pass


# --- devices (exit 1): edgekit flash ------------------------------------------------------------
class DeviceError(EdgekitError):
    """One device could not be deployed to; the other devices of the same command carry on."""

    exit_code = 1

    def __init__(self, message: str, *, device: str | None = None):
        super().__init__(message)
        self.device = device


class DeviceUnreachable(DeviceError):
    """ssh could not connect or log in: unknown host, refused or timed-out connection, refused key, host key."""


class DeviceMismatch(DeviceError):
    """The device cannot run or hold the bundle (architecture, JetPack, GPU, disk space); nothing was copied."""


class DeployFailed(DeviceError):
    """Transfer, on-device verification, engine build or smoke test failed; ``current`` stays on a good release."""


# --- structured output ---------------------------------------------------------------------------
class FormatError(UserInputError):
    """An answer format that cannot be used: a JSON schema that is not an object, uses what the constraint
    library does not support, or has a bad $ref; an empty Choice ... ``field`` names where it was given
    (``response_format.json_schema.schema``, ``format``, ``tools``, ``answer_format``)."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field


class FormatUnavailable(UserInputError):
    """Structured output was asked for but cannot run here: the constraint library is not installed, or it
    cannot map this bundle's tokenizer."""
