"""Reading the documents as a user reads them: fenced blocks, their `# needs:` markers, the commands in a bash block
(with their flags and the values given to them), markdown links and GitHub's heading anchors. Pure text functions;
``tests/test_documentation.py`` checks what they return against the code."""

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

# What a block may need that the documentation test's machine lacks; a block without a marker is run by the test.
NEEDS = ("GPU", "several GPUs", "a cluster", "your data", "a published checkpoint", "a fresh virtual environment",
         "minutes of CPU time", "hours of CPU time")
MARKER = re.compile(r"^# needs: (.+)$")
FENCE = re.compile(r"^```(\w*)\s*$")
OPERATORS = {"&&", "||", "|", ";", "(", ")", "&"}
WRAPPERS = {"srun", "time", "nohup", "env"}  # run the command that follows them
ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=")
REFERENCE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")
HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`[^`\n]*`")


@dataclass
class Block:
    """One fenced block of a markdown file; ``line`` is the line of its opening fence (1-based)."""

    path: Path
    line: int
    language: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"

    def needs(self) -> Optional[List[str]]:
        """The items of its `# needs:` marker (first line, or second after a shebang), or None when unmarked."""
        lines = self.text.splitlines()
        candidates = lines[1:2] if lines and lines[0].startswith("#!") else lines[:1]
        for line in candidates:
            match = MARKER.match(line.strip())
            if match:
                return [item.strip() for item in re.sub(r"\s*\(.*\)$", "", match.group(1)).split(",")]
        return None


@dataclass
class Command:
    """A simple command of a bash block: its word, its arguments, and the variables assigned in front of it."""

    word: str
    arguments: List[str]
    assignments: List[str] = field(default_factory=list)


def fenced_blocks(path: Path) -> List[Block]:
    blocks, language, start, body = [], None, 0, []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        match = FENCE.match(line)
        if language is None and match:
            language, start, body = match.group(1), number, []
        elif language is not None and line.strip() == "```":
            blocks.append(Block(path, start, language, "\n".join(body)))
            language = None
        elif language is not None:
            body.append(line)
    return blocks


def bash_blocks(path: Path) -> List[Block]:
    return [block for block in fenced_blocks(path) if block.language == "bash"]


def without_heredocs(text: str) -> str:
    """The shell text of a block: here-document bodies (a Python script fed to ``python -``) removed."""
    kept, delimiter = [], None
    for line in text.splitlines():
        if delimiter is not None:
            if line.strip() == delimiter:
                delimiter = None
            continue
        kept.append(line)
        match = HEREDOC.search(line)
        if match:
            delimiter = match.group(1)
    return "\n".join(kept)


def shell_tokens(line: str) -> List[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def commands(block: Block) -> List[Command]:
    """Every simple command of a bash block, wrappers (``srun``) and ``export`` resolved."""
    text = without_heredocs(block.text).replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        current: List[str] = []
        for token in shell_tokens(line) + [";"]:
            if token in OPERATORS or set(token) <= set("<>&|;()"):
                if current:
                    found.append(_command(current))
                current = []
            else:
                current.append(token)
    return [command for command in found if command is not None]


def _command(tokens: List[str]) -> Optional[Command]:
    assignments = []
    while tokens and ASSIGNMENT.match(tokens[0]):
        assignments.append(ASSIGNMENT.match(tokens[0]).group(1))
        tokens = tokens[1:]
    if tokens and tokens[0] == "export":
        assignments += [ASSIGNMENT.match(t).group(1) for t in tokens[1:] if ASSIGNMENT.match(t)]
        return Command("export", [], assignments)
    while tokens and tokens[0] in WRAPPERS:
        tokens = tokens[1:]
        while tokens and tokens[0].startswith("-"):
            tokens = tokens[1:]
    if not tokens:
        return Command("", [], assignments) if assignments else None
    return Command(tokens[0], tokens[1:], assignments)


def variables(block: Block) -> Set[str]:
    """Every variable a block assigns or reads (``NAME=...``, ``export NAME=...``, ``$NAME``, ``${NAME}``)."""
    names = set(REFERENCE.findall(without_heredocs(block.text)))
    for command in commands(block):
        names.update(command.assignments)
    return names


def is_option(token: str) -> bool:
    return bool(re.match(r"^--?[A-Za-z]", token))


def split_options(arguments: List[str], nargs_of) -> Tuple[List[Tuple[str, List[str]]], List[str]]:
    """(option, values) pairs and positionals of a command line; ``nargs_of(option)`` is the parser's nargs of an
    option (None for a single value, 0 for a flag)."""
    options, positionals, index = [], [], 0
    while index < len(arguments):
        token = arguments[index]
        index += 1
        if not is_option(token):
            positionals.append(token)
            continue
        name, _, inline = token.partition("=")
        nargs = nargs_of(name)
        values = [inline] if inline else []
        if not inline and nargs != 0:
            wanted = 1 if nargs in (None, "?") else nargs if isinstance(nargs, int) else len(arguments)
            while index < len(arguments) and len(values) < wanted and not is_option(arguments[index]):
                values.append(arguments[index])
                index += 1
        options.append((name, values))
    return options, positionals


def launcher_split(arguments: List[str], nargs_of) -> Tuple[List[str], List[str]]:
    """A launcher's own arguments (``torchrun --nproc_per_node 2 --no-python``) and the command it launches: the
    first positional and everything after it."""
    index = 0
    while index < len(arguments) and is_option(arguments[index]):
        name, _, inline = arguments[index].partition("=")
        index += 1 if inline or nargs_of(name) == 0 else 2
    return arguments[:index], arguments[index:]


def links(path: Path) -> List[str]:
    """Link targets of a markdown file, outside code blocks and code spans."""
    return LINK.findall("\n".join(CODE_SPAN.sub("", line) for line in _lines_outside_blocks(path)))


def anchors(path: Path) -> Set[str]:
    """GitHub's anchors of a markdown file's headings."""
    found: Dict[str, int] = {}
    for line in _lines_outside_blocks(path):
        match = re.match(r"^#{1,6}\s+(.+?)\s*$", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).lower().replace("`", "")).replace(" ", "-")
            found[slug] = found.get(slug, -1) + 1
            if found[slug]:
                found[f"{slug}-{found[slug]}"] = 0
    return set(found)


def _lines_outside_blocks(path: Path) -> List[str]:
    lines, inside = [], False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            inside = not inside
        elif not inside:
            lines.append(line)
    return lines


def table_first_cells(path: Path) -> List[str]:
    """The first cell of every markdown table row (header rows and separators included)."""
    return [line.split("|")[1] for line in _lines_outside_blocks(path) if line.startswith("|")]
