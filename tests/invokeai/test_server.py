"""The node in a real InvokeAI server: enqueued through the queue API, as the UI does."""

from __future__ import annotations

import json

import pytest
import torch
from invoketest import NATIVE_PX, HTTPError, txt2img_graph

SIZE = 2 * NATIVE_PX  # 2x the tiny model's native size
NODE = "hidiff_denoise_latents"


def digest(server, item) -> dict:
    return json.loads(server.output(item, "digest")["value"])


def test_node_pack_loads_and_the_node_offers_every_option(server):
    from hidiff.core.config import option_specs

    assert "Loading node pack hidiff_hidiffusion" in server.log_path.read_text()
    schema = server.call("GET", "/openapi.json")["components"]["schemas"]["HiDiffusionDenoiseLatentsInvocation"]
    properties = schema["properties"]
    for spec in option_specs():
        assert spec.name in properties, spec.name
        field = properties[spec.name]
        assert field["description"] == spec.help
        shown_default = spec.none_label if spec.default is None and spec.choices is not None else spec.default
        assert field.get("default") == shown_default, (spec.name, field)
    assert properties["t1_ratio"]["anyOf"][0]["minimum"] == 0 and properties["t1_ratio"]["anyOf"][0]["maximum"] == 1
    assert properties["window_shift"]["enum"] == ["seeded", "reference", "none"]
    assert properties["preset"]["enum"][0] == "auto"
    assert properties["hidiffusion"]["ui_hidden"] is True


def test_node_at_2x_native_then_plain_gives_the_stock_image(server):
    stock = server.run(txt2img_graph(server.model, SIZE, denoise="denoise_latents"))
    stock_pixels, _ = server.image(stock)
    before = digest(server, stock)

    item = server.run(txt2img_graph(server.model, SIZE))
    pixels, metadata = server.image(item)
    assert pixels.shape == (SIZE, SIZE, 3)
    assert not torch.equal(pixels, stock_pixels), "HiDiffusion changed nothing at 2x native"
    record = metadata["hidiff"]
    assert record["family"] == "sd1" and record["task"] == "text2img"
    assert record["preset"] == "sd-1024" and record["steps"] == 4 and record["latent"] == [SIZE // 8, SIZE // 8]
    # sd-1024: the strided conv for steps [0, T1) with T1 = int(4 * 0.4) = 1; windows at every step
    assert record["conv_steps"] == [0] and record["pool_steps"] == [] and record["window_steps"] == [0, 1, 2, 3]
    assert record["options"]["window_shift"] == "seeded" and record["options"]["preset"] is None
    # InvokeAI's own settings are in the metadata beside hidiff's (denoise_latents_meta's)
    assert metadata["steps"] == 4 and metadata["seed"] == 1 and metadata["positive_prompt"] == "one red circle"
    assert metadata["hidiffusion"] is False
    assert digest(server, item) == before, "the cached U-Net changed"

    again = server.run(txt2img_graph(server.model, SIZE, denoise="denoise_latents"))
    assert torch.equal(server.image(again)[0], stock_pixels)
    assert torch.equal(server.image(server.run(txt2img_graph(server.model, SIZE)))[0], pixels)


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"t1_ratio": 1.5}, "t1_ratio"),
        ({"window_shift": "sideways"}, "window_shift"),
        ({"kv_downsample": 3}, "kv_downsample"),
        ({"t1_ratio": 0.2, "t2_ratio": 0.5}, "t2_ratio"),
        ({"hidiffusion": True}, "hidiffusion"),
    ],
)
def test_a_bad_option_is_refused_at_enqueue_naming_it(server, fields, named):
    with pytest.raises(HTTPError) as refused:
        server.enqueue(txt2img_graph(server.model, SIZE, fields=fields))
    assert refused.value.status == 422
    # a bad value is named by the error's location; options that conflict together by its message
    details = refused.value.body["detail"]
    assert details and all(d["loc"][:6] == ["body", "batch", "graph", "nodes", "denoise", NODE] for d in details)
    assert any(d["loc"][-1] == named or named in d["msg"] for d in details), details


def test_a_batch_gives_each_image_its_own_seed_reproducibly(server):
    seeds = {"node_path": "noise", "field_name": "seed", "items": [11, 12]}
    batch = server.enqueue(txt2img_graph(server.model, SIZE), data=[[seeds]])
    assert len(batch) == 2
    images = {}
    for item_id in batch:
        item = server.wait(item_id)
        assert item["status"] == "completed", item.get("error_message")
        pixels, metadata = server.image(item)
        images[metadata["seed"]] = pixels
    assert set(images) == {11, 12} and not torch.equal(images[11], images[12])
    for seed, pixels in images.items():  # each image alone is the batch's image of that seed
        alone = server.run(txt2img_graph(server.model, SIZE, seed=seed))
        assert torch.equal(server.image(alone)[0], pixels), seed


@pytest.mark.parametrize(
    "how", [{"img2img_start": 0.5}, {"fields": {"denoising_end": 0.5}}], ids=["denoising_start", "denoising_end"]
)
def test_rau_net_steps_follow_the_steps_that_run(server, how):
    # 10 steps cut in half: 5 run, and sd-1024's T1 = int(5 x 0.4) = 2 counts on those 5
    item = server.run(txt2img_graph(server.model, SIZE, steps=10, **how))
    record = server.image(item)[1]["hidiff"]
    assert record["steps"] == 5
    assert record["task"] == ("img2img" if "img2img_start" in how else "text2img")
    assert record["conv_steps"] == [0, 1] and record["window_steps"] == [0, 1, 2, 3, 4]


def test_a_cancelled_run_leaves_the_cached_model_as_it_was(server):
    import time

    stock = server.run(txt2img_graph(server.model, SIZE, denoise="denoise_latents"))
    before = digest(server, stock)
    started = server.log(10**7).count("hidiff: HiDiffusion on for this")
    (item_id,) = server.enqueue(txt2img_graph(server.model, SIZE, steps=200))  # far longer than the wait below
    deadline = time.time() + 120
    while server.log(10**7).count("hidiff: HiDiffusion on for this") == started:
        assert time.time() < deadline, "the denoise did not start"
        time.sleep(0.1)
    time.sleep(0.5)
    server.cancel(item_id)
    assert server.wait(item_id)["status"] == "canceled"
    while "hidiff: the denoise stopped (CanceledException)" not in server.log(10**7):
        assert time.time() < deadline, "the denoise was not stopped by the cancel"
        time.sleep(0.1)
    after = server.run(txt2img_graph(server.model, SIZE, denoise="denoise_latents"))
    assert digest(server, after) == before
    assert torch.equal(server.image(after)[0], server.image(stock)[0])
