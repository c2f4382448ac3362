"""The example workflows on disk are the generated ones, and their two formats agree."""

import json

from hidiff.app import comfy_workflows as workflows


def test_example_workflows_are_up_to_date():
    for name, data in workflows.files().items():
        path = workflows.FOLDER / name
        assert path.exists(), f"{path} missing: run python -m hidiff.app.comfy_workflows"
        assert json.loads(path.read_text()) == data, f"{path} is stale: run python -m hidiff.app.comfy_workflows"


def test_ui_and_api_formats_describe_the_same_graph():
    for name in workflows.EXAMPLES:
        ui = json.loads((workflows.FOLDER / f"{name}.json").read_text())
        api = json.loads((workflows.FOLDER / f"{name}.api.json").read_text())
        assert sorted(str(n["id"]) for n in ui["nodes"]) == sorted(api)
        for node in ui["nodes"]:
            assert api[str(node["id"])]["class_type"] == node["type"]
        for link_id, src, _slot, dst, _dst_slot, _typ in ui["links"]:
            assert any(v == [str(src), _slot] for v in api[str(dst)]["inputs"].values()), link_id
