"""The built-in corpus: contents checked against their sources, determinism, cache, split; user data."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import unicodedata
from fractions import Fraction
from pathlib import Path

import pytest

from tests.data.helpers import SMALL_BUDGET
from workbench.data import (
    BUILTIN_DOMAINS,
    ENV_DATA_DIR,
    Corpus,
    Document,
    LMData,
    build_corpus,
    default_cache_dir,
    load_text_corpus,
)


def _docs(corpus, domain):
    return [d for d in corpus.documents if d.domain == domain]


# --- built-in domains ------------------------------------------------------------------------


def test_every_builtin_domain_present_nonempty_and_within_budget(small_corpus):
    assert small_corpus.domains == list(BUILTIN_DOMAINS)
    stats = small_corpus.stats()
    for domain in BUILTIN_DOMAINS:
        docs = _docs(small_corpus, domain)
        assert len(docs) >= 2, domain
        assert all(d.text.strip() for d in docs)
        nbytes = sum(len(d.text.encode("utf-8")) for d in docs)
        assert 0 < nbytes <= SMALL_BUDGET
        assert stats[domain]["documents"] == len(docs) and stats[domain]["bytes"] == nbytes
        assert stats[domain]["source"] and stats[domain]["licence"]


def test_code_documents_are_stdlib_files_without_tests(small_corpus):
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    for doc in _docs(small_corpus, "code"):
        path = Path(doc.source).resolve()
        assert path.suffix == ".py" and stdlib in path.parents
        parts = set(path.relative_to(stdlib).parts)
        assert not parts & {"site-packages", "test", "tests", "idle_test"}
        assert path.read_bytes().decode("utf-8") == doc.text


def test_prose_documents_are_pydoc_topics(small_corpus):
    from pydoc_data.topics import topics

    for doc in _docs(small_corpus, "prose"):
        topic = doc.source.split(":", 1)[1]
        assert doc.text == topics[topic]


def _evaluate(node: ast.AST) -> Fraction:
    """Exact value of an arithmetic expression of integers with + - * / and parentheses."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand)
    if isinstance(node, ast.BinOp):
        a, b = _evaluate(node.left), _evaluate(node.right)
        ops = {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}
        if isinstance(node.op, ast.Div):
            return a / b
        return ops[type(node.op)]
    raise AssertionError(f"unexpected expression {ast.dump(node)}")


def test_math_lines_are_correct(small_corpus):
    lines = [line for doc in _docs(small_corpus, "math") for line in doc.text.splitlines()]
    assert len(lines) > 100
    operators = set()
    for line in lines:
        sides = [_evaluate(ast.parse(side.strip(), mode="eval").body) for side in line.split("=")]
        assert len(sides) >= 2 and len(set(sides)) == 1, line
        assert sides[-1].denominator == 1, line  # answers are integers
        operators |= {op for op in "+-*/()" if op in line}
    assert operators >= set("+-*/()")  # addition, subtraction, multiplication, division, multi-step


def test_records_match_unicodedata_and_cover_non_latin_scripts(small_corpus):
    non_latin_letters = set()
    for doc in _docs(small_corpus, "records"):
        for line in doc.text.splitlines():
            fields = line.split(" | ", 3)
            cp = int(fields[0].removeprefix("U+"), 16)
            char = chr(cp)
            assert fields[1] == unicodedata.name(char) and fields[2] == unicodedata.category(char), line
            assert fields[3:] == ([char] if char.isprintable() and not char.isspace() else []), line
            if fields[2].startswith("L") and cp > 0x7F and "LATIN" not in fields[1]:
                non_latin_letters.add(char)
    assert len(non_latin_letters) >= 10


def test_build_is_deterministic_and_cached(small_corpus, tmp_path):
    rebuilt = build_corpus(tmp_path, max_bytes_per_domain=SMALL_BUDGET, rebuild=True)
    assert rebuilt.documents == small_corpus.documents and rebuilt.domains == small_corpus.domains
    assert rebuilt.metadata["cached"] is False
    files = sorted(p.suffix for p in tmp_path.iterdir())
    assert files == [".bin", ".json"]  # no temporary files left behind
    loaded = build_corpus(tmp_path, max_bytes_per_domain=SMALL_BUDGET)
    assert loaded.metadata["cached"] is True
    assert loaded.documents == rebuilt.documents and loaded.stats() == rebuilt.stats()


def test_other_parameters_or_damaged_cache_rebuild(tmp_path):
    small = build_corpus(tmp_path, max_bytes_per_domain=20_000)
    larger = build_corpus(tmp_path, max_bytes_per_domain=30_000)
    assert larger.metadata["cached"] is False  # a different budget does not reuse the first build
    assert larger.stats()["math"]["bytes"] > small.stats()["math"]["bytes"]
    manifest = Path(small.metadata["cache_file"])
    manifest.write_text(manifest.read_text()[:100])  # truncated: must be rebuilt, not crash
    again = build_corpus(tmp_path, max_bytes_per_domain=20_000)
    assert again.metadata["cached"] is False and again.documents == small.documents
    data = json.loads(manifest.read_text())  # and the rebuilt manifest is whole again
    assert data["stats"] == small.stats()


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_DATA_DIR, str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv(ENV_DATA_DIR)
    assert default_cache_dir() != tmp_path / "elsewhere"


# --- split ---------------------------------------------------------------------------------


def test_split_is_disjoint_complete_and_covers_every_domain(small_corpus):
    train, val = small_corpus.split(0.1)
    train_ids, val_ids = {d.id for d in train.documents}, {d.id for d in val.documents}
    assert not train_ids & val_ids
    assert train_ids | val_ids == {d.id for d in small_corpus.documents}
    for domain in small_corpus.domains:
        assert _docs(train, domain) and _docs(val, domain), domain
    assert train.domains == val.domains == small_corpus.domains


def test_split_is_stable_under_reordering_and_subsetting(small_corpus):
    _, val = small_corpus.split(0.2)
    reversed_corpus = Corpus(small_corpus.domains, small_corpus.documents[::-1])
    assert {d.id for d in reversed_corpus.split(0.2)[1].documents} == {d.id for d in val.documents}
    # dropping documents does not move the others (a domain that keeps hash-chosen val docs)
    code = [d for d in small_corpus.documents if d.domain == "math"]
    half = Corpus(["math"], code[::2])
    val_half = {d.id for d in half.split(0.2)[1].documents}
    assert val_half == {d.id for d in val.documents} & {d.id for d in code[::2]}


def test_split_does_not_depend_on_python_hash_seed(small_corpus):
    ids = [d.id for d in small_corpus.documents]
    script = ("import json, sys\nfrom workbench.data.corpus import Corpus, Document\n"
              "ids = json.load(sys.stdin)\n"
              "docs = [Document(i, i.split('/')[0], 'x', '') for i in ids]\n"
              "c = Corpus(sorted({d.domain for d in docs}), docs)\n"
              "print(json.dumps(sorted(d.id for d in c.split(0.2)[1].documents)))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", script], input=json.dumps(ids), capture_output=True, text=True,
                         env=env, check=True, cwd=Path(__file__).resolve().parents[2])
    assert json.loads(out.stdout) == sorted(d.id for d in small_corpus.split(0.2)[1].documents)


def test_invalid_val_fraction(small_corpus):
    with pytest.raises(ValueError, match=r"val_fraction=1.5 .*\[0, 1\)"):
        small_corpus.split(1.5)


def test_corpus_validates_documents():
    with pytest.raises(ValueError, match="domain='b'.*allowed values are a"):
        Corpus(["a"], [Document("b/1", "b", "x", "")])
    with pytest.raises(ValueError, match="'a/1' appears twice"):
        Corpus(["a"], [Document("a/1", "a", "x", ""), Document("a/1", "a", "y", "")])


# --- user data -----------------------------------------------------------------------------


def test_single_file_is_one_domain_named_after_the_stem(tmp_path):
    text = "".join(f"line {i}: ünïcödé Ж 語\n" for i in range(2000))
    path = tmp_path / "notes.txt"
    path.write_text(text, encoding="utf-8")
    corpus = load_text_corpus(path, max_doc_bytes=4096)
    assert corpus.domains == ["notes"]
    assert "".join(d.text for d in corpus.documents) == text  # chunking loses and reorders nothing
    assert all(len(d.text.encode()) <= 4096 for d in corpus.documents)
    train, val = corpus.split(0.1)
    assert train.documents and val.documents
    data = LMData(corpus, seq_len=32, batch_size=4)
    assert set(data.get_batch(0).domains.unique().tolist()) == {0}


def test_folder_of_domain_subfolders(tmp_path):
    (tmp_path / "poems" / "old").mkdir(parents=True)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "poems" / "a.txt").write_text("roses are red\n" * 50)
    (tmp_path / "poems" / "old" / "b.md").write_text("violets are blue\n" * 50)
    (tmp_path / "poems" / ".hidden.txt").write_text("not a document\n")
    (tmp_path / "recipes" / "soup.txt").write_text("boil water\n" * 50)
    (tmp_path / "recipes" / "image.bin").write_bytes(bytes(range(256)))
    (tmp_path / "loose.txt").write_text("ignored: not in a domain folder\n")
    with pytest.warns(UserWarning, match="empty"):
        corpus = load_text_corpus(tmp_path, max_doc_bytes=None)
    assert corpus.domains == ["poems", "recipes"]
    by_domain = {d: sorted(doc.text for doc in corpus.documents if doc.domain == d) for d in corpus.domains}
    assert by_domain == {"poems": sorted(["roses are red\n" * 50, "violets are blue\n" * 50]),
                         "recipes": ["boil water\n" * 50]}


def test_missing_path_error_names_the_path(tmp_path):
    missing = tmp_path / "no-such-corpus"
    with pytest.raises(FileNotFoundError, match="no-such-corpus"):
        load_text_corpus(missing)


def test_empty_folder_error_names_the_path(tmp_path):
    folder = tmp_path / "my-empty-data"
    folder.mkdir()
    with pytest.raises(ValueError, match="my-empty-data.*no usable text files"):
        load_text_corpus(folder)
    (folder / "stray.txt").write_text("text outside any domain folder\n")
    with pytest.raises(ValueError, match="my-empty-data.*subfolder"):
        load_text_corpus(folder)


def test_empty_file_error_names_the_path(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("   \n")
    with pytest.raises(ValueError, match="blank.txt"):
        load_text_corpus(path)


def test_subset_keeps_the_given_domains_in_order(small_corpus):
    sub = small_corpus.subset(["math", "code"])
    assert sub.domains == ["math", "code"]
    assert [d.id for d in sub.documents] == [d.id for d in small_corpus.documents if d.domain in ("math", "code")]
    with pytest.raises(ValueError, match="domain='poetry'"):
        small_corpus.subset(["poetry"])


def test_an_empty_path_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "domain").mkdir()
    (tmp_path / "domain" / "a.txt").write_text("text that must not be picked up\n")
    monkeypatch.chdir(tmp_path)  # Path("") is "."; this folder would be a usable corpus
    for empty in ("", "  "):
        with pytest.raises(ValueError, match=r"path=.* is invalid: give a text file or a folder"):
            load_text_corpus(empty)
