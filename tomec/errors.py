"""Errors raised by tomec: each names the problem and the numbers involved."""


class TomecError(Exception):
    """Base class of every error tomec raises on purpose."""


class ConfigError(TomecError, ValueError):
    """A bad argument to ``tomec.backend`` or an op (unknown method, negative r, bad option)."""


class ScheduleError(TomecError, ValueError):
    """A merge schedule that cannot be met on the model's token counts."""


class UnsupportedModelError(TomecError):
    """The traced graph is not something tomec can rewrite correctly."""


class UnsupportedDtypeError(TomecError, TypeError):
    """Activations in a dtype tomec has no ops for."""


class KernelCompileError(TomecError, RuntimeError):
    """A Triton kernel tomec would launch does not compile for the device (``impl="triton"``)."""
