"""Self-contained HTML for Titanax's reports: escaping, a table, a stacked bar, a page, and
:class:`Report`, a text report that also renders as HTML.

Everything here is plain strings: inline CSS, no JavaScript, nothing fetched from the network, so
a saved report opens anywhere (a browser, a notebook, an e-mail attachment). Each part carries
``tx-*`` classes that tests and stylesheets can select (``tr.tx-param``, ``td.tx-tick``,
``div.tx-seg``).

Example:
  >>> print(table(("name", "bytes"), [("kernel", "128 B")], row_class="tx-param"))
  <table class="tx-table"><thead><tr><th>name</th><th>bytes</th></tr></thead><tbody>
  <tr class="tx-param"><td>kernel</td><td>128 B</td></tr>
  </tbody></table>
"""

from __future__ import annotations

import html as _html
import os
import pathlib
from typing import Any
from collections.abc import Collection, Iterable, Mapping, Sequence

from titanax.exceptions import TitanaxError
from titanax.units import human_bytes

__all__ = ["CSS", "Report", "bar", "classes", "escape", "fragment", "numeric_columns", "page", "pre", "save_html",
           "section", "table"]

CSS = """
.tx-report{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;font-size:14px;color:#1d2330;
  max-width:100%;line-height:1.4}
.tx-report h1{font-size:20px;margin:0 0 12px}
.tx-report h2{font-size:16px;margin:20px 0 8px;border-bottom:1px solid #d8dce5;padding-bottom:4px}
.tx-report pre{background:#f5f6f8;padding:8px 10px;border-radius:4px;overflow-x:auto;font-size:12px;margin:4px 0}
.tx-report .tx-scroll{overflow-x:auto}
.tx-report table.tx-table{border-collapse:collapse;font-size:12px}
.tx-report table.tx-table th,.tx-report table.tx-table td{padding:3px 8px;border-bottom:1px solid #e6e8ee;
  text-align:left;white-space:nowrap}
.tx-report table.tx-table th{background:#eef0f4;font-weight:600}
.tx-report table.tx-table td.tx-num{text-align:right;font-variant-numeric:tabular-nums}
.tx-report table.tx-table td.tx-mono{font-family:ui-monospace,Menlo,Consolas,monospace}
.tx-report tr.tx-state td{color:#6b7280}
.tx-report tr.tx-replicated td.tx-spec{color:#b45309}
.tx-report .tx-bar-row{display:flex;align-items:center;gap:10px;margin:6px 0}
.tx-report .tx-bar-label{width:150px;flex:none;font-size:12px}
.tx-report .tx-bar{position:relative;flex:1;max-width:760px;height:22px;background:#eef0f4;border-radius:3px;
  display:flex;overflow:visible}
.tx-report .tx-seg{height:100%;min-width:1px}
.tx-report .tx-cap{position:absolute;top:-3px;bottom:-3px;width:2px;background:#b91c1c}
.tx-report .tx-legend{font-size:12px;margin:2px 0 8px 160px}
.tx-report .tx-legend span.tx-key{display:inline-block;margin-right:14px}
.tx-report .tx-swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:4px;
  vertical-align:middle}
.tx-report table.tx-gantt{border-collapse:separate;border-spacing:1px;font-size:10px}
.tx-report table.tx-gantt th{font-weight:normal;color:#6b7280;padding:0 4px;text-align:right}
.tx-report table.tx-gantt thead th{text-align:center;padding:0}
.tx-report td.tx-tick{min-width:20px;height:20px;text-align:center;padding:0 2px;color:#fff;
  font-family:ui-monospace,Menlo,Consolas,monospace}
.tx-report td.tx-idle{background:#eceef2;color:#9ca3af}
.tx-report td.tx-fwd{background:#2563eb}
.tx-report td.tx-bwd{background:#ea580c}
.tx-report td.tx-w{background:#16a34a}
.tx-report td.tx-fwd.tx-bwd{background:linear-gradient(135deg,#2563eb 50%,#ea580c 50%)}
.tx-report td.tx-fwd.tx-w{background:linear-gradient(135deg,#2563eb 50%,#16a34a 50%)}
.tx-report td.tx-bwd.tx-w{background:linear-gradient(135deg,#ea580c 50%,#16a34a 50%)}
.tx-report td.tx-fwd.tx-bwd.tx-w{background:linear-gradient(135deg,#2563eb 33%,#ea580c 33% 66%,#16a34a 66%)}
.tx-report .tx-key-fwd{background:#2563eb}
.tx-report .tx-key-bwd{background:#ea580c}
.tx-report .tx-key-w{background:#16a34a}
.tx-report .tx-key-idle{background:#eceef2}
.tx-report .tx-note{color:#6b7280;font-size:12px;margin:4px 0}
"""
"""The stylesheet every report inlines; rules are scoped under ``.tx-report`` so that a report
shown in a notebook restyles nothing else."""

# Colours of the stacked bars' segments, in order.
_PALETTE = ("#2563eb", "#7c3aed", "#0891b2", "#ea580c", "#ca8a04", "#db2777", "#16a34a", "#64748b")


def escape(value: object) -> str:
    """``str(value)`` with ``& < > " '`` escaped, safe as HTML text and attribute values.

    Example:
      >>> escape("P('data', None) <x>")
      'P(&#x27;data&#x27;, None) &lt;x&gt;'
    """
    return _html.escape(str(value), quote=True)


def table(header: Sequence[object], rows: Iterable[Sequence[object]], *, row_class: str | None = None,
          row_classes: Sequence[str] | None = None, cell_classes: Sequence[str] | None = None,
          row_attrs: Sequence[Mapping[str, object]] | None = None) -> str:
    """An HTML table, every cell escaped.

    Args:
      header: the column titles.
      rows: one sequence of values per row (``str()`` of each value is shown).
      row_class: a class for every row (``"tx-param"``).
      row_classes: a class per row, overriding ``row_class``.
      cell_classes: a class per column (``"tx-num"`` aligns numbers right), or ``""``.
      row_attrs: per row, ``data-*`` attributes: ``{"kind": "all-reduce"}`` is ``data-kind="all-reduce"``.

    Returns:
      ``<table class="tx-table">...</table>``.
    """
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    lines = [f'<table class="tx-table"><thead><tr>{head}</tr></thead><tbody>']
    for i, row in enumerate(rows):
        cls = row_classes[i] if row_classes is not None else row_class
        cells = []
        for j, value in enumerate(row):
            cell_cls = cell_classes[j] if cell_classes is not None and j < len(cell_classes) else ""
            cells.append(f'<td class="{cell_cls}">' if cell_cls else "<td>")
            cells.append(f"{escape(value)}</td>")
        attr = f' class="{escape(cls)}"' if cls else ""
        if row_attrs is not None:
            attr += "".join(f' data-{escape(k)}="{escape(v)}"' for k, v in row_attrs[i].items())
        lines.append(f"<tr{attr}>{''.join(cells)}</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def bar(label: str, segments: Sequence[tuple[str, int]], *, capacity: int | None = None,
        capacity_label: str = "device memory") -> str:
    """A stacked horizontal bar of byte counts, with a legend.

    The bar's full width is ``capacity`` when it is known and at least the sum of the segments;
    otherwise the sum, and a red mark shows where ``capacity`` ends (the segments overflow it).

    Args:
      label: what the bar measures (``"one device"``).
      segments: ``(name, bytes)`` in drawing order; zero-byte segments are left out.
      capacity: the memory the segments are held against, or ``None`` when unknown.
      capacity_label: how the legend names ``capacity``.

    Returns:
      ``<div class="tx-bar-row">`` with one ``<div class="tx-seg" data-bytes=...>`` per segment,
      then the legend.

    Raises:
      TitanaxError: a negative byte count or capacity.

    Example:
      >>> html = bar("one device", [("parameters", 3 << 20), ("optimizer state", 6 << 20)], capacity=16 << 20)
      >>> html.count('class="tx-seg"'), 'style="width:18.750%' in html
      (2, True)
    """
    for name, n in [*segments, ("capacity", capacity or 0)]:
        if int(n) < 0:
            raise TitanaxError(f"bar {label!r}: {name} has a negative byte count {n}",
                               suggestion="pass byte counts >= 0")
    shown = [(name, int(n)) for name, n in segments if int(n) > 0]
    total = sum(n for _, n in shown)
    scale = max(total, capacity or 0) or 1
    colours = {name: _PALETTE[i % len(_PALETTE)] for i, (name, _) in enumerate(segments)}
    parts = [f'<div class="tx-bar-row"><div class="tx-bar-label">{escape(label)}</div>'
             f'<div class="tx-bar" data-total="{total}"'
             + (f' data-capacity="{int(capacity)}"' if capacity else "") + ">"]
    for name, n in shown:
        parts.append(f'<div class="tx-seg" data-name="{escape(name)}" data-bytes="{n}" '
                     f'style="width:{100 * n / scale:.3f}%;background:{colours[name]}" '
                     f'title="{escape(name)}: {escape(human_bytes(n))}"></div>')
    if capacity and total > capacity:
        parts.append(f'<div class="tx-cap" style="left:{100 * capacity / scale:.3f}%" '
                     f'title="{escape(capacity_label)}: {escape(human_bytes(capacity))}"></div>')
    parts.append("</div></div>")
    keys = [f'<span class="tx-key"><span class="tx-swatch" style="background:{colours[name]}"></span>'
            f"{escape(name)} {escape(human_bytes(n))}</span>" for name, n in shown]
    summary = f"total {human_bytes(total)}"
    if capacity:
        summary += (f" of {capacity_label} ({human_bytes(capacity)}): {100 * total / capacity:.0f}%"
                    + (" — does not fit" if total > capacity else ""))
    keys.append(f'<span class="tx-key">{escape(summary)}</span>')
    parts.append(f'<div class="tx-legend">{"".join(keys)}</div>')
    return "".join(parts)


def pre(text: str) -> str:
    """Preformatted text (a text report kept as it prints)."""
    return f"<pre>{escape(text)}</pre>"


def section(title: str, body: str, *, name: str) -> str:
    """A titled part of a report: ``<section class="tx-section" data-part=name>``."""
    return (f'<section class="tx-section" data-part="{escape(name)}"><h2>{escape(title)}</h2>\n'
            f"{body}\n</section>")


def fragment(body: str) -> str:
    """``body`` with the stylesheet, to embed in a page that is not a report (a notebook cell)."""
    return f'<div class="tx-report"><style>{CSS}</style>\n{body}\n</div>'


def page(title: str, body: str) -> str:
    """A complete, self-contained HTML document: ``title`` as heading, then ``body``."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{CSS}</style></head>\n"
            f'<body><div class="tx-report"><h1>{escape(title)}</h1>\n{body}\n</div></body></html>\n')


class Report(str):
    """A text report (what ``print`` shows) that also renders as HTML.

    It *is* the text: ``in``, ``splitlines()``, ``print`` and comparisons work as on ``str``.
    In a notebook it displays as HTML (``_repr_html_``).

    Args:
      text: the text form.
      body: the HTML form's body (sections built with this module's helpers).
      title: the page's title.

    Example:
      >>> report = Report("2 arrays", "<p>2 arrays</p>", title="Layout")
      >>> report.splitlines(), report.html().startswith("<!DOCTYPE html>")
      (['2 arrays'], True)
    """

    body: str
    title: str

    def __new__(cls, text: str, body: str, *, title: str = "Titanax report") -> Report:
        self = super().__new__(cls, text)
        self.body = body
        self.title = title
        return self

    def __reduce__(self):  # pickles (and copies) with its HTML
        return (_rebuild, (str(self), self.body, self.title))

    def __str__(self) -> str:
        return str.__str__(self)

    def html(self) -> str:
        """The report as a complete, self-contained HTML page (inline CSS, no scripts)."""
        return page(self.title, self.body)

    def _repr_html_(self) -> str:
        return fragment(f"<h1>{escape(self.title)}</h1>\n{self.body}")

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """A cell's last expression in a text console (IPython): the text as printed, not a quoted string."""
        printer.text(str(self))

    def save(self, path: str | os.PathLike[str]) -> pathlib.Path:
        """Write :meth:`html` to ``path`` (parent directories created).

        Returns:
          The path written.

        Raises:
          TitanaxError: ``path`` is a directory, or cannot be written.
        """
        return save_html(self.html(), path)


def _rebuild(text: str, body: str, title: str) -> Report:
    return Report(text, body, title=title)


def save_html(document: str, path: str | os.PathLike[str]) -> pathlib.Path:
    """Write an HTML document to ``path``, creating parent directories.

    Raises:
      TitanaxError: ``path`` is a directory, or cannot be written.
    """
    target = pathlib.Path(path).expanduser()
    if target.is_dir():
        raise TitanaxError(f"cannot write the HTML report to {str(target)!r}: it is a directory",
                           suggestion=f"name a file, e.g. {str(target / 'report.html')!r}",
                           field="path", value=str(target))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(document, encoding="utf-8")
    except OSError as error:
        raise TitanaxError(f"cannot write the HTML report to {str(target)!r}: {error.strerror or error}",
                           suggestion="choose a path in a directory you can write to",
                           field="path", value=str(target)) from None
    return target


def classes(*names: str | None) -> str:
    """Space-joined non-empty class names."""
    return " ".join(n for n in names if n)


def numeric_columns(n: int, right: Collection[int]) -> list[str]:
    """``cell_classes`` for :func:`table`: ``"tx-num"`` for the columns in ``right``."""
    return ["tx-num" if i in right else "" for i in range(n)]
