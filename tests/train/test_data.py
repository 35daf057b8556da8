"""Images, captions, [filewords], buckets and epoch planning: the data pipeline on real files."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from dreambooth.config import Config, Parameters
from dreambooth.data import captions
from dreambooth.data.buckets import make_buckets, nearest_bucket
from dreambooth.data.dataset import Example, TrainingData, collect_instances
from dreambooth.data.images import ImageWarning, find_images, load_image, readable_images
from dreambooth.errors import UserError


def test_filewords_insert_tokens_like_the_seed():
    assert captions.instance_prompt("[filewords]", "a dog on grass", "zwx", "dog") == "a zwx dog on grass"
    assert captions.instance_prompt("photo, [filewords]", "a cat", "zwx", "dog") == "photo, zwx dog, a cat"
    assert captions.instance_prompt("[filewords]", "a zwx dog", "zwx", "dog") == "a zwx dog"
    assert captions.instance_prompt("a photo of zwx dog", "anything", "zwx", "dog") == "a photo of zwx dog"
    assert captions.class_prompt("[filewords]", "a zwx dog on grass", "zwx") == "a dog on grass"
    assert captions.class_prompt("a photo of a dog", "x", "zwx") == "a photo of a dog"


def test_caption_from_txt_else_file_name(tmp_path):
    a, b = tmp_path / "a red dog (3).jpg", tmp_path / "0001-some_thing.png"
    (tmp_path / "a red dog (3).txt").write_text("  a dog\non grass ")
    assert captions.caption_of(a) == "a dog on grass"
    assert captions.caption_of(b) == "some thing"


def test_find_images_is_recursive_and_filters(tmp_path):
    for rel in ("a.png", "sub/b.JPG", "sub/deeper/c.webp", "d.jpeg", "notes.txt", ".hidden/e.png", "f.gif"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    names = [p.name for p in find_images(tmp_path)]
    assert sorted(names) == ["a.png", "b.JPG", "c.webp", "d.jpeg"]


def test_odd_images_become_upright_rgb(tmp_path):
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (40, 20), (0, 255, 255, 0)).save(cmyk)
    sixteen = tmp_path / "grey16.png"
    Image.fromarray(np.full((20, 40), 65535, dtype=np.uint16)).save(sixteen)
    alpha = tmp_path / "alpha.png"
    Image.new("RGBA", (40, 20), (255, 0, 0, 0)).save(alpha)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 on display
    Image.new("RGB", (40, 20), (0, 0, 255)).save(rotated, exif=exif)
    huge = tmp_path / "huge.png"
    Image.new("RGB", (5000, 1000), (9, 9, 9)).save(huge)

    red = load_image(cmyk)
    assert red.mode == "RGB" and red.getpixel((5, 5))[0] > 200 and red.getpixel((5, 5))[1] < 60
    assert load_image(sixteen).getpixel((3, 3)) == (255, 255, 255)  # not clipped to grey or black
    assert load_image(alpha).getpixel((3, 3)) == (255, 255, 255)  # transparent -> white
    assert load_image(rotated).size == (20, 40)  # EXIF orientation applied
    assert max(load_image(huge).size) == 4096 and load_image(huge).size[0] / load_image(huge).size[1] == pytest.approx(5, rel=0.01)


def test_broken_images_are_skipped_and_named(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32)).save(good)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "garbage.jpg").write_bytes(b"not an image at all")
    full = tmp_path / "full.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(full)
    (tmp_path / "truncated.png").write_bytes(full.read_bytes()[:300])
    full.unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = readable_images(find_images(tmp_path))
    assert ok == [good]
    messages = " ".join(str(w.message) for w in caught if issubclass(w.category, ImageWarning))
    for name in ("empty.png", "garbage.jpg", "truncated.png"):
        assert name in messages


def concept_config(folder):
    return Config.from_dict({"concepts": [{"instance_data_dir": str(folder), "instance_token": "zwx", "class_token": "dog"}]})


def test_instance_folder_errors(tmp_path):
    with pytest.raises(UserError, match=r"concepts\[0\]\.instance_data_dir: .* is not a folder"):
        collect_instances(concept_config(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no png, jpg or webp images"):
        collect_instances(concept_config(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UserError, match="none of the images .* can be read"):
            collect_instances(concept_config(tmp_path / "bad"))


def test_prompts_from_captions(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "a dog on grass.png")
    [[example]] = collect_instances(concept_config(tmp_path))
    assert example.prompt == "a zwx dog on grass"


def test_buckets_follow_aspect_ratio():
    buckets = make_buckets(512, True)
    assert (512, 512) in buckets and all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in buckets)
    assert nearest_bucket((1200, 600), buckets)[0] > nearest_bucket((1200, 600), buckets)[1]
    assert nearest_bucket((600, 1200), buckets)[0] < nearest_bucket((600, 1200), buckets)[1]
    assert make_buckets(512, False) == [(512, 512)]


def test_epochs_split_into_equal_shares_for_each_process(tmp_path):
    examples = [Example(tmp_path / f"{i}.png", "p", 0, (64, 64) if i % 2 else (96, 48)) for i in range(5)]
    params = Parameters(resolution=64, train_batch_size=2, gradient_accumulation_steps=1)
    one = TrainingData([examples], {}, params)
    assert one.steps_per_epoch == 3  # buckets of 2 and 3 images: ceil(2/2) + ceil(3/2) batches
    assert one.epoch_batches(0) == one.epoch_batches(0) and one.epoch_batches(0) != one.epoch_batches(1)
    shares = [TrainingData([examples], {}, params, num_processes=2, process_index=r) for r in range(2)]
    assert shares[0].steps_per_epoch == shares[1].steps_per_epoch == 2
    seen = {e.example.path for s in shares for b in s.epoch_batches(0) for e in b}
    assert seen == {e.path for e in examples}


def test_class_images_are_generated_in_batches_numbered_and_seeded_as_one_at_a_time(tmp_path):
    from dreambooth.data.class_images import existing_class_images, generate_missing

    folder = tmp_path / "class"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "00001.png")  # an earlier run's image without its prompt: not reused
    calls, progress = [], []

    def make_images(prompts, numbers):
        calls.append((list(prompts), list(numbers)))
        return [Image.new("RGB", (8, 8), (n, 0, 0)) for n in numbers]  # the colour says which number it was made as

    prompts = [f"a dog {i}" for i in range(5)]
    made = generate_missing(folder, prompts, make_images, lambda p, n: f"{p}\nSeed: {n}",
                            lambda done, total: progress.append((done, total)), batch_size=2)
    assert [len(p) for p, _ in calls] == [2, 2, 1]  # a last, smaller batch
    assert [p for batch, _ in calls for p in batch] == prompts
    assert [n for _, numbers in calls for n in numbers] == [0, 2, 3, 4, 5]  # the seeds: the file numbers, 1 skipped
    assert [p.name for p, _ in made] == ["00000.png", "00002.png", "00003.png", "00004.png", "00005.png"]
    assert all(Image.open(p).getpixel((0, 0))[0] == int(p.stem) for p, _ in made)
    assert progress == [(i, 5) for i in range(1, 6)]  # one step of progress per image, not per batch
    assert sorted(existing_class_images(folder)) == sorted(made)  # each with its prompt beside it, reused next time
    one_at_a_time = []
    generate_missing(tmp_path / "single", prompts[:2], lambda p, n: one_at_a_time.append(len(p)) or
                     [Image.new("RGB", (8, 8))] * len(p), lambda p, n: p, lambda d, t: None)
    assert one_at_a_time == [1, 1]  # the default batch size


def test_caption_options_dropout_shuffle_and_kept_tags():
    import random

    from dreambooth.config import Parameters
    from dreambooth.data.captions import augmented

    prompt = "zwx dog, red collar, grass, sunny, photo"
    tags = prompt.split(", ")
    off = Parameters()
    assert augmented(prompt, off, random.Random(0)) == prompt
    shuffle = Parameters(shuffle_tags=True, keep_tokens=1)
    seen = {augmented(prompt, shuffle, random.Random(seed)) for seed in range(40)}
    assert len(seen) > 10 and all(s.startswith("zwx dog, ") and sorted(s.split(", ")) == sorted(tags) for s in seen)
    assert augmented(prompt, shuffle, random.Random(5)) == augmented(prompt, shuffle, random.Random(5))  # seeded
    drop = Parameters(tag_dropout=0.5, keep_tokens=2)
    lengths = [len(augmented(prompt, drop, random.Random(seed)).split(", ")) for seed in range(200)]
    assert min(lengths) == 2 and max(lengths) == 5 and 3.2 < sum(lengths) / len(lengths) < 3.8  # 2 + 3 x 0.5
    assert all(augmented(prompt, drop, random.Random(s)).startswith("zwx dog, red collar") for s in range(50))
    empty = [augmented(prompt, Parameters(caption_dropout=0.25), random.Random(seed)) for seed in range(400)]
    assert 0.18 < empty.count("") / 400 < 0.32 and set(empty) == {"", prompt}


def test_class_prompts_never_change_and_instance_prompts_follow_the_epoch(tmp_path):
    from dreambooth.config import Parameters
    from dreambooth.data.dataset import Example, Item, TrainingData

    instance = Example(tmp_path / "a.png", "zwx dog, red, grass", 0, (64, 64))
    klass = Example(tmp_path / "c.png", "dog, red, grass", 0, (64, 64))
    data = TrainingData([[instance]], {0: [klass]}, Parameters(shuffle_tags=True, keep_tokens=0, resolution=64))
    inst, prior = Item(instance, (64, 64), False), Item(klass, (64, 64), True)
    assert {data.prompt(prior, epoch) for epoch in range(20)} == {"dog, red, grass"}
    by_epoch = [data.prompt(inst, epoch) for epoch in range(20)]
    assert len(set(by_epoch)) > 1 and by_epoch == [data.prompt(inst, epoch) for epoch in range(20)]


def _photo(path, size=(64, 48), alpha=None):
    from PIL import Image

    img = Image.new("RGB", size, (200, 30, 30))
    for x in range(size[0] // 2, size[0]):  # the right half is blue
        for y in range(size[1]):
            img.putpixel((x, y), (30, 30, 200))
    if alpha is not None:
        img.putalpha(alpha)
    img.save(path)
    return path


def test_a_mask_file_or_the_alpha_channel_is_the_loss_mask(tmp_path):
    from PIL import Image

    from dreambooth.data.images import find_images, load_mask

    plain = _photo(tmp_path / "plain.png")
    assert load_mask(plain) is None
    masked = _photo(tmp_path / "masked.jpg")
    Image.new("L", (64, 48), 255).save(tmp_path / "masked.mask.png")
    assert load_mask(masked).getextrema() == (255, 255)
    assert [p.name for p in find_images(tmp_path)] == ["masked.jpg", "plain.png"]  # a mask is never an image
    alpha = Image.new("L", (64, 48), 0)
    alpha.paste(255, (0, 0, 32, 48))
    cut_out = _photo(tmp_path / "cut.png", alpha=alpha)
    assert load_mask(cut_out).getpixel((5, 5)) == 255 and load_mask(cut_out).getpixel((60, 5)) == 0


@pytest.mark.parametrize("mask, said", [("small", "8x8 pixels, but its image bad.png is 64x48"),
                                        ("black", "is all black"), ("junk", "not a readable image")])
def test_a_bad_mask_is_one_line_naming_it(tmp_path, mask, said):
    from PIL import Image

    from dreambooth.data.images import load_mask
    from dreambooth.errors import UserError

    image = _photo(tmp_path / "bad.png")
    path = tmp_path / "bad.mask.png"
    if mask == "junk":
        path.write_bytes(b"not a png")
    else:
        Image.new("L", (8, 8) if mask == "small" else (64, 48), 255 if mask == "small" else 0).save(path)
    with pytest.raises(UserError, match=said) as e:
        load_mask(image)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("crop", ["center", "random"])
def test_the_mask_is_cropped_and_flipped_with_its_image(tmp_path, crop):
    """The left (red) half of the photo is masked in: after bucketing, random crops and flips, the mask is 1 exactly
    where the pixels are red."""
    from PIL import Image

    from dreambooth.config import Parameters
    from dreambooth.data.dataset import Example, Item, TrainingData

    image = _photo(tmp_path / "p.png", size=(96, 40))
    mask = Image.new("L", (96, 40), 0)
    mask.paste(255, (0, 0, 48, 40))
    mask.save(tmp_path / "p.mask.png")
    params = Parameters(masked_loss=True, hflip=True, crop=crop, resolution=64, aspect_ratio_bucketing=False,
                        cache_latents=False)  # a new crop and flip every epoch
    data = TrainingData([[Example(image, "zwx", 0, (96, 40))]], {}, params)
    flips = set()
    for epoch in range(12):
        pixels, _, m = data.load_item(Item(data.instances[0], (64, 64), False), epoch)
        red = pixels[0] > pixels[2]
        assert m.shape == (1, 64, 64)
        agree = ((m[0] > 0.5) == red).float().mean().item()
        assert agree > 0.95, (epoch, agree)
        flips.add(bool(red[:, 0].all()))
    assert flips == {True, False}  # both flipped and unflipped items were seen


def test_class_items_and_unmasked_runs_have_no_mask(tmp_path):
    from PIL import Image

    from dreambooth.config import Parameters
    from dreambooth.data.dataset import Example, Item, TrainingData

    image = _photo(tmp_path / "p.png")
    Image.new("L", (64, 48), 255).save(tmp_path / "p.mask.png")
    example = Example(image, "zwx", 0, (64, 48))
    off = TrainingData([[example]], {}, Parameters(resolution=64))
    assert off.load_item(Item(example, (64, 64), False), 0)[2] is None
    on = TrainingData([[example]], {}, Parameters(resolution=64, masked_loss=True))
    assert on.load_item(Item(example, (64, 64), True), 0)[2] is None  # a class image is learnt whole


def test_validation_images_held_out_from_a_folder_or_the_training_set(tmp_path):
    from dreambooth.config import Config
    from dreambooth.data.dataset import collect_instances, split_validation
    from dreambooth.errors import UserError
    from train_helpers import draw_images

    folder = draw_images(tmp_path / "inst", count=4)
    held_folder = draw_images(tmp_path / "val", count=2)

    def config(**parameters):
        concept = {"instance_data_dir": str(folder), "instance_token": "zwx", **parameters.pop("concept", {})}
        return Config.from_dict({"concepts": [concept], "parameters": {"resolution": 64, **parameters}})

    off = config()
    train, validation = split_validation(off, collect_instances(off))
    assert validation == [] and len(train[0]) == 4
    two = config(validation_every_n_steps=5, validation_holdout=2)
    train, validation = split_validation(two, collect_instances(two))
    assert len(train[0]) == 2 and len(validation) == 2 and not set(train[0]) & set(validation)
    assert split_validation(two, collect_instances(two))[1] == validation  # chosen by the seed, every time
    own = config(validation_every_n_steps=5, validation_holdout=2, concept={"validation_data_dir": str(held_folder)})
    train, validation = split_validation(own, collect_instances(own))
    assert len(train[0]) == 4 and {e.path.parent for e in validation} == {held_folder}
    same = config(validation_every_n_steps=5)
    train, validation = split_validation(same, collect_instances(same))
    assert validation == train[0]  # no held-out images: the training images at fixed noise
    with pytest.raises(UserError, match="keeps out all its 4 instance images"):
        every = config(validation_every_n_steps=5, validation_holdout=4)
        split_validation(every, collect_instances(every))
