"""Slurm value formats: wall time and memory. Parsers return the normalised text or raise ValueError
with a message that says what to write."""
from __future__ import annotations

import re

TIME_FIX = ('write "04:00:00" (HH:MM:SS), "2-00:00:00" (D-HH:MM:SS) or minutes as a number '
            '(e.g. 240)')

# Slurm's accepted --time forms (sbatch(1)): MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_TIME_FORMS = [
    (re.compile(r"^(?P<m>\d+)$"), "MM"),
    (re.compile(r"^(?P<m>\d+):(?P<s>\d+)$"), "MM:SS"),
    (re.compile(r"^(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)$"), "HH:MM:SS"),
    (re.compile(r"^(?P<d>\d+)-(?P<h>\d+)$"), "D-HH"),
    (re.compile(r"^(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+)$"), "D-HH:MM"),
    (re.compile(r"^(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)$"), "D-HH:MM:SS"),
]
_UNLIMITED = {"unlimited", "infinite"}


def time_seconds(value: str) -> int | None:
    """Seconds in a normalised Slurm time (None for UNLIMITED)."""
    if value == "UNLIMITED":
        return None
    days, _, clock = value.rpartition("-")
    h, m, s = (int(x) for x in clock.split(":"))
    return ((int(days or 0) * 24 + h) * 60 + m) * 60 + s


def normalize_time(value: object) -> str:
    """Any Slurm --time form (or a number of minutes) -> "HH:MM:SS" or "D-HH:MM:SS".

    >>> normalize_time(90), normalize_time("1-2"), normalize_time("30:15")
    ('01:30:00', '1-02:00:00', '00:30:15')
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{value!r} is not a Slurm time")
    text = str(value).strip()
    if text.lower() in _UNLIMITED:
        return "UNLIMITED"
    for pattern, _form in _TIME_FORMS:
        match = pattern.match(text)
        if match:
            parts = {k: int(v) for k, v in match.groupdict().items() if v is not None}
            return _format_seconds(_to_seconds(parts, text))
    raise ValueError(f"{value!r} is not a Slurm time")


def _to_seconds(parts: dict[str, int], text: str) -> int:
    # Slurm lets the leading field overflow (90 minutes, 36:00:00) but not the inner ones.
    has_days = "d" in parts
    if has_days and parts.get("h", 0) > 23:
        raise ValueError(f"{text!r} has more than 23 hours after the day")
    inner = [k for k in ("m", "s") if k in parts and (has_days or "h" in parts or k == "s")]
    for key in inner:
        if parts[key] > 59:
            raise ValueError(f"{text!r} has a field above 59")
    total = ((parts.get("d", 0) * 24 + parts.get("h", 0)) * 60 + parts.get("m", 0)) * 60
    total += parts.get("s", 0)
    if total <= 0:
        raise ValueError(f"{text!r} is zero time")
    return total


def _format_seconds(total: int) -> str:
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    clock = f"{hours:02d}:{minutes:02d}:{seconds:02d}"
    return f"{days}-{clock}" if days else clock


MEM_FIX = 'write a whole number with a Slurm unit suffix: "64G", "500M", "1T" (no "B")'
_MEM = re.compile(r"^(?P<n>\d+)(?P<unit>[KMGT]?)$")


def normalize_mem(value: object) -> str:
    """Slurm --mem text: "64G", "64gb" -> "64G"; a bare number is megabytes ("4000" -> "4000M")."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{value!r} is not a Slurm memory size")
    text = str(value).strip().upper()
    if text.endswith("B") and len(text) > 1 and text[-2] in "KMGT":
        text = text[:-1]  # "64GB" is what people write; Slurm wants "64G".
    match = _MEM.match(text)
    if not match or int(match["n"]) == 0:
        raise ValueError(f"{value!r} is not a Slurm memory size")
    return f"{int(match['n'])}{match['unit'] or 'M'}"


def mem_bytes(value: str) -> int:
    """Bytes in a normalised memory text ("64G" -> 64 * 2**30)."""
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    return int(value[:-1]) * scale[value[-1]]
