"""What a prepared corpus holds, for its manifest and the summaries written from it (the model card,
the EU training-content summary): each document's language and, for a document whose origin is a
URL, its domain.

- Language: a document whose file extension names a programming language counts as code in that
  language (`code:Python`); any other is identified by py3langid (a naive-Bayes identifier that
  ships its model; nothing is downloaded) from its first `SAMPLE_CHARS` characters, as an ISO 639-1
  code; an empty one is `und`. The method is recorded beside the figures.
- Domain: the host of an http(s) origin, in lower case, without port or credentials.
- Collection period (`--date-field`): the earliest and latest of the documents' dates.

`ContentStats` adds documents up per source and in total (documents, bytes of text, train and val
tokens), ranked by train tokens (languages) and by bytes (domains).
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import PurePosixPath
from urllib.parse import urlsplit

SAMPLE_CHARS = 4096  # characters of a document the language identifier reads

CODE_EXTENSIONS = {
    ".py": "Python", ".pyi": "Python", ".c": "C", ".h": "C", ".cc": "C++", ".cpp": "C++", ".hpp": "C++",
    ".rs": "Rust", ".go": "Go", ".java": "Java", ".js": "JavaScript", ".ts": "TypeScript", ".rb": "Ruby",
    ".sh": "Shell", ".jl": "Julia", ".lua": "Lua", ".swift": "Swift", ".kt": "Kotlin", ".scala": "Scala",
    ".cs": "C#", ".php": "PHP", ".r": "R", ".sql": "SQL", ".hs": "Haskell", ".ml": "OCaml", ".zig": "Zig",
}


def language_method() -> str:
    return (f"code by file extension; other text by py3langid {version('py3langid')} on the first {SAMPLE_CHARS} "
            "characters of each document (ISO 639-1 codes; und = empty)")


def language_of(doc_id: str, text: str) -> str:
    """`code:<language>` for a source file of a programming language, else the identified language."""
    suffix = PurePosixPath(doc_id.split(":")[0]).suffix.lower()  # a jsonl record's id ends in ":line"
    if suffix in CODE_EXTENSIONS:
        return f"code:{CODE_EXTENSIONS[suffix]}"
    sample = text[:SAMPLE_CHARS]
    if not sample.strip():
        return "und"
    import py3langid  # loads its model on first use: only prepare needs it

    return py3langid.classify(sample)[0]


def domain_of(origin: str) -> str | None:
    """The host of an http(s) URL, lower case; None for a file path or anything else."""
    parts = urlsplit(origin)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return None
    return parts.hostname.lower()


def _ranked(counts: dict[str, dict], key: str, name: str) -> list[dict]:
    return [{name: k, **v} for k, v in sorted(counts.items(), key=lambda kv: (-kv[1][key], kv[0]))]


class ContentStats:
    """Per-language and per-domain counts, per source and in total."""

    def __init__(self, n_sources: int, date_field: str | None = None):
        self.languages = [dict() for _ in range(n_sources)]
        self.domains = [dict() for _ in range(n_sources)]
        self.date_field = date_field
        self.dates: list[str] = []  # the earliest and latest date seen
        self.undated = 0

    def add(self, source: int, language: str, domain: str | None, n_bytes: int, split: str, tokens: int,
            date: str | None = None) -> None:
        row = self.languages[source].setdefault(language, {"documents": 0, "bytes": 0, "train_tokens": 0,
                                                           "val_tokens": 0})
        row["documents"] += 1
        row["bytes"] += n_bytes
        row[f"{split}_tokens"] += tokens
        if date is None:
            self.undated += 1
        else:
            self.dates = [min(self.dates[0], date), max(self.dates[1], date)] if self.dates else [date, date]
        if domain is not None:
            d = self.domains[source].setdefault(domain, {"documents": 0, "bytes": 0})
            d["documents"] += 1
            d["bytes"] += n_bytes

    @staticmethod
    def _total(per_source: list[dict[str, dict]]) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for counts in per_source:
            for k, v in counts.items():
                row = out.setdefault(k, dict.fromkeys(v, 0))
                for field, n in v.items():
                    row[field] += n
        return out

    def collection(self) -> dict:
        """The collection period from the documents' dates (`--date-field`)."""
        return {"field": self.date_field, "earliest": self.dates[0] if self.dates else None,
                "latest": self.dates[1] if self.dates else None, "documents_dated": self.documents - self.undated,
                "documents_undated": self.undated}

    @property
    def documents(self) -> int:
        return sum(r["documents"] for s in self.languages for r in s.values())

    def manifest(self) -> dict:
        return {
            "languages": {"method": language_method(),
                          "total": _ranked(self._total(self.languages), "train_tokens", "language"),
                          "by_source": [_ranked(s, "train_tokens", "language") for s in self.languages]},
            "domains": {"method": "the host of each document's http(s) origin (a record's or row's --origin-field), lower case",
                        "total": _ranked(self._total(self.domains), "bytes", "domain"),
                        "by_source": [_ranked(s, "bytes", "domain") for s in self.domains]},
        }
