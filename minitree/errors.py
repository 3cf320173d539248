"""The errors meant for users. Each message is one sentence; the CLIs print it as one `error:`
line and exit with status 1 (cli.py). Anything else is a bug, and keeps its traceback."""

from __future__ import annotations


class MinitreeError(Exception):
    """Base of every user-facing error."""


class ConfigError(MinitreeError, ValueError):
    """A checkpoint's config that minitree cannot use."""


class LoadError(MinitreeError, ValueError):
    """A checkpoint minitree cannot load."""


class FetchError(MinitreeError, RuntimeError):
    """A model that could not be fetched."""


class TreeError(MinitreeError, ValueError):
    """A malformed tree."""


class SamplingError(MinitreeError, ValueError):
    """Invalid sampling parameters."""


class EngineError(MinitreeError, ValueError):
    """Bad input to the engine or a runner (a prompt too long, an option out of range, ...)."""
