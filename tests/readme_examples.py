"""Read the HTTP requests a Markdown document shows, so a test can send them.

Requests come in three forms, all found in fenced code blocks:

- ``curl`` in a shell block (```` ```sh ````, ``bash``, ``shell``, ``zsh``), its body in
  ``-d``/``--data``/``--data-raw``/``--data-binary``/``--json``, quoted any way the shell
  allows (``'{"cloud_id": "'"$CLOUD"'"}'`` splices a variable into a single-quoted body), or
  read from a here-document with ``-d @- <<'EOF'``;
- a ```` ```json ```` block, sent to the endpoint the paragraph just before it names in
  backticks (`` `POST /v1/clouds` ``);
- ``NAME=$(curl ... | jq -r .id)`` keeps a field of the answer for later ``$NAME``.

The shell is read the way ``sh`` reads it for the subset documents use (quotes, escapes,
``$NAME`` and ``${NAME}``, comments, line continuations, pipes, ``;``, ``&&``,
here-documents, ``NAME=$(...)``); anything else is a :class:`DocError` naming the file and
line, never a silently skipped example. Variables are kept as references and expanded
when the request is sent (:func:`expand`), so each example runs with the ids the earlier
ones created.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

SHELL_LANGUAGES = frozenset({"sh", "bash", "shell", "zsh"})
JSON_LANGUAGES = frozenset({"json"})
NAME = r"[A-Za-z_][A-Za-z0-9_]*"


class DocError(Exception):
    """An example that cannot be read (or run) as written; the message names where."""


@dataclass(frozen=True)
class Var:
    """A ``$NAME`` reference, expanded when the request is sent."""

    name: str


#: A shell word or a body: literal text and variable references, in order.
Text = tuple[str | Var, ...]


def expand(text: Text, variables: Mapping[str, str], where: str) -> str:
    out = []
    for part in text:
        if isinstance(part, Var):
            if part.name not in variables:
                raise DocError(f"{where}: ${part.name} is used but never set before")
            out.append(variables[part.name])
        else:
            out.append(part)
    return "".join(out)


def literal(text: Text) -> str | None:
    """The text if it holds no variable, else None."""
    return None if any(isinstance(p, Var) for p in text) else "".join(str(p) for p in text)


@dataclass
class Command:
    """One simple command: its words, the here-document it reads (if any) and its line."""

    words: list[Text]
    line: int
    heredoc: Text | None = None


@dataclass
class Step:
    """A pipeline, as a statement: ``NAME=$(pipeline)`` keeps its output as ``$NAME``."""

    pipeline: list[Command]
    line: int
    assign: str | None = None


@dataclass(frozen=True)
class Request:
    """An HTTP request a document shows."""

    where: str  # "README.md:42"
    method: str
    target: Text  # path and query, e.g. /v1/migrations/$ID/run
    headers: tuple[tuple[str, Text], ...] = ()
    body: Text | None = None
    #: ``NAME=$(curl ... | jq -r .field)``: (NAME, the field path)
    keep: tuple[str, tuple[str, ...]] | None = None


@dataclass(frozen=True)
class OtherCommand:
    """A command in a shell block that is not curl (e.g. ``TOKEN=$(vmigrate tokens ...)``)."""

    where: str
    argv: tuple[Text, ...]
    assign: str | None


@dataclass
class Block:
    language: str
    text: str
    line: int  # line of the first line inside the fence
    context: str = ""  # the paragraph before the fence
    steps: list[Step] = field(default_factory=list)


# --- Markdown -------------------------------------------------------------------------


def code_blocks(markdown: str, source: str) -> Iterator[Block]:
    """Every fenced code block (```` ``` ```` or ``~~~``), with its language and line."""
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^( {0,3})(`{3,}|~{3,})\s*([^\s`]*)", lines[i])
        if fence is None:
            i += 1
            continue
        indent, marker, language = fence.groups()
        close = re.compile(rf"^ {{0,3}}{re.escape(marker[0])}{{{len(marker)},}}\s*$")
        end = i + 1
        while end < len(lines) and not close.match(lines[end]):
            end += 1
        if end == len(lines):
            raise DocError(f"{source}:{i + 1}: code block never closed")
        body = [line.removeprefix(indent) for line in lines[i + 1:end]]
        yield Block(language.lower(), "\n".join(body) + "\n", i + 2, _paragraph_before(lines, i))
        i = end + 1


def _paragraph_before(lines: list[str], fence: int) -> str:
    j = fence - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    start = j
    while start > 0 and lines[start - 1].strip():
        start -= 1
    return "\n".join(lines[start:j + 1])


# --- the shell subset -----------------------------------------------------------------


class _Scanner:
    """Reads a shell block into steps (statements of pipelines of commands)."""

    def __init__(self, text: str, first_line: int, source: str) -> None:
        self.s = text
        self.i = 0
        self.first_line = first_line
        self.source = source
        self.pending_heredocs: list[tuple[Command, str, bool, bool]] = []

    def line(self, pos: int | None = None) -> int:
        return self.first_line + self.s.count("\n", 0, self.i if pos is None else pos)

    def where(self, pos: int | None = None) -> str:
        return f"{self.source}:{self.line(pos)}"

    def fail(self, message: str, pos: int | None = None) -> DocError:
        return DocError(f"{self.where(pos)}: {message}")

    def peek(self, n: int = 1) -> str:
        return self.s[self.i:self.i + n]

    def steps(self, closing: str | None = None) -> list[Step]:
        """Statements until the end (or, inside ``$(``, until ``closing``)."""
        out: list[Step] = []
        while True:
            self._blank()
            if self.i >= len(self.s):
                if closing is not None:
                    raise self.fail("'$(' never closed")
                return out
            if closing is not None and self.peek() == closing:
                self.i += 1
                return out
            if self.peek() in ";\n":
                self._separator()
                continue
            out.append(self._statement(closing))

    def _blank(self) -> None:
        while self.i < len(self.s):
            c = self.peek()
            if c in " \t":
                self.i += 1
            elif self.peek(2) == "\\\n":
                self.i += 2
            elif c == "#":
                while self.i < len(self.s) and self.peek() != "\n":
                    self.i += 1
            else:
                return

    def _separator(self) -> None:
        c = self.peek()
        self.i += 1
        if c == "\n":
            self._read_heredocs()

    def _statement(self, closing: str | None) -> Step:
        line_pos = self.i
        assign = None
        m = re.match(rf"({NAME})=\$\(", self.s[self.i:])
        if m:
            assign = m.group(1)
            self.i += m.end()
            inner = self.steps(closing=")")
            if len(inner) != 1:
                raise self.fail("$( ... ) must hold exactly one pipeline here", line_pos)
            self._blank()
            if self.i < len(self.s) and self.peek() not in ";\n" + (closing or ""):
                raise self.fail("text after NAME=$( ... ) is not understood")
            return Step(inner[0].pipeline, inner[0].line, assign)
        pipeline = [self._command(closing)]
        while True:
            self._blank()
            if self.peek(2) == "&&":
                self.i += 2
                break
            if self.peek(2) == "||":
                raise self.fail("'||' is not understood here")
            if self.peek() == "|":
                self.i += 1
                self._blank_lines()
                pipeline.append(self._command(closing))
                continue
            break
        return Step(pipeline, pipeline[0].line)

    def _blank_lines(self) -> None:
        while True:
            self._blank()
            if self.peek() == "\n":
                self.i += 1
                continue
            return

    def _command(self, closing: str | None) -> Command:
        self._blank()
        cmd = Command([], self.line())
        while True:
            self._blank()
            if self.i >= len(self.s):
                break
            c = self.peek()
            if c in ";\n|&" or (closing is not None and c == closing):
                if c == "&" and self.peek(2) != "&&":
                    raise self.fail("background jobs ('&') are not understood")
                break
            if self.peek(2) == "<<":
                self._heredoc_start(cmd)
                continue
            if c in "<>()`":
                raise self.fail(f"{c!r} is not understood here (only pipes and here-documents)")
            cmd.words.append(self._word(closing))
        if not cmd.words:
            raise self.fail("empty command")
        return cmd

    def _word(self, closing: str | None) -> Text:
        parts: list[str | Var] = []
        start = self.i
        while self.i < len(self.s):
            c = self.peek()
            if c in " \t\n;|&<>" or (closing is not None and c == closing):
                break
            if c == "'":
                end = self.s.find("'", self.i + 1)
                if end < 0:
                    raise self.fail("single quote never closed", self.i)
                parts.append(self.s[self.i + 1:end])
                self.i = end + 1
            elif c == '"':
                self.i += 1
                parts.extend(self._double_quoted())
            elif c == "\\":
                if self.peek(2) == "\\\n":
                    self.i += 2
                else:
                    parts.append(self.s[self.i + 1:self.i + 2])
                    self.i += 2
            elif c == "$":
                parts.append(self._dollar())
            elif c in "()`":
                raise self.fail(f"{c!r} inside a word is not understood")
            else:
                parts.append(c)
                self.i += 1
        if self.i == start:
            raise self.fail("expected a word")
        return _join(parts)

    def _double_quoted(self) -> list[str | Var]:
        parts: list[str | Var] = []
        while True:
            if self.i >= len(self.s):
                raise self.fail("double quote never closed")
            c = self.peek()
            if c == '"':
                self.i += 1
                return parts
            if c == "\\" and self.peek(2)[1:] in ('"', "\\", "$", "`", "\n"):
                if self.peek(2)[1:] != "\n":
                    parts.append(self.s[self.i + 1])
                self.i += 2
            elif c == "$":
                parts.append(self._dollar())
            elif c == "`":
                raise self.fail("command substitution inside quotes is not understood")
            else:
                parts.append(c)
                self.i += 1

    def _dollar(self) -> Var:
        m = re.match(rf"\$(?:({NAME})|\{{({NAME})\}})", self.s[self.i:])
        if m is None:
            raise self.fail("only $NAME and ${NAME} are understood after '$'")
        self.i += m.end()
        return Var(m.group(1) or m.group(2))

    def _heredoc_start(self, cmd: Command) -> None:
        self.i += 2
        strip_tabs = self.peek() == "-"
        if strip_tabs:
            self.i += 1
        self._blank()
        word_start = self.i
        word = self._word(None)
        quoted = any(q in self.s[word_start:self.i] for q in "'\"\\")
        delimiter = literal(word)
        if not delimiter:
            raise self.fail("a here-document needs a plain delimiter word")
        if cmd.heredoc is not None or any(c is cmd for c, *_ in self.pending_heredocs):
            raise self.fail("one here-document per command")
        self.pending_heredocs.append((cmd, delimiter, quoted, strip_tabs))

    def _read_heredocs(self) -> None:
        for cmd, delimiter, quoted, strip_tabs in self.pending_heredocs:
            lines: list[str] = []
            while True:
                if self.i >= len(self.s):
                    raise self.fail(f"here-document never ends (no line {delimiter!r})")
                end = self.s.find("\n", self.i)
                end = len(self.s) if end < 0 else end
                line = self.s[self.i:end]
                self.i = min(end + 1, len(self.s))
                if strip_tabs:
                    line = line.lstrip("\t")
                if line == delimiter:
                    break
                lines.append(line + "\n")
            text = "".join(lines)
            cmd.heredoc = (text,) if quoted else _expand_heredoc(text)
        self.pending_heredocs = []

    def finish(self) -> None:
        if self.pending_heredocs:
            raise self.fail("here-document never ends")


def _join(parts: list[str | Var]) -> Text:
    out: list[str | Var] = []
    for part in parts:
        if isinstance(part, str) and out and isinstance(out[-1], str):
            out[-1] += part
        else:
            out.append(part)
    return tuple(out)


def _expand_heredoc(text: str) -> Text:
    """An unquoted here-document: ``$NAME``/``${NAME}`` expand, ``\\$`` is a dollar."""
    parts: list[str | Var] = []
    pos = 0
    for m in re.finditer(rf"\\([$\\`])|\$(?:({NAME})|\{{({NAME})\}})|\$\(|`", text):
        parts.append(text[pos:m.start()])
        if m.group(1):
            parts.append(m.group(1))
        elif m.group(2) or m.group(3):
            parts.append(Var(m.group(2) or m.group(3)))
        else:
            raise DocError("command substitution in a here-document is not understood")
        pos = m.end()
    parts.append(text[pos:])
    return _join(parts)


def parse_shell(text: str, first_line: int, source: str) -> list[Step]:
    scanner = _Scanner(text, first_line, source)
    steps = scanner.steps()
    scanner.finish()
    return steps


# --- curl -----------------------------------------------------------------------------

_CURL_FLAGS = frozenset("sSfLiv")  # silent, show-error, fail, location, include, verbose
_CURL_LONG_FLAGS = frozenset({"--silent", "--show-error", "--fail", "--fail-with-body",
                              "--location", "--include", "--verbose", "--compressed"})
_DATA = frozenset({"-d", "--data", "--data-raw", "--data-binary", "--json"})


def _is_curl(cmd: Command) -> bool:
    first = literal(cmd.words[0])
    return first is not None and first.rsplit("/", 1)[-1] == "curl"


def curl_request(step: Step, source: str) -> Request:
    """The request of a ``curl`` step (``NAME=$(curl ... | jq -r .path)`` included)."""
    cmd = step.pipeline[0]
    where = f"{source}:{cmd.line}"
    method: str | None = None
    headers: list[tuple[str, Text]] = []
    body: Text | None = None
    url: Text | None = None
    reads_heredoc = False
    words = iter(cmd.words[1:])
    for word in words:
        option = literal(word)
        if option in ("-X", "--request"):
            method = literal(_next(words, where, option))
            if method is None:
                raise DocError(f"{where}: the method must be written out")
        elif option in ("-H", "--header"):
            header = _next(words, where, option)
            name, sep = _header_name(header)
            if not sep:
                raise DocError(f"{where}: header {header!r} has no ':'")
            headers.append((name, _after_colon(header)))
        elif option in _DATA:
            if body is not None:
                raise DocError(f"{where}: more than one body")
            body = _next(words, where, option)
            if literal(body) == "@-":
                if cmd.heredoc is None:
                    raise DocError(f"{where}: body from stdin without a here-document")
                body, reads_heredoc = cmd.heredoc, True
            elif "".join(p for p in body if isinstance(p, str)).startswith("@"):
                raise DocError(f"{where}: bodies read from files are not understood")
            if option == "--json":
                headers.append(("Content-Type", ("application/json",)))
        elif option in _CURL_LONG_FLAGS or (
            option is not None and re.fullmatch(r"-[A-Za-z]+", option)
            and set(option[1:]) <= _CURL_FLAGS
        ):
            continue
        elif option is not None and option.startswith("-"):
            raise DocError(f"{where}: curl option {option} is not understood (teach "
                           "tests/readme_examples.py or leave it out of the example)")
        elif url is not None:
            raise DocError(f"{where}: more than one URL")
        else:
            url = word
    if url is None:
        raise DocError(f"{where}: curl without a URL")
    if cmd.heredoc is not None and not reads_heredoc:
        raise DocError(f"{where}: a here-document that curl does not read (use -d @-)")
    if any(literal(v) == "text/event-stream" for _, v in headers):
        raise DocError(f"{where}: event streams are not run")
    keep = _jq(step, where)
    if step.assign is not None and keep is None:
        raise DocError(f"{where}: {step.assign}=$(curl ...) must end in '| jq -r .field'")
    return Request(
        where=where,
        method=(method or ("POST" if body is not None else "GET")).upper(),
        target=_target(url, where),
        headers=tuple(headers),
        body=body,
        keep=(step.assign, keep) if step.assign is not None and keep is not None else None,
    )


def _next(words: Iterator[Text], where: str, option: str | None) -> Text:
    try:
        return next(words)
    except StopIteration:
        raise DocError(f"{where}: {option} needs a value") from None


def _header_name(header: Text) -> tuple[str, bool]:
    first = header[0] if header else ""
    if not isinstance(first, str) or ":" not in first:
        return "", False
    return first.split(":", 1)[0].strip(), True


def _after_colon(header: Text) -> Text:
    first = header[0]
    assert isinstance(first, str)
    rest = first.split(":", 1)[1].lstrip()
    return _join([rest, *header[1:]]) if rest else tuple(header[1:])


def _target(url: Text, where: str) -> Text:
    """The path and query of ``http://host:port/path?query``, or of ``$BASE/path?query``
    where ``$BASE`` is the service's address the document has the reader set (variables
    kept; the base itself is dropped: requests go to whatever app the caller runs)."""
    first = url[0] if url else ""
    if isinstance(first, Var):
        rest = url[1] if len(url) > 1 else ""
        if not isinstance(rest, str) or not rest.startswith("/"):
            raise DocError(f"{where}: after ${first.name} the URL needs its /path written out")
        return tuple(url[1:])
    if not re.match(r"https?://[^/]+/", first):
        raise DocError(f"{where}: the URL must start with http(s)://host/ or $BASE/")
    split = urlsplit(first)
    rest = first[len(f"{split.scheme}://{split.netloc}"):]
    return _join([rest, *url[1:]])


def _jq(step: Step, where: str) -> tuple[str, ...] | None:
    if len(step.pipeline) == 1:
        return None
    if len(step.pipeline) > 2:
        raise DocError(f"{where}: only 'curl ... | jq ...' pipelines are understood")
    argv = [literal(w) for w in step.pipeline[1].words]
    if argv[:2] == ["jq", "-r"] and len(argv) == 3 and argv[2] is not None and re.fullmatch(
        rf"(\.{NAME})+", argv[2]
    ):
        return tuple(argv[2].split(".")[1:])
    if argv in (["jq"], ["jq", "."]) and step.assign is None:
        return None
    raise DocError(f"{where}: only '| jq -r .field' (or '| jq .') is understood after curl")


# --- the document ---------------------------------------------------------------------


Example = Request | OtherCommand


def examples(path: Path, *, skip: Sequence[str] = ()) -> list[Example]:
    """Every request (and every other shell command beside one) in ``path``, in order,
    leaving out the sections (``## heading``) named in ``skip``.

    Shell blocks without curl are read too (so a malformed one fails here), but only
    their requests are returned. Raises :class:`DocError` for anything not understood."""
    source = path.name
    text = path.read_text()
    skipped = [section_lines(text, heading, source) for heading in skip]
    out: list[Example] = []
    for block in code_blocks(text, source):
        if any(first <= block.line <= last for first, last in skipped):
            continue
        if block.language in SHELL_LANGUAGES:
            steps = parse_shell(block.text, block.line, source)
            if any(_is_curl(s.pipeline[0]) for s in steps):
                out.extend(_shell_examples(steps, source))
        elif block.language in JSON_LANGUAGES:
            out.append(_json_example(block, source))
        elif re.search(r"(^|\s)curl\s", block.text):
            raise DocError(f"{source}:{block.line}: curl in a ```{block.language or '(plain)'}"
                           " block: mark it ```sh so its request is read")
    return out


def section_lines(markdown: str, heading: str, source: str) -> tuple[int, int]:
    """The first and last line (1-based) of the section ``## heading``: up to the next
    heading of the same or a higher level. DocError unless there is exactly one."""
    lines = markdown.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == f"## {heading}"]
    if len(starts) != 1:
        raise DocError(f"{source}: needs exactly one '## {heading}' section, "
                       f"found {len(starts)}")
    end = next((j for j in range(starts[0] + 1, len(lines))
                if re.match(r"^#{1,2} ", lines[j])), len(lines))
    return starts[0] + 1, end


def assigned(path: Path, heading: str, name: str) -> Example:
    """The ``NAME=$(...)`` step of a section as an example (a request or a command), for
    a later section that goes on with ``$NAME``. Blocks this reader cannot parse (a
    section run by a real shell) are passed over; DocError unless NAME is set once."""
    found: list[Example] = []
    for block in shell_blocks(path, heading):
        try:
            steps = parse_shell(block.text, block.line, path.name)
        except DocError:
            continue
        for step in steps:
            if step.assign != name:
                continue
            if _is_curl(step.pipeline[0]):
                found.append(curl_request(step, path.name))
            else:
                found.extend(_shell_examples([step], path.name))
    if len(found) != 1:
        raise DocError(f"{path.name}: '## {heading}' sets ${name} {len(found)} times, not once")
    return found[0]


def section_text(markdown: str, heading: str, source: str, *, inside: bool) -> str:
    """The text of the section (``inside``), or the document without it."""
    first, last = section_lines(markdown, heading, source)
    lines = markdown.splitlines()
    kept = lines[first - 1:last] if inside else lines[:first - 1] + lines[last:]
    return "\n".join(kept) + "\n"


def shell_blocks(path: Path, heading: str) -> list[Block]:
    """The shell blocks of one section, in order, as written (to be run by a shell)."""
    text = path.read_text()
    first, last = section_lines(text, heading, path.name)
    found = [b for b in code_blocks(text, path.name)
             if b.language in SHELL_LANGUAGES and first <= b.line <= last]
    if not found:
        raise DocError(f"{path.name}:{first}: no shell blocks in '## {heading}'")
    return found


def _shell_examples(steps: list[Step], source: str) -> Iterator[Example]:
    for step in steps:
        if _is_curl(step.pipeline[0]):
            yield curl_request(step, source)
        elif len(step.pipeline) == 1:
            yield OtherCommand(f"{source}:{step.line}", tuple(step.pipeline[0].words),
                               step.assign)
        else:
            raise DocError(f"{source}:{step.line}: a pipeline that is not curl | jq")


def _json_example(block: Block, source: str) -> Request:
    where = f"{source}:{block.line}"
    found = re.findall(r"`(GET|POST|PUT|PATCH|DELETE) (/[^`\s]*)`", block.context)
    if len(found) != 1:
        raise DocError(f"{where}: a ```json block needs its endpoint, once, in backticks in "
                       f"the paragraph before it (e.g. `POST /v1/clouds`); found {found}")
    method, target = found[0]
    return Request(where=where, method=method, target=_expand_heredoc(target),
                   headers=(("Content-Type", ("application/json",)),),
                   body=_expand_heredoc(block.text))


def json_body(request: Request, variables: Mapping[str, str]) -> str:
    """The request's body with variables expanded; DocError unless it is a JSON object."""
    assert request.body is not None
    text = expand(request.body, variables, request.where)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DocError(f"{request.where}: the body is not JSON ({exc}):\n{text}") from None
    if not isinstance(value, dict):
        raise DocError(f"{request.where}: the body is not a JSON object")
    return text
