"""kvcourse.checks as a learner meets it: messages first, no internal frames, one line when a test passes."""

from __future__ import annotations

import re

import pytest
import torch
from IPython.core.interactiveshell import InteractiveShell

from kvcourse import checks


def _shown(capsys) -> str:
    """What the cell printed, colours removed."""
    out = capsys.readouterr()
    return re.sub(r"\x1b\[[0-9;]*m", "", out.out + out.err)


@pytest.fixture(scope="module")
def shell():
    sh = InteractiveShell.instance()
    checks._install_ipython_handler()  # what importing kvcourse.checks inside a kernel does
    yield sh
    InteractiveShell.clear_instance()


def test_failure_traceback_shows_checks_internals(shell, capsys):
    shell.run_cell("import torch\nfrom kvcourse.checks import expect_close\n"
                   "expect_close(torch.zeros(2), torch.ones(2), 'my tensor', hint='add one')")
    text = _shown(capsys)
    assert "my tensor: 2 of 2 values differ" in text and "Likely cause: add one" in text
    assert "checks.py" not in text, text  # the traceback ends at the learner's line
    assert "In[1]" in text or "Cell In" in text  # ...which is still shown


def test_failure_traceback_shows_torch_decorator_frames(shell, capsys):
    shell.run_cell("import torch\n@torch.no_grad()\ndef run(fn):\n    return fn()\n"
                   "def learner():\n    assert False, 'the learner broke it'\nrun(learner)")
    text = _shown(capsys)
    assert "the learner broke it" in text and "learner()" in text
    assert "_contextlib.py" not in text, text


def test_other_errors_keep_their_full_traceback(shell, capsys):
    shell.run_cell("def f():\n    raise ValueError('plain')\nf()")
    text = _shown(capsys)
    assert "ValueError" in text and "plain" in text and "raise ValueError" in text


def test_passing_test_cell_is_silent(capsys):
    checks.expect_close(torch.ones(2), torch.ones(2), "same")
    checks.passed("ones equal ones")
    assert capsys.readouterr().out == "\u2713 ones equal ones\n"


def test_reference_for_leaves_the_learners_answer_replaced():
    ns = {"f": lambda: "learner"}
    with checks.reference_for(ns, f=lambda: "reference", g=len):
        assert ns["f"]() == "reference" and ns["g"] is len
    assert ns["f"]() == "learner" and "g" not in ns
    with pytest.raises(KeyError), checks.reference_for(ns, f=lambda: "reference"):
        raise KeyError("a failing test inside the block")
    assert ns["f"]() == "learner"
