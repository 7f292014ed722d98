"""The one exception type for bad user input (files, ids, options).

Command-line entry points turn it into a single ``error:`` line and a non-zero exit; every message names the offending
file or value and says how to fix it.
"""

from __future__ import annotations


class SemiInputError(ValueError):
    """Bad dataset layout, file or option given by the user."""
