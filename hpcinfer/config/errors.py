"""The one exception the config layer raises: where, what, and what to write instead."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ConfigError(Exception):
    """A job file (or profile, or ``--set``) problem the user must fix.

    ``str(e)`` is a single line, e.g.::

        job.yaml:12: resources.time: '4h' is not a Slurm time; write "04:00:00" (HH:MM:SS), ...

    ``file`` is the file (or ``--set k=v`` override) the offending value came from, ``line`` its
    1-based line (None when it has none), ``key_path`` the dotted path (``input.path.0`` for list
    items), ``problem`` what is wrong and ``fix`` what to write instead. The CLI prints ``str(e)``
    and exits 2.
    """

    file: str
    line: int | None
    key_path: str
    problem: str
    fix: str = ""

    def __post_init__(self) -> None:
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        head = f"{where}: {self.key_path}: " if self.key_path else f"{where}: "
        text = head + self.problem
        if self.fix:
            text += "; " + self.fix
        # One line, always: a newline in a user value must not split the message.
        return text.replace("\r", "\\r").replace("\n", "\\n")

    # dataclass(eq=True) would make it unhashable; exceptions are compared by identity.
    __hash__ = Exception.__hash__
