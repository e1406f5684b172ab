"""Links in image folders (issue 25): a file link is followed (its label is the class folder it is in), a
folder link is never followed (refused, or left out with data.skip_bad_images), no file is a sample twice,
and whatever is refused is named in one short line."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cachetrain.config import DataConfig
from cachetrain.data.folder import FolderImages
from cachetrain.errors import DataError
from tests.conftest import cli_in_process, synthetic_raw, write_config

CPU = torch.device("cpu")


def png(path: Path, value: int) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)
    return path


def tree(root: Path, n: int = 3) -> Path:
    """train/ and val/ with classes a_coat and b_shirt, n PNGs each."""
    for split in ("train", "val"):
        for c, name in enumerate(("a_coat", "b_shirt")):
            for i in range(n):
                png(root / split / name / f"{i}.png", 40 + 100 * c + i)
    return root


def open_folder(root: Path, skip: bool = False) -> FolderImages:
    return FolderImages(DataConfig(name="imagefolder", root=str(root), image_size=8, skip_bad_images=skip,
                                   val_samples=0), seed=0, device=CPU, workers=0, backend="numpy")


def refusal(root: Path) -> str:
    with pytest.raises(DataError) as e:
        open_folder(root)
    line = str(e.value)
    assert "\n" not in line and len(line) < 300, line
    return line


def samples(data: FolderImages) -> list[tuple[str, int]]:
    return [(os.path.relpath(p, data.root), int(y)) for p, y in zip(data.files("train"), data.labels("train"))]


@pytest.mark.parametrize("target", ["..", ".", "../..", "../../..", "../b_shirt"])
def test_a_folder_link_into_the_tree_is_refused_or_skipped_never_followed(tmp_path, target):
    root = tree(tmp_path / "root")
    os.symlink(target, root / "train" / "a_coat" / "loopdir")
    line = refusal(root)
    assert "train/a_coat/loopdir" in line and "loopdir/loopdir" not in line and "skip_bad_images" in line
    data = open_folder(root, skip=True)
    assert data.num_samples("train") == 6  # the 6 images, once each: 200 files no longer become 8,200
    assert sorted(samples(data)) == sorted([(f"train/a_coat/{i}.png", 0) for i in range(3)] +
                                           [(f"train/b_shirt/{i}.png", 1) for i in range(3)])
    assert [p for p, _ in data.skipped_files] == ["train/a_coat/loopdir"]


def test_a_folder_link_outside_the_class_folder_is_refused_or_skipped(tmp_path):
    root = tree(tmp_path / "root")
    outside = png(tmp_path / "elsewhere" / "x.png", 7).parent
    os.symlink(outside, root / "train" / "b_shirt" / "more")
    assert "train/b_shirt/more" in refusal(root)
    assert open_folder(root, skip=True).num_samples("train") == 6


def test_a_file_link_is_followed_once_with_the_label_of_its_class_folder(tmp_path):
    root = tree(tmp_path / "root")
    os.symlink(png(tmp_path / "store" / "z.png", 9), root / "train" / "b_shirt" / "z.png")
    data = open_folder(root)
    assert ("train/b_shirt/z.png", 1) in samples(data) and data.num_samples("train") == 7


@pytest.mark.parametrize("link, target, named", [
    ("train/b_shirt/dup.png", "../a_coat/0.png", "train/b_shirt/dup.png"),  # a sample twice, in two classes
    ("train/a_coat/dup.png", "0.png", "train/a_coat/dup.png"),  # twice in one class
    ("train/a_coat/gone.png", "nowhere.png", "train/a_coat/gone.png"),  # a broken link
])
def test_a_file_link_to_a_sample_or_to_nothing_is_refused_or_skipped(tmp_path, link, target, named):
    root = tree(tmp_path / "root")
    os.symlink(target, root / link)
    assert named in refusal(root)
    data = open_folder(root, skip=True)
    assert data.num_samples("train") == 6 and [p for p, _ in data.skipped_files] == [named]
    resolved = [os.path.realpath(p) for p in data.files("train")]
    assert len(set(resolved)) == len(resolved)


def test_two_links_to_one_outside_file_count_it_once(tmp_path):
    root = tree(tmp_path / "root")
    target = png(tmp_path / "store" / "z.png", 9)
    os.symlink(target, root / "train" / "a_coat" / "z1.png")
    os.symlink(target, root / "train" / "a_coat" / "z2.png")
    assert "train/a_coat/z2.png" in refusal(root)
    assert open_folder(root, skip=True).num_samples("train") == 7


def test_a_class_folder_may_be_a_link_but_not_to_another_class(tmp_path):
    root = tree(tmp_path / "root")
    png(tmp_path / "coats" / "c.png", 5)
    os.rename(root / "train" / "a_coat", tmp_path / "old")
    os.symlink(tmp_path / "coats", root / "train" / "a_coat")  # a class assembled elsewhere: fine
    assert ("train/a_coat/c.png", 0) in samples(open_folder(root))
    os.unlink(root / "train" / "a_coat")
    os.symlink("b_shirt", root / "train" / "a_coat")  # every file of b_shirt twice, under two labels
    line = refusal(root)
    assert "train/a_coat" in line and "b_shirt" in line


def test_odd_names_and_odd_files_are_one_line(tmp_path):
    root = tree(tmp_path / "root")
    png(root / "train" / "a_coat" / "new\nline.png", 3)
    os.mkfifo(root / "train" / "a_coat" / "pipe.png")  # opening it would wait forever for a writer
    line = refusal(root)
    assert "pipe.png" in line or "new\\nline.png" in line
    data = open_folder(root, skip=True)
    assert ("train/a_coat/new\nline.png", 0) in samples(data)
    assert [p for p, _ in data.skipped_files] == ["train/a_coat/pipe.png"]


def test_cli_loop_with_skip_bad_images_counts_each_file_once(tmp_path):
    root = tree(tmp_path / "root", n=4)
    os.symlink("..", root / "train" / "a_coat" / "loopdir")
    raw = synthetic_raw(tmp_path / "run", data={"name": "imagefolder", "root": str(root), "image_size": 8,
                                               "skip_bad_images": True, "val_samples": 0},
                        model={"stages": 1, "downsample": []}, train={"probes": False, "batch_size": 4})
    out = cli_in_process(["stage", "--config", str(write_config(tmp_path / "c.yaml", raw))])
    assert out.returncode == 0, out.stderr
    assert "skipped 1 bad files" in out.stdout and "train/a_coat/loopdir" in out.stdout
