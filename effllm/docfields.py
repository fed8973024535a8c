"""`documented`: a config dataclass's field comments, in its docstring, so `help()` shows them.

Each config field carries its meaning as a trailing comment, which is what `effllm <command>
--help` shows (tyro reads it). `help(MoEConfig)` shows the docstring, so `documented` appends a
"Fields" section built from the same comments: one text, two places to read it.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import textwrap
import tokenize


def field_comments(cls: type) -> dict[str, str]:
    """{field name: its trailing comment} for the fields of dataclass `cls` whose definition line
    ends in a comment; {} when the source cannot be read (an interactive session, a frozen app)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    first_name, out = {}, {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            row = tok.start[0]
            if tok.type == tokenize.NAME and row not in first_name:
                first_name[row] = (tok.string, tok.start[1])
            elif tok.type == tokenize.COMMENT and row in first_name:
                name, col = first_name[row]
                if name in names and col == 4:  # a field of the class body, not of a method
                    out.setdefault(name, tok.string.lstrip("#").strip())
    except (tokenize.TokenError, IndentationError):
        return {}
    return out


def documented(cls: type) -> type:
    """Class decorator (above @dataclass): append "Fields:" to `cls.__doc__`, one line per field
    with its default and comment."""
    comments = field_comments(cls)
    if not comments:
        return cls
    lines = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f" = {f.default!r}"
        elif f.default_factory is not dataclasses.MISSING:
            default = f" = {getattr(f.default_factory, '__name__', 'factory')}()"
        else:
            default = " (required)"
        comment = comments.get(f.name)
        lines.append(f"    {f.name}{default}" + (f": {comment}" if comment else ""))
    cls.__doc__ = (inspect.cleandoc(cls.__doc__ or "") + "\n\nFields:\n" + "\n".join(lines)).strip()
    return cls
