"""A tiny document model that renders to markdown and to one self-contained HTML file.

The report is built once as a list of blocks (headings, paragraphs, tables, figures, lists,
collapsible sections) and rendered twice, so report.md and report.html cannot drift apart. Text
inside blocks is a small markdown subset — `code`, **bold**, *italic* and backslash escapes — which
is what the markdown file shows verbatim and what `inline_html` converts for the HTML file.

The HTML file needs nothing else: CSS is inline, figures are embedded as base64 PNG data URIs, and
collapsible sections are native <details> elements (no JavaScript). Each figure is shown at its
natural size: its width and height attributes are its inches (read from the PNG: pixels and the
dpi it was saved at) times `DISPLAY_DPI`, so text drawn at 10 pt reads 11 px in every figure
instead of being scaled by how wide the figure happens to be; only a window narrower than the
figure shrinks it. Like ArviZ's and seaborn's
static outputs, it can be mailed, archived or opened offline years later and look the same.
"""

from __future__ import annotations

import base64
import html
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

DISPLAY_DPI = 80  # CSS pixels per figure inch in report.html: 10 pt text shows 11 px tall

# ASCII punctuation: what CommonMark lets a backslash escape
_PUNCT = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str
    css: str = ""  # an HTML class, e.g. "summary" or "legend"; markdown ignores it


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    align: list[str] | None = None  # per column: "l" (default) or "r"


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Figure:
    path: Path
    caption: str  # plain text (escaped by each renderer)
    alt: str = ""


@dataclass
class Details:
    summary: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Box:
    """Blocks grouped under one HTML class (e.g. the summary's shaded box); markdown shows the
    blocks as they are."""

    css: str
    blocks: list[Block] = field(default_factory=list)


Block = Heading | Para | Table | Bullets | Figure | Details | Box


def md_escape(text: str) -> str:
    """Plain text (arm names, messages) made safe inside markdown text and tables: a '|' would split
    a table cell, '*' or '_' start emphasis, '<' open an HTML tag, '`' a code span."""
    out = []
    for ch in str(text):
        if ch in "\\|*_<>`[]":
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def code(text: str) -> str:
    """A code span around arbitrary text (a longer fence when the text holds backticks)."""
    text = str(text)
    fence = "`"
    while fence in text:
        fence += "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


# --- markdown ----------------------------------------------------------------------------------------


def _md_table(t: Table) -> list[str]:
    align = t.align or ["l"] * len(t.header)
    rule = "| " + " | ".join("---:" if a == "r" else ":---" for a in align) + " |"
    lines = ["| " + " | ".join(t.header) + " |", rule]
    lines += ["| " + " | ".join(c.replace("\n", " ") for c in row) + " |" for row in t.rows]
    return lines


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def to_markdown(blocks: list[Block], out_dir: Path) -> str:
    md: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            md += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            md += [b.text, ""]
        elif isinstance(b, Table):
            md += _md_table(b) + [""]
        elif isinstance(b, Bullets):
            md += [f"- {item}" for item in b.items] + [""]
        elif isinstance(b, Figure):
            md += [
                f"![{md_escape(b.alt or b.path.stem.replace('_', ' '))}]({_rel(b.path, out_dir)})",
                "",
                f"*{md_escape(b.caption)}*",
                "",
            ]
        elif isinstance(b, Box):
            md += to_markdown(b.blocks, out_dir).rstrip("\n").split("\n") + [""]
        elif isinstance(b, Details):
            md += [f"<details><summary>{html.escape(b.summary)}</summary>", ""]
            md += to_markdown(b.blocks, out_dir).rstrip("\n").split("\n") + ["", "</details>", ""]
        else:  # pragma: no cover - a new block type without a renderer is a programming error
            raise TypeError(f"unknown block {b!r}")
    return "\n".join(md).rstrip() + "\n"


# --- HTML ----------------------------------------------------------------------------------------------


def inline_html(text: str) -> str:
    """The markdown subset of `text` as HTML: escapes, `code`, **bold**, *italic*; the rest escaped.

    A left-to-right scan (not regexes) so that code spans keep their contents literal and a '*'
    inside one never starts emphasis, as in CommonMark; unmatched '*' stay literal characters.
    """
    tokens: list[tuple[str, str]] = []  # ("text", s) | ("html", s) | ("star", "*" or "**")
    i, n = 0, len(text)
    buf: list[str] = []

    def flush() -> None:
        if buf:
            tokens.append(("text", "".join(buf)))
            buf.clear()

    while i < n:
        ch = text[i]
        if ch == "\\" and i + 1 < n and text[i + 1] in _PUNCT:
            buf.append(text[i + 1])
            i += 2
        elif ch == "`":
            run = len(text[i:]) - len(text[i:].lstrip("`"))
            fence = "`" * run
            j = text.find(fence, i + run)
            while j >= 0 and j + run < n and text[j + run] == "`":  # a longer run is not our fence
                j = text.find(fence, j + run + 1)
            if j < 0:
                buf.append(fence)
                i += run
                continue
            flush()
            body = text[i + run : j]
            if body.startswith(" ") and body.endswith(" ") and body.strip():
                body = body[1:-1]
            tokens.append(("html", f"<code>{html.escape(body)}</code>"))
            i = j + run
        elif ch == "*":
            run = 2 if text.startswith("**", i) else 1
            flush()
            tokens.append(("star", "*" * run))
            i += run
        else:
            buf.append(ch)
            i += 1
    flush()

    # pair the stars: an opener is matched by the next star token of the same length
    out: list[str] = [""] * len(tokens)
    open_at: dict[str, int] = {}
    for k, (kind, val) in enumerate(tokens):
        if kind == "text":
            out[k] = html.escape(val, quote=False)
        elif kind == "html":
            out[k] = val
        elif val in open_at:
            start = open_at.pop(val)
            tag = "strong" if val == "**" else "em"
            out[start], out[k] = f"<{tag}>", f"</{tag}>"
            # an inner opener of the other kind left unmatched inside this span stays literal
            for other, pos in list(open_at.items()):
                if pos > start:
                    out[pos] = html.escape(other)
                    del open_at[other]
        else:
            open_at[val] = k
    for val, pos in open_at.items():
        out[pos] = html.escape(val)
    # ✅ is an emoji that machines without an emoji font draw as an empty box; a check mark in the
    # page's own font is always there
    return "".join(out).replace("✅", '<span class="check">✓</span>')


CSS = """
:root { --fg: #1d1d1f; --muted: #5f6368; --rule: #d9dce1; --band: #f5f7fa; --accent: #1a5fb4; }
* { box-sizing: border-box; }
body { font: 15px/1.5 -apple-system, BlinkMacSystemFont, "Segoe UI", Helvetica, Arial, sans-serif;
       color: var(--fg); max-width: 1180px; margin: 2em auto; padding: 0 1.5em; }
h1 { font-size: 1.8em; margin-bottom: 0.2em; }
h2 { font-size: 1.35em; border-bottom: 1px solid var(--rule); padding-bottom: 0.2em; margin-top: 2em; }
h3 { font-size: 1.1em; margin-top: 1.6em; }
code { font: 0.9em/1.3 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: var(--band);
       padding: 0.05em 0.3em; border-radius: 3px; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; display: block; overflow-x: auto; }
th, td { border: 1px solid var(--rule); padding: 0.3em 0.6em; vertical-align: top; }
th { background: var(--band); text-align: left; }
td.r, th.r { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fbfcfd; }
figure { margin: 1.2em 0 1.8em; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--rule); }
figcaption { color: var(--muted); font-size: 0.9em; margin-top: 0.4em; max-width: 60em; }
.summary { background: #eef4fb; border-left: 4px solid var(--accent); padding: 0.2em 1em; }
.check { color: #1e8e3e; font-weight: bold; }
.legend, .meta { color: var(--muted); font-size: 0.9em; }
details { margin: 1em 0; } summary { cursor: pointer; color: var(--accent); }
ul { padding-left: 1.4em; }
"""


def png_display_size(path: Path, display_dpi: float = DISPLAY_DPI) -> tuple[int, int] | None:
    """(width, height) in CSS pixels at which to show a PNG: its size in inches (pixels over the
    dpi in its pHYs chunk, which matplotlib writes) times `display_dpi`. None when the file is not
    a PNG or does not say its dpi (then the browser's own sizing applies)."""
    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    w, h = struct.unpack(">II", data[16:24])
    i = 8
    while i + 8 <= len(data):
        (n,) = struct.unpack(">I", data[i : i + 4])
        kind = data[i + 4 : i + 8]
        if kind == b"pHYs" and n >= 9:
            px, py, unit = struct.unpack(">IIB", data[i + 8 : i + 17])
            if unit != 1 or not px or not py:  # 1: pixels per metre; 0 would be an aspect ratio only
                return None
            return round(w * display_dpi / (px * 0.0254)), round(h * display_dpi / (py * 0.0254))
        if kind in (b"IDAT", b"IEND"):  # pHYs must come before the image data
            return None
        i += 12 + n
    return None


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _html_blocks(blocks: list[Block]) -> list[str]:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            level = min(max(b.level, 1), 6)
            out.append(f"<h{level}>{inline_html(b.text)}</h{level}>")
        elif isinstance(b, Para):
            cls = f' class="{html.escape(b.css)}"' if b.css else ""
            out.append(f"<p{cls}>{inline_html(b.text)}</p>")
        elif isinstance(b, Table):
            align = b.align or ["l"] * len(b.header)
            cls = lambda j, align=align: ' class="r"' if j < len(align) and align[j] == "r" else ""  # noqa: E731
            rows = ["<tr>" + "".join(f"<th{cls(j)}>{inline_html(h)}</th>" for j, h in enumerate(b.header)) + "</tr>"]
            rows += [
                "<tr>" + "".join(f"<td{cls(j)}>{inline_html(c)}</td>" for j, c in enumerate(r)) + "</tr>"
                for r in b.rows
            ]
            out.append(
                "<table>\n<thead>" + rows[0] + "</thead>\n<tbody>\n" + "\n".join(rows[1:]) + "\n</tbody>\n</table>"
            )
        elif isinstance(b, Bullets):
            out.append("<ul>\n" + "\n".join(f"<li>{inline_html(i)}</li>" for i in b.items) + "\n</ul>")
        elif isinstance(b, Figure):
            alt = html.escape(b.alt or b.path.stem.replace("_", " "))
            size = png_display_size(b.path)
            dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
            out.append(
                f'<figure>\n<img src="{_data_uri(b.path)}"{dims} alt="{alt}">\n'
                f"<figcaption>{html.escape(b.caption)}</figcaption>\n</figure>"
            )
        elif isinstance(b, Box):
            out.append(f'<div class="{html.escape(b.css)}">\n' + "\n".join(_html_blocks(b.blocks)) + "\n</div>")
        elif isinstance(b, Details):
            out.append(
                f"<details>\n<summary>{html.escape(b.summary)}</summary>\n"
                + "\n".join(_html_blocks(b.blocks))
                + "\n</details>"
            )
        else:  # pragma: no cover
            raise TypeError(f"unknown block {b!r}")
    return out


def to_html(blocks: list[Block], title: str) -> str:
    """One self-contained HTML page: no external resource, no script."""
    body = "\n".join(_html_blocks(blocks))
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


__all__ = [
    "Heading",
    "Para",
    "Table",
    "Bullets",
    "Figure",
    "Details",
    "Box",
    "Block",
    "md_escape",
    "code",
    "to_markdown",
    "inline_html",
    "DISPLAY_DPI",
    "png_display_size",
    "to_html",
]
