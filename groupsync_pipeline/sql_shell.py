"""``groupsync sql``: read-only SQL on the analysts' data, one query or an interactive prompt.

pip installs no DuckDB command-line tool, so this is how people query what groupsync stored.
The session comes from ``analyst_data.open_analyst_data`` (read-only, no other files); results
are shown by ``investigation.render``, like ``groupsync activities``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from contextlib import ExitStack, suppress
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import duckdb
import pandas as pd

from groupsync_pipeline.analyst_data import AnalystDataError, analyst_data_path, open_analyst_data
from groupsync_pipeline.investigation import FORMATS, Found, render
from groupsync_pipeline.safe_text import for_terminal

TABLE_LIMIT = 1000  # rows a table shows by default; csv and json give every row
HISTORY_FILE = ".groupsync_sql_history"  # in the home directory, interactive sessions only
PROMPT, CONTINUATION = "groupsync> ", "     ...> "

# Statements that change only the session (or are refused anyway): nothing to show.
_SILENT = {
    duckdb.StatementType.SET,
    duckdb.StatementType.VARIABLE_SET,
    duckdb.StatementType.TRANSACTION,
    duckdb.StatementType.CREATE,
    duckdb.StatementType.DROP,
    duckdb.StatementType.ALTER,
    duckdb.StatementType.PREPARE,
    duckdb.StatementType.LOAD,
    duckdb.StatementType.ATTACH,
    duckdb.StatementType.DETACH,
}

HELP = """\
End each statement with ';' (it may span lines). Results show as a table; the tables and
views are described in the README ("Tables and views").
  .tables            list the tables and views
  .format FORMAT     table, csv or json
  .reload            reopen the lake (each query already reads its latest commit)
  .help              this text
  .quit              leave (also .exit or Ctrl-D)"""

Echo = Callable[[str], None]


class SqlError(Exception):
    """A statement failed; the message is one line, safe to print."""


def error_line(exc: BaseException) -> str:
    """DuckDB's message as one printable line, with what to do for what is refused."""
    lines = str(exc).strip().splitlines()
    text = for_terminal(lines[0] if lines else type(exc).__name__)
    if "read-only mode" in text:
        text += " (groupsync sql is read-only: only the pipeline changes the data)"
    elif isinstance(exc, duckdb.PermissionException):
        text += " (groupsync sql reads groupsync's data only: no other files or databases)"
    return text


def _blob(value: bytes) -> str:
    # DuckDB's own notation: printable ASCII as is, other bytes as \xNN.
    return "".join(chr(b) if 32 <= b < 127 and b != 92 else f"\\x{b:02X}" for b in value)


def _plain(value: Any) -> Any:
    """A value render can show and JSON can hold; times inside lists become ISO text."""
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return _blob(bytes(value))
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
        return value.isoformat()
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return str(value)
    return value


def _column(values: list[Any]) -> pd.Series:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, dt.datetime) for v in present):
        aware = all(v.tzinfo is not None for v in present)
        try:
            # Real timestamps: render shows them as ISO 8601 (UTC with Z when zoned).
            return pd.Series(pd.to_datetime(values, utc=aware), dtype=None)
        except (ValueError, OverflowError, pd.errors.OutOfBoundsDatetime):
            pass  # e.g. 'infinity': keep the text
    # object dtype: integers with NULLs stay integers, nothing is guessed.
    return pd.Series([_plain(v) for v in values], dtype=object)


def result_frame(names: list[str], rows: list[tuple[Any, ...]]) -> pd.DataFrame:
    """The rows as a DataFrame render understands (duplicate column names made unique)."""
    unique: list[str] = []
    for name in names:
        candidate, n = name, 1
        while candidate in unique:
            candidate, n = f"{name}_{n}", n + 1
        unique.append(candidate)
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in unique]
    return pd.DataFrame(
        {name: _column(list(col)) for name, col in zip(unique, columns, strict=True)}
    )


def run_statements(conn: duckdb.DuckDBPyConnection, text: str, limit: int) -> list[Found | None]:
    """Run every statement of ``text``; per statement its rows (up to ``limit``, 0: all) or
    None for one with nothing to show. Raises SqlError at the first failing statement."""
    try:
        statements = duckdb.extract_statements(text)
        results: list[Found | None] = []
        for statement in statements:
            conn.execute(statement)
            if statement.type in _SILENT or conn.description is None:
                results.append(None)
                continue
            names = [column[0] for column in conn.description]
            rows = conn.fetchmany(limit + 1) if limit else conn.fetchall()
            more = bool(limit) and len(rows) > limit
            results.append(Found(result_frame(names, rows[:limit] if more else rows), more))
        return results
    except duckdb.Error as exc:
        raise SqlError(error_line(exc)) from None


def count_line(found: Found) -> str:
    count = len(found.frame)
    noun = "row" if count == 1 else "rows"
    if found.more:
        return f"{count} {noun} shown; more match (--limit 0 shows all, or add LIMIT to the query)"
    return f"{count} {noun}"


def default_limit(fmt: str, limit: int | None) -> int:
    if limit is not None:
        return limit
    return TABLE_LIMIT if fmt == "table" else 0


def run_one(data_dir: Path, text: str, fmt: str, limit: int | None, out: Echo, err: Echo) -> None:
    """One query (or several; the last one's result is shown). Raises SqlError."""
    with open_analyst_data(data_dir) as conn:
        results = run_statements(conn, text, default_limit(fmt, limit))
    shown = [found for found in results if found is not None]
    if not shown:
        return
    found = shown[-1]
    output = render(found, fmt)
    if output:
        out(output)
    if fmt == "table" or found.more:
        err(count_line(found))  # stderr: piped csv and json stay clean


def statement_complete(text: str) -> bool:
    """True when ``text`` ends with ';' outside quotes and comments."""
    state, last = "code", ""
    i = 0
    while i < len(text):
        char, pair = text[i], text[i : i + 2]
        if state == "code":
            if char in "'\"":
                state = char
            elif pair == "--":
                state = "line"
            elif pair == "/*":
                state, i = "block", i + 1
            elif not char.isspace():
                last = char
                i += 1
                continue
        elif state in "'\"" and char == state:
            state = "code"
            last = char
        elif state == "line" and char == "\n":
            state = "code"
        elif state == "block" and pair == "*/":
            state, i = "code", i + 1
        i += 1
    return state in ("code", "line") and last == ";"


class Shell:
    """The interactive prompt (or a script read from stdin)."""

    def __init__(
        self, data_dir: Path, fmt: str, limit: int | None, out: Echo, err: Echo, interactive: bool
    ) -> None:
        self.data_dir = data_dir
        self.fmt = fmt
        self.limit = limit
        self.out = out
        self.err = err
        self.interactive = interactive
        self.errors = 0
        self.conn: duckdb.DuckDBPyConnection | None = None
        self._sessions = ExitStack()

    def run(self, read_line: Callable[[str], str | None]) -> int:
        """Read and run statements until .quit or the end of input; the number of errors."""
        with ExitStack() as self._sessions:
            self._open()
            if self.interactive:
                self.out(
                    f"groupsync sql: read-only SQL on {analyst_data_path(self.data_dir)}\n"
                    "End statements with ';'. .help lists the commands, .quit leaves."
                )
            buffer: list[str] = []
            while True:
                try:
                    line = read_line(CONTINUATION if buffer else PROMPT)
                except KeyboardInterrupt:  # Ctrl-C drops the statement being typed
                    self.out("")
                    buffer = []
                    continue
                if line is None:
                    if self.interactive:
                        self.out("")
                    if "".join(buffer).strip():
                        self._execute("\n".join(buffer))  # a last statement without ';'
                    break
                if not buffer and line.strip().startswith("."):
                    if not self._command(line.strip()):
                        break
                    continue
                buffer.append(line)
                text = "\n".join(buffer)
                if statement_complete(text):
                    self._execute(text)
                    buffer = []
        return self.errors

    def _open(self) -> None:
        # A fresh session on the lake (each statement reads the latest committed snapshot).
        opened = self._sessions.enter_context(open_analyst_data(self.data_dir))
        if self.conn is not None:
            self.conn.close()
        self.conn = opened

    def _execute(self, text: str) -> None:
        assert self.conn is not None  # opened by run()
        limit = default_limit(self.fmt, self.limit)
        try:
            results = run_statements(self.conn, text, limit)
        except SqlError as exc:
            self._error(str(exc))
            return
        except KeyboardInterrupt:
            self._error("interrupted")
            return
        for found in results:
            if found is None:
                continue
            output = render(found, self.fmt)
            if output:
                self.out(output)
            self.err(count_line(found))

    def _error(self, message: str) -> None:
        self.errors += 1
        self.err(f"Error: {message}")

    def _command(self, command: str) -> bool:
        """Run a dot command; False to leave."""
        name, _, argument = command.partition(" ")
        argument = argument.strip()
        if name in (".quit", ".exit"):
            return False
        if name == ".help":
            self.out(HELP)
        elif name == ".tables":
            self._execute(
                "SELECT table_name AS name, lower(table_type) AS kind "
                "FROM information_schema.tables WHERE table_schema = 'main' "
                "AND NOT starts_with(table_name, '_') ORDER BY table_name;"
            )
        elif name == ".format":
            if argument not in FORMATS:
                self._error(f".format takes one of {', '.join(FORMATS)}")
            else:
                self.fmt = argument
        elif name == ".reload":
            try:
                self._open()
            except AnalystDataError as exc:  # the session so far stays usable
                self._error(str(exc))
        else:
            self._error(f"unknown command {for_terminal(name)} (.help lists the commands)")
        return True


def stdin_reader(stream: Any) -> Callable[[str], str | None]:
    """Lines from a script on stdin (no prompts)."""

    def read(_prompt: str) -> str | None:
        line = stream.readline()
        return None if line == "" else line.rstrip("\n")

    return read


def terminal_reader() -> Callable[[str], str | None]:
    """Lines typed at a terminal, with line editing and history when readline is available."""
    try:
        import atexit
        import readline

        history = Path.home() / HISTORY_FILE
        with suppress(OSError):
            readline.read_history_file(history)
        readline.set_history_length(1000)

        def save() -> None:
            with suppress(OSError):
                readline.write_history_file(history)

        atexit.register(save)
    except ImportError:
        pass

    def read(prompt: str) -> str | None:
        try:
            return input(prompt)
        except EOFError:
            return None

    return read
