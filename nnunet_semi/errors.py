"""The exceptions the command-line entry points report: bad user input (files, ids, options) as a single
``error:`` line and exit code 2, every message naming the offending file or value and the fix; runs that failed
while a command went on, listed at its end with exit code 1.
"""

from __future__ import annotations


class SemiInputError(ValueError):
    """Bad dataset layout, file or option given by the user."""


class SemiRunsFailed(RuntimeError):
    """Some runs of a command failed while the others went on; the command ends with exit code 1.

    Args:
        failures: one ``"<run>: <error> (log: <path>)"`` line per failed run.
    """

    def __init__(self, failures: list[str]):
        super().__init__(f"{len(failures)} run(s) failed:\n" + "\n".join(f"  {line}" for line in failures))
        self.failures = failures
