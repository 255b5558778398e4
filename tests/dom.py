"""A small reader of HTML for the report tests: every element with its attributes, in document
order, and selection by tag and classes (what ``document.querySelectorAll("td.tx-tick.tx-fwd")``
finds). It reads Titanax's own pages and what a browser's ``--dump-dom`` prints of them."""

from __future__ import annotations

from html.parser import HTMLParser


class Element(dict):
    """An element's attributes (``el["data-stage"]``), with ``tag``, ``classes`` and ``text``."""

    def __init__(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        super().__init__((k, v or "") for k, v in attrs)
        self.tag = tag
        self.classes = set(self.get("class", "").split())
        self.text = ""


class _Reader(HTMLParser):
    VOID = {"meta", "br", "img", "hr", "input", "link"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[Element] = []
        self.open: list[Element] = []

    def handle_starttag(self, tag, attrs):
        el = Element(tag, attrs)
        self.elements.append(el)
        if tag not in self.VOID:
            self.open.append(el)

    def handle_endtag(self, tag):
        for i in range(len(self.open) - 1, -1, -1):
            if self.open[i].tag == tag:
                del self.open[i:]
                break

    def handle_data(self, data):
        for el in self.open:
            el.text += data


def elements(html: str) -> list[Element]:
    reader = _Reader()
    reader.feed(html)
    reader.close()
    return reader.elements


def select(html_or_elements, tag: str, *classes: str) -> list[Element]:
    """The elements of ``tag`` that have every one of ``classes``."""
    found = elements(html_or_elements) if isinstance(html_or_elements, str) else html_or_elements
    return [el for el in found if el.tag == tag and set(classes) <= el.classes]
