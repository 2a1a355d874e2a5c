"""The Hugging Face encoders job: the Debian text task's parsing, split and caps on hand-made apt lists, and
a smoke run of the ViT system end to end (train, calibrate, measure)."""

import json

import pytest

from adaexit.apps.encoders import debian

PACKAGES = """Package: python3-foo
Source: foo
Section: python
Description: Python 3 library for foo
Description-md5: 11111111111111111111111111111111

Package: foo-doc
Source: foo
Section: doc
Description: documentation for foo
Description-md5: 22222222222222222222222222222222

Package: libfoo-perl
Section: perl
Description: Perl module for foo
Description-md5: 33333333333333333333333333333333

Package: oldfoo
Source: foo
Section: python
Description: transitional dummy package
Description-md5: 44444444444444444444444444444444

Package: bar
Section: games
Description: a game
Description-md5: 55555555555555555555555555555555

Package: baz
Section: games
Description: a game
Description-md5: 66666666666666666666666666666666

Package: qux
Section: kernel
Description: not one of the classes
Description-md5: 77777777777777777777777777777777
"""

TRANSLATION = """Package: python3-foo
Description-md5: 11111111111111111111111111111111
Description-en: Python 3 library for foo
 It parses foo files.
 .
 Second paragraph.

Package: foo-doc
Description-md5: 22222222222222222222222222222222
Description-en: documentation for foo
 HTML manual.

Package: libfoo-perl
Description-md5: 33333333333333333333333333333333
Description-en: Perl module for foo
 .

Package: bar
Description-md5: 55555555555555555555555555555555
Description-en: a game
 Fun.

Package: baz
Description-md5: 66666666666666666666666666666666
Description-en: a game
 Fun.
"""


def test_debian_rows_from_hand_made_lists():
    classes = ("python", "doc", "perl", "games")
    rows = debian.build(PACKAGES, TRANSLATION, classes, max_per_class=None)
    by_package = {r["package"]: r for r in rows}
    # transitional packages, other sections and repeated texts are dropped ("bar" and "baz" read the same)
    assert set(by_package) == {"python3-foo", "foo-doc", "libfoo-perl", "bar"} or set(by_package) == {
        "python3-foo", "foo-doc", "libfoo-perl", "baz"}
    assert by_package["python3-foo"]["text"] == "Python 3 library for foo. It parses foo files. Second paragraph."
    assert by_package["libfoo-perl"]["text"] == "Perl module for foo"
    assert by_package["foo-doc"]["label"] == classes.index("doc")
    # all binaries of a source land in one split (no near-duplicate leaks across splits)
    assert by_package["python3-foo"]["split"] == by_package["foo-doc"]["split"]
    synopses = debian.build(PACKAGES, None, classes, max_per_class=None)
    assert {r["text"] for r in synopses} >= {"Python 3 library for foo", "documentation for foo"}
    assert debian.build(PACKAGES, TRANSLATION, classes, max_per_class=None) == rows  # deterministic


def test_debian_loader_reads_its_cache(tmp_path, monkeypatch):
    rows = debian.build(PACKAGES, TRANSLATION, debian.DEFAULT_CLASSES, max_per_class=None)
    calls = []
    monkeypatch.setattr(debian, "find_lists", lambda *a: calls.append(a) or ("p", "t", None))
    monkeypatch.setattr(debian, "read_list", lambda path: PACKAGES if path == "p" else TRANSLATION)
    first = debian.load_debian_descriptions(cache=tmp_path, max_per_class=None)
    again = debian.load_debian_descriptions(cache=tmp_path, max_per_class=None)
    assert len(calls) == 1 and first == again  # the second call never touched apt
    assert sum(len(first[s]) for s in ("train", "val", "test")) == len(rows)
    assert json.loads(open(first["cache_file"]).read())["classes"] == list(debian.DEFAULT_CLASSES)


@pytest.mark.slow
def test_vit_system_smoke(tmp_path):
    pytest.importorskip("transformers", reason="the encoders job needs transformers (adaexit[hf])")
    from adaexit.__main__ import main

    out = tmp_path / "out"
    code = main(["encoders", "--systems", "vit", "--smoke", "--time-rows", "4", "--repeats", "1",
                 "--cache", str(tmp_path / "cache"), "--out", str(out)])
    assert code == 0
    result = json.loads((out / "results.json").read_text())["results"]["vit"]
    assert 0.0 <= result["accuracy"] <= 1.0 and abs(sum(result["exit_fractions"]) - 1.0) < 1e-9
    assert set(result["timing"]) == {"1", "32", "128"}
    assert {"plain", "masked_dense", "adaexit"} <= set(result["timing"]["32"]["ms"])
