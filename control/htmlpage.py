"""Static HTML pages for the reports and ``recctl status``: one self-contained file a browser opens.

Why one file with nothing outside it: a report is copied around (CI artifacts, a ticket, a laptop without the run
directory), so its plots are inline ``data:`` URIs and its style is an inline block; the page's
Content-Security-Policy forbids every other source and every script, so a page that tried to load something, or
text from the data that smuggled markup in, shows in the browser's console instead of running. Every value from
the data is escaped (:func:`esc`, :func:`table`); only :class:`Markup` (HTML built here) goes in as it is.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from string import Template

#: No scripts, no fetches: images only from data: URIs, style only from the page's own <style>.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="$csp">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; border-top: 1px solid #ccc; padding-top: .8em; margin-top: 1.6em; }
h3 { font-size: 1.05em; margin-bottom: .3em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: .25em .5em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.bad td { background: #fde2e2; } tr.warn td { background: #fff4cc; } tr.good td { background: #e6f4e6; }
.verdict { font-weight: bold; padding: .05em .45em; border-radius: .3em; }
.PASS, .ok { background: #cdeccd; color: #165a16; } .FAIL, .down { background: #f7c5c5; color: #8a1111; }
.SKIP, .degraded { background: #fbe7a6; color: #6b5200; }
.note { color: #555; } ul.warnings li { color: #8a1111; }
img.plot { max-width: 100%; height: auto; border: 1px solid #ddd; }
code { background: #f4f4f4; padding: 0 .2em; }
</style>
</head>
<body>
$body
</body>
</html>
""")


class Markup(str):
    """HTML made here: :func:`esc` and :func:`table` insert it as it is."""


def esc(value: object) -> Markup:
    """``value`` as text in HTML (None is "-"); Markup is already HTML."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape("-" if value is None else str(value)))


_CODE = re.compile(r"`([^`]+)`")


def inline(text: str) -> Markup:
    """A line written for markdown as HTML: escaped, then `code` spans as <code> (report lines name figures and
    alerts that way)."""
    return Markup(_CODE.sub(r"<code>\1</code>", html.escape(str(text))))


def tag(name: str, content: object, cls: str | None = None, **attrs: object) -> Markup:
    """``<name class=cls attrs>content</name>``, content and attribute values escaped."""
    extra = "".join(f' {k.rstrip("_")}="{html.escape(str(v))}"' for k, v in attrs.items() if v is not None)
    return Markup(f"<{name}{_cls(cls)}{extra}>{esc(content)}</{name}>")


def _cls(cls: str | None) -> str:
    return f' class="{html.escape(cls)}"' if cls else ""


_NUMBER = re.compile(r"^[-+]?[\d.,]+( ?(ms|s|rps|%|MiB))?$")


def table(columns: Sequence[object], rows: Iterable[Sequence[object]],
          classes: Sequence[str | None] | None = None, cls: str | None = None) -> Markup:
    """A table: a header row, then ``rows`` (cells escaped unless Markup), ``classes[i]`` on row i (bad, warn,
    good); numeric cells right-aligned."""
    head = "".join(tag("th", c) for c in columns)
    body = []
    for i, row in enumerate(rows):
        cells = "".join(tag("td", c, "num" if _NUMBER.match(str(c)) else None) for c in row)
        body.append(f"<tr{_cls(classes[i] if classes and i < len(classes) else None)}>{cells}</tr>")
    return Markup(f"<table{_cls(cls)}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def bullets(items: Iterable[object], cls: str | None = None) -> Markup:
    """A list (nothing when ``items`` is empty); text items go through :func:`inline`."""
    lis = "".join(tag("li", inline(i) if not isinstance(i, Markup) else i) for i in items)
    return Markup(f"<ul{_cls(cls)}>{lis}</ul>") if lis else Markup("")


def image(path: Path, alt: str) -> Markup:
    """The PNG at ``path`` inline (a data: URI), or a line saying it is missing."""
    try:
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    except OSError as exc:
        return tag("p", f"plot {Path(path).name} missing: {exc.strerror}", "note")
    return Markup(f'<img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">')


def page(title: str, parts: Iterable[object]) -> str:
    """The whole page: ``parts`` (Markup, or text to escape) one after another in the body."""
    return PAGE.substitute(csp=CSP, title=esc(title), body="\n".join(esc(p) for p in parts if p))


def write(path: Path, title: str, parts: Iterable[object]) -> Path:
    path.write_text(page(title, parts), encoding="utf-8")
    return path
