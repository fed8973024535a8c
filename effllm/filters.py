"""Document filters of `effllm prepare`: licence allow-lists, opt-outs, exact and near duplicates.

- Licences: every source has one (an SPDX id, or the explicit word "unknown"). With
  `--allow-licenses MIT,Apache-2.0` only sources with a listed licence are kept; "unknown" passes
  only when it is listed itself.
- Opt-outs: a file of patterns, one per line (`#` starts a comment). A document is dropped when
  its origin (the file's path, or a jsonl record's URL field) matches a pattern:
  - `https://site/path...`: the origin starts with it (a URL prefix);
  - `example.com`: the origin is a URL on that host or any subdomain of it (a domain);
  - anything else: a shell-style glob against the origin path (`*/private/*`, `/data/x.txt`).
- Exact duplicates: the sha256 of a document's text; the first occurrence (in source order) stays.
- Near duplicates (optional): MinHash over 5-word shingles (128 permutations), candidates found by
  locality-sensitive hashing (32 bands of 4 rows), kept when the estimated Jaccard similarity to
  every earlier kept document is below the threshold.
"""

from __future__ import annotations

import fnmatch
import hashlib
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from effllm.errors import DataError
from effllm.fsutil import sha256_file
from effllm.licenses import allowed as licence_allowed
from effllm.licenses import licence_list

UNKNOWN_LICENSE = "unknown"


def _url_key(url: str) -> str | None:
    """"host/path" of an http(s) URL, the host in lower case (ports kept); None for anything else.
    http and https give the same key: an opt-out covers both."""
    parts = urlparse(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return None
    return parts.netloc.lower() + (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _looks_like_host(segment: str) -> bool:
    return "." in segment and not segment.startswith((".", "/", "~")) and "*" not in segment and "?" not in segment


class OptOut:
    """Opt-out patterns read from a file (one per line, `#` starts a comment); `match(origin)` gives
    the first pattern that matches a document's origin, or None, and counts the matches per pattern
    (`matched`, recorded in the manifest, so a pattern that matched nothing shows). The rules:

    - a URL prefix, `https://example.com/private/`: origins under it, http or https alike, the host
      in any case; without a scheme, `example.com/private/`, the same;
    - a domain, `example.com` (no "/"): every URL on it and its subdomains;
    - anything else is a glob over file paths (`*` crosses folders): `/data/private/*` against the
      absolute path, and a relative one, `private/*.txt`, against any path that ends in it.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise DataError(f"opt-out file {path} does not exist")
        self.path = path
        self.patterns = []
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line and line not in self.patterns:
                self.patterns.append(line)
        self.matched = {p: 0 for p in self.patterns}

    @staticmethod
    def _matches(pattern: str, origin: str, url: str | None) -> bool:
        if "://" in pattern:
            key = _url_key(pattern)
            return (url or "").startswith(key) if key else origin.startswith(pattern)
        host, _, path = pattern.partition("/")
        if url is not None and _looks_like_host(host):  # a domain, or a URL prefix without its scheme
            if "/" not in pattern:
                url_host = url.split("/", 1)[0].split(":", 1)[0]
                return url_host == host.lower() or url_host.endswith("." + host.lower())
            return url.startswith(f"{host.lower()}/{path}")
        # a path glob: absolute against the whole path, relative against any path ending in it
        return fnmatch.fnmatchcase(origin, pattern) or (not pattern.startswith("/")
                                                        and fnmatch.fnmatchcase(origin, "*/" + pattern))

    def match(self, origin: str) -> str | None:
        url = _url_key(origin)
        for p in self.patterns:
            if self._matches(p, origin, url):
                self.matched[p] += 1
                return p
        return None


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class NearDuplicates:
    """MinHash + LSH over 5-word shingles; `seen(text)` is True for a near duplicate of an earlier
    text, else it remembers this one and returns False."""

    NUM_PERM, BANDS, SHINGLE = 128, 32, 5
    _PRIME = (1 << 31) - 1  # a, b, h < 2^31: a*h + b fits in uint64, so numpy computes it exactly

    def __init__(self, threshold: float):
        if not 0 < threshold <= 1:
            raise DataError(f"near-duplicate threshold must lie in (0, 1], got {threshold}")
        self.threshold = threshold
        rng = np.random.Generator(np.random.PCG64(20240601))  # fixed: prepare is a pure function of its input
        self.a = rng.integers(1, self._PRIME, size=(self.NUM_PERM, 1), dtype=np.uint64)
        self.b = rng.integers(0, self._PRIME, size=(self.NUM_PERM, 1), dtype=np.uint64)
        self.buckets: list[dict] = [{} for _ in range(self.BANDS)]
        self.signatures: list[np.ndarray] = []

    def signature(self, text: str) -> np.ndarray | None:
        words = text.split()
        if len(words) < self.SHINGLE:
            return None  # too short to compare: exact deduplication alone handles it
        shingles = {" ".join(words[i:i + self.SHINGLE]) for i in range(len(words) - self.SHINGLE + 1)}
        hashes = np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=4).digest(), "big") % self._PRIME
                           for s in sorted(shingles)], dtype=np.uint64)
        # (a*h + b) mod p for every permutation (rows) and shingle (columns), minimum over shingles
        return ((self.a * hashes[None, :] + self.b) % self._PRIME).min(axis=1)

    def seen(self, text: str) -> bool:
        sig = self.signature(text)
        if sig is None:
            return False
        rows = self.NUM_PERM // self.BANDS
        keys = [sig[i * rows:(i + 1) * rows].tobytes() for i in range(self.BANDS)]
        candidates = {j for band, key in zip(self.buckets, keys) for j in band.get(key, ())}
        for j in sorted(candidates):
            if float(np.mean(self.signatures[j] == sig)) >= self.threshold:
                return True
        index = len(self.signatures)
        self.signatures.append(sig)
        for band, key in zip(self.buckets, keys):
            band.setdefault(key, []).append(index)
        return False


DROP_REASONS = ("license", "opt_out", "exact_duplicate", "near_duplicate")


class DocumentFilter:
    """All of prepare's filters over a stream of documents, in source order: `verdict` says why a
    document is dropped (the first of DROP_REASONS that applies), or None to keep it, and counts
    the drops by reason."""

    def __init__(self, allow_licenses: tuple[str, ...] = (), opt_out: str | None = None,
                 near_dup_threshold: float = 0.0):
        self.allowed = set(licence_list(allow_licenses)) or None  # commas or spaces; SPDX-checked
        self.opt_out = OptOut(opt_out) if opt_out else None
        self.near = NearDuplicates(near_dup_threshold) if near_dup_threshold else None
        self.seen: set[str] = set()
        self.dropped = {reason: {"documents": 0, "bytes": 0} for reason in DROP_REASONS}

    def verdict(self, license: str, text: str, origin: str) -> str | None:
        reason = self._reason(license, text, origin)
        if reason is not None:
            self.dropped[reason]["documents"] += 1
            self.dropped[reason]["bytes"] += len(text.encode("utf-8"))
        return reason

    def _reason(self, license: str, text: str, origin: str) -> str | None:
        if self.allowed is not None and not licence_allowed(license, self.allowed):
            return "license"
        if self.opt_out is not None and self.opt_out.match(origin):
            return "opt_out"
        digest = text_sha256(text)
        if digest in self.seen:
            return "exact_duplicate"
        self.seen.add(digest)
        if self.near is not None and self.near.seen(text):
            return "near_duplicate"
        return None

    def manifest(self, near_dup_threshold: float) -> dict:
        """The manifest's record of the filters that ran."""
        opt_out, near = self.opt_out, self.near
        return {
            "allow_licenses": sorted(self.allowed) if self.allowed else None,
            "opt_out": ({"file": str(opt_out.path.resolve()), "sha256": sha256_file(opt_out.path),
                         "patterns": len(opt_out.patterns), "matched": dict(opt_out.matched)} if opt_out else None),
            "exact_dedup": "sha256 of each document's text; the first occurrence in source order is kept",
            "near_dedup": ({"threshold": near_dup_threshold, "method": f"MinHash, {near.NUM_PERM} permutations "
                            f"over {near.SHINGLE}-word shingles, LSH with {near.BANDS} bands"} if near else None),
        }
