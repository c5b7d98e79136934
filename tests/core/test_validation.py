"""The one validation place: option ranges and output locations, checked before any work."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from mokd.core.errors import MokdError
from mokd.core.registry import ALIASES
from mokd.core.validation import (check_device, check_image_size, check_num_workers, check_output_dir,
                                  check_output_file)


def unwritable_directory(tmp_path: Path) -> Path:
    """A directory nobody can create files in: a read-only folder for normal users; for root (CI, which
    ignores permission bits) a path under /sys, where even root cannot create files."""
    if os.geteuid() == 0:
        return Path("/sys/mokd-unwritable")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    return folder


@pytest.mark.parametrize("size", [0, -32, 7, 100000])
def test_image_sizes_out_of_range_name_the_range(size):
    with pytest.raises(MokdError, match=rf"--image-size {size} is out of range: use 8 to 2048 pixels"):
        check_image_size(size)


def test_image_size_must_suit_the_architecture():
    vit = dataclasses.replace(ALIASES["vit_s"], patch_size=16)
    assert check_image_size(224, vit) == 224
    with pytest.raises(MokdError, match=r"100 is not a multiple of vit_s's patch size 16: use e.g. 96 or 112"):
        check_image_size(100, vit)
    with pytest.raises(MokdError, match=r"below r50's output stride 32"):
        check_image_size(16, ALIASES["r50"])
    assert check_image_size(16, ALIASES["r_tiny"]) == 16  # the CIFAR stem downsamples 8x
    assert check_image_size(None, vit) is None


def test_workers_and_devices():
    assert check_num_workers(0) == 0 and check_num_workers(None) is None
    with pytest.raises(MokdError, match=r"--num-workers -1 is out of range: use 0 .* to 64"):
        check_num_workers(-1)
    assert [check_device(text) for text in ("auto", "CPU", "cuda", "cuda:1")] == ["auto", "cpu", "cuda", "cuda:1"]
    with pytest.raises(MokdError, match=r"--device 'tpu' is not a device mokd supports: use auto, cpu, cuda"):
        check_device("tpu")


def test_output_file_checks(tmp_path):
    target = tmp_path / "new" / "deeper" / "out.json"
    assert check_output_file(target) == target
    assert not (tmp_path / "new").exists()  # checking creates nothing
    with pytest.raises(MokdError, match="is a directory"):
        check_output_file(tmp_path)
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(MokdError, match=rf"{blocker} is a file, not a directory"):
        check_output_file(blocker / "out.json")
    with pytest.raises(MokdError, match="cannot write in"):
        check_output_file(unwritable_directory(tmp_path) / "out.json")


def test_output_directory_checks(tmp_path):
    assert check_output_dir(tmp_path / "run", option="--output-dir") == tmp_path / "run"
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(MokdError, match=r"--output-dir .*afile is a file, not a directory"):
        check_output_dir(afile, option="--output-dir")
    with pytest.raises(MokdError, match=r"--cache-dir .*cannot write in"):
        check_output_dir(unwritable_directory(tmp_path) / "cache", option="--cache-dir")
