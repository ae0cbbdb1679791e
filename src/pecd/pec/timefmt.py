"""One instant per transmission, rendered every way the PEC rules need it (spec section 6)."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from zoneinfo import ZoneInfo

ROME = ZoneInfo("Europe/Rome")

_ZONA_RE = re.compile(r"^([+-])(\d{2}):?(\d{2})$")


@dataclass(frozen=True, slots=True)
class PecTime:
    """An event instant with its Italian legal-time renderings.

    Built once per transmission (``pec_time``) and used for the log, the text, the daticert and ``Date:``.
    """

    instant: datetime  # aware, UTC, whole seconds

    def __post_init__(self) -> None:
        if self.instant.tzinfo is None:
            raise ValueError("PecTime needs an aware datetime")

    @property
    def local(self) -> datetime:
        return _local(self.instant)

    @property
    def giorno(self) -> str:
        """``dd/mm/yyyy`` in Italian legal time."""
        return _renderings(self.instant)[0]

    @property
    def ora(self) -> str:
        """``hh:mm:ss`` in Italian legal time."""
        return _renderings(self.instant)[1]

    @property
    def zona(self) -> str:
        """Offset of local time from UTC as ``+HHMM`` (``+0100`` in winter, ``+0200`` in summer)."""
        return _renderings(self.instant)[2]

    @property
    def text_zone(self) -> str:
        """The offset as real messages print it in their text: ``(+0100)``."""
        return f"({self.zona})"

    @property
    def rfc5322(self) -> str:
        """The ``Date:`` header value for the same instant, in Italian local time."""
        return _renderings(self.instant)[3]

    @property
    def compact(self) -> str:
        """``YYYYMMDDhhmmss`` in local time, as used inside message ids."""
        return _renderings(self.instant)[4]


# Every message about an event renders its instant a dozen times (text, daticert, Date:, ids):
# each rendering of the last instants is made once.
@functools.lru_cache(maxsize=64)
def _local(instant: datetime) -> datetime:
    return instant.astimezone(ROME)


@functools.lru_cache(maxsize=64)
def _renderings(instant: datetime) -> tuple[str, str, str, str, str]:
    local = _local(instant)
    return (
        local.strftime("%d/%m/%Y"),
        local.strftime("%H:%M:%S"),
        format_zona(local.utcoffset() or timedelta(0)),
        format_datetime(local),
        local.strftime("%Y%m%d%H%M%S"),
    )


def pec_time(instant: datetime) -> PecTime:
    """Normalise ``instant`` (aware) to UTC with whole seconds: seconds are the finest unit in PEC."""
    if instant.tzinfo is None:
        raise ValueError("pec_time needs an aware datetime (take it from the Clock)")
    return PecTime(instant.astimezone(UTC).replace(microsecond=0))


def format_zona(offset: timedelta) -> str:
    total = int(offset.total_seconds()) // 60
    sign = "+" if total >= 0 else "-"
    total = abs(total)
    return f"{sign}{total // 60:02d}{total % 60:02d}"


def parse_zona(zona: str) -> timedelta:
    """Accept ``+0100`` and ``+01:00`` (the RFC's ABNF); raise ValueError otherwise."""
    m = _ZONA_RE.match(zona.strip())
    if not m:
        raise ValueError(f"not a time zone offset: {zona!r}")
    minutes = int(m.group(2)) * 60 + int(m.group(3))
    return timedelta(minutes=minutes if m.group(1) == "+" else -minutes)


def parse_daticert_time(giorno: str, ora: str, zona: str) -> datetime:
    """The aware instant a daticert ``<data>`` describes."""
    naive = datetime.strptime(f"{giorno.strip()} {ora.strip()}", "%d/%m/%Y %H:%M:%S")
    return (naive - parse_zona(zona)).replace(tzinfo=UTC)
