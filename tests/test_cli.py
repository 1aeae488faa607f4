"""The console script: methods, --version, and the main job on the built-in tiny model."""

from __future__ import annotations

import pytest

from vtprune import __version__
from vtprune.cli import main


def test_methods(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "fastv" in out and "cls" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_run_on_tiny_model(capsys):
    assert main(["run", "--model", "tiny-llava", "--method", "cls", "--keep", "32", "--repeats", "1",
                 "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "kept 32/576 visual tokens" in out
    assert "prefill" in out and "speedup" in out


def test_run_reports_bad_method(capsys):
    assert main(["run", "--model", "tiny-llava", "--method", "nope", "--repeats", "1"]) == 2
    assert "known methods" in capsys.readouterr().err


def test_run_rejects_missing_model(capsys):
    assert main(["run", "--model", "/no/such/dir", "--repeats", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neither a built-in model" in err[0]


def test_option_without_a_value_exits_2(capsys):
    assert main(["run", "--model", "tiny-llava", "--option", "seed", "--repeats", "1"]) == 2
    assert "NAME=VALUE" in capsys.readouterr().err


def test_run_loads_a_saved_checkpoint(tmp_path, capsys):
    """`--model DIR` loads a model and processor saved with save_pretrained (no hub access)."""
    from vtprune.toy.tiny import tiny_llava, tiny_llava_processor

    tiny_llava().save_pretrained(tmp_path)
    tiny_llava_processor().save_pretrained(tmp_path)
    assert main(["run", "--model", str(tmp_path), "--method", "fastv", "--keep", "16", "--layer", "1",
                 "--repeats", "1", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "kept 16/576 visual tokens" in out and "LlavaForConditionalGeneration" in out


def test_run_on_tiny_qwen(capsys):
    assert main(["run", "--model", "tiny-qwen2.5-vl", "--method", "cls", "--keep", "20", "--repeats", "1",
                 "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "kept 20/" in out and "Qwen2_5_VLForConditionalGeneration" in out


def test_run_loads_a_saved_qwen_checkpoint(tmp_path, capsys):
    from vtprune.toy.tiny_qwen import tiny_qwen, tiny_qwen_processor

    tiny_qwen("qwen2_vl").save_pretrained(tmp_path)
    tiny_qwen_processor("qwen2_vl").save_pretrained(tmp_path)
    assert main(["run", "--model", str(tmp_path), "--method", "fastv", "--keep", "16", "--layer", "1",
                 "--repeats", "1", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "kept 16/" in out and "Qwen2VLForConditionalGeneration" in out


@pytest.mark.parametrize("argv,names", [
    (["run", "--model", "tiny-llava", "--repeats", "0"], "--repeats"),
    (["run", "--model", "tiny-llava", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["run", "--model", "tiny-llava", "--repeats", "two"], "--repeats"),
    (["bench", "--device", "tpu"], "--device"),
    (["bench", "--threads", "-2"], "--threads"),
    (["bench", "--batch", "0"], "--batch"),
    (["eval", "--device", "gpu0"], "--device"),
])
def test_cli_input_errors_exit_2_with_one_line(capsys, argv, names):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and names in err[0] and "error" in err[0]


def test_run_prompt_without_the_image_placeholder(capsys):
    assert main(["run", "--model", "tiny-llava", "--prompt", "USER: hello ASSISTANT:", "--repeats", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "image placeholder" in err[0] and "<image>" in err[0]
