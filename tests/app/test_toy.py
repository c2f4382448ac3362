"""The toy model's pictures, counter and pipeline (untrained weights: structure and loading, not quality)."""

import random

import pytest
import torch

import hidiff
from hidiff.app.toy import NATIVE, PROMPTS, ToyPipeline, toy_components
from hidiff.app.toy.count import count_objects
from hidiff.app.toy.shapes import BACKGROUNDS, Scene, Shape, random_scene, render, separated_scene, training_batch


@pytest.mark.parametrize("count", [0, 1, 2, 3])
def test_counter_counts_and_names_ground_truth(count):
    rng = random.Random(count)
    for size in (2 * NATIVE, 4 * NATIVE):
        for background in BACKGROUNDS:
            for _ in range(6):
                scene = separated_scene(rng, size, count, background) if count else Scene(background, ())
                found = count_objects(render(scene, size))
                assert found.n == count, (size, scene)
                assert found.background == background
                assert sorted((b.shape, b.colour) for b in found.objects) == sorted(
                    (s.kind, s.colour) for s in scene.shapes
                )


def test_counter_names_every_training_picture_at_native_size():
    """Each shape/colour/background at the smallest and largest trained size, and random ones."""
    rng = random.Random(1)
    scenes = [random_scene(rng, NATIVE, prompt) for prompt in PROMPTS for _ in range(3)]
    for prompt in PROMPTS:  # the extremes of the size range, centred
        colour, kind, background = prompt.split()[1], prompt.split()[2], prompt.split()[4]
        for side in (0.4 * NATIVE, 0.65 * NATIVE):
            scenes.append(Scene(background, (Shape(kind, colour, NATIVE / 2, NATIVE / 2, side),)))
    for scene in scenes:
        shape = scene.shapes[0]
        found = count_objects(render(scene, NATIVE))
        assert found.matches(f"one {shape.colour} {shape.kind} on {scene.background}"), (scene, found)


def test_touching_objects_count_once_and_speckle_not_at_all():
    two_touching = Scene("white", (Shape("square", "red", 10, 10, 8), Shape("square", "red", 17, 10, 8)))
    assert count_objects(render(two_touching, 32)).n == 1
    speck = Scene("black", (Shape("square", "red", 10.5, 10.5, 2),))  # 4 pixels, below the minimum area
    assert count_objects(render(speck, 32)).n == 0


def test_training_batches_are_a_function_of_the_seed():
    a, prompts_a = training_batch(7, 4, NATIVE)
    b, prompts_b = training_batch(7, 4, NATIVE)
    c, _ = training_batch(8, 4, NATIVE)
    assert torch.equal(a, b) and prompts_a == prompts_b
    assert not torch.equal(a, c)
    assert a.shape == (4, 3, NATIVE, NATIVE) and a.min() >= -1 and a.max() <= 1
    assert all(p in PROMPTS for p in prompts_a)


def test_prompts_outside_the_vocabulary_are_refused():
    pipe = ToyPipeline(**toy_components())
    with pytest.raises(ValueError, match="outside the toy vocabulary"):
        pipe("one purple circle on white", num_inference_steps=1)
    with pytest.raises(ValueError, match="multiples of 8"):
        pipe("one red circle on white", height=20, width=20, num_inference_steps=1)


def test_pipeline_saves_loads_and_is_patched_as_sd1(tmp_path):
    pipe = ToyPipeline(**toy_components())
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    loaded = ToyPipeline.from_pretrained(tmp_path)
    for name, value in pipe.unet.state_dict().items():
        assert torch.equal(value, loaded.unet.state_dict()[name])
    assert hidiff.detect_layout(loaded.unet).family == "sd1"

    def run(p, size):
        return p(
            "one red circle on white",
            height=size,
            width=size,
            num_inference_steps=4,
            guidance_scale=1.0,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
            callback_on_step_end=lambda *a: records.append(hidiff.last_call(p)),
        ).images

    records = []
    plain = run(loaded, 4 * NATIVE)
    hidiff.apply_hidiffusion(loaded)
    patched = run(loaded, 4 * NATIVE)
    hidiff.remove_hidiffusion(loaded)
    assert records[:4] == [None] * 4  # not patched: no record
    records = records[4:]
    assert [r.preset for r in records] == ["sd-2048"] * 4
    assert [r.conv for r in records] == [True, True, False, False]  # T1 = int(4 * 0.7)
    assert [r.pool for r in records] == [True, False, False, False]  # T2 = int(4 * 0.3)
    assert records[0].pooled_from == (NATIVE, NATIVE)  # the stage-1 map after the stride-4 conv
    assert all(r.window_calls == 5 and r.window_maps[0] == (4 * NATIVE, 4 * NATIVE) for r in records)
    assert patched.shape == plain.shape == (1, 3, 4 * NATIVE, 4 * NATIVE)
    assert not torch.allclose(plain, patched)


def test_img2img_starts_from_the_image():
    pipe = ToyPipeline(**toy_components())
    pipe.set_progress_bar_config(disable=True)
    image = render(Scene("white", (Shape("circle", "red", 8, 8, 8),)), NATIVE)
    kwargs = dict(image=image, num_inference_steps=5, guidance_scale=1.0, output_type="pt")
    light = pipe("one red circle on white", strength=0.2, generator=torch.Generator().manual_seed(0), **kwargs).images[
        0
    ]
    heavy = pipe("one red circle on white", strength=1.0, generator=torch.Generator().manual_seed(0), **kwargs).images[
        0
    ]
    assert light.shape == image.shape
    # one step of five from a lightly noised picture stays close to it; a full run does not
    assert (light - image).abs().mean() < 0.5 * (heavy - image).abs().mean()
