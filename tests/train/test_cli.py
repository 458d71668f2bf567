"""`dalle-fast eval-shapes`' input checks: every one before its --out folder is made."""

import pytest

from dalle_fast.cli import main


@pytest.mark.parametrize("flags, said", [
    (["--captions", "0"], "argument --captions: must be >= 1"), (["--candidates", "0"], "argument --candidates"),
    (["--seed", "-1"], "--seed must be >= 0"), (["--temperature", "-1"], "temperature must be"),
    (["--captions", "100000"], "--captions 100000: the test split has only"),
])
def test_eval_shapes_checks_its_inputs_before_making_its_out_folder(tmp_path, capsys, flags, said):
    out = tmp_path / "out"
    try:
        code = main(["eval-shapes", "--out", str(out), "--device", "cpu", *flags])
    except SystemExit as exc:  # argparse's refusal of a flag's value
        code = exc.code
    assert code == 2 and said in capsys.readouterr().err
    assert not out.exists()
