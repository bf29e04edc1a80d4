"""English prose that is on every machine with CPython: the `pydoc_data.topics` help texts and the
docstrings of the standard library, read as source with `ast` (nothing is imported or executed).

Code is dropped (indented reST blocks, doctests, symbol-heavy lines) and paragraphs are reflowed to
one line, so that a small GPT-2 learns sentences rather than Python. Each topic or docstring is one
document; the trainer separates documents with the end-of-text token so the model learns to stop.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

# Standard-library folders whose docstrings are tests, generated tables or another language's text.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "lib2to3", "encodings", "turtledemo"}
_UNDERLINE = re.compile(r"^\s*([=*\-~^\"#+])\1{2,}\s*$")
_LETTERS = re.compile(r"[A-Za-z]")
_CODE_CHARS = set("()[]{}=<>_|\\/*#@$%`")
_MIN_WORDS = 5


def stdlib_dir() -> Path:
    """The running interpreter's standard library (works inside a venv: it points at the base install)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _is_code_line(line: str) -> bool:
    stripped = line.strip()
    if stripped.startswith((">>>", "...", "$ ", "%", "#")):
        return True
    if not stripped:
        return False
    code = sum(ch in _CODE_CHARS for ch in stripped)
    letters = len(_LETTERS.findall(stripped))
    # Prose mentions a call or two; a line that is a fifth punctuation or has few letters is code or a table.
    return code / len(stripped) > 0.12 or letters / len(stripped) < 0.5


def clean(text: str) -> list[str]:
    """Turn one reST-ish help text into prose paragraphs, one line each; code blocks and headings dropped."""
    paragraphs: list[str] = []
    current: list[str] = []
    literal_follows = False  # a paragraph ending in "::" introduces an indented code block in reST

    def flush() -> None:
        nonlocal literal_follows
        if current:
            para = " ".join(current)
            literal_follows = para.endswith("::")
            para = para[:-1] if literal_follows else para
            para = re.sub(r"\s+", " ", para).strip()
            if len(para.split()) >= _MIN_WORDS and not _is_code_line(para):
                paragraphs.append(para)
            current.clear()

    for line in text.splitlines():
        if not line.strip():
            flush()
            continue
        if line[0] in " \t":
            # Indented relative to the (dedented) text: a literal block, a definition body, a table or a
            # doctest. Dropping all of them loses a little prose but keeps out nearly all code.
            if current:
                flush()
            literal_follows = False
            continue
        if _UNDERLINE.match(line):
            current.clear()  # the line before was a heading: not a sentence
            continue
        if _is_code_line(line):
            flush()
            continue
        current.append(line.strip())
    flush()
    return paragraphs


def topic_texts(stdlib: Path | None = None) -> Iterator[str]:
    """The raw `pydoc_data.topics` help texts, read from the module's source with ast.literal_eval."""
    path = (stdlib or stdlib_dir()) / "pydoc_data" / "topics.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
            for key in sorted(topics):
                yield str(topics[key])


def docstrings(stdlib: Path | None = None) -> Iterator[str]:
    """Module, class and function docstrings of the standard library, in a stable (sorted) order."""
    root = stdlib or stdlib_dir()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(part in _SKIP_DIRS for part in rel) or path.name.startswith("test_"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are templates or in other encodings: skip, never fail the build
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False)
                if doc:
                    yield inspect.cleandoc(doc)


def documents(stdlib: Path | None = None, max_chars: int | None = None, topics: bool = True) -> list[str]:
    """Every cleaned document (paragraphs joined by newlines), topics first, stopping once `max_chars` are
    collected (quick builds: parsing the whole standard library alone takes ~4 s). Deterministic for one Python."""
    out: list[str] = []
    seen: set[str] = set()
    total = 0
    sources = itertools.chain(topic_texts(stdlib) if topics else (), docstrings(stdlib))
    for raw in sources:
        paras = clean(raw)
        if not paras:
            continue
        doc = "\n".join(paras)
        if doc in seen:  # inherited and copied docstrings repeat; duplicates would only be memorised
            continue
        seen.add(doc)
        out.append(doc)
        total += len(doc)
        if max_chars is not None and total >= max_chars:
            break
    return out


if __name__ == "__main__":
    docs = documents()
    total = sum(len(d) for d in docs)
    print(f"documents={len(docs)} chars={total}")
