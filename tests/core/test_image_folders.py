"""Instance and class folders: only read, searched within bounds (a folder such as / is refused, not walked), and a
caption file that cannot be read is skipped with a warning naming it (the image's file name stands in)."""
import os
from pathlib import Path

import pytest
from PIL import Image

from dreambooth.config import Concept, Config
from dreambooth.data import captions
from dreambooth.data.dataset import collect_instances
from dreambooth.data.images import MAX_DEPTH, MAX_ENTRIES, find_images, readable_images
from dreambooth.errors import UserError


def image(path: Path, color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path)
    return path


def snapshot(folder: Path) -> dict:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in [folder, *folder.rglob("*")]}


def test_the_filesystem_root_is_refused_not_walked():
    with pytest.raises(UserError, match=f"more than {MAX_ENTRIES} files and folders"):
        find_images(Path("/"))


def test_a_wide_folder_is_refused(tmp_path):
    for i in range(30):
        (tmp_path / f"{i}.txt").touch()
    with pytest.raises(UserError, match="more than 20 files and folders; choose the folder"):
        find_images(tmp_path, max_entries=20)
    assert find_images(tmp_path, max_entries=30) == []


def test_depth_is_bounded_and_a_link_loop_ends(tmp_path):
    deep = tmp_path
    for level in range(MAX_DEPTH + 2):
        image(deep / f"level{level}.png")
        deep = deep / f"d{level}"
    (tmp_path / "d0" / "loop").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    found = {p.name for p in find_images(tmp_path)}
    assert {f"level{i}.png" for i in range(MAX_DEPTH + 1)} <= found
    assert f"level{MAX_DEPTH + 1}.png" not in found and "dangling.png" not in found


def test_a_file_or_missing_folder_is_one_line(tmp_path):
    (tmp_path / "file.png").touch()
    for target in (tmp_path / "file.png", tmp_path / "missing"):
        with pytest.raises(UserError, match="cannot be read"):
            find_images(target)


def test_folders_are_only_read(tmp_path):
    folder = tmp_path / "images"
    image(folder / "a dog.png")
    image(folder / "sub" / "b.jpg")
    (folder / "a dog.txt").write_text("a dog on grass")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    before = snapshot(folder)
    os.chmod(folder, 0o555)
    try:
        config = Config(concepts=(Concept(instance_data_dir=str(folder), instance_prompt="[filewords]"),))
        with pytest.warns(UserWarning, match="broken.png"):
            examples = collect_instances(config)[0]
        assert sorted(e.prompt for e in examples) == ["a dog on grass", "b"]
        with pytest.warns(UserWarning, match="broken.png"):
            readable_images(find_images(folder))
    finally:
        os.chmod(folder, 0o755)
    assert snapshot(folder) == before


def test_an_unreadable_caption_is_skipped_with_a_warning(tmp_path, monkeypatch):
    folder = tmp_path / "images"
    good = image(folder / "red_disc.png")
    (folder / "red_disc.txt").write_text("a caption we cannot read")
    real_open = open

    def refusing_open(path, *args, **kwargs):
        if str(path).endswith(".txt"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(captions, "open", refusing_open, raising=False)
    with pytest.warns(captions.CaptionWarning, match=r"red_disc.txt: cannot be read \(Permission denied\); using the file name"):
        assert captions.caption_of(good) == "red disc"
    config = Config(concepts=(Concept(instance_data_dir=str(folder), instance_prompt="a photo of [filewords]"),))
    with pytest.warns(captions.CaptionWarning):
        assert collect_instances(config)[0][0].prompt == "a photo of red disc"


def test_a_huge_or_odd_caption_file(tmp_path):
    folder = tmp_path / "images"
    huge = image(folder / "huge.png")
    (folder / "huge.txt").write_bytes(b"x" * (captions.MAX_CAPTION_BYTES + 1))
    with pytest.warns(captions.CaptionWarning, match="longer than"):
        assert captions.caption_of(huge) == "huge"
    odd = image(folder / "odd.png")
    (folder / "odd.txt").write_bytes(b"caf\xe9 \x00 dog\n\n")
    assert captions.caption_of(odd) == "caf\ufffd \x00 dog"
    folder_caption = image(folder / "dir.png")
    (folder / "dir.txt").mkdir()
    assert captions.caption_of(folder_caption) == "dir"
