"""A small reader of the report pages for the tests: sections, tables, images and every URL attribute."""
from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path


@dataclass
class Page:
    ids: set[str] = field(default_factory=set)
    tables: dict[str, list[list[str]]] = field(default_factory=dict)
    images: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)  # every src/href/action/... attribute value
    notes: list[str] = field(default_factory=list)
    tags: set[str] = field(default_factory=set)

    def key_values(self, table_id: str) -> dict[str, str]:
        return {row[0]: row[1] for row in self.tables[table_id]}

    def rows(self, table_id: str) -> list[list[str]]:
        """Body rows of a table with a header (the header row dropped)."""
        return self.tables[table_id][1:]


class _Reader(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.page = Page()
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._note: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.page.tags.add(tag)
        if attributes.get("id"):
            self.page.ids.add(str(attributes["id"]))
        for name in ("src", "href", "srcset", "action", "data", "poster"):
            if attributes.get(name):
                self.page.urls.append(str(attributes[name]))
        if tag == "img":
            self.page.images.append(str(attributes.get("src")))
        elif tag == "table":
            self._table = str(attributes.get("id"))
            self.page.tables[self._table] = []
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "p" and attributes.get("class") == "note":
            self._note = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table is not None:
            self.page.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "p" and self._note is not None:
            self.page.notes.append("".join(self._note))
            self._note = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._note is not None:
            self._note.append(data)


def read_page(path: Path) -> Page:
    reader = _Reader()
    reader.feed(Path(path).read_text(encoding="utf-8"))
    return reader.page


def as_float(text: str) -> float:
    return float(text.replace(",", ""))
