"""The shapes world: determinism, truthful captions, held-out compositions, noise, tasks, files."""

import csv
import io
import json
import re
import tarfile
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

from vlp.data.sample import Sample
from vlp.data.shapes import (
    COLORS,
    HELD_OUT,
    PROMPT_TEMPLATES,
    RGB,
    SHAPES,
    SPLITS,
    Claim,
    Mention,
    ShapesWorld,
    caption_is_true,
    class_names,
    parse_caption,
    write_shapes,
)

EVAL_SPLITS = [s for s in SPLITS if s != "train"]
SEEN_SPLITS = [s for s in SPLITS if s != "compositional"]


def holds(a: dict, relation: str, b: dict) -> bool:
    """The relations recomputed from the boxes, independently of the module."""
    a_left, a_right, a_top, a_bottom = a["x"] - a["r"], a["x"] + a["r"], a["y"] - a["r"], a["y"] + a["r"]
    b_left, b_right, b_top, b_bottom = b["x"] - b["r"], b["x"] + b["r"], b["y"] - b["r"], b["y"] + b["r"]
    return {
        "left of": a_right < b_left - 1,
        "right of": b_right < a_left - 1,
        "above": a_bottom < b_top - 1,
        "below": b_bottom < a_top - 1,
    }[relation]


def is_true(text: str, objects: list[dict]) -> bool:
    """Every mentioned object exists (colour, shape, size if said); every relation holds."""
    claim = parse_caption(text)
    found = []
    for m in claim.mentions:
        matches = [o for o in objects if (o["color"], o["shape"]) == (m.color, m.shape) and m.size in (None, o["size"])]
        if not matches:
            return False
        found.append(matches[0])
    return bool(found) and all(holds(found[a], rel, found[b]) for a, rel, b in claim.relations)


def scenes(world: ShapesWorld, split: str, n: int) -> list[dict]:
    return [world.scene(split, i) for i in range(n)]


def test_same_seed_split_index_gives_the_same_sample():
    first, second = ShapesWorld(seed=3), ShapesWorld(seed=3)
    a = [first.sample("val", i) for i in range(5)]
    b = [second.sample("val", i) for i in reversed(range(5))][::-1]  # order does not matter
    for x, y in zip(a, b):
        assert isinstance(x, Sample) and x.source == y.source
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image))
        assert x.captions == y.captions and x.meta == y.meta
    assert json.loads(json.dumps(a[0].meta)) == a[0].meta  # JSON-serialisable as is
    other_seed = ShapesWorld(seed=4).sample("val", 0)
    assert not np.array_equal(np.asarray(other_seed.image), np.asarray(a[0].image))
    assert other_seed.meta["objects"] != a[0].meta["objects"]
    assert ShapesWorld(seed=3).scene("test", 0)["objects"] != a[0].meta["objects"]


def test_image_is_rgb_and_objects_are_drawn_where_the_metadata_says():
    world = ShapesWorld(image_size=64)
    for i in range(30):
        sample = world.sample("test", i)
        assert sample.image.mode == "RGB" and sample.image.size == (64, 64)
        pixels = np.asarray(sample.image).astype(int)
        for obj in sample.meta["objects"]:
            centre = pixels[obj["y"], obj["x"]]
            nearest = min(COLORS, key=lambda c: np.abs(np.subtract(RGB[c], centre)).sum())
            assert nearest == obj["color"], (i, obj, centre)


@pytest.mark.parametrize("image_size", [32, 64, 100])
def test_objects_are_distinct_inside_the_image_and_separated(image_size):
    world = ShapesWorld(image_size=image_size)
    margin = 0.06 * image_size
    counts = Counter()
    for split in SPLITS:
        for scene in scenes(world, split, 60):
            objects = scene["objects"]
            counts[len(objects)] += 1
            assert 1 <= len(objects) <= 3
            assert len({o["shape"] for o in objects}) == len(objects)
            assert len({o["color"] for o in objects}) == len(objects)
            for o in objects:
                assert o["r"] == round((0.10 if o["size"] == "small" else 0.18) * image_size)
                assert o["x"] - o["r"] >= margin and o["x"] + o["r"] <= image_size - 1 - margin
                assert o["y"] - o["r"] >= margin and o["y"] + o["r"] <= image_size - 1 - margin
            expected = [
                [i, rel, j]
                for i, a in enumerate(objects)
                for j, b in enumerate(objects)
                for rel in ("left of", "right of", "above", "below")
                if i != j and holds(a, rel, b)
            ]
            assert sorted(map(tuple, scene["relations"])) == sorted(map(tuple, expected))
            for i, a in enumerate(objects):  # every pair is apart on some axis
                for b in objects[i + 1 :]:
                    assert any(holds(a, rel, b) for rel in ("left of", "right of", "above", "below"))
    assert set(counts) == {1, 2, 3}


def test_parse_caption_known_answers():
    assert parse_caption("a small red circle left of a large blue square") == Claim(
        (Mention("red", "circle", "small"), Mention("blue", "square", "large")), ((0, "left of", 1),)
    )
    assert parse_caption("there is a big blue box") == Claim((Mention("blue", "square", "large"),))
    assert parse_caption("a green triangle, and a tiny purple disk to the left of an orange rhombus") == Claim(
        (Mention("green", "triangle"), Mention("purple", "circle", "small"), Mention("orange", "diamond")),
        ((1, "left of", 2),),
    )
    assert parse_caption("a yellow diamond under a red box").relations == ((0, "below", 1),)
    with pytest.raises(ValueError, match="'hexagon'"):
        parse_caption("a red hexagon")
    with pytest.raises(ValueError, match="no object before it"):
        parse_caption("above a red circle")
    with pytest.raises(ValueError, match="no colour"):
        parse_caption("a small circle")
    with pytest.raises(ValueError, match="middle of a description"):
        parse_caption("a red circle and a small")


def test_caption_is_true_known_answers():
    objects = [
        {"shape": "circle", "color": "red", "size": "small", "x": 10, "y": 30, "r": 6},
        {"shape": "square", "color": "blue", "size": "large", "x": 40, "y": 30, "r": 12},
    ]
    assert caption_is_true("a small red circle to the left of a big blue box", objects)
    assert caption_is_true("a blue square right of a red circle", objects)
    assert not caption_is_true("a red circle right of a blue square", objects)
    assert not caption_is_true("a large red circle", objects)
    assert not caption_is_true("a red circle above a blue square", objects)
    objects[1]["x"] = 30  # boxes end at x=16 and start at x=18: one background column between
    assert caption_is_true("a red circle left of a blue square", objects)
    objects[1]["x"] = 29  # boxes touch: 16 and 17
    assert not caption_is_true("a red circle left of a blue square", objects)
    assert not caption_is_true("a blue square right of a red circle", objects)


@pytest.mark.parametrize("split", SPLITS)
def test_captions_are_true_lowercase_paraphrases(split):
    world = ShapesWorld(seed=1)
    relation_captions = 0
    for scene in scenes(world, split, 80):
        captions = scene["captions"]
        assert len(captions) == (1 if split == "train" else 5)
        assert len(set(captions)) == len(captions)
        for text in captions:
            assert text == text.lower() and not text.endswith(".")
            assert is_true(text, scene["objects"]), (text, scene["objects"])
            relation_captions += bool(parse_caption(text).relations)
    assert relation_captions > 0 or split == "classify"


def test_paraphrases_use_synonyms_and_several_templates():
    words = Counter(w for s in scenes(ShapesWorld(), "val", 40) for c in s["captions"] for w in c.split())
    for word in ("disk", "box", "rhombus", "tiny", "big", "over", "under", "picture", "there"):
        assert words[word] > 0, word


def test_held_out_compositions_only_in_the_compositional_split():
    world = ShapesWorld(seed=2, noise=0.5)
    held_out_text = re.compile("|".join(f"{c} {s}" for c, s in HELD_OUT))
    for split in SEEN_SPLITS:
        for scene in scenes(world, split, 120):
            assert not {(o["color"], o["shape"]) for o in scene["objects"]} & set(HELD_OUT)
            texts = scene["captions"] + [t for s in scene["swaps"] for t in (s["true"], s["false"])]
            texts += [scene["clean_caption"]] if split == "train" else []
            for text in texts:  # no caption, noisy or not, names a held-out pair
                assert not {(m.color, m.shape) for m in parse_caption(text).mentions} & set(HELD_OUT)
            assert not any(held_out_text.search(q["question"]) for q in scene["qa"])
    for scene in scenes(world, "compositional", 120):
        assert {(o["color"], o["shape"]) for o in scene["objects"]} & set(HELD_OUT)


def test_classify_split_has_labels_single_seen_objects():
    names = class_names("color_shape")
    for scene in scenes(ShapesWorld(), "classify", 60):
        (obj,) = scene["objects"]
        assert scene["labels"] == {
            "shape": obj["shape"],
            "color": obj["color"],
            "color_shape": f"{obj['color']} {obj['shape']}",
        }
        assert scene["labels"]["color_shape"] in names
    assert "labels" not in ShapesWorld().scene("val", 0)


def test_class_names_and_prompt_templates():
    assert class_names("shape") == list(SHAPES)
    assert class_names("color") == list(COLORS)
    names = class_names("color_shape")
    assert names == sorted(names) and len(names) == len(COLORS) * len(SHAPES) - len(HELD_OUT)
    assert "red circle" in names and "red triangle" not in names
    with pytest.raises(ValueError, match="'size'"):
        class_names("size")
    assert len(PROMPT_TEMPLATES) >= 5 and all(t.count("{}") == 1 for t in PROMPT_TEMPLATES)


def test_noise_rate_kinds_and_falsity():
    world = ShapesWorld(seed=5, noise=0.3)
    train = scenes(world, "train", 2000)
    noisy = [s for s in train if s["noisy"]]
    assert abs(len(noisy) / len(train) - 0.3) < 0.04
    assert set(Counter(s["noise_kind"] for s in noisy)) == {"random", "attribute", "relation"}
    for scene in train:
        caption, clean = scene["captions"][0], scene["clean_caption"]
        assert is_true(clean, scene["objects"])
        if scene["noisy"]:
            assert caption != clean and not is_true(caption, scene["objects"])
            assert scene["noise_kind"] != "relation" or len(scene["objects"]) > 1
        else:
            assert caption == clean and scene["noise_kind"] is None


def test_noise_changes_only_the_noisy_captions():
    clean_world, noisy_world = ShapesWorld(noise=0.0), ShapesWorld(noise=0.5)
    for i in range(100):
        clean, noisy = clean_world.scene("train", i), noisy_world.scene("train", i)
        assert not clean["noisy"] and clean["captions"] == [clean["clean_caption"]]
        assert noisy["objects"] == clean["objects"]
        assert noisy["clean_caption"] == clean["captions"][0]
    for split in EVAL_SPLITS:
        scene = ShapesWorld(noise=1.0).scene(split, 0)
        assert "noisy" not in scene and "clean_caption" not in scene


def test_swap_pairs_are_true_and_false_twins():
    kinds = Counter()
    for split in ("test", "compositional"):
        for scene in scenes(ShapesWorld(), split, 100):
            for swap in scene["swaps"]:
                kinds[swap["kind"]] += 1
                assert swap["true"] != swap["false"]
                assert is_true(swap["true"], scene["objects"])
                assert not is_true(swap["false"], scene["objects"]), swap
                true, false = parse_caption(swap["true"]), parse_caption(swap["false"])
                if swap["kind"] == "relation":  # same objects and relation, roles exchanged
                    assert false.mentions == true.mentions[::-1]
                    assert false.relations == true.relations
                else:
                    assert {m.shape for m in false.mentions} == {m.shape for m in true.mentions}
    assert kinds["attribute"] == 200 and kinds["relation"] > 100


def test_qa_answers_match_the_objects():
    answers = defaultdict(Counter)
    for split in ("val", "compositional"):
        for scene in scenes(ShapesWorld(), split, 200):
            objects = scene["objects"]
            by_shape = {o["shape"]: o for o in objects}
            by_color = {o["color"]: o for o in objects}
            for qa in scene["qa"]:
                question, answer, kind = qa["question"], qa["answer"], qa["type"]
                assert " " not in answer and question.endswith("?")
                answers[kind][answer] += 1
                if kind == "color":
                    shape = re.fullmatch(r"what color is the (\w+)\?", question)[1]
                    assert by_shape[shape]["color"] == answer
                elif kind == "shape":
                    color = re.fullmatch(r"what shape is the (\w+) object\?", question)[1]
                    assert by_color[color]["shape"] == answer
                elif kind == "count":
                    assert answer == ["one", "two", "three"][len(objects) - 1]
                elif kind == "exists":
                    color, shape = re.fullmatch(r"is there an? (\w+) (\w+)\?", question).groups()
                    present = by_shape.get(shape, {}).get("color") == color
                    assert answer == ("yes" if present else "no")
                else:
                    m = re.fullmatch(
                        r"is the (\w+) (\w+) (left of|right of|above|below) "
                        r"the (\w+) (\w+)\?",
                        question,
                    )
                    a, b = by_color[m[1]], by_color[m[4]]
                    assert (a["shape"], b["shape"]) == (m[2], m[5])
                    assert answer == ("yes" if holds(a, m[3], b) else "no")
    assert set(answers) == {"color", "shape", "count", "exists", "relation"}
    for kind in ("exists", "relation"):  # balanced yes/no
        assert 0.4 < answers[kind]["yes"] / sum(answers[kind].values()) < 0.6


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="'training'"):
        ShapesWorld().scene("training", 0)
    with pytest.raises(ValueError, match="-1"):
        ShapesWorld().sample("val", -1)
    with pytest.raises(ValueError, match="noise"):
        ShapesWorld(noise=1.5)
    with pytest.raises(ValueError, match="image_size"):
        ShapesWorld(image_size=16)


def _check_info(info: dict, out, fmt: str, counts: dict) -> None:
    assert json.loads((out / "info.json").read_text()) == info
    assert info["version"] == 1 and info["format"] == fmt and info["splits"] == counts
    assert info["seed"] == 7 and info["image_size"] == 48 and info["noise"] == 0.2
    assert info["held_out"] == [list(p) for p in HELD_OUT] and info["shapes"] == list(SHAPES)
    assert info["classes"]["color_shape"] == class_names("color_shape")
    assert info["prompt_templates"] == list(PROMPT_TEMPLATES) and info["colors"] == list(COLORS)


def _read_wds(out, split: str) -> list[tuple[str, bytes, dict]]:
    records = []
    for shard in sorted((out / split).glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = sorted({name.rsplit(".", 1)[0] for name in members})
        assert set(members) == {f"{k}.{ext}" for k in keys for ext in ("png", "json")}
        records += [(k, members[f"{k}.png"], json.loads(members[f"{k}.json"])) for k in keys]
    return records


@pytest.mark.parametrize("fmt", ["wds", "jsonl", "csv"])
def test_write_shapes_round_trip(tmp_path, fmt):
    counts = {"train": 7, "val": 3, "classify": 2}
    info = write_shapes(tmp_path, counts, seed=7, image_size=48, noise=0.2, format=fmt, shard_size=4, progress=False)
    _check_info(info, tmp_path, fmt, counts)
    world = ShapesWorld(seed=7, image_size=48, noise=0.2)
    for split, count in counts.items():
        expected = [world.sample(split, i) for i in range(count)]
        if fmt == "wds":
            assert len(list((tmp_path / split).glob("*.tar"))) == -(-count // 4)
            records = _read_wds(tmp_path, split)
            assert [key for key, _, _ in records] == [f"{split}_{i:08d}" for i in range(count)]
            images = [png for _, png, _ in records]
            metas = [meta for _, _, meta in records]
        elif fmt == "jsonl":
            lines = (tmp_path / f"{split}.jsonl").read_text().splitlines()
            metas = [json.loads(line) for line in lines]
            assert [m.pop("image") for m in metas] == [f"{split}/{split}_{i:08d}.png" for i in range(count)]
            images = [(tmp_path / split / f"{split}_{i:08d}.png").read_bytes() for i in range(count)]
        else:
            with open(tmp_path / f"{split}.csv", newline="") as f:
                rows = list(csv.reader(f, delimiter="\t"))
            assert rows[0] == ["filepath", "title"]
            assert rows[1:] == [[f"{split}/{split}_{i:08d}.png", c] for i, s in enumerate(expected) for c in s.captions]
            images = [
                (tmp_path / rows[1 + sum(len(s.captions) for s in expected[:i])][0]).read_bytes() for i in range(count)
            ]
            metas = [{"caption": s.captions, **s.meta} for s in expected]
        assert metas == [{"caption": s.captions, **s.meta} for s in expected]
        for png, sample in zip(images, expected):
            decoded = Image.open(io.BytesIO(png))
            assert decoded.format == "PNG" and decoded.mode == "RGB"
            assert np.array_equal(np.asarray(decoded), np.asarray(sample.image))


def test_write_shapes_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="'parquet'"):
        write_shapes(tmp_path, {"train": 1}, format="parquet", progress=False)
    with pytest.raises(ValueError, match="'training'"):
        write_shapes(tmp_path, {"training": 1}, progress=False)
    with pytest.raises(ValueError, match=r"counts\['val'\]"):
        write_shapes(tmp_path, {"val": -2}, progress=False)
