"""The conversion's error type, in its own module so the tables and the config code both use it
without importing each other."""

from megatron_ext.errors import UserError


class ConversionError(UserError):
    """Bad or unsupported input; the message names the field or tensor and what to do."""
