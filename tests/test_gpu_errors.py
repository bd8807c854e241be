"""The GPU path's one-line errors, checked on the CPU: no CUDA for a GPU request, out of GPU memory."""

from __future__ import annotations

import pytest
import torch

from var_lab.gpu import out_of_memory_message, require_cuda
from var_lab.inputs import BadInputError


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
@pytest.mark.parametrize("requested", ["gpu", "cuda", "cuda:1"])
def test_gpu_request_without_cuda_names_the_option(requested):
    with pytest.raises(BadInputError, match=r"--trainer.accelerator .* asks for a GPU.*pass --trainer.accelerator cpu"):
        require_cuda(requested, "--trainer.accelerator")


@pytest.mark.parametrize("requested", [None, "", "auto", "cpu"])
def test_other_requests_pass(requested):
    require_cuda(requested, "--device")


@pytest.mark.parametrize(
    "command, setting", [("fit", "--data.batch_size"), ("fit-tokenizer", "--data.batch_size"), ("eval", "--batch-size")]
)
def test_out_of_memory_says_what_to_lower(command, setting):
    message = out_of_memory_message(command, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert message.startswith(f"var-lab {command}: out of GPU memory") and setting in message
    assert "\n" not in message


def test_other_errors_keep_their_message():
    assert out_of_memory_message("fit", RuntimeError("boom")) is None


def test_fit_reports_out_of_memory_in_one_line(tmp_path, capsys):
    from var_lab.train import _run

    def body():
        raise torch.OutOfMemoryError("CUDA out of memory")

    assert _run({}, tmp_path, "fit", body) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and "lower --data.batch_size" in err[0]
    assert (tmp_path / "FAILED").is_file()
