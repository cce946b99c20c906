"""The public API: the six verbs import from the top package, and every verb's docstring example runs.

The examples build on each other's files (``runs/student`` from ``distill``'s, its ONNX file from
``export``'s), so each test runs them in order in its own working folder.
"""

import doctest

import pytest

import edgekd

VERBS = ("distill", "export", "quantize", "bench", "package", "run")


def _run_examples(names, folder, monkeypatch):
    monkeypatch.chdir(folder)
    for name in names:
        verb = getattr(edgekd, name)
        test = doctest.DocTestFinder(recurse=False).find(verb, name, globs={})[0]
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
        runner.run(test, out=lambda text: pytest.fail(f"edgekd.{name}'s example failed:\n{text}"))
        assert runner.tries == len(test.examples) and runner.failures == 0


def test_the_six_verbs_are_public_and_their_examples_run_for_real():
    assert all(name in edgekd.__all__ for name in VERBS)
    for name in VERBS:
        verb = getattr(edgekd, name)
        assert callable(verb) and verb.__module__ == f"edgekd.{'pipeline' if name == 'run' else name}"
        examples = doctest.DocTestParser().get_examples(verb.__doc__)
        assert len(examples) >= 2, f"edgekd.{name} has no docstring example"
        assert not any(e.options.get(doctest.SKIP) for e in examples), f"edgekd.{name}'s example is skipped"


def test_distill_export_and_bench_examples(tmp_path, monkeypatch):
    _run_examples(("distill", "export", "bench"), tmp_path, monkeypatch)


@pytest.mark.slow
def test_quantize_package_and_run_examples(tmp_path, monkeypatch):
    _run_examples(("distill", "quantize", "package", "run"), tmp_path, monkeypatch)
