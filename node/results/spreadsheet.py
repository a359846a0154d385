"""CSV files a person opens in a spreadsheet, written so that no cell runs what a sender wrote.

A header value is the sender's text: a PatientID ``=HYPERLINK("http://...")`` or an
AccessionNumber ``@SUM(1+1)`` in a CSV becomes a live formula in Excel, LibreOffice or Google
Sheets (CSV injection, OWASP). Every CSV the node writes goes through :func:`write_csv`: a text
cell that begins with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a leading
apostrophe, which spreadsheets show as text and do not evaluate, and the value stays
recognisable; numbers are written as numbers. :func:`read_cell` takes the apostrophe off again
where the node reads its own CSVs back (``xrayage cohort --results``). JSON and Parquet keep
values exact.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

# What a spreadsheet reads as the start of a formula (OWASP "CSV Injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
MARK = "'"


def safe_cell(value: Any) -> Any:
    """``value`` as a CSV cell that a spreadsheet shows and never evaluates (None: empty)."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return MARK + value
    return value


def read_cell(text: str) -> str:
    """A cell the node wrote, as the value it stood for."""
    if text.startswith(MARK) and text[1:].startswith(FORMULA_STARTS):
        return text[1:]
    return text


def write_csv(
    stream: TextIO, columns: Sequence[str], rows: Iterable[Mapping[str, Any] | Sequence[Any]]
) -> None:
    """A header of ``columns``, then ``rows`` (mappings by column, or sequences in order)."""
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        values = [row.get(c) for c in columns] if isinstance(row, Mapping) else list(row)
        writer.writerow([safe_cell(v) for v in values])
