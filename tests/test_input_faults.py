"""Inputs that used to give a message naming neither the field nor the file (issue 27, item 16):
each now gives one line (an error, or a warning where the run can go on) naming it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.train.conftest import MICRO_FLAGS, one_line, run_cli, write_domain_folder


def test_a_non_utf8_file_name_in_a_data_folder_is_skipped_with_a_warning_naming_it(tmp_path):
    """It used to abort the run: "'utf-8' codec can't encode character '\\udcff' ... surrogates not allowed"."""
    from workbench.data.corpus import load_text_corpus

    root = write_domain_folder(tmp_path / "corpus")
    try:
        bad = Path(os.fsdecode(str(root / "words").encode() + b"/bad\xff.txt"))
        bad.write_text("alpha beta gamma " * 50)
    except (OSError, UnicodeError) as err:
        pytest.skip(f"this file system does not take a non-UTF-8 file name: {err}")
    with pytest.warns(UserWarning, match=r"data file '.*bad\\xff\.txt' skipped: its name is not valid UTF-8"):
        corpus = load_text_corpus(root)
    assert corpus.domains == ["numbers", "words"]
    assert len(corpus.documents) > 0 and not any("bad" in d.id for d in corpus.documents)
    corpus.split(0.1)  # the split hashes every document id as UTF-8


def test_a_fifo_as_data_is_refused_with_one_line(tmp_path, capsys):
    """It used to say "[Errno 20] Not a directory: 'fifo'", naming no field (and must not block)."""
    fifo = tmp_path / "fifo"
    try:
        os.mkfifo(fifo)
    except (AttributeError, OSError) as err:
        pytest.skip(f"no FIFO here: {err}")
    code, _, err = run_cli(capsys, "train", *MICRO_FLAGS, "--steps", "1", "--no-progress", "--data", str(fifo),
                           "--run-dir", str(tmp_path / "run"))
    assert code == 2
    line = one_line(err)
    assert f"data={str(fifo)!r} is invalid: it is neither a regular file nor a folder" in line, line
