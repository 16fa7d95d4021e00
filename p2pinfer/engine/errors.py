"""Every failure the engine reports on purpose is an EngineError subclass with a message naming the file or limit."""


class EngineError(Exception):
    """Base class: the caller can catch this and report it to a client as-is."""


class UnknownModelError(EngineError, KeyError):
    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else "unknown model"


class ModelFileError(EngineError):
    """A model file is missing, truncated or not what its extension says."""


class UnsupportedModelError(EngineError):
    """The file is readable but uses an architecture, quantization or option this engine does not implement."""


class SessionLimitError(EngineError):
    """No room for another session: max_sessions or the KV memory budget is used up."""


class ContextLimitError(EngineError):
    """A session asked for (or was fed) more tokens than the shard's context allows."""


class UnknownSessionError(EngineError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown session"
