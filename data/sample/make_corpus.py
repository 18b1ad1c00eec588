"""Rebuild data/sample/austen.jsonl from Debian's r-cran-janeaustenr package (run once, by hand).

    apt-get download r-cran-janeaustenr && dpkg -x r-cran-janeaustenr_*.deb janeaustenr
    python3 data/sample/make_corpus.py janeaustenr/usr/lib/R/site-library/janeaustenr/data

The package keeps each novel as an R character vector (one line of text per element) in R's
lazy-load database: Rdata.rdx (gzip'd serialized index of offsets) and Rdata.rdb (for each object
a 4-byte big-endian length, then zlib'd XDR serialization). Only what these files use is parsed.
"""
import gzip
import json
import re
import struct
import sys
import zlib
from pathlib import Path

NOVELS = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion"]


class _XDR:
    """Minimal reader of R's XDR serialization: vectors, pairlists, symbols, strings."""

    def __init__(self, buf: bytes):
        if buf[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.buf, self.pos, self.refs = buf, 2, []
        version = self.int()
        self.pos += 8  # writer and minimal reader versions
        if version == 3:
            n = self.int()  # (read first: `self.pos += self.int()` would use the old pos)
            self.pos += n   # skip the native encoding name

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.buf, self.pos)
        self.pos += 4
        return v

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (254, 242):  # NILVALUE, EMPTYENV
            return None
        if kind == 255:  # reference to an earlier symbol
            return self.refs[(flags >> 8) - 1]
        if kind == 1:  # symbol: its name follows as a CHARSXP
            name = self.item()
            self.refs.append(name)
            return name
        if kind == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            s = self.buf[self.pos:self.pos + n].decode("utf-8", "replace")
            self.pos += n
            return s
        if kind == 2:  # pairlist node: [attributes] [tag] car cdr
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            car, cdr = self.item(), self.item()
            return [(tag, car)] + (cdr or [])
        n = self.int()
        if kind in (16, 19):  # character vector, generic vector
            out = [self.item() for _ in range(n)]
        elif kind in (10, 13):  # logical, integer
            out = list(struct.unpack_from(f">{n}i", self.buf, self.pos))
            self.pos += 4 * n
        elif kind == 14:  # double
            out = list(struct.unpack_from(f">{n}d", self.buf, self.pos))
            self.pos += 8 * n
        else:
            raise ValueError(f"unsupported R type {kind}")
        attrs = dict(self.item()) if has_attr else {}
        if kind == 19 and "names" in attrs:  # named list -> dict
            return dict(zip(attrs["names"], out))
        return out


def _paragraphs(lines: list[str]) -> list[str]:
    """Join wrapped lines into paragraphs (blank lines separate them)."""
    paras, cur = [], []
    for line in lines + [""]:
        if line and line.strip():
            cur.append(line.strip())
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    return paras


def _chapters(paras: list[str]) -> list[str]:
    """Group paragraphs into chapters; a chapter heading ("CHAPTER 1", "Chapter I") starts a new one."""
    docs, cur = [], []
    for p in paras:
        if re.match(r"^(CHAPTER|Chapter)\s+[0-9IVXLC]+\.?$", p) and cur:
            docs.append("\n\n".join(cur))
            cur = []
        cur.append(p)
    if cur:
        docs.append("\n\n".join(cur))
    return docs


def main(data_dir: str, out: str = "data/sample/austen.jsonl") -> None:
    # the index is a named list; "variables" maps each object's name to (offset, length) in the .rdb
    variables = _XDR(gzip.decompress(Path(data_dir, "Rdata.rdx").read_bytes())).item()["variables"]
    rdb = Path(data_dir, "Rdata.rdb").read_bytes()
    n_docs = 0
    with open(out, "w", encoding="utf-8") as f:
        for name in NOVELS:
            off, length = (int(v) for v in variables[name])
            lines = _XDR(zlib.decompress(rdb[off + 4:off + length])).item()
            for chapter in _chapters(_paragraphs([s or "" for s in lines])):
                f.write(json.dumps({"text": chapter, "source": name}, ensure_ascii=False) + "\n")
                n_docs += 1
    print(f"wrote {n_docs} documents to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
