"""A real text-classification set reachable offline: Debian package descriptions labelled with their
archive section (``python``, ``perl``, ``games``...), read from the package lists ``apt-get update`` fetches.

Each example is one binary package of Debian ``bookworm`` ``main``: the text is its English description
(the synopsis, then the long description), the label its section. Sources of the lists:

* ``Packages`` (what every ``apt-get update`` fetches) holds only the synopsis; the long descriptions are in
  ``Translation-en``, which container images often skip (``Acquire::Languages "none"``). When it is missing
  the loader runs ``apt-get update`` into a private directory under the cache with
  ``-o Acquire::Languages=en`` (about 15 MB); the machine's own apt state is not touched.

Stability and leakage:

* binaries built from one *source* package (``libfoo1`` / ``libfoo-dev`` / ``foo-doc``) are near-duplicates,
  so the split is made by a hash of the source name: all of a source's binaries land in one split, and a
  source's split never depends on which other packages exist;
* one binary per (source, section) is kept (the one named like the source, else the shortest name);
  transitional/dummy packages and repeated texts are dropped;
* ``max_per_class`` keeps, per class and split, the examples with the smallest hash;
* the result is cached as JSON (``$XDG_CACHE_HOME`` or ``~/.cache``, then ``adaexit/debian_text/``) with
  its provenance (the release's ``Version`` and ``Date`` and the MD5 of the lists), so reruns are exact
  and need no apt. Bookworm is a stable release: its lists change only at point releases.
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
from pathlib import Path

from ..common import cache_dir

DEFAULT_CLASSES = ("admin", "devel", "doc", "games", "net", "perl", "python", "science", "sound", "utils")
SPLIT_SHARES = {"test": 0.15, "val": 0.15, "train": 0.70}
SALT = "adaexit-debian-v1"
FORMAT_VERSION = 1
_TRANSITIONAL = re.compile(r"transitional (dummy )?package|dummy transitional|\bdummy package\b", re.I)


def default_cache() -> Path:
    return cache_dir("debian_text")


# -- apt's lists ----------------------------------------------------------------------------------
def read_list(path: str) -> str:
    """An apt list file as text, whatever compression apt kept (lz4 / gz / xz / zst / none)."""
    helper = "/usr/lib/apt/apt-helper"
    if os.path.exists(helper):
        return subprocess.run([helper, "cat-file", path], capture_output=True, text=True, check=True).stdout
    if path.endswith(".lz4") and shutil.which("lz4cat"):
        return subprocess.run(["lz4cat", path], capture_output=True, text=True, check=True).stdout
    opener = {".gz": gzip.open, ".xz": lzma.open}.get(Path(path).suffix, open)
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read()


def _index_targets(apt_options: list[str], created_by: str, release: str) -> list[str]:
    """The list files apt has for ``release`` main (``apt-get indextargets``: no guessing of file names)."""
    out = subprocess.run(
        ["apt-get", "indextargets", *apt_options, "--format", "$(FILENAME)\t$(CODENAME)\t$(COMPONENT)\t$(LANGUAGE)",
         f"Created-By: {created_by}"], capture_output=True, text=True, check=True).stdout  # fmt: skip
    files = []
    for line in out.splitlines():
        name, codename, component, language = (line.split("\t") + ["", "", "", ""])[:4]
        if codename == release and component == "main" and (created_by != "Translations" or language == "en"):
            if os.path.exists(name):
                files.append(name)
    return files


def _private_apt(root: Path, release: str, mirror: str) -> list[str]:
    """apt options for an ``apt-get update`` into ``root`` that leaves the machine's apt state alone."""
    for sub in ("lists/partial", "cache/archives/partial", "sources.list.d"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    sources = root / "sources.list"
    sources.write_text(f"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {mirror} {release} main\n")
    return [f"-oDir::State::Lists={root / 'lists'}", f"-oDir::Etc::SourceList={sources}",
            f"-oDir::Etc::SourceParts={root / 'sources.list.d'}", f"-oDir::Cache={root / 'cache'}",
            "-oAcquire::Languages=en"]  # fmt: skip


def find_lists(release: str, cache: Path, long_descriptions: bool, mirror: str = "http://deb.debian.org/debian"):
    """``(Packages, Translation-en or None, InRelease or None)`` for ``release`` main, fetched privately
    into ``cache`` when the machine's lists lack them."""
    packages = _index_targets([], "Packages", release)
    translations = _index_targets(["-oAcquire::Languages=en"], "Translations", release)
    if not (packages and (translations or not long_descriptions)):
        options = _private_apt(cache / "apt", release, mirror)
        try:
            subprocess.run(["apt-get", "update", "-qq", *options], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as err:
            raise FileNotFoundError(
                f"Debian {release} package lists are not on this machine and apt-get update failed ({err}); "
                "the text task needs a Debian machine with network access to its mirror once"
            ) from err
        packages = _index_targets(options, "Packages", release)
        translations = _index_targets(options, "Translations", release)
    if not packages:
        raise FileNotFoundError(f"no Packages list for Debian {release} main")
    return packages[0], (translations[0] if translations else None), _in_release(packages[0])


def _in_release(packages_file: str) -> str | None:
    match = re.match(r"(.*_dists_[^_]+)_", packages_file)
    for suffix in ("_InRelease", "_Release") if match else ():
        if os.path.exists(match.group(1) + suffix):
            return match.group(1) + suffix
    return None


def records(text: str):
    """deb822 records (``Key: value`` paragraphs, continuation lines start with a space)."""
    for block in text.split("\n\n"):
        record, key = {}, None
        for line in block.split("\n"):
            if line[:1] in (" ", "\t") and key is not None:
                record[key] += "\n" + line
            elif line:
                key, _, value = line.partition(":")
                record[key] = value.strip()
        if record:
            yield record


def provenance(in_release: str | None) -> dict:
    """The release's identity and the MD5 of its lists (what makes the data set reproducible)."""
    if not in_release:
        return {}
    text = Path(in_release).read_text(errors="replace")
    found = {}
    for key in ("Origin", "Suite", "Codename", "Version", "Date"):
        match = re.search(rf"^{key}: (.*)$", text, re.M)
        if match:
            found[key] = match.group(1).strip()
    for name in ("main/binary-amd64/Packages", "main/i18n/Translation-en"):
        match = re.search(rf"^ ([0-9a-f]{{32}}) +\d+ {re.escape(name)}$", text, re.M)
        if match:
            found[f"md5 {name}"] = match.group(1)
    return found


# -- the data set ---------------------------------------------------------------------------------
def _unit_hash(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16) / 16**12


def _description(english: str) -> tuple[str, str]:
    """Synopsis and long description (paragraphs joined) of a ``Description-en`` field."""
    lines = english.split("\n")
    paragraphs, current = [], []
    for line in (ln.strip() for ln in lines[1:]):
        if line == ".":
            paragraphs.append(" ".join(current))
            current = []
        else:
            current.append(line)
    paragraphs.append(" ".join(current))
    return lines[0].strip(), " ".join(p for p in paragraphs if p)


def build(packages_text: str, translation_text: str | None, classes, max_per_class: int | None,
          salt: str = SALT) -> list[dict]:
    """Rows ``{text, label, package, source, split}`` from the texts of a Packages and a Translation-en list
    (``None``: synopses only)."""
    english = {}
    for record in records(translation_text or ""):
        if "Description-en" in record:
            english[(record["Package"], record.get("Description-md5", ""))] = record["Description-en"]
    chosen = {}
    for record in records(packages_text):
        section = record.get("Section", "")
        if section not in classes:
            continue
        package = record["Package"]
        source = record.get("Source", package).split(" ")[0]
        synopsis, long = record.get("Description", "").split("\n")[0].strip(), ""
        if translation_text is not None:
            full = english.get((package, record.get("Description-md5", "")))
            if full is None:
                continue
            synopsis, long = _description(full)
        if _TRANSITIONAL.search(synopsis) or _TRANSITIONAL.search(long):
            continue
        rank = (package != source, len(package), package)  # named like the source, else the shortest
        key = (source, section)
        if key not in chosen or rank < chosen[key][0]:
            chosen[key] = (rank, f"{synopsis}. {long}" if long else synopsis, package)
    seen, rows = set(), []
    for (source, section), (_, text, package) in sorted(chosen.items(), key=lambda kv: (_unit_hash(salt + ":" + kv[0][0]), kv[0])):
        normalised = re.sub(r"\W+", " ", text.lower()).strip()
        if normalised in seen:
            continue
        seen.add(normalised)
        u, split = _unit_hash(salt + ":" + source), "train"
        if u < SPLIT_SHARES["test"]:
            split = "test"
        elif u < SPLIT_SHARES["test"] + SPLIT_SHARES["val"]:
            split = "val"
        rows.append({"text": text, "label": list(classes).index(section), "package": package, "source": source,
                     "split": split, "order": _unit_hash(salt + ":order:" + package)})
    if max_per_class:
        caps = {s: max(1, round(max_per_class * share)) for s, share in SPLIT_SHARES.items()}
        groups = collections.defaultdict(list)
        for row in rows:
            groups[(row["split"], row["label"])].append(row)
        rows = [r for (split, _), g in groups.items() for r in sorted(g, key=lambda r: r["order"])[: caps[split]]]
    rows.sort(key=lambda r: r["order"])
    return rows


def load_debian_descriptions(classes=DEFAULT_CLASSES, max_per_class: int | None = 1000, release: str = "bookworm",
                             long_descriptions: bool = True, cache: str | os.PathLike | None = None,
                             refresh: bool = False) -> dict:
    """The data set: ``{"train" | "val" | "test": [(text, label), ...], "classes": [...], "provenance": {...},
    "cache_file": path}``; label indexes ``classes``. Built once from apt's lists, then read from the cache."""
    classes = tuple(classes)
    cache = Path(cache) if cache is not None else default_cache()
    config = {"v": FORMAT_VERSION, "classes": classes, "long": long_descriptions, "max": max_per_class,
              "release": release, "salt": SALT}
    tag = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    path = cache / f"debian_text_{release}_{tag}.json"
    if path.exists() and not refresh:
        data = json.loads(path.read_text())
    else:
        packages, translations, in_release = find_lists(release, cache, long_descriptions)
        rows = build(read_list(packages), read_list(translations) if long_descriptions and translations else None,
                     classes, max_per_class)
        data = {"config": config, "provenance": provenance(in_release), "classes": list(classes),
                "rows": [{k: r[k] for k in ("text", "label", "package", "source", "split")} for r in rows]}
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, ensure_ascii=False))
        tmp.replace(path)  # atomic: an interrupted run never leaves a half-written data set
    out = {s: [(r["text"], r["label"]) for r in data["rows"] if r["split"] == s] for s in SPLIT_SHARES}
    return {**out, "classes": data["classes"], "provenance": data["provenance"], "cache_file": str(path)}


__all__ = ["DEFAULT_CLASSES", "build", "load_debian_descriptions", "provenance", "read_list", "records"]
