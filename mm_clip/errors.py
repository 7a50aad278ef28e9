"""The one exception type the CLIP task raises for bad user input (turned into a one-line exit)."""
from __future__ import annotations


class InputError(ValueError):
    """A command-line input is missing or wrong; the message names the problem and the fix."""
